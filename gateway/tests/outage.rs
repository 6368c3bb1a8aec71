//! Redis gone mid-run: reservations fail closed with 503 and change nothing,
//! reads serve the cached value marked stale, /ready says not ready, and the
//! node recovers by itself when Redis returns. A node started before Redis
//! answers listens at once, says what it waits for, and serves once it can.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_redis_answers_waits_says_why_and_serves_once_it_can() {
    testkit::stack();
    let port = free_port();
    let fleet = Fleet::new(&format!("redis://127.0.0.1:{port}"), "");
    // Nothing listens on Redis' port yet: the node listens anyway.
    let node = fleet.start_node("node-a");
    // Its first try takes up to a second to fail.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reason = loop {
        let (status, ready) = get(&node.url("/ready"), None).await;
        assert_eq!(status, 503, "{ready}");
        let reason = ready["reason"].as_str().unwrap_or_default().to_owned();
        if reason.starts_with("waiting for Redis: ") || Instant::now() > deadline {
            break reason;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        reason.starts_with("waiting for Redis: ") && reason.len() > "waiting for Redis: ".len(),
        "the reason names Redis and its cause: {reason}"
    );
    eprintln!("/ready while nothing listens: {reason}");
    assert_eq!(get(&node.url("/health"), None).await.0, 200);
    let sku = testkit::unique_id("startup");
    let read = node.url(&format!("/v1/availability/m1/{sku}"));
    let refused = client()
        .get(&read)
        .bearer_auth(READ)
        .send()
        .await
        .expect("send");
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok()),
        Some("1")
    );
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(body["error"], "store_unavailable", "{body}");
    // Proxied paths too: a node that is not ready takes no traffic.
    assert_eq!(get(&node.url("/catalog"), None).await.0, 503);

    // Redis opens its port, still loading a large dataset (LOADING).
    let data = tempfile::tempdir().expect("redis dir");
    let _redis = testkit::loading_redis(port, data.path(), Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    let reason = loop {
        let (status, ready) = get(&node.url("/ready"), None).await;
        let reason = ready["reason"].as_str().unwrap_or_default().to_owned();
        assert_eq!(status, 503, "Redis is still loading: {ready}");
        if reason.contains("LOADING") || Instant::now() > deadline {
            break reason;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        reason.contains("LOADING"),
        "the reason says Redis is loading: {reason}"
    );
    eprintln!("/ready while Redis loads: {reason}");
    // Ops edit the config while the node waits: it starts with the edit.
    // Two edits, the second of another section: the node starts with both.
    fleet.write_config(&fleet.config_text().replace(
        "reservation_ttl_seconds_default = 600",
        "reservation_ttl_seconds_default = 77",
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = fleet.config_text();
    let (before, after) = text
        .split_once("cache_control_max_age_seconds = ")
        .expect("the cache's max-age");
    let rest = after.split_once('\n').map_or("", |(_, rest)| rest);
    fleet.write_config(&format!(
        "{before}cache_control_max_age_seconds = 3\n{rest}"
    ));

    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&node.url("/ready"), None).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready: {}",
            log_tail(&node.log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    restock(&node, "m1", &sku, "dc1", 6).await;
    assert_eq!(available(&node, "m1", &sku).await, 6);
    let (status, held) = post(
        &node.url("/v1/reservations"),
        CHECKOUT,
        Some(&testkit::unique_id("startup-hold")),
        &reservation("m1", &sku, "dc1", 1),
    )
    .await;
    assert_eq!(status, 201, "{held}");
    let expires = time::OffsetDateTime::parse(
        held["expires_at"].as_str().expect("expires_at"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");
    let lifetime = (expires - time::OffsetDateTime::now_utc()).whole_seconds();
    assert!(
        (60..=80).contains(&lifetime),
        "the hold has the default edited while the node waited (77 s), not {lifetime} s"
    );
    let log = std::fs::read_to_string(&node.log).unwrap_or_default();
    assert!(
        log.lines()
            .any(|line| line.contains("waiting for a dependency to answer")
                && line.contains("\"Redis\"")),
        "each wait is logged with its cause:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_id_into_the_stock_stores_errors() {
    testkit::stack();
    let port = free_port();
    let redis = testkit::private_redis(port, None);
    let fleet = Fleet::new(
        &format!("redis://127.0.0.1:{port}"),
        "\n[log]\nformat = \"json\"\n",
    );
    let node = fleet.node("node-a");
    let sku = testkit::unique_id("logged");
    restock(&node, "m1", &sku, "dc1", 10).await;
    drop(redis); // killed: the next reservation logs why it failed

    let run = testkit::unique_id("run");
    let traced = format!("trace-{run}");
    let url = node.url("/v1/reservations");
    let send = |request_id: Option<&str>, key: String| {
        let mut request = client()
            .post(&url)
            .bearer_auth(CHECKOUT)
            .header("Idempotency-Key", key)
            .json(&reservation("m1", &sku, "dc1", 1));
        if let Some(id) = request_id {
            request = request.header("X-Request-Id", id);
        }
        request.send()
    };
    let answered = send(Some(&traced), format!("{run}-1")).await.expect("send");
    assert_eq!(answered.status().as_u16(), 503);
    // An id that is not an API id is not taken: the node makes one.
    let answered = send(Some("not an id"), format!("{run}-2"))
        .await
        .expect("send");
    assert_eq!(answered.status().as_u16(), 503);

    let mut request_ids = Vec::new();
    wait_until("both failures are logged", || {
        let text = std::fs::read_to_string(&node.log).unwrap_or_default();
        let mut lines = Vec::new();
        // Whole lines only: the last may be half written while we read.
        for line in text
            .split_inclusive('\n')
            .filter(|line| line.ends_with('\n') && !line.trim().is_empty())
        {
            let parsed: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("a JSON line ({error}): {line}"));
            lines.push(parsed);
        }
        request_ids = lines
            .iter()
            .filter(|line| line["message"] == "redis unavailable")
            .filter_map(|line| {
                line["spans"]
                    .as_array()?
                    .iter()
                    .find(|span| span["name"] == "request")?["request_id"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        let found = request_ids.len() >= 2;
        async move { found }
    })
    .await;
    assert_eq!(request_ids[0], traced, "the client's id: {request_ids:?}");
    assert!(
        request_ids[1].starts_with("node-a-") && request_ids[1] != traced,
        "one made by the node: {request_ids:?}"
    );
}
