//! Redis gone mid-run: reservations fail closed with 503 and change nothing,
//! reads serve the cached value marked stale, /ready says not ready, and the
//! node recovers by itself when Redis returns.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_serves_stale_reads_and_recovers_without_a_restart() {
    testkit::stack();
    let data = tempfile::tempdir().expect("redis dir");
    let port = free_port();
    let redis = testkit::private_redis(port, Some(data.path()));
    let fleet = Fleet::new(&format!("redis://127.0.0.1:{port}"), "");
    let node = fleet.node("node-a");
    let sku = testkit::unique_id("outage");
    restock(&node, "m1", &sku, "dc1", 10).await;
    let url = node.url("/v1/reservations");
    let run = testkit::unique_id("run");
    let (status, _) = post(
        &url,
        CHECKOUT,
        Some(&format!("{run}-1")),
        &reservation("m1", &sku, "dc1", 2),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(available(&node, "m1", &sku).await, 8, "cached now");

    drop(redis); // killed

    let response = client()
        .post(&url)
        .bearer_auth(CHECKOUT)
        .header("Idempotency-Key", format!("{run}-2"))
        .json(&reservation("m1", &sku, "dc1", 1))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"], "store_unavailable");

    let (status, stale) = get(
        &node.url(&format!("/v1/availability/m1/{sku}")),
        Some(PLATFORM),
    )
    .await;
    assert_eq!(
        (
            status,
            stale["stale"].as_bool(),
            stale["available"].as_i64()
        ),
        (200, Some(true), Some(8))
    );
    assert_eq!(get(&node.url("/ready"), None).await.0, 503);
    assert_eq!(get(&node.url("/health"), None).await.0, 200);

    // Redis returns with its data (append-only file): the node recovers.
    let _redis = testkit::private_redis(port, Some(data.path()));
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(&node.url("/ready"), None).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready again: {}",
            log_tail(&node.log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, fresh) = get(
        &node.url(&format!("/v1/availability/m1/{sku}")),
        Some(PLATFORM),
    )
    .await;
    assert_eq!(
        (
            status,
            fresh["stale"].as_bool(),
            fresh["available"].as_i64()
        ),
        (200, Some(false), Some(8)),
        "nothing changed while down"
    );
    let (status, body) = post(
        &url,
        CHECKOUT,
        Some(&format!("{run}-3")),
        &reservation("m1", &sku, "dc1", 1),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}
