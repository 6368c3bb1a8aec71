//! A writer started before its dependencies answer: it listens at once,
//! `/health` is 200 and `/ready` 503 naming what it waits for (and why),
//! it logs each wait, and it relays as soon as they answer.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// `/ready`'s status and reason (`None` while the writer does not answer).
async fn ready(port: u16) -> Option<(u16, String)> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/ready"))
        .await
        .ok()?;
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.ok()?;
    Some((status, body["reason"].as_str().unwrap_or("").to_owned()))
}

/// Polls `/ready` until `wanted` says yes (or panics after `limit`).
async fn wait_ready_until(
    setup: &Setup,
    limit: Duration,
    what: &str,
    wanted: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some((status, reason)) = ready(setup.metrics_port).await
            && wanted(status, &reason)
        {
            return (status, reason);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: /ready never said so; logs:\n{}",
            writer_logs(setup)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_writer_started_while_redis_loads_its_dataset_waits_then_relays() {
    let port = testkit::free_port();
    let redis_url = format!("redis://127.0.0.1:{port}");
    let setup = setup(&redis_url).await;
    let _writer = start_writer(&setup);

    // Nothing listens on Redis' port yet.
    let (_, reason) = wait_ready_until(
        &setup,
        Duration::from_secs(20),
        "no Redis",
        |status, reason| status == 503 && reason.starts_with("waiting for Redis: "),
    )
    .await;
    assert!(
        reason.len() > "waiting for Redis: ".len(),
        "a cause: {reason}"
    );
    let health = reqwest::get(format!("http://127.0.0.1:{}/health", setup.metrics_port))
        .await
        .expect("health");
    assert_eq!(health.status().as_u16(), 200);

    // Redis opens its port but answers LOADING for a few seconds.
    let data = tempfile::tempdir().expect("redis dir");
    let _redis = testkit::loading_redis(port, data.path(), Duration::from_secs(2));
    let (status, reason) = ready(setup.metrics_port).await.expect("answers");
    assert_eq!(status, 503, "Redis is still loading: {reason}");

    wait_ready_until(&setup, Duration::from_secs(30), "ready", |status, _| {
        status == 200
    })
    .await;
    let allocator = allocator::Allocator::connect(&redis_url, settings(), 2)
        .await
        .expect("allocator");
    let key = allocator::StockKey::new("m1", testkit::unique_id("startup"), "dc1");
    restock(&allocator, &key, 5).await;
    assert!(
        wait_for_rows(&setup, 1, Duration::from_secs(20)).await >= 1,
        "relayed once Redis answered; logs:\n{}",
        writer_logs(&setup)
    );
    let logs = writer_logs(&setup);
    assert!(
        logs.lines()
            .any(|line| line.contains("waiting for a dependency to answer")
                && line.contains("\"Redis\"")),
        "each wait is logged with its cause:\n{logs}"
    );
}

#[tokio::test]
async fn a_writer_waits_for_postgresql_and_says_why() {
    let stack = testkit::stack();
    let mut setup = setup(&stack.redis_url).await;
    // A PostgreSQL URL nothing answers on.
    setup.postgres_url = format!(
        "postgres://postgres@127.0.0.1:{}/inventory",
        testkit::free_port()
    );
    let _writer = start_writer(&setup);
    let (_, reason) = wait_ready_until(
        &setup,
        Duration::from_secs(20),
        "waiting for PostgreSQL",
        |status, reason| status == 503 && reason.starts_with("waiting for PostgreSQL: "),
    )
    .await;
    assert!(
        reason.contains("connect") || reason.contains("refused"),
        "the cause is named: {reason}"
    );
}
