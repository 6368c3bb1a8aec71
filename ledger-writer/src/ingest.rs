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
//! A `heartbeat` event (`{"kind":"heartbeat","merchant":"m1","source":"pos-store-12"}`)
//! changes no stock: like every event a source sends, it says that the
//! source is there ([`allocator::sources`] records when it reported, on
//! Redis's clock, once a second). A message counts as such a sighting only while it is current:
//! no older (its Kafka timestamp against the writer's clock) than its
//! source's `offline_after_seconds` ([`UNCONFIGURED_CURRENT_FOR`] for a
//! source the config does not list). A backlog a source sends on reconnect,
//! or one the writer is working through, is applied but says nothing of the
//! source *now*; a till whose clock is off by more than that never counts,
//! and the writer warns about it. The writer reads `sources[]` at start. A gateway shows the locations of a source
//! quiet past its `offline_after_seconds` as `source_offline`. The backlog
//! itself is applied like any event: deltas are facts (dedupe on
//! `(source, event_id)`, any order), and a loss past what is sellable is
//! flagged `shortfall` in the ledger, from which the writer signals it.
//! Sources should key their events by their name: one partition then
//! carries them in order, and a heartbeat is taken only after every sale
//! sent before it.
//!
//! The consumer runs on a thread of its own (rdkafka's poll can block during
//! rebalances) and calls the async allocator through the runtime's handle.

use std::collections::HashMap;
use std::sync::PoisonError;
use std::time::Duration;

use allocator::{
    Adjustment, AdjustmentOutcome, AdjustmentRequest, Allocator, AllocatorError, SourcesSeen,
};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
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

/// How often what was heard from sources is written to Redis.
const SOURCES_SEEN_EVERY: Duration = Duration::from_secs(1);

/// How old a message of a source the config does not list may be and still
/// say that the source is there (a listed one's `offline_after_seconds`).
pub const UNCONFIGURED_CURRENT_FOR: Duration = Duration::from_secs(300);

/// One message of the events topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A stock change.
    Adjustment(Adjustment),
    /// A source saying it is there.
    Heartbeat {
        /// Whose stock it reports.
        merchant: String,
        /// Who.
        source: String,
    },
}

/// `{"kind":"heartbeat","merchant":…,"source":…}`, nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // `kind` is read before, from the JSON value.
struct HeartbeatRequest {
    kind: String,
    merchant: String,
    source: String,
}

/// Checks a message into an event, or says why it is refused: a heartbeat,
/// or the body and the rules of `POST /v1/stock/adjustments`
/// ([`AdjustmentRequest::check`], their one home).
pub fn parse_event(payload: &[u8]) -> Result<Event, String> {
    // Only a message naming a heartbeat pays for a second parse.
    if payload.windows(11).any(|window| window == b"\"heartbeat\"") {
        let value: serde_json::Value = allocator::from_json_object(payload)?;
        if value.get("kind").and_then(serde_json::Value::as_str) == Some("heartbeat") {
            let heartbeat: HeartbeatRequest = serde_json::from_value(value)
                .map_err(|error| format!("malformed heartbeat: {error}"))?;
            for (field, value) in [
                ("merchant", &heartbeat.merchant),
                ("source", &heartbeat.source),
            ] {
                if !config::is_valid_id(value) {
                    return Err(format!("{field} must match [A-Za-z0-9._:-]{{1,128}}"));
                }
            }
            return Ok(Event::Heartbeat {
                merchant: heartbeat.merchant,
                source: heartbeat.source,
            });
        }
    }
    allocator::from_json_object::<AdjustmentRequest>(payload)?
        .check()
        .map(Event::Adjustment)
}

/// The sources heard from since the last write, and the messages that
/// came too late to say so.
#[derive(Default)]
struct Heard {
    seen: SourcesSeen,
    /// `merchant|source` → (messages too old to count, the oldest's age).
    late: std::sync::Mutex<HashMap<String, (u64, Duration)>>,
}

impl Heard {
    /// A message of `source` of `merchant` was taken: a sighting if it is
    /// current for that source (`currency`), else counted as late.
    fn take_message(
        &self,
        message: &BorrowedMessage<'_>,
        merchant: &str,
        source: &str,
        currency: &Currency,
    ) {
        let current_for = currency.of(merchant, source);
        // The writer's clock against the message's timestamp.
        let age = message
            .timestamp()
            .to_millis()
            .map_or(Duration::ZERO, |at| {
                Duration::from_millis((crate::relay::local_ms() - at).max(0) as u64)
            });
        if age <= current_for {
            self.seen.note(merchant, source, age);
            return;
        }
        let mut late = self.late.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = late
            .entry(allocator::sources::source_member(merchant, source))
            .or_insert((0, Duration::ZERO));
        entry.0 += 1;
        entry.1 = entry.1.max(age);
    }

    /// Writes the sightings (kept for the next write if Redis does not take
    /// them) and reports the late messages.
    fn record(&self, allocator: &Allocator, runtime: &tokio::runtime::Handle) {
        let taken = self.seen.take();
        if let Err(error) = runtime.block_on(allocator.record_sources_seen(&taken)) {
            warn!(%error, "recording the sources heard from failed; retrying");
            self.seen.restore(taken);
        }
        let late = std::mem::take(&mut *self.late.lock().unwrap_or_else(PoisonError::into_inner));
        for (source, (messages, oldest)) in late {
            warn!(%source, messages, oldest_seconds = oldest.as_secs(), "messages of a source too old to say it is there now (a backlog, a writer behind, or the source's clock off): applied, not counted as a sighting");
        }
    }
}

/// How long each source's messages count as current: its
/// `offline_after_seconds`, or [`UNCONFIGURED_CURRENT_FOR`].
struct Currency(HashMap<String, Duration>);

impl Currency {
    fn new(config: &config::Config) -> Self {
        Self(
            config
                .sources
                .iter()
                .map(|source| {
                    (
                        allocator::sources::source_member(&source.merchant, &source.name),
                        Duration::from_secs(source.offline_after_seconds),
                    )
                })
                .collect(),
        )
    }

    fn of(&self, merchant: &str, source: &str) -> Duration {
        self.0
            .get(&allocator::sources::source_member(merchant, source))
            .copied()
            .unwrap_or(UNCONFIGURED_CURRENT_FOR)
    }
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
    let heard = Heard::default();
    let currency = Currency::new(config);
    let mut last_recorded = std::time::Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if last_recorded.elapsed() >= SOURCES_SEEN_EVERY {
            heard.record(allocator, runtime);
            last_recorded = std::time::Instant::now();
        }
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
                &|merchant: &str, source: &str| {
                    heard.take_message(&message, merchant, source, &currency)
                },
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
    heard.record(allocator, runtime);
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        warn!(%error, "committing ingestion offsets on stop failed; they are re-delivered");
    }
    Ok(())
}

/// Applies one message, or sends it to the dead-letter topic, and says which
/// (`applied`, `shortfall`, `duplicate`, `stale`, `heartbeat`,
/// `dead_lettered`), telling `heard` its merchant and source unless
/// dead-lettered; an
/// error means nothing may be committed yet (the store or the broker did not
/// answer).
#[allow(clippy::too_many_arguments)]
fn handle(
    message: &BorrowedMessage<'_>,
    config: &config::Config,
    allocator: &Allocator,
    producer: &FutureProducer,
    runtime: &tokio::runtime::Handle,
    timeout: Duration,
    failures: &mut u32,
    heard_from: &dyn Fn(&str, &str),
) -> anyhow::Result<&'static str> {
    let payload = message.payload().unwrap_or_default();
    let heard = |adjustment: &Adjustment, outcome: &'static str| {
        heard_from(&adjustment.merchant, &adjustment.source);
        Ok(outcome)
    };
    let reason = match parse_event(payload) {
        Ok(Event::Heartbeat { merchant, source }) => {
            heard_from(&merchant, &source);
            return Ok("heartbeat");
        }
        Ok(Event::Adjustment(adjustment)) => {
            match runtime.block_on(allocator.adjust(&adjustment)) {
                Ok(AdjustmentOutcome::Applied { shortfall, .. }) => {
                    return heard(&adjustment, if shortfall { "shortfall" } else { "applied" });
                }
                Ok(AdjustmentOutcome::Duplicate) => return heard(&adjustment, "duplicate"),
                Ok(AdjustmentOutcome::Stale { .. }) => return heard(&adjustment, "stale"),
                Err(AllocatorError::InvalidRequest(reason)) => reason,
                // An unreachable store, or a drain of the key by someone else,
                // is waited for, never skipped; anything else that keeps failing
                // would block the partition for ever.
                Err(
                    error @ (AllocatorError::StoreUnavailable(_) | AllocatorError::Conflict(_)),
                ) => {
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
            }
        }
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
    use super::{Event, parse_event};

    #[test]
    fn events_are_checked_like_the_http_body() {
        let good = br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"delta","qty":-3,"source":"pos-1","event_id":"e1"}"#;
        assert!(parse_event(good).is_ok());
        let count = br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"absolute","qty":7,"source":"pos-1","event_id":"e2","source_seq":4}"#;
        assert!(matches!(
            parse_event(count),
            Ok(Event::Adjustment(adjustment)) if adjustment.source_seq == Some(4)
        ));
        assert_eq!(
            parse_event(br#"{"kind":"heartbeat","merchant":"m1","source":"pos-1"}"#),
            Ok(Event::Heartbeat {
                merchant: "m1".to_owned(),
                source: "pos-1".to_owned()
            })
        );
        for (bad, why) in [
            (&b"{not json"[..], "malformed JSON"),
            (br#"{"merchant":"m 1","sku":"s1","location":"dc1","kind":"delta","qty":1,"source":"p","event_id":"e"}"#, "merchant"),
            (br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"teleport","qty":1,"source":"p","event_id":"e"}"#, "kind must be"),
            (br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"absolute","qty":1,"source":"p","event_id":"e","source_seq":9007199254740992}"#, "source_seq must be at most"),
            (br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"delta","qty":0,"source":"p","event_id":"e"}"#, "non-zero"),
            (br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"absolute","qty":1,"source":"p","event_id":"e"}"#, "source_seq"),
            (br#"{"merchant":"m1","sku":"s1","location":"dc1","kind":"delta","qty":1,"source":"p","event_id":"e","extra":1}"#, "unknown field"),
            // A heartbeat is its kind and its source, nothing more.
            (br#"{"kind":"heartbeat","merchant":"m1","source":"p","at":1}"#, "unknown field"),
            (br#"{"kind":"heartbeat","merchant":"m1","source":"p 1"}"#, "source must match"),
            (br#"{"kind":"heartbeat","merchant":"m 1","source":"p"}"#, "merchant must match"),
            (br#"{"kind":"heartbeat","source":"p"}"#, "missing field"),
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
