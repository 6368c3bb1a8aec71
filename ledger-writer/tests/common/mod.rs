//! What the ledger writer's integration tests share: a per-test PostgreSQL
//! schema, Kafka topics and config, the writer process, the audit, a mixed
//! stock workload and a Kafka reader.

#![allow(dead_code)] // each test binary uses its own part

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use allocator::{
    Adjustment, AdjustmentKind, AdjustmentOutcome, Allocator, AllocatorError, AllocatorSettings,
    ReserveRequest, StockKey,
};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use testkit::KillOnDrop;

pub const PARTITIONS: u32 = 64;
pub const TOPIC_PARTITIONS: i32 = 4;

pub struct Setup {
    pub config_path: std::path::PathBuf,
    pub redis_url: String,
    pub postgres_url: String,
    pub topic: String,
    pub events_topic: String,
    pub dlq_topic: String,
    pub signals_topic: String,
    pub _directory: tempfile::TempDir,
    /// Where the writer started by [`start_writer`] serves `/metrics`.
    pub metrics_port: u16,
}

pub async fn setup(redis_url: &str) -> Setup {
    setup_with(redis_url, &[]).await
}

/// What every writer test starts from: a private Redis (kept running while
/// the first value lives), the per-test PostgreSQL schema, Kafka topics and
/// config ([`setup_with`] and its `replacements`), and an allocator on that
/// Redis.
pub async fn harness(replacements: &[(&str, &str)]) -> (KillOnDrop, Setup, Arc<Allocator>) {
    let port = testkit::free_port();
    let redis = testkit::private_redis(port, None);
    let redis_url = format!("redis://127.0.0.1:{port}");
    let setup = setup_with(&redis_url, replacements).await;
    let allocator = Arc::new(
        Allocator::connect(&redis_url, settings(), 4)
            .await
            .expect("allocator"),
    );
    (redis, setup, allocator)
}

/// [`setup`], with more `(from, to)` replacements in the config text.
pub async fn setup_with(redis_url: &str, replacements: &[(&str, &str)]) -> Setup {
    let stack = testkit::stack();
    let id = testkit::unique_id("w").replace('-', "_");
    let schema = format!("t_{id}");
    let (client, connection) = tokio_postgres::connect(&stack.postgres_url, tokio_postgres::NoTls)
        .await
        .expect("postgresql");
    tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .expect("schema");
    let postgres_url = format!("{}?options=-c%20search_path%3D{schema}", stack.postgres_url);

    let topic = format!("ledger.{id}");
    let events_topic = format!("events.{id}");
    let dlq_topic = format!("events.dlq.{id}");
    let signals_topic = format!("signals.{id}");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .create()
        .expect("admin client");
    let created = admin
        .create_topics(
            &[
                NewTopic::new(&topic, TOPIC_PARTITIONS, TopicReplication::Fixed(1)),
                NewTopic::new(&events_topic, 2, TopicReplication::Fixed(1)),
                NewTopic::new(&dlq_topic, 1, TopicReplication::Fixed(1)),
                NewTopic::new(&signals_topic, 2, TopicReplication::Fixed(1)),
            ],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    let directory = tempfile::tempdir().expect("temp dir");
    let config_path = directory.path().join("writer.toml");
    let text = std::fs::read_to_string(testkit::repository_root().join("config/dev.toml"))
        .expect("dev.toml")
        .replace(
            "ledger_topic = \"inventory.ledger\"",
            &format!("ledger_topic = \"{topic}\""),
        )
        .replace(
            "events_topic = \"inventory.events\"",
            &format!("events_topic = \"{events_topic}\""),
        )
        .replace(
            "dlq_topic = \"inventory.events.dlq\"",
            &format!("dlq_topic = \"{dlq_topic}\""),
        )
        .replace(
            "signals_topic = \"inventory.signals\"",
            &format!("signals_topic = \"{signals_topic}\""),
        )
        .replace(
            "topic_partitions = 8",
            &format!("topic_partitions = {TOPIC_PARTITIONS}"),
        )
        .replace(
            "relay_batch_entries_max = 500",
            "relay_batch_entries_max = 50",
        );
    let text = replacements
        .iter()
        .fold(text, |text, (from, to)| text.replace(from, to));
    std::fs::write(&config_path, text).expect("write config");
    Setup {
        config_path,
        redis_url: redis_url.to_owned(),
        postgres_url,
        topic,
        events_topic,
        dlq_topic,
        signals_topic,
        _directory: directory,
        metrics_port: testkit::free_port(),
    }
}

pub fn writer_command(setup: &Setup, subcommand: &str) -> Command {
    writer_command_as(setup, subcommand, "writer-1", setup.metrics_port)
}

/// The writer binary as writer `id`, serving metrics on `metrics_port`.
pub fn writer_command_as(setup: &Setup, subcommand: &str, id: &str, metrics_port: u16) -> Command {
    let stack = testkit::stack();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ledger-writer"));
    command
        .arg(subcommand)
        .arg("--config")
        .arg(&setup.config_path)
        .env("INVGW_NODE_ID", id)
        .env(
            "INVGW_LEDGER_METRICS_LISTEN",
            format!("127.0.0.1:{metrics_port}"),
        )
        .env("INVGW_REDIS_URL", &setup.redis_url)
        .env("INVGW_POSTGRES_URL", &setup.postgres_url)
        .env("INVGW_KAFKA_BROKERS", &stack.kafka_brokers)
        .stderr(Stdio::null());
    command
}

pub fn start_writer(setup: &Setup) -> KillOnDrop {
    start_writer_as(setup, "writer-1", setup.metrics_port)
}

/// Starts writer `id` (its log is `<id>.log` in the setup's directory;
/// writer-1 logs to `writer.log`).
pub fn start_writer_as(setup: &Setup, id: &str, metrics_port: u16) -> KillOnDrop {
    let name = if id == "writer-1" {
        "writer.log".to_owned()
    } else {
        format!("{id}.log")
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(setup._directory.path().join(name))
        .expect("writer log");
    let child = writer_command_as(setup, "run", id, metrics_port)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start ledger-writer");
    KillOnDrop(child)
}

/// The writer must not have logged failed passes (an idle stream is not a failure).
pub fn assert_no_failed_passes(setup: &Setup) {
    let log =
        std::fs::read_to_string(setup._directory.path().join("writer.log")).unwrap_or_default();
    assert!(!log.contains("relay pass failed"), "{log}");
}

/// Runs writer subcommand `subcommand` with `args` to its end; its output.
pub fn run_writer(setup: &Setup, subcommand: &str, args: &[&str]) -> std::process::Output {
    writer_command(setup, subcommand)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run ledger-writer")
}

/// What a command printed: standard output, then standard error.
pub fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `ledger-writer audit`; its exit success and what it printed.
pub fn audit(setup: &Setup) -> (bool, String) {
    let output = writer_command(setup, "audit")
        .arg("--count-kafka")
        .stderr(Stdio::piped())
        .output()
        .expect("run audit");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

pub fn settings() -> AllocatorSettings {
    AllocatorSettings {
        node: "ops".to_owned(),
        partitions: PARTITIONS,
        command_timeout: Duration::from_secs(5),
        ttl_default: Duration::from_secs(600),
        ttl_max: Duration::from_secs(3600),
        customer_ref_key: "writer-test-customer-key".to_owned(),
        cart_line_grace: Duration::from_secs(2),
    }
}

/// Runs mixed operations; returns how many ledger entries they wrote.
pub async fn operations(allocator: Arc<Allocator>, rounds: u64, batch: &'static str) -> u64 {
    let written = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4u64)
        .map(|worker| {
            let (allocator, written) = (Arc::clone(&allocator), Arc::clone(&written));
            tokio::spawn(async move {
                for round in 0..rounds {
                    let key = StockKey::new(
                        "m-ledger",
                        format!("sku-{}", (worker * 7 + round) % 40),
                        "dc1",
                    );
                    let adjustment = Adjustment {
                        merchant: key.merchant.clone(),
                        sku: key.sku.clone(),
                        location: key.location.clone(),
                        kind: AdjustmentKind::Delta,
                        qty: 3,
                        source: "test".to_owned(),
                        event_id: format!("e-{batch}-{worker}-{round}"),
                        source_seq: None,
                    };
                    if matches!(
                        allocator.adjust(&adjustment).await,
                        Ok(AdjustmentOutcome::Applied { .. })
                    ) {
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                    let request = ReserveRequest {
                        key: key.clone(),
                        qty: 2,
                        ttl: None,
                        idempotency_key: format!("r-{batch}-{worker}-{round}"),
                        customer_ref: None,
                    };
                    match allocator.reserve(&request).await {
                        Ok(hold) => {
                            written.fetch_add(1, Ordering::Relaxed);
                            let id = hold.reservation.reservation_id;
                            let finished = if round % 3 == 0 {
                                allocator.release(None, &id, "rel").await
                            } else {
                                allocator.commit(None, &id, "com").await
                            };
                            if finished.is_ok() {
                                written.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(AllocatorError::InsufficientStock { .. }) => {}
                        Err(other) => panic!("reserve: {other}"),
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }
    written.load(Ordering::Relaxed)
}

/// One message of the ledger topic as a consumer sees it.
#[derive(Debug, Clone)]
pub struct KafkaMessage {
    /// Its key.
    pub key: String,
    /// Its Kafka partition and offset.
    pub partition: i32,
    pub offset: i64,
    /// The entry.
    pub payload: serde_json::Value,
}

/// The topic's messages, read from the start by a real consumer until
/// `expected` distinct entry ids arrived (or 60 s passed) and then until the
/// topic is quiet for half a second (so duplicates behind the last new id are
/// read too), each checked to be on the Kafka partition its ledger partition
/// maps onto; in the order read.
pub fn kafka_messages(topic: &str, expected: usize) -> Vec<KafkaMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &testkit::stack().kafka_brokers)
        .set("group.id", testkit::unique_id("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut ids = HashSet::new();
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let polled = consumer.poll(Duration::from_millis(500));
        if (ids.len() >= expected && polled.is_none()) || Instant::now() > deadline {
            break;
        }
        if let Some(Ok(message)) = polled {
            let payload: serde_json::Value =
                serde_json::from_slice(message.payload().unwrap_or_default())
                    .expect("json payload");
            let partition = payload["partition"].as_u64().expect("partition") as i32;
            assert_eq!(
                message.partition(),
                partition % TOPIC_PARTITIONS,
                "ledger partition maps onto kafka"
            );
            ids.insert(payload["entry_id"].as_str().expect("entry_id").to_owned());
            messages.push(KafkaMessage {
                key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                partition: message.partition(),
                offset: message.offset(),
                payload,
            });
        }
    }
    messages
}

/// The distinct entry ids of [`kafka_messages`].
pub fn kafka_entry_ids(topic: &str, expected: usize) -> HashSet<String> {
    kafka_messages(topic, expected)
        .iter()
        .map(|message| {
            message.payload["entry_id"]
                .as_str()
                .expect("entry_id")
                .to_owned()
        })
        .collect()
}

/// The sum of a writer's series `name` (all label sets; `name{label="x"`
/// selects by its first label), read from its `/metrics`; `None` while it
/// does not answer or has no such series.
pub async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(name.contains('{') || rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        *sum.get_or_insert(0.0) += value;
    }
    sum
}

/// The holder of each partition's lease, by partition.
pub async fn lease_holders(setup: &Setup) -> Vec<Option<String>> {
    use fred::prelude::*;
    let redis = raw_redis(&setup.redis_url).await;
    let mut holders = Vec::new();
    for partition in 0..PARTITIONS {
        let lease: Option<String> = redis
            .get(allocator::keys::relay_lease_key(partition))
            .await
            .expect("read lease");
        holders.push(lease.and_then(|lease| lease.split(' ').next().map(str::to_owned)));
    }
    holders
}

/// Rows in the setup's PostgreSQL ledger (0 while it does not answer).
pub async fn ledger_rows(setup: &Setup) -> i64 {
    let Ok((client, connection)) =
        tokio_postgres::connect(&setup.postgres_url, tokio_postgres::NoTls).await
    else {
        return 0;
    };
    tokio::spawn(connection);
    client
        .query_opt("SELECT count(*) FROM ledger", &[])
        .await
        .ok()
        .flatten()
        .map(|row| row.get(0))
        .unwrap_or(0)
}

/// Waits until PostgreSQL holds `written` ledger rows (or `limit` passes);
/// returns the rows it holds.
pub async fn wait_for_rows(setup: &Setup, written: u64, limit: Duration) -> i64 {
    let deadline = Instant::now() + limit;
    loop {
        let rows = ledger_rows(setup).await;
        if rows as u64 >= written || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every writer log of the setup, for failure messages.
pub fn writer_logs(setup: &Setup) -> String {
    let mut logs = String::new();
    for entry in std::fs::read_dir(setup._directory.path()).expect("setup directory") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|extension| extension == "log") {
            logs.push_str(&format!("--- {}\n", path.display()));
            logs.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
    logs
}

/// A plain Redis client on `url`, for tests that stage what the stock
/// engine never does itself (a wiped cell, a lease read behind its back).
pub async fn raw_redis(url: &str) -> fred::clients::Client {
    use fred::prelude::*;
    let client = Builder::from_config(fred::types::config::Config::from_url(url).expect("url"))
        .build()
        .expect("client");
    client.init().await.expect("connect to redis");
    client
}

/// Adds `qty` units to `key` (a delta from source `test`, a fresh event id).
pub async fn restock(allocator: &Allocator, key: &allocator::StockKey, qty: i64) {
    let adjustment = allocator::Adjustment {
        merchant: key.merchant.clone(),
        sku: key.sku.clone(),
        location: key.location.clone(),
        kind: allocator::AdjustmentKind::Delta,
        qty,
        source: "test".to_owned(),
        event_id: testkit::unique_id("restock"),
        source_seq: None,
    };
    allocator.adjust(&adjustment).await.expect("restock");
}

/// A PostgreSQL client on the setup's database (its connection driven in
/// the background).
pub async fn postgres(setup: &Setup) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&setup.postgres_url, tokio_postgres::NoTls)
        .await
        .expect("postgresql");
    tokio::spawn(connection);
    client
}

/// The signals topic's messages, read from the start until `expected`
/// distinct signal ids arrived (or 60 s passed), then until it is quiet
/// for a second (so a wrong extra one is read too): `(key, payload)`.
pub fn signals(topic: &str, expected: usize) -> Vec<(String, serde_json::Value)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &testkit::stack().kafka_brokers)
        .set("group.id", testkit::unique_id("signals"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut ids = std::collections::HashSet::new();
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet_since = Instant::now();
    loop {
        let polled = consumer.poll(Duration::from_millis(200));
        if let Some(Ok(message)) = &polled {
            let payload: serde_json::Value =
                serde_json::from_slice(message.payload().unwrap_or_default())
                    .expect("json payload");
            ids.insert(payload["signal_id"].as_str().expect("signal_id").to_owned());
            let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
            messages.push((key, payload));
            quiet_since = Instant::now();
        }
        let quiet = quiet_since.elapsed() > Duration::from_secs(1);
        if (ids.len() >= expected && quiet) || Instant::now() > deadline {
            return messages;
        }
    }
}
