//! `ledger-writer redrive-dlq` against the real stack: stock events the
//! ingestion dead-lettered are listed, one is fixed and re-driven (applied
//! once however often it is re-driven), one stays invalid, and every outcome
//! is recorded in the dead-letter topic next to its letter.

mod common;

use std::time::{Duration, Instant};

use allocator::StockKey;
use common::*;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

/// The JSON lines `ledger-writer redrive-dlq` printed, and its exit code.
fn redrive(setup: &Setup, fixed: Option<&std::path::Path>) -> (Vec<Value>, Option<i32>) {
    let mut command = writer_command(setup, "redrive-dlq");
    if let Some(path) = fixed {
        command.arg("--fixed").arg(path);
    }
    let output = command.output().expect("run ledger-writer redrive-dlq");
    let lines = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    (lines, output.status.code())
}

/// The outcomes of `lines` (printed by a redrive): (event id, outcome),
/// sorted (the invalid one, which has no id, last).
fn outcomes(lines: &[Value]) -> Vec<(Value, Value)> {
    let mut outcomes: Vec<(Value, Value)> = lines
        .iter()
        .map(|line| (line["event_id"].clone(), line["outcome"].clone()))
        .collect();
    outcomes.sort_by_key(|(id, _)| id.to_string());
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_dead_letter_is_applied_once_and_every_outcome_is_recorded() {
    let (_redis, setup, allocator) = harness(&[]).await;
    let _writer = start_writer(&setup);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &testkit::stack().kafka_brokers)
        .create()
        .expect("producer");
    // A POS sends qty as a string; another sends a kind nobody knows.
    let broken = r#"{"merchant":"m-dlq","sku":"fixme","location":"dc1","kind":"delta","qty":"5","source":"pos-1","event_id":"dlq-1"}"#;
    let unknown = r#"{"merchant":"m-dlq","sku":"fixme","location":"dc1","kind":"teleport","qty":1,"source":"pos-1","event_id":"dlq-2"}"#;
    for payload in [broken, unknown] {
        producer
            .send(
                FutureRecord::to(&setup.events_topic)
                    .key("fixme")
                    .payload(payload),
                Duration::from_secs(5),
            )
            .await
            .expect("produce");
    }

    // Listed, once the writer's ingestion dead-lettered both.
    let deadline = Instant::now() + Duration::from_secs(90);
    let letters = loop {
        let (letters, code) = redrive(&setup, None);
        assert_eq!(code, Some(0));
        if letters.len() == 2 {
            break letters;
        }
        assert!(Instant::now() < deadline, "letters: {letters:?}");
    };
    for letter in &letters {
        assert!(
            letter["reason"]
                .as_str()
                .is_some_and(|reason| !reason.is_empty())
        );
        assert_eq!(letter["redrives"], json!([]), "{letter}");
    }

    // The operator fixes the first and hands both back.
    let fixed: Vec<String> = letters
        .iter()
        .map(|letter| {
            let mut letter = letter.clone();
            let payload = letter["payload"].as_str().expect("payload").to_owned();
            letter["payload"] = json!(payload.replace(r#""qty":"5""#, r#""qty":5"#));
            letter.to_string()
        })
        .collect();
    let file = setup._directory.path().join("fixed.jsonl");
    std::fs::write(&file, fixed.join("\n")).expect("write the fixed file");
    let key = StockKey::new("m-dlq", "fixme", "dc1");
    let on_hand = || async {
        allocator
            .cell(&key.pool(PARTITIONS))
            .await
            .expect("read")
            .map(|cell| cell.on_hand)
    };

    let (first, code) = redrive(&setup, Some(&file));
    assert_eq!(code, Some(1), "one event is still invalid: {first:?}");
    assert_eq!(
        outcomes(&first),
        vec![
            (json!("dlq-1"), json!("applied")),
            (Value::Null, json!("invalid")),
        ]
    );
    assert!(
        first
            .iter()
            .all(|line| line["origin"]["topic"] == json!(setup.events_topic))
    );
    assert_eq!(on_hand().await, Some(5));

    // Again: applied once.
    let (second, _) = redrive(&setup, Some(&file));
    assert_eq!(
        outcomes(&second),
        vec![
            (json!("dlq-1"), json!("duplicate")),
            (Value::Null, json!("invalid")),
        ]
    );
    assert_eq!(on_hand().await, Some(5), "re-driven twice, applied once");

    // The dead-letter topic says what became of each letter.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (letters, _) = redrive(&setup, None);
        let mut redrives: Vec<(bool, Vec<Value>)> = letters
            .iter()
            .map(|letter| {
                let fixed = letter["payload"]
                    .as_str()
                    .is_some_and(|p| p.contains("dlq-1"));
                let done = letter["redrives"]
                    .as_array()
                    .map(|all| all.iter().map(|one| one["outcome"].clone()).collect())
                    .unwrap_or_default();
                (fixed, done)
            })
            .collect();
        redrives.sort_by_key(|(fixed, _)| *fixed);
        let expected = vec![
            (false, vec![json!("invalid"), json!("invalid")]),
            (true, vec![json!("applied"), json!("duplicate")]),
        ];
        if redrives == expected {
            break;
        }
        assert!(Instant::now() < deadline, "{redrives:?}");
    }
}
