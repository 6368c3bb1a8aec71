//! Two gateway nodes on one Redis: a flash sale raced across both, the same
//! request sent to both, changes pushed to the other node's SSE clients, and
//! flash-sale mode switched by editing the config.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_buyers_across_two_nodes_get_exactly_one_hundred_units() {
    let (_fleet, a, b, sku, name) = sale_with(100).await;
    let state = sale_state(&a, &name).await;
    assert_eq!(state["sellable_total"], 100, "{state}");

    let urls = Arc::new([a.url("/v1/reservations"), b.url("/v1/reservations")]);
    let run = testkit::unique_id("buyer");
    let buyers: Vec<_> = (0..500)
        .map(|i| {
            let urls = Arc::clone(&urls);
            let sku = sku.clone();
            let key = format!("{run}-{i}");
            tokio::spawn(async move {
                post(
                    &urls[i % 2],
                    CHECKOUT,
                    Some(&key),
                    &reservation("m1", &sku, "dc1", 1),
                )
                .await
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut refused = 0;
    for buyer in buyers {
        let (status, body) = buyer.await.expect("buyer");
        match status {
            201 => held.push((
                body["reservation_id"].as_str().expect("id").to_owned(),
                held.len() % 2,
            )),
            409 => {
                assert_eq!(body["error"], "insufficient_stock");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((held.len(), refused), (100, 400));

    // Half are bought, half put back: 50 left to sell, on both nodes' views.
    for (index, (id, _)) in held.iter().enumerate() {
        let node = if index % 2 == 0 { &a } else { &b };
        let action = if index < 50 { "commit" } else { "release" };
        let (status, body) = post(
            &node.url(&format!("/v1/reservations/{id}/{action}")),
            CHECKOUT,
            Some(&format!("{run}-{action}-{index}")),
            &json!({}),
        )
        .await;
        assert_eq!(status, 200, "{action}: {body}");
    }
    for node in [&a, &b] {
        wait_until("availability 50 everywhere", || async {
            available(node, "m1", &sku).await == 50
        })
        .await;
    }
    let state = sale_state(&b, &name).await;
    assert_eq!(state["sellable_total"], 50, "{state}");
    assert_eq!(state["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_sent_to_both_nodes_at_once_holds_stock_once() {
    let fleet = Fleet::on_stack("");
    let a = fleet.node("node-a");
    let b = fleet.node("node-b");
    let sku = testkit::unique_id("tee");
    restock(&a, "m1", &sku, "dc1", 10).await;
    let key = testkit::unique_id("same");
    let body = reservation("m1", &sku, "dc1", 3);
    let (url_a, url_b) = (a.url("/v1/reservations"), b.url("/v1/reservations"));
    let (first, second) = tokio::join!(
        post(&url_a, CHECKOUT, Some(&key), &body),
        post(&url_b, CHECKOUT, Some(&key), &body)
    );
    assert_eq!((first.0, second.0), (201, 201), "{} {}", first.1, second.1);
    assert_eq!(first.1["reservation_id"], second.1["reservation_id"]);
    wait_until("one hold of 3", || async {
        available(&a, "m1", &sku).await == 7
    })
    .await;
    assert_eq!(available(&b, "m1", &sku).await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_one_node_sees_a_reservation_made_on_the_other() {
    let fleet = Fleet::on_stack("");
    let a = fleet.node("node-a");
    let b = fleet.node("node-b");
    let sku = testkit::unique_id("stream");
    restock(&a, "m1", &sku, "dc1", 8).await;

    let mut stream = client()
        .get(b.url(&format!("/v1/stream?merchant=m1&sku={sku}")))
        .bearer_auth(CHECKOUT)
        .send()
        .await
        .expect("stream");
    assert_eq!(
        stream.status().as_u16(),
        403,
        "the checkout key lacks the stream scope"
    );
    stream = client()
        .get(b.url(&format!("/v1/stream?merchant=m1&sku={sku}")))
        .bearer_auth(READ)
        .header("Last-Event-ID", "3")
        .send()
        .await
        .expect("stream");
    assert_eq!(stream.status().as_u16(), 200);
    assert_eq!(
        stream
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );

    let mut stream = Events::new(stream);
    let mut events = Vec::new();
    let mut reserved = false;
    let deadline = Instant::now() + Duration::from_secs(2);
    while events.iter().all(|event: &Value| event["available"] != 6) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(event) = stream.next(left).await else {
            panic!("no event with the reservation within 2 s: {events:?}")
        };
        events.push(event);
        if !reserved {
            assert_eq!(events[0]["available"], 8, "the current state comes first");
            let key = testkit::unique_id("sse");
            let (status, body) = post(
                &a.url("/v1/reservations"),
                CHECKOUT,
                Some(&key),
                &reservation("m1", &sku, "dc1", 2),
            )
            .await;
            assert_eq!(status, 201, "{body}");
            reserved = true;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_edit_turns_a_sale_on_and_off_and_a_broken_edit_is_refused() {
    let sku = testkit::unique_id("sneaker");
    let name = testkit::unique_id("weekend");
    let fleet = Fleet::on_stack(&sale_toml(&name, &sku, false));
    let a = fleet.node("node-a");
    restock(&a, "m1", &sku, "dc1", 40).await;
    assert_eq!(sale_state(&a, &name).await["active_on_this_node"], false);

    let original = fleet.config_text();
    let switched_on = original.replace(
        &sale_toml(&name, &sku, false),
        &sale_toml(&name, &sku, true),
    );
    assert_ne!(switched_on, original);
    fleet.write_config(&switched_on);
    wait_until("the sale switched on", || async {
        sale_state(&a, &name).await["active_on_this_node"] == true
    })
    .await;
    let state = sale_state(&a, &name).await;
    let bucket = &state["nodes"][0]["bucket"];
    assert_eq!(
        bucket["free"], 10,
        "half of 40 split over two nodes: {state}"
    );

    // A broken edit: rejected, the sale keeps running.
    fleet.write_config(&switched_on.replace("presplit_fraction = 0.5", "presplit_fraction = 7"));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(get(&a.url("/health"), None).await.0, 200);
    assert_eq!(sale_state(&a, &name).await["active_on_this_node"], true);
    let log = std::fs::read_to_string(&a.log).unwrap_or_default();
    assert!(
        log.contains("config reload rejected"),
        "{}",
        log_tail(&a.log)
    );
    let key = testkit::unique_id("during-broken");
    assert_eq!(
        post(
            &a.url("/v1/reservations"),
            CHECKOUT,
            Some(&key),
            &reservation("m1", &sku, "dc1", 1)
        )
        .await
        .0,
        201
    );

    // Switched off: this node's bucket goes back to the pool.
    fleet.write_config(&original);
    wait_until("the sale switched off", || async {
        sale_state(&a, &name).await["active_on_this_node"] == false
    })
    .await;
    let state = sale_state(&a, &name).await;
    assert_eq!(state["nodes"][0]["bucket"]["free"], 0, "{state}");
    assert_eq!(state["sellable_total"], 39);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_last_event_is_the_state_a_burst_of_changes_settled_in() {
    let fleet = Fleet::on_stack("");
    let a = fleet.node("node-a");
    let b = fleet.node("node-b");
    let sku = testkit::unique_id("burst");
    restock(&a, "m1", &sku, "dc1", 100).await;
    let mut stream = Events::open(&b, &sku).await;
    // 40 holds at once on the other node: many notifications, coalesced
    // into fewer events, the last of which must be the settled state.
    let holds: Vec<_> = (0..40)
        .map(|i| {
            let (url, key, body) = (
                a.url("/v1/reservations"),
                testkit::unique_id(&format!("burst-{i}")),
                reservation("m1", &sku, "dc1", 1),
            );
            tokio::spawn(async move { post(&url, CHECKOUT, Some(&key), &body).await.0 })
        })
        .collect();
    for hold in holds {
        assert_eq!(hold.await.expect("hold"), 201);
    }
    let mut last = None::<Value>;
    // Events until the stream has been quiet for a second.
    while let Some(event) = stream.next(Duration::from_secs(1)).await {
        last = Some(event);
    }
    let last = last.expect("events");
    assert_eq!(last["available"], 60, "{last}");
    assert_eq!(available(&b, "m1", &sku).await, 60);
}
