//! Ingestion: stock events from POS, WMS, ERP and suppliers on Kafka
//! `inventory.events`, applied through the allocator.
//!
//! Owns reading the topic (consumer group `ingest.<topic>`), checking each
//! message (the adjustment body of shared/API.md, the same rules as the HTTP
//! endpoint), applying it with the same dedupe on `(source, event_id)` and
//! ordering on `source_seq`, and committing the message's offset only after
//! its effect is stored in Redis: the offset is *stored* after the effect
//! (`enable.auto.offset.store=false`) and stored offsets are committed every
//! second and on stop. A crash re-delivers at most the last second of
//! applied messages, which the `(source, event_id)` dedupe turns into
//! no-ops; committing each message synchronously instead held ingestion to
//! about 800 messages a second here. A malformed or unknown message goes to the
//! dead-letter topic with its reason and its origin, and the partition moves
//! on; a store that cannot be reached is retried, never skipped.
//!
//! The consumer runs on a thread of its own (rdkafka's poll can block during
//! rebalances) and calls the async allocator through the runtime's handle.

use std::time::Duration;

use allocator::{Adjustment, AdjustmentOutcome, AdjustmentRequest, Allocator, AllocatorError};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// The consumer group of the writers ingesting `events_topic`: named after
/// the topic, so one deployment's writers share it and nothing else does.
pub fn group(events_topic: &str) -> String {
    format!("ingest.{events_topic}")
}

/// How long a writer that died keeps its partitions before the group hands
/// them on (the broker's usual minimum).
const SESSION_TIMEOUT_MS: &str = "6000";

/// Failures in a row of a message for another reason than an unreachable
/// store or a passing conflict (a bug) before it is dead-lettered.
const ATTEMPTS_BEFORE_DEAD_LETTER: u32 = 20;

/// Pause before retrying a message whose effect could not be stored.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Checks a message into an adjustment, or says why it is refused: the
/// body and the rules of `POST /v1/stock/adjustments`
/// ([`AdjustmentRequest::check`], their one home).
pub fn parse_event(payload: &[u8]) -> Result<Adjustment, String> {
    allocator::from_json_object::<AdjustmentRequest>(payload)?.check()
}

/// Consumes the events topic until `stop` is set. Blocking: run it on its own
/// thread with a handle of the runtime the allocator lives on.
pub fn consume(
    config: &config::Config,
    allocator: &Allocator,
    producer: &FutureProducer,
    runtime: &tokio::runtime::Handle,
    stop: &std::sync::atomic::AtomicBool,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", group(&config.kafka.events_topic))
        .set("session.timeout.ms", SESSION_TIMEOUT_MS)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[config.kafka.events_topic.as_str()])?;
    info!(topic = %config.kafka.events_topic, dlq = %config.kafka.dlq_topic, "ingesting stock events");
    let timeout = Duration::from_millis(config.kafka.request_timeout_ms);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                warn!(%error, "events topic read failed");
                std::thread::sleep(RETRY_PAUSE);
                continue;
            }
        };
        // Failures other than an unreachable store or a conflict that clears
        // (another drain of the key), in a row.
        let mut failures = 0u32;
        loop {
            match handle(
                &message,
                config,
                allocator,
                producer,
                runtime,
                timeout,
                &mut failures,
            ) {
                Ok(outcome) => {
                    metrics.events.with_label_values(&[outcome]).inc();
                    if outcome == "dead_lettered" {
                        metrics.dead_letters.inc();
                    }
                    break;
                }
                Err(error) => {
                    warn!(%error, partition = message.partition(), offset = message.offset(), "event not applied; retrying");
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return Ok(());
                    }
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
        }
        // Stored only now: the effect (or the dead letter) is stored.
        consumer.store_offset_from_message(&message)?;
    }
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        warn!(%error, "committing ingestion offsets on stop failed; they are re-delivered");
    }
    Ok(())
}

/// Applies one message, or sends it to the dead-letter topic, and says which
/// (`applied`, `shortfall`, `duplicate`, `stale`, `dead_lettered`); an error
/// means nothing may be committed yet (the store or the broker did not answer).
#[allow(clippy::too_many_arguments)]
fn handle(
    message: &BorrowedMessage<'_>,
    config: &config::Config,
    allocator: &Allocator,
    producer: &FutureProducer,
    runtime: &tokio::runtime::Handle,
    timeout: Duration,
    failures: &mut u32,
) -> anyhow::Result<&'static str> {
    let payload = message.payload().unwrap_or_default();
    let reason = match parse_event(payload) {
        Ok(adjustment) => match runtime.block_on(allocator.adjust(&adjustment)) {
            Ok(AdjustmentOutcome::Applied { shortfall, .. }) => {
                return Ok(if shortfall { "shortfall" } else { "applied" });
            }
            Ok(AdjustmentOutcome::Duplicate) => return Ok("duplicate"),
            Ok(AdjustmentOutcome::Stale { .. }) => return Ok("stale"),
            Err(AllocatorError::InvalidRequest(reason)) => reason,
            // An unreachable store, or a drain of the key by someone else,
            // is waited for, never skipped; anything else that keeps failing
            // would block the partition for ever.
            Err(error @ (AllocatorError::StoreUnavailable(_) | AllocatorError::Conflict(_))) => {
                *failures = 0;
                return Err(error.into());
            }
            Err(error) => {
                *failures += 1;
                if *failures < ATTEMPTS_BEFORE_DEAD_LETTER {
                    return Err(error.into());
                }
                format!("not applied after {failures} failures in a row: {error}")
            }
        },
        Err(reason) => reason,
    };
    let letter = json!({
        "reason": reason,
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "payload": String::from_utf8_lossy(payload),
    })
    .to_string();
    let key = message
        .key()
        .map(|key| String::from_utf8_lossy(key).into_owned())
        .unwrap_or_default();
    let record = FutureRecord::to(&config.kafka.dlq_topic)
        .key(&key)
        .payload(&letter);
    runtime
        .block_on(producer.send(record, timeout))
        .map_err(|(error, _)| anyhow::anyhow!("dead-letter topic: {error}"))?;
    warn!(%reason, partition = message.partition(), offset = message.offset(), "event sent to the dead-letter topic");
    Ok("dead_lettered")
}

#[cfg(test)]
mod tests {
    use super::parse_event;

    #[test]
    fn events_are_checked_like_the_http_body() {
        let good = br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"delta","qty":-3,"source":"pos-1","event_id":"e1"}"#;
        assert!(parse_event(good).is_ok());
        let count = br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"absolute","qty":7,"source":"pos-1","event_id":"e2","source_seq":4}"#;
        assert_eq!(parse_event(count).map(|a| a.source_seq), Ok(Some(4)));
        for (bad, why) in [
            (&b"{not json"[..], "malformed JSON"),
            (br#"{"merchant":"m 1","sku":"s1","location":"dc1","kind":"delta","qty":1,"source":"p","event_id":"e"}"#, "merchant"),
            (br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"teleport","qty":1,"source":"p","event_id":"e"}"#, "kind must be"),
            (br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"absolute","qty":1,"source":"p","event_id":"e","source_seq":9007199254740992}"#, "source_seq must be at most"),
            (br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"delta","qty":0,"source":"p","event_id":"e"}"#, "non-zero"),
            (br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"absolute","qty":1,"source":"p","event_id":"e"}"#, "source_seq"),
            (br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"delta","qty":1,"source":"p","event_id":"e","extra":1}"#, "unknown field"),
        ] {
            let reason = parse_event(bad).expect_err("refused");
            assert!(reason.contains(why), "{reason} should mention {why}");
        }
    }

    #[test]
    fn an_event_that_is_not_an_object_is_dead_lettered_not_read_in_order() {
        let fields = br#"["m1","s1","dc1","delta",1,"pos-1","e1",null]"#;
        let reason = parse_event(fields).expect_err("refused");
        assert!(reason.contains("JSON object"), "{reason}");
    }
}
