//! The HTTP contract of shared/API.md against a real gateway process: every
//! row of the error table (status, code, and nothing changed), the happy
//! paths, proxying, and merchant isolation on every route.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn assert_error(response: (u16, Value), status: u16, code: &str) {
    assert_eq!(response.0, status, "{}", response.1);
    assert_eq!(response.1["error"], code, "{}", response.1);
    assert!(
        response.1["message"]
            .as_str()
            .is_some_and(|message| !message.is_empty())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_of_the_table_is_answered_and_changes_nothing() {
    let run = testkit::unique_id("run");
    let fleet = Fleet::on_stack("");
    let node = fleet.node("node-a");
    let sku = testkit::unique_id("tee");
    restock(&node, "m1", &sku, "dc1", 5).await;
    let url = node.url("/v1/reservations");
    let good = reservation("m1", &sku, "dc1", 1);

    // 400: malformed JSON, bad id, qty out of range, too many lines.
    let raw = client()
        .post(&url)
        .bearer_auth(CHECKOUT)
        .header("Idempotency-Key", format!("{run}-bad-json"))
        .header("Content-Type", "application/json")
        .body("{\"merchant\":")
        .send()
        .await
        .expect("send");
    assert_eq!(raw.status().as_u16(), 400);
    assert_error(
        post(
            &url,
            CHECKOUT,
            Some("bad-id"),
            &reservation("m1", "a b", "dc1", 1),
        )
        .await,
        400,
        "bad_request",
    )
    .await;
    assert_error(
        post(
            &url,
            CHECKOUT,
            Some("qty0"),
            &reservation("m1", &sku, "dc1", 0),
        )
        .await,
        400,
        "bad_request",
    )
    .await;
    assert_error(
        post(
            &url,
            CHECKOUT,
            Some("qtybig"),
            &reservation("m1", &sku, "dc1", 1_000_001),
        )
        .await,
        400,
        "bad_request",
    )
    .await;
    let lines: Vec<Value> = (0..51)
        .map(|i| json!({ "sku": format!("s{i}"), "location": "dc1", "qty": 1 }))
        .collect();
    assert_error(
        post(
            &url,
            CHECKOUT,
            Some("lines"),
            &json!({ "merchant": "m1", "lines": lines }),
        )
        .await,
        400,
        "bad_request",
    )
    .await;

    // 401 and 403.
    assert_error(
        post(&url, "no-such-key", Some("k"), &good).await,
        401,
        "unauthorized",
    )
    .await;
    let anonymous = client()
        .post(&url)
        .json(&good)
        .header("Idempotency-Key", format!("{run}-k"))
        .send()
        .await
        .expect("send");
    assert_eq!(anonymous.status().as_u16(), 401);
    assert_error(post(&url, READ, Some("k"), &good).await, 403, "forbidden").await;
    assert_error(
        post(&url, OTHER_MERCHANT, Some("k"), &good).await,
        403,
        "forbidden",
    )
    .await;

    // 404.
    assert_error(
        get(
            &node.url("/v1/reservations/r3.000000000000000000000000"),
            Some(CHECKOUT),
        )
        .await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        get(
            &node.url(&format!(
                "/v1/availability/m1/{}",
                testkit::unique_id("nothing")
            )),
            Some(READ),
        )
        .await,
        404,
        "not_found",
    )
    .await;

    // 409 insufficient_stock lists each short line.
    let (status, body) = post(
        &url,
        CHECKOUT,
        Some(&format!("{run}-too-many")),
        &reservation("m1", &sku, "dc1", 6),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(body["error"], "insufficient_stock");
    assert_eq!(
        body["lines"],
        json!([{ "sku": sku, "location": "dc1", "requested": 6, "available": 5 }])
    );

    // 413 over the body limit (the tests' config: 4096 bytes).
    let huge = json!({ "merchant": "m1", "lines": [{ "sku": "x".repeat(5000), "location": "dc1", "qty": 1 }] });
    assert_error(
        post(&url, CHECKOUT, Some("huge"), &huge).await,
        413,
        "payload_too_large",
    )
    .await;

    // 415 without JSON.
    let text = client()
        .post(&url)
        .bearer_auth(CHECKOUT)
        .header("Idempotency-Key", format!("{run}-text"))
        .header("Content-Type", "text/plain")
        .body(good.to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(text.status().as_u16(), 415);

    // 428 without Idempotency-Key.
    assert_error(
        post(&url, CHECKOUT, None, &good).await,
        428,
        "idempotency_key_required",
    )
    .await;

    // 422: the same key with another body.
    let (status, first) = post(&url, CHECKOUT, Some(&format!("{run}-reuse")), &good).await;
    assert_eq!(status, 201, "{first}");
    assert_error(
        post(
            &url,
            CHECKOUT,
            Some(&format!("{run}-reuse")),
            &reservation("m1", &sku, "dc1", 2),
        )
        .await,
        422,
        "idempotency_key_reused",
    )
    .await;
    // The same key naming another SKU is a different body too.
    let other_sku = reservation("m1", &testkit::unique_id("other"), "dc1", 1);
    assert_error(
        post(&url, CHECKOUT, Some(&format!("{run}-reuse")), &other_sku).await,
        422,
        "idempotency_key_reused",
    )
    .await;

    // 409 reservation_not_held: commit after release.
    let id = first["reservation_id"].as_str().expect("id").to_owned();
    let (status, released) = post(
        &node.url(&format!("/v1/reservations/{id}/release")),
        CHECKOUT,
        Some(&format!("{run}-rel")),
        &json!({}),
    )
    .await;
    assert_eq!(
        (status, released["status"].as_str()),
        (200, Some("released"))
    );
    let (status, body) = post(
        &node.url(&format!("/v1/reservations/{id}/commit")),
        CHECKOUT,
        Some(&format!("{run}-com")),
        &json!({}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str(), body["status"].as_str()),
        (409, Some("reservation_not_held"), Some("released"))
    );

    // 429 with Retry-After: the slow key admits one request per second.
    let mut limited = None;
    for _ in 0..5 {
        let response = client()
            .get(node.url(&format!("/v1/availability/m1/{sku}")))
            .bearer_auth(SLOW)
            .send()
            .await
            .expect("send");
        if response.status().as_u16() == 429 {
            limited = Some(response);
            break;
        }
    }
    let limited = limited.expect("the slow key is limited");
    // One request per second across a fleet of two: one every 2 s per node,
    // so the next token is at most 2 s away.
    let retry_after: u64 = limited
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after in seconds");
    assert!((1..=2).contains(&retry_after), "retry-after {retry_after}");
    let body: Value = limited.json().await.expect("json");
    assert_eq!(body["error"], "rate_limited");

    // Nothing above changed the stock.
    assert_eq!(available(&node, "m1", &sku).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn availability_has_etags_bands_and_batches() {
    let fleet = Fleet::on_stack("");
    let node = fleet.node("node-a");
    let sku = testkit::unique_id("hoodie");
    restock(&node, "m1", &sku, "dc1", 40).await;
    restock(&node, "m1", &sku, "store-12", 3).await;
    let url = node.url(&format!("/v1/availability/m1/{sku}"));

    let response = client().get(&url).send().await.expect("public read");
    assert_eq!(response.status().as_u16(), 200);
    let etag = response
        .headers()
        .get("etag")
        .expect("etag")
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(
        response
            .headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("max-age=1")
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["available"], 43);
    assert_eq!(body["stale"], false);
    let statuses: Vec<&str> = body["locations"]
        .as_array()
        .expect("locations")
        .iter()
        .map(|l| l["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses, ["in_stock", "low"]);

    let not_modified = client()
        .get(&url)
        .header("If-None-Match", &etag)
        .send()
        .await
        .expect("send");
    assert_eq!(not_modified.status().as_u16(), 304);

    let (status, one) = get(&format!("{url}?location=store-12"), None).await;
    assert_eq!((status, one["available"].as_i64()), (200, Some(3)));

    let (status, batch) = post(
        &node.url("/v1/availability/batch"),
        READ,
        None,
        &json!({ "items": [{ "merchant": "m1", "sku": sku }, { "merchant": "m1", "sku": "never-stocked-sku" }] }),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(batch["items"][0]["available"], 43);
    assert_eq!(batch["items"][1]["error"], "not_found");

    // A change moves the ETag.
    restock(&node, "m1", &sku, "dc1", 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let changed = client()
        .get(&url)
        .header("If-None-Match", &etag)
        .send()
        .await
        .expect("send");
    assert_eq!(changed.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cart_is_held_committed_and_read_back_through_the_api() {
    let run = testkit::unique_id("run");
    let fleet = Fleet::on_stack("");
    let node = fleet.node("node-a");
    let (shirt, shoes) = (testkit::unique_id("shirt"), testkit::unique_id("shoes"));
    restock(&node, "m1", &shirt, "dc1", 5).await;
    restock(&node, "m1", &shoes, "dc2", 2).await;
    let cart = json!({ "merchant": "m1", "ttl_seconds": 300, "customer_ref": "customer-9",
        "lines": [{ "sku": shirt, "location": "dc1", "qty": 2 }, { "sku": shoes, "location": "dc2", "qty": 2 }] });
    let url = node.url("/v1/reservations");
    let (status, held) = post(&url, CHECKOUT, Some(&format!("{run}-cart-1")), &cart).await;
    assert_eq!(status, 201, "{held}");
    assert_eq!(held["status"], "held");
    assert_eq!(held["lines"].as_array().map(Vec::len), Some(2));

    let replay = client()
        .post(&url)
        .bearer_auth(CHECKOUT)
        .header("Idempotency-Key", format!("{run}-cart-1"))
        .json(&cart)
        .send()
        .await
        .expect("send");
    assert_eq!(replay.status().as_u16(), 201);
    assert_eq!(
        replay
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );

    let id = held["reservation_id"].as_str().expect("id");
    let (status, extended) = post(
        &node.url(&format!("/v1/reservations/{id}/extend")),
        CHECKOUT,
        None,
        &json!({ "ttl_seconds": 900 }),
    )
    .await;
    assert_eq!(status, 200, "{extended}");
    assert!(extended["expires_at"].as_str() > held["expires_at"].as_str());
    let (status, committed) = post(
        &node.url(&format!("/v1/reservations/{id}/commit")),
        CHECKOUT,
        Some(&format!("{run}-c")),
        &json!({}),
    )
    .await;
    assert_eq!(
        (status, committed["status"].as_str()),
        (200, Some("committed"))
    );
    let (status, read) = get(&node.url(&format!("/v1/reservations/{id}")), Some(CHECKOUT)).await;
    assert_eq!(
        (status, read["status"].as_str(), read["merchant"].as_str()),
        (200, Some("committed"), Some("m1"))
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(available(&node, "m1", &shirt).await, 3);
    assert_eq!(available(&node, "m1", &shoes).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjustments_dedupe_order_and_flag_shortfalls_and_settings_apply() {
    let run = testkit::unique_id("run");
    let fleet = Fleet::on_stack("");
    let node = fleet.node("node-a");
    let sku = testkit::unique_id("count");
    let url = node.url("/v1/stock/adjustments");
    let count = |qty: i64, seq: u64| {
        json!({ "merchant": "m1", "sku": sku, "location": "dc1", "kind": "absolute",
        "qty": qty, "source": "pos-12", "event_id": format!("c{seq}"), "source_seq": seq })
    };
    let (status, body) = post(&url, ADMIN, None, &count(30, 3)).await;
    assert_eq!(
        (status, body["applied"].as_bool(), body["on_hand"].as_i64()),
        (200, Some(true), Some(30))
    );
    let (_, duplicate) = post(&url, ADMIN, None, &count(30, 3)).await;
    assert_eq!(
        duplicate,
        json!({ "applied": false, "reason": "duplicate" })
    );
    let (_, stale) = post(&url, ADMIN, None, &count(10, 2)).await;
    assert_eq!(
        (stale["applied"].as_bool(), stale["reason"].as_str()),
        (Some(false), Some("stale"))
    );

    let (status, reserve) = post(
        &node.url("/v1/reservations"),
        CHECKOUT,
        Some(&format!("{run}-hold-20")),
        &reservation("m1", &sku, "dc1", 20),
    )
    .await;
    assert_eq!(status, 201, "{reserve}");
    let loss = json!({ "merchant": "m1", "sku": sku, "location": "dc1", "kind": "delta", "qty": -15,
        "source": "pos-12", "event_id": "shrink-1" });
    let (status, short) = post(&url, ADMIN, None, &loss).await;
    assert_eq!(
        (
            status,
            short["shortfall"].as_bool(),
            short["available"].as_i64()
        ),
        (200, Some(true), Some(0))
    );
    let (status, _) = post(
        &node.url("/v1/reservations"),
        CHECKOUT,
        Some(&format!("{run}-during-shortfall")),
        &reservation("m1", &sku, "dc1", 1),
    )
    .await;
    assert_eq!(status, 409);

    let settings = client()
        .put(node.url(&format!("/v1/stock/m1/{sku}/dc1/settings")))
        .bearer_auth(ADMIN)
        .json(
            &json!({ "safety_stock": 0, "backorder_limit": 10, "low_stock_threshold": 2,
                       "reorder_point": 7, "reorder_qty": 40 }),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(settings.status().as_u16(), 200);
    let applied: serde_json::Value = settings.json().await.expect("json");
    assert_eq!(
        (&applied["reorder_point"], &applied["reorder_qty"]),
        (&json!(7), &json!(40)),
        "{applied}"
    );
    // Out of range: refused, and nothing changes.
    let too_far = client()
        .put(node.url(&format!("/v1/stock/m1/{sku}/dc1/settings")))
        .bearer_auth(ADMIN)
        .json(&json!({ "reorder_point": 2_000_000_000u64 }))
        .send()
        .await
        .expect("send");
    assert_eq!(too_far.status().as_u16(), 400);
    let (status, backorder) = post(
        &node.url("/v1/reservations"),
        CHECKOUT,
        Some(&format!("{run}-backorder")),
        &reservation("m1", &sku, "dc1", 4),
    )
    .await;
    assert_eq!(status, 201, "{backorder}");
    assert_eq!(backorder["lines"][0]["backordered"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paths_reach_the_origin_intact_with_failover_and_a_502_when_none_answers() {
    let dead = format!("127.0.0.1:{}", free_port());
    let fleet = Fleet::on_stack("");
    // First upstream refuses connections; the gateway retries the next one.
    let text = fleet.config_text().replace(
        "upstreams = [\"127.0.0.1:8090\"]",
        &format!("upstreams = [\"{dead}\", \"{}\"]", fleet.origin),
    );
    fleet.write_config(&text);
    let port = free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(&fleet.config)
        .env("INVGW_LISTEN_HTTP", format!("127.0.0.1:{port}"))
        .env("INVGW_REDIS_URL", &fleet.redis_url)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start gateway");
    let _guard = Process(child);
    wait_for_port(port);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = format!("http://127.0.0.1:{port}");

    let body = "{\"order\":42,\"note\":\"ünïcode\"}";
    let response = client()
        .post(format!("{base}/shop/cart/items?page=2&sort=asc"))
        .header("X-Custom-Header", "kept-as-is")
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .expect("proxied");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-origin")
            .and_then(|v| v.to_str().ok()),
        Some("demo")
    );
    let echo: Value = response.json().await.expect("echo");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/shop/cart/items");
    assert_eq!(echo["query"], "page=2&sort=asc");
    assert_eq!(echo["headers"]["x-custom-header"], "kept-as-is");
    assert_eq!(echo["body"], body);
    assert_eq!(echo["body_bytes"], body.len());

    // No upstream answers: 502 with a JSON error.
    let text = fleet
        .config_text()
        .replace(&format!(", \"{}\"", fleet.origin), "");
    fleet.write_config(&text);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = client()
            .get(format!("{base}/anything"))
            .send()
            .await
            .expect("send");
        if response.status().as_u16() == 502 {
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["error"], "bad_gateway");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the origin edit was not applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_merchant_can_never_read_or_touch_anothers_stock_or_reservations() {
    let run = testkit::unique_id("run");
    let fleet = Fleet::on_stack("");
    let node = fleet.node("node-a");
    let sku = testkit::unique_id("private");
    restock(&node, "m1", &sku, "dc1", 10).await;
    let (status, held) = post(
        &node.url("/v1/reservations"),
        CHECKOUT,
        Some(&format!("{run}-mine")),
        &reservation("m1", &sku, "dc1", 1),
    )
    .await;
    assert_eq!(status, 201);
    let id = held["reservation_id"].as_str().expect("id");
    let m2 = OTHER_MERCHANT;

    assert_eq!(
        get(&node.url(&format!("/v1/availability/m1/{sku}")), Some(m2))
            .await
            .0,
        403
    );
    let batch = json!({ "items": [{ "merchant": "m1", "sku": sku }] });
    assert_eq!(
        post(&node.url("/v1/availability/batch"), m2, None, &batch)
            .await
            .0,
        403
    );
    assert_eq!(
        post(
            &node.url("/v1/reservations"),
            m2,
            Some("theirs"),
            &reservation("m1", &sku, "dc1", 1)
        )
        .await
        .0,
        403
    );
    assert_eq!(
        get(&node.url(&format!("/v1/reservations/{id}")), Some(m2))
            .await
            .0,
        404
    );
    for action in ["commit", "release"] {
        assert_eq!(
            post(
                &node.url(&format!("/v1/reservations/{id}/{action}")),
                m2,
                Some("x"),
                &json!({})
            )
            .await
            .0,
            404
        );
    }
    assert_eq!(
        post(
            &node.url(&format!("/v1/reservations/{id}/extend")),
            m2,
            None,
            &json!({ "ttl_seconds": 60 })
        )
        .await
        .0,
        404
    );
    let adjustment = json!({ "merchant": "m1", "sku": sku, "location": "dc1", "kind": "delta", "qty": -10, "source": "x", "event_id": "x" });
    assert_eq!(
        post(&node.url("/v1/stock/adjustments"), m2, None, &adjustment)
            .await
            .0,
        403
    );
    let settings = client()
        .put(node.url(&format!("/v1/stock/m1/{sku}/dc1/settings")))
        .bearer_auth(m2)
        .json(&json!({ "safety_stock": 10 }))
        .send()
        .await
        .expect("send");
    assert_eq!(settings.status().as_u16(), 403);
    let stream = client()
        .get(node.url(&format!("/v1/stream?merchant=m1&sku={sku}")))
        .bearer_auth(m2)
        .send()
        .await
        .expect("send");
    assert_eq!(stream.status().as_u16(), 403);

    let (_, mine) = get(&node.url(&format!("/v1/reservations/{id}")), Some(CHECKOUT)).await;
    assert_eq!(mine["status"], "held", "untouched");
    assert_eq!(available(&node, "m1", &sku).await, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_ids_are_percent_decoded_and_the_document_carries_this_nodes_bounds() {
    let fleet = Fleet::on_stack("");
    let node = fleet.node("node-a");
    let sku = format!("{}:blue", testkit::unique_id("colon"));
    restock(&node, "m1", &sku, "dc1", 3).await;
    // A client that encodes `:` in the path reads the same key.
    let encoded = sku.replace(':', "%3A");
    let (status, body) = get(
        &node.url(&format!("/v1/availability/m1/{encoded}")),
        Some(PLATFORM),
    )
    .await;
    assert_eq!(
        (status, body["sku"].as_str()),
        (200, Some(sku.as_str())),
        "{body}"
    );
    // An escape that decodes to a character ids cannot hold is refused.
    let (status, body) = get(&node.url("/v1/availability/m1/%C2%84"), Some(PLATFORM)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );

    let (_, openapi) = get(&node.url("/v1/openapi.json"), None).await;
    let config =
        config::parse(&fleet.config_text(), "the test's config", &|_| None).expect("config");
    assert_eq!(
        openapi["components"]["schemas"]["ReservationRequest"]["properties"]["ttl_seconds"]
            ["maximum"]
            .as_u64(),
        Some(config.stock.reservation_ttl_seconds_max)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints_answer() {
    let fleet = Fleet::on_stack("");
    let node = fleet.node("node-a");
    assert_eq!(get(&node.url("/health"), None).await.0, 200);
    assert_eq!(get(&node.url("/ready"), None).await.0, 200);
    let (status, openapi) = get(&node.url("/v1/openapi.json"), None).await;
    assert_eq!(status, 200);
    assert_eq!(openapi["openapi"], "3.0.3");
    for path in [
        "/v1/reservations",
        "/v1/availability/{merchant}/{sku}",
        "/v1/stream",
        "/v1/flash-sales",
    ] {
        assert!(openapi["paths"].get(path).is_some(), "{path} documented");
    }
    let _ = get(&node.url("/v1/availability/m1/anything"), None).await;
    let metrics = node.metrics().await;
    assert!(metrics.contains("invgw_requests_total"), "{metrics}");
    assert!(metrics.contains("route=\"/v1/availability/{merchant}/{sku}\""));
    assert!(metrics.contains("invgw_request_duration_seconds_bucket"));
}

/// The node's `/metrics` passes `promtool check metrics` and serves every
/// series the alert rules name, a flash sale's among them (the labelled
/// series a sale makes: a read, a hold, a refusal on a key in force).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_have_every_series_the_alerts_use() {
    let run = testkit::unique_id("metrics");
    let sku = testkit::unique_id("linted");
    let sale = testkit::unique_id("linted-drop");
    // A source never heard from: its gauge, which an alert reads, is served.
    let fleet = Fleet::on_stack(&format!(
        "{}\n[[sources]]\nmerchant = \"m1\"\nname = \"{}\"\noffline_after_seconds = 60\n",
        sale_toml(&sale, &sku, true),
        testkit::unique_id("linted-pos")
    ));
    let node = fleet.node("node-a");
    restock(&node, "m1", &sku, "dc1", 1).await;
    wait_until("the sale in force", || async {
        sale_state(&node, &sale).await["active_on_this_node"] == true
    })
    .await;
    let _ = get(&node.url(&format!("/v1/availability/m1/{sku}")), None).await;
    let body = json!({ "merchant": "m1", "lines": [{ "sku": sku, "location": "dc1", "qty": 1 }] });
    let url = node.url("/v1/reservations");
    assert_eq!(
        post(&url, CHECKOUT, Some(&format!("{run}-1")), &body)
            .await
            .0,
        201
    );
    assert_eq!(
        post(&url, CHECKOUT, Some(&format!("{run}-2")), &body)
            .await
            .0,
        409
    );
    let scrape = || node.metrics();
    // The sale's gauges are read once a second.
    let held = format!(
        "invgw_sale_reservations_total{{outcome=\"held\",sale=\"{sale}\",node=\"node-a\"}} 1"
    );
    let refused = format!(
        "invgw_sale_reservations_total{{outcome=\"insufficient\",sale=\"{sale}\",node=\"node-a\"}} 1"
    );
    let level = format!("invgw_sale_oversold_units{{sale=\"{sale}\",node=\"node-a\"}} 0");
    wait_until("the sale's series", || async {
        let metrics = scrape().await;
        metrics.contains(&held)
            && metrics.contains(&refused)
            && metrics.contains(&level)
            && testkit::exposes(&metrics, "invgw_bucket_free_units")
    })
    .await;
    let metrics = scrape().await;
    assert!(
        metrics.contains(&format!(
            "invgw_sale_refused_with_units_left_total{{sale=\"{sale}\",node=\"node-a\"}} 0"
        )),
        "{metrics}"
    );
    testkit::assert_metrics_serve_the_alerts(
        &metrics,
        "invgw_",
        Some("invgw_writer_"),
        &["invgw_bucket_free_units", "invgw_sale_pool_sellable_units"],
    );

    // The sale ends: its series leave the exposition (an alert on it
    // resolves, the dashboard stops listing it).
    fleet.write_config(
        &fleet
            .config_text()
            .replace("enabled = true", "enabled = false"),
    );
    let labelled = format!("sale=\"{sale}\"");
    wait_until("the ended sale's series gone", || async {
        !scrape().await.contains(&labelled)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_customer_is_limited_without_limiting_others() {
    let run = testkit::unique_id("run");
    let fleet = Fleet::on_stack("");
    let node = fleet.node("node-a");
    let sku = testkit::unique_id("limited");
    restock(&node, "m1", &sku, "dc1", 100).await;
    let url = node.url("/v1/reservations");
    let body = |customer: &str| json!({ "merchant": "m1", "customer_ref": customer, "lines": [{ "sku": sku, "location": "dc1", "qty": 1 }] });
    // The dev config allows 5 per second per customer; 20 at once overrun it.
    let requests: Vec<_> = (0..20)
        .map(|i| {
            let (url, body, key) = (
                url.clone(),
                body("greedy-customer"),
                format!("{run}-greedy-{i}"),
            );
            tokio::spawn(async move { post(&url, CHECKOUT, Some(&key), &body).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for request in requests {
        statuses.push(request.await.expect("request"));
    }
    assert!(
        statuses.iter().all(|status| [201, 429].contains(status)),
        "{statuses:?}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
    let (status, other) = post(
        &url,
        CHECKOUT,
        Some(&format!("{run}-polite")),
        &body("polite-customer"),
    )
    .await;
    assert_eq!(status, 201, "another customer is not limited: {other}");
}

/// A fleet whose dev config has `from` replaced by `to` (each must occur).
fn fleet_with(changes: &[(&str, &str)]) -> Fleet {
    let fleet = Fleet::on_stack("");
    let mut text = fleet.config_text();
    for (from, to) in changes {
        assert!(text.contains(from), "dev.toml has no {from}");
        text = text.replace(from, to);
    }
    fleet.write_config(&text);
    fleet
}

fn retry_after(response: &reqwest::Response) -> Option<u64> {
    response
        .headers()
        .get("retry-after")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_reads_are_limited_per_client_address_and_keyed_reads_by_their_key() {
    let fleet = fleet_with(&[(
        "public_reads_per_second_per_client = 1000",
        "public_reads_per_second_per_client = 5",
    )]);
    let node = fleet.node("node-a");
    let sku = testkit::unique_id("crowded");
    restock(&node, "m1", &sku, "dc1", 10).await;
    let url = node.url(&format!("/v1/availability/m1/{sku}"));
    let mut limited = None;
    let mut served = 0;
    for _ in 0..20 {
        let response = client().get(&url).send().await.expect("send");
        match response.status().as_u16() {
            200 => served += 1,
            429 => {
                limited = Some(response);
                break;
            }
            other => panic!("anonymous read answered {other}"),
        }
    }
    let limited = limited.expect("an anonymous client over its budget is refused");
    assert!(served >= 1, "the burst lets the first reads through");
    assert!(retry_after(&limited).is_some_and(|seconds| seconds >= 1));
    let body: Value = limited.json().await.expect("json");
    assert_eq!(body["error"], "rate_limited");
    // The batch read counts against the same budget.
    let batch = client()
        .post(node.url("/v1/availability/batch"))
        .json(&json!({ "items": [{ "merchant": "m1", "sku": sku }] }))
        .send()
        .await
        .expect("send");
    assert_eq!(batch.status().as_u16(), 429);
    // A caller with a key is limited by its key, not by its address.
    let (status, keyed) = get(&url, Some(READ)).await;
    assert_eq!(status, 200, "{keyed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_batch_costs_a_read_per_item_and_a_trusted_proxy_names_the_client() {
    let fleet = fleet_with(&[
        (
            "public_reads_per_second_per_client = 1000",
            "public_reads_per_second_per_client = 5",
        ),
        (
            "public_reads = true",
            "public_reads = true\ntrusted_proxies = [\"127.0.0.1\"]",
        ),
    ]);
    let node = fleet.node("node-a");
    let sku = testkit::unique_id("proxied");
    restock(&node, "m1", &sku, "dc1", 10).await;
    let batch = |items: usize, forwarded_for: &str| {
        let body = json!({ "items": vec![json!({ "merchant": "m1", "sku": sku }); items] });
        let request = client()
            .post(node.url("/v1/availability/batch"))
            .header("X-Forwarded-For", format!("203.0.113.9, {forwarded_for}"))
            .json(&body);
        async move { request.send().await.expect("send").status().as_u16() }
    };
    // Ten items are ten reads: more than a budget of five can ever admit
    // at once, which is a 400, not a wait.
    assert_eq!(batch(10, "198.51.100.1").await, 400);
    // That request still cost its one read; four more are the budget's
    // rest, and the next read of that client waits.
    assert_eq!(batch(4, "198.51.100.1").await, 200);
    assert_eq!(batch(1, "198.51.100.1").await, 429);
    // Each client behind the proxy has its own budget.
    assert_eq!(batch(5, "198.51.100.2").await, 200);
    assert_eq!(batch(5, "198.51.100.3").await, 200);
    assert_eq!(batch(1, "198.51.100.2").await, 429);
    // One IPv6 host is its /64, whichever address it takes in it.
    assert_eq!(batch(5, "2001:db8:1:2::1").await, 200);
    assert_eq!(batch(1, "2001:db8:1:2::ffff").await, 429);
    // A client's own header line comes first, the proxy's last: the
    // proxy's is the one believed.
    let read = |lines: &'static [&'static str]| {
        let mut request = client().get(node.url(&format!("/v1/availability/m1/{sku}")));
        for line in lines {
            request = request.header("X-Forwarded-For", *line);
        }
        async move { request.send().await.expect("send").status().as_u16() }
    };
    assert_eq!(
        read(&["198.51.100.2", "198.51.100.5"]).await,
        200,
        "198.51.100.5 has its budget"
    );
    // An entry the chain cannot read stops it: the client written to its
    // left is not believed (the proxy's own address is charged instead).
    for _ in 0..5 {
        assert_eq!(read(&["198.51.100.6, unknown"]).await, 200);
    }
    assert_eq!(
        batch(1, "198.51.100.6").await,
        200,
        "198.51.100.6 was not charged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_batch_is_one_request_of_its_key() {
    let fleet = Fleet::on_stack("");
    let node = fleet.node("node-a");
    let sku = testkit::unique_id("keyed-batch");
    restock(&node, "m1", &sku, "dc1", 10).await;
    // The slow key's bucket holds one request: a batch of three items is it.
    let (status, body) = post(
        &node.url("/v1/availability/batch"),
        SLOW,
        None,
        &json!({ "items": vec![json!({ "merchant": "m1", "sku": sku }); 3] }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailing_slash_names_the_same_route() {
    let fleet = Fleet::on_stack("");
    let node = fleet.node("node-a");
    let (status, health) = get(&node.url("/health/"), None).await;
    assert_eq!(
        (status, health["status"].as_str()),
        (200, Some("ok")),
        "answered locally"
    );
    let (status, body) = get(&node.url("/v1/reservations/"), Some(CHECKOUT)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    // An action with a trailing slash is that action.
    let sku = testkit::unique_id("slash");
    restock(&node, "m1", &sku, "dc1", 5).await;
    let (status, held) = post(
        &node.url("/v1/reservations"),
        CHECKOUT,
        Some(&testkit::unique_id("slash-hold")),
        &json!({ "merchant": "m1", "lines": [{ "sku": sku, "location": "dc1", "qty": 1 }] }),
    )
    .await;
    assert_eq!(status, 201, "{held}");
    let id = held["reservation_id"].as_str().expect("id");
    let (status, committed) = post(
        &node.url(&format!("/v1/reservations/{id}/commit/")),
        CHECKOUT,
        Some(&testkit::unique_id("slash-commit")),
        &json!({}),
    )
    .await;
    assert_eq!(
        (status, committed["status"].as_str()),
        (200, Some("committed")),
        "{committed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_more_streams_than_its_cap() {
    let fleet = fleet_with(&[(
        "sse_streams_per_client_max = 8",
        "sse_streams_per_client_max = 2",
    )]);
    let node = fleet.node("node-a");
    let sku = testkit::unique_id("watched");
    restock(&node, "m1", &sku, "dc1", 10).await;
    let url = node.url(&format!("/v1/stream?merchant=m1&sku={sku}"));
    let open = |url: String| async move { client().get(&url).send().await.expect("send") };
    let first = open(url.clone()).await;
    let second = open(url.clone()).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = open(url.clone()).await;
    assert_eq!(third.status().as_u16(), 429);
    assert!(retry_after(&third).is_some_and(|seconds| seconds >= 1));
    // A stream that ends gives its slot back.
    drop(first);
    wait_until("a closed stream's slot is free again", || {
        let url = url.clone();
        async move { open(url).await.status().as_u16() == 200 }
    })
    .await;
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_is_answered_from_memory_and_found_once_created() {
    // A negative answer kept a minute: only the creation's notification
    // can end it within this test.
    let fleet = fleet_with(&[("not_found_ttl_ms = 1000", "not_found_ttl_ms = 60000")]);
    let node = fleet.node("node-a");
    let sku = testkit::unique_id("soon");
    let url = node.url(&format!("/v1/availability/m1/{sku}"));
    let negative = || async {
        let metrics = node.metrics().await;
        metrics
            .lines()
            .find(|line| line.starts_with("invgw_availability_cache_total{result=\"negative\""))
            .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(get(&url, None).await.0, 404);
    let before = negative().await;
    assert_eq!(get(&url, None).await.0, 404);
    assert_eq!(
        negative().await,
        before + 1,
        "the second 404 came from memory"
    );
    restock(&node, "m1", &sku, "dc1", 6).await;
    wait_until("the new key is served", || {
        let url = url.clone();
        async move { get(&url, None).await.0 == 200 }
    })
    .await;
    let (status, body) = get(&url, None).await;
    assert_eq!((status, body["available"].as_i64()), (200, Some(6)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_path_with_another_method_is_405_with_allow() {
    let fleet = Fleet::on_stack("");
    let node = fleet.node("node-a");
    let response = client()
        .delete(node.url("/v1/reservations"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(
        response
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok()),
        Some("POST")
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "method_not_allowed");
}
