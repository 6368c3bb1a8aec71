//! Flash-sale mode as a user meets it, on two real gateway nodes: physical
//! counts, losses and restarts during a sale never create units, a short key
//! refuses on every node, and a request is one request on every node (its
//! Idempotency-Key has one record wherever the hold lands).

mod common;

use common::*;
use serde_json::{Value, json};

/// What the scripts' housekeeping does 24 h after a split: its transfers'
/// debit records (done) and credit records (`in|…`) are gone.
async fn forget_activation_records(sku: &str) {
    use fred::prelude::*;
    let redis = Builder::from_config(
        fred::types::config::Config::from_url(&testkit::stack().redis_url).expect("url"),
    )
    .build()
    .expect("client");
    redis.init().await.expect("connect");
    let key = allocator::StockKey::new("m1", sku, "dc1");
    let nodes = ["node-a", "node-b"].map(String::from);
    let partitions = [
        key.pool(64).partition,
        key.bucket("node-a", &nodes, 64).partition,
        key.bucket("node-b", &nodes, 64).partition,
    ];
    let mut forgotten = 0;
    for partition in partitions {
        let hash = format!("inv:{{{partition}}}:xfer");
        let records: std::collections::HashMap<String, String> =
            redis.hgetall(&hash).await.expect("records");
        for (field, record) in records {
            let ours = record.contains(sku) && !record.contains("\"debited\"");
            if (field.starts_with("act.") && ours) || field.starts_with("in|act.") {
                let _: i64 = redis.hdel(&hash, &field).await.expect("forget");
                forgotten += 1;
            }
        }
    }
    assert!(forgotten >= 2, "the split's records were there to forget");
}

async fn adjust(node: &Node, body: Value) -> Value {
    let (status, reply) = post(&node.url("/v1/stock/adjustments"), ADMIN, None, &body).await;
    assert_eq!(status, 200, "{reply}");
    reply
}

fn count(sku: &str, qty: i64, seq: u64) -> Value {
    json!({ "merchant": "m1", "sku": sku, "location": "dc1", "kind": "absolute", "qty": qty,
            "source": "wms-1", "event_id": testkit::unique_id("count"), "source_seq": seq })
}

fn delta(sku: &str, qty: i64) -> Value {
    json!({ "merchant": "m1", "sku": sku, "location": "dc1", "kind": "delta", "qty": qty,
            "source": "pos-1", "event_id": testkit::unique_id("delta") })
}

async fn reserve(node: &Node, key: &str, body: &Value) -> (u16, Value) {
    post(&node.url("/v1/reservations"), CHECKOUT, Some(key), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_during_a_sale_equal_to_what_the_key_holds_changes_nothing() {
    let (_fleet, a, b, sku, _) = sale_with(1000).await;
    adjust(&a, delta(&sku, 40)).await;
    let counted = adjust(&b, count(&sku, 1040, 1)).await;
    assert_eq!(counted["applied"], true, "{counted}");
    for node in [&a, &b] {
        wait_until("both nodes show the count", || async {
            available(node, "m1", &sku).await == 1040
        })
        .await;
    }
    // A lower count takes the whole key there, buckets included.
    adjust(&a, count(&sku, 300, 2)).await;
    wait_until("the lower count", || async {
        available(&b, "m1", &sku).await == 300
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_of_every_unit_refuses_reservations_on_every_node_until_restocked() {
    let (_fleet, a, b, sku, _) = sale_with(100).await;
    let run = testkit::unique_id("loss");
    let (status, _) = reserve(
        &a,
        &format!("{run}-before"),
        &reservation("m1", &sku, "dc1", 2),
    )
    .await;
    assert_eq!(status, 201);
    let loss = adjust(&b, delta(&sku, -100)).await;
    assert_eq!(loss["shortfall"], true, "{loss}");
    for (index, node) in [&a, &b].into_iter().enumerate() {
        let (status, body) = reserve(
            node,
            &format!("{run}-{index}"),
            &reservation("m1", &sku, "dc1", 1),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (409, Some("insufficient_stock")),
            "{body}"
        );
    }
    adjust(&a, delta(&sku, 10)).await;
    let (status, body) = reserve(
        &b,
        &format!("{run}-after"),
        &reservation("m1", &sku, "dc1", 5),
    )
    .await;
    assert_eq!(status, 201, "sells again once made good: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restart_during_a_sale_credits_nothing_again() {
    let (fleet, a, b, sku, _) = sale_with(100).await;
    assert_eq!(available(&a, "m1", &sku).await, 100);
    forget_activation_records(&sku).await;
    drop(a);
    let a = fleet.node("node-a");
    drop(b);
    let b = fleet.node("node-b");
    for node in [&a, &b] {
        assert_eq!(
            available(node, "m1", &sku).await,
            100,
            "nothing credited twice"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_retried_on_the_other_node_during_a_sale_is_the_same_reservation() {
    let (_fleet, a, b, sku, _) = sale_with(50).await;
    let key = testkit::unique_id("order");
    let body = reservation("m1", &sku, "dc1", 3);
    let (status, first) = reserve(&a, &key, &body).await;
    assert_eq!(status, 201, "{first}");
    let response = client()
        .post(b.url("/v1/reservations"))
        .bearer_auth(CHECKOUT)
        .header("Idempotency-Key", &key)
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(
        response
            .headers()
            .get("idempotent-replayed")
            .and_then(|value| value.to_str().ok()),
        Some("true")
    );
    let retry: Value = response.json().await.expect("json");
    assert_eq!(retry["reservation_id"], first["reservation_id"]);
    assert_eq!(available(&b, "m1", &sku).await, 47, "held once");

    // A refusal is remembered like a success, on every node.
    let greedy = testkit::unique_id("greedy");
    let too_many = reservation("m1", &sku, "dc1", 1000);
    let (status, _) = reserve(&a, &greedy, &too_many).await;
    assert_eq!(status, 409);
    adjust(&a, delta(&sku, 2000)).await;
    let (status, body) = reserve(&b, &greedy, &too_many).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("insufficient_stock")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_racing_release_on_carts_never_answers_500() {
    let fleet = Fleet::on_stack("");
    let a = fleet.node("node-a");
    let b = fleet.node("node-b");
    let (shirt, shoes) = (testkit::unique_id("shirt"), testkit::unique_id("shoes"));
    restock(&a, "m1", &shirt, "dc1", 100).await;
    restock(&a, "m1", &shoes, "dc1", 100).await;
    let run = testkit::unique_id("race");
    for round in 0..20 {
        let body = json!({ "merchant": "m1", "lines": [
            { "sku": shirt, "location": "dc1", "qty": 1 }, { "sku": shoes, "location": "dc1", "qty": 1 }] });
        let (status, cart) = reserve(&a, &format!("{run}-{round}"), &body).await;
        assert_eq!(status, 201, "{cart}");
        let id = cart["reservation_id"].as_str().expect("id").to_owned();
        let (commit_url, release_url) = (
            a.url(&format!("/v1/reservations/{id}/commit")),
            b.url(&format!("/v1/reservations/{id}/release")),
        );
        let (commit_key, release_key) = (format!("{run}-c-{round}"), format!("{run}-r-{round}"));
        let empty = json!({});
        let commit = post(&commit_url, CHECKOUT, Some(&commit_key), &empty);
        let release = post(&release_url, CHECKOUT, Some(&release_key), &empty);
        let ((commit, committed), (release, released)) = tokio::join!(commit, release);
        for (status, body) in [(commit, &committed), (release, &released)] {
            assert!(
                status == 200 || (status == 409 && body["error"] == "reservation_not_held"),
                "round {round}: {status} {body}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_idempotency_key_works_and_huge_sequences_stay_exact() {
    let fleet = Fleet::on_stack("");
    let a = fleet.node("node-a");
    let sku = testkit::unique_id("long");
    restock(&a, "m1", &sku, "dc1", 5).await;
    let run = testkit::unique_id("k");
    let key = format!("{run}{}", "k".repeat(255 - run.len()));
    let (status, body) = reserve(&a, &key, &reservation("m1", &sku, "dc1", 1)).await;
    assert_eq!(status, 201, "{body}");

    let seq = 1_000_000_000_000_123u64;
    adjust(&a, count(&sku, 9, seq)).await;
    let stale = adjust(&a, count(&sku, 8, seq - 1)).await;
    assert_eq!(stale["reason"], "stale");
    assert_eq!(stale["last_source_seq"].as_u64(), Some(seq), "{stale}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_line_order_keyed_like_a_cart_line_is_its_own_order() {
    let fleet = Fleet::on_stack("");
    let a = fleet.node("node-a");
    let b = fleet.node("node-b");
    let (shirt, shoes) = (testkit::unique_id("shirt"), testkit::unique_id("shoes"));
    restock(&a, "m1", &shirt, "dc1", 5).await;
    restock(&a, "m1", &shoes, "dc1", 5).await;
    let key = testkit::unique_id("K");
    let cart = json!({ "merchant": "m1", "lines": [
        { "sku": shirt, "location": "dc1", "qty": 1 }, { "sku": shoes, "location": "dc1", "qty": 1 }] });
    let (status, carted) = reserve(&a, &key, &cart).await;
    assert_eq!(status, 201, "{carted}");
    // The old line keys were the cart's key plus `#index`.
    let (status, single) = reserve(
        &b,
        &format!("{key}#1"),
        &reservation("m1", &shoes, "dc1", 1),
    )
    .await;
    assert_eq!(status, 201, "{single}");
    assert_ne!(single["reservation_id"], carted["reservation_id"]);
    let (status, _) = post(
        &a.url(&format!(
            "/v1/reservations/{}/release",
            carted["reservation_id"].as_str().expect("id")
        )),
        CHECKOUT,
        Some(&testkit::unique_id("release")),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, order) = get(
        &b.url(&format!(
            "/v1/reservations/{}",
            single["reservation_id"].as_str().expect("id")
        )),
        Some(CHECKOUT),
    )
    .await;
    assert_eq!(
        (status, order["status"].as_str()),
        (200, Some("held")),
        "{order}"
    );
    assert_eq!(
        available(&a, "m1", &shoes).await,
        4,
        "the one-line order still holds its unit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_raises_the_hold_limit_reaches_the_reservations() {
    let fleet = Fleet::on_stack("");
    let a = fleet.node("node-a");
    let sku = testkit::unique_id("long-hold");
    restock(&a, "m1", &sku, "dc1", 5).await;
    let long = json!({ "merchant": "m1", "ttl_seconds": 7200,
                       "lines": [{ "sku": sku, "location": "dc1", "qty": 1 }] });
    let (status, _) = reserve(&a, &testkit::unique_id("long"), &long).await;
    assert_eq!(status, 400, "over the limit in force");
    let raised = fleet.config_text().replace(
        "reservation_ttl_seconds_max = 3600",
        "reservation_ttl_seconds_max = 7200",
    );
    assert_ne!(
        raised,
        fleet.config_text(),
        "the dev config names the limit"
    );
    fleet.write_config(&raised);
    wait_until("the raised limit in force", || async {
        let (status, _) = reserve(&a, &testkit::unique_id("long"), &long).await;
        status == 201
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_sale_admits_at_most_its_budget_over_both_nodes_and_says_when_to_retry() {
    const PER_SECOND: u32 = 5;
    let throttle = format!("checkout_attempts_per_second = {PER_SECOND}\n");
    let (_fleet, a, b, sku, name) = sale_with_extra(100_000, &throttle).await;
    let run = testkit::unique_id("throttle");
    let started = std::time::Instant::now();
    let mut callers = Vec::new();
    for (index, node) in [&a, &b, &a, &b].into_iter().enumerate() {
        let url = node.url("/v1/reservations");
        let (run, sku) = (run.clone(), sku.clone());
        callers.push(tokio::spawn(async move {
            let (mut held, mut refused) = (0u64, 0u64);
            let mut attempt = 0;
            while started.elapsed() < std::time::Duration::from_secs(2) {
                attempt += 1;
                let response = client()
                    .post(&url)
                    .bearer_auth(CHECKOUT)
                    .header("Idempotency-Key", format!("{run}-{index}-{attempt}"))
                    .json(&reservation("m1", &sku, "dc1", 1))
                    .send()
                    .await
                    .expect("send");
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse::<u64>().ok());
                let body: Value = response.json().await.unwrap_or(Value::Null);
                match status {
                    201 => held += 1,
                    429 => {
                        assert_eq!(body["error"], "rate_limited", "{body}");
                        assert!(
                            body["message"]
                                .as_str()
                                .is_some_and(|m| m.contains("flash sale")),
                            "{body}"
                        );
                        assert_eq!(retry_after, Some(1), "{body}");
                        refused += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    other => panic!("{other}: {body}"),
                }
            }
            (held, refused)
        }));
    }
    let (mut held, mut refused) = (0, 0);
    for caller in callers {
        let (h, r) = caller.await.expect("caller");
        held += h;
        refused += r;
    }
    let seconds = started.elapsed().as_secs_f64();
    let most = (f64::from(PER_SECOND) * (seconds + 0.002)).floor() as u64 + u64::from(PER_SECOND);
    assert!(
        held <= most,
        "{held} held in {seconds:.3} s (at most {most})"
    );
    assert!(
        held >= u64::from(PER_SECOND),
        "{held} held: the burst at least"
    );
    assert!(refused > 0);
    // Each node counts what it refused, under the sale's name.
    let mut counted = 0;
    for node in [&a, &b] {
        let metrics = node.metrics().await;
        let series =
            format!("invgw_sale_reservations_total{{outcome=\"throttled\",sale=\"{name}\",");
        counted += metrics
            .lines()
            .filter(|row| row.starts_with(&series))
            .filter_map(|row| row.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    assert_eq!(counted, refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_customer_racing_from_both_nodes_holds_at_most_the_sales_customer_limit() {
    let limits = "customer_units_max = 2\n";
    // The per-node rate limit per customer (a different guard) out of the way.
    let (_fleet, a, b, sku, name) = sale_with_config(1_000, limits, |text| {
        text.replace(
            "customer_reservations_per_second = 5",
            "customer_reservations_per_second = 10000",
        )
    })
    .await;
    let customer = testkit::unique_id("alice");
    let mut body = reservation("m1", &sku, "dc1", 1);
    body["customer_ref"] = json!(customer);

    // Without customer_ref the sale's key is refused, and nothing is held.
    let (status, reply) = reserve(
        &a,
        &testkit::unique_id("anon"),
        &reservation("m1", &sku, "dc1", 1),
    )
    .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (400, Some("bad_request")),
        "{reply}"
    );
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("customer_ref")),
        "{reply}"
    );

    let run = testkit::unique_id("race");
    let mut racers = Vec::new();
    for index in 0..50 {
        let node = if index % 2 == 0 {
            a.url("/v1/reservations")
        } else {
            b.url("/v1/reservations")
        };
        let (body, key) = (body.clone(), format!("{run}-{index}"));
        racers.push(tokio::spawn(async move {
            post(&node, CHECKOUT, Some(&key), &body).await
        }));
    }
    let mut held = Vec::new();
    let mut refused = 0;
    for racer in racers {
        let (status, reply) = racer.await.expect("racer");
        match status {
            201 => held.push(reply["reservation_id"].as_str().expect("id").to_owned()),
            409 => {
                assert_eq!(reply["error"], "customer_limit", "{reply}");
                assert_eq!(reply["limit"], 2, "{reply}");
                assert!(
                    reply["used"].as_u64().is_some_and(|used| used <= 2),
                    "{reply}"
                );
                refused += 1;
            }
            other => panic!("{other}: {reply}"),
        }
    }
    assert_eq!((held.len(), refused), (2, 48), "exactly the limit is held");
    assert_eq!(available(&a, "m1", &sku).await, 998);

    // Another customer still buys.
    let mut bob = reservation("m1", &sku, "dc1", 2);
    bob["customer_ref"] = json!("bob");
    let (status, reply) = reserve(&b, &testkit::unique_id("bob"), &bob).await;
    assert_eq!(status, 201, "{reply}");

    // A commit keeps the units counted; a release gives them back.
    let (status, reply) = act(&a, &held[0], "commit").await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = reserve(&b, &testkit::unique_id("more"), &body).await;
    assert_eq!((status, reply["used"].as_u64()), (409, Some(2)), "{reply}");
    let (status, reply) = act(&b, &held[1], "release").await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = reserve(&a, &testkit::unique_id("again"), &body).await;
    assert_eq!(status, 201, "the released unit's place: {reply}");
    let (status, reply) = reserve(&b, &testkit::unique_id("over"), &body).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (409, Some("customer_limit")),
        "{reply}"
    );

    // Each node counts what it refused, under the sale's name.
    let mut counted = 0;
    for node in [&a, &b] {
        let metrics = node.metrics().await;
        let series =
            format!("invgw_sale_reservations_total{{outcome=\"customer_limit\",sale=\"{name}\",");
        counted += metrics
            .lines()
            .filter(|row| row.starts_with(&series))
            .filter_map(|row| row.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    assert_eq!(counted, 48 + 2);
}

/// `POST /v1/reservations/{id}/{action}` on `node`, with a fresh key.
async fn act(node: &Node, id: &str, action: &str) -> (u16, Value) {
    let url = node.url(&format!("/v1/reservations/{id}/{action}"));
    post(
        &url,
        CHECKOUT,
        Some(&testkit::unique_id(action)),
        &json!({}),
    )
    .await
}
