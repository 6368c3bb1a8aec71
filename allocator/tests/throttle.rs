//! The checkout throttle of a flash sale, on the stack's Redis: two nodes
//! hammering one key together are admitted at most the fleet's budget
//! (counted, not timed: over a run that starts with a full bucket, at most
//! `budget × seconds + burst`), and at least its burst.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use allocator::{AllocatorError, Reserver, StockKey};

/// Two reservers ("nodes") with the same throttle in force on `key`.
async fn fleet(sale: &str, key: &StockKey, per_second: u32) -> Vec<Arc<Reserver>> {
    let mut nodes = Vec::new();
    for node in ["node-a", "node-b"] {
        let reserver = common::reserver(common::allocator_for(node).await);
        reserver.set_throttles(&[(sale.to_owned(), key.clone(), per_second)]);
        nodes.push(Arc::new(reserver));
    }
    nodes
}

/// Every node's `callers` try to reserve one unit of `key`, over and over,
/// for `run`: (admitted, refused, seconds from the first attempt to the
/// last answer).
async fn hammer(
    nodes: &[Arc<Reserver>],
    key: &StockKey,
    callers: usize,
    run: Duration,
) -> (u64, u64, f64) {
    let run_id = testkit::unique_id("t");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        for caller in 0..callers {
            let (node, key, run_id) = (Arc::clone(node), key.clone(), run_id.clone());
            tasks.push(tokio::spawn(async move {
                let (mut admitted, mut refused) = (0u64, 0u64);
                let mut attempt = 0;
                while started.elapsed() < run {
                    attempt += 1;
                    let request =
                        common::reserve(&key, 1, &format!("{run_id}-{index}-{caller}-{attempt}"));
                    match node.reserve(&request.as_cart()).await {
                        Ok(_) => admitted += 1,
                        Err(AllocatorError::RateLimited {
                            retry_after,
                            reason,
                        }) => {
                            assert!(
                                retry_after > Duration::ZERO
                                    && retry_after <= Duration::from_secs(1),
                                "{retry_after:?}"
                            );
                            assert!(reason.contains(&key.to_string()), "{reason}");
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        Err(error) => panic!("attempt {attempt}: {error}"),
                    }
                }
                (admitted, refused)
            }));
        }
    }
    let (mut admitted, mut refused) = (0, 0);
    for task in tasks {
        let (a, r) = task.await.expect("caller");
        admitted += a;
        refused += r;
    }
    (admitted, refused, started.elapsed().as_secs_f64())
}

async fn within_budget(per_second: u32, callers: usize) {
    let sale = testkit::unique_id("throttled");
    let key = StockKey::new("m-throttle", testkit::unique_id("sku"), "dc1");
    let nodes = fleet(&sale, &key, per_second).await;
    common::stock(nodes[0].allocator(), &key, 100_000).await;
    let (admitted, refused, seconds) =
        hammer(&nodes, &key, callers, Duration::from_millis(2_500)).await;
    let budget = f64::from(per_second);
    // Redis times are whole ms: 2 ms of slack on the refill.
    let most = (budget * (seconds + 0.002)).floor() as u64 + u64::from(per_second);
    assert!(
        admitted <= most,
        "{admitted} admitted in {seconds:.3} s at {per_second}/s (at most {most})"
    );
    assert!(
        admitted >= u64::from(per_second),
        "the burst at least: {admitted} admitted in {seconds:.3} s"
    );
    assert!(refused > 0, "the callers went past the budget");
    let throttles: u64 = nodes
        .iter()
        .flat_map(|node| node.throttles())
        .map(|throttle| throttle.refused())
        .sum();
    assert_eq!(throttles, refused, "every refusal is counted");
    let held = nodes[0]
        .allocator()
        .stock_view(&key)
        .await
        .expect("view")
        .pool
        .expect("pool")
        .reserved;
    assert_eq!(
        held as u64, admitted,
        "every admitted attempt holds; no refused one does"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_get_at_most_a_small_budget_between_them() {
    within_budget(20, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_taking_tokens_in_chunks_get_at_most_the_budget() {
    // 100/s: chunks of up to 2 tokens.
    within_budget(100, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_a_throttle_and_a_throttle_removed_admit_everything() {
    let sale = testkit::unique_id("throttled");
    let key = StockKey::new("m-throttle", testkit::unique_id("sku"), "dc1");
    let other = StockKey::new("m-throttle", testkit::unique_id("sku"), "dc1");
    let nodes = fleet(&sale, &key, 1).await;
    common::stock(nodes[0].allocator(), &key, 100).await;
    common::stock(nodes[0].allocator(), &other, 100).await;
    let node = &nodes[0];
    let attempt = |key: &StockKey, id: &str| {
        let request = common::reserve(key, 1, id).as_cart();
        async move { node.reserve(&request).await }
    };
    let run = testkit::unique_id("run");
    attempt(&key, &format!("{run}-1"))
        .await
        .expect("the burst of 1");
    // At 1 a second, five quick attempts more are not all let through.
    let mut refused = 0;
    for index in 0..5 {
        match attempt(&key, &format!("{run}-more-{index}")).await {
            Err(AllocatorError::RateLimited { .. }) => refused += 1,
            Ok(_) => {}
            Err(error) => panic!("{error}"),
        }
    }
    assert!(refused > 0, "1 a second let 6 attempts through");
    for index in 0..10 {
        attempt(&other, &format!("{run}-other-{index}"))
            .await
            .expect("not throttled");
    }
    node.set_throttles(&[]);
    for index in 0..10 {
        attempt(&key, &format!("{run}-after-{index}"))
            .await
            .expect("throttle removed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_kept_across_a_reload_keeps_its_tokens_and_a_changed_one_is_new() {
    let key = StockKey::new("m-throttle", testkit::unique_id("sku"), "dc1");
    let nodes = fleet("kept", &key, 10).await;
    let node = &nodes[0];
    let before = node.throttles().pop().expect("in force");
    node.set_throttles(&[("kept".to_owned(), key.clone(), 10)]);
    let same = node.throttles().pop().expect("in force");
    assert!(Arc::ptr_eq(&before, &same), "unchanged: the same throttle");
    node.set_throttles(&[("kept".to_owned(), key.clone(), 20)]);
    let changed = node.throttles().pop().expect("in force");
    assert!(!Arc::ptr_eq(&before, &changed));
    assert_eq!(changed.per_second(), 20);
    node.set_throttles(&[("renamed".to_owned(), key.clone(), 20)]);
    let renamed = node.throttles().pop().expect("in force");
    assert!(!Arc::ptr_eq(&changed, &renamed));
    assert_eq!(renamed.sale(), "renamed");
}

/// Redis time that stepped back (a failover to a replica whose clock is
/// behind) leaves the bucket's last time ahead of the clock: the bucket
/// refills from the new time on, it does not refuse until the clock
/// catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_whose_time_is_ahead_of_the_clock_refills_from_the_clock() {
    use fred::prelude::*;
    let sale = testkit::unique_id("stepped");
    let key = StockKey::new("m-throttle", testkit::unique_id("sku"), "dc1");
    let nodes = fleet(&sale, &key, 20).await;
    common::stock(nodes[0].allocator(), &key, 100).await;
    // The bucket as a clock a minute ahead left it: empty.
    let redis = common::raw_redis().await;
    // Redis runs on this machine: its clock is this one.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    let hash = allocator::keys::partition_keys(key.partition(common::PARTITIONS))[3].clone();
    let _: i64 = redis
        .hset(
            &hash,
            (
                format!("t|{sale}"),
                format!("{{\"tokens\":0,\"at_ms\":{}}}", now_ms + 60_000),
            ),
        )
        .await
        .expect("set the bucket");
    // At 20 a second, a chunk is there within a second or so: the
    // attempts are let through again well before the minute is over.
    let started = Instant::now();
    let run = testkit::unique_id("run");
    let mut attempt = 0;
    loop {
        attempt += 1;
        let request = common::reserve(&key, 1, &format!("{run}-{attempt}")).as_cart();
        match nodes[0].reserve(&request).await {
            Ok(_) => break,
            Err(AllocatorError::RateLimited { .. }) => {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "still refused after {:?}: the bucket waits for the clock",
                    started.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("{error}"),
        }
    }
}
