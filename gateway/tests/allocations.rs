//! A cached read allocates nothing of its own: the slot lookup, the view
//! and its reply are reference-counted clones. Counted with dhat's heap
//! profiler, in a test binary of its own (it replaces the allocator).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use gateway::api::Reply;
use gateway::availability::{
    AvailabilityCache, CacheCounters, Loader, LocationAvailability, Rendered, SkuAvailability,
    Source,
};
use http::HeaderValue;

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

fn shelf() -> SkuAvailability {
    SkuAvailability {
        merchant: "m1".to_owned(),
        sku: "tee".to_owned(),
        locations: vec![
            LocationAvailability::on_shelf("dc1", 40, 7),
            LocationAvailability::on_shelf("store-12", 3, 7),
        ],
    }
}

/// A hit's two replies: all locations, and one location whose ETag the
/// client does not have.
fn replies(rendered: &Rendered, cache_control: &HeaderValue) -> (Reply, Reply) {
    let all = rendered
        .view(None)
        .expect("all")
        .reply(None, cache_control.clone());
    let one = rendered
        .view(Some("store-12"))
        .expect("one")
        .reply(Some(b"\"other\""), cache_control.clone());
    (all, one)
}

fn cache() -> AvailabilityCache {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/dev.toml");
    let text = std::fs::read_to_string(path).expect("dev.toml");
    let mut config = config::parse(&text, path, &|_| None).expect("dev config");
    config.cache.availability_ttl_ms = 3_600_000;
    let loader: Loader = Arc::new(|_, _, _| Box::pin(async { Ok(Some(shelf())) }));
    let results = prometheus::IntCounterVec::new(
        prometheus::Opts::new("availability_cache_total", "test"),
        &["result"],
    )
    .expect("counter");
    AvailabilityCache::new(
        &config,
        loader,
        Arc::new(AtomicBool::new(true)),
        CacheCounters {
            results,
            redis_errors: prometheus::IntCounter::new("redis_errors_total", "test")
                .expect("counter"),
        },
    )
}

#[test]
fn a_cache_hit_and_its_reply_allocate_nothing() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let cache = cache();
        let cache_control = HeaderValue::from_static("max-age=1");
        let read = || async {
            let (rendered, source) = cache.get("m1", "tee").await.expect("read");
            let (all, one) = replies(&rendered, &cache_control);
            (source, all.body.len() + one.body.len())
        };
        // The first read fills (and renders); the second is a hit that
        // renders the one-location view on first use.
        assert_eq!(read().await.0, Source::Miss);
        assert_eq!(read().await.0, Source::Hit);
        let hits = 10_000;
        let before = dhat::HeapStats::get();
        for _ in 0..hits {
            let (source, length) = read().await;
            assert_eq!(source, Source::Hit);
            std::hint::black_box(length);
        }
        let allocations = dhat::HeapStats::get().total_blocks - before.total_blocks;
        println!("{allocations} allocations in {hits} cache hits");
        // moka's housekeeping runs when its buffer of recorded reads fills
        // (every few hundred reads) and may allocate then: amortized, not
        // per hit. Anything per hit would show as ≥ 10,000.
        assert!(
            allocations * 100 <= hits,
            "{allocations} allocations in {hits} hits"
        );

        // Our own part, the view and its reply from an entry in hand: none.
        let (rendered, _) = cache.get("m1", "tee").await.expect("read");
        let before = dhat::HeapStats::get();
        for _ in 0..hits {
            std::hint::black_box(replies(&rendered, &cache_control));
        }
        let allocations = dhat::HeapStats::get().total_blocks - before.total_blocks;
        assert_eq!(allocations, 0, "rendering a reply allocated");
    });
}
