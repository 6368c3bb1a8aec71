//! The defects the audit once called balanced, replayed into a fresh system
//! as the old scripts wrote them: `ledger-writer audit` exits 1 naming each
//! key and what is wrong with it.

mod common;

use std::time::Duration;

use allocator::{AdjustmentKind, FlashSale, LedgerEntry, LedgerOp, StockKey};
use fred::prelude::*;

/// Appends `entry` to its partition's outbox, as a script would.
async fn append(redis: &fred::clients::Client, entry: &LedgerEntry) {
    let _: String = redis
        .xadd(
            allocator::keys::ledger_stream(entry.partition),
            false,
            None,
            "*",
            ("e", serde_json::to_string(entry).expect("json")),
        )
        .await
        .expect("xadd");
}

async fn last_entry(
    allocator: &allocator::Allocator,
    key: &StockKey,
    op: LedgerOp,
    bucket: bool,
) -> LedgerEntry {
    let mut found = None;
    for partition in 0..common::PARTITIONS {
        for entry in allocator
            .ledger_entries(partition, 0)
            .await
            .expect("ledger")
        {
            if entry.key() == *key && entry.op == op && entry.in_bucket() == bucket {
                found = Some(entry);
            }
        }
    }
    found.expect("an entry of that op")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_defects_make_the_audit_fail_naming_each_key() {
    let (_redis, setup, allocator) = common::harness(&[]).await;
    let redis = common::raw_redis(&setup.redis_url).await;
    let sale_of = |sku: &str| FlashSale {
        name: testkit::unique_id("sale"),
        key: StockKey::new("m-audit", sku, "dc1"),
        nodes: vec!["node-a".to_owned(), "node-b".to_owned()],
        presplit_fraction: 0.5,
        refill_chunk_units_min: 1,
        refill_chunk_units_max: 10,
        buckets: Default::default(),
    };
    let (counted, recredited, sold_short) =
        (sale_of("counted"), sale_of("recredited"), sale_of("short"));
    for sale in [&counted, &recredited, &sold_short] {
        common::restock(&allocator, &sale.key, 100).await;
        allocator.activate(sale, "e1").await.expect("activate");
    }
    let (balanced, printed) = common::audit(&setup);
    assert!(balanced, "the honest history balances: {printed}");

    // A count that set the pool to the count, blind to the buckets' 50.
    let adjust = last_entry(&allocator, &counted.key, LedgerOp::Adjust, false).await;
    let pool = last_entry(&allocator, &counted.key, LedgerOp::TransferOut, false).await;
    let mut count = adjust.clone();
    count.kind = Some(AdjustmentKind::Absolute);
    count.source_seq = Some(1);
    count.source_event_id = Some("blind-count".to_owned());
    count.on_hand_before = pool.on_hand_after;
    count.reserved_before = pool.reserved_after;
    count.on_hand_after = 100;
    count.qty = 100 - pool.on_hand_after;
    count.counted = None;
    count.buckets_on_hand = None;
    // After the buckets' credits too (a loaded machine takes a few ms
    // between debit and credit): the count must see what they hold.
    let mut latest = pool.at_ms;
    for partition in 0..common::PARTITIONS {
        for entry in allocator
            .ledger_entries(partition, 0)
            .await
            .expect("ledger")
        {
            if entry.key() == counted.key {
                latest = latest.max(entry.at_ms);
            }
        }
    }
    count.at_ms = latest + 1;
    count.entry_id = None;
    count.stream_id = None;
    append(&redis, &count).await;

    // A restart that credited a bucket's share again.
    let mut again = last_entry(&allocator, &recredited.key, LedgerOp::TransferIn, true).await;
    again.on_hand_before = again.on_hand_after;
    again.on_hand_after += again.qty;
    again.at_ms += 1;
    again.entry_id = None;
    again.stream_id = None;
    append(&redis, &again).await;

    // A loss of every unit, and a bucket that went on selling.
    let pool = last_entry(&allocator, &sold_short.key, LedgerOp::TransferOut, false).await;
    let mut loss = last_entry(&allocator, &sold_short.key, LedgerOp::Adjust, false).await;
    loss.on_hand_before = pool.on_hand_after;
    loss.reserved_before = pool.reserved_after;
    loss.qty = -100;
    loss.on_hand_after = pool.on_hand_after - 100;
    loss.shortfall = Some(true);
    loss.source_event_id = Some("loss".to_owned());
    loss.at_ms = pool.at_ms + 1;
    loss.entry_id = None;
    loss.stream_id = None;
    append(&redis, &loss).await;
    let credit = last_entry(&allocator, &sold_short.key, LedgerOp::TransferIn, true).await;
    let mut sale = credit.clone();
    sale.op = LedgerOp::Reserve;
    sale.transfer_id = None;
    sale.from_cell = None;
    sale.reason = None;
    sale.on_hand_before = credit.on_hand_after;
    sale.reserved_before = credit.reserved_after;
    sale.reserved_after = credit.reserved_after + 1;
    sale.qty = 1;
    sale.reservation_id = Some("r1.phantom".to_owned());
    sale.backordered = Some(0);
    sale.at_ms = loss.at_ms + 5;
    sale.entry_id = None;
    sale.stream_id = None;
    append(&redis, &sale).await;
    tokio::time::sleep(Duration::from_millis(10)).await;

    let (balanced, printed) = common::audit(&setup);
    assert!(!balanced, "{printed}");
    for (key, problem) in [
        ("m-audit/counted/dc1", "units created"),
        ("m-audit/recredited/dc1", "one of each is allowed"),
        ("m-audit/short/dc1", "while the key was short"),
    ] {
        assert!(
            printed
                .lines()
                .any(|line| line.contains(key) && line.contains(problem)),
            "{key}: {problem} not reported:\n{printed}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_moving_while_the_audit_reads_is_read_again_not_reported() {
    let (_redis, setup, allocator) = common::harness(&[]).await;
    let redis = common::raw_redis(&setup.redis_url).await;
    let key = StockKey::new("m-moving", "tee", "dc1");
    common::restock(&allocator, &key, 10).await;
    let config = config::load_file(&setup.config_path).expect("config");
    let mut client = common::postgres(&setup).await;
    ledger_writer::migrate::migrate(&mut client)
        .await
        .expect("migrate");
    // The cell is ahead of its entries for a moment, as when the relay
    // trims an entry between the audit's two reads: a first read sees a
    // drift, a second one does not.
    let pool = key.pool(common::PARTITIONS);
    let cells = format!("inv:{{{}}}:cells", pool.partition);
    let original: String = redis.hget(&cells, &pool.id).await.expect("the cell");
    let mut ahead: serde_json::Value = serde_json::from_str(&original).expect("json");
    ahead["on_hand"] = serde_json::json!(15);
    let _: i64 = redis
        .hset(&cells, (pool.id.as_str(), ahead.to_string()))
        .await
        .expect("ahead");
    let once = ledger_writer::audit::audit(&client, &allocator, &config, Some("m-moving"))
        .await
        .expect("audit");
    assert_eq!(once.drifts.len(), 1, "{:?}", once.drifts);
    let restorer = {
        let (redis, cells, id) = (redis.clone(), cells.clone(), pool.id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let _: i64 = redis
                .hset(&cells, (id.as_str(), original))
                .await
                .expect("back");
        })
    };
    let (report, passes) =
        ledger_writer::audit::audit_settled(&client, &allocator, &config, Some("m-moving"))
            .await
            .expect("audit");
    restorer.await.expect("restorer");
    assert!(report.drifts.is_empty(), "{:?}", report.drifts);
    assert_eq!(passes, 2);
}
