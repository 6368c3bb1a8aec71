//! Partner webhooks end to end: stock signals relayed by the writer and
//! delivered to real local HTTP receivers: signed (checked here with an
//! HMAC computed independently), retried with the same `Webhook-Id` until
//! a 2xx, in order per stock key, a dead receiver delaying nobody else, and
//! a pending delivery surviving the writer's restart.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allocator::StockKey;
use http_body_util::BodyExt;
use hyper::{Request, Response};

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
}

/// How a receiver answers a request, given every request it got (this one
/// last).
type Script = Arc<dyn Fn(&[Received]) -> Answer + Send + Sync>;

#[derive(Clone, Copy)]
enum Answer {
    Status(u16),
    /// Never answers (the attempt times out).
    Hang,
}

/// A local HTTP receiver: its URL and what it got.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
}

async fn receiver(script: Script) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let seen = Arc::clone(&got);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (seen, script) = (Arc::clone(&seen), Arc::clone(&script));
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let (seen, script) = (Arc::clone(&seen), Arc::clone(&script));
                        async move {
                            let header = |name: &str| {
                                request
                                    .headers()
                                    .get(name)
                                    .and_then(|value| value.to_str().ok())
                                    .unwrap_or_default()
                                    .to_owned()
                            };
                            let (id, timestamp, signature) = (
                                header("webhook-id"),
                                header("webhook-timestamp"),
                                header("webhook-signature"),
                            );
                            let body = request
                                .into_body()
                                .collect()
                                .await
                                .expect("body")
                                .to_bytes();
                            let answer = {
                                let mut seen = seen.lock().expect("lock");
                                seen.push(Received {
                                    id,
                                    timestamp,
                                    signature,
                                    body: String::from_utf8_lossy(&body).into_owned(),
                                });
                                script(&seen)
                            };
                            let status = match answer {
                                Answer::Status(status) => status,
                                Answer::Hang => {
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                    200
                                }
                            };
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .expect("response"),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Receiver { url, got }
}

impl Receiver {
    fn got(&self) -> Vec<Received> {
        self.got.lock().expect("lock").clone()
    }
}

/// HMAC-SHA256 of `id.timestamp.body`, hex, computed here (not with the
/// product's code).
fn expected_signature(secret: &str, received: &Received) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{}.{}.{}", received.id, received.timestamp, received.body).as_bytes());
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const SECRET: &str = "whsec-test-0123456789";

async fn register(setup: &common::Setup, name: &str, url: &str) {
    let config = config::load_file(&setup.config_path).expect("config");
    let sealer = webhooks::Sealer::new(&config.webhooks.secret_key).expect("key");
    let client = common::postgres(setup).await;
    let webhook = webhooks::Webhook {
        merchant: "m1".to_owned(),
        name: name.to_owned(),
        url: url.to_owned(),
        events: vec!["out_of_stock".to_owned(), "back_in_stock".to_owned()],
    };
    webhooks::store::put(&client, &webhook, &sealer.seal("m1", name, SECRET))
        .await
        .expect("register");
}

/// Waits until the writer has migrated the schema (it creates the tables).
async fn wait_for_schema(setup: &common::Setup) {
    let client = common::postgres(setup).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .query_one("SELECT 1 FROM webhooks LIMIT 1", &[])
        .await
        .is_err_and(|error| error.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE))
    {
        assert!(Instant::now() < deadline, "the writer did not migrate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_retried_in_order_isolated_and_survive_a_restart() {
    let (_redis, setup, allocator) = common::harness(&[(
        "allow_private_targets = true",
        "allow_private_targets = true\nretry_first_ms = 200\nretry_max_ms = 400\ntimeout_ms = 1000",
    )])
    .await;
    // Proxies in its environment that go nowhere: a delivery that used one
    // (and so let it resolve the partner's name again, past the address
    // check) would never arrive.
    let writer = testkit::KillOnDrop(
        common::writer_command_as(&setup, "run", "writer-1", setup.metrics_port)
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .env("ALL_PROXY", "http://127.0.0.1:9")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start ledger-writer"),
    );
    wait_for_schema(&setup).await;

    let healthy = receiver(Arc::new(|_| Answer::Status(204))).await;
    // Fails the first delivery it sees three times, then takes everything.
    let flaky = receiver(Arc::new(|seen: &[Received]| {
        let (first, this) = (&seen[0].id, &seen[seen.len() - 1].id);
        let tries = seen.iter().filter(|r| &r.id == first).count();
        Answer::Status(if this == first && tries <= 3 {
            500
        } else {
            200
        })
    }))
    .await;
    let dead = receiver(Arc::new(|_| Answer::Hang)).await;
    register(&setup, "healthy", &healthy.url).await;
    register(&setup, "flaky", &flaky.url).await;
    register(&setup, "dead", &dead.url).await;

    // Key one: back in stock, out of stock, back in stock; key two: back
    // in stock.
    let one = StockKey::new("m1", testkit::unique_id("kettle"), "dc1");
    let two = StockKey::new("m1", testkit::unique_id("toaster"), "dc1");
    common::restock(&allocator, &one, 5).await;
    common::restock(&allocator, &one, -5).await;
    common::restock(&allocator, &one, 3).await;
    common::restock(&allocator, &two, 2).await;

    // The healthy receiver gets all four at once: the dead one (every
    // attempt hangs for the whole timeout) and the flaky one delay nothing.
    let started = Instant::now();
    wait_for(
        "the healthy receiver's four",
        Duration::from_secs(30),
        || healthy.got().len() >= 4,
    )
    .await;
    let got = healthy.got();
    assert_eq!(got.len(), 4, "{got:#?}");
    for received in &got {
        assert_eq!(received.signature, expected_signature(SECRET, received));
        let payload: serde_json::Value = serde_json::from_str(&received.body).expect("json");
        assert_eq!(payload["signal_id"], received.id.as_str());
    }
    let kinds_of = |received: &[Received], key: &StockKey| -> Vec<String> {
        received
            .iter()
            .filter_map(|r| {
                let payload: serde_json::Value = serde_json::from_str(&r.body).ok()?;
                (payload["sku"] == key.sku.as_str())
                    .then(|| payload["kind"].as_str().unwrap_or_default().to_owned())
            })
            .collect()
    };
    assert_eq!(
        kinds_of(&got, &one),
        ["back_in_stock", "out_of_stock", "back_in_stock"]
    );
    assert_eq!(kinds_of(&got, &two), ["back_in_stock"]);
    assert!(!dead.got().is_empty(), "the dead receiver was tried too");

    // The flaky receiver failed its first delivery's first attempts; kill
    // the writer while that delivery is pending, start another: it goes on
    // from PostgreSQL.
    wait_for(
        "a failed attempt at the flaky receiver",
        Duration::from_secs(30),
        || !flaky.got().is_empty(),
    )
    .await;
    drop(writer);
    let _writer = common::start_writer(&setup);
    wait_for(
        "the flaky receiver's deliveries",
        Duration::from_secs(60),
        || {
            let got = flaky.got();
            let ids: std::collections::HashSet<&str> = got.iter().map(|r| r.id.as_str()).collect();
            let first_tries = got.iter().filter(|r| r.id == got[0].id).count();
            ids.len() >= 4 && first_tries >= 4
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = flaky.got();
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    for received in &got {
        *by_id.entry(received.id.as_str()).or_default() += 1;
    }
    let first = got[0].id.as_str();
    assert_eq!(
        by_id[first], 4,
        "three failures then the one success, same Webhook-Id: {got:#?}"
    );
    // The others at least once (an attempt answered just as its writer was
    // killed is made again: at least once, same Webhook-Id).
    assert_eq!(by_id.len(), 4, "{got:#?}");
    // In order per key, also across the failures and the restart: the
    // key's next delivery came only after the one before it succeeded.
    let successes: Vec<Received> = {
        let mut seen = std::collections::HashSet::new();
        got.iter()
            .rev()
            .filter(|r| seen.insert(r.id.clone()))
            .cloned()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    };
    assert_eq!(
        kinds_of(&successes, &one),
        ["back_in_stock", "out_of_stock", "back_in_stock"]
    );
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "{:?}",
        started.elapsed()
    );

    // The deliveries log says so (an attempt the killed writer made but
    // did not record is made again once its claim lapses).
    let client = common::postgres(&setup).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = client
            .query(
                "SELECT name, status, count(*)::int FROM webhook_deliveries GROUP BY name, status ORDER BY name, status",
                &[],
            )
            .await
            .expect("deliveries");
        let summary: Vec<(String, String, i32)> = rows
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        let settled = summary.contains(&("flaky".to_owned(), "delivered".to_owned(), 4))
            && summary.contains(&("healthy".to_owned(), "delivered".to_owned(), 4))
            && summary
                .iter()
                .any(|(name, status, _)| name == "dead" && status == "pending");
        if settled {
            break;
        }
        assert!(Instant::now() < deadline, "{summary:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
