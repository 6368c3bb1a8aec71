//! The capacity model's Redis inputs, measured, and whether anything slows
//! down as the catalogue grows. On a Redis of its own (empty, no
//! persistence, started from the stack's install):
//!
//! 1. **Bytes per thing**: creates `CAPACITY_SAMPLE` stock keys (one
//!    location each), then holds one unit of each, and reads `MEMORY USAGE`
//!    (exact, `SAMPLES 0`) of every partition key: bytes per stock cell,
//!    per location index of a one-location SKU, per open hold (its record
//!    and its two due indexes), per reservation's idempotency record, per
//!    ledger stream entry, and Redis' whole memory per key with one hold.
//! 2. **Catalogue size**: grows the catalogue to each of `CAPACITY_SCALES`
//!    keys (default 10,000, 100,000, 1,000,000), and at each size runs, for
//!    `CAPACITY_SECONDS`, one-unit reservations of random keys and then
//!    uncached reads (`stock_views`) of random keys, 64 at a time: rate
//!    and p99 of each, and Redis' memory.
//!
//! Prints a table; with `CAPACITY_OUT`, writes the figures there as JSON
//! (for `scripts/capacity`'s report). Figures, never assertions.
//!
//! Run: `eval "$(scripts/stack env)"; cargo bench -p allocator --bench capacity`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use allocator::{
    Adjustment, AdjustmentKind, Allocator, AllocatorSettings, ReserveRequest, StockKey,
};
use fred::prelude::*;
use serde_json::json;

const PARTITIONS: u32 = 64;
const CONCURRENCY: u64 = 64;
const MERCHANT: &str = "cap";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn key(n: u64) -> StockKey {
    StockKey::new(MERCHANT, format!("sku-{n}"), "dc1")
}

fn settings() -> AllocatorSettings {
    AllocatorSettings {
        node: "capacity".to_owned(),
        partitions: PARTITIONS,
        command_timeout: Duration::from_secs(10),
        ttl_default: Duration::from_secs(600),
        ttl_max: Duration::from_secs(3600),
        customer_ref_key: "capacity-bench-key".to_owned(),
        cart_line_grace: Duration::from_secs(2),
    }
}

/// Runs `work(n)` for every n in `range`, `CONCURRENCY` at a time.
async fn for_each<F, Fut>(range: std::ops::Range<u64>, work: F)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicU64::new(range.start));
    let work = Arc::new(work);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (next, work) = (Arc::clone(&next), Arc::clone(&work));
            let end = range.end;
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= end {
                        break;
                    }
                    work(n).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("worker");
    }
}

async fn create(allocator: &Arc<Allocator>, range: std::ops::Range<u64>) {
    let allocator = Arc::clone(allocator);
    for_each(range, move |n| {
        let allocator = Arc::clone(&allocator);
        async move {
            let adjustment = restock(&key(n), 1_000, format!("create-{n}"));
            allocator.adjust(&adjustment).await.expect("create a key");
        }
    })
    .await;
}

/// A delta of `qty` units to `key`, deduplicated on `event_id`.
fn restock(key: &StockKey, qty: i64, event_id: String) -> Adjustment {
    Adjustment {
        merchant: key.merchant.clone(),
        sku: key.sku.clone(),
        location: key.location.clone(),
        kind: AdjustmentKind::Delta,
        qty,
        source: "capacity".to_owned(),
        event_id,
        source_seq: None,
    }
}

static REQUEST: AtomicU64 = AtomicU64::new(0);

async fn reserve(allocator: &Allocator, key: StockKey) {
    let request = ReserveRequest {
        key,
        qty: 1,
        ttl: Some(Duration::from_secs(3600)),
        idempotency_key: format!("cap-{}", REQUEST.fetch_add(1, Ordering::Relaxed)),
        customer_ref: None,
    };
    allocator.reserve(&request).await.expect("reserve");
}

/// Bytes `MEMORY USAGE` counts for `name` (0 when it does not exist).
async fn usage(redis: &Client, name: &str) -> u64 {
    use fred::types::{ClusterHash, CustomCommand};
    let value: Option<u64> = redis
        .custom(
            CustomCommand::new_static("MEMORY USAGE", ClusterHash::FirstKey, false),
            vec![name, "SAMPLES", "0"],
        )
        .await
        .expect("memory usage");
    value.unwrap_or(0)
}

/// Total bytes of one partition key over every partition.
async fn partition_bytes(redis: &Client, suffix: &str) -> u64 {
    let mut total = 0;
    for partition in 0..PARTITIONS {
        total += usage(redis, &format!("inv:{{{partition}}}:{suffix}")).await;
    }
    total
}

/// Fields (`HLEN`) or entries (`XLEN`) of one partition key over every partition.
async fn count(redis: &Client, command: &str, suffix: &str) -> u64 {
    let mut total = 0;
    for partition in 0..PARTITIONS {
        let name = format!("inv:{{{partition}}}:{suffix}");
        let n: u64 = match command {
            "HLEN" => redis.hlen(&name).await.expect("hlen"),
            _ => redis.xlen(&name).await.expect("xlen"),
        };
        total += n;
    }
    total
}

async fn used_memory(redis: &Client) -> u64 {
    let info: String = redis
        .info(Some(fred::types::InfoKind::Memory))
        .await
        .expect("info");
    info.lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// Calls per second and p99 (ms) of `call` over `seconds`, 64 at a time.
async fn rate<F, Fut>(seconds: u64, call: F) -> (f64, f64)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|task| {
            let call = Arc::clone(&call);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = task;
                while Instant::now() < deadline {
                    let began = Instant::now();
                    call(n).await;
                    latencies.push(began.elapsed());
                    n += CONCURRENCY;
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("caller"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let p99 = latencies
        .get(latencies.len() * 99 / 100)
        .map_or(0.0, |latency| latency.as_secs_f64() * 1000.0);
    (latencies.len() as f64 / elapsed, p99)
}

/// A random key among the first `keys` (a multiplicative hash of `n`).
fn spread(n: u64, keys: u64) -> StockKey {
    key(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys)
}

fn main() {
    let sample: u64 = env_or("CAPACITY_SAMPLE", 20_000);
    let seconds: u64 = env_or("CAPACITY_SECONDS", 5);
    let scales: Vec<u64> = std::env::var("CAPACITY_SCALES")
        .unwrap_or_else(|_| "10000,100000,1000000".to_owned())
        .split(',')
        .filter_map(|scale| scale.trim().parse().ok())
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let port = testkit::free_port();
    let _redis = testkit::private_redis(port, None);
    let url = format!("redis://127.0.0.1:{port}");
    let report = runtime.block_on(async move {
        let allocator = Arc::new(
            Allocator::connect(&url, settings(), 8)
                .await
                .expect("connect"),
        );
        let redis = Builder::from_config(fred::types::config::Config::from_url(&url).expect("url"))
            .build()
            .expect("client");
        redis.init().await.expect("connect");

        // 1. Bytes per thing.
        let empty = used_memory(&redis).await;
        create(&allocator, 0..sample).await;
        let cells = count(&redis, "HLEN", "cells").await;
        let cells_bytes = partition_bytes(&redis, "cells").await;
        let index_bytes = usage(&redis, &allocator::keys::locations_key(MERCHANT, "sku-0")).await;
        // A SKU stocked in 40 locations: its location index.
        for location in 0..40 {
            let wide = StockKey::new(MERCHANT, "sku-wide", format!("loc-{location:02}"));
            let adjustment = restock(&wide, 10, format!("wide-{location}"));
            allocator.adjust(&adjustment).await.expect("a wide sku");
        }
        let wide_index_bytes =
            usage(&redis, &allocator::keys::locations_key(MERCHANT, "sku-wide")).await;
        let entries_after_create = count(&redis, "XLEN", "ledger").await;
        let ledger_after_create = partition_bytes(&redis, "ledger").await;
        let idem_before = partition_bytes(&redis, "idem").await;
        let idem_records_before = count(&redis, "HLEN", "idem").await;
        let holds_before = (
            partition_bytes(&redis, "res").await,
            partition_bytes(&redis, "due").await + partition_bytes(&redis, "duecell").await,
        );
        {
            let allocator = Arc::clone(&allocator);
            for_each(0..sample, move |n| {
                let allocator = Arc::clone(&allocator);
                async move { reserve(&allocator, key(n)).await }
            })
            .await;
        }
        let holds = count(&redis, "HLEN", "res").await;
        let idem_records = count(&redis, "HLEN", "idem").await - idem_records_before;
        let res_bytes = partition_bytes(&redis, "res").await - holds_before.0;
        let due_bytes = partition_bytes(&redis, "due").await
            + partition_bytes(&redis, "duecell").await
            - holds_before.1;
        let idem_bytes = partition_bytes(&redis, "idem").await - idem_before;
        let entries = count(&redis, "XLEN", "ledger").await;
        let ledger_bytes = partition_bytes(&redis, "ledger").await;
        let per = |bytes: u64, things: u64| (bytes as f64 / things.max(1) as f64).round();
        let bytes = json!({
            "sample_keys": sample,
            "cell": per(cells_bytes, cells),
            "location_index_of_a_one_location_sku": index_bytes,
            "location_index_of_a_40_location_sku": wide_index_bytes,
            "hold_record": per(res_bytes, holds),
            "hold_due_indexes": per(due_bytes, holds),
            "idempotency_record": per(idem_bytes, idem_records),
            "ledger_stream_entry": per(ledger_bytes, entries),
            "ledger_stream_entry_after_create_only": per(ledger_after_create, entries_after_create),
            "used_memory_per_key_with_one_hold": per(used_memory(&redis).await - empty, sample),
            "counts": { "cells": cells, "holds": holds, "idempotency_records": idem_records, "ledger_entries": entries },
        });
        println!("bytes: {bytes:#}");

        // 2. Catalogue size. The ledger streams keep what is appended (no
        // writer here): trimmed between sizes so memory is the catalogue's.
        let mut scaling = Vec::new();
        let mut created = sample;
        for &scale in &scales {
            if scale > created {
                create(&allocator, created..scale).await;
                created = scale;
            }
            for partition in 0..PARTITIONS {
                let _: u64 = redis
                    .xtrim(format!("inv:{{{partition}}}:ledger"), ("MAXLEN", "=", 0))
                    .await
                    .expect("trim");
            }
            let reserving = {
                let allocator = Arc::clone(&allocator);
                rate(seconds, move |n| {
                    let allocator = Arc::clone(&allocator);
                    async move { reserve(&allocator, spread(n, scale)).await }
                })
                .await
            };
            let reading = {
                let allocator = Arc::clone(&allocator);
                rate(seconds, move |n| {
                    let allocator = Arc::clone(&allocator);
                    async move {
                        allocator
                            .stock_views(&[spread(n + 7, scale)])
                            .await
                            .expect("read");
                    }
                })
                .await
            };
            let row = json!({
                "keys": scale,
                "reservations_per_second": reserving.0.round(), "reservation_p99_ms": (reserving.1 * 100.0).round() / 100.0,
                "reads_per_second": reading.0.round(), "read_p99_ms": (reading.1 * 100.0).round() / 100.0,
                "used_memory_bytes": used_memory(&redis).await,
            });
            println!("scale: {row}");
            scaling.push(row);
        }
        json!({ "bytes": bytes, "scaling": scaling, "concurrency": CONCURRENCY, "seconds": seconds })
    });
    if let Ok(path) = std::env::var("CAPACITY_OUT") {
        std::fs::write(&path, format!("{report:#}\n")).expect("write the figures");
    }
}
