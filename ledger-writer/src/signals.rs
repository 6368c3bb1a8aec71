//! Stock signals: `low_stock`, `out_of_stock`, `back_in_stock`, `reorder`
//! and `shortfall` on the Kafka topic `kafka.signals_topic` (`inventory.signals`), derived
//! from the ledger the relay inserts.
//!
//! Owns deciding when a stock key crosses a threshold, from ledger entries
//! alone, and publishing what it decided. It never decides stock, and adds
//! no work to the reservation path: the flow is one way, Redis → outbox →
//! relay → signals.
//!
//! **Where crossings are decided: in the relay's PostgreSQL transaction.**
//! The relay inserts a batch's entries and, in the same transaction, for
//! each stock key with *new* entries (the insert's own dedupe: a batch
//! relayed again decides nothing again), locks the key's `signal_state`
//! row, reads the key's other cells from `stock_snapshot`, applies the
//! entries in stream order and records a signal in `signals` for each
//! crossing, with the entry that caused it. A flash-sale key has cells in
//! several partitions, relayed by different writers; the row lock makes
//! their transactions decide the key's crossings one after another, each
//! reading what the others committed. A transfer between two cells counts
//! as units in flight from its debit to its credit (whichever half is
//! relayed first), so a refill or a drain is no crossing.
//!
//! **What a key's level is.** `available` = max(0, Σ cells' on_hand −
//! reserved + in flight − safety_stock): the availability API's figure for
//! the key, with units moving between its cells counted where they are
//! going. Its status is [`allocator::stock_status`], as the API shows it.
//!
//! **Once per crossing.** A change of status emits one signal: to
//! `out_of_stock`, `out_of_stock`; from it, `back_in_stock`; from `in_stock`
//! to `low`, `low_stock` (from `low` back to `in_stock`, none). `reorder`
//! when available falls to the key's `reorder_point` or below from above
//! it, or a settings change puts the point at or above what is available;
//! again only after stock received (a positive adjustment, a rebuild or new
//! settings) took available above the point: holds released and taken
//! again around the point ask for one reorder, not one per swing. Status
//! signals have no such damping: at a sell-out, each expiry and hold again
//! is a real `back_in_stock` and `out_of_stock`. `shortfall` when the key
//! becomes short: Σ cells' on_hand − reserved + in flight − safety_stock
//! below −backorder_limit (the allocator's own test for flagging an
//! adjustment `shortfall`, over the key's cells): the shelf holds fewer
//! units than the key promised or sold, typically a loss, or an offline
//! POS's backlog of sales arriving late. Once per crossing: again only
//! after the key stopped being short (a settings change may end one).
//! Only a movement that takes the key further short signals: settings
//! changes (safety stock raised past the shelf, a lower backorder limit)
//! are policy, not a loss, and a receipt that leaves the key short is no
//! new loss; the next movement that deepens it signals. Its payload's `short_by` says by how
//! many units (every signal carries it, 0 when not short).
//!
//! **Where the relay's order is not the world's.** A flash-sale key's cells
//! are relayed partition by partition: a bucket's release relayed after the
//! pool's next hold shows the key at 0 for that moment (an `out_of_stock`
//! and a `back_in_stock` the shelf never saw), and the other way round a
//! brief 0 may go unseen. Signals follow the ledger as relayed. A key's first entry after the
//! writer starts tracking it sets its status from the cells before that
//! entry, and emits nothing for what it was before.
//!
//! **Publishing.** One writer at a time (a PostgreSQL advisory lock held
//! for a batch) publishes unpublished signals in the order they were
//! decided, keyed by stock key (`merchant|sku|location`, so one key's
//! signals share a Kafka partition and keep their order), waits for Kafka,
//! then marks them published. A crash between the two publishes a batch
//! again: consumers drop duplicates by `signal_id`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use allocator::{LedgerEntry, LedgerOp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use tokio_postgres::Transaction;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// The signals' message schema version.
pub const SIGNAL_VERSION: u32 = 1;

/// The advisory lock one publisher at a time holds (an arbitrary constant).
const PUBLISH_LOCK: i64 = 0x5167_4e41;

/// How long a transfer's half waits for its partner before its units stop
/// counting as in flight: a credit comes within the allocator's credit
/// window (12 h) or never (a void; a debit whose record or stream tail a
/// failover lost).
const IN_FLIGHT_WINDOW: &str = "12 hours";

/// Most signals published in one batch.
const PUBLISH_BATCH: i64 = 500;

/// How long the publisher rests when there was nothing to publish, or
/// another writer publishes.
const PUBLISH_IDLE: Duration = Duration::from_millis(100);

/// How long it rests after a failure (Kafka or PostgreSQL down).
const PUBLISH_FAILURE_PAUSE: Duration = Duration::from_millis(500);

/// What a signal says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SignalKind {
    /// From `in_stock` to `low`.
    LowStock,
    /// To `out_of_stock`.
    OutOfStock,
    /// From `out_of_stock` to `low` or `in_stock`.
    BackInStock,
    /// Available fell to the reorder point or below.
    Reorder,
    /// The key holds fewer units than it promised or sold.
    Shortfall,
}

impl SignalKind {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LowStock => "low_stock",
            Self::OutOfStock => "out_of_stock",
            Self::BackInStock => "back_in_stock",
            Self::Reorder => "reorder",
            Self::Shortfall => "shortfall",
        }
    }

    /// Every kind.
    pub const ALL: [Self; 5] = [
        Self::LowStock,
        Self::OutOfStock,
        Self::BackInStock,
        Self::Reorder,
        Self::Shortfall,
    ];
}

/// One key's signal state: what the last signals said, the settings the
/// ledger gave it, and its cells as far as the relay has seen them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    /// Its status when last seen; `None` before its first entry.
    pub status: Option<&'static str>,
    /// Whether available was at or under the reorder point when last seen.
    pub below_reorder: bool,
    /// Whether it was short when last seen; `None` before its first entry
    /// (and for a key tracked before shortfalls were).
    pub short: Option<bool>,
    /// From its last settings entry.
    pub safety_stock: i64,
    /// From its last settings entry.
    pub backorder_limit: i64,
    /// From its last settings entry; -1: the configured default.
    pub low_stock_threshold: i64,
    /// From its last settings entry; -1: none.
    pub reorder_point: i64,
    /// From its last settings entry.
    pub reorder_qty: i64,
    /// Transfer units debited and not yet credited (as the ledger says).
    pub in_flight: i64,
    /// Each cell's `(on_hand, reserved)`.
    pub cells: BTreeMap<String, (i64, i64)>,
}

/// A signal decided, before it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    /// What it says.
    pub kind: SignalKind,
    /// The entry that caused it.
    pub entry_id: String,
    /// The message.
    pub payload: Value,
}

impl Default for KeyState {
    /// A key the ledger has said nothing of: no settings (the configured
    /// low-stock threshold, no reorder point), no cells.
    fn default() -> Self {
        Self {
            status: None,
            below_reorder: false,
            short: None,
            safety_stock: 0,
            backorder_limit: 0,
            low_stock_threshold: -1,
            reorder_point: -1,
            reorder_qty: 0,
            in_flight: 0,
            cells: BTreeMap::new(),
        }
    }
}

impl KeyState {
    /// Units the key could sell now, below 0 when it promised more than
    /// it holds.
    fn sellable(&self) -> i64 {
        let units: i64 = self
            .cells
            .values()
            .map(|(on_hand, reserved)| on_hand - reserved)
            .sum();
        units + self.in_flight - self.safety_stock
    }

    /// Units the key could sell now (never below 0).
    pub fn available(&self) -> i64 {
        self.sellable().max(0)
    }

    /// Units the key is short by: promised or sold beyond its shelf and
    /// backorder limit (0 when not short).
    pub fn short_by(&self) -> i64 {
        (-self.backorder_limit - self.sellable()).max(0)
    }

    fn threshold(&self, low_default: u64) -> i64 {
        if self.low_stock_threshold >= 0 {
            self.low_stock_threshold
        } else {
            low_default as i64
        }
    }

    fn below(&self, available: i64) -> bool {
        self.reorder_point >= 0 && available <= self.reorder_point
    }

    /// Applies one new entry of this key (in stream order) and returns the
    /// signals it causes. `low_default` is `cache.low_stock_threshold_default`.
    pub fn apply(&mut self, entry: &LedgerEntry, low_default: u64) -> Vec<Signal> {
        if self.status.is_none() {
            // The first entry seen: the status before it, from its cell's
            // values before it. Nothing is emitted for it.
            self.cells.insert(
                entry.cell.clone(),
                (entry.on_hand_before, entry.reserved_before),
            );
            let available = self.available();
            self.status = Some(allocator::stock_status(
                available,
                self.threshold(low_default),
            ));
            self.below_reorder = self.below(available);
        }
        if self.short.is_none() {
            // Likewise for a key tracked before shortfalls were.
            let mut before = self.clone();
            before.cells.insert(
                entry.cell.clone(),
                (entry.on_hand_before, entry.reserved_before),
            );
            self.short = Some(before.short_by() > 0);
        }
        let short_before = self.short_by();
        match entry.op {
            LedgerOp::Settings => {
                self.safety_stock = entry.safety_stock.unwrap_or(0);
                self.backorder_limit = entry.backorder_limit.unwrap_or(0);
                self.low_stock_threshold = entry.low_stock_threshold.unwrap_or(-1);
                self.reorder_point = entry.reorder_point.unwrap_or(-1);
                self.reorder_qty = entry.reorder_qty.unwrap_or(0);
            }
            LedgerOp::TransferOut => self.in_flight += entry.qty,
            LedgerOp::TransferIn => self.in_flight -= entry.qty,
            _ => {}
        }
        self.cells.insert(
            entry.cell.clone(),
            (entry.on_hand_after, entry.reserved_after),
        );
        let available = self.available();
        let threshold = self.threshold(low_default);
        let status = allocator::stock_status(available, threshold);
        let before = self.status.unwrap_or(status);
        let mut kinds = Vec::new();
        if status != before {
            if status == "out_of_stock" {
                kinds.push(SignalKind::OutOfStock);
            } else if before == "out_of_stock" {
                kinds.push(SignalKind::BackInStock);
            } else if status == "low" {
                kinds.push(SignalKind::LowStock);
            }
        }
        let below = self.below(available);
        if below && !self.below_reorder {
            kinds.push(SignalKind::Reorder);
        }
        self.status = Some(status);
        // Armed again only by stock received (or new settings): a hold
        // released and taken again around the point is one reorder.
        let receipt = match entry.op {
            LedgerOp::Adjust => entry.qty > 0,
            LedgerOp::Settings | LedgerOp::Rebuild => true,
            _ => false,
        };
        if below || receipt {
            self.below_reorder = below;
        }
        // A shortfall is a movement that takes the key (further) short
        // while no shortfall is signalled and standing. A settings change
        // is policy, not a loss: it may end a shortfall, never start one;
        // and a receipt that leaves the key short is no new loss.
        let short_by = self.short_by();
        if short_by == 0 {
            self.short = Some(false);
        } else if entry.op != LedgerOp::Settings
            && short_by > short_before
            && self.short != Some(true)
        {
            kinds.push(SignalKind::Shortfall);
            self.short = Some(true);
        }
        let entry_id = entry.entry_id.clone().unwrap_or_default();
        kinds
            .into_iter()
            .map(|kind| Signal {
                kind,
                entry_id: entry_id.clone(),
                payload: json!({
                    "v": SIGNAL_VERSION,
                    "signal_id": format!("{entry_id}:{}", kind.as_str()),
                    "kind": kind.as_str(),
                    "merchant": entry.merchant, "sku": entry.sku, "location": entry.location,
                    "available": available, "status": status, "previous_status": before,
                    "low_stock_threshold": threshold,
                    "reorder_point": (self.reorder_point >= 0).then_some(self.reorder_point),
                    "reorder_qty": (self.reorder_point >= 0).then_some(self.reorder_qty),
                    "short_by": short_by,
                    "entry_id": entry_id, "op": entry.op.as_str(), "at_ms": entry.at_ms,
                }),
            })
            .collect()
    }
}

/// A stock key as the tables name it.
type Key = (String, String, String);

/// Decides the signals of `entries` (the batch's entries the ledger insert
/// found new, in stream order) inside the relay's transaction, and records
/// them and the keys' states. Returns how many signals of each kind.
pub async fn derive(
    transaction: &Transaction<'_>,
    entries: &[&LedgerEntry],
    low_default: u64,
) -> Result<HashMap<SignalKind, u64>, tokio_postgres::Error> {
    let mut by_key: BTreeMap<Key, Vec<&LedgerEntry>> = BTreeMap::new();
    for entry in entries {
        by_key
            .entry((
                entry.merchant.clone(),
                entry.sku.clone(),
                entry.location.clone(),
            ))
            .or_default()
            .push(entry);
    }
    let mut counts = HashMap::new();
    if by_key.is_empty() {
        return Ok(counts);
    }
    let (merchants, skus, locations): (Vec<&str>, Vec<&str>, Vec<&str>) = by_key.keys().fold(
        (Vec::new(), Vec::new(), Vec::new()),
        |(mut m, mut s, mut l), (merchant, sku, location)| {
            m.push(merchant);
            s.push(sku);
            l.push(location);
            (m, s, l)
        },
    );
    // In key order (the map's), so two transactions lock shared keys in
    // the same order: no deadlock.
    transaction
        .execute(
            "INSERT INTO signal_state (merchant, sku, location)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
             ON CONFLICT DO NOTHING",
            &[&merchants, &skus, &locations],
        )
        .await?;
    let rows = transaction
        .query(
            "SELECT s.merchant, s.sku, s.location, s.status, s.below_reorder, s.safety_stock,
                    s.low_stock_threshold, s.reorder_point, s.reorder_qty, s.short,
                    s.backorder_limit
             FROM signal_state s
             JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(merchant, sku, location)
               USING (merchant, sku, location)
             ORDER BY s.merchant, s.sku, s.location
             FOR UPDATE OF s",
            &[&merchants, &skus, &locations],
        )
        .await?;
    let mut states: BTreeMap<Key, KeyState> = BTreeMap::new();
    for row in rows {
        let status: Option<String> = row.get(3);
        states.insert(
            (row.get(0), row.get(1), row.get(2)),
            KeyState {
                status: status.as_deref().map(known_status),
                below_reorder: row.get(4),
                short: row.get(9),
                safety_stock: row.get(5),
                backorder_limit: row.get(10),
                low_stock_threshold: row.get(6),
                reorder_point: row.get(7),
                reorder_qty: row.get(8),
                in_flight: 0,
                cells: BTreeMap::new(),
            },
        );
    }
    // Read after the locks: what writers of the key's other cells committed.
    let cells = transaction
        .query(
            "SELECT c.merchant, c.sku, c.location, c.cell, c.on_hand, c.reserved
             FROM stock_snapshot c
             JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(merchant, sku, location)
               USING (merchant, sku, location)",
            &[&merchants, &skus, &locations],
        )
        .await?;
    for row in cells {
        let key: Key = (row.get(0), row.get(1), row.get(2));
        if let Some(state) = states.get_mut(&key) {
            state.cells.insert(row.get(3), (row.get(4), row.get(5)));
        }
    }
    // Transfers whose other half is not seen yet, while it may still come.
    let in_flight = transaction
        .query(
            &format!(
                "SELECT t.merchant, t.sku, t.location, sum(t.qty)::int8
                 FROM signal_transfers t
                 JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(merchant, sku, location)
                   USING (merchant, sku, location)
                 WHERE t.at > now() - interval '{IN_FLIGHT_WINDOW}'
                 GROUP BY t.merchant, t.sku, t.location"
            ),
            &[&merchants, &skus, &locations],
        )
        .await?;
    for row in in_flight {
        let key: Key = (row.get(0), row.get(1), row.get(2));
        if let Some(state) = states.get_mut(&key) {
            state.in_flight = row.get(3);
        }
    }
    let mut signals = Vec::new();
    for (key, entries) in &by_key {
        let Some(state) = states.get_mut(key) else {
            continue;
        };
        // This batch's cells start from their first new entry's values
        // before it (the snapshot may already hold this batch's last).
        let mut seen = std::collections::HashSet::new();
        for entry in entries {
            if seen.insert(entry.cell.as_str()) {
                state.cells.insert(
                    entry.cell.clone(),
                    (entry.on_hand_before, entry.reserved_before),
                );
            }
        }
        for entry in entries {
            signals.extend(state.apply(entry, low_default));
        }
    }
    // One statement for every key (a batch may touch hundreds).
    let mut columns = StateColumns::default();
    for (key, state) in &states {
        columns.push(
            key,
            state,
            by_key
                .get(key)
                .and_then(|entries| entries.last())
                .and_then(|entry| entry.entry_id.clone()),
        );
    }
    transaction
        .execute(
            "UPDATE signal_state s SET status = u.status, below_reorder = u.below_reorder,
                 safety_stock = u.safety_stock, low_stock_threshold = u.low_stock_threshold,
                 reorder_point = u.reorder_point, reorder_qty = u.reorder_qty,
                 last_entry_id = u.last_entry_id, short = u.short,
                 backorder_limit = u.backorder_limit, updated_at = now()
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[], $6::int8[],
                         $7::int8[], $8::int8[], $9::int8[], $10::text[], $11::bool[],
                         $12::int8[])
                  AS u(merchant, sku, location, status, below_reorder, safety_stock,
                       low_stock_threshold, reorder_point, reorder_qty, last_entry_id, short,
                       backorder_limit)
             WHERE s.merchant = u.merchant AND s.sku = u.sku AND s.location = u.location",
            &[
                &columns.merchants,
                &columns.skus,
                &columns.locations,
                &columns.statuses,
                &columns.below_reorder,
                &columns.safety_stock,
                &columns.low_stock_threshold,
                &columns.reorder_point,
                &columns.reorder_qty,
                &columns.last_entry_id,
                &columns.short,
                &columns.backorder_limit,
            ],
        )
        .await?;
    // Each transfer half seen: it meets its partner (both forgotten) or
    // waits for it.
    // Both halves of one transfer may be in one batch (cells of one
    // partition): summed first, an upsert touches each transfer once.
    let mut by_transfer: BTreeMap<&str, (&LedgerEntry, i64)> = BTreeMap::new();
    for entry in entries {
        let qty = match entry.op {
            LedgerOp::TransferOut => entry.qty,
            LedgerOp::TransferIn => -entry.qty,
            _ => continue,
        };
        let Some(id) = entry.transfer_id.as_deref() else {
            continue;
        };
        by_transfer.entry(id).or_insert((entry, 0)).1 += qty;
    }
    let mut halves = Transfers::default();
    for (entry, qty) in by_transfer.into_values() {
        if qty != 0 {
            halves.push(entry, qty);
        }
    }
    if !halves.ids.is_empty() {
        transaction
            .execute(
                "WITH half AS (
                     INSERT INTO signal_transfers AS t (transfer_id, merchant, sku, location, qty, at)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                                          $5::int8[], $6::timestamptz[])
                     ON CONFLICT (transfer_id) DO UPDATE SET qty = t.qty + EXCLUDED.qty
                     RETURNING transfer_id, qty
                 )
                 DELETE FROM signal_transfers
                 WHERE transfer_id IN (SELECT transfer_id FROM half WHERE qty = 0)",
                &[
                    &halves.ids,
                    &halves.merchants,
                    &halves.skus,
                    &halves.locations,
                    &halves.qty,
                    &halves.at,
                ],
            )
            .await?;
    }
    if !signals.is_empty() {
        let payloads: Vec<Value> = signals
            .iter()
            .map(|signal| signal.payload.clone())
            .collect();
        transaction
            .execute(
                "INSERT INTO signals (signal_id, kind, merchant, sku, location, entry_id, payload)
                 SELECT s->>'signal_id', s->>'kind', s->>'merchant', s->>'sku', s->>'location',
                        s->>'entry_id', s
                 FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS t(s, n)
                 ORDER BY n
                 ON CONFLICT (signal_id) DO NOTHING",
                &[&Value::Array(payloads).to_string()],
            )
            .await?;
        for signal in &signals {
            *counts.entry(signal.kind).or_default() += 1;
        }
    }
    Ok(counts)
}

/// Key states as the columns of one UPDATE.
#[derive(Default)]
struct StateColumns<'a> {
    merchants: Vec<&'a str>,
    skus: Vec<&'a str>,
    locations: Vec<&'a str>,
    statuses: Vec<Option<&'static str>>,
    below_reorder: Vec<bool>,
    safety_stock: Vec<i64>,
    low_stock_threshold: Vec<i64>,
    reorder_point: Vec<i64>,
    reorder_qty: Vec<i64>,
    last_entry_id: Vec<Option<String>>,
    short: Vec<Option<bool>>,
    backorder_limit: Vec<i64>,
}

/// Transfer halves as the columns of one upsert.
#[derive(Default)]
struct Transfers<'a> {
    ids: Vec<&'a str>,
    merchants: Vec<&'a str>,
    skus: Vec<&'a str>,
    locations: Vec<&'a str>,
    qty: Vec<i64>,
    at: Vec<time::OffsetDateTime>,
}

impl<'a> Transfers<'a> {
    fn push(&mut self, entry: &'a LedgerEntry, qty: i64) {
        let Some(id) = entry.transfer_id.as_deref() else {
            return;
        };
        self.ids.push(id);
        self.merchants.push(&entry.merchant);
        self.skus.push(&entry.sku);
        self.locations.push(&entry.location);
        self.qty.push(qty);
        self.at
            .push(time::OffsetDateTime::UNIX_EPOCH + Duration::from_millis(entry.at_ms));
    }
}

impl<'a> StateColumns<'a> {
    fn push(&mut self, key: &'a Key, state: &KeyState, last_entry_id: Option<String>) {
        self.merchants.push(&key.0);
        self.skus.push(&key.1);
        self.locations.push(&key.2);
        self.statuses.push(state.status);
        self.below_reorder.push(state.below_reorder);
        self.safety_stock.push(state.safety_stock);
        self.short.push(state.short);
        self.backorder_limit.push(state.backorder_limit);
        self.low_stock_threshold.push(state.low_stock_threshold);
        self.reorder_point.push(state.reorder_point);
        self.reorder_qty.push(state.reorder_qty);
        self.last_entry_id.push(last_entry_id);
    }
}

/// The status text as a `'static` one (an unknown text, which no writer
/// stores, reads as out of stock).
fn known_status(text: &str) -> &'static str {
    match text {
        "in_stock" => "in_stock",
        "low" => "low",
        _ => "out_of_stock",
    }
}

/// Publishes unpublished signals to Kafka in the order they were decided,
/// while this writer holds the publishing lock; forever.
pub async fn publish_forever(config: Arc<config::Config>, metrics: Arc<Metrics>) {
    let mut client = None;
    let mut producer = None;
    let mut cleaned = std::time::Instant::now();
    loop {
        if cleaned.elapsed() >= CLEAN_EVERY {
            if let Some(connected) = client.as_ref()
                && let Err(error) = forget_old(connected, &config).await
            {
                warn!(%error, "deleting old signals failed; trying later");
            }
            cleaned = std::time::Instant::now();
        }
        let pause = match publish_once(&config, &metrics, &mut client, &mut producer).await {
            Ok(0) => PUBLISH_IDLE,
            Ok(published) => {
                debug!(published, "signals published");
                Duration::ZERO
            }
            Err(error) => {
                warn!(error = %format!("{error:#}"), "publishing signals failed; retrying");
                client = None;
                producer = None;
                PUBLISH_FAILURE_PAUSE
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// How often signals past [`KEEP_SIGNALS`] are deleted.
const CLEAN_EVERY: Duration = Duration::from_secs(60);

/// Signals are kept this long once published (and handed to webhooks, when
/// webhooks are on).
const KEEP_SIGNALS: &str = "7 days";

async fn forget_old(
    client: &tokio_postgres::Client,
    config: &config::Config,
) -> Result<u64, tokio_postgres::Error> {
    let webhooks_off = config.webhooks.secret_key.is_empty();
    client
        .execute(
            &format!(
                "DELETE FROM signals WHERE published_at IS NOT NULL
                   AND (fanned_at IS NOT NULL OR $1)
                   AND created_at < now() - interval '{KEEP_SIGNALS}'"
            ),
            &[&webhooks_off],
        )
        .await
}

/// One batch: how many signals it published (0 when none waited, or another
/// writer publishes now).
async fn publish_once(
    config: &config::Config,
    metrics: &Metrics,
    client: &mut Option<tokio_postgres::Client>,
    producer: &mut Option<FutureProducer>,
) -> anyhow::Result<usize> {
    if client
        .as_ref()
        .is_none_or(tokio_postgres::Client::is_closed)
    {
        let connected = crate::connect_postgres(config).await?;
        crate::bound_idle_transactions(&connected, config).await?;
        *client = Some(connected);
    }
    if producer.is_none() {
        *producer = Some(crate::producer(config)?);
    }
    let (Some(client), Some(producer)) = (client.as_mut(), producer.as_ref()) else {
        return Ok(0);
    };
    let transaction = client.transaction().await?;
    let locked: bool = transaction
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PUBLISH_LOCK])
        .await?
        .get(0);
    if !locked {
        return Ok(0);
    }
    let rows = transaction
        .query(
            "SELECT id, kind, merchant || '|' || sku || '|' || location, payload::text
             FROM signals WHERE published_at IS NULL ORDER BY id LIMIT $1",
            &[&PUBLISH_BATCH],
        )
        .await?;
    if rows.is_empty() {
        metrics.signals_unpublished.set(0);
        return Ok(0);
    }
    let timeout = Duration::from_millis(config.kafka.request_timeout_ms);
    let mut deliveries = Vec::with_capacity(rows.len());
    for row in &rows {
        let key: String = row.get(2);
        let payload: String = row.get(3);
        let record = FutureRecord::to(&config.kafka.signals_topic)
            .key(&key)
            .payload(&payload);
        let delivery = producer.send_result(record).map_err(|(error, _)| error)?;
        deliveries.push(delivery);
    }
    for delivery in deliveries {
        match tokio::time::timeout(timeout, delivery).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err((error, _)))) => return Err(error.into()),
            Ok(Err(_)) => anyhow::bail!("a signal's delivery was cancelled"),
            Err(_) => anyhow::bail!("a signal's delivery timed out"),
        }
    }
    let ids: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
    transaction
        .execute(
            "UPDATE signals SET published_at = now() WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
    transaction.commit().await?;
    for row in &rows {
        let kind: String = row.get(1);
        metrics.signals.with_label_values(&[&kind]).inc();
    }
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM signals WHERE published_at IS NULL",
            &[],
        )
        .await?
        .get(0);
    metrics.signals_unpublished.set(left);
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    //! The crossings, from entries alone (no services).
    use super::*;

    fn entry(op: &str, cell: &str, before: (i64, i64), after: (i64, i64), n: u64) -> LedgerEntry {
        let mut value = json!({
            "v": 1, "op": op, "partition": 1, "cell": cell, "merchant": "m", "sku": "s",
            "location": "l", "on_hand_before": before.0, "on_hand_after": after.0,
            "reserved_before": before.1, "reserved_after": after.1, "version": n,
            "qty": (after.0 - before.0).abs().max((after.1 - before.1).abs()), "node": "n",
            "at_ms": 1_000 + n,
        });
        match op {
            "reserve" | "commit" | "release" | "expire" => {
                value["reservation_id"] = json!(format!("r1.{n}"));
            }
            "transfer_out" | "transfer_in" => value["transfer_id"] = json!("t1"),
            "adjust" => {
                value["kind"] = json!("delta");
                value["source"] = json!("test");
                value["source_event_id"] = json!(format!("e{n}"));
                value["shortfall"] = json!(false);
            }
            _ => {}
        }
        if op == "settings" {
            value["safety_stock"] = json!(0);
            value["backorder_limit"] = json!(0);
            value["low_stock_threshold"] = json!(3);
            value["reorder_point"] = json!(5);
            value["reorder_qty"] = json!(40);
        }
        let mut entry = LedgerEntry::parse(&value.to_string()).expect("entry");
        entry.entry_id = Some(format!("1-{n}-0"));
        entry
    }

    fn kinds(signals: &[Signal]) -> Vec<&'static str> {
        signals.iter().map(|signal| signal.kind.as_str()).collect()
    }

    #[test]
    fn a_backlog_of_sales_past_the_shelf_is_one_shortfall_until_restored() {
        let mut state = KeyState::default();
        let pool = "m|s|l|pool";
        // 5 on the shelf, 3 of them held online.
        state.apply(&entry("adjust", pool, (0, 0), (5, 0), 1), 0);
        state.apply(&entry("reserve", pool, (5, 0), (5, 3), 2), 0);
        // The offline store's sales arrive: 2 leave it at 0 sellable (out
        // of stock, not short), 2 more take it short: one shortfall.
        let mut out = Vec::new();
        for (n, on_hand) in [(3, 4), (4, 3), (5, 2), (6, 1)] {
            out.push(kinds(&state.apply(
                &entry("adjust", pool, (on_hand + 1, 3), (on_hand, 3), n),
                0,
            )));
        }
        assert_eq!(
            out,
            vec![vec![], vec!["out_of_stock"], vec!["shortfall"], vec![]]
        );
        assert_eq!(state.short_by(), 2);
        // A commit is no new crossing; releasing the holds restores it (no
        // signal: still out of stock at 0); a later loss is a new shortfall.
        assert!(
            state
                .apply(&entry("release", pool, (1, 3), (1, 1), 7), 0)
                .is_empty()
        );
        assert_eq!(state.short_by(), 0);
        let again = state.apply(&entry("adjust", pool, (1, 1), (0, 1), 8), 0);
        assert_eq!(kinds(&again), vec!["shortfall"]);
        assert_eq!(again[0].payload["short_by"], json!(1));
    }

    #[test]
    fn settings_signal_no_shortfall_and_the_loss_after_them_does() {
        let mut state = KeyState::default();
        let pool = "m|s|l|pool";
        state.apply(&entry("adjust", pool, (0, 0), (3, 0), 1), 0);
        // Safety stock raised to 10 with 3 on the shelf.
        let mut settings = entry("settings", pool, (3, 0), (3, 0), 2);
        settings.safety_stock = Some(10);
        let raised = state.apply(&settings, 0);
        assert!(
            !kinds(&raised).contains(&"shortfall"),
            "{:?}",
            kinds(&raised)
        );
        // A loss of 2: the key is short (of what it holds back), signalled.
        let lost = state.apply(&entry("adjust", pool, (3, 0), (1, 0), 3), 0);
        assert_eq!(kinds(&lost), vec!["shortfall"]);
    }

    #[test]
    fn a_receipt_is_no_shortfall_and_settings_that_end_one_let_the_next_be_signalled() {
        let pool = "m|s|l|pool";
        // Safety stock raised past the shelf, then a receipt of 2: no loss.
        let mut state = KeyState::default();
        state.apply(&entry("adjust", pool, (0, 0), (3, 0), 1), 0);
        let mut settings = entry("settings", pool, (3, 0), (3, 0), 2);
        settings.safety_stock = Some(10);
        state.apply(&settings, 0);
        let receipt = state.apply(&entry("adjust", pool, (3, 0), (5, 0), 3), 0);
        assert!(
            !kinds(&receipt).contains(&"shortfall"),
            "{:?}",
            kinds(&receipt)
        );
        // A shortfall, ended by a higher backorder limit, then a loss past
        // the new limit: signalled again.
        let mut state = KeyState::default();
        state.apply(&entry("adjust", pool, (0, 0), (20, 0), 1), 0);
        state.apply(&entry("reserve", pool, (20, 0), (20, 20), 2), 0);
        let first = state.apply(&entry("adjust", pool, (20, 20), (17, 20), 3), 0);
        assert_eq!(kinds(&first), vec!["shortfall"]);
        let mut settings = entry("settings", pool, (17, 20), (17, 20), 4);
        settings.backorder_limit = Some(5);
        assert!(!kinds(&state.apply(&settings, 0)).contains(&"shortfall"));
        let again = state.apply(&entry("adjust", pool, (17, 20), (10, 20), 5), 0);
        assert_eq!(kinds(&again), vec!["shortfall"]);
        assert_eq!(again[0].payload["short_by"], json!(5));
    }

    #[test]
    fn a_backorder_limit_is_not_a_shortfall_and_a_key_already_short_is_not_signalled() {
        let mut state = KeyState::default();
        let pool = "m|s|l|pool";
        let mut settings = entry("settings", pool, (2, 0), (2, 0), 1);
        settings.backorder_limit = Some(3);
        state.apply(&settings, 0);
        // 3 sold past the shelf on backorder: within the limit.
        let sold = state.apply(&entry("reserve", pool, (2, 0), (2, 5), 2), 0);
        assert!(!kinds(&sold).contains(&"shortfall"), "{:?}", kinds(&sold));
        // A loss of 1 more: short by 1.
        let lost = state.apply(&entry("adjust", pool, (2, 5), (1, 5), 3), 0);
        assert_eq!(kinds(&lost), vec!["shortfall"]);
        // A key first seen already short (tracked before shortfalls, or
        // new to this writer) says nothing for being so.
        let mut late = KeyState::default();
        assert!(
            late.apply(&entry("adjust", pool, (1, 4), (0, 4), 1), 0)
                .iter()
                .all(|signal| signal.kind != SignalKind::Shortfall)
        );
    }

    #[test]
    fn a_sale_to_zero_and_a_restock_cross_each_threshold_once() {
        let mut state = KeyState::default();
        let pool = "m|s|l|pool";
        let mut out = Vec::new();
        // Restocked to 10 (the first entry: the status before it was out of
        // stock, so this is back in stock); settings: low at 3, reorder at 5.
        out.push(kinds(
            &state.apply(&entry("adjust", pool, (0, 0), (10, 0), 1), 5),
        ));
        out.push(kinds(
            &state.apply(&entry("settings", pool, (10, 0), (10, 0), 2), 5),
        ));
        // Held one at a time down to 0.
        for held in 1..=10 {
            out.push(kinds(&state.apply(
                &entry("reserve", pool, (10, held - 1), (10, held), 2 + held as u64),
                5,
            )));
        }
        // Two holds expire: back in stock (low).
        out.push(kinds(
            &state.apply(&entry("expire", pool, (10, 10), (10, 8), 20), 5),
        ));
        // A restock of 20: in stock, above the reorder point again.
        out.push(kinds(
            &state.apply(&entry("adjust", pool, (10, 8), (30, 8), 21), 5),
        ));
        // Sold down to the reorder point again: reorder once more.
        out.push(kinds(
            &state.apply(&entry("commit", pool, (30, 8), (13, 8), 22), 5),
        ));
        let expected: Vec<Vec<&str>> = vec![
            vec!["back_in_stock"],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec!["reorder"],
            vec![],
            vec!["low_stock"],
            vec![],
            vec![],
            vec!["out_of_stock"],
            vec!["back_in_stock"],
            vec![],
            vec!["reorder"],
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn holds_swinging_around_the_reorder_point_ask_for_one_reorder_until_stock_comes() {
        let mut state = KeyState::default();
        let pool = "pool";
        state.apply(&entry("adjust", pool, (0, 0), (20, 0), 1), 5);
        state.apply(&entry("settings", pool, (20, 0), (20, 0), 2), 5);
        state.apply(&entry("reserve", pool, (20, 0), (20, 14), 3), 5);
        let mut out = Vec::new();
        // At the point, back above it (released), at it again, twice.
        for n in 0..2 {
            out.push(kinds(&state.apply(
                &entry("reserve", pool, (20, 14), (20, 15), 4 + 3 * n),
                5,
            )));
            out.push(kinds(&state.apply(
                &entry("release", pool, (20, 15), (20, 14), 5 + 3 * n),
                5,
            )));
            out.push(kinds(
                &state.apply(&entry("expire", pool, (20, 14), (20, 14), 6 + 3 * n), 5),
            ));
        }
        // A delivery of stock, then down to the point again: a new reorder.
        out.push(kinds(
            &state.apply(&entry("adjust", pool, (20, 14), (40, 14), 20), 5),
        ));
        out.push(kinds(
            &state.apply(&entry("reserve", pool, (40, 14), (40, 35), 21), 5),
        ));
        let expected: Vec<Vec<&str>> = vec![
            vec!["reorder"],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec!["reorder"],
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn a_transfer_between_cells_is_no_crossing_whichever_half_comes_first() {
        for credit_first in [false, true] {
            let mut state = KeyState::default();
            state.apply(&entry("adjust", "pool", (0, 0), (4, 0), 1), 5);
            state.status = Some("low");
            let out = entry("transfer_out", "pool", (4, 0), (0, 0), 2);
            let credit = entry("transfer_in", "bucket", (0, 0), (4, 0), 3);
            let (first, second) = if credit_first {
                (credit, out)
            } else {
                (out, credit)
            };
            assert!(state.apply(&first, 5).is_empty(), "{credit_first}");
            assert!(state.apply(&second, 5).is_empty(), "{credit_first}");
            assert_eq!((state.available(), state.in_flight), (4, 0));
        }
    }

    #[test]
    fn a_signal_names_its_entry_and_the_key() {
        let mut state = KeyState {
            status: Some("in_stock"),
            cells: BTreeMap::from([("pool".to_owned(), (1, 0))]),
            ..KeyState::default()
        };
        let signals = state.apply(&entry("commit", "pool", (1, 0), (0, 0), 7), 5);
        assert_eq!(signals.len(), 1);
        let payload = &signals[0].payload;
        assert_eq!(payload["signal_id"], "1-7-0:out_of_stock");
        assert_eq!(payload["entry_id"], "1-7-0");
        assert_eq!(
            (&payload["merchant"], &payload["sku"], &payload["location"]),
            (&json!("m"), &json!("s"), &json!("l"))
        );
        assert_eq!(
            (&payload["available"], &payload["previous_status"]),
            (&json!(0), &json!("in_stock"))
        );
        assert_eq!(payload["reorder_point"], Value::Null);
    }
}
