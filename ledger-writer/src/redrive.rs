//! `ledger-writer redrive-dlq`: stock events the ingestion could not apply,
//! fixed by an operator and applied once.
//!
//! Owns reading the dead-letter topic (`kafka.dlq_topic`) for people and
//! re-driving fixed events. The ingestion sends an event there when it
//! cannot apply it (malformed, refused, or failing too often), as a letter:
//! `{"reason", "topic", "partition", "offset", "payload"}`. An operator lists
//! the letters, fixes each payload in a copy of that list, and hands the
//! copy back.
//!
//! A fixed event is applied through the same path the ingestion takes
//! ([`crate::ingest::parse_event`], then [`allocator::Allocator::adjust`]):
//! checked as the HTTP body is, and deduplicated on its event id, so running
//! a redrive twice applies each event once (the second run answers
//! `duplicate`). It is applied here rather than published to the events
//! topic again so that its outcome is known at once, printed, and recorded:
//! each outcome is appended to the dead-letter topic as a record of its own
//! (`{"redrive": {"origin", "event_id", "outcome", "reason", "at"}}`, keyed by
//! the event's stock key), next to the letter it answers. Nothing in Kafka
//! is rewritten; the listing joins each letter with the outcomes recorded
//! for it.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use allocator::{AdjustmentOutcome, Allocator, AllocatorError};
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

use crate::tail::throwaway_consumer;

/// Where a letter's event was read from: its place in the events topic.
fn origin_of(letter: &Value) -> Option<Value> {
    let origin = json!({
        "topic": letter.get("topic")?,
        "partition": letter.get("partition")?,
        "offset": letter.get("offset")?,
    });
    Some(origin)
}

/// Every letter of the dead-letter topic, in the topic's order, each with
/// `redrives`: the outcomes recorded for it so far (oldest first). Blocking.
pub fn letters(config: &config::Config) -> anyhow::Result<Vec<Value>> {
    let topic = &config.kafka.dlq_topic;
    let consumer = throwaway_consumer(&config.kafka.brokers, topic, "dlq-read", true)?;
    let mut letters: Vec<Value> = Vec::new();
    let mut outcomes: HashMap<String, Vec<Value>> = HashMap::new();
    let never = AtomicBool::new(false);
    crate::tail::read(&consumer, topic, false, &never, |message| {
        let payload = message.payload().unwrap_or_default();
        let Ok(record) = serde_json::from_slice::<Value>(payload) else {
            // Not written by the writer; shown as it is.
            letters.push(json!({
                "reason": "not a letter of this writer",
                "payload": String::from_utf8_lossy(payload),
                "dlq_offset": message.offset(),
            }));
            return Ok(true);
        };
        match record.get("redrive") {
            Some(redrive) => {
                let origin = redrive["origin"].to_string();
                outcomes.entry(origin).or_default().push(json!({
                    "outcome": redrive["outcome"],
                    "reason": redrive["reason"],
                    "at": redrive["at"],
                }));
            }
            None => letters.push(record),
        }
        Ok(true)
    })?;
    consumer.unsubscribe();
    for letter in &mut letters {
        let done = origin_of(letter)
            .and_then(|origin| outcomes.remove(&origin.to_string()))
            .unwrap_or_default();
        letter["redrives"] = Value::Array(done);
    }
    Ok(letters)
}

/// What re-driving one fixed event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The letter's place in the events topic, when the line was a letter.
    pub origin: Option<Value>,
    /// The event's id, when it parsed.
    pub event_id: Option<String>,
    /// `applied`, `shortfall`, `duplicate`, `stale`, `invalid` (the payload
    /// still does not parse or check), `refused` (the allocator refused
    /// it) or `ignored` (a heartbeat: news only when it arrives); the first
    /// four mean the event is now applied, once, and `ignored` that there
    /// is nothing to apply.
    pub outcome: &'static str,
    /// Why, for `invalid`, `refused` and `ignored`.
    pub reason: Option<String>,
}

impl Outcome {
    /// Whether the event is applied now (by this redrive or an earlier one).
    pub fn is_applied(&self) -> bool {
        !matches!(self.outcome, "invalid" | "refused")
    }

    fn to_json(&self) -> Value {
        json!({
            "origin": self.origin,
            "event_id": self.event_id,
            "outcome": self.outcome,
            "reason": self.reason,
        })
    }
}

/// The event of one line of a fixed file: a letter (its `payload`, a string)
/// or the event itself (an object without `payload`).
fn event_of(line: &Value) -> (Option<Value>, Vec<u8>) {
    match line.get("payload").and_then(Value::as_str) {
        Some(payload) => (origin_of(line), payload.as_bytes().to_vec()),
        None => (None, line.to_string().into_bytes()),
    }
}

/// Applies each fixed event of `lines` once, records each outcome in the
/// dead-letter topic and prints it to `out` as a JSON line. Stops at the
/// first event the store cannot take now (Redis unreachable, the key being
/// drained): nothing is recorded for it, and running the same file again
/// goes on from there (what was applied answers `duplicate`).
pub async fn redrive(
    config: &config::Config,
    allocator: &Allocator,
    producer: &FutureProducer,
    lines: &[Value],
    out: &mut dyn Write,
) -> anyhow::Result<Vec<Outcome>> {
    let timeout = Duration::from_millis(config.kafka.request_timeout_ms);
    let mut done = Vec::with_capacity(lines.len());
    for line in lines {
        let (origin, payload) = event_of(line);
        let (event_id, key, outcome, reason) = match crate::ingest::parse_event(&payload) {
            Err(reason) => (None, String::new(), "invalid", Some(reason)),
            // A heartbeat is news only when it arrives: redriven, it says
            // nothing about the source now.
            Ok(crate::ingest::Event::Heartbeat { .. }) => (
                None,
                String::new(),
                "ignored",
                Some("a heartbeat is not redriven".to_owned()),
            ),
            Ok(crate::ingest::Event::Adjustment(adjustment)) => {
                let key = format!(
                    "{}/{}/{}",
                    adjustment.merchant, adjustment.sku, adjustment.location
                );
                let (outcome, reason) = match allocator.adjust(&adjustment).await {
                    Ok(AdjustmentOutcome::Applied { shortfall, .. }) => {
                        (if shortfall { "shortfall" } else { "applied" }, None)
                    }
                    Ok(AdjustmentOutcome::Duplicate) => ("duplicate", None),
                    Ok(AdjustmentOutcome::Stale { .. }) => ("stale", None),
                    Err(AllocatorError::InvalidRequest(reason)) => ("refused", Some(reason)),
                    Err(error) => {
                        anyhow::bail!(
                            "event {}: the stock store cannot take it now ({error}); run the same file again",
                            adjustment.event_id
                        )
                    }
                };
                (Some(adjustment.event_id), key, outcome, reason)
            }
        };
        let result = Outcome {
            origin,
            event_id,
            outcome,
            reason,
        };
        let mut recorded = result.to_json();
        recorded["at"] = json!(
            time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        );
        let record = json!({ "redrive": recorded }).to_string();
        producer
            .send(
                FutureRecord::to(&config.kafka.dlq_topic)
                    .key(&key)
                    .payload(&record),
                timeout,
            )
            .await
            .map_err(|(error, _)| {
                anyhow::anyhow!(
                    "{}: recording the outcome of {:?}: {error}",
                    config.kafka.dlq_topic,
                    result.event_id
                )
            })?;
        writeln!(out, "{}", result.to_json())?;
        done.push(result);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_a_letter_or_the_event_itself() {
        let letter = json!({
            "reason": "qty must be an integer",
            "topic": "inventory.events", "partition": 2, "offset": 17,
            "payload": "{\"event_id\":\"e1\"}",
        });
        let (origin, payload) = event_of(&letter);
        assert_eq!(
            origin,
            Some(json!({ "topic": "inventory.events", "partition": 2, "offset": 17 }))
        );
        assert_eq!(payload, b"{\"event_id\":\"e1\"}");
        let event = json!({ "event_id": "e2", "qty": 1 });
        let (origin, payload) = event_of(&event);
        assert_eq!(origin, None);
        assert_eq!(serde_json::from_slice::<Value>(&payload).ok(), Some(event));
    }
}
