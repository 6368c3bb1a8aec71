//! Reserve throughput against the stack's Redis: one `reserve` per script
//! call, and `reserve_batch` with 8 and 32 reservations per call, measured by
//! criterion; then the baseline, `redis-benchmark` running EVALSHA of a
//! trivial script on the same Redis with the same one connection, and the
//! ratios of reservations per second to baseline calls per second.
//!
//! Run: `eval "$(scripts/stack env)"; cargo bench -p allocator --bench reserve`.
//! Figures, not assertions: this never fails on a timing.

use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use allocator::{
    Adjustment, AdjustmentKind, Allocator, AllocatorSettings, HoldRequest, ReserveRequest, StockKey,
};
use criterion::{Criterion, Throughput};

const PARTITIONS: u32 = 64;

/// (label, reservations per call, total reservations, total time) per bench.
static MEASURED: Mutex<Vec<(String, u64, u64, Duration)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

fn request(key: &StockKey) -> ReserveRequest {
    ReserveRequest {
        key: key.clone(),
        qty: 1,
        ttl: Some(Duration::from_secs(600)),
        idempotency_key: format!("bench-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        customer_ref: None,
    }
}

fn hold(key: &StockKey, cell: &allocator::CellRef) -> HoldRequest {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut random = [0u8; 12];
    random[..8].copy_from_slice(&n.to_be_bytes());
    random[8..].copy_from_slice(&std::process::id().to_be_bytes());
    HoldRequest {
        key: key.clone(),
        qty: 1,
        ttl_ms: 600_000,
        grace_ms: 0,
        reservation_id: allocator::keys::reservation_id(cell.partition, random),
        customer_hash: None,
        cart_id: None,
        hold_by_ms: None,
    }
}

fn record(label: &str, per_call: u64, reservations: u64, elapsed: Duration) {
    let mut measured = MEASURED.lock().expect("lock");
    match measured.iter_mut().find(|(name, ..)| name == label) {
        Some(entry) => {
            entry.2 += reservations;
            entry.3 += elapsed;
        }
        None => measured.push((label.to_owned(), per_call, reservations, elapsed)),
    }
}

fn benches(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    allocator: &Allocator,
    key: &StockKey,
) {
    let mut group = c.benchmark_group("reserve");
    group.throughput(Throughput::Elements(1));
    group.bench_function("single", |b| {
        b.iter_custom(|iterations| {
            let start = Instant::now();
            runtime.block_on(async {
                for _ in 0..iterations {
                    allocator.reserve(&request(key)).await.expect("reserve");
                }
            });
            let elapsed = start.elapsed();
            record("reserve (1 per call)", 1, iterations, elapsed);
            elapsed
        })
    });
    for size in [8u64, 32] {
        group.throughput(Throughput::Elements(size));
        let cell = key.pool(PARTITIONS);
        group.bench_function(format!("batch_{size}"), |b| {
            b.iter_custom(|iterations| {
                let start = Instant::now();
                runtime.block_on(async {
                    for _ in 0..iterations {
                        // Claimed holds (the claim is one more call per
                        // request, measured by `single`).
                        let requests: Vec<_> = (0..size).map(|_| hold(key, &cell)).collect();
                        let answers = allocator.hold_batch(&cell, &requests).await.expect("batch");
                        assert!(answers.iter().all(Result::is_ok));
                    }
                });
                let elapsed = start.elapsed();
                record(
                    &format!("reserve_batch ({size} per call)"),
                    size,
                    iterations * size,
                    elapsed,
                );
                elapsed
            })
        });
    }
    group.finish();
}

/// EVALSHA of `return 1` per second, one connection, from redis-benchmark.
fn baseline(redis_url: &str, sha: &str) -> Option<f64> {
    let address = redis_url.trim_start_matches("redis://");
    let (host, port) = address.split_once(':')?;
    let port = port.split('/').next()?;
    let output = Command::new("redis-benchmark")
        .args([
            "-h", host, "-p", port, "-c", "1", "-n", "20000", "--csv", "evalsha", sha, "0",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|line| line.to_lowercase().starts_with("\"evalsha"))?;
    line.split(',').nth(1)?.trim_matches('"').parse().ok()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stack = testkit::stack();
    let settings = AllocatorSettings {
        node: "bench".to_owned(),
        partitions: PARTITIONS,
        command_timeout: Duration::from_secs(5),
        ttl_default: Duration::from_secs(600),
        ttl_max: Duration::from_secs(3600),
        customer_ref_key: "bench-customer-ref-key".to_owned(),
        cart_line_grace: Duration::from_secs(30),
    };
    let allocator = runtime
        .block_on(Allocator::connect(&stack.redis_url, settings, 1))
        .expect("connect");
    let key = StockKey::new(testkit::unique_id("bench"), "sku", "dc1");
    runtime
        .block_on(allocator.adjust(&Adjustment {
            merchant: key.merchant.clone(),
            sku: key.sku.clone(),
            location: key.location.clone(),
            kind: AdjustmentKind::Absolute,
            qty: 1_000_000_000,
            source: "bench".to_owned(),
            event_id: "stock".to_owned(),
            source_seq: Some(1),
        }))
        .expect("stock");

    let mut criterion = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    benches(&mut criterion, &runtime, &allocator, &key);
    criterion.final_summary();

    let trivial = fred::types::scripts::Script::from_lua("return 1");
    let client = {
        use fred::prelude::*;
        let config = fred::types::config::Config::from_url(&stack.redis_url).expect("url");
        let client = Builder::from_config(config).build().expect("client");
        runtime.block_on(client.init()).expect("connect");
        client
    };
    runtime
        .block_on(trivial.load(&client))
        .expect("load trivial script");
    let Some(baseline_per_second) = baseline(&stack.redis_url, trivial.sha1()) else {
        println!("baseline: redis-benchmark unavailable or unparsable; no ratios");
        return;
    };
    println!(
        "\nbaseline: redis-benchmark EVALSHA `return 1`, 1 connection: {baseline_per_second:.0} calls/s"
    );
    println!(
        "{:<28} {:>16} {:>22}",
        "variant", "reservations/s", "ratio to baseline"
    );
    for (label, _, reservations, elapsed) in MEASURED.lock().expect("lock").iter() {
        let per_second = *reservations as f64 / elapsed.as_secs_f64();
        println!(
            "{label:<28} {per_second:>16.0} {:>22.2}",
            per_second / baseline_per_second
        );
    }
}
