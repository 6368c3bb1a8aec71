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
//! for a count too) that came after the key's last physical count from any
//! other source: such a count set on_hand to what was on the shelf, so the
//! import's earlier entries no longer count. Compensation is a delta of
//! minus that effect, from source `undo.<source>` with an event id made of
//! the selection and the key, so applying twice applies once (the
//! allocator deduplicates on source and event id).
//!
//! **The blast radius**, printed by the dry run and again by `--apply`:
//! keys touched, units the import added and removed there, reservations
//! made on those keys while the import was in force (they may have sold
//! units that did not exist), and every key the compensation would leave
//! short (sellable below the backorder limit: the units are already
//! promised, someone must make good).
//!
//! It reads PostgreSQL's ledger, and refuses while any entry of the source
//! is still in the outbox unrelayed (the figures would be incomplete).

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
    fn describe(&self) -> String {
        match self {
            Self::Events { first, last } => format!("events {first}..{last}"),
            Self::Since(since) => format!("since {since}"),
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

fn order(entry: &LedgerEntry) -> (u64, u64, u64) {
    let id = entry.id().unwrap_or(EntryId {
        partition: entry.partition,
        ms: 0,
        seq: 0,
    });
    (entry.at_ms, id.ms, id.seq)
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
    let mut unrelayed = 0;
    for partition in 0..config.stock.partitions {
        for entry in allocator.ledger_entries(partition, 0).await? {
            if entry.source.as_deref() == Some(source) {
                unrelayed += 1;
            }
        }
    }
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
    if unrelayed > 0 {
        // Only the ones PostgreSQL does not have yet matter.
        let known: std::collections::HashSet<String> = all
            .iter()
            .filter_map(|entry| entry.entry_id.clone())
            .collect();
        let mut missing = 0;
        for partition in 0..config.stock.partitions {
            for entry in allocator.ledger_entries(partition, 0).await? {
                if entry.source.as_deref() == Some(source)
                    && !entry.entry_id.as_ref().is_some_and(|id| known.contains(id))
                {
                    missing += 1;
                }
            }
        }
        if missing > 0 {
            anyhow::bail!(
                "{missing} entries of source {source} are not relayed to postgresql yet; try again when the relay has caught up"
            );
        }
    }
    all.sort_by_key(order);
    let selected: Vec<LedgerEntry> = match selection {
        Selection::All => all,
        Selection::Since(since) => {
            let since_ms = u64::try_from(since.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            all.into_iter()
                .filter(|entry| entry.at_ms >= since_ms)
                .collect()
        }
        Selection::Events { first, last } => {
            let position = |id: &str| {
                all.iter()
                    .position(|entry| entry.source_event_id.as_deref() == Some(id))
                    .with_context(|| format!("source {source} has no event {id} in the ledger"))
            };
            let (from, to) = (position(first)?, position(last)?);
            if from > to {
                anyhow::bail!("event {first} was applied after {last}");
            }
            all[from..=to].to_vec()
        }
    };
    let mut report = Report {
        source: source.to_owned(),
        undo_source: undo_source(source),
        entries: selected.len() as u64,
        ..Report::default()
    };
    if selected.is_empty() {
        return Ok(report);
    }
    let mut by_key: BTreeMap<StockKey, Vec<&LedgerEntry>> = BTreeMap::new();
    for entry in &selected {
        by_key.entry(entry.key()).or_default().push(entry);
    }
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
    // `at` narrows by the index; the entry's own `at_ms` decides exactly.
    const TOUCHED: &str = "WITH touched AS (
             SELECT merchant, sku, location, first_ms,
                    to_timestamp(first_ms / 1000.0) - interval '1 second' AS near
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
                 AS t(merchant, sku, location, first_ms))";
    let mut last_count: BTreeMap<StockKey, (u64, u64, u64)> = BTreeMap::new();
    for row in postgres
        .query(
            &format!(
                "{TOUCHED}
                 SELECT l.entry::text FROM ledger l
                 JOIN touched t USING (merchant, sku, location)
                 WHERE l.op = 'adjust' AND l.source <> $5 AND l.entry->>'kind' = 'absolute'
                   AND l.at >= t.near AND (l.entry->>'at_ms')::bigint >= t.first_ms"
            ),
            &[&merchants, &skus, &locations, &firsts, &source],
        )
        .await?
    {
        let entry = LedgerEntry::parse(row.get::<_, &str>(0)).map_err(anyhow::Error::msg)?;
        let place = order(&entry);
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
    let applied_before: std::collections::HashSet<String> = postgres
        .query(
            "SELECT source_event_id FROM ledger WHERE op = 'adjust' AND source = $1",
            &[&report.undo_source],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let selection_id = crate::sha256_hex(selection.describe().as_bytes());
    let keys: Vec<StockKey> = by_key.keys().cloned().collect();
    let views = allocator.stock_views(&keys).await?;
    for ((key, entries), view) in by_key.into_iter().zip(views) {
        let counted = last_count.get(&key).copied();
        let (mut added, mut removed, mut overridden) = (0, 0, 0);
        for entry in &entries {
            if counted.is_some_and(|count| count > order(entry)) {
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
        let already_applied = applied_before.contains(&event_id);
        report.keys.push(KeyEffect {
            would_be_short: !already_applied && effect > 0 && sellable_now - effect < -backorder,
            already_applied,
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
