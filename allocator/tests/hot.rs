//! Transfers and flash-sale buckets against the real Redis of the stack.

mod common;

use common::*;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use allocator::{Allocator, AllocatorError, FlashSale, HotKey, HotOutcomeCounts, StockKey};
use fred::prelude::*;
use serde_json::Value;

fn sale(nodes: &[&str]) -> FlashSale {
    FlashSale {
        name: testkit::unique_id("sale"),
        key: StockKey::new(testkit::unique_id("m"), "hot-sku", "dc1"),
        nodes: nodes.iter().map(|node| (*node).to_owned()).collect(),
        presplit_fraction: 0.5,
        refill_chunk_units_min: 2,
        refill_chunk_units_max: 10,
        buckets: Default::default(),
    }
}

/// Debits `qty` units of the sale's pool towards node-a's bucket and never
/// credits them (the node died in between); returns the transfer id.
async fn debit_without_credit(allocator: &Allocator, sale: &FlashSale, qty: u64) -> String {
    let pool = sale.key.pool(PARTITIONS);
    let bucket = sale.bucket("node-a", PARTITIONS);
    // Transfer ids are unique for ever (a reused id is a replay by design).
    let transfer_id = testkit::unique_id("t-debit");
    let debit = allocator
        .transfer_out(
            &allocator::Transfer {
                id: &transfer_id,
                key: &sale.key,
                from: &pool,
                to: &bucket,
                to_node: Some("node-a"),
                reason: "refill",
            },
            qty,
            true,
        )
        .await
        .expect("debit");
    assert_eq!(debit.qty, qty);
    transfer_id
}

/// The sale as a node holds it in force.
fn hot_key(sale: &FlashSale) -> HotKey {
    HotKey::new(sale.clone(), "e1".to_owned())
}

/// Ledger entries of every cell of `key` (pool and buckets), any partition.
async fn entries_of(allocator: &Allocator, key: &StockKey) -> Vec<Value> {
    let prefix = format!("{}|{}|{}|", key.merchant, key.sku, key.location);
    // Streams are not trimmed until the ledger writer runs: read the last
    // minutes only (every test here is far shorter).
    let since_ms = allocator.redis_time_ms().await.expect("time") - 120_000;
    let mut all = Vec::new();
    for partition in 0..PARTITIONS {
        for entry in allocator
            .ledger_entries(partition, since_ms)
            .await
            .expect("ledger")
        {
            if entry.cell.starts_with(&prefix) {
                all.push(serde_json::to_value(&entry).expect("json"));
            }
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_without_its_credit_is_finished_once_by_racing_finishers() {
    let allocator = allocator_for("node-a").await;
    let sale = sale(&["node-a"]);
    stock(&allocator, &sale.key, 30).await;
    let pool = sale.key.pool(PARTITIONS);
    // The node debits the pool and dies before crediting its bucket.
    let transfer_id = debit_without_credit(&allocator, &sale, 12).await;
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(view.sellable(), 18, "12 units are in flight");

    // Two reconcilers find it at the same time.
    let a = Arc::new(allocator);
    let b = Arc::new(allocator_for("reconciler-b").await);
    let (first, second) = tokio::join!(
        a.finish_transfers(pool.partition, Duration::ZERO),
        b.finish_transfers(pool.partition, Duration::ZERO)
    );
    let credited = first.expect("finisher a") + second.expect("finisher b");
    assert!(credited >= 1, "someone credited it");
    let view = a.stock_view(&sale.key).await.expect("view");
    assert_eq!(
        view.sellable(),
        30,
        "conserved: nothing lost, nothing doubled"
    );
    assert_eq!(view.buckets[0].1.on_hand, 12);

    let credits = entries_of(&a, &sale.key)
        .await
        .into_iter()
        .filter(|entry| {
            entry["op"] == "transfer_in" && entry["transfer_id"] == transfer_id.as_str()
        })
        .count();
    assert_eq!(credits, 1, "credited exactly once");
    assert_eq!(
        a.finish_transfers(pool.partition, Duration::ZERO)
            .await
            .expect("again"),
        0
    );
}

#[tokio::test]
async fn activation_splits_the_pool_once_per_epoch() {
    let allocator = allocator_for("node-a").await;
    let sale = sale(&["node-a", "node-b", "node-c"]);
    stock(&allocator, &sale.key, 91).await;

    let split = allocator.activate(&sale, "e1").await.expect("activate");
    assert_eq!(
        split,
        [
            ("node-a".to_owned(), 15),
            ("node-b".to_owned(), 15),
            ("node-c".to_owned(), 15)
        ]
    );
    let again = allocator
        .activate(&sale, "e1")
        .await
        .expect("activate again");
    assert_eq!(again, split, "the same epoch moves nothing more");
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(view.pool.as_ref().map(|pool| pool.on_hand), Some(46));
    assert_eq!(view.sellable(), 91);

    let back = allocator.reclaim(&sale, "node-b").await.expect("reclaim");
    assert_eq!(back, 15);
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(view.pool.as_ref().map(|pool| pool.on_hand), Some(61));
    assert_eq!(view.sellable(), 91);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_racers_over_three_buckets_get_exactly_fifty_with_refills_and_reclaims() {
    let nodes = ["node-a", "node-b", "node-c"];
    let sale = Arc::new(sale(&nodes));
    let mut allocators = Vec::new();
    for node in nodes {
        allocators.push(Arc::new(allocator_for(node).await));
    }
    stock(&allocators[0], &sale.key, 50).await;
    allocators[0].activate(&sale, "e1").await.expect("activate");

    // A reclaimer keeps pulling node-c's free units back while the race runs.
    let racing = Arc::new(AtomicBool::new(true));
    let reclaimer = {
        let allocator = allocators[2].clone();
        let sale = sale.clone();
        let racing = racing.clone();
        tokio::spawn(async move {
            let mut reclaimed = 0;
            while racing.load(Ordering::Relaxed) {
                reclaimed += allocator.reclaim(&sale, "node-c").await.expect("reclaim");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            reclaimed
        })
    };

    let meters: Arc<Vec<HotKey>> = Arc::new(nodes.iter().map(|_| hot_key(&sale)).collect());
    let racers: Vec<_> = (0..200)
        .map(|i| {
            let index = i % 3;
            let allocator = allocators[index].clone();
            let sale = sale.clone();
            let meters = meters.clone();
            tokio::spawn(async move {
                let request = reserve(&sale.key, 1, &format!("racer-{i}"));
                allocator.reserve_hot(&meters[index], &request).await
            })
        })
        .collect();
    let (mut held, mut refused) = (0, 0);
    for racer in racers {
        match racer.await.expect("task") {
            Ok(_) => held += 1,
            Err(AllocatorError::InsufficientStock { .. }) => refused += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    racing.store(false, Ordering::Relaxed);
    let reclaimed = reclaimer.await.expect("reclaimer");

    assert_eq!(
        (held, refused),
        (50, 150),
        "reclaimed {reclaimed} units along the way"
    );
    let view = allocators[0].stock_view(&sale.key).await.expect("view");
    let on_hand: i64 = view.pool.iter().map(|pool| pool.on_hand).sum::<i64>()
        + view
            .buckets
            .iter()
            .map(|(_, bucket)| bucket.on_hand)
            .sum::<i64>();
    let reserved: i64 = view.pool.iter().map(|pool| pool.reserved).sum::<i64>()
        + view
            .buckets
            .iter()
            .map(|(_, bucket)| bucket.reserved)
            .sum::<i64>();
    assert_eq!((on_hand, reserved, view.sellable()), (50, 50, 0));

    let entries = entries_of(&allocators[0], &sale.key).await;
    let count = |op: &str| entries.iter().filter(|entry| entry["op"] == op).count();
    assert_eq!(count("reserve"), 50);
    let qty = |op: &str| -> i64 {
        entries
            .iter()
            .filter(|entry| entry["op"] == op)
            .map(|entry| entry["qty"].as_i64().expect("qty"))
            .sum()
    };
    assert_eq!(
        qty("transfer_out"),
        qty("transfer_in"),
        "nothing left in flight"
    );
}

#[tokio::test]
async fn heartbeats_lapse() {
    let allocator = allocator_for(&testkit::unique_id("node")).await;
    let node = allocator.settings().node.clone();
    assert!(!allocator.node_alive(&node).await.expect("check"));
    allocator
        .heartbeat(Duration::from_millis(300))
        .await
        .expect("beat");
    assert!(allocator.node_alive(&node).await.expect("check"));
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(!allocator.node_alive(&node).await.expect("check"), "lapsed");
}

/// A count of the whole key, by `source`'s sequence `seq`.
fn count(key: &StockKey, units: i64, seq: u64) -> allocator::Adjustment {
    allocator::Adjustment {
        kind: allocator::AdjustmentKind::Absolute,
        source_seq: Some(seq),
        ..delta(key, units, &testkit::unique_id("count"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_physical_count_during_a_sale_sets_the_key_and_creates_no_units() {
    let allocator = allocator_for("node-a").await;
    let sale = sale(&["node-a", "node-b"]);
    stock(&allocator, &sale.key, 1000).await;
    allocator.activate(&sale, "e1").await.expect("activate");
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(view.buckets.len(), 2, "split over both nodes: {view:?}");
    stock(&allocator, &sale.key, 40).await;

    // The shelf is counted at exactly what it holds: nothing may change.
    allocator
        .adjust(&count(&sale.key, 1040, 1))
        .await
        .expect("count");
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(view.on_hand(), 1040, "{view:?}");
    assert_eq!(view.sellable(), 1040, "{view:?}");

    // A count below what the buckets hold takes the key there too.
    allocator
        .adjust(&count(&sale.key, 300, 2))
        .await
        .expect("count");
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(view.on_hand(), 300, "{view:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_of_every_unit_stops_every_node_until_restocked() {
    let allocator = allocator_for("node-a").await;
    let sale = sale(&["node-a", "node-b"]);
    stock(&allocator, &sale.key, 100).await;
    allocator.activate(&sale, "e1").await.expect("activate");
    let hot = hot_key(&sale);
    let node_b = allocator_for("node-b").await;
    allocator
        .reserve_hot(&hot, &reserve(&sale.key, 3, &testkit::unique_id("r")))
        .await
        .expect("a hold before the loss");

    let outcome = allocator
        .adjust(&delta(&sale.key, -100, &testkit::unique_id("loss")))
        .await
        .expect("loss");
    assert!(
        matches!(
            outcome,
            allocator::AdjustmentOutcome::Applied {
                shortfall: true,
                ..
            }
        ),
        "{outcome:?}"
    );
    for (node, on) in [("node-a", &allocator), ("node-b", &node_b)] {
        let answer = on
            .reserve_hot(&hot, &reserve(&sale.key, 1, &testkit::unique_id("r")))
            .await;
        assert!(
            matches!(answer, Err(AllocatorError::InsufficientStock { .. })),
            "{node} sold while the key is short: {answer:?}"
        );
    }
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(view.on_hand(), 0, "{view:?}");
    assert_eq!(
        hot.outcomes.counts(),
        HotOutcomeCounts {
            held: 1,
            insufficient: 2,
            insufficient_with_units_left: 0,
        },
        "the key had nothing left: plain refusals"
    );

    stock(&allocator, &sale.key, 10).await;
    node_b
        .reserve_hot(&hot, &reserve(&sale.key, 5, &testkit::unique_id("r")))
        .await
        .expect("sells again once the loss is made good");
}

/// A reservation the hot path refuses while the key still has sellable
/// units (here: a drain holds the key's lease past the hot path's rounds,
/// as a count stuck midway would) is counted apart, for the operator's
/// alert; once the drain ends the key sells again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_while_units_remain_is_counted_apart() {
    let allocator = allocator_for("node-a").await;
    let (sale, hot) = sale_of_20_with_a_hold(&allocator, 1).await;

    let drained = allocator
        .drain(&sale.key, None, false)
        .await
        .expect("drain");
    let answer = allocator
        .reserve_hot(&hot, &reserve(&sale.key, 1, &testkit::unique_id("r")))
        .await;
    assert!(
        matches!(answer, Err(AllocatorError::InsufficientStock { .. })),
        "{answer:?}"
    );
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert!(view.sellable() > 0, "units remained: {view:?}");
    assert_eq!(
        hot.outcomes.counts(),
        HotOutcomeCounts {
            held: 1,
            insufficient: 1,
            insufficient_with_units_left: 1,
        }
    );

    allocator
        .end_drain(&sale.key, drained.epoch)
        .await
        .expect("end the drain");
    allocator
        .reserve_hot(&hot, &reserve(&sale.key, 1, &testkit::unique_id("r")))
        .await
        .expect("sells again once the drain ends");
    assert_eq!(hot.outcomes.counts().held, 2);
}

/// Commands a Redis has processed (`INFO stats`).
fn commands_processed(url: &str) -> u64 {
    let port = url.rsplit(':').next().expect("port");
    let output = std::process::Command::new("redis-cli")
        .args(["-p", port, "info", "stats"])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("total_commands_processed:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("total_commands_processed")
}

/// A request for more units than the whole key has left (2 left, 3
/// asked) is a plain refusal, not one "while units remained", and is made
/// at once: with fewer sellable units than asked and nothing in flight, no
/// round of the hot path could serve it (counted in Redis commands, on a
/// Redis of its own: about 40 for one round, about 750 for all 32).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_more_than_the_key_has_left_is_a_plain_refusal_made_at_once() {
    let port = testkit::free_port();
    let _redis = testkit::private_redis(port, None);
    let url = format!("redis://127.0.0.1:{port}");
    let allocator = Allocator::connect(&url, settings("node-a"), 4)
        .await
        .expect("connect");
    let (sale, hot) = sale_of_20_with_a_hold(&allocator, 18).await;
    let before = commands_processed(&url);
    let answer = allocator
        .reserve_hot(&hot, &reserve(&sale.key, 3, &testkit::unique_id("r")))
        .await;
    let commands = commands_processed(&url) - before;
    assert!(
        matches!(answer, Err(AllocatorError::InsufficientStock { .. })),
        "{answer:?}"
    );
    assert!(
        commands < 200,
        "{commands} Redis commands for one refusal of a key that had 2 of 3"
    );
    assert_eq!(
        allocator
            .stock_view(&sale.key)
            .await
            .expect("view")
            .sellable(),
        2
    );
    assert_eq!(
        hot.outcomes.counts(),
        HotOutcomeCounts {
            held: 1,
            insufficient: 1,
            insufficient_with_units_left: 0,
        }
    );
    allocator
        .reserve_hot(&hot, &reserve(&sale.key, 2, &testkit::unique_id("r")))
        .await
        .expect("the last 2");
}

/// A sale of 20 units in force over node-a and node-b, with one hold of
/// `qty` made on node-a.
async fn sale_of_20_with_a_hold(allocator: &Allocator, qty: u32) -> (FlashSale, HotKey) {
    let sale = sale(&["node-a", "node-b"]);
    stock(allocator, &sale.key, 20).await;
    allocator.activate(&sale, "e1").await.expect("activate");
    let hot = hot_key(&sale);
    allocator
        .reserve_hot(&hot, &reserve(&sale.key, qty, &testkit::unique_id("r")))
        .await
        .expect("the first hold");
    (sale, hot)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_replayed_after_its_records_are_gone_credits_nothing() {
    let allocator = allocator_for("node-a").await;
    let sale = sale(&["node-a", "node-b"]);
    stock(&allocator, &sale.key, 100).await;
    allocator.activate(&sale, "e1").await.expect("activate");
    // What the scripts' housekeeping does 24 h after the credit.
    let redis = raw_redis().await;
    let mut partitions = vec![sale.key.pool(PARTITIONS).partition];
    partitions.extend(["node-a", "node-b"].map(|node| sale.bucket(node, PARTITIONS).partition));
    for partition in partitions {
        let hash = format!("inv:{{{partition}}}:xfer");
        let fields: Vec<String> = redis.hkeys(&hash).await.expect("fields");
        for field in fields {
            let record: Option<String> = redis.hget(&hash, &field).await.expect("record");
            let ours = record.is_some_and(|record| record.contains(&sale.key.merchant));
            if ours || field.starts_with("in|act.") {
                let _: i64 = redis.hdel(&hash, &field).await.expect("forget");
            }
        }
    }
    // A node restarts with the same config.
    allocator.activate(&sale, "e1").await.expect("replay");
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(view.on_hand(), 100, "nothing credited twice: {view:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_switched_off_and_on_again_splits_anew_and_conserves_units() {
    let allocator = allocator_for("node-a").await;
    let sale = sale(&["node-a", "node-b"]);
    stock(&allocator, &sale.key, 80).await;
    allocator.activate(&sale, "e1").await.expect("activate");
    for node in ["node-a", "node-b"] {
        allocator.reclaim(&sale, node).await.expect("reclaim");
    }
    allocator.end_activation(&sale, "e1").await.expect("end");
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(
        view.pool.as_ref().map(|pool| pool.on_hand),
        Some(80),
        "{view:?}"
    );

    let split = allocator.activate(&sale, "e1").await.expect("on again");
    assert_eq!(
        split.iter().map(|(_, units)| units).sum::<u64>(),
        40,
        "{split:?}"
    );
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(view.on_hand(), 80, "{view:?}");
    assert_eq!(
        view.sellable(),
        80,
        "the new split reopened the buckets: {view:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_request_retried_on_the_other_node_holds_once() {
    let node_a = allocator_for("node-a").await;
    let node_b = allocator_for("node-b").await;
    let sale = sale(&["node-a", "node-b"]);
    stock(&node_a, &sale.key, 20).await;
    node_a.activate(&sale, "e1").await.expect("activate");
    let hot = hot_key(&sale);
    let request = reserve(&sale.key, 2, &testkit::unique_id("retry"));
    let first = node_a.reserve_hot(&hot, &request).await.expect("first");
    let retry = node_b.reserve_hot(&hot, &request).await.expect("retry");
    assert!(retry.replayed);
    assert_eq!(
        retry.reservation.reservation_id,
        first.reservation.reservation_id
    );
    // And after the sale ends, at the pool.
    for node in ["node-a", "node-b"] {
        node_a.reclaim(&sale, node).await.expect("reclaim");
    }
    let after = node_b.reserve(&request).await.expect("after the sale");
    assert!(after.replayed);
    assert_eq!(
        after.reservation.reservation_id,
        first.reservation.reservation_id
    );
    let view = node_a.stock_view(&sale.key).await.expect("view");
    let held: i64 = view.pool.iter().map(|pool| pool.reserved).sum::<i64>()
        + view
            .buckets
            .iter()
            .map(|(_, bucket)| bucket.reserved)
            .sum::<i64>();
    assert_eq!(held, 2, "held once: {view:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_that_cannot_be_credited_in_time_returns_to_its_source() {
    let allocator = allocator_for("node-a").await;
    let sale = sale(&["node-a"]);
    stock(&allocator, &sale.key, 30).await;
    let pool = sale.key.pool(PARTITIONS);
    let transfer_id = debit_without_credit(&allocator, &sale, 12).await;
    // The credit kept failing for 13 hours (past the credit window, within
    // the credit records' life): what the record says of its debit then.
    let redis = raw_redis().await;
    let hash = format!("inv:{{{}}}:xfer", pool.partition);
    let record: String = redis.hget(&hash, &transfer_id).await.expect("record");
    let mut record: Value = serde_json::from_str(&record).expect("json");
    let now = allocator.redis_time_ms().await.expect("time");
    record["debited_at_ms"] = serde_json::json!(now - 13 * 3600 * 1000);
    let _: i64 = redis
        .hset(&hash, (transfer_id.as_str(), record.to_string()))
        .await
        .expect("age the debit");

    allocator
        .finish_transfers(pool.partition, Duration::ZERO)
        .await
        .expect("finisher");
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(view.in_flight(), 0, "{view:?}");
    assert_eq!(view.on_hand(), 30, "{view:?}");
    assert_eq!(
        view.pool.as_ref().map(|pool| pool.on_hand),
        Some(30),
        "back at the source"
    );
    // A later credit attempt finds it void; nothing moves again.
    allocator
        .finish_transfers(pool.partition, Duration::ZERO)
        .await
        .expect("again");
    assert_eq!(
        allocator
            .stock_view(&sale.key)
            .await
            .expect("view")
            .on_hand(),
        30
    );
    let halves: Vec<String> = entries_of(&allocator, &sale.key)
        .await
        .into_iter()
        .filter(|entry| entry["transfer_id"] == transfer_id.as_str())
        .map(|entry| {
            format!(
                "{} {}",
                entry["op"].as_str().unwrap_or_default(),
                entry["cell"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(halves.len(), 2, "one debit and its reversal: {halves:?}");
}

/// A three-node sale's buckets go to three different thirds of the hash
/// slots, so on a cluster whose three masters own a third each (as
/// `redis-cli --cluster create` makes it) to three different masters:
/// checked against the cluster's own slot map when the stack's Redis is one.
#[tokio::test]
async fn a_sales_buckets_land_in_as_many_shares_of_the_slots_as_it_has_nodes() {
    let nodes = ["node-a", "node-b", "node-c"];
    let allocator = allocator_for("node-a").await;
    let sale = sale(&nodes);
    stock(&allocator, &sale.key, 90).await;
    allocator.activate(&sale, "e1").await.expect("activate");
    let view = allocator.stock_view(&sale.key).await.expect("view");
    let recorded = view.pool.expect("pool").buckets;
    let slots: Vec<u16> = nodes
        .iter()
        .map(|node| allocator::keys::partition_slot(recorded[*node]))
        .collect();
    let thirds: Vec<usize> = slots
        .iter()
        .map(|&slot| usize::from(slot) * 3 / 16384)
        .collect();
    assert_eq!(thirds, [0, 1, 2], "slots {slots:?}");
    assert_eq!(
        view.buckets.len(),
        3,
        "every bucket read where the pool records it"
    );

    if let Some(owners) = cluster_slot_owners().await {
        let owner = |slot: u16| {
            owners
                .iter()
                .find(|(start, end, _)| (*start..=*end).contains(&slot))
                .map(|(_, _, master)| master.clone())
                .expect("every slot has an owner")
        };
        let masters: std::collections::HashSet<String> =
            slots.iter().map(|&slot| owner(slot)).collect();
        let all: std::collections::HashSet<&String> =
            owners.iter().map(|(_, _, master)| master).collect();
        assert_eq!(
            masters.len(),
            all.len().min(3),
            "buckets' masters: {masters:?}"
        );
    }
}

/// `(first slot, last slot, master host:port)` from `CLUSTER SLOTS`, or
/// `None` on a Redis that is not a cluster.
async fn cluster_slot_owners() -> Option<Vec<(u16, u16, String)>> {
    use fred::types::{ClusterHash, CustomCommand, Value as RedisValue};
    let redis = raw_redis().await;
    let reply: RedisValue = redis
        .custom(
            CustomCommand::new_static("CLUSTER", ClusterHash::Random, false),
            vec!["SLOTS"],
        )
        .await
        .ok()?;
    let RedisValue::Array(ranges) = reply else {
        return None;
    };
    let ranges = ranges
        .into_iter()
        .map(|range| {
            let RedisValue::Array(fields) = range else {
                panic!("CLUSTER SLOTS range: {range:?}")
            };
            let slot = |value: &RedisValue| value.as_u64().expect("slot") as u16;
            let RedisValue::Array(master) = &fields[2] else {
                panic!("CLUSTER SLOTS master: {fields:?}")
            };
            let host = master[0].as_string().expect("host");
            let port = master[1].as_u64().expect("port");
            (slot(&fields[0]), slot(&fields[1]), format!("{host}:{port}"))
        })
        .collect();
    Some(ranges)
}

/// A later sale over the same key with its nodes in another order finds the
/// buckets the pool records, and a bucket placed anywhere else is refused
/// by the scripts (its units would be left where nothing looks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_stays_where_its_pool_records_it() {
    let allocator = allocator_for("node-a").await;
    let first = sale(&["node-a", "node-b", "node-c"]);
    stock(&allocator, &first.key, 90).await;
    allocator.activate(&first, "e1").await.expect("activate");
    let recorded = |view: allocator::StockView| view.pool.expect("pool").buckets;
    let before = recorded(allocator.stock_view(&first.key).await.expect("view"));
    for node in ["node-a", "node-b", "node-c"] {
        allocator.reclaim(&first, node).await.expect("reclaim");
    }
    allocator.end_activation(&first, "e1").await.expect("end");

    // node-c was third of three (the last third of the slots); first of two
    // it would go to the first half, so this sale's own placement differs.
    let mut later = first.clone();
    later.name = testkit::unique_id("sale");
    later.nodes = vec!["node-c".to_owned(), "node-a".to_owned()];
    assert_ne!(
        later.bucket("node-c", PARTITIONS).partition,
        before["node-c"],
        "the later sale places node-c elsewhere on its own"
    );
    match allocator.activate(&later, "e2").await {
        Err(AllocatorError::InvalidRequest(why)) => {
            assert!(why.contains("bucket_partition"), "{why}")
        }
        other => panic!("a bucket elsewhere than recorded must be refused: {other:?}"),
    }
    match allocator.refill(&later, "node-c", 5.0).await {
        Err(AllocatorError::InvalidRequest(why)) => {
            assert!(why.contains("bucket_partition"), "{why}")
        }
        other => panic!("a refill elsewhere than recorded must be refused: {other:?}"),
    }
    let view = allocator.stock_view(&later.key).await.expect("view");
    assert_eq!(recorded(view.clone()), before, "the record is unchanged");
    assert_eq!(view.sellable(), 90, "nothing moved: {view:?}");

    allocator.place(&mut later).await.expect("place");
    let split = allocator
        .activate(&later, "e2")
        .await
        .expect("activate later");
    assert_eq!(split.iter().map(|(_, units)| units).sum::<u64>(), 45);
    let view = allocator.stock_view(&later.key).await.expect("view");
    assert_eq!(
        recorded(view.clone()),
        before,
        "the buckets stayed where they were"
    );
    assert_eq!(view.sellable(), 90, "{view:?}");
    assert_eq!(
        view.buckets
            .iter()
            .map(|(_, bucket)| bucket.on_hand)
            .sum::<i64>(),
        45,
        "the later split reached the recorded buckets: {view:?}"
    );
}

/// An activation whose credits landed but whose debits were never marked
/// credited (a crash in between) is replayed by a node whose config lists
/// the sale's nodes in another order, so its own placement differs: the
/// replay credits where the debits sent the units (their `in|id` records
/// make that a no-op), never a bucket of its own placement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_replayed_with_its_nodes_reordered_credits_where_it_debited() {
    let allocator = allocator_for("node-a").await;
    let first = sale(&["node-a", "node-b", "node-c"]);
    stock(&allocator, &first.key, 90).await;
    allocator.activate(&first, "e1").await.expect("activate");

    let redis = raw_redis().await;
    let xfer = format!("inv:{{{}}}:xfer", first.key.pool(PARTITIONS).partition);
    let fields: Vec<String> = redis.hkeys(&xfer).await.expect("fields");
    let mut forged = 0;
    for field in fields.iter().filter(|field| field.starts_with("act.")) {
        let text: String = redis.hget(&xfer, field).await.expect("record");
        let mut record: Value = serde_json::from_str(&text).expect("json");
        if record["from_cell"] != first.key.pool(PARTITIONS).id.as_str() {
            continue; // another test's activation in this partition
        }
        record["status"] = "debited".into();
        record
            .as_object_mut()
            .expect("object")
            .remove("credited_at_ms");
        let _: () = redis
            .hset(&xfer, (field.as_str(), record.to_string()))
            .await
            .expect("forge");
        forged += 1;
    }
    assert_eq!(forged, 3, "one debit per node");

    let mut reordered = first.clone();
    reordered.nodes = vec!["node-c".into(), "node-a".into(), "node-b".into()];
    assert_ne!(
        reordered.bucket("node-c", PARTITIONS),
        first.bucket("node-c", PARTITIONS),
        "the reordered sale places node-c elsewhere on its own"
    );
    allocator.activate(&reordered, "e1").await.expect("replay");
    let view = allocator.stock_view(&first.key).await.expect("view");
    assert_eq!(
        view.on_hand() + view.in_flight(),
        90,
        "no unit credited twice: {view:?}"
    );
    // Nor anywhere the pool does not look (units there would sell from
    // nowhere the key's counts see).
    for node in &reordered.nodes {
        let own = reordered.bucket(node, PARTITIONS);
        if own != first.bucket(node, PARTITIONS) {
            assert_eq!(
                allocator.cell(&own).await.expect("read"),
                None,
                "{node}: nothing credited at the replaying sale's own placement"
            );
        }
    }
}

/// A hot hold lands in the cell its claim placed it in (the reservation id
/// names that partition), never in another bucket of the node: with the
/// pool recording the node's bucket elsewhere, the hold is refused and
/// nothing is held anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_hold_is_made_in_its_claims_cell_or_not_at_all() {
    let allocator = allocator_for("node-a").await;
    let sale = sale(&["node-a", "node-b"]);
    stock(&allocator, &sale.key, 40).await;
    allocator.activate(&sale, "e1").await.expect("activate");
    let recorded = sale.bucket("node-a", PARTITIONS);
    let elsewhere = sale
        .key
        .bucket_in("node-a", (recorded.partition + 1) % PARTITIONS);
    let reservation_id = allocator::keys::reservation_id(elsewhere.partition, [9; 12]);
    let request = allocator::HoldRequest {
        key: sale.key.clone(),
        qty: 1,
        ttl_ms: 60_000,
        grace_ms: 0,
        reservation_id: reservation_id.clone(),
        customer_hash: None,
        cart_id: None,
        hold_by_ms: None,
        allowance_partition: None,
    };
    let outcome = allocator
        .hold_hot(&hot_key(&sale), "node-a", &elsewhere, &request)
        .await;
    assert!(
        matches!(outcome, Err(AllocatorError::InvalidRequest(ref why)) if why.contains("bucket_partition")),
        "{outcome:?}"
    );
    assert!(matches!(
        allocator.reservation(None, &reservation_id).await,
        Err(AllocatorError::NotFound)
    ));
    let view = allocator.stock_view(&sale.key).await.expect("view");
    assert_eq!(
        view.buckets
            .iter()
            .map(|(_, bucket)| bucket.reserved)
            .sum::<i64>(),
        0,
        "nothing held: {view:?}"
    );
}

/// A key in the hot-key registry of releases before it was split per
/// partition (`inv:hotkeys`) is still found by the reconciler's listing, and
/// moved to its partition's set on the way: a sale that ended before an
/// upgrade still has its buckets reclaimed.
#[tokio::test]
async fn a_hot_key_registered_by_an_older_release_is_still_listed_and_moved() {
    let allocator = allocator_for("node-a").await;
    let redis = raw_redis().await;
    let key = StockKey::new(testkit::unique_id("legacy"), "hot", "dc1");
    let member = format!("{}|{}|{}", key.merchant, key.sku, key.location);
    let _: i64 = redis
        .sadd(allocator::keys::LEGACY_HOT_KEYS, member.as_str())
        .await
        .expect("sadd");
    let listed = allocator.hot_keys().await.expect("hot keys");
    assert!(listed.contains(&key), "{key} listed");
    let still: bool = redis
        .sismember(allocator::keys::LEGACY_HOT_KEYS, member.as_str())
        .await
        .expect("sismember");
    assert!(!still, "moved out of the old registry");
    let moved: bool = redis
        .sismember(
            allocator::keys::hot_keys_set(key.partition(PARTITIONS)),
            member.as_str(),
        )
        .await
        .expect("sismember");
    assert!(moved, "into its partition's set");
    allocator.forget_hot_key(&key).await.expect("forget");
    assert!(!allocator.hot_keys().await.expect("hot keys").contains(&key));
}
