//! A Redis Cluster master lost in the middle of a sale, on a private cluster
//! of three masters: reservations on its slots fail (the gateway answers
//! them 503), nothing is oversold, every other master keeps selling, and
//! once it is back the ledger audit balances. With a replica per master,
//! the same loss failed over: the figure is what asynchronous replication
//! lost (acknowledged holds that vanished), and what the audit says.
//!
//! Its own test binary: it kills and restarts Redis nodes, and cargo runs
//! test binaries one at a time.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use allocator::keys::partition_slot;
use allocator::{
    Allocator, AllocatorError, AllocatorSettings, FlashSale, HotKey, RateMeter, ReserveRequest,
    StockKey,
};
use common::*;
use testkit::cluster::PrivateCluster;
use tokio::sync::Mutex;

const UNITS: i64 = 400;

/// One reservation attempt's outcome, as the load saw it.
#[derive(Debug, Clone)]
struct Attempt {
    /// The stock key's name in the test (`key-0`…, `sale`).
    what: String,
    /// When it was answered, from the test's start.
    at: Duration,
    /// The reservation id when it was held.
    held: Option<String>,
    /// The error's kind otherwise.
    error: Option<String>,
}

fn allocator_settings(node: &str) -> AllocatorSettings {
    AllocatorSettings {
        node: node.to_owned(),
        ..settings()
    }
}

/// A stock key of `merchant` whose pool is on the master serving `slots`.
fn key_on(merchant: &str, slots: &[(u16, u16)]) -> StockKey {
    (0..)
        .map(|n| StockKey::new(merchant, format!("sku-{n}"), "dc1"))
        .find(|key| {
            let slot = partition_slot(key.partition(PARTITIONS));
            slots
                .iter()
                .any(|(first, last)| (*first..=*last).contains(&slot))
        })
        .expect("a key on every master")
}

async fn restock(allocator: &Allocator, key: &StockKey, units: i64) {
    let adjustment = allocator::Adjustment {
        merchant: key.merchant.clone(),
        sku: key.sku.clone(),
        location: key.location.clone(),
        kind: allocator::AdjustmentKind::Delta,
        qty: units,
        source: "test".to_owned(),
        event_id: testkit::unique_id("restock"),
        source_seq: None,
    };
    allocator.adjust(&adjustment).await.expect("restock");
}

fn kind(error: &AllocatorError) -> String {
    match error {
        AllocatorError::StoreUnavailable(_) => "unavailable".to_owned(),
        AllocatorError::InsufficientStock { .. } => "insufficient".to_owned(),
        other => format!("other: {other}"),
    }
}

/// Reserves one unit at a time of `key` (through `hot` when given) until
/// `stop`, pacing itself so a sale lasts the test.
fn load(
    allocator: Arc<Allocator>,
    what: String,
    key: StockKey,
    hot: Option<HotKey>,
    started: Instant,
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let request = ReserveRequest {
                key: key.clone(),
                qty: 1,
                ttl: None,
                idempotency_key: format!("{what}-{}-{n}", key.merchant),
                customer_ref: None,
            };
            let result = match &hot {
                Some(hot) => allocator.reserve_hot(hot, &request).await,
                None => allocator.reserve(&request).await,
            };
            let (held, error) = match result {
                Ok(hold) => (Some(hold.reservation.reservation_id), None),
                Err(error) => (None, Some(kind(&error))),
            };
            attempts.lock().await.push(Attempt {
                what: what.clone(),
                at: started.elapsed(),
                held,
                error,
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Acknowledged holds whose reservation is gone (or not held any more).
async fn vanished(allocator: &Allocator, attempts: &[Attempt]) -> Vec<String> {
    let mut lost = Vec::new();
    for id in attempts.iter().filter_map(|attempt| attempt.held.as_ref()) {
        match allocator.reservation(None, id).await {
            Ok(reservation) if reservation.status == allocator::ReservationStatus::Held => {}
            other => lost.push(format!("{id}: {other:?}")),
        }
    }
    lost
}

/// Waits until the writer has relayed everything, then runs the audit.
async fn audit_after_relay(setup: &Setup) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lag = metric(setup.metrics_port, "invgw_writer_lag_entries_total").await;
        if lag == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writer did not relay everything: lag {lag:?}; {}",
            writer_logs(setup)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    audit(setup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_sale_stops_its_own_slots_only_and_the_books_balance_after_it_returns()
{
    let directory = tempfile::tempdir().expect("cluster dir");
    let mut cluster = PrivateCluster::start(directory.path(), 3, 0, 1000);
    let setup = setup(&cluster.url()).await;
    let _writer = start_writer(&setup);
    let merchant = testkit::unique_id("m");
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");

    let ops = Arc::new(
        Allocator::connect(&cluster.url(), allocator_settings("ops"), 2)
            .await
            .expect("allocator"),
    );
    // One ordinary key on each master, and a sale over three nodes whose
    // buckets are on the three masters.
    let keys: Vec<StockKey> = masters
        .iter()
        .map(|master| key_on(&merchant, &master.slots))
        .collect();
    for key in &keys {
        restock(&ops, key, UNITS).await;
    }
    let nodes = ["node-a", "node-b", "node-c"];
    let mut sale = FlashSale {
        name: testkit::unique_id("sale"),
        key: StockKey::new(&merchant, "hot", "dc1"),
        nodes: nodes.iter().map(|node| (*node).to_owned()).collect(),
        presplit_fraction: 0.5,
        refill_chunk_units_min: 5,
        refill_chunk_units_max: 20,
        buckets: Default::default(),
    };
    restock(&ops, &sale.key, UNITS).await;
    ops.place(&mut sale).await.expect("place");
    ops.activate(&sale, "e1").await.expect("activate");

    // The victim serves the middle third of the slots: key-1's pool and
    // node-b's bucket.
    let victim = masters[1].port;
    let bucket_b = sale.bucket("node-b", PARTITIONS);
    assert_eq!(cluster.master_of(partition_slot(bucket_b.partition)), victim);

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        workers.push(load(
            Arc::clone(&ops),
            format!("key-{index}"),
            key.clone(),
            None,
            started,
            Arc::clone(&stop),
            Arc::clone(&attempts),
        ));
    }
    for node in nodes {
        let allocator = Arc::new(
            Allocator::connect(&cluster.url(), allocator_settings(node), 2)
                .await
                .expect("allocator"),
        );
        let hot = HotKey {
            sale: sale.clone(),
            epoch: "e1".to_owned(),
            meter: RateMeter::default(),
        };
        workers.push(load(
            allocator,
            format!("sale-{node}"),
            sale.key.clone(),
            Some(hot),
            started,
            Arc::clone(&stop),
            Arc::clone(&attempts),
        ));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = started.elapsed();
    cluster.kill(victim);
    tokio::time::sleep(cluster.node_timeout() * 4).await;
    let restarted_at = started.elapsed();
    cluster.restart(victim);
    cluster.wait_served(Duration::from_secs(30));
    let served_at = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.expect("load");
    }
    let attempts = attempts.lock().await.clone();

    // What each stream of requests saw in each phase.
    let mut seen: HashMap<(String, &str), (u64, u64)> = HashMap::new();
    for attempt in &attempts {
        let phase = if attempt.at < killed_at {
            "before"
        } else if attempt.at < restarted_at {
            "down"
        } else if attempt.at > served_at {
            "after"
        } else {
            "returning"
        };
        let entry = seen.entry((attempt.what.clone(), phase)).or_default();
        match (&attempt.held, &attempt.error) {
            (Some(_), _) => entry.0 += 1,
            (None, Some(error)) => {
                assert!(
                    error == "unavailable" || error == "insufficient",
                    "{attempt:?}"
                );
                entry.1 += 1;
            }
            (None, None) => unreachable!(),
        }
    }
    let held = |what: &str, phase: &str| seen.get(&(what.to_owned(), phase)).map_or(0, |s| s.0);
    let refused = |what: &str, phase: &str| seen.get(&(what.to_owned(), phase)).map_or(0, |s| s.1);
    eprintln!("outcomes (held, refused) by stream and phase: {seen:?}");
    for what in ["key-0", "key-1", "key-2", "sale-node-a", "sale-node-b", "sale-node-c"] {
        assert!(held(what, "before") > 0, "{what} sold before the loss: {seen:?}");
    }
    // Down: the victim's slots answer nothing but "unavailable" (no
    // request that reached it after the kill was held)...
    let victims_holds = attempts
        .iter()
        .filter(|attempt| {
            (attempt.what == "key-1" || attempt.what == "sale-node-b")
                && attempt.at > killed_at + Duration::from_millis(100)
                && attempt.at < restarted_at
        })
        .filter(|attempt| attempt.held.is_some())
        .count();
    assert_eq!(victims_holds, 0, "nothing held on a dead master: {seen:?}");
    assert!(refused("key-1", "down") > 0, "{seen:?}");
    // ...and the other masters keep selling.
    for what in ["key-0", "key-2", "sale-node-a", "sale-node-c"] {
        assert!(held(what, "down") > 0, "{what} kept selling: {seen:?}");
    }
    for what in ["key-0", "key-1", "key-2", "sale-node-b"] {
        assert!(held(what, "after") > 0, "{what} sold again: {seen:?}");
    }

    // Nothing acknowledged was lost (append-only, written before the reply)
    // and nothing was oversold: each key holds at least what was acknowledged
    // (a request that timed out may still have held) and never more than it had.
    let lost = vanished(&ops, &attempts).await;
    assert!(lost.is_empty(), "acknowledged holds lost: {lost:?}");
    let mut acked_by_key: HashMap<&StockKey, i64> = HashMap::new();
    for attempt in attempts.iter().filter(|attempt| attempt.held.is_some()) {
        let key = match attempt.what.strip_prefix("key-") {
            Some(index) => &keys[index.parse::<usize>().expect("index")],
            None => &sale.key,
        };
        *acked_by_key.entry(key).or_default() += 1;
    }
    for key in keys.iter().chain([&sale.key]) {
        let view = ops.stock_view(key).await.expect("view");
        let acked = acked_by_key.get(key).copied().unwrap_or(0);
        let reserved = view.pool.iter().map(|pool| pool.reserved).sum::<i64>()
            + view.buckets.iter().map(|(_, bucket)| bucket.reserved).sum::<i64>();
        assert_eq!(
            view.on_hand() + view.in_flight(),
            UNITS,
            "{key}: units on the shelf or between cells: {view:?}"
        );
        assert!(
            reserved >= acked && reserved <= UNITS,
            "{key}: {acked} acknowledged, {reserved} reserved: {view:?}"
        );
    }
    let (balanced, report) = audit_after_relay(&setup).await;
    assert!(balanced, "the audit after the master's return: {report}");
    eprintln!(
        "figure: master killed for {:?}; {} acknowledged holds, 0 lost; audit balanced",
        restarted_at - killed_at,
        acked_by_key.values().sum::<i64>()
    );
}
