//! `ledger-writer tail`: what an auditor reads of the Kafka ledger, against
//! a real writer relaying to the stack's broker.

mod common;

use std::collections::HashSet;
use std::io::BufRead;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allocator::{Adjustment, AdjustmentKind};
use common::*;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

const KEY: &str = "m-ledger/sku-0/dc1";

fn of_key(payload: &Value) -> bool {
    payload["merchant"] == "m-ledger" && payload["sku"] == "sku-0" && payload["location"] == "dc1"
}

/// Runs `ledger-writer tail ARGS` to its end: its stdout lines and stderr.
fn tail(setup: &Setup, args: &[&str]) -> (Vec<String>, String) {
    let output = common::run_writer(setup, "tail", args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_a_keys_entries_once_each_and_follows_new_ones() {
    let (_redis, setup, allocator) = harness(&[]).await;
    let _writer = start_writer(&setup);
    let written = operations(Arc::clone(&allocator), 20, "tail").await;
    let topic = setup.topic.clone();
    let messages = tokio::task::spawn_blocking(move || kafka_messages(&topic, written as usize))
        .await
        .expect("kafka reader");
    let theirs: Vec<&KafkaMessage> = messages
        .iter()
        .filter(|message| of_key(&message.payload))
        .collect();
    assert!(theirs.len() >= 3, "the key has entries: {}", theirs.len());
    let expected: HashSet<String> = theirs
        .iter()
        .map(|message| message.payload["entry_id"].as_str().expect("id").to_owned())
        .collect();

    // Two of them published again, as a writer that died between Kafka and
    // its acknowledgement does.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &testkit::stack().kafka_brokers)
        .create()
        .expect("producer");
    for message in &theirs[..2] {
        let payload = message.payload.to_string();
        producer
            .send(
                FutureRecord::to(&setup.topic)
                    .partition(message.partition)
                    .key(&message.key)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .expect("published again");
    }

    // JSON lines: the key's entries, each once, exactly as published.
    let (lines, said) = tail(&setup, &["--from-beginning", "--key", KEY]);
    let printed: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    let ids: HashSet<String> = printed
        .iter()
        .map(|entry| entry["entry_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids, expected, "every entry of the key");
    assert_eq!(printed.len(), expected.len(), "each once: {said}");
    assert!(printed.iter().all(of_key), "only the key's entries");
    assert!(said.contains(", 2 repeats dropped"), "{said}");
    let first = &theirs[0].payload;
    let same = printed
        .iter()
        .find(|entry| entry["entry_id"] == first["entry_id"])
        .expect("printed");
    assert_eq!(same, first, "as the relay published it");

    // A table: a header, then a row per entry naming its id.
    let (rows, _) = tail(
        &setup,
        &["--from-beginning", "--key", KEY, "--format", "table"],
    );
    assert_eq!(rows.len(), expected.len() + 1, "{rows:#?}");
    assert!(rows[0].starts_with("at (UTC)"), "{}", rows[0]);
    for id in &expected {
        assert!(rows.iter().any(|row| row.ends_with(id.as_str())), "{id}");
    }

    // --follow prints what arrives after it started, until stopped.
    let mut follower = writer_command(&setup, "tail")
        .args(["--follow", "--key", KEY])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tail --follow");
    let stdout = follower.stdout.take().expect("piped");
    let (lines_in, lines_out) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_in.send(line).is_err() {
                break;
            }
        }
    });
    // Restocks until one is printed (the follower joins its group first,
    // and starts at the topic's end then).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    let seen = loop {
        assert!(Instant::now() < deadline, "tail --follow printed nothing");
        round += 1;
        let adjustment = Adjustment {
            merchant: "m-ledger".to_owned(),
            sku: "sku-0".to_owned(),
            location: "dc1".to_owned(),
            kind: AdjustmentKind::Delta,
            qty: 1,
            source: "tail-test".to_owned(),
            event_id: format!("follow-{round}"),
            source_seq: None,
        };
        allocator.adjust(&adjustment).await.expect("restock");
        if let Ok(line) = lines_out.recv_timeout(Duration::from_secs(1)) {
            break serde_json::from_str::<Value>(&line).expect("a JSON line");
        }
    };
    assert_eq!(seen["op"], "adjust");
    assert_eq!(seen["source"], "tail-test");
    assert!(
        !expected.contains(seen["entry_id"].as_str().expect("id")),
        "only entries from its start on"
    );
    let _ = follower.kill();
    let _ = follower.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_refuses_a_key_that_is_not_merchant_sku_location() {
    let (_redis, setup, _allocator) = harness(&[]).await;
    let output = writer_command(&setup, "tail")
        .args(["--key", "m-ledger/sku-0"])
        .stderr(Stdio::piped())
        .output()
        .expect("run tail");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("merchant/sku/location"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
