//! Allocation through the API on two real gateway nodes (API.md
//! "Allocation"): lines without a location, the merchant's location
//! settings (config and `PUT /v1/locations`), split lines, partial holds,
//! and checkouts racing for the last units across locations.
//!
//! Each test's locations are its own (`a-<run>`, ...): a merchant's
//! location settings are shared by every test of merchant m1.

mod common;

use common::*;
use serde_json::{Value, json};

async fn put_location(node: &Node, key: &str, location: &str, body: &Value) -> (u16, Value) {
    let response = client()
        .put(node.url(&format!("/v1/locations/m1/{location}")))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `(location, qty, line)` of every hold of a reservation body.
fn holds(body: &Value) -> Vec<(String, i64, i64)> {
    body["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|hold| {
            (
                hold["location"].as_str().expect("location").to_owned(),
                hold["qty"].as_i64().expect("qty"),
                hold["line"].as_i64().expect("line"),
            )
        })
        .collect()
}

async fn reserve(node: &Node, key: &str, body: &Value) -> (u16, Value) {
    post(&node.url("/v1/reservations"), CHECKOUT, Some(key), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_without_a_location_are_placed_split_and_held_partially() {
    let run = testkit::unique_id("run");
    let (a, b, c) = (format!("a-{run}"), format!("b-{run}"), format!("c-{run}"));
    // c may not ship unless a line names it (config).
    let fleet = Fleet::on_stack(&format!(
        "\n[[locations]]\nmerchant = \"m1\"\nlocation = \"{c}\"\nship_from = false\npriority = 50\n"
    ));
    let (one, two) = (fleet.node("node-a"), fleet.node("node-b"));
    let sku = testkit::unique_id("tee");
    restock(&one, "m1", &sku, &a, 3).await;
    restock(&one, "m1", &sku, &b, 4).await;
    restock(&one, "m1", &sku, &c, 9).await;

    // The settings route: admin only, bounded, answered as in force.
    let (status, body) = put_location(&one, CHECKOUT, &a, &json!({ "priority": 10 })).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let (status, body) = put_location(&one, ADMIN, &a, &json!({ "priority": 10_000_000 })).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    let (status, body) = put_location(
        &one,
        ADMIN,
        &a,
        &json!({ "priority": 10, "ship_from": true }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({ "merchant": "m1", "location": a, "priority": 10, "ship_from": true, "set_by": "api" })
    );
    let (status, body) = get(&two.url(&format!("/v1/locations/m1/{c}")), Some(ADMIN)).await;
    assert_eq!(
        (status, body["set_by"].as_str(), body["ship_from"].as_bool()),
        (200, Some("config"), Some(false))
    );
    let (_, body) = get(&two.url(&format!("/v1/locations/m1/{b}")), Some(ADMIN)).await;
    assert_eq!(
        (body["set_by"].as_str(), body["priority"].as_i64()),
        (Some("default"), Some(0))
    );

    // Priority first (a, set through the API on node-a, decides on node-b).
    let line = |qty: i64, extra: Value| {
        let mut line = json!({ "sku": sku, "qty": qty });
        line.as_object_mut()
            .expect("object")
            .extend(extra.as_object().cloned().unwrap_or_default());
        line
    };
    let body = |lines: Vec<Value>, partial: bool| json!({ "merchant": "m1", "lines": lines, "allow_partial": partial });
    let (status, first) = reserve(
        &two,
        &format!("{run}-1"),
        &body(vec![line(2, json!({}))], false),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(holds(&first), vec![(a.clone(), 2, 0)]);
    assert_eq!(first["lines"][0]["backordered"], 0);

    // Split: a's last unit, then b (c may not ship).
    let split = body(vec![line(5, json!({ "allow_split": true }))], false);
    let (status, held) = reserve(&one, &format!("{run}-2"), &split).await;
    assert_eq!(status, 201, "{held}");
    assert_eq!(holds(&held), vec![(a.clone(), 1, 0), (b.clone(), 4, 0)]);
    // The same key and body on the other node: the same reservation.
    let (status, replay) = reserve(&two, &format!("{run}-2"), &split).await;
    assert_eq!((status, &replay), (201, &held));
    let (status, reused) = reserve(
        &two,
        &format!("{run}-2"),
        &body(vec![line(5, json!({}))], false),
    )
    .await;
    assert_eq!(
        (status, reused["error"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{reused}"
    );

    // Nothing left that may ship: 409, the line without a location shown so.
    let (status, refused) = reserve(
        &one,
        &format!("{run}-3"),
        &body(vec![line(1, json!({}))], false),
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(
        refused["lines"],
        json!([{ "sku": sku, "location": null, "line": 0, "requested": 1, "available": 0 }])
    );
    // Named, c ships: in prefer, or as the line's location.
    let (status, named) = reserve(
        &one,
        &format!("{run}-4"),
        &body(vec![line(2, json!({ "prefer": [c] }))], false),
    )
    .await;
    assert_eq!(status, 201, "{named}");
    assert_eq!(holds(&named), vec![(c.clone(), 2, 0)]);

    // Releasing the split reservation returns both holds.
    let id = held["reservation_id"].as_str().expect("id");
    let (status, released) = post(
        &two.url(&format!("/v1/reservations/{id}/release")),
        CHECKOUT,
        Some(&format!("{run}-r")),
        &json!({}),
    )
    .await;
    assert_eq!(
        (status, released["status"].as_str()),
        (200, Some("released")),
        "{released}"
    );
    assert_eq!(holds(&released), holds(&held));

    // Partial: 10 wanted, not split: what the first location by the rules
    // has (a, by priority), the line listed as unfilled.
    let (status, partial) = reserve(
        &one,
        &format!("{run}-5"),
        &body(vec![line(10, json!({}))], true),
    )
    .await;
    assert_eq!(status, 201, "{partial}");
    assert_eq!(
        partial["lines"],
        json!([{ "sku": sku, "location": a, "qty": 1, "backordered": 0, "line": 0, "requested": 10, "held": 1 }])
    );
    assert_eq!(
        partial["unfilled"],
        json!([{ "line": 0, "sku": sku, "requested": 10, "held": 1 }])
    );
    let id = partial["reservation_id"].as_str().expect("id");
    let (status, read) = get(&two.url(&format!("/v1/reservations/{id}")), Some(CHECKOUT)).await;
    assert_eq!(status, 200);
    assert_eq!(
        (&read["lines"], &read["unfilled"]),
        (&partial["lines"], &partial["unfilled"])
    );
    // A SKU stocked nowhere: 404, as for an unknown key.
    let unknown = json!({ "merchant": "m1", "allow_partial": true,
        "lines": [{ "sku": testkit::unique_id("nowhere"), "qty": 1 }] });
    let (status, refused) = reserve(&one, &format!("{run}-6"), &unknown).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (404, Some("not_found")),
        "{refused}"
    );

    // Bad lines change nothing.
    for (bad, why) in [
        (
            json!({ "sku": sku, "location": a, "qty": 1, "prefer": [b] }),
            "prefer with a location",
        ),
        (
            json!({ "sku": sku, "location": a, "qty": 1, "allow_split": true }),
            "split with a location",
        ),
        (
            json!({ "sku": sku, "qty": 1, "prefer": ["bad id!"] }),
            "a bad id",
        ),
        (
            json!({ "sku": sku, "qty": 1, "prefer": (0..51).map(|i| format!("l{i}")).collect::<Vec<_>>() }),
            "51 preferences",
        ),
    ] {
        let (status, body) = reserve(
            &one,
            &testkit::unique_id("bad"),
            &json!({ "merchant": "m1", "lines": [bad] }),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_request")),
            "{why}: {body}"
        );
    }
    let (status, body) = reserve(
        &one,
        &testkit::unique_id("dup"),
        &json!({ "merchant": "m1", "lines": [{ "sku": sku, "qty": 1 }, { "sku": sku, "qty": 2 }] }),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    // a: all held; b: its 4 back; c: 2 held (shown, though it may not ship).
    assert_eq!(available(&one, "m1", &sku).await, 4 + 7);
}

/// Two nodes' checkouts race for the last 3 units, 1 at one location and 2
/// at another, each line placed by the allocator: never more than 3 held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_racing_for_the_last_units_over_two_locations_never_hold_more() {
    let run = testkit::unique_id("run");
    let fleet = Fleet::on_stack("");
    let nodes = [fleet.node("node-a"), fleet.node("node-b")];
    let sku = testkit::unique_id("last");
    restock(&nodes[0], "m1", &sku, &format!("x-{run}"), 1).await;
    restock(&nodes[0], "m1", &sku, &format!("y-{run}"), 2).await;
    let mut racers = Vec::new();
    for racer in 0..30usize {
        let url = nodes[racer % 2].url("/v1/reservations");
        let body = json!({ "merchant": "m1", "allow_partial": racer % 5 == 0,
            "lines": [{ "sku": sku, "qty": 1 + racer % 2, "allow_split": racer % 3 == 0 }] });
        let key = format!("{run}-{racer}");
        racers.push(tokio::spawn(async move {
            post(&url, CHECKOUT, Some(&key), &body).await
        }));
    }
    let mut held = 0;
    for racer in racers {
        let (status, body) = racer.await.expect("racer");
        match status {
            201 => held += holds(&body).iter().map(|(_, qty, _)| qty).sum::<i64>(),
            409 => assert_eq!(body["error"], "insufficient_stock", "{body}"),
            _ => panic!("{status}: {body}"),
        }
    }
    assert!(held <= 3, "held {held} of 3");
    assert_eq!(available(&nodes[1], "m1", &sku).await, 3 - held);
}

async fn send_substitutes(
    node: &Node,
    method: reqwest::Method,
    key: &str,
    sku: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut request = client()
        .request(method, node.url(&format!("/v1/substitutes/m1/{sku}")))
        .bearer_auth(key);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_line_is_filled_with_its_substitutes_through_the_api() {
    let run = testkit::unique_id("run");
    let fleet = Fleet::on_stack("");
    let (one, two) = (fleet.node("node-a"), fleet.node("node-b"));
    let (six, twelve) = (format!("six-{run}"), format!("twelve-{run}"));
    let store = format!("s-{run}");
    restock(&one, "m1", &six, &store, 3).await;
    restock(&one, "m1", &twelve, &store, 5).await;
    let definition = json!({ "substitutes": [{ "sku": twelve, "units": 1, "replaces": 2 }] });

    let (status, body) = send_substitutes(
        &one,
        reqwest::Method::PUT,
        CHECKOUT,
        &six,
        Some(&definition),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let bad = json!({ "substitutes": [{ "sku": twelve, "units": 0, "replaces": 2 }] });
    let (status, body) =
        send_substitutes(&one, reqwest::Method::PUT, ADMIN, &six, Some(&bad)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    let (status, body) =
        send_substitutes(&one, reqwest::Method::PUT, ADMIN, &six, Some(&definition)).await;
    assert_eq!(status, 200, "{body}");
    let (status, read) = send_substitutes(&two, reqwest::Method::GET, ADMIN, &six, None).await;
    assert_eq!((status, &read), (200, &body));

    // 7 six-packs: its own 3, and two twelve-packs for the 4 missing: exact.
    let line = json!({ "sku": six, "location": store, "qty": 7, "substitutes": "allow" });
    let (status, held) = reserve(
        &two,
        &format!("{run}-1"),
        &json!({ "merchant": "m1", "lines": [line] }),
    )
    .await;
    assert_eq!(status, 201, "{held}");
    assert_eq!(
        held["lines"],
        json!([
            { "sku": six, "location": store, "qty": 3, "backordered": 0, "line": 0 },
            { "sku": twelve, "location": store, "qty": 2, "backordered": 0, "line": 0,
              "substitute_for": six, "stands_for": 4 },
        ])
    );
    // 1 more, none of its own left: a twelve-pack stands for 2, more than
    // asked, so no exact fill: short.
    let line = json!({ "sku": six, "location": store, "qty": 1, "substitutes": "allow" });
    let (status, refused) = reserve(
        &one,
        &format!("{run}-2"),
        &json!({ "merchant": "m1", "lines": [line] }),
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    let line = json!({ "sku": six, "location": store, "qty": 1, "substitutes": "maybe" });
    let (status, body) = reserve(
        &one,
        &format!("{run}-3"),
        &json!({ "merchant": "m1", "lines": [line] }),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );

    let (status, _) = send_substitutes(&one, reqwest::Method::DELETE, ADMIN, &six, None).await;
    assert_eq!(status, 200);
    let (status, _) = send_substitutes(&one, reqwest::Method::GET, ADMIN, &six, None).await;
    assert_eq!(status, 404);
}
