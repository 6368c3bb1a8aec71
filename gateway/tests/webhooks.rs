//! The webhook registration routes as a partner's admin meets them, on a
//! real gateway and PostgreSQL (a schema of the test's own, with the ledger
//! writer's migrations applied): register, replace, read without the
//! secret, the deliveries log, delete; refusals for bad events, secrets and
//! targets (a private address, as an attacker would aim a webhook at the
//! metadata service), other merchants and scopes; the secret sealed at rest.
//! Deliveries themselves are the ledger writer's (its `webhooks` test).

mod common;

use common::*;
use serde_json::{Value, json};

/// A fresh PostgreSQL schema with every migration of the ledger writer
/// applied, in order (the files the writer applies; its own `migrate` is
/// tested there): its URL.
async fn migrated_schema() -> String {
    let stack = testkit::stack();
    let schema = format!("t_{}", testkit::unique_id("gw").replace('-', "_"));
    let (client, connection) = tokio_postgres::connect(&stack.postgres_url, tokio_postgres::NoTls)
        .await
        .expect("postgresql");
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path = {schema}"
        ))
        .await
        .expect("schema");
    let directory = testkit::repository_root().join("ledger-writer/migrations");
    let mut files: Vec<_> = std::fs::read_dir(&directory)
        .expect("migrations")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(|c: char| c.is_ascii_digit()))
        })
        .collect();
    files.sort();
    for file in files {
        let sql = std::fs::read_to_string(&file).expect("migration");
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|error| panic!("{}: {error}", file.display()));
    }
    format!("{}?options=-c%20search_path%3D{schema}", stack.postgres_url)
}

async fn send(method: reqwest::Method, url: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = client().request(method, url).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_registers_reads_and_deletes_a_webhook_whose_secret_is_never_shown() {
    let postgres_url = migrated_schema().await;
    let mut fleet = Fleet::on_stack("");
    // As in production: only public addresses.
    fleet.write_config(&fleet.config_text().replace(
        "allow_private_targets = true",
        "allow_private_targets = false",
    ));
    fleet.postgres_url = postgres_url.clone();
    let node = fleet.node("node-a");
    let name = testkit::unique_id("erp");
    let url = node.url(&format!("/v1/webhooks/m1/{name}"));
    let secret = "whsec-0123456789abcdef";
    let body = json!({
        "url": "https://93.184.216.34/hooks/stock",
        "events": ["out_of_stock", "back_in_stock"],
        "secret": secret,
    });

    let (status, created) = send(reqwest::Method::PUT, &url, ADMIN, Some(body.clone())).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        created,
        json!({ "merchant": "m1", "name": name, "url": "https://93.184.216.34/hooks/stock",
                "events": ["out_of_stock", "back_in_stock"] })
    );
    let mut replaced = body.clone();
    replaced["events"] = json!(["reorder"]);
    let (status, again) = send(reqwest::Method::PUT, &url, ADMIN, Some(replaced)).await;
    assert_eq!(
        (status, &again["events"]),
        (200, &json!(["reorder"])),
        "{again}"
    );
    let (status, shown) = send(reqwest::Method::GET, &url, ADMIN, None).await;
    assert_eq!(status, 200, "{shown}");
    assert!(!shown.to_string().contains(secret), "{shown}");
    assert_eq!(shown["events"], json!(["reorder"]));

    // Sealed at rest: the stored bytes do not hold the secret.
    let (database, connection) = tokio_postgres::connect(&postgres_url, tokio_postgres::NoTls)
        .await
        .expect("postgresql");
    tokio::spawn(connection);
    let sealed: Vec<u8> = database
        .query_one(
            "SELECT secret_sealed FROM webhooks WHERE merchant = 'm1' AND name = $1",
            &[&name],
        )
        .await
        .expect("row")
        .get(0);
    assert!(
        !sealed
            .windows(secret.len())
            .any(|window| window == secret.as_bytes())
    );

    // Refusals change nothing.
    for (bad, reason) in [
        (json!({ "events": ["sold_out"] }), "unknown event"),
        (json!({ "events": ["availability"] }), "not delivered yet"),
        (json!({ "secret": "short" }), "secret must be"),
        (json!({ "url": "http://93.184.216.34/hook" }), "https"),
        (
            json!({ "url": "https://127.0.0.1/hook" }),
            "public addresses only",
        ),
        (
            json!({ "url": "https://169.254.169.254/latest/meta-data" }),
            "public addresses only",
        ),
        (
            json!({ "url": "https://[64:ff9b::a9fe:a9fe]/hook" }),
            "public addresses only",
        ),
        (
            json!({ "url": "https://user:pw@93.184.216.34/" }),
            "credentials",
        ),
    ] {
        let mut request = body.clone();
        for (field, value) in bad.as_object().expect("object") {
            request[field] = value.clone();
        }
        let (status, refused) = send(reqwest::Method::PUT, &url, ADMIN, Some(request)).await;
        assert_eq!(
            (status, refused["error"].as_str()),
            (400, Some("bad_request")),
            "{refused}"
        );
        assert!(
            refused["message"]
                .as_str()
                .is_some_and(|m| m.contains(reason)),
            "{reason}: {refused}"
        );
    }
    let (_, still) = send(reqwest::Method::GET, &url, ADMIN, None).await;
    assert_eq!(still["events"], json!(["reorder"]));

    // Another merchant's key, a key without the admin scope.
    let (status, _) = send(reqwest::Method::GET, &url, OTHER_MERCHANT, None).await;
    assert_eq!(status, 403);
    let (status, _) = send(reqwest::Method::PUT, &url, READ, Some(body.clone())).await;
    assert_eq!(status, 403);

    // The deliveries log (none yet), and the methods the path takes.
    let (status, log) = send(
        reqwest::Method::GET,
        &format!("{url}/deliveries"),
        ADMIN,
        None,
    )
    .await;
    assert_eq!((status, &log["deliveries"]), (200, &json!([])), "{log}");
    let response = client()
        .post(&url)
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(
        response
            .headers()
            .get("allow")
            .and_then(|value| value.to_str().ok()),
        Some("PUT, GET, DELETE")
    );

    // At most 20 webhooks per merchant (this one and 19 more).
    let sibling = |n: u32| node.url(&format!("/v1/webhooks/m1/{name}-{n}"));
    for n in 0..19 {
        let (status, reply) =
            send(reqwest::Method::PUT, &sibling(n), ADMIN, Some(body.clone())).await;
        assert_eq!(status, 201, "{n}: {reply}");
    }
    let (status, refused) = send(
        reqwest::Method::PUT,
        &sibling(20),
        ADMIN,
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("at most 20")),
        "{refused}"
    );

    let (status, deleted) = send(reqwest::Method::DELETE, &url, ADMIN, None).await;
    assert_eq!(
        (status, &deleted["deleted"]),
        (200, &json!(true)),
        "{deleted}"
    );
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let (status, gone) = send(method, &url, ADMIN, None).await;
        assert_eq!(
            (status, gone["error"].as_str()),
            (404, Some("not_found")),
            "{gone}"
        );
    }
}
