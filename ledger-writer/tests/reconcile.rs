//! The reconciler never wedges: a cart that cannot be finished is counted,
//! backed off and in the end parked, while every other item and partition
//! is still reconciled.

mod common;

use std::sync::Arc;
use std::time::Duration;

use allocator::{CartLine, CartRequest, StockKey, Transfer};
use fred::prelude::*;
use ledger_writer::reconcile::{PARK_AFTER_FAILURES, Reconciler};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_cart_does_not_stop_the_reconciler_finishing_everything_else() {
    let (_redis, setup, allocator) = common::harness(&[]).await;
    let config = Arc::new(config::load_file(&setup.config_path).expect("config"));
    let merchant = testkit::unique_id("m");
    let keys = [
        StockKey::new(&merchant, "a", "dc1"),
        StockKey::new(&merchant, "b", "dc1"),
    ];
    for key in &keys {
        common::restock(&allocator, key, 10).await;
    }

    // A cart decided for commit whose first line's record is gone (corrupt):
    // finishing it fails every time.
    let cart = allocator
        .reserve_cart(&CartRequest {
            merchant: merchant.clone(),
            lines: keys
                .iter()
                .map(|key| CartLine::at(&key.sku, &key.location, 1))
                .collect(),
            ttl: None,
            idempotency_key: testkit::unique_id("cart"),
            customer_ref: None,
            allow_partial: false,
        })
        .await
        .expect("cart")
        .cart;
    allocator
        .decide_cart(None, &cart.reservation_id, true)
        .await
        .expect("decided");
    let line_partition = keys[0].partition(common::PARTITIONS);
    let redis = common::raw_redis(&setup.redis_url).await;
    // Bytes: reservation records are MessagePack; the line's names its cart
    // and its cell (the pool of key "a").
    let records: std::collections::HashMap<String, Vec<u8>> = redis
        .hgetall(format!("inv:{{{line_partition}}}:res"))
        .await
        .expect("records");
    let cell = keys[0].pool(common::PARTITIONS).id;
    let names = |record: &[u8], text: &str| {
        record
            .windows(text.len())
            .any(|window| window == text.as_bytes())
    };
    let line = records
        .iter()
        .find(|(_, record)| names(record, &cart.reservation_id) && names(record, &cell))
        .map(|(id, _)| id.clone())
        .expect("the cart's first line");
    let _: i64 = redis
        .hdel(format!("inv:{{{line_partition}}}:res"), &line)
        .await
        .expect("corrupt the line");

    // A transfer debited by a node that died before crediting it.
    let pool = keys[1].pool(common::PARTITIONS);
    let bucket = keys[1].bucket("node-x", &[], common::PARTITIONS);
    let transfer_id = testkit::unique_id("t");
    allocator
        .transfer_out(
            &Transfer {
                id: &transfer_id,
                key: &keys[1],
                from: &pool,
                to: &bucket,
                to_node: Some("node-x"),
                reason: "refill",
            },
            4,
            true,
        )
        .await
        .expect("debit");

    // The cart finisher waits a quarter of the line grace, the transfer
    // finisher transfer_finish_after_seconds: look after both.
    let wait = Reconciler::cart_finish_after(&config).max(Duration::from_secs(
        config.stock.transfer_finish_after_seconds,
    ));
    tokio::time::sleep(wait + Duration::from_millis(200)).await;

    let mut reconciler = Reconciler::new((*allocator).clone(), Arc::clone(&config), None);
    let report = reconciler
        .pass()
        .await
        .expect("the pass goes on past the cart");
    assert_eq!(report.failures, 1, "{report:?}");
    assert_eq!(
        report.transfers_finished, 1,
        "the transfer was still credited: {report:?}"
    );
    let view = allocator.stock_view(&keys[1]).await.expect("view");
    assert_eq!(view.on_hand(), 10, "{view:?}");
    assert_eq!(view.in_flight(), 0);

    // Backing off: the next pass leaves the cart alone and goes on.
    let report = reconciler.pass().await.expect("pass");
    assert_eq!(report.failures, 0, "the cart is backing off: {report:?}");
    assert_eq!(
        report.parked, 0,
        "parked only after {PARK_AFTER_FAILURES} failures"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buckets_of_a_sale_removed_from_the_config_are_taken_back() {
    let (_redis, setup, allocator) = common::harness(&[]).await;
    let config = Arc::new(config::load_file(&setup.config_path).expect("config"));
    assert!(
        config.flash_sales.is_empty(),
        "the sale is not in the config"
    );
    let sale = allocator::FlashSale {
        name: testkit::unique_id("gone"),
        key: StockKey::new(testkit::unique_id("m"), "console", "dc1"),
        nodes: vec!["node-a".to_owned(), "node-b".to_owned()],
        presplit_fraction: 0.5,
        refill_chunk_units_min: 1,
        refill_chunk_units_max: 10,
        buckets: Default::default(),
    };
    common::restock(&allocator, &sale.key, 40).await;
    allocator.activate(&sale, "e1").await.expect("activate");
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(view.buckets.iter().map(|(_, b)| b.on_hand).sum::<i64>(), 20);

    let mut reconciler = Reconciler::new((*allocator).clone(), Arc::clone(&config), None);
    let report = reconciler.pass().await.expect("pass");
    assert_eq!(report.units_reclaimed, 20, "{report:?}");
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(
        view.pool.as_ref().map(|pool| pool.on_hand),
        Some(40),
        "{view:?}"
    );
    assert!(view.buckets.iter().all(|(_, bucket)| bucket.on_hand == 0));
    reconciler.pass().await.expect("pass");
    assert!(
        !allocator
            .hot_keys()
            .await
            .expect("hot keys")
            .contains(&sale.key),
        "forgotten once its buckets are empty"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_hold_gives_its_customer_allowance_back_through_the_reconciler() {
    let (_redis, setup, allocator) = common::harness(&[]).await;
    let config = Arc::new(config::load_file(&setup.config_path).expect("config"));
    let key = StockKey::new(testkit::unique_id("m"), "limited", "dc1");
    common::restock(&allocator, &key, 10).await;
    let limit = allocator::CustomerLimit::new(
        &testkit::unique_id("sale"),
        key.clone(),
        0,
        0,
        Some(1),
        None,
    );
    let reserver = allocator::Reserver::new(
        (*allocator).clone(),
        allocator::Coalescer::new(
            allocator::Coalescing {
                wait: Duration::ZERO,
                batch_max: 8,
            },
            Arc::new(|_| {}),
        ),
    );
    reserver.set_customer_limits(vec![limit.clone()]);
    let request = |ttl: Duration| CartRequest {
        merchant: key.merchant.clone(),
        lines: vec![CartLine::at(&key.sku, &key.location, 1)],
        ttl: Some(ttl),
        idempotency_key: testkit::unique_id("order"),
        customer_ref: Some("grace".to_owned()),
        allow_partial: false,
    };
    reserver
        .reserve(&request(Duration::from_secs(1)))
        .await
        .expect("held");
    let over = reserver.reserve(&request(Duration::from_secs(60))).await;
    assert!(
        matches!(over, Err(allocator::AllocatorError::CustomerLimit { .. })),
        "{over:?}"
    );

    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let mut reconciler = Reconciler::new((*allocator).clone(), Arc::clone(&config), None);
    let first = reconciler.pass().await.expect("pass");
    assert!(first.expired >= 1, "{first:?}");
    tokio::time::sleep(allocator::NOTE_SETTLE_AFTER).await;
    let second = reconciler.pass().await.expect("pass");
    assert_eq!(
        first.allowances_settled + second.allowances_settled,
        1,
        "{first:?} {second:?}"
    );
    let allowance = allocator
        .customer_allowance(&limit, "grace")
        .await
        .expect("allowance");
    assert_eq!((allowance.units, allowance.holds), (0, 0));
    reserver
        .reserve(&request(Duration::from_secs(60)))
        .await
        .expect("the expired unit's place");
}
