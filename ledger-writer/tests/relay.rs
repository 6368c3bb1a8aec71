//! Nothing lost from the ledger: mixed stock operations run while the writer
//! is killed with SIGKILL twice and restarted; afterwards PostgreSQL holds
//! exactly one row per entry written, Kafka carries every entry id (a
//! duplicate after a crash has the same id), the streams are trimmed, and
//! the snapshot agrees with Redis.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allocator::{Adjustment, AdjustmentKind, ReserveRequest, StockKey};
use common::*;
use fred::prelude::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_doubled_when_the_writer_is_killed_twice() {
    let (_redis, setup, allocator) = harness(&[]).await;

    let mut writer = start_writer(&setup);
    // 4 workers x 900 rounds x (adjust, reserve, commit or release).
    let ops = tokio::spawn(operations(Arc::clone(&allocator), 900, "a"));
    for pause_ms in [1500, 2500] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        let _ = writer.0.kill(); // SIGKILL, mid-batch as likely as not
        let _ = writer.0.wait();
        writer = start_writer(&setup);
    }
    let written = ops.await.expect("operations");
    assert!(written >= 10_000, "10,000 mixed operations: {written}");

    let client = postgres(&setup).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows: i64 = client
            .query_opt("SELECT count(*) FROM ledger", &[])
            .await
            .ok()
            .flatten()
            .map(|row| row.get(0))
            .unwrap_or(0);
        if rows as u64 >= written || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        rows as u64, written,
        "one row per entry written, no duplicate"
    );
    assert_no_failed_passes(&setup);

    // Kafka has every entry id (duplicates, if any, carry the same id).
    let pg_ids: HashSet<String> = client
        .query("SELECT entry_id FROM ledger", &[])
        .await
        .expect("ids")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let topic = setup.topic.clone();
    let expected = pg_ids.len();
    let kafka_ids = tokio::task::spawn_blocking(move || kafka_entry_ids(&topic, expected))
        .await
        .expect("kafka reader");
    assert_eq!(kafka_ids, pg_ids, "every entry is in kafka");

    // The books balance from PostgreSQL alone, and the snapshot is Redis.
    let balance = client
        .query_one(
            "SELECT COALESCE(SUM(qty) FILTER (WHERE op = 'adjust'), 0)::bigint
                  - COALESCE(SUM(qty) FILTER (WHERE op = 'commit'), 0)::bigint,
                    (SELECT COALESCE(SUM(on_hand), 0)::bigint FROM stock_snapshot)
             FROM ledger",
            &[],
        )
        .await
        .expect("balance");
    assert_eq!(
        balance.get::<_, i64>(0),
        balance.get::<_, i64>(1),
        "adjusted - committed = on hand"
    );
    for row in client
        .query("SELECT cell, on_hand, reserved FROM stock_snapshot", &[])
        .await
        .expect("snapshot")
    {
        let cell: String = row.get(0);
        let parts: Vec<&str> = cell.split('|').collect();
        let key = StockKey::new(parts[0], parts[1], parts[2]);
        let live = allocator
            .cell(&key.pool(PARTITIONS))
            .await
            .expect("read")
            .expect("cell");
        assert_eq!(
            (live.on_hand, live.reserved),
            (row.get::<_, i64>(1), row.get::<_, i64>(2)),
            "{cell}"
        );
    }
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_passes_on_balanced_books_and_names_an_injected_drift() {
    let (_redis, setup, allocator) = harness(&[]).await;

    // Part of the ledger relayed to PostgreSQL, part still in the outbox.
    let mut writer = start_writer(&setup);
    operations(Arc::clone(&allocator), 20, "a").await;
    // One key goes out of stock and comes back: one closed stockout episode.
    let scarce = StockKey::new("m-ledger", "scarce", "dc1");
    let restock = Adjustment {
        merchant: scarce.merchant.clone(),
        sku: scarce.sku.clone(),
        location: scarce.location.clone(),
        kind: AdjustmentKind::Delta,
        qty: 2,
        source: "test".to_owned(),
        event_id: "scarce-1".to_owned(),
        source_seq: None,
    };
    allocator.adjust(&restock).await.expect("restock");
    let all = ReserveRequest {
        key: scarce.clone(),
        qty: 2,
        ttl: None,
        idempotency_key: "scarce-all".to_owned(),
        customer_ref: None,
    };
    let hold = allocator.reserve(&all).await.expect("hold all");
    allocator
        .release(None, &hold.reservation.reservation_id, "scarce-back")
        .await
        .expect("release");
    // Kill the writer once it has relayed the scarce key's three entries
    // (start-up takes longer on a loaded machine than any fixed pause).
    let client = postgres(&setup).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let relayed: i64 = client
            .query_opt("SELECT count(*) FROM ledger WHERE sku = 'scarce'", &[])
            .await
            .ok()
            .flatten()
            .map(|row| row.get(0))
            .unwrap_or(0);
        if relayed >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writer did not relay the scarce key in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = writer.0.kill();
    let _ = writer.0.wait();
    operations(Arc::clone(&allocator), 5, "b").await;

    let (balanced, printed) = audit(&setup);
    assert!(balanced, "{printed}");
    assert!(printed.contains("the books balance"), "{printed}");
    assert!(printed.contains("distinct entry ids in kafka"), "{printed}");
    assert!(
        !printed.contains(" 0 not yet relayed"),
        "some entries were left in the outbox: {printed}"
    );

    // The analytics views agree with the ledger.
    let client = postgres(&setup).await;
    let stockouts = client
        .query(
            "SELECT ended_at IS NOT NULL FROM stockouts WHERE sku = 'scarce'",
            &[],
        )
        .await
        .expect("stockouts view");
    assert_eq!(stockouts.len(), 1, "one stockout episode");
    assert!(stockouts[0].get::<_, bool>(0), "and it ended");
    let sold = client
        .query_one(
            "SELECT (SELECT COALESCE(SUM(sold), 0)::bigint FROM stock_movements_daily),
                    (SELECT COALESCE(SUM(qty), 0)::bigint FROM ledger WHERE op = 'commit')",
            &[],
        )
        .await
        .expect("movements view");
    assert_eq!(sold.get::<_, i64>(0), sold.get::<_, i64>(1));
    client
        .query("SELECT * FROM flash_sale_postmortem", &[])
        .await
        .expect("postmortem view");

    // Someone writes Redis behind the ledger's back.
    let key = StockKey::new("m-ledger", "sku-3", "dc1");
    let cell = key.pool(PARTITIONS);
    let mut live = allocator.cell(&cell).await.expect("read").expect("cell");
    live.on_hand += 5;
    let _: i64 = common::raw_redis(&setup.redis_url)
        .await
        .hset(
            allocator::keys::cells_hash(cell.partition),
            (
                cell.id.as_str(),
                serde_json::to_string(&live).expect("json"),
            ),
        )
        .await
        .expect("tamper");
    let (balanced, printed) = audit(&setup);
    assert!(!balanced, "the drift fails the audit: {printed}");
    assert!(
        printed.contains(&format!("drift: {}", cell.id)),
        "{printed}"
    );
    assert!(
        printed.contains("audit: 1 drifts"),
        "only the tampered cell: {printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_events_are_applied_once_in_order_and_malformed_ones_are_dead_lettered() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let (_redis, setup, allocator) = harness(&[]).await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &testkit::stack().kafka_brokers)
        .create()
        .expect("producer");
    let sale = r#"{"merchant":"m-pos","sku":"tee","location":"store-1","kind":"delta","qty":10,"source":"pos-1","event_id":"sale-1"}"#;
    let count = |qty: u32, seq: u32| {
        format!(
            r#"{{"merchant":"m-pos","sku":"mug","location":"store-1","kind":"absolute","qty":{qty},"source":"wms-1","event_id":"count-{seq}","source_seq":{seq}}}"#
        )
    };
    let messages = [
        (sale.to_owned(), "tee"),
        (sale.to_owned(), "tee"),
        (count(30, 3), "mug"),
        (count(5, 1), "mug"),
        (count(9, 2), "mug"),
        ("{this is not json".to_owned(), "junk"),
        (
            r#"{"merchant":"m-pos","sku":"tee","location":"store-1","kind":"teleport","qty":1,"source":"pos-1","event_id":"x"}"#.to_owned(),
            "tee",
        ),
        (
            r#"{"merchant":"m pos","sku":"tee","location":"store-1","kind":"delta","qty":1,"source":"pos-1","event_id":"y"}"#.to_owned(),
            "tee",
        ),
    ];
    for (payload, key) in &messages {
        producer
            .send(
                FutureRecord::to(&setup.events_topic)
                    .key(*key)
                    .payload(payload.as_str()),
                Duration::from_secs(5),
            )
            .await
            .expect("produce event");
    }

    let _writer = start_writer(&setup);
    let tee = StockKey::new("m-pos", "tee", "store-1");
    let mug = StockKey::new("m-pos", "mug", "store-1");
    let on_hand = |key: StockKey| {
        let allocator = &allocator;
        async move {
            allocator
                .cell(&key.pool(PARTITIONS))
                .await
                .expect("read")
                .map(|cell| cell.on_hand)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while on_hand(tee.clone()).await.is_none() || on_hand(mug.clone()).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "events not applied; writer log:\n{}",
            std::fs::read_to_string(setup._directory.path().join("writer.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give a late duplicate or a stale count the time to do harm, if it could.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        on_hand(tee.clone()).await,
        Some(10),
        "the duplicate sale event applied once"
    );
    assert_eq!(
        on_hand(mug.clone()).await,
        Some(30),
        "late counts 1 and 2 did not undo count 3"
    );

    let dlq = setup.dlq_topic.clone();
    let letters = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &testkit::stack().kafka_brokers)
            .set("group.id", testkit::unique_id("dlq-reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[dlq.as_str()]).expect("subscribe");
        let mut letters = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while letters.len() < 3 && Instant::now() < deadline {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(300)) {
                let letter: serde_json::Value =
                    serde_json::from_slice(message.payload().unwrap_or_default())
                        .expect("letter json");
                letters.push(letter);
            }
        }
        letters
    })
    .await
    .expect("dlq reader");
    assert_eq!(letters.len(), 3, "{letters:?}");
    let reasons: Vec<&str> = letters
        .iter()
        .map(|letter| letter["reason"].as_str().unwrap_or_default())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|reason| reason.contains("malformed JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|reason| reason.contains("kind must be delta or absolute")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|reason| reason.contains("merchant")),
        "{reasons:?}"
    );
    assert!(
        letters
            .iter()
            .all(|letter| letter["topic"] == setup.events_topic.as_str())
    );
    assert_no_failed_passes(&setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_split_the_partitions_and_the_survivor_takes_over_within_the_lease_time() {
    const LEASE_MS: u64 = 2000;
    let (_redis, setup, allocator) = harness(&[(
        "partition_lease_ttl_ms = 5000",
        &format!("partition_lease_ttl_ms = {LEASE_MS}"),
    )])
    .await;
    let (port_1, port_2) = (testkit::free_port(), testkit::free_port());
    let _writer_1 = start_writer_as(&setup, "writer-1", port_1);
    let mut writer_2 = start_writer_as(&setup, "writer-2", port_2);

    // Every partition ends up held by the writer rendezvous hashing names
    // (a moment after writer 2 joins, writer 1 still holds some of its share).
    let writers = ["writer-1".to_owned(), "writer-2".to_owned()];
    let expected: Vec<Option<String>> = (0..PARTITIONS)
        .map(|partition| ledger_writer::lease::owner_of(partition, &writers).map(str::to_owned))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let holders = lease_holders(&setup).await;
        if holders == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leases not split as expected: {holders:?}\n{}",
            writer_logs(&setup)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let split = (
        expected
            .iter()
            .filter(|owner| owner.as_deref() == Some("writer-1"))
            .count(),
        expected
            .iter()
            .filter(|owner| owner.as_deref() == Some("writer-2"))
            .count(),
    );
    assert!(
        split.0 >= 16 && split.1 >= 16,
        "an even enough split: {split:?}"
    );
    let held_1 = metric(port_1, "invgw_writer_leases_held").await;
    let held_2 = metric(port_2, "invgw_writer_leases_held").await;
    assert_eq!(
        held_1.unwrap_or_default() + held_2.unwrap_or_default(),
        f64::from(PARTITIONS),
        "each writer's metrics say what it holds"
    );

    // Both relay; together nothing is lost or doubled.
    let mut written = operations(Arc::clone(&allocator), 30, "a").await;
    let rows = wait_for_rows(&setup, written, Duration::from_secs(60)).await;
    assert_eq!(rows as u64, written, "one row per entry");
    let relayed_1 = metric(port_1, "invgw_writer_relayed_entries_total")
        .await
        .unwrap_or_default();
    let relayed_2 = metric(port_2, "invgw_writer_relayed_entries_total")
        .await
        .unwrap_or_default();
    assert!(
        relayed_1 > 0.0 && relayed_2 > 0.0,
        "both relayed: {relayed_1} and {relayed_2}"
    );

    // Writer 2 dies; writer 1 takes every partition within the lease time
    // (plus one renewal tick and this loop's polling).
    let _ = writer_2.0.kill();
    let _ = writer_2.0.wait();
    let killed = Instant::now();
    loop {
        let holders = lease_holders(&setup).await;
        if holders
            .iter()
            .all(|holder| holder.as_deref() == Some("writer-1"))
        {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_millis(3 * LEASE_MS),
            "no takeover within the lease time: {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "takeover after {} ms (lease {LEASE_MS} ms)",
        killed.elapsed().as_millis()
    );

    // The dead writer's lease cannot read or acknowledge any more.
    let stale = format!("writer-2 {}", u64::MAX);
    let reply = allocator
        .outbox_read(0, &stale, 10)
        .await
        .expect("relay_read");
    assert_eq!(reply, allocator::outbox::OutboxRead::Fenced);

    written += operations(Arc::clone(&allocator), 30, "b").await;
    let rows = wait_for_rows(&setup, written, Duration::from_secs(60)).await;
    assert_eq!(rows as u64, written, "the survivor relays everything");
    let (balanced, printed) = audit(&setup);
    assert!(balanced, "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_repairs_a_wiped_key_and_refuses_one_taking_writes() {
    let (_redis, setup, allocator) = harness(&[]).await;
    let _writer = start_writer(&setup);

    let key = StockKey::new("m-rebuild", "lamp", "dc1");
    let adjustment = Adjustment {
        merchant: key.merchant.clone(),
        sku: key.sku.clone(),
        location: key.location.clone(),
        kind: AdjustmentKind::Delta,
        qty: 10,
        source: "test".to_owned(),
        event_id: "lamp-1".to_owned(),
        source_seq: None,
    };
    allocator.adjust(&adjustment).await.expect("stock");
    allocator
        .settings_of(
            &key,
            allocator::StockSettings {
                safety_stock: 1,
                backorder_limit: 0,
                low_stock_threshold: Some(2),
                reorder_point: None,
                reorder_qty: 0,
            },
        )
        .await
        .expect("settings");
    let reserve = |qty: u32, name: &str| ReserveRequest {
        key: key.clone(),
        qty,
        ttl: None,
        idempotency_key: name.to_owned(),
        customer_ref: None,
    };
    let kept = allocator.reserve(&reserve(2, "kept")).await.expect("hold");
    let sold = allocator.reserve(&reserve(3, "sold")).await.expect("hold");
    allocator
        .commit(None, &sold.reservation.reservation_id, "sold-commit")
        .await
        .expect("commit");
    let lost = allocator.reserve(&reserve(1, "lost")).await.expect("hold");

    let rebuild = |extra: &[&str]| {
        let output = writer_command(&setup, "rebuild")
            .args(["--key", "m-rebuild/lamp/dc1"])
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("run rebuild");
        (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    };
    // Just written to: refused, and nothing changes.
    let (ok, printed) = rebuild(&["--quiet-seconds", "60"]);
    assert!(!ok, "{printed}");
    assert!(printed.contains("refused: m-rebuild/lamp/dc1"), "{printed}");
    assert!(printed.contains("--force"), "{printed}");

    // Redis loses the cell and one hold's record.
    let pool = key.pool(PARTITIONS);
    let redis = common::raw_redis(&setup.redis_url).await;
    let _: i64 = redis
        .hdel(
            allocator::keys::cells_hash(pool.partition),
            pool.id.as_str(),
        )
        .await
        .expect("wipe cell");
    let _: i64 = redis
        .hdel(
            allocator::keys::partition_keys(pool.partition)[1].clone(),
            lost.reservation.reservation_id.as_str(),
        )
        .await
        .expect("wipe hold");
    let (balanced, printed) = audit(&setup);
    assert!(!balanced, "{printed}");
    assert!(printed.contains("missing in redis"), "{printed}");

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (ok, printed) = rebuild(&["--quiet-seconds", "1"]);
    assert!(ok, "{printed}");
    assert!(
        printed.contains("1 cells of 1 stock keys rebuilt; 1 lost holds released (1 units)"),
        "{printed}"
    );
    let cell = allocator.cell(&pool).await.expect("read").expect("cell");
    assert_eq!((cell.on_hand, cell.reserved), (7, 2), "{cell:?}");
    assert_eq!(
        (cell.safety_stock, cell.low_stock_threshold),
        (1, 2),
        "settings come back too"
    );
    let (balanced, printed) = audit(&setup);
    assert!(balanced, "{printed}");

    // The kept hold is still a hold: it commits.
    allocator
        .commit(None, &kept.reservation.reservation_id, "kept-commit")
        .await
        .expect("commit after rebuild");
    let cell = allocator.cell(&pool).await.expect("read").expect("cell");
    assert_eq!((cell.on_hand, cell.reserved), (5, 0));
    let (balanced, printed) = audit(&setup);
    assert!(balanced, "{printed}");
}

/// A Redis that lost its lease counters (replaced, or restored from an old
/// copy) hands out tokens PostgreSQL has already seen, so every batch
/// would be refused as fenced for ever and nothing relayed (seen here: a
/// cluster deployment sharing the database of a single-Redis one). The
/// writer that still holds the lease advances its token past the fence and
/// relays everything, with the fence as strict as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_token_behind_postgresqls_fence_is_advanced_and_nothing_is_lost() {
    let (_redis, setup, allocator) = harness(&[]).await;
    let status = writer_command(&setup, "migrate")
        .status()
        .expect("run migrate");
    assert!(status.success(), "migrate");
    let client = postgres(&setup).await;
    // What an earlier Redis's writers left an hour ago: tokens far past this
    // one's. Partition 0's fence is written "now" and keeps being written by
    // another store sharing the database (a misconfiguration): its writer
    // must stay fenced rather than take turns with the other store.
    client
        .execute(
            "INSERT INTO relay_fence (partition, token, owner, updated_at)
             SELECT p, 1000, 'writer-of-an-older-redis', now() - interval '1 hour'
             FROM generate_series(1, $1 - 1) AS p",
            &[&(PARTITIONS as i32)],
        )
        .await
        .expect("fence rows");
    client
        .execute(
            "INSERT INTO relay_fence (partition, token, owner, updated_at)
             VALUES (0, 1000, 'writer-of-another-live-redis', now() + interval '1 hour')",
            &[],
        )
        .await
        .expect("a live fence");

    let written = operations(Arc::clone(&allocator), 50, "behind").await;
    let redis = raw_redis(&setup.redis_url).await;
    let stuck: u64 = redis
        .xlen(allocator::keys::ledger_stream(0))
        .await
        .expect("partition 0's entries");
    assert!(stuck > 0, "partition 0 has entries to hold back");
    let writer = start_writer(&setup);
    let rows = wait_for_rows(&setup, written - stuck, Duration::from_secs(60)).await;
    assert_eq!(
        rows as u64,
        written - stuck,
        "every entry relayed but partition 0's: {}",
        writer_logs(&setup)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        ledger_rows(&setup).await as u64,
        written - stuck,
        "partition 0 stays fenced while its fence is written"
    );
    let fence_zero: (i64, String) = client
        .query_one(
            "SELECT token, owner FROM relay_fence WHERE partition = 0",
            &[],
        )
        .await
        .map(|row| (row.get(0), row.get(1)))
        .expect("fence 0");
    assert_eq!(
        fence_zero,
        (1000, "writer-of-another-live-redis".to_owned())
    );
    let fences: Vec<(i32, i64, String)> = client
        .query(
            "SELECT partition, token, owner FROM relay_fence ORDER BY partition",
            &[],
        )
        .await
        .expect("fences")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    for (partition, token, owner) in &fences {
        if owner == "writer-1" {
            assert!(
                *token > 1000,
                "partition {partition}: token {token} past the old fence"
            );
        }
    }
    assert!(
        fences.iter().any(|(_, _, owner)| owner == "writer-1"),
        "the writer wrote: {fences:?}"
    );
    drop(writer);
}

/// The order a consumer of the Kafka ledger may rely on: per cell. A flash
/// sale's key has cells in several ledger partitions (pool and buckets), so
/// its entries are on several Kafka partitions; each message is keyed by
/// its cell, all of a cell's messages are on one Kafka partition, and their
/// first copies arrive in the cell's version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_keys_entries_are_in_version_order_per_cell_each_cell_on_one_kafka_partition() {
    let (_redis, setup, allocator) = harness(&[]).await;
    let nodes: Vec<String> = vec!["node-a".into(), "node-b".into()];
    let merchant = testkit::unique_id("m");
    // A key whose pool and buckets map onto different Kafka partitions, so
    // the key's messages are on several.
    let mut sale = (0..)
        .map(|n| allocator::FlashSale {
            name: format!("sale-{n}"),
            key: StockKey::new(&merchant, format!("hot-{n}"), "dc1"),
            nodes: nodes.clone(),
            presplit_fraction: 0.5,
            refill_chunk_units_min: 3,
            refill_chunk_units_max: 3,
            buckets: Default::default(),
        })
        .find(|sale| {
            let kafka = |partition: u32| partition as i32 % TOPIC_PARTITIONS;
            let pool = kafka(sale.key.partition(PARTITIONS));
            nodes
                .iter()
                .any(|node| kafka(sale.bucket(node, PARTITIONS).partition) != pool)
        })
        .expect("such a key");
    let restock = Adjustment {
        merchant: merchant.clone(),
        sku: sale.key.sku.clone(),
        location: "dc1".to_owned(),
        kind: AdjustmentKind::Delta,
        qty: 60,
        source: "test".to_owned(),
        event_id: testkit::unique_id("restock"),
        source_seq: None,
    };
    allocator.adjust(&restock).await.expect("restock");
    allocator.place(&mut sale).await.expect("place");
    allocator.activate(&sale, "e1").await.expect("activate");
    for round in 0..4 {
        for node in &nodes {
            allocator
                .refill(&sale, node, 3.0)
                .await
                .unwrap_or_else(|error| panic!("refill {round}: {error}"));
        }
        allocator.reclaim(&sale, "node-b").await.expect("reclaim");
    }
    let mut count = restock.clone();
    count.kind = AdjustmentKind::Absolute;
    count.qty = 55;
    count.event_id = testkit::unique_id("count");
    count.source_seq = Some(1);
    allocator
        .adjust(&count)
        .await
        .expect("a count drains the buckets");

    let writer = start_writer(&setup);
    let deadline = Instant::now() + Duration::from_secs(60);
    // No lag is not enough: a writer counts the lag of the partitions it
    // holds, none before its first leases (a cluster run once read 0 rows
    // here). It must hold every partition, with nothing left.
    while metric(setup.metrics_port, "invgw_writer_leases_held").await
        != Some(f64::from(PARTITIONS))
        || metric(
            setup.metrics_port,
            "invgw_writer_lag_all_partitions_entries",
        )
        .await
            != Some(0.0)
    {
        assert!(
            Instant::now() < deadline,
            "relayed: {}",
            writer_logs(&setup)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = ledger_rows(&setup).await as usize;
    let topic = setup.topic.clone();
    let messages = tokio::task::spawn_blocking(move || kafka_messages(&topic, rows))
        .await
        .expect("kafka reader");
    let ours: Vec<&KafkaMessage> = messages
        .iter()
        .filter(|message| message.payload["merchant"] == merchant.as_str())
        .collect();
    assert!(ours.len() > 20, "the sale's entries: {}", ours.len());
    // cell -> (its kafka partition, (offset, version) of each first copy)
    type Seen = (i32, Vec<(i64, u64)>);
    let mut cells: std::collections::BTreeMap<&str, Seen> = Default::default();
    let mut seen = HashSet::new();
    for message in &ours {
        let cell = message.payload["cell"].as_str().expect("cell");
        assert_eq!(
            message.key, cell,
            "keyed by its cell: {:?}",
            message.payload
        );
        let entry_id = message.payload["entry_id"].as_str().expect("entry_id");
        if !seen.insert(entry_id) {
            continue; // a redelivered copy
        }
        let (partition, versions) = cells
            .entry(cell)
            .or_insert_with(|| (message.partition, Vec::new()));
        assert_eq!(
            *partition, message.partition,
            "{cell} on one kafka partition"
        );
        versions.push((
            message.offset,
            message.payload["version"].as_u64().expect("version"),
        ));
    }
    let partitions: HashSet<i32> = cells.values().map(|(partition, _)| *partition).collect();
    assert!(
        partitions.len() > 1,
        "the key spans kafka partitions: {cells:?}"
    );
    assert!(cells.len() >= 3, "pool and both buckets: {cells:?}");
    for (cell, (_, versions)) in &cells {
        let mut by_offset = versions.clone();
        by_offset.sort_unstable();
        assert!(
            by_offset.windows(2).all(|pair| pair[0].1 < pair[1].1),
            "{cell}: versions in offset order: {by_offset:?}"
        );
    }
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_have_every_series_the_alerts_use() {
    let (_redis, setup, allocator) = harness(&[]).await;
    let _writer = start_writer(&setup);
    // Entries relayed, so the batch histograms and lag series have values.
    let written = operations(Arc::clone(&allocator), 10, "metrics").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(setup.metrics_port, "invgw_writer_relayed_entries_total")
        .await
        .unwrap_or_default()
        < written as f64
    {
        assert!(
            Instant::now() < deadline,
            "the writer relays {written} entries"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", setup.metrics_port))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    testkit::assert_metrics_serve_the_alerts(
        &metrics,
        "invgw_writer_",
        None,
        &[
            "invgw_writer_lag_oldest_seconds",
            "invgw_writer_lag_all_partitions_entries",
            "invgw_writer_batch_seconds_bucket",
        ],
    );
    // Freshness: every relayed entry counted once per sink, in seconds (a
    // mistake of unit or of clock would put it past the last finite bucket).
    // A batch in flight is observed before it is counted relayed: scrape
    // until one scrape shows none in flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", setup.metrics_port))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let value = |prefix: &str, parts: &[&str]| -> Option<f64> {
            metrics
                .lines()
                .find(|line| {
                    line.starts_with(prefix) && parts.iter().all(|part| line.contains(part))
                })
                .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        };
        let relayed = value("invgw_writer_relayed_entries_total", &[]);
        let mut checks = Vec::new();
        for sink in ["kafka", "postgresql"] {
            let sink_label = format!("sink=\"{sink}\"");
            let count = value("invgw_writer_entry_visible_seconds_count{", &[&sink_label]);
            let within = value(
                "invgw_writer_entry_visible_seconds_bucket{",
                &[&sink_label, "le=\"600\""],
            );
            let sum = value("invgw_writer_entry_visible_seconds_sum{", &[&sink_label]);
            checks.push((sink, count, within, sum));
        }
        // Within 600 s each, and on average (a clock read the wrong way
        // round would put them decades away).
        let consistent = checks.iter().all(|(_, count, within, sum)| {
            *count == relayed
                && within == count
                && sum
                    .zip(*count)
                    .is_some_and(|(sum, count)| sum <= 600.0 * count)
        });
        if consistent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "one observation per relayed entry and sink, each within 600 s: relayed {relayed:?}, (sink, count, within 600 s, sum) {checks:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The reconciliation view explains every unit of every key and day from
/// the ledger alone (and shows the units a lost entry leaves unexplained);
/// the funnel follows every reservation to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_and_funnel_views_account_for_every_unit() {
    let (_redis, setup, allocator) = harness(&[]).await;
    let _writer = start_writer(&setup);
    operations(Arc::clone(&allocator), 10, "views").await;
    let key = StockKey::new("m-views", "counted", "dc1");
    let hold = |qty: u32, idempotency_key: &str| ReserveRequest {
        key: key.clone(),
        qty,
        ttl: None,
        idempotency_key: idempotency_key.to_owned(),
        customer_ref: None,
    };
    restock(&allocator, &key, 5).await;
    let sold = allocator
        .reserve(&hold(2, "views-sold"))
        .await
        .expect("hold");
    allocator
        .commit(None, &sold.reservation.reservation_id, "views-commit")
        .await
        .expect("commit");
    let back = allocator
        .reserve(&hold(1, "views-back"))
        .await
        .expect("hold");
    allocator
        .release(None, &back.reservation.reservation_id, "views-release")
        .await
        .expect("release");
    restock(&allocator, &key, -1).await;
    restock(&allocator, &key, 3).await;

    let client = postgres(&setup).await;
    // Relayed: the key's 7 entries, and the outbox empty.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let relayed: i64 = client
            .query_one("SELECT count(*) FROM ledger WHERE sku = 'counted'", &[])
            .await
            .expect("count")
            .get(0);
        let lag = metric(
            setup.metrics_port,
            "invgw_writer_lag_all_partitions_entries",
        )
        .await;
        if relayed == 7 && lag == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relayed {relayed} of 7, lag {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // opening, received, removed, sold, closing, unexplained
    assert_eq!(key_figures(&client).await, vec![0, 8, 1, 2, 5, 0]);
    let unexplained: i64 = client
        .query_one(
            "SELECT count(*) FROM stock_reconciliation_daily WHERE unexplained <> 0",
            &[],
        )
        .await
        .expect("reconciliation view")
        .get(0);
    assert_eq!(unexplained, 0, "every key and day explained by its flows");

    let funnel = client
        .query_one(
            "SELECT SUM(held)::bigint, SUM(units_held)::bigint, SUM(committed)::bigint,
                    SUM(released)::bigint, SUM(expired)::bigint, SUM(still_held)::bigint
             FROM reservation_funnel_hourly WHERE merchant = 'm-views' AND sku = 'counted'",
            &[],
        )
        .await
        .expect("funnel view");
    let funnel: Vec<i64> = (0..6).map(|column| funnel.get::<_, i64>(column)).collect();
    assert_eq!(funnel, vec![2, 3, 1, 1, 0, 0]);
    let uneven: i64 = client
        .query_one(
            "SELECT count(*) FROM reservation_funnel_hourly
             WHERE held <> committed + released + expired + still_held",
            &[],
        )
        .await
        .expect("funnel view")
        .get(0);
    assert_eq!(uneven, 0, "every reservation ends once at most");

    // A lost entry (the commit) leaves its units unexplained.
    client
        .execute(
            "DELETE FROM ledger WHERE merchant = 'm-views' AND sku = 'counted' AND op = 'commit'",
            &[],
        )
        .await
        .expect("delete");
    assert_eq!(key_figures(&client).await, vec![0, 8, 1, 0, 5, -2]);
}

/// opening, received, removed, sold, closing and unexplained units of the
/// test's key over every day it has.
async fn key_figures(client: &tokio_postgres::Client) -> Vec<i64> {
    let row = client
        .query_one(
            "SELECT (array_agg(opening_on_hand ORDER BY day))[1], SUM(received)::bigint,
                    SUM(removed)::bigint, SUM(sold)::bigint,
                    (array_agg(closing_on_hand ORDER BY day DESC))[1], SUM(unexplained)::bigint
             FROM stock_reconciliation_daily WHERE merchant = 'm-views' AND sku = 'counted'",
            &[],
        )
        .await
        .expect("reconciliation view");
    (0..6).map(|column| row.get::<_, i64>(column)).collect()
}
