//! The outbox relay: each partition's ledger stream to Kafka and PostgreSQL.
//!
//! Owns moving entries, in stream order, from `inv:{p}:ledger` to the Kafka
//! topic (keyed by stock key, ledger partition `p` onto Kafka partition
//! `p mod K`, so per-key order holds) and to the PostgreSQL `ledger` and
//! `stock_snapshot` tables, and only then acknowledging and trimming them.
//!
//! Exactly-once in effect, at-least-once in delivery: a batch is read with
//! `XREADGROUP`; published to Kafka (idempotent producer, `acks=all`) and
//! awaited; inserted into PostgreSQL in one transaction (`ON CONFLICT
//! (entry_id) DO NOTHING`, the snapshot moved only by a newer version); then
//! `XACK`ed; then the stream is trimmed below its oldest unacknowledged
//! entry. A crash anywhere before the ack re-delivers the batch to the same
//! consumer (it reads its pending entries first on start): PostgreSQL keeps
//! one row per entry; Kafka may carry a duplicate, with the same `entry_id`,
//! which consumers drop. Reads are non-blocking and per stream, so the relay
//! works on Redis Cluster too. Nothing here decides stock.

use std::collections::HashMap;
use std::time::Duration;

use allocator::keys::ledger_stream;
use fred::prelude::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use tokio_postgres::Client;
use tracing::{debug, warn};

/// The consumer group every writer of a deployment shares.
pub const GROUP: &str = "ledger-writer";

/// One stream entry: its stream id and its decoded JSON.
type Entry = (String, Value);

/// A stream entry as read: its id and its fields (none when the entry was
/// deleted from the stream while pending).
type RawEntry = (String, Option<HashMap<String, String>>);

/// Where one writer instance relays.
pub struct Relay {
    /// Redis, for the streams.
    pub redis: Pool,
    /// The idempotent producer.
    pub producer: FutureProducer,
    /// PostgreSQL, for the ledger tables.
    pub postgres: Client,
    /// Kafka topic of the ledger.
    pub topic: String,
    /// Partitions of that topic.
    pub topic_partitions: u32,
    /// This writer's consumer name (its pending entries are its own).
    pub consumer: String,
    /// Most entries per batch.
    pub batch_max: usize,
    /// Bound on awaiting Kafka deliveries of one batch.
    pub kafka_timeout: Duration,
}

/// What one pass over a partition did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Entries relayed and acknowledged.
    pub relayed: usize,
}

/// Why a pass did not relay its batch (it is retried; nothing was acknowledged).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading, acknowledging or trimming the stream failed.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// Kafka refused or did not confirm a delivery in time.
    #[error("kafka: {0}")]
    Kafka(String),
    /// Writing the ledger rows failed.
    #[error("postgresql: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// An entry the scripts wrote is not valid JSON: a bug, never skipped.
    #[error("malformed ledger entry {id}: {reason}")]
    Malformed {
        /// Its stream id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Relay {
    /// Creates the consumer group on `partition`'s stream if it is missing
    /// (reading from the very first entry).
    pub async fn ensure_group(&self, partition: u32) -> Result<(), RelayError> {
        let created: Result<(), fred::error::Error> = self
            .redis
            .next()
            .xgroup_create(ledger_stream(partition), GROUP, "0", true)
            .await;
        match created {
            Err(error) if !error.details().contains("BUSYGROUP") => Err(error.into()),
            _ => Ok(()),
        }
    }

    /// Relays one batch of `partition`: this consumer's pending entries first
    /// (a previous run died before acknowledging them), then new ones.
    pub async fn pass(&self, partition: u32) -> Result<Pass, RelayError> {
        let pending = self.read(partition, "0").await?;
        let batch = if pending.is_empty() {
            self.read(partition, ">").await?
        } else {
            pending
        };
        if batch.is_empty() {
            return Ok(Pass::default());
        }
        let (batch, vanished): (Vec<RawEntry>, Vec<RawEntry>) =
            batch.into_iter().partition(|(_, fields)| fields.is_some());
        if !vanished.is_empty() {
            // Deleted from the stream while pending (someone trimmed or
            // XDELed past the writer): nothing left to relay; acknowledge so
            // the partition moves on, and say so loudly.
            let ids: Vec<String> = vanished.into_iter().map(|(id, _)| id).collect();
            tracing::error!(
                partition,
                ?ids,
                "pending ledger entries were deleted before they were relayed"
            );
            let _: i64 = self
                .redis
                .next()
                .xack(ledger_stream(partition), GROUP, ids)
                .await?;
        }
        if batch.is_empty() {
            return Ok(Pass::default());
        }
        let entries = batch
            .into_iter()
            .map(|(id, fields)| {
                let fields = fields.unwrap_or_default();
                let text = fields.get("e").ok_or_else(|| RelayError::Malformed {
                    id: id.clone(),
                    reason: "no e field".to_owned(),
                })?;
                let mut entry: Value =
                    serde_json::from_str(text).map_err(|error| RelayError::Malformed {
                        id: id.clone(),
                        reason: error.to_string(),
                    })?;
                entry["entry_id"] = Value::String(format!("{partition}-{id}"));
                entry["stream_id"] = Value::String(id.clone());
                Ok((id, entry))
            })
            .collect::<Result<Vec<Entry>, RelayError>>()?;
        self.publish(partition, &entries).await?;
        self.store(&entries).await?;
        let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        let stream = ledger_stream(partition);
        let _: i64 = self.redis.next().xack(&stream, GROUP, ids.clone()).await?;
        self.trim(partition, ids.last().map(String::as_str)).await?;
        debug!(partition, relayed = entries.len(), "batch relayed");
        Ok(Pass {
            relayed: entries.len(),
        })
    }

    async fn read(&self, partition: u32, from: &str) -> Result<Vec<RawEntry>, RelayError> {
        let stream = ledger_stream(partition);
        // Nil when nothing is new; an empty list when nothing is pending.
        let reply: fred::types::Value = self
            .redis
            .next()
            .xreadgroup(
                GROUP,
                &self.consumer,
                Some(self.batch_max as u64),
                None,
                false,
                stream.clone(),
                from,
            )
            .await?;
        Ok(parse_read(reply, &stream))
    }

    async fn publish(&self, partition: u32, entries: &[Entry]) -> Result<(), RelayError> {
        let kafka_partition = (partition % self.topic_partitions.max(1)) as i32;
        let mut deliveries = Vec::with_capacity(entries.len());
        for (_, entry) in entries {
            let key = format!(
                "{}|{}|{}",
                entry["merchant"].as_str().unwrap_or_default(),
                entry["sku"].as_str().unwrap_or_default(),
                entry["location"].as_str().unwrap_or_default()
            );
            let payload = entry.to_string();
            let record = FutureRecord::to(&self.topic)
                .key(&key)
                .payload(&payload)
                .partition(kafka_partition);
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(error, _)| RelayError::Kafka(error.to_string()))?;
            deliveries.push(delivery);
        }
        for delivery in deliveries {
            match tokio::time::timeout(self.kafka_timeout, delivery).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((error, _)))) => return Err(RelayError::Kafka(error.to_string())),
                Ok(Err(_)) => return Err(RelayError::Kafka("delivery canceled".to_owned())),
                Err(_) => return Err(RelayError::Kafka("delivery timed out".to_owned())),
            }
        }
        Ok(())
    }

    async fn store(&self, entries: &[Entry]) -> Result<(), RelayError> {
        let batch =
            Value::Array(entries.iter().map(|(_, entry)| entry.clone()).collect()).to_string();
        self.postgres
            .execute(
                "INSERT INTO ledger (entry_id, partition, stream_id, op, merchant, sku, location, cell, qty,
                     on_hand_before, on_hand_after, reserved_before, reserved_after, version,
                     reservation_id, cart_id, transfer_id, idempotency_key, source, source_event_id,
                     shortfall, node, at, entry)
                 SELECT e->>'entry_id', (e->>'partition')::int, e->>'stream_id', e->>'op', e->>'merchant',
                     e->>'sku', e->>'location', e->>'cell', COALESCE((e->>'qty')::bigint, 0),
                     (e->>'on_hand_before')::bigint, (e->>'on_hand_after')::bigint,
                     (e->>'reserved_before')::bigint, (e->>'reserved_after')::bigint, (e->>'version')::bigint,
                     e->>'reservation_id', e->>'cart_id', e->>'transfer_id', e->>'idempotency_key',
                     e->>'source', e->>'source_event_id', COALESCE((e->>'shortfall')::boolean, false),
                     e->>'node', to_timestamp((e->>'at_ms')::bigint / 1000.0), e
                 FROM jsonb_array_elements($1::text::jsonb) AS e
                 ON CONFLICT (entry_id) DO NOTHING",
                &[&batch],
            )
            .await?;
        self.postgres
            .execute(
                "INSERT INTO stock_snapshot (cell, merchant, sku, location, on_hand, reserved, version, updated_at)
                 SELECT DISTINCT ON (e->>'cell') e->>'cell', e->>'merchant', e->>'sku', e->>'location',
                     (e->>'on_hand_after')::bigint, (e->>'reserved_after')::bigint, (e->>'version')::bigint,
                     to_timestamp((e->>'at_ms')::bigint / 1000.0)
                 FROM jsonb_array_elements($1::text::jsonb) AS e
                 ORDER BY e->>'cell', (e->>'version')::bigint DESC
                 ON CONFLICT (cell) DO UPDATE SET on_hand = EXCLUDED.on_hand, reserved = EXCLUDED.reserved,
                     version = EXCLUDED.version, updated_at = EXCLUDED.updated_at
                 WHERE stock_snapshot.version < EXCLUDED.version",
                &[&batch],
            )
            .await?;
        Ok(())
    }

    /// Trims the stream below its oldest unacknowledged entry (or below the
    /// last acknowledged one when nothing is pending): relayed entries go,
    /// unrelayed ones never do.
    async fn trim(&self, partition: u32, last_acked: Option<&str>) -> Result<(), RelayError> {
        let stream = ledger_stream(partition);
        let summary: Value = self
            .redis
            .next()
            .xpending::<fred::types::Value, _, _, _>(&stream, GROUP, ())
            .await
            .map(value_to_json)?;
        let oldest_pending = summary.get(1).and_then(Value::as_str).map(str::to_owned);
        let Some(min_id) = oldest_pending.or_else(|| last_acked.map(str::to_owned)) else {
            return Ok(());
        };
        let trim = fred::types::streams::XCap::try_from(("MINID", "=", min_id.as_str()))
            .map_err(RelayError::Redis)?;
        let _: i64 = self.redis.next().xtrim(&stream, trim).await?;
        Ok(())
    }
}

/// The entries of `stream` in an XREADGROUP reply (RESP2 arrays or RESP3
/// maps): `[[stream, [[id, [field, value, ...] | nil], ...]], ...]`.
fn parse_read(reply: fred::types::Value, stream: &str) -> Vec<RawEntry> {
    use fred::types::Value as V;
    let streams: Vec<(V, V)> = match reply {
        V::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                V::Array(mut pair) if pair.len() == 2 => {
                    let entries = pair.pop()?;
                    Some((pair.pop()?, entries))
                }
                _ => None,
            })
            .collect(),
        V::Map(map) => map
            .inner()
            .into_iter()
            .map(|(key, value)| (V::from(key), value))
            .collect(),
        _ => Vec::new(),
    };
    let Some((_, entries)) = streams
        .into_iter()
        .find(|(name, _)| name.as_str().as_deref() == Some(stream))
    else {
        return Vec::new();
    };
    let V::Array(entries) = entries else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let V::Array(mut parts) = entry else {
                return None;
            };
            if parts.len() != 2 {
                return None;
            }
            let fields = parts.pop()?;
            let id = parts.pop()?.as_string()?;
            let fields = match fields {
                V::Array(flat) => Some(
                    flat.chunks(2)
                        .filter_map(|pair| {
                            Some((pair.first()?.as_string()?, pair.get(1)?.as_string()?))
                        })
                        .collect(),
                ),
                V::Map(map) => Some(
                    map.inner()
                        .into_iter()
                        .filter_map(|(key, value)| {
                            Some((key.as_str()?.to_string(), value.as_string()?))
                        })
                        .collect(),
                ),
                _ => None,
            };
            Some((id, fields))
        })
        .collect()
}

fn value_to_json(value: fred::types::Value) -> Value {
    match value {
        fred::types::Value::Array(items) => {
            Value::Array(items.into_iter().map(value_to_json).collect())
        }
        fred::types::Value::Null => Value::Null,
        other => other.as_string().map(Value::String).unwrap_or(Value::Null),
    }
}

/// Logs a failed pass with the partition; the caller retries after a pause.
pub fn report(partition: u32, error: &RelayError) {
    warn!(partition, %error, "relay pass failed; retrying");
}

#[cfg(test)]
mod tests {
    use fred::types::Value as V;

    use super::parse_read;

    fn text(value: &str) -> V {
        V::String(value.to_owned().into())
    }

    #[test]
    fn a_nil_reply_is_no_entries() {
        assert!(parse_read(V::Null, "inv:{1}:ledger").is_empty());
    }

    #[test]
    fn entries_and_entries_deleted_while_pending_are_read() {
        let reply = V::Array(vec![V::Array(vec![
            text("inv:{1}:ledger"),
            V::Array(vec![
                V::Array(vec![text("5-0"), V::Array(vec![text("e"), text("{}")])]),
                V::Array(vec![text("6-0"), V::Null]),
            ]),
        ])]);
        let entries = parse_read(reply, "inv:{1}:ledger");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0, "5-0");
        assert_eq!(
            entries[0]
                .1
                .as_ref()
                .and_then(|fields| fields.get("e"))
                .map(String::as_str),
            Some("{}")
        );
        assert_eq!(entries[1], ("6-0".to_owned(), None));
    }
}
