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

/// A stream entry as read: its id and its fields.
type RawEntry = (String, HashMap<String, String>);

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
        let entries = batch
            .into_iter()
            .map(|(id, fields)| {
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

    async fn read(
        &self,
        partition: u32,
        from: &str,
    ) -> Result<Vec<(String, HashMap<String, String>)>, RelayError> {
        let stream = ledger_stream(partition);
        let mut reply: HashMap<String, Vec<RawEntry>> = self
            .redis
            .next()
            .xreadgroup_map(
                GROUP,
                &self.consumer,
                Some(self.batch_max as u64),
                None,
                false,
                stream.clone(),
                from,
            )
            .await?;
        Ok(reply.remove(&stream).unwrap_or_default())
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
