//! Harness for the gateway's tests: real gateway and demo-origin processes
//! against the stack's Redis (or a private one), each test with its own
//! ports, merchants and config file.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const ADMIN: &str = "dev-admin-key";
pub const CHECKOUT: &str = "dev-checkout-key";
pub const READ: &str = "dev-read-key";
pub const OTHER_MERCHANT: &str = "dev-m2-key";
pub const PLATFORM: &str = "dev-platform-key";
/// A key added by the tests' config with one request per second.
pub const SLOW: &str = "test-slow-key";

pub use testkit::{KillOnDrop as Process, free_port, wait_for_port};

/// A config file for a test's fleet: dev.toml plus `extra` TOML appended.
pub struct Fleet {
    pub directory: tempfile::TempDir,
    pub config: PathBuf,
    pub redis_url: String,
    /// The PostgreSQL its nodes use (for the webhook routes only).
    pub postgres_url: String,
    pub origin: String,
    _origin: Option<Process>,
}

pub fn dev_config_text() -> String {
    std::fs::read_to_string(testkit::repository_root().join("config/dev.toml")).expect("dev.toml")
}

/// The extra API key with a tiny rate limit, as TOML.
pub fn slow_key_toml() -> String {
    format!(
        "\n[[auth.api_keys]]\nname = \"slow\"\nkey_sha256 = \"{}\"\nmerchant = \"*\"\nscopes = [\"read\", \"checkout\"]\nrequests_per_second = 1\n",
        config::hash_api_key(SLOW)
    )
}

impl Fleet {
    /// A fleet config against `redis_url`, with a demo origin started.
    pub fn new(redis_url: &str, extra: &str) -> Self {
        let directory = tempfile::tempdir().expect("temp dir");
        let config = directory.path().join("gateway.toml");
        let text = dev_config_text().replace(
            "limits]\nbody_bytes_max = 65536",
            "limits]\nbody_bytes_max = 4096",
        ) + &slow_key_toml()
            + extra;
        std::fs::write(&config, text).expect("write config");
        let origin_port = free_port();
        let origin = format!("127.0.0.1:{origin_port}");
        let child = Command::new(env!("CARGO_BIN_EXE_demo-origin"))
            .arg(&origin)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start demo origin");
        wait_for_port(origin_port);
        Self {
            directory,
            config,
            postgres_url: testkit::stack().postgres_url.clone(),
            redis_url: redis_url.to_owned(),
            origin,
            _origin: Some(Process(child)),
        }
    }

    /// A fleet on the stack's Redis.
    pub fn on_stack(extra: &str) -> Self {
        Self::new(&testkit::stack().redis_url, extra)
    }

    /// Rewrites the config file (as ops would), atomically.
    pub fn write_config(&self, text: &str) {
        let staging = self.directory.path().join("staging.toml");
        std::fs::write(&staging, text).expect("write");
        std::fs::rename(&staging, &self.config).expect("rename");
    }

    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).expect("read config")
    }

    /// Starts node `id` and waits until it is ready.
    pub fn node(&self, id: &str) -> Node {
        let node = self.start_node(id);
        node.wait_ready();
        node
    }

    /// Starts node `id` and waits until it listens (`/health`), not until
    /// it is ready.
    pub fn start_node(&self, id: &str) -> Node {
        let port = free_port();
        let log = self.directory.path().join(format!("{id}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("--config")
            .arg(&self.config)
            .env("INVGW_NODE_ID", id)
            .env("INVGW_LISTEN_HTTP", format!("127.0.0.1:{port}"))
            .env("INVGW_ORIGIN_UPSTREAMS", &self.origin)
            .env("INVGW_REDIS_URL", &self.redis_url)
            // The config file names the PostgreSQL (a test's own schema).
            .env("INVGW_POSTGRES_URL", &self.postgres_url)
            .env("RUST_LOG", "info,pingora=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start gateway");
        let node = Node {
            base: format!("http://127.0.0.1:{port}"),
            log,
            process: Process(child),
        };
        node.wait_listening();
        node
    }
}

/// A running gateway node.
pub struct Node {
    pub base: String,
    pub log: PathBuf,
    pub process: Process,
}

impl Node {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The node's `/metrics` text.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    fn wait_ready(&self) {
        self.wait_for("/ready", "ready");
    }

    fn wait_listening(&self) {
        self.wait_for("/health", "listening");
    }

    /// Polls `path` until it answers 200 (or panics after 20 s).
    fn wait_for(&self, path: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if raw::status_of_get(&self.url(path)) == Some(200) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "node {} not {what}; log:\n{}",
                    self.base,
                    log_tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

/// A plain blocking GET for readiness polling, usable outside a runtime.
pub mod raw {
    use std::io::{Read, Write};
    pub fn status_of_get(url: &str) -> Option<u16> {
        let rest = url.strip_prefix("http://")?;
        let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
        let mut stream = std::net::TcpStream::connect(host).ok()?;
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    }
}

/// An HTTP client for the tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// A stream's availability events (`GET /v1/stream`), parsed as they come.
pub struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    /// Follows `response`, a stream answered 200.
    pub fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status().as_u16(), 200);
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// A stream of m1's `sku` on `node` with the read key, on a client
    /// without [`client`]'s bound on a whole response (a stream lives on).
    pub async fn open(node: &Node, sku: &str) -> Self {
        let response = reqwest::Client::new()
            .get(node.url(&format!("/v1/stream?merchant=m1&sku={sku}")))
            .bearer_auth(READ)
            .send()
            .await
            .expect("stream");
        Self::new(response)
    }

    /// The next event's data, or `None` when none comes within `limit` (or
    /// the stream ends).
    pub async fn next(&mut self, limit: Duration) -> Option<Value> {
        let deadline = Instant::now() + limit;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(data) = block.lines().find_map(|line| line.strip_prefix("data: ")) {
                    assert!(block.starts_with("event: availability\nid: "), "{block}");
                    return Some(serde_json::from_str(data).expect("event json"));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }
}

/// POST JSON with a bearer key and optional idempotency key.
pub async fn post(
    url: &str,
    key: &str,
    idempotency_key: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut request = client().post(url).bearer_auth(key).json(body);
    if let Some(idempotency_key) = idempotency_key {
        request = request.header("Idempotency-Key", idempotency_key);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub async fn get(url: &str, key: Option<&str>) -> (u16, Value) {
    let mut request = client().get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Restocks through the API (admin key).
pub async fn restock(node: &Node, merchant: &str, sku: &str, location: &str, qty: i64) {
    let (status, body) = post(
        &node.url("/v1/stock/adjustments"),
        PLATFORM,
        None,
        &json!({
            "merchant": merchant, "sku": sku, "location": location, "kind": "delta", "qty": qty,
            "source": "test", "event_id": testkit::unique_id("restock"),
        }),
    )
    .await;
    assert_eq!(status, 200, "restock: {body}");
}

pub async fn available(node: &Node, merchant: &str, sku: &str) -> i64 {
    let (status, body) = get(
        &node.url(&format!("/v1/availability/{merchant}/{sku}")),
        Some(PLATFORM),
    )
    .await;
    assert_eq!(status, 200, "availability: {body}");
    body["available"].as_i64().expect("available")
}

pub fn reservation(merchant: &str, sku: &str, location: &str, qty: i64) -> Value {
    json!({ "merchant": merchant, "lines": [{ "sku": sku, "location": location, "qty": qty }] })
}

/// A flash sale of `sku` at m1/dc1 over node-a and node-b, as TOML.
pub fn sale_toml(name: &str, sku: &str, enabled: bool) -> String {
    format!(
        "\n[[flash_sales]]\nname = \"{name}\"\nmerchant = \"m1\"\nsku = \"{sku}\"\nlocation = \"dc1\"\n\
         nodes = [\"node-a\", \"node-b\"]\nenabled = {enabled}\npresplit_fraction = 0.5\n\
         refill_chunk_units_min = 5\nrefill_chunk_units_max = 20\n"
    )
}

/// The sale's entry in `GET /v1/flash-sales` on `node`.
pub async fn sale_state(node: &Node, name: &str) -> Value {
    let (status, body) = get(&node.url("/v1/flash-sales"), Some(PLATFORM)).await;
    assert_eq!(status, 200, "{body}");
    body["sales"]
        .as_array()
        .and_then(|sales| sales.iter().find(|sale| sale["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

/// Polls `check` every 100 ms for up to 10 s.
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two nodes with a sale of a fresh sku over both, in force, stocked.
pub async fn sale_with(units: i64) -> (Fleet, Node, Node, String, String) {
    sale_with_extra(units, "").await
}

/// [`sale_with`], the sale's TOML followed by `extra` (more of its fields).
pub async fn sale_with_extra(units: i64, extra: &str) -> (Fleet, Node, Node, String, String) {
    sale_with_config(units, extra, |text| text).await
}

/// [`sale_with_extra`], with the fleet's whole config text edited by `edit`
/// before its nodes start.
pub async fn sale_with_config(
    units: i64,
    extra: &str,
    edit: impl FnOnce(String) -> String,
) -> (Fleet, Node, Node, String, String) {
    let sku = testkit::unique_id("console");
    let name = testkit::unique_id("drop");
    let fleet = Fleet::on_stack(&format!("{}{extra}", sale_toml(&name, &sku, true)));
    fleet.write_config(&edit(fleet.config_text()));
    let a = fleet.node("node-a");
    let b = fleet.node("node-b");
    restock(&a, "m1", &sku, "dc1", units).await;
    for node in [&a, &b] {
        wait_until("the sale in force on both nodes", || async {
            let state = sale_state(node, &name).await;
            state["active_on_this_node"] == true
                && state["nodes"]
                    .as_array()
                    .is_some_and(|nodes| nodes.iter().all(|node| !node["bucket"].is_null()))
        })
        .await;
    }
    (fleet, a, b, sku, name)
}
