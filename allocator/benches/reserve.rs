//! The stock engine's hold throughput against the stack's Redis, one
//! connection: `hold_batch` (the batched call coalescing makes) with k = 1,
//! 8, 32 and 128 holds per call, and a whole one-line request (claim, then
//! hold). Each is measured by criterion right after the baseline it is
//! compared with: EVALSHA of `return 1` through the same kind of client and
//! connection (the cost of one script round trip), so the machine's noise
//! hits both alike. Then the same baseline from `redis-benchmark` on one
//! connection (no client cost of ours: on this machine our client's round
//! trip costs several times its). Prints reservations/s, the ratios, and
//! p50/p99 per call, and Redis's own time in FCALL per hold (from `INFO
//! commandstats` around each variant: what the scripts cost, without the
//! client's or the network's share); with `BENCH_ENGINE_OUT` set, writes
//! them there as JSON for `scripts/bench`'s report.
//!
//! Run: `eval "$(scripts/stack env)"; cargo bench -p allocator --bench reserve`.
//! Figures, not assertions: this never fails on a timing.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use allocator::{
    Adjustment, AdjustmentKind, Allocator, AllocatorSettings, HoldRequest, ReserveRequest, StockKey,
};
use criterion::{Criterion, Throughput};
use fred::prelude::*;

const PARTITIONS: u32 = 64;
const BATCH_SIZES: [u64; 4] = [1, 8, 32, 128];

/// One measured variant: holds per call, and every call's duration.
#[derive(Default)]
struct Measured {
    per_call: u64,
    calls: Vec<Duration>,
}

/// By label, in the order measured.
static MEASURED: Mutex<Vec<(String, Measured)>> = Mutex::new(Vec::new());
/// By label: Redis's own time in FCALL (`INFO commandstats`) over the
/// variant's calls, warm-up included, and how many FCALLs it counted.
static REDIS_TIME: Mutex<Vec<(String, (u64, u64))>> = Mutex::new(Vec::new());
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
        allowance_partition: None,
    }
}

fn record(label: &str, per_call: u64, calls: Vec<Duration>) {
    let mut measured = MEASURED.lock().expect("lock");
    match measured.iter_mut().find(|(name, _)| name == label) {
        Some((_, entry)) => entry.calls.extend(calls),
        None => measured.push((label.to_owned(), Measured { per_call, calls })),
    }
}

/// FCALLs Redis has run, and the microseconds it spent in them, from
/// `INFO commandstats`.
fn fcall_stats(runtime: &tokio::runtime::Runtime, client: &Client) -> (u64, u64) {
    let info: String = runtime
        .block_on(client.info(Some(fred::types::InfoKind::CommandStats)))
        .expect("INFO commandstats");
    let field = |line: &str, name: &str| -> u64 {
        line.split([':', ','])
            .find_map(|part| part.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(0)
    };
    info.lines()
        .find(|line| line.starts_with("cmdstat_fcall:"))
        .map_or((0, 0), |line| (field(line, "calls"), field(line, "usec")))
}

/// Runs `bench`, recording the FCALLs Redis ran meanwhile, and its time in
/// them, under `label`.
fn with_redis_time(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    label: &str,
    bench: impl FnOnce(),
) {
    let (calls_before, usec_before) = fcall_stats(runtime, client);
    bench();
    let (calls_after, usec_after) = fcall_stats(runtime, client);
    REDIS_TIME.lock().expect("lock").push((
        label.to_owned(),
        (calls_after - calls_before, usec_after - usec_before),
    ));
}

/// Times `iterations` runs of `call`, keeping each one's duration.
fn timed<F, Fut>(runtime: &tokio::runtime::Runtime, iterations: u64, mut call: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    runtime.block_on(async {
        let mut calls = Vec::with_capacity(iterations as usize);
        for _ in 0..iterations {
            let started = Instant::now();
            call().await;
            calls.push(started.elapsed());
        }
        calls
    })
}

fn benches(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    allocator: &Allocator,
    baseline: &(Client, String),
    key: &StockKey,
) {
    let mut group = c.benchmark_group("hold");
    let cell = key.pool(PARTITIONS);
    let (client, sha) = baseline;
    let baseline_before = |group: &mut criterion::BenchmarkGroup<_>, label: String| {
        group.throughput(Throughput::Elements(1));
        group.bench_function(&label, |b| {
            b.iter_custom(|iterations| {
                let calls = timed(runtime, iterations, || async {
                    let _: i64 = client
                        .evalsha(sha.as_str(), Vec::<String>::new(), Vec::<String>::new())
                        .await
                        .expect("evalsha");
                });
                let elapsed = calls.iter().sum();
                record(&label, 1, calls);
                elapsed
            })
        });
    };
    for size in BATCH_SIZES {
        baseline_before(&mut group, format!("evalsha_return_1_before_k{size}"));
        group.throughput(Throughput::Elements(size));
        let label = format!("hold_batch_k{size}");
        with_redis_time(runtime, client, &label, || {
            group.bench_function(&label, |b| {
                b.iter_custom(|iterations| {
                    let calls = timed(runtime, iterations, || async {
                        let requests: Vec<_> = (0..size).map(|_| hold(key, &cell)).collect();
                        let answers = allocator.hold_batch(&cell, &requests).await.expect("batch");
                        assert!(answers.iter().all(Result::is_ok));
                    });
                    let elapsed = calls.iter().sum();
                    record(&label, size, calls);
                    elapsed
                })
            });
        });
    }
    baseline_before(&mut group, "evalsha_return_1_before_request".to_owned());
    group.throughput(Throughput::Elements(1));
    with_redis_time(runtime, client, "request_claim_and_hold", || {
        group.bench_function("request_claim_and_hold", |b| {
            b.iter_custom(|iterations| {
                let calls = timed(runtime, iterations, || async {
                    allocator
                        .reserve_cart(&request(key).as_cart())
                        .await
                        .expect("reserve");
                });
                let elapsed = calls.iter().sum();
                record("request_claim_and_hold", 1, calls);
                elapsed
            })
        });
    });
    group.finish();
}

/// EVALSHA of `return 1` per second from `redis-benchmark` on one
/// connection: the same baseline without our client's cost per call.
fn redis_benchmark(redis_url: &str, sha: &str) -> Option<f64> {
    let address = redis_url.trim_start_matches("redis://");
    let (host, port) = address.split_once(':')?;
    let port = port.split('/').next()?;
    let output = std::process::Command::new("redis-benchmark")
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

fn percentile(sorted: &[Duration], share: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * share).round() as usize]
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

    let baseline = {
        let config = fred::types::config::Config::from_url(&stack.redis_url).expect("url");
        let client = Builder::from_config(config).build().expect("client");
        runtime.block_on(client.init()).expect("connect");
        let sha: String = runtime
            .block_on(client.script_load("return 1"))
            .expect("load the trivial script");
        (client, sha)
    };

    let mut criterion = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    benches(&mut criterion, &runtime, &allocator, &baseline, &key);
    criterion.final_summary();

    let tool_baseline = redis_benchmark(&stack.redis_url, &baseline.1);
    if let Some(calls) = tool_baseline {
        println!("\nredis-benchmark EVALSHA `return 1`, 1 connection: {calls:.0} calls/s");
    }
    let measured = MEASURED.lock().expect("lock");
    let redis_time = REDIS_TIME.lock().expect("lock");
    let mut rows = Vec::new();
    let mut baseline_per_second = 0.0;
    println!(
        "\n{:<26} {:>15} {:>14} {:>9} {:>11} {:>11} {:>14}",
        "variant", "reservations/s", "baseline/s", "ratio", "p50/call", "p99/call", "redis µs/hold"
    );
    for (label, entry) in measured.iter() {
        let total: Duration = entry.calls.iter().sum();
        let per_second =
            (entry.calls.len() as u64 * entry.per_call) as f64 / total.as_secs_f64().max(1e-9);
        if label.starts_with("evalsha_return_1") {
            baseline_per_second = per_second;
            continue;
        }
        let mut sorted = entry.calls.clone();
        sorted.sort();
        let (p50, p99) = (percentile(&sorted, 0.5), percentile(&sorted, 0.99));
        let ratio = per_second / baseline_per_second.max(1e-9);
        // Redis's time in FCALL over every call of the variant, per hold
        // (per request for the whole one-line request), and FCALLs per call.
        let (fcalls, usec) = redis_time
            .iter()
            .find(|(name, _)| name == label)
            .map_or((0, 0), |(_, time)| *time);
        let holds = entry.calls.len() as u64 * entry.per_call;
        let redis_us_per_hold = (holds > 0 && fcalls > 0).then(|| usec as f64 / holds as f64);
        let fcalls_per_call =
            (!entry.calls.is_empty()).then(|| fcalls as f64 / entry.calls.len() as f64);
        println!(
            "{label:<26} {per_second:>15.0} {baseline_per_second:>14.0} {ratio:>9.2} {:>9.0}µs {:>9.0}µs {:>14}",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            redis_us_per_hold.map_or("n/a".to_owned(), |us| format!("{us:.1}"))
        );
        rows.push(serde_json::json!({
            "variant": label, "holds_per_call": entry.per_call,
            "reservations_per_second": per_second.round(),
            "baseline_calls_per_second": baseline_per_second.round(),
            "ratio": (ratio * 100.0).round() / 100.0,
            "p50_us_per_call": (p50.as_secs_f64() * 1e6).round(),
            "p99_us_per_call": (p99.as_secs_f64() * 1e6).round(),
            "calls": entry.calls.len(),
            "redis_us_per_hold": redis_us_per_hold.map(|us| (us * 10.0).round() / 10.0),
            "fcalls_per_call": fcalls_per_call.map(|n| (n * 100.0).round() / 100.0),
            "redis_benchmark_calls_per_second": tool_baseline.map(f64::round),
            "ratio_to_redis_benchmark": tool_baseline
                .map(|calls| (per_second / calls * 100.0).round() / 100.0),
        }));
    }
    if let Ok(path) = std::env::var("BENCH_ENGINE_OUT") {
        std::fs::write(&path, serde_json::to_string_pretty(&rows).expect("json"))
            .expect("write the engine figures");
    }
}
