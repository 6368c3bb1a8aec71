//! The allocator's contract with the store itself: change notifications, and
//! failing closed when Redis is gone, then recovering (scripts reloaded on
//! NOSCRIPT) without a restart.

mod common;

use common::{PARTITIONS, reserve};

use std::time::{Duration, Instant};

use allocator::{
    Adjustment, AdjustmentKind, Allocator, AllocatorError, AllocatorSettings, StockKey,
};
use fred::prelude::*;

fn settings() -> AllocatorSettings {
    AllocatorSettings {
        node: "store-node".to_owned(),
        partitions: PARTITIONS,
        command_timeout: Duration::from_millis(300),
        ttl_default: Duration::from_secs(600),
        ttl_max: Duration::from_secs(3600),
        customer_ref_key: "store-customer-ref-key".to_owned(),
        cart_line_grace: Duration::from_secs(2),
    }
}

fn restock(key: &StockKey, units: i64) -> Adjustment {
    Adjustment {
        merchant: key.merchant.clone(),
        sku: key.sku.clone(),
        location: key.location.clone(),
        kind: AdjustmentKind::Delta,
        qty: units,
        source: "test".to_owned(),
        event_id: testkit::unique_id("restock"),
        source_seq: None,
    }
}

#[tokio::test]
async fn every_change_publishes_the_cell_and_its_version() {
    let stack = testkit::stack();
    // Other tests publish too: a deep channel, so ours are not crowded out.
    let subscriber = Builder::from_config(Config::from_url(&stack.redis_url).expect("url"))
        .with_performance_config(|performance| performance.broadcast_channel_capacity = 100_000)
        .build()
        .expect("client");
    subscriber.init().await.expect("connect");
    let mut messages = subscriber.message_rx();
    let key = StockKey::new(testkit::unique_id("m"), "sku", "dc1");
    subscriber
        .ssubscribe(allocator::keys::changes_channel(key.partition(PARTITIONS)))
        .await
        .expect("subscribe");

    let allocator = Allocator::connect(&stack.redis_url, settings(), 1)
        .await
        .expect("connect");
    allocator.adjust(&restock(&key, 3)).await.expect("restock");
    allocator
        .reserve(&reserve(&key, 1, "n1"))
        .await
        .expect("reserve");

    let mut versions = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while versions.len() < 2 && Instant::now() < deadline {
        let message = match tokio::time::timeout(Duration::from_secs(5), messages.recv())
            .await
            .expect("a notification within 5 s")
        {
            Ok(message) => message,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(closed) => panic!("subscription closed: {closed}"),
        };
        let text: String = message.value.convert().expect("text payload");
        let change: serde_json::Value = serde_json::from_str(&text).expect("json payload");
        if change["merchant"] == key.merchant.as_str() {
            assert_eq!(change["cell"], key.pool(PARTITIONS).id.as_str());
            assert_eq!(change["partition"], key.partition(PARTITIONS));
            versions.push(change["version"].as_u64().expect("version"));
        }
    }
    assert_eq!(versions, [1, 2], "one notification per change, in order");
}

#[tokio::test]
async fn redis_gone_fails_closed_and_recovery_needs_no_restart() {
    testkit::stack();
    let port = testkit::free_port();
    let redis = testkit::private_redis(port, None);
    let url = format!("redis://127.0.0.1:{port}");
    let allocator = Allocator::connect(&url, settings(), 1)
        .await
        .expect("connect");
    let key = StockKey::new("m-outage", "sku", "dc1");
    allocator.adjust(&restock(&key, 5)).await.expect("restock");
    allocator
        .reserve(&reserve(&key, 1, "before"))
        .await
        .expect("reserve");

    drop(redis);
    let started = Instant::now();
    let refused = allocator.reserve(&reserve(&key, 1, "during")).await;
    assert!(
        matches!(refused, Err(AllocatorError::StoreUnavailable(_))),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "fails within its timeout"
    );
    assert!(matches!(
        allocator.ping().await,
        Err(AllocatorError::StoreUnavailable(_))
    ));

    // A new, empty Redis on the same port: no data and no scripts loaded.
    let redis = testkit::private_redis(port, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match allocator.adjust(&restock(&key, 2)).await {
            Ok(_) => break,
            Err(AllocatorError::StoreUnavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("after recovery: {other}"),
        }
    }
    let hold = allocator
        .reserve(&reserve(&key, 1, "after"))
        .await
        .expect("reserve after recovery, scripts reloaded on NOSCRIPT");
    assert_eq!(hold.reservation.qty, 1);
    drop(redis);
}
