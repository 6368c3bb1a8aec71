//! The outbox relay: each partition's ledger stream to Kafka and PostgreSQL.
//!
//! Owns moving entries, in stream order, from `inv:{p}:ledger` to the Kafka
//! topic and to the PostgreSQL `ledger` and `stock_snapshot` tables, and
//! only then acknowledging and trimming them.
//!
//! **Order, as a consumer may rely on it.** A message's key is its entry's
//! *cell* (`merchant|sku|location|pool`, or `…|bucket|node` in a flash
//! sale), and ledger partition `p` goes to Kafka partition `p mod K`: a cell
//! lives in one ledger partition, so all of a cell's entries share one Kafka
//! partition and arrive in the cell's `version` order (first copy of each
//! `entry_id`). A stock key in a flash sale has cells in several ledger
//! partitions (its pool and each node's bucket, spread over Redis masters on
//! purpose), so its entries as a whole are *not* in one order: merge them by
//! cell, each cell by `version`; across cells only a transfer's debit
//! (`transfer_out`) comes before its credit (`transfer_in`, same
//! `transfer_id`). Keying by stock key would have promised Kafka's per-key
//! order for a key whose messages are on several partitions.
//! It relays only partitions whose lease this writer holds ([`crate::lease`]).
//!
//! Exactly-once in effect, at-least-once in delivery: a batch is read with
//! `XREADGROUP` (inside `lua/relay_read.lua`, which checks the lease);
//! published to Kafka (idempotent producer, `acks=all`) and awaited;
//! inserted into PostgreSQL in one transaction (`ON CONFLICT (entry_id) DO
//! NOTHING`, the snapshot moved only by a newer version, the lease token
//! checked against `relay_fence`); then acknowledged and the stream trimmed
//! below its oldest unacknowledged entry (`lua/relay_ack.lua`, which checks
//! the lease again). Every writer reads as the one consumer
//! [`allocator::outbox::OUTBOX_CONSUMER`], so
//! a crash anywhere before the acknowledgement leaves the batch pending for
//! whichever writer holds the lease next, and it reads pending entries
//! first: PostgreSQL keeps one row per entry; Kafka may carry a duplicate,
//! with the same `entry_id`, which consumers drop. A batch Kafka confirmed
//! but PostgreSQL refused (down, read-only, full) is retried without
//! publishing it again: the relay remembers, per partition and lease token,
//! the stream ids Kafka confirmed and not yet acknowledged (its
//! `published`), so a PostgreSQL outage adds no duplicates; only a writer's
//! death, a lost lease, or a delivery that timed out yet landed does (or a
//! retry, with `kafka.idempotent_producer` off). Reads are non-blocking and
//! per stream, so the relay works on Redis Cluster too. Nothing here decides
//! stock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use allocator::outbox::{LeaseReply, OutboxRead};
use allocator::{Allocator, AllocatorError, LedgerEntry};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_postgres::Client;
use tracing::{debug, info, warn};

use crate::lease::Lease;
use crate::metrics::Metrics;

/// One stream entry: its stream id and the entry, typed.
type Entry = (String, LedgerEntry);

/// A stream entry as read: its id and its `e` field (none when the entry was
/// deleted from the stream while pending).
type RawEntry = (String, Option<String>);

/// Where one writer instance relays.
pub struct Relay {
    /// The deployment's config (Kafka topic and partitions, PostgreSQL, limits).
    pub config: Arc<config::Config>,
    /// The stock store, for the streams (through the allocator's outbox calls).
    pub allocator: Allocator,
    /// The idempotent producer; replaced after a fatal producer error.
    pub producer: FutureProducer,
    /// PostgreSQL, for the ledger tables; reconnected when it drops.
    pub postgres: Option<Client>,
    /// This writer's series.
    pub metrics: Arc<Metrics>,
    /// Per partition: the lease token and the stream ids of entries Kafka
    /// confirmed under it that are not acknowledged yet (PostgreSQL refused
    /// their batch). A retry publishes only the others; the set empties when
    /// the batch is acknowledged and starts afresh under a new token.
    published: HashMap<u32, (u64, HashSet<String>)>,
    /// Redis's clock as this writer last read it, for the freshness series.
    clock: RedisClock,
    /// The ledger's day partitions this writer made sure exist (forgotten
    /// when an insert finds one missing: retention dropped it).
    days: HashSet<time::Date>,
}

/// How often the writer reads Redis's clock again for the freshness series.
const CLOCK_REFRESH: Duration = Duration::from_secs(10);

/// Redis's clock seen from this process: the offset from the local wall
/// clock to Redis `TIME` (entries are stamped with Redis time), read again
/// every [`CLOCK_REFRESH`]. Freshness is a measurement, never a decision, so
/// a local clock corrected this way is good enough (off by at most the
/// round trip of one `TIME` plus the local clock's drift over 10 s).
#[derive(Debug, Default)]
struct RedisClock {
    offset_ms: i64,
    read_at: Option<Instant>,
}

/// Seconds from Redis time `operation_ms` (an entry's stream id) to Redis
/// time `now_ms`; 0 when the clock estimate is behind the entry.
fn seconds_since(now_ms: i64, operation_ms: u64) -> f64 {
    (now_ms - operation_ms as i64).max(0) as f64 / 1000.0
}

/// The local wall clock in ms since the epoch.
pub(crate) fn local_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
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
    Redis(#[from] AllocatorError),
    /// Kafka refused or did not confirm a delivery in time.
    #[error("kafka: {0}")]
    Kafka(String),
    /// Writing the ledger rows failed.
    #[error("postgresql: {0}")]
    Postgres(String),
    /// This writer no longer holds the partition's lease (another writer
    /// took it, or it lapsed): nothing was acknowledged; the holder relays.
    #[error("partition lease lost")]
    Fenced,
    /// PostgreSQL has seen a newer token for the partition than this
    /// writer's lease (or the same one from another writer). Nothing was
    /// written. Either another writer holds a newer lease (this one is
    /// fenced), or this Redis's token counter went back (Redis lost it, or
    /// was replaced): then the fence stops moving, and once nobody has
    /// written it for a lease time the writer advances past it
    /// ([`Relay::advance`]).
    #[error("lease token {token} behind PostgreSQL's fence {newest}")]
    Behind {
        /// This lease's token.
        token: u64,
        /// The newest token PostgreSQL has seen for the partition.
        newest: u64,
        /// How long since anyone wrote the fence (ms).
        idle_ms: u64,
    },
    /// An entry the scripts wrote is not valid JSON: a bug, never skipped.
    #[error("malformed ledger entry {id}: {reason}")]
    Malformed {
        /// Its stream id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl RelayError {
    /// Every value [`RelayError::sink`] gives (each series starts at 0, so
    /// an alert on its increase sees the first failure).
    pub const SINKS: [&'static str; 4] = ["redis", "kafka", "postgresql", "fenced"];

    /// The sink a failed pass is counted under in `errors_total`.
    pub fn sink(&self) -> &'static str {
        match self {
            Self::Redis(_) | Self::Malformed { .. } => "redis",
            Self::Kafka(_) => "kafka",
            Self::Postgres(_) => "postgresql",
            Self::Fenced | Self::Behind { .. } => "fenced",
        }
    }
}

impl From<tokio_postgres::Error> for RelayError {
    fn from(error: tokio_postgres::Error) -> Self {
        // The Display of a server error is just "db error"; its details say why.
        let text = match error.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => error.to_string(),
        };
        Self::Postgres(text)
    }
}

impl Relay {
    /// A relay with its producer; PostgreSQL connects on first use.
    pub fn new(
        config: Arc<config::Config>,
        allocator: Allocator,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            producer: crate::producer(&config)?,
            config,
            allocator,
            postgres: None,
            metrics,
            published: HashMap::new(),
            days: HashSet::new(),
            clock: RedisClock::default(),
        })
    }

    /// Redis time now (ms), from the last read of its clock; `None` when
    /// Redis cannot be read (the series then skips this batch).
    async fn redis_now_ms(&mut self) -> Option<i64> {
        if self
            .clock
            .read_at
            .is_none_or(|read_at| read_at.elapsed() >= CLOCK_REFRESH)
        {
            let before = local_ms();
            let redis = self.allocator.redis_time_ms().await.ok()? as i64;
            let after = local_ms();
            self.clock = RedisClock {
                offset_ms: redis - (before + after) / 2,
                read_at: Some(Instant::now()),
            };
        }
        Some(local_ms() + self.clock.offset_ms)
    }

    /// Counts `entries` as confirmed by `sink` now (the freshness series).
    async fn observe_visible(&mut self, sink: &str, entries: &[Entry]) {
        let Some(now_ms) = self.redis_now_ms().await else {
            return;
        };
        let series = self
            .metrics
            .entry_visible_seconds
            .with_label_values(&[sink]);
        for (_, entry) in entries {
            if let Ok(id) = entry.id() {
                series.observe(seconds_since(now_ms, id.ms));
            }
        }
    }

    /// Relays one batch of the leased partition: entries left pending first
    /// (a writer died before acknowledging them), then new ones.
    pub async fn pass(&mut self, lease: &Lease) -> Result<Pass, RelayError> {
        let partition = lease.partition;
        let started = Instant::now();
        let batch = self.read(lease).await?;
        if batch.is_empty() {
            return Ok(Pass::default());
        }
        let (batch, vanished): (Vec<RawEntry>, Vec<RawEntry>) =
            batch.into_iter().partition(|(_, text)| text.is_some());
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
            self.acknowledge(lease, ids).await?;
        }
        if batch.is_empty() {
            return Ok(Pass::default());
        }
        let entries = batch
            .into_iter()
            .map(|(id, text)| {
                let text = text.unwrap_or_default();
                // The schema's one home checks it: a missing or unknown field
                // stops the partition loudly, never relays a silent 0.
                let mut entry =
                    LedgerEntry::parse(&text).map_err(|reason| RelayError::Malformed {
                        id: id.clone(),
                        reason,
                    })?;
                entry.entry_id = Some(format!("{partition}-{id}"));
                entry.stream_id = Some(id.clone());
                Ok((id, entry))
            })
            .collect::<Result<Vec<Entry>, RelayError>>()?;
        // A retry of a batch Kafka already confirmed publishes only what it
        // did not (module docs).
        let confirmed = match self.published.get(&partition) {
            Some((token, ids)) if *token == lease.token => Some(ids),
            _ => None,
        };
        let fresh: Vec<Entry>;
        let to_publish = match confirmed {
            None => &entries[..],
            Some(ids) => {
                fresh = entries
                    .iter()
                    .filter(|(id, _)| !ids.contains(id))
                    .cloned()
                    .collect();
                &fresh[..]
            }
        };
        if !to_publish.is_empty() {
            self.publish(partition, to_publish).await?;
            self.observe_visible("kafka", to_publish).await;
            let ids = to_publish.iter().map(|(id, _)| id.clone());
            match self.published.get_mut(&partition) {
                Some((token, confirmed)) if *token == lease.token => confirmed.extend(ids),
                _ => {
                    self.published
                        .insert(partition, (lease.token, ids.collect()));
                }
            }
        }
        if let Err(error) = self.store(lease, &entries).await {
            // A day partition may have been dropped since (retention): make
            // sure again on the next try.
            self.days.clear();
            return Err(error);
        }
        self.observe_visible("postgresql", &entries).await;
        let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        self.acknowledge(lease, ids).await?;
        self.published.remove(&partition);
        self.metrics.relayed.inc_by(entries.len() as u64);
        self.metrics.batch_entries.observe(entries.len() as f64);
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        debug!(partition, relayed = entries.len(), "batch relayed");
        Ok(Pass {
            relayed: entries.len(),
        })
    }

    async fn read(&self, lease: &Lease) -> Result<Vec<RawEntry>, RelayError> {
        match self
            .allocator
            .outbox_read(
                lease.partition,
                &lease.value,
                self.config.ledger_writer.relay_batch_entries_max,
            )
            .await?
        {
            OutboxRead::Entries(entries) => Ok(entries),
            OutboxRead::Fenced => Err(RelayError::Fenced),
        }
    }

    async fn acknowledge(&self, lease: &Lease, ids: Vec<String>) -> Result<(), RelayError> {
        if self
            .allocator
            .outbox_ack(lease.partition, &lease.value, ids)
            .await?
        {
            Ok(())
        } else {
            Err(RelayError::Fenced)
        }
    }

    async fn publish(&mut self, partition: u32, entries: &[Entry]) -> Result<(), RelayError> {
        let Err(error) = self.publish_once(partition, entries).await else {
            return Ok(());
        };
        // An idempotent producer whose deliveries timed out bumps its epoch,
        // and a broker may then fence the old one for good (or librdkafka
        // calls the state fatal): only a new producer recovers.
        let fatal = self.producer.client().fatal_error();
        let fenced = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::Fatal
            )
        );
        if fatal.is_some() || fenced {
            warn!(%error, ?fatal, "kafka producer unusable; creating a new one");
            self.producer = crate::producer(&self.config)
                .map_err(|error| RelayError::Kafka(error.to_string()))?;
        }
        Err(RelayError::Kafka(error.to_string()))
    }

    async fn publish_once(&self, partition: u32, entries: &[Entry]) -> Result<(), KafkaError> {
        publish_entries(
            &self.producer,
            &self.config,
            partition,
            entries.iter().map(|(_, entry)| entry),
        )
        .await
    }

    /// Writes the batch in one transaction, after checking the lease token
    /// is the newest PostgreSQL has seen for the partition.
    async fn store(&mut self, lease: &Lease, entries: &[Entry]) -> Result<(), RelayError> {
        if self.postgres.as_ref().is_none_or(Client::is_closed) {
            self.postgres = None;
            let client = crate::connect_postgres(&self.config)
                .await
                .map_err(|error| RelayError::Postgres(format!("{error:#}")))?;
            crate::bound_idle_transactions(&client, &self.config).await?;
            info!("connected to postgresql");
            self.postgres = Some(client);
        }
        let client = self.postgres.as_mut().expect("connected above");
        let days = entry_days(entries.iter().map(|(_, entry)| entry));
        if !days.is_subset(&self.days) {
            ensure_days(client, &days).await?;
            self.days.extend(days);
        }
        let batch =
            serde_json::to_string(&entries.iter().map(|(_, entry)| entry).collect::<Vec<_>>())
                .map_err(|error| {
                    RelayError::Postgres(format!("batch did not serialize: {error}"))
                })?;
        let transaction = client.transaction().await?;
        let fenced_in = transaction
            .execute(
                "INSERT INTO relay_fence (partition, token, owner, updated_at)
                 VALUES ($1, $2, $3, now())
                 ON CONFLICT (partition) DO UPDATE
                     SET token = EXCLUDED.token, owner = EXCLUDED.owner, updated_at = now()
                     WHERE relay_fence.token < EXCLUDED.token
                        OR (relay_fence.token = EXCLUDED.token AND relay_fence.owner = EXCLUDED.owner)",
                &[
                    &(lease.partition as i32),
                    &(lease.token as i64),
                    &self.config.node.id,
                ],
            )
            .await?;
        if fenced_in == 0 {
            let row = transaction
                .query_one(
                    "SELECT token, (extract(epoch FROM now() - updated_at) * 1000)::bigint
                     FROM relay_fence WHERE partition = $1",
                    &[&(lease.partition as i32)],
                )
                .await?;
            transaction.rollback().await?;
            return Err(RelayError::Behind {
                token: lease.token,
                newest: u64::try_from(row.get::<_, i64>(0)).unwrap_or_default(),
                idle_ms: u64::try_from(row.get::<_, i64>(1)).unwrap_or_default(),
            });
        }
        let inserted = insert_new_rows(&transaction, &batch).await?;
        // Signals from the entries new to the ledger only: a batch relayed
        // again decides nothing again.
        let new: Vec<&LedgerEntry> = entries
            .iter()
            .map(|(_, entry)| entry)
            .filter(|entry| {
                entry
                    .entry_id
                    .as_ref()
                    .is_some_and(|id| inserted.contains(id))
            })
            .collect();
        let decided = crate::signals::derive(
            &transaction,
            &new,
            self.config.cache.low_stock_threshold_default,
        )
        .await?;
        transaction.commit().await?;
        for (kind, count) in decided {
            self.metrics
                .signals_decided
                .with_label_values(&[kind.as_str()])
                .inc_by(count);
        }
        Ok(())
    }
}

impl Relay {
    /// After [`RelayError::Behind`]: when nobody has written the fence for
    /// longer than a lease time (`idle_ms`), gives this writer's lease on the
    /// partition a token past `newest`, if it still holds it in Redis (the
    /// counter went back), so its next pass writes again. A fence written
    /// within a lease time means another writer relays the partition now,
    /// from this Redis (this writer's lease is stale) or from another Redis
    /// sharing the database (a misconfiguration: advancing would let two
    /// stores take turns); then this writer is fenced, and says so. Returns
    /// the new token, if any.
    pub async fn advance(
        &self,
        lease: &Lease,
        newest: u64,
        idle_ms: u64,
    ) -> Result<Option<u64>, RelayError> {
        if idle_ms <= self.config.ledger_writer.partition_lease_ttl_ms {
            return Ok(None);
        }
        let reply = self
            .allocator
            .relay_lease_advance(lease.partition, &self.config.node.id, newest)
            .await?;
        Ok(match reply {
            LeaseReply {
                status,
                token: Some(token),
                ..
            } if status == "advanced" => {
                warn!(
                    partition = lease.partition,
                    old = lease.token,
                    fence = newest,
                    token,
                    "lease token behind PostgreSQL's fence (Redis lost or replaced its \
                     counter); advanced past it"
                );
                Some(token)
            }
            _ => None,
        })
    }
}

/// Publishes `entries` of ledger partition `partition` to the ledger topic
/// and waits for every delivery: keyed by cell, to Kafka partition
/// `partition mod K` (module docs). The relay's and the replay's one way
/// into Kafka.
pub async fn publish_entries<'a>(
    producer: &FutureProducer,
    config: &config::Config,
    partition: u32,
    entries: impl Iterator<Item = &'a LedgerEntry>,
) -> Result<(), KafkaError> {
    let kafka_partition = (partition % config.kafka.topic_partitions.max(1)) as i32;
    let timeout = Duration::from_millis(config.kafka.request_timeout_ms);
    let mut deliveries = Vec::new();
    for entry in entries {
        // The cell: the unit Kafka's per-key order holds for (module docs).
        let key = entry.cell.as_str();
        // Strings and integers only: serializing cannot fail.
        let payload = serde_json::to_string(entry).expect("a ledger entry serializes");
        let record = FutureRecord::to(&config.kafka.ledger_topic)
            .key(key)
            .payload(&payload)
            .partition(kafka_partition);
        let delivery = producer.send_result(record).map_err(|(error, _)| error)?;
        deliveries.push(delivery);
    }
    for delivery in deliveries {
        match tokio::time::timeout(timeout, delivery).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err((error, _)))) => return Err(error),
            Ok(Err(_)) => return Err(KafkaError::Canceled),
            Err(_) => {
                return Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageTimedOut,
                ));
            }
        }
    }
    Ok(())
}

/// The UTC days of `entries`' Redis times: the ledger partitions they go to.
pub fn entry_days<'a>(entries: impl Iterator<Item = &'a LedgerEntry>) -> HashSet<time::Date> {
    entries
        .map(|entry| {
            let at = time::OffsetDateTime::UNIX_EPOCH + Duration::from_millis(entry.at_ms);
            at.date()
        })
        .collect()
}

/// Makes sure the ledger has a partition for each of `days`
/// (`ledger_day_partition` in migration 005 creates a missing one).
pub async fn ensure_days(
    client: &Client,
    days: &HashSet<time::Date>,
) -> Result<(), tokio_postgres::Error> {
    for day in days {
        client
            .execute("SELECT ledger_day_partition($1)", &[day])
            .await?;
    }
    Ok(())
}

/// Inserts `batch` (a JSON array of entries) into `ledger`, each entry once
/// (one a dropped day's carried balance covers is not inserted again), and
/// moves `stock_snapshot` to each cell's newest version. The one home of
/// how an entry becomes a row; its days' partitions must exist
/// ([`ensure_days`]).
pub async fn insert_rows(
    transaction: &tokio_postgres::Transaction<'_>,
    batch: &str,
) -> Result<u64, tokio_postgres::Error> {
    Ok(insert_new_rows(transaction, batch).await?.len() as u64)
}

/// [`insert_rows`], answering the entry ids it inserted (those the ledger
/// did not have).
pub async fn insert_new_rows(
    transaction: &tokio_postgres::Transaction<'_>,
    batch: &str,
) -> Result<HashSet<String>, tokio_postgres::Error> {
    let inserted = transaction
        .query(
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
             -- An entry of a day retention dropped is in its carried row
             -- already (a batch relayed again after the drop).
             WHERE NOT EXISTS (
                 SELECT 1 FROM ledger_carried c
                 WHERE c.day = (to_timestamp((e->>'at_ms')::bigint / 1000.0) AT TIME ZONE 'UTC')::date
                   AND c.partition = (e->>'partition')::int AND c.cell = e->>'cell'
                   AND (split_part(c.last_entry_id, '-', 2)::bigint,
                        split_part(c.last_entry_id, '-', 3)::bigint)
                       >= (split_part(e->>'stream_id', '-', 1)::bigint,
                           split_part(e->>'stream_id', '-', 2)::bigint))
             ON CONFLICT (entry_id, at) DO NOTHING
             RETURNING entry_id",
            &[&batch],
        )
        .await?
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    transaction
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
    Ok(inserted)
}

/// Logs a failed pass with the partition; the caller retries after a pause.
pub fn report(partition: u32, error: &RelayError) {
    match error {
        RelayError::Fenced => info!(
            partition,
            "partition lease lost mid-batch; the new holder relays it"
        ),
        error => warn!(partition, %error, "relay pass failed; retrying"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_is_in_seconds_and_never_negative() {
        assert_eq!(seconds_since(10_500, 10_000), 0.5);
        assert_eq!(seconds_since(1_796_600_000_000, 1_796_599_998_750), 1.25);
        assert_eq!(seconds_since(9_000, 10_000), 0.0);
    }
}
