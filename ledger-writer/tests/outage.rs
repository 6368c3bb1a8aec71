//! The failure stance of DESIGN.md for the ledger: PostgreSQL stopped for
//! 10 s, then the broker frozen (SIGSTOP) for 10 s, under load. Stock
//! operations go on; the outbox grows and the writer's lag metric shows it;
//! afterwards it drains to zero and nothing is lost, and the PostgreSQL
//! outage doubles no entry in Kafka.
//!
//! Its own test binary: it stops the shared PostgreSQL and freezes the shared
//! broker, and cargo runs test binaries one at a time.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// Lag that counts as drained while the load goes on: well under a second
/// of it.
const IN_FLIGHT: f64 = 100.0;

fn stack(arguments: &[&str]) {
    let status = Command::new(testkit::repository_root().join("scripts/stack"))
        .args(arguments)
        .status()
        .expect("run scripts/stack");
    assert!(status.success(), "scripts/stack {arguments:?} failed");
}

/// Puts a stopped or frozen service back even when the test fails half way.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = Command::new(testkit::repository_root().join("scripts/stack"))
            .arg("up")
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// The writer's total lag, sampled while a service is down: it must grow.
async fn lag_grows_while_down(port: u16, what: &str) -> (f64, f64) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let early = metric(port, "invgw_writer_lag_all_partitions_entries")
        .await
        .unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let late = metric(port, "invgw_writer_lag_all_partitions_entries")
        .await
        .unwrap_or_default();
    let oldest_seconds = metric(port, "invgw_writer_lag_oldest_seconds")
        .await
        .unwrap_or_default();
    assert!(
        late > early && early > 0.0,
        "{what}: the lag metric grows while it is down: {early} then {late}"
    );
    assert!(oldest_seconds > 0.0, "{what}: the oldest entry ages");
    (early, late)
}

/// Waits until the writer's lag is at most `entries` (under continuing load
/// a few entries are always in flight; 0 once the load stopped).
async fn wait_drained(setup: &Setup, what: &str, entries: f64) -> Duration {
    let port = setup.metrics_port;
    let started = Instant::now();
    loop {
        let lag = metric(port, "invgw_writer_lag_all_partitions_entries").await;
        if lag.is_some_and(|lag| lag <= entries) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{what}: the outbox did not drain: lag {lag:?}\n{}",
            tail(&writer_logs(setup), 40)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A steady load (about 200 entries a second: a debug build of the writer
/// drains well faster than that) until `stop`; stock operations never wait
/// for the ledger. Adds the entries it wrote to `written`.
fn steady_load(
    allocator: &Arc<allocator::Allocator>,
    phase: &'static str,
    stop: &Arc<AtomicBool>,
    written: &Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let (allocator, stop, written) = (Arc::clone(allocator), Arc::clone(stop), Arc::clone(written));
    tokio::spawn(async move {
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let batch: &'static str = Box::leak(format!("{phase}{round}").into_boxed_str());
            written.fetch_add(
                operations(Arc::clone(&allocator), 1, batch).await,
                Ordering::Relaxed,
            );
            round += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_absorbs_a_postgresql_and_a_broker_outage_and_drains_with_nothing_lost() {
    let (_redis, setup, allocator) = harness(&[]).await;
    let _writer = start_writer(&setup);
    let metrics_port = setup.metrics_port;
    wait_drained(&setup, "start", 0.0).await;
    let written = Arc::new(AtomicU64::new(0));
    let _restore = Restore;

    // PostgreSQL stopped for 10 s under load.
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&allocator, "p", &stop, &written);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack(&["stop", "postgresql"]);
    let stopped = Instant::now();
    let postgres_lag = lag_grows_while_down(metrics_port, "postgresql").await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed())).await;
    stack(&["up"]);
    let postgres_drain = wait_drained(&setup, "after postgresql", IN_FLIGHT).await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load");
    wait_drained(&setup, "after the postgresql phase", 0.0).await;

    // Kafka confirmed every batch PostgreSQL refused: its retries publish
    // nothing again, so the topic holds each entry once.
    let so_far = written.load(Ordering::Relaxed);
    let rows = wait_for_rows(&setup, so_far, Duration::from_secs(60)).await;
    assert_eq!(rows as u64, so_far, "one row per entry written");
    let topic = setup.topic.clone();
    let messages = tokio::task::spawn_blocking(move || kafka_messages(&topic, so_far as usize))
        .await
        .expect("read the topic");
    let distinct: HashSet<&str> = messages
        .iter()
        .map(|message| message.payload["entry_id"].as_str().expect("entry_id"))
        .collect();
    assert_eq!(
        distinct.len() as u64,
        so_far,
        "every entry is in Kafka after the postgresql outage"
    );
    assert_eq!(
        messages.len(),
        distinct.len(),
        "no entry was published twice while postgresql refused its batch"
    );

    // The broker frozen for 10 s under load.
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&allocator, "k", &stop, &written);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack(&["pause", "kafka"]);
    let paused = Instant::now();
    let kafka_lag = lag_grows_while_down(metrics_port, "kafka").await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(paused.elapsed())).await;
    stack(&["resume", "kafka"]);
    let kafka_drain = wait_drained(&setup, "after kafka", IN_FLIGHT).await;

    stop.store(true, Ordering::Relaxed);
    load.await.expect("load");
    let written = written.load(Ordering::Relaxed);
    wait_drained(&setup, "at the end", 0.0).await;
    eprintln!(
        "written {written}; postgresql down: lag {postgres_lag:?}, drained in {postgres_drain:?}, \
         {} kafka messages for {so_far} entries; kafka down: lag {kafka_lag:?}, drained in \
         {kafka_drain:?}",
        messages.len()
    );

    let rows = wait_for_rows(&setup, written, Duration::from_secs(60)).await;
    assert_eq!(rows as u64, written, "one row per entry written");
    for (sink, name) in [("postgresql", "postgresql"), ("kafka", "kafka")] {
        let errors = metric(
            metrics_port,
            &format!("invgw_writer_errors_total{{sink=\"{sink}\""),
        )
        .await;
        assert!(
            errors.unwrap_or_default() > 0.0,
            "the {name} outage shows in errors_total"
        );
    }
    let (balanced, printed) = audit(&setup);
    assert!(balanced, "{printed}");
}
