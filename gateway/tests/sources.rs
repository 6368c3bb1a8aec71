//! Source health as buyers see it, on two real gateway nodes: the locations
//! a quiet POS feeds show `source_offline: true` and their buffer held back
//! (in reads, ETags, streams and metrics), until it reports again. The
//! writer's side (heartbeats on Kafka, the backlog on reconnect) is tested
//! in `ledger-writer/tests/sources.rs`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Sources and locations as TOML: `pos` feeds m1's store-12 (buffer 2)
/// and goes offline after 10 s; dc1 has no source.
fn sources_toml(pos: &str) -> String {
    format!(
        "\n[[sources]]\nmerchant = \"m1\"\nname = \"{pos}\"\noffline_after_seconds = 10\n\
         \n[[locations]]\nmerchant = \"m1\"\nlocation = \"store-12\"\nsource = \"{pos}\"\noffline_buffer_units = 2\n\
         \n[[locations]]\nmerchant = \"m1\"\nlocation = \"dc1\"\noffline_buffer_units = 5\n\
         \n[[sources]]\nmerchant = \"m2\"\nname = \"{pos}\"\noffline_after_seconds = 10\n"
    )
}

/// A sale at store-12 as the POS reports it over HTTP: the answer.
async fn pos_sale(node: &Node, pos: &str, sku: &str, qty: i64) -> Value {
    let (status, body) = post(
        &node.url("/v1/stock/adjustments"),
        PLATFORM,
        None,
        &json!({
            "merchant": "m1", "sku": sku, "location": "store-12", "kind": "delta", "qty": qty,
            "source": pos, "event_id": testkit::unique_id("sale"),
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The SKU's availability on `node`, and its ETag.
async fn read(node: &Node, sku: &str) -> (Value, String) {
    let response = client()
        .get(node.url(&format!("/v1/availability/m1/{sku}")))
        .bearer_auth(PLATFORM)
        .send()
        .await
        .expect("read");
    assert_eq!(response.status().as_u16(), 200);
    let etag = response
        .headers()
        .get("etag")
        .and_then(|value| value.to_str().ok())
        .expect("etag")
        .to_owned();
    (response.json().await.expect("json"), etag)
}

fn store(body: &Value) -> &Value {
    body["locations"]
        .as_array()
        .and_then(|locations| locations.iter().find(|line| line["location"] == "store-12"))
        .expect("store-12 line")
}

/// Polls both nodes until store-12's line satisfies `check` (or `limit`).
async fn wait_both(
    nodes: [&Node; 2],
    sku: &str,
    limit: Duration,
    what: &str,
    check: impl Fn(&Value) -> bool,
) {
    let deadline = Instant::now() + limit;
    for node in nodes {
        loop {
            let (body, _) = read(node, sku).await;
            if check(store(&body)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not seen on {}: {body}",
                node.base
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_pos_shows_its_locations_offline_less_their_buffer_until_it_reports_again() {
    let pos = testkit::unique_id("pos");
    let fleet = Fleet::on_stack(&sources_toml(&pos));
    let a = fleet.node("node-a");
    let b = fleet.node("node-b");
    let sku = testkit::unique_id("tee");

    // Never heard from: offline at once (nothing says its counts are
    // current). The POS's first report puts it right.
    restock(&a, "m1", &sku, "dc1", 20).await;
    let (body, _) = read(&a, &sku).await;
    assert_eq!(body["locations"][0]["source_offline"], false, "dc1: {body}");
    pos_sale(&a, &pos, &sku, 10).await;
    wait_both([&a, &b], &sku, Duration::from_secs(5), "online", |line| {
        line["source_offline"] == false && line["available"] == 10
    })
    .await;
    let (online, online_etag) = read(&b, &sku).await;
    assert_eq!(online["available"], 30, "{online}");
    // Each merchant's source of that name has its own series: m2's never
    // reported.
    let gauge = |merchant: &str, value: &str| {
        format!(
            "invgw_source_offline{{merchant=\"{merchant}\",source=\"{pos}\",node=\"node-b\"}} {value}"
        )
    };
    let metrics = b.metrics().await;
    assert!(
        metrics.contains(&gauge("m1", "0")) && metrics.contains(&gauge("m2", "1")),
        "{metrics}"
    );

    // A stream on node b, before the POS goes quiet.
    let mut stream = Events::open(&b, &sku).await;

    // Quiet past 10 s: both nodes show store-12 offline with 2 held back;
    // dc1, fed by no source, is untouched.
    let quiet_from = Instant::now();
    wait_both([&a, &b], &sku, Duration::from_secs(20), "offline", |line| {
        line["source_offline"] == true
    })
    .await;
    assert!(
        quiet_from.elapsed() >= Duration::from_secs(8),
        "offline only once quiet past offline_after_seconds"
    );
    for node in [&a, &b] {
        let (body, etag) = read(node, &sku).await;
        assert_eq!(
            (
                store(&body)["available"].clone(),
                store(&body)["on_hand"].clone()
            ),
            (json!(8), json!(10)),
            "shown less the buffer; the shelf unchanged: {body}"
        );
        assert_eq!(body["available"], 28, "{body}");
        let dc1 = &body["locations"][0];
        assert_eq!(
            (&dc1["location"], &dc1["source_offline"], &dc1["available"]),
            (&json!("dc1"), &json!(false), &json!(20))
        );
        assert_ne!(etag, online_etag, "what is shown changed, so its ETag did");
        // A client holding the online answer is not told it is current.
        let revalidated = client()
            .get(node.url(&format!("/v1/availability/m1/{sku}")))
            .bearer_auth(PLATFORM)
            .header("if-none-match", &online_etag)
            .send()
            .await
            .expect("revalidate");
        assert_eq!(revalidated.status().as_u16(), 200);
        let metrics = node.metrics().await;
        assert!(
            metrics.lines().any(
                |line| line.starts_with("invgw_source_offline{merchant=\"m1\"")
                    && line.contains(&pos)
                    && line.ends_with(" 1")
            ),
            "{metrics}"
        );
    }

    // The stream was told, though no stock changed.
    let mut events: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !events
        .iter()
        .any(|event| store(event)["source_offline"] == true)
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(event) = stream.next(left).await else {
            panic!("no offline event: {events:?}\n{}", log_tail(&b.log))
        };
        events.push(event);
    }
    assert_eq!(store(&events[0])["source_offline"], false, "{events:?}");

    // Another merchant's till of the same name reporting keeps nothing of
    // m1 online.
    let (status, body) = post(
        &b.url("/v1/stock/adjustments"),
        OTHER_MERCHANT,
        None,
        &json!({
            "merchant": "m2", "sku": sku, "location": "store-12", "kind": "delta", "qty": 4,
            "source": pos, "event_id": testkit::unique_id("m2-sale"),
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // A larger buffer while offline: what is shown changes, and so does the
    // ETag (a client revalidating is not told its copy is current).
    let (_, offline_etag) = read(&a, &sku).await;
    fleet.write_config(
        &fleet
            .config_text()
            .replace("offline_buffer_units = 2", "offline_buffer_units = 5"),
    );
    wait_both(
        [&a, &b],
        &sku,
        Duration::from_secs(5),
        "the larger buffer",
        |line| line["available"] == 5,
    )
    .await;
    let (body, etag) = read(&a, &sku).await;
    assert_eq!(
        store(&body)["source_offline"],
        true,
        "m2's till kept m1's store offline: {body}"
    );
    assert_ne!(etag, offline_etag);

    // It reports again (a sale of 1): online within a second or two, the
    // buffer no longer held back.
    // Its own answer shows it online: it just reported.
    let answer = pos_sale(&b, &pos, &sku, -1).await;
    assert_eq!(
        (&answer["source_offline"], &answer["available"]),
        (&json!(false), &json!(9)),
        "{answer}"
    );
    wait_both(
        [&a, &b],
        &sku,
        Duration::from_secs(5),
        "back online",
        |line| line["source_offline"] == false && line["available"] == 9,
    )
    .await;
}
