//! Helpers shared by the allocator's integration tests: connecting to the
//! stack's Redis, stocking keys, building requests.

#![allow(dead_code)]

use std::time::Duration;

use allocator::{
    Adjustment, AdjustmentKind, AdjustmentOutcome, Allocator, AllocatorSettings, ReserveRequest,
    StockKey, StockSettings,
};

/// P of every test (the dev config's).
pub const PARTITIONS: u32 = 64;

/// Settings of a test node.
pub fn settings(node: &str) -> AllocatorSettings {
    AllocatorSettings {
        node: node.to_owned(),
        partitions: PARTITIONS,
        command_timeout: Duration::from_secs(5),
        ttl_default: Duration::from_secs(600),
        ttl_max: Duration::from_secs(3600),
        customer_ref_key: "test-customer-ref-key".to_owned(),
        cart_line_grace: Duration::from_secs(2),
    }
}

/// An allocator for `node` on the stack's Redis.
pub async fn allocator_for(node: &str) -> Allocator {
    Allocator::connect(&testkit::stack().redis_url, settings(node), 4)
        .await
        .expect("connect to the stack's redis")
}

/// A delta adjustment of `key` from source `test`.
pub fn delta(key: &StockKey, qty: i64, event_id: &str) -> Adjustment {
    Adjustment {
        merchant: key.merchant.clone(),
        sku: key.sku.clone(),
        location: key.location.clone(),
        kind: AdjustmentKind::Delta,
        qty,
        source: "test".to_owned(),
        event_id: event_id.to_owned(),
        source_seq: None,
    }
}

/// Adds `units` to `key` (creates it with no stock when `units` is 0).
pub async fn stock(allocator: &Allocator, key: &StockKey, units: i64) {
    if units == 0 {
        let empty = StockSettings {
            safety_stock: 0,
            backorder_limit: 0,
            low_stock_threshold: None,
            reorder_point: None,
            reorder_qty: 0,
        };
        allocator.settings_of(key, empty).await.expect("create key");
        return;
    }
    let outcome = allocator
        .adjust(&delta(key, units, &testkit::unique_id("restock")))
        .await
        .expect("restock");
    assert!(
        matches!(outcome, AdjustmentOutcome::Applied { .. }),
        "{outcome:?}"
    );
}

/// A reservation of `qty` units of `key`'s pool with the default lifetime.
pub fn reserve(key: &StockKey, qty: u32, idempotency_key: &str) -> ReserveRequest {
    ReserveRequest {
        key: key.clone(),
        qty,
        ttl: None,
        idempotency_key: idempotency_key.to_owned(),
        customer_ref: None,
    }
}

/// A reserver ("node") over `allocator`, holding at once (no coalescing
/// wait), with no throttle or customer limit in force.
pub fn reserver(allocator: allocator::Allocator) -> allocator::Reserver {
    let settings = allocator::Coalescing {
        wait: std::time::Duration::ZERO,
        batch_max: 64,
    };
    allocator::Reserver::new(
        allocator,
        allocator::Coalescer::new(settings, std::sync::Arc::new(|_| {})),
    )
}

/// A plain Redis client on the stack's Redis, for tests that stage what the
/// stock engine never does itself (its records' housekeeping, by hand).
pub async fn raw_redis() -> fred::clients::Client {
    use fred::prelude::*;
    let url = &testkit::stack().redis_url;
    let client = Builder::from_config(fred::types::config::Config::from_url(url).expect("url"))
        .build()
        .expect("client");
    client.init().await.expect("connect to redis");
    client
}
