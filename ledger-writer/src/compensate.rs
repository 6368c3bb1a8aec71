//! `ledger-writer compensate`: undo a bad bulk import without rewriting
//! the ledger.
//!
//! Owns working out, from the ledger alone, what an import of stock events
//! (the adjust entries of one source, narrowed by time or by a range of its
//! event ids) did to each stock key that it still does, and the delta
//! adjustment that takes it back out. Holds and sales made since stay as
//! they are: only the units the import added or removed are returned.
//!
//! **The effect on a key** is the sum of the applied quantities of the
//! import's entries on it (an entry's `qty` is what it changed on_hand by,
//! for a count too, buckets included) that came after the key's last
//! physical count not in the import (from any source, the import's own
//! later corrections too): such a count set on_hand to what was on the
//! shelf, so the import's earlier entries no longer count. A key's adjust
//! entries are all on its pool cell, so they are ordered by their stream
//! ids (monotonic), never by their Redis times (which a failover can set
//! back). Compensation is a delta of minus that effect, from source
//! `undo.<source>` with an event id made of the selection and the key.
//!
//! **Once per key.** The plan reads the `undo.<source>` entries the ledger
//! already has on each key: a key this selection compensated before is
//! shown as already applied and skipped (the allocator's own dedupe of
//! source and event id lasts only 24 hours); a key another selection of the
//! same source compensated is shown and skipped, and the run exits 1, since
//! adding both could undo the same entries twice. Whatever differs from
//! what the plan expected is left to an operator, with the figures.
//!
//! **The blast radius**, printed by the dry run and again by `--apply`:
//! keys touched, units the import added and removed there, reservations
//! made on those keys while the import was in force (they may have sold
//! units that did not exist), and every key the compensation would leave
//! short (sellable below the backorder limit: the units are already
//! promised, someone must make good).
//!
//! It reads PostgreSQL's ledger, and refuses while an adjustment of the
//! source, of its compensation, or of any key the import touched is still
//! in the outbox unrelayed (the figures would be incomplete). It says which
//! days retention dropped (their entries are not seen: replay them first),
//! and the highest `source_seq` the import's counts carried: later counts
//! from the source at or below it are refused as stale until it is passed,
//! and a corrected file re-sent must use new event ids.

use std::collections::BTreeMap;

use allocator::{
    Adjustment, AdjustmentKind, AdjustmentOutcome, Allocator, EntryId, LedgerEntry, StockKey,
};
use anyhow::Context;
use tokio_postgres::Client;

/// Which of the source's adjust entries are the import.
#[derive(Debug, Clone)]
pub enum Selection {
    /// From the entry with event id `first` to the one with `last`, in the
    /// order the ledger applied them (inclusive).
    Events {
        /// The first event id.
        first: String,
        /// The last event id.
        last: String,
    },
    /// Every entry applied at or after this Redis time.
    Since(time::OffsetDateTime),
    /// Every entry of the source.
    All,
}

impl Selection {
    /// The import among all of `source`'s adjust entries, in the order they
    /// were applied.
    fn pick(&self, source: &str, all: Vec<LedgerEntry>) -> anyhow::Result<Vec<LedgerEntry>> {
        let mut all = in_applied_order(all);
        Ok(match self {
            Self::All => all,
            Self::Since(since) => {
                let since_ms = u64::try_from(since.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
                all.into_iter()
                    .filter(|entry| entry.at_ms >= since_ms)
                    .collect()
            }
            Self::Events { first, last } => {
                // An event id may stand on many keys (one event, many
                // lines): from the first entry of `first` to the last of
                // `last`.
                let from = all
                    .iter()
                    .position(|entry| entry.source_event_id.as_deref() == Some(first.as_str()))
                    .with_context(|| {
                        format!("source {source} has no event {first} in the ledger")
                    })?;
                let to = all
                    .iter()
                    .rposition(|entry| entry.source_event_id.as_deref() == Some(last.as_str()))
                    .with_context(|| {
                        format!("source {source} has no event {last} in the ledger")
                    })?;
                if from > to {
                    anyhow::bail!("event {first} was applied after {last}");
                }
                all.drain(from..=to).collect()
            }
        })
    }

    /// The selection as text, the same for the same selection however it
    /// was written (a time in any offset is its Unix ms).
    fn describe(&self) -> String {
        match self {
            Self::Events { first, last } => format!("events {first}..{last}"),
            Self::Since(since) => format!("since {}", since.unix_timestamp_nanos() / 1_000_000),
            Self::All => "all".to_owned(),
        }
    }
}

/// What the import still does to one key, and its compensation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEffect {
    /// The stock key.
    pub key: StockKey,
    /// Import entries on it.
    pub entries: u64,
    /// Units the import's entries that still count added (positive) and
    /// removed (negative); `effect` = added + removed.
    pub added: i64,
    /// See `added`.
    pub removed: i64,
    /// The import's entries before a later physical count from another
    /// source (their effect is gone).
    pub overridden: u64,
    /// Reservations made on the key since the import's first entry on it.
    pub reservations_since: u64,
    /// Sellable units of the key now.
    pub sellable_now: i64,
    /// Whether the compensation leaves the key short.
    pub would_be_short: bool,
    /// Whether the ledger already has this compensation (an earlier
    /// `--apply` of the same selection).
    pub already_applied: bool,
    /// The qty of that compensation, when it differs from the one now
    /// planned (entries of the import arrived since): left to an operator.
    pub applied_differs: Option<i64>,
    /// Another selection's compensation of this source on the key (its
    /// event id): this one is not applied.
    pub compensated_by_other: Option<String>,
    /// The compensation's event id (of source `undo.<source>`).
    pub event_id: String,
}

impl KeyEffect {
    /// The import's net effect on on_hand still in force.
    pub fn effect(&self) -> i64 {
        self.added + self.removed
    }
}

/// The plan, and after `--apply` what was applied.
#[derive(Debug, Default)]
pub struct Report {
    /// The source whose import is undone.
    pub source: String,
    /// The source the compensation is written under.
    pub undo_source: String,
    /// The import's entries selected.
    pub entries: u64,
    /// Per key touched.
    pub keys: Vec<KeyEffect>,
    /// Compensations applied (with `--apply`): new, and already applied.
    pub applied: u64,
    /// See `applied`.
    pub duplicates: u64,
    /// The highest `source_seq` of the import's counts, if any.
    pub highest_source_seq: Option<u64>,
    /// The first and last day retention dropped, if any.
    pub dropped_days: Option<(time::Date, time::Date)>,
}

impl Report {
    /// Units the import added that still count, over all keys.
    pub fn units_added(&self) -> i64 {
        self.keys.iter().map(|key| key.added).sum()
    }

    /// Units it removed (a negative number).
    pub fn units_removed(&self) -> i64 {
        self.keys.iter().map(|key| key.removed).sum()
    }

    /// Reservations made on touched keys while the import was in force.
    pub fn reservations(&self) -> u64 {
        self.keys.iter().map(|key| key.reservations_since).sum()
    }

    /// Keys that need an operator: compensated by another selection, or
    /// compensated before by a different amount, or left short.
    pub fn attention(&self) -> usize {
        self.keys
            .iter()
            .filter(|key| {
                key.would_be_short
                    || key.compensated_by_other.is_some()
                    || key.applied_differs.is_some()
            })
            .count()
    }
}

/// The source the compensation of `source` is written under.
pub fn undo_source(source: &str) -> String {
    let undo = format!("undo.{source}");
    if undo.len() <= 128 {
        undo
    } else {
        format!("undo.{}", &crate::sha256_hex(source.as_bytes())[..32])
    }
}

/// An entry's place in its partition's stream: the true order of one
/// key's adjustments (all on its pool cell).
fn stream_order(entry: &LedgerEntry) -> (u64, u64) {
    let id = entry.id().unwrap_or(EntryId {
        partition: entry.partition,
        ms: 0,
        seq: 0,
    });
    (id.ms, id.seq)
}

/// The order an import was applied in, across keys: Redis time, then, in
/// one millisecond, the event id. Entries on different keys in the same
/// millisecond are in different streams, whose ids say nothing of their
/// order (and PostgreSQL returns rows in no order): an import's event ids
/// are usually its file's order, so they decide. The stream breaks the last
/// ties (one event id on many lines).
fn applied_order(entry: &LedgerEntry) -> (u64, Option<&str>, (u64, u64)) {
    (
        entry.at_ms,
        entry.source_event_id.as_deref(),
        stream_order(entry),
    )
}

/// `entries` in [`applied_order`], except that each key's own entries,
/// whose true order is their stream's, take the places the key has in that
/// order in their stream's order (event ids compare as text: `e10` before
/// `e9`).
fn in_applied_order(mut entries: Vec<LedgerEntry>) -> Vec<LedgerEntry> {
    entries.sort_by(|a, b| applied_order(a).cmp(&applied_order(b)));
    let mut places: BTreeMap<StockKey, Vec<usize>> = BTreeMap::new();
    for (place, entry) in entries.iter().enumerate() {
        places.entry(entry.key()).or_default().push(place);
    }
    let mut slots: Vec<Option<LedgerEntry>> = entries.into_iter().map(Some).collect();
    for places in places.values() {
        let mut own: Vec<LedgerEntry> = places
            .iter()
            .filter_map(|&place| slots[place].take())
            .collect();
        own.sort_by_key(stream_order);
        for (&place, entry) in places.iter().zip(own) {
            slots[place] = Some(entry);
        }
    }
    slots.into_iter().flatten().collect()
}

/// Works out the compensation of `source`'s import (`selection`) and, with
/// `apply`, applies it.
pub async fn compensate(
    postgres: &Client,
    allocator: &Allocator,
    config: &config::Config,
    source: &str,
    selection: &Selection,
    apply: bool,
) -> anyhow::Result<Report> {
    let undo = undo_source(source);
    // The outbox first, then which of its entries PostgreSQL has, then the
    // source's entries from PostgreSQL: an entry the relay moves in between
    // is counted as waiting or read, never missed.
    let outbox: Vec<LedgerEntry> = crate::audit::outbox_entries(allocator, config)
        .await?
        .into_iter()
        .filter(|entry| entry.op == allocator::LedgerOp::Adjust)
        .collect();
    let outbox_ids: Vec<String> = outbox
        .iter()
        .filter_map(|entry| entry.entry_id.clone())
        .collect();
    let relayed: std::collections::HashSet<String> = postgres
        .query(
            "SELECT entry_id FROM ledger WHERE entry_id = ANY($1)",
            &[&outbox_ids],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let unrelayed: Vec<LedgerEntry> = outbox
        .into_iter()
        .filter(|entry| {
            !entry
                .entry_id
                .as_ref()
                .is_some_and(|id| relayed.contains(id))
        })
        .collect();
    // An entry still unrelayed when the relayed ones were read is waited
    // for: the source's own and its compensation's at once (the selection
    // would miss them), the touched keys' once the selection names them.
    let own = unrelayed
        .iter()
        .filter(|entry| {
            entry.source.as_deref() == Some(source)
                || entry.source.as_deref() == Some(undo.as_str())
        })
        .count();
    if own > 0 {
        anyhow::bail!(
            "{own} adjustments of source {source} or of its compensation are not relayed to postgresql yet; try again when the relay has caught up"
        );
    }
    // PostgreSQL last: whatever was relayed when it was checked above is
    // in this read (the relay only adds).
    let mut all: Vec<LedgerEntry> = Vec::new();
    for row in postgres
        .query(
            "SELECT entry_id, entry::text FROM ledger WHERE op = 'adjust' AND source = $1",
            &[&source],
        )
        .await?
    {
        let entry_id: String = row.get(0);
        let entry = LedgerEntry::parse(row.get::<_, &str>(1))
            .map_err(|error| anyhow::anyhow!("ledger entry {entry_id}: {error}"))?;
        all.push(entry);
    }
    let selected = selection.pick(source, all)?;
    let dropped = postgres
        .query_one("SELECT min(day), max(day) FROM ledger_carried", &[])
        .await?;
    let mut report = Report {
        source: source.to_owned(),
        undo_source: undo.clone(),
        entries: selected.len() as u64,
        highest_source_seq: selected
            .iter()
            .filter(|entry| entry.kind == Some(AdjustmentKind::Absolute))
            .filter_map(|entry| entry.source_seq)
            .max(),
        dropped_days: dropped.get::<_, Option<time::Date>>(0).zip(dropped.get(1)),
        ..Report::default()
    };
    if selected.is_empty() {
        return Ok(report);
    }
    let mut by_key: BTreeMap<StockKey, Vec<&LedgerEntry>> = BTreeMap::new();
    for entry in &selected {
        by_key.entry(entry.key()).or_default().push(entry);
    }
    let waiting = unrelayed
        .iter()
        .filter(|entry| {
            entry.source.as_deref() == Some(source)
                || entry.source.as_deref() == Some(undo.as_str())
                || by_key.contains_key(&entry.key())
        })
        .count();
    if waiting > 0 {
        anyhow::bail!(
            "{waiting} adjustments of source {source}, of its compensation or of keys it touched are not relayed to postgresql yet; try again when the relay has caught up"
        );
    }
    let selected_ids: std::collections::HashSet<&str> = selected
        .iter()
        .filter_map(|entry| entry.entry_id.as_deref())
        .collect();
    // The touched keys with the Redis time of the import's first entry on
    // each: later counts from other sources, and reservations since.
    let (mut merchants, mut skus, mut locations, mut firsts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (key, entries) in &by_key {
        merchants.push(key.merchant.clone());
        skus.push(key.sku.clone());
        locations.push(key.location.clone());
        let first_ms = entries.iter().map(|entry| entry.at_ms).min().unwrap_or(0);
        firsts.push(i64::try_from(first_ms)?);
    }
    // `at` narrows by the index (with an hour's slack: Redis time can step
    // back); the entry's own time or stream position decides.
    const TOUCHED: &str = "WITH touched AS (
             SELECT merchant, sku, location, first_ms,
                    to_timestamp(first_ms / 1000.0) - interval '1 hour' AS near
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
                 AS t(merchant, sku, location, first_ms))";
    // The last physical count of each key that is not the import's.
    let mut last_count: BTreeMap<StockKey, (u64, u64)> = BTreeMap::new();
    for row in postgres
        .query(
            &format!(
                "{TOUCHED}
                 SELECT l.entry_id, l.entry::text FROM ledger l
                 JOIN touched t USING (merchant, sku, location)
                 WHERE l.op = 'adjust' AND l.entry->>'kind' = 'absolute' AND l.at >= t.near"
            ),
            &[&merchants, &skus, &locations, &firsts],
        )
        .await?
    {
        if selected_ids.contains(row.get::<_, &str>(0)) {
            continue;
        }
        let entry = LedgerEntry::parse(row.get::<_, &str>(1)).map_err(anyhow::Error::msg)?;
        let place = stream_order(&entry);
        let slot = last_count.entry(entry.key()).or_insert(place);
        *slot = (*slot).max(place);
    }
    let mut reserves: BTreeMap<StockKey, u64> = BTreeMap::new();
    for row in postgres
        .query(
            &format!(
                "{TOUCHED}
                 SELECT l.merchant, l.sku, l.location, COUNT(DISTINCT l.reservation_id)
                 FROM ledger l JOIN touched t USING (merchant, sku, location)
                 WHERE l.op = 'reserve' AND l.at >= t.near
                   AND (l.entry->>'at_ms')::bigint >= t.first_ms
                 GROUP BY l.merchant, l.sku, l.location"
            ),
            &[&merchants, &skus, &locations, &firsts],
        )
        .await?
    {
        let key = StockKey::new(
            row.get::<_, &str>(0),
            row.get::<_, &str>(1),
            row.get::<_, &str>(2),
        );
        reserves.insert(key, u64::try_from(row.get::<_, i64>(3)).unwrap_or(0));
    }
    // The compensations of this source the ledger has, per key.
    let mut compensations: BTreeMap<StockKey, Vec<(String, i64)>> = BTreeMap::new();
    for row in postgres
        .query(
            "SELECT merchant, sku, location, source_event_id, qty FROM ledger
             WHERE op = 'adjust' AND source = $1",
            &[&report.undo_source],
        )
        .await?
    {
        let key = StockKey::new(
            row.get::<_, &str>(0),
            row.get::<_, &str>(1),
            row.get::<_, &str>(2),
        );
        compensations
            .entry(key)
            .or_default()
            .push((row.get(3), row.get(4)));
    }
    let selection_id = crate::sha256_hex(selection.describe().as_bytes());
    let keys: Vec<StockKey> = by_key.keys().cloned().collect();
    let views = allocator.stock_views(&keys).await?;
    for ((key, entries), view) in by_key.into_iter().zip(views) {
        let counted = last_count.get(&key).copied();
        let (mut added, mut removed, mut overridden) = (0, 0, 0);
        for entry in &entries {
            if counted.is_some_and(|count| count > stream_order(entry)) {
                overridden += 1;
            } else if entry.qty > 0 {
                added += entry.qty;
            } else {
                removed += entry.qty;
            }
        }
        let reservations_since = reserves.get(&key).copied().unwrap_or(0);
        let sellable_now = view.sellable();
        let backorder = view.pool.as_ref().map_or(0, |pool| pool.backorder_limit);
        let effect = added + removed;
        let key_id = crate::sha256_hex(key.to_string().as_bytes());
        let event_id = format!("{}.{}", &selection_id[..16], &key_id[..32]);
        let before = compensations.get(&key).map_or(&[][..], Vec::as_slice);
        let ours = before
            .iter()
            .find(|(id, _)| *id == event_id)
            .map(|(_, qty)| *qty);
        let compensated_by_other = before
            .iter()
            .find(|(id, _)| *id != event_id)
            .map(|(id, _)| id.clone());
        let already_applied = ours.is_some();
        let pending = !already_applied && compensated_by_other.is_none();
        report.keys.push(KeyEffect {
            would_be_short: pending && effect > 0 && sellable_now - effect < -backorder,
            already_applied,
            applied_differs: ours.filter(|qty| *qty != -effect),
            compensated_by_other,
            event_id,
            key,
            entries: entries.len() as u64,
            added,
            removed,
            overridden,
            reservations_since,
            sellable_now,
        });
    }
    if apply {
        for key in &report.keys {
            if key.already_applied || key.compensated_by_other.is_some() {
                report.duplicates += 1;
                continue;
            }
            if key.effect() == 0 {
                continue;
            }
            let adjustment = Adjustment {
                merchant: key.key.merchant.clone(),
                sku: key.key.sku.clone(),
                location: key.key.location.clone(),
                kind: AdjustmentKind::Delta,
                qty: -key.effect(),
                source: report.undo_source.clone(),
                event_id: key.event_id.clone(),
                source_seq: None,
            };
            match allocator
                .adjust(&adjustment)
                .await
                .with_context(|| format!("compensating {}", key.key))?
            {
                AdjustmentOutcome::Applied { .. } => report.applied += 1,
                AdjustmentOutcome::Duplicate | AdjustmentOutcome::Stale { .. } => {
                    report.duplicates += 1;
                }
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An import entry on key `sku` as PostgreSQL returns it: its own
    /// partition's stream, Redis time `at_ms`.
    fn imported(sku: &str, event: &str, partition: u32, at_ms: u64) -> LedgerEntry {
        imported_at(sku, event, partition, at_ms, 0)
    }

    /// [`imported`], `seq`-th in its stream's millisecond.
    fn imported_at(sku: &str, event: &str, partition: u32, at_ms: u64, seq: u64) -> LedgerEntry {
        LedgerEntry::from_value(json!({
            "v": 1, "op": "adjust", "cell": format!("pool:{sku}"), "partition": partition,
            "merchant": "m", "sku": sku, "location": "l", "at_ms": at_ms,
            "stream_id": format!("{at_ms}-{seq}"), "qty": 90, "version": 2, "node": "n",
            "on_hand_before": 10, "on_hand_after": 100, "reserved_before": 0,
            "reserved_after": 0, "kind": "absolute", "source": "bad-import",
            "source_event_id": event, "shortfall": false,
        }))
        .expect("a valid entry")
    }

    fn events(entries: &[LedgerEntry]) -> Vec<&str> {
        entries
            .iter()
            .filter_map(|entry| entry.source_event_id.as_deref())
            .collect()
    }

    #[test]
    fn a_range_keeps_its_ends_when_they_share_a_millisecond_with_their_neighbours() {
        // Four entries in two milliseconds on four partitions; rows come
        // back in no order (here, the worst).
        let rows = vec![
            imported("d", "imp-3", 4, 1_001),
            imported("c", "imp-2", 3, 1_001),
            imported("b", "imp-1", 2, 1_000),
            imported("a", "imp-0", 1, 1_000),
        ];
        let range = Selection::Events {
            first: "imp-0".to_owned(),
            last: "imp-3".to_owned(),
        };
        let picked = range.pick("bad-import", rows.clone()).expect("a range");
        assert_eq!(events(&picked), ["imp-0", "imp-1", "imp-2", "imp-3"]);
        let inner = Selection::Events {
            first: "imp-1".to_owned(),
            last: "imp-2".to_owned(),
        };
        let picked = inner.pick("bad-import", rows.clone()).expect("a range");
        assert_eq!(events(&picked), ["imp-1", "imp-2"]);
        let backwards = Selection::Events {
            first: "imp-3".to_owned(),
            last: "imp-0".to_owned(),
        };
        let error = backwards.pick("bad-import", rows).expect_err("backwards");
        assert!(error.to_string().contains("applied after"), "{error}");
    }

    #[test]
    fn one_keys_entries_in_one_millisecond_keep_their_stream_order_whatever_their_ids() {
        // Key k: e9 then e10 in one millisecond (as text, "e10" < "e9");
        // key j before them.
        let rows = vec![
            imported_at("k", "e10", 5, 1_000, 1),
            imported_at("k", "e9", 5, 1_000, 0),
            imported("j", "e1", 3, 999),
        ];
        let pick = |first: &str, last: &str| {
            Selection::Events {
                first: first.to_owned(),
                last: last.to_owned(),
            }
            .pick("bad-import", rows.clone())
        };
        assert_eq!(events(&pick("e1", "e9").expect("a range")), ["e1", "e9"]);
        assert_eq!(events(&pick("e10", "e10").expect("a range")), ["e10"]);
        assert_eq!(events(&pick("e9", "e10").expect("a range")), ["e9", "e10"]);
        assert!(pick("e10", "e9").is_err(), "e10 came after e9");
    }
}
