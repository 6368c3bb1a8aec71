//! Nothing lost from the ledger: mixed stock operations run while the writer
//! is killed with SIGKILL twice and restarted; afterwards PostgreSQL holds
//! exactly one row per entry written, Kafka carries every entry id (a
//! duplicate after a crash has the same id), the streams are trimmed, and
//! the snapshot agrees with Redis.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use allocator::{
    Adjustment, AdjustmentKind, AdjustmentOutcome, Allocator, AllocatorError, AllocatorSettings,
    ReserveRequest, StockKey,
};
use fred::prelude::*;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use testkit::KillOnDrop;

const PARTITIONS: u32 = 64;
const TOPIC_PARTITIONS: i32 = 4;

struct Setup {
    config_path: std::path::PathBuf,
    redis_url: String,
    postgres_url: String,
    topic: String,
    events_topic: String,
    dlq_topic: String,
    _directory: tempfile::TempDir,
}

async fn setup(redis_url: &str) -> Setup {
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
            "topic_partitions = 8",
            &format!("topic_partitions = {TOPIC_PARTITIONS}"),
        )
        .replace(
            "relay_batch_entries_max = 500",
            "relay_batch_entries_max = 50",
        );
    std::fs::write(&config_path, text).expect("write config");
    Setup {
        config_path,
        redis_url: redis_url.to_owned(),
        postgres_url,
        topic,
        events_topic,
        dlq_topic,
        _directory: directory,
    }
}

fn writer_command(setup: &Setup, subcommand: &str) -> Command {
    let stack = testkit::stack();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ledger-writer"));
    command
        .arg(subcommand)
        .arg("--config")
        .arg(&setup.config_path)
        .env("INVGW_NODE_ID", "writer-1")
        .env("INVGW_REDIS_URL", &setup.redis_url)
        .env("INVGW_POSTGRES_URL", &setup.postgres_url)
        .env("INVGW_KAFKA_BROKERS", &stack.kafka_brokers)
        .stderr(Stdio::null());
    command
}

fn start_writer(setup: &Setup) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(setup._directory.path().join("writer.log"))
        .expect("writer log");
    let child = writer_command(setup, "run")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start ledger-writer");
    KillOnDrop(child)
}

/// The writer must not have logged failed passes (an idle stream is not a failure).
fn assert_no_failed_passes(setup: &Setup) {
    let log =
        std::fs::read_to_string(setup._directory.path().join("writer.log")).unwrap_or_default();
    assert!(!log.contains("relay pass failed"), "{log}");
}

/// Runs `ledger-writer audit`; its exit success and what it printed.
fn audit(setup: &Setup) -> (bool, String) {
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

fn settings() -> AllocatorSettings {
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
async fn operations(allocator: Arc<Allocator>, rounds: u64, batch: &'static str) -> u64 {
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

fn kafka_entry_ids(topic: &str, expected: usize) -> HashSet<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &testkit::stack().kafka_brokers)
        .set("group.id", testkit::unique_id("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut ids = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids.len() < expected && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(500)) {
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
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_doubled_when_the_writer_is_killed_twice() {
    let port = testkit::free_port();
    let _redis = testkit::private_redis(port, None);
    let redis_url = format!("redis://127.0.0.1:{port}");
    let setup = setup(&redis_url).await;
    let allocator = Arc::new(
        Allocator::connect(&redis_url, settings(), 4)
            .await
            .expect("allocator"),
    );

    let mut writer = start_writer(&setup);
    let ops = tokio::spawn(operations(Arc::clone(&allocator), 300, "a"));
    for pause_ms in [700, 900] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        let _ = writer.0.kill(); // SIGKILL, mid-batch as likely as not
        let _ = writer.0.wait();
        writer = start_writer(&setup);
    }
    let written = ops.await.expect("operations");
    assert!(written > 1000, "enough traffic: {written}");

    let (client, connection) = tokio_postgres::connect(&setup.postgres_url, tokio_postgres::NoTls)
        .await
        .expect("postgresql");
    tokio::spawn(connection);
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows: i64 = client
            .query_opt("SELECT count(*) FROM ledger", &[])
            .await
            .ok()
            .flatten()
            .map(|row| row.get(0))
            .unwrap_or(0);
        if rows as u64 >= written || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        rows as u64, written,
        "one row per entry written, no duplicate"
    );
    assert_no_failed_passes(&setup);

    // Kafka has every entry id (duplicates, if any, carry the same id).
    let pg_ids: HashSet<String> = client
        .query("SELECT entry_id FROM ledger", &[])
        .await
        .expect("ids")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let topic = setup.topic.clone();
    let expected = pg_ids.len();
    let kafka_ids = tokio::task::spawn_blocking(move || kafka_entry_ids(&topic, expected))
        .await
        .expect("kafka reader");
    assert_eq!(kafka_ids, pg_ids, "every entry is in kafka");

    // The books balance from PostgreSQL alone, and the snapshot is Redis.
    let balance = client
        .query_one(
            "SELECT COALESCE(SUM(qty) FILTER (WHERE op = 'adjust'), 0)::bigint
                  - COALESCE(SUM(qty) FILTER (WHERE op = 'commit'), 0)::bigint,
                    (SELECT COALESCE(SUM(on_hand), 0)::bigint FROM stock_snapshot)
             FROM ledger",
            &[],
        )
        .await
        .expect("balance");
    assert_eq!(
        balance.get::<_, i64>(0),
        balance.get::<_, i64>(1),
        "adjusted - committed = on hand"
    );
    for row in client
        .query("SELECT cell, on_hand, reserved FROM stock_snapshot", &[])
        .await
        .expect("snapshot")
    {
        let cell: String = row.get(0);
        let parts: Vec<&str> = cell.split('|').collect();
        let key = StockKey::new(parts[0], parts[1], parts[2]);
        let live = allocator
            .cell(&key.pool(PARTITIONS))
            .await
            .expect("read")
            .expect("cell");
        assert_eq!(
            (live.on_hand, live.reserved),
            (row.get::<_, i64>(1), row.get::<_, i64>(2)),
            "{cell}"
        );
    }
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_passes_on_balanced_books_and_names_an_injected_drift() {
    let port = testkit::free_port();
    let _redis = testkit::private_redis(port, None);
    let redis_url = format!("redis://127.0.0.1:{port}");
    let setup = setup(&redis_url).await;
    let allocator = Arc::new(
        Allocator::connect(&redis_url, settings(), 4)
            .await
            .expect("allocator"),
    );

    // Part of the ledger relayed to PostgreSQL, part still in the outbox.
    let mut writer = start_writer(&setup);
    operations(Arc::clone(&allocator), 20, "a").await;
    // One key goes out of stock and comes back: one closed stockout episode.
    let scarce = StockKey::new("m-ledger", "scarce", "dc1");
    let restock = Adjustment {
        merchant: scarce.merchant.clone(),
        sku: scarce.sku.clone(),
        location: scarce.location.clone(),
        kind: AdjustmentKind::Delta,
        qty: 2,
        source: "test".to_owned(),
        event_id: "scarce-1".to_owned(),
        source_seq: None,
    };
    allocator.adjust(&restock).await.expect("restock");
    let all = ReserveRequest {
        key: scarce.clone(),
        qty: 2,
        ttl: None,
        idempotency_key: "scarce-all".to_owned(),
        customer_ref: None,
    };
    let hold = allocator.reserve(&all).await.expect("hold all");
    allocator
        .release(None, &hold.reservation.reservation_id, "scarce-back")
        .await
        .expect("release");
    // Kill the writer once it has relayed the scarce key's three entries
    // (start-up takes longer on a loaded machine than any fixed pause).
    let (client, connection) = tokio_postgres::connect(&setup.postgres_url, tokio_postgres::NoTls)
        .await
        .expect("postgresql");
    tokio::spawn(connection);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let relayed: i64 = client
            .query_opt("SELECT count(*) FROM ledger WHERE sku = 'scarce'", &[])
            .await
            .ok()
            .flatten()
            .map(|row| row.get(0))
            .unwrap_or(0);
        if relayed >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writer did not relay the scarce key in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = writer.0.kill();
    let _ = writer.0.wait();
    operations(Arc::clone(&allocator), 5, "b").await;

    let (balanced, printed) = audit(&setup);
    assert!(balanced, "{printed}");
    assert!(printed.contains("the books balance"), "{printed}");
    assert!(printed.contains("distinct entry ids in kafka"), "{printed}");
    assert!(
        !printed.contains(" 0 not yet relayed"),
        "some entries were left in the outbox: {printed}"
    );

    // The analytics views agree with the ledger.
    let (client, connection) = tokio_postgres::connect(&setup.postgres_url, tokio_postgres::NoTls)
        .await
        .expect("postgresql");
    tokio::spawn(connection);
    let stockouts = client
        .query(
            "SELECT ended_at IS NOT NULL FROM stockouts WHERE sku = 'scarce'",
            &[],
        )
        .await
        .expect("stockouts view");
    assert_eq!(stockouts.len(), 1, "one stockout episode");
    assert!(stockouts[0].get::<_, bool>(0), "and it ended");
    let sold = client
        .query_one(
            "SELECT (SELECT COALESCE(SUM(sold), 0)::bigint FROM stock_movements_daily),
                    (SELECT COALESCE(SUM(qty), 0)::bigint FROM ledger WHERE op = 'commit')",
            &[],
        )
        .await
        .expect("movements view");
    assert_eq!(sold.get::<_, i64>(0), sold.get::<_, i64>(1));
    client
        .query("SELECT * FROM flash_sale_postmortem", &[])
        .await
        .expect("postmortem view");

    // Someone writes Redis behind the ledger's back.
    let key = StockKey::new("m-ledger", "sku-3", "dc1");
    let cell = key.pool(PARTITIONS);
    let mut live = allocator.cell(&cell).await.expect("read").expect("cell");
    live.on_hand += 5;
    let _: i64 = allocator
        .redis()
        .next()
        .hset(
            allocator::keys::cells_hash(cell.partition),
            (
                cell.id.as_str(),
                serde_json::to_string(&live).expect("json"),
            ),
        )
        .await
        .expect("tamper");
    let (balanced, printed) = audit(&setup);
    assert!(!balanced, "the drift fails the audit: {printed}");
    assert!(
        printed.contains(&format!("drift: {}", cell.id)),
        "{printed}"
    );
    assert!(
        printed.contains("audit: 1 drifts"),
        "only the tampered cell: {printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_events_are_applied_once_in_order_and_malformed_ones_are_dead_lettered() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let port = testkit::free_port();
    let _redis = testkit::private_redis(port, None);
    let redis_url = format!("redis://127.0.0.1:{port}");
    let setup = setup(&redis_url).await;
    let allocator = Allocator::connect(&redis_url, settings(), 2)
        .await
        .expect("allocator");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &testkit::stack().kafka_brokers)
        .create()
        .expect("producer");
    let sale = r#"{"merchant":"m-pos","sku":"tee","location":"store-1","kind":"delta","qty":10,"source":"pos-1","event_id":"sale-1"}"#;
    let count = |qty: u32, seq: u32| {
        format!(
            r#"{{"merchant":"m-pos","sku":"mug","location":"store-1","kind":"absolute","qty":{qty},"source":"wms-1","event_id":"count-{seq}","source_seq":{seq}}}"#
        )
    };
    let messages = [
        (sale.to_owned(), "tee"),
        (sale.to_owned(), "tee"),
        (count(30, 3), "mug"),
        (count(5, 1), "mug"),
        (count(9, 2), "mug"),
        ("{this is not json".to_owned(), "junk"),
        (
            r#"{"merchant":"m-pos","sku":"tee","location":"store-1","kind":"teleport","qty":1,"source":"pos-1","event_id":"x"}"#.to_owned(),
            "tee",
        ),
        (
            r#"{"merchant":"m pos","sku":"tee","location":"store-1","kind":"delta","qty":1,"source":"pos-1","event_id":"y"}"#.to_owned(),
            "tee",
        ),
    ];
    for (payload, key) in &messages {
        producer
            .send(
                FutureRecord::to(&setup.events_topic)
                    .key(*key)
                    .payload(payload.as_str()),
                Duration::from_secs(5),
            )
            .await
            .expect("produce event");
    }

    let _writer = start_writer(&setup);
    let tee = StockKey::new("m-pos", "tee", "store-1");
    let mug = StockKey::new("m-pos", "mug", "store-1");
    let on_hand = |key: StockKey| {
        let allocator = &allocator;
        async move {
            allocator
                .cell(&key.pool(PARTITIONS))
                .await
                .expect("read")
                .map(|cell| cell.on_hand)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while on_hand(tee.clone()).await.is_none() || on_hand(mug.clone()).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "events not applied; writer log:\n{}",
            std::fs::read_to_string(setup._directory.path().join("writer.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give a late duplicate or a stale count the time to do harm, if it could.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        on_hand(tee.clone()).await,
        Some(10),
        "the duplicate sale event applied once"
    );
    assert_eq!(
        on_hand(mug.clone()).await,
        Some(30),
        "late counts 1 and 2 did not undo count 3"
    );

    let dlq = setup.dlq_topic.clone();
    let letters = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &testkit::stack().kafka_brokers)
            .set("group.id", testkit::unique_id("dlq-reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[dlq.as_str()]).expect("subscribe");
        let mut letters = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while letters.len() < 3 && Instant::now() < deadline {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(300)) {
                let letter: serde_json::Value =
                    serde_json::from_slice(message.payload().unwrap_or_default())
                        .expect("letter json");
                letters.push(letter);
            }
        }
        letters
    })
    .await
    .expect("dlq reader");
    assert_eq!(letters.len(), 3, "{letters:?}");
    let reasons: Vec<&str> = letters
        .iter()
        .map(|letter| letter["reason"].as_str().unwrap_or_default())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|reason| reason.contains("malformed JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|reason| reason.contains("unknown kind")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|reason| reason.contains("merchant")),
        "{reasons:?}"
    );
    assert!(
        letters
            .iter()
            .all(|letter| letter["topic"] == setup.events_topic.as_str())
    );
    assert_no_failed_passes(&setup);
}
