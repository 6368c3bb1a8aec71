//! `ledger-writer rebuild`: Redis cells recomputed from the ledger.
//!
//! Owns putting a stock key's cells back as the ledger (PostgreSQL plus the
//! unrelayed outbox, [`crate::audit::Ledger`]) says they are, after Redis
//! lost or corrupted them. It never invents units: each cell gets its last
//! entry's `on_hand`, `reserved` and version, its last settings, and its
//! transfers still in flight; it then records a `rebuild` ledger entry, so
//! the chain the audit checks continues through it.
//!
//! Choices the issue left open, made to keep the books provable:
//!
//! * **Quiet keys only.** A key is refused (unless `--force`) when any of its
//!   cells took a ledger entry, or was touched in Redis, within the quiet
//!   window: rebuilding under live traffic would race the scripts. Even when
//!   forced, each cell is written by a compare-and-set on the version seen
//!   when it was checked, so a write that lands in between refuses that cell
//!   instead of being overwritten.
//! * **Holds.** Open holds whose reservation records Redis still has stay
//!   held. Open holds whose records are gone can never be committed or
//!   released by anyone, so the rebuild releases their units, in its own
//!   ledger entry (`qty` = units, `released` = ids).
//! * **Transfers.** A cell's `out_in_flight` is recomputed from the ledger
//!   (debits whose credit is not in it). Crediting them stays the transfer
//!   finisher's job, which needs the transfer record in Redis; a transfer
//!   whose record is gone stays in flight, and the audit shows it.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use allocator::{Allocator, AllocatorError, CellRebuild, CellRef, LedgerEntry, LedgerOp, StockKey};
use tokio_postgres::Client;

use crate::audit::{Ledger, Scope};

/// A cell, `(partition, id)`, and its ledger entries in order.
type CellHistory<'a> = ((u32, String), Vec<&'a LedgerEntry>);

/// What to rebuild and how carefully.
#[derive(Debug, Clone)]
pub struct Options {
    /// One stock key, or every key the ledger knows.
    pub scope: Scope,
    /// Rebuild keys that took writes within `quiet` too (each cell is still
    /// compare-and-set against the version seen when checked).
    pub force: bool,
    /// How long a key must have been without writes.
    pub quiet: Duration,
}

/// What the rebuild did.
#[derive(Debug, Default)]
pub struct Report {
    /// Cells rebuilt.
    pub cells: usize,
    /// Stock keys whose every cell was rebuilt.
    pub keys: usize,
    /// Units of lost holds released.
    pub released_units: i64,
    /// Lost holds released.
    pub released_holds: u64,
    /// Keys or cells not rebuilt, with why.
    pub refused: Vec<(String, String)>,
}

/// The kind and bucket node of a cell id (`m|s|l|pool`, `m|s|l|bucket|node`).
fn kind_of(cell: &str) -> Option<(&'static str, Option<String>)> {
    let parts: Vec<&str> = cell.split('|').collect();
    match parts.as_slice() {
        [_, _, _, "pool"] => Some(("pool", None)),
        [_, _, _, "bucket", node] => Some(("bucket", Some((*node).to_owned()))),
        _ => None,
    }
}

/// Rebuilds the cells of `options.scope` from the ledger: with `archive`,
/// the days retention dropped are read back from it; without, a key with
/// such days is refused (its carried balance says where the cells stood, not
/// which holds and transfers were open).
pub async fn rebuild(
    postgres: &Client,
    allocator: &Allocator,
    config: &config::Config,
    options: &Options,
    archive: Option<&crate::archive::Archive>,
) -> anyhow::Result<Report> {
    let ledger = Ledger::read(postgres, allocator, config, &options.scope, archive).await?;
    let mut keys: BTreeMap<StockKey, Vec<CellHistory<'_>>> = BTreeMap::new();
    for (cell, history) in ledger.cell_histories() {
        let last = history.last().expect("a cell has at least one entry");
        let key = last.key();
        keys.entry(key).or_default().push((cell, history));
    }
    let mut report = Report::default();
    let mut dropped: BTreeMap<StockKey, time::Date> = BTreeMap::new();
    for day in ledger.carried.values().flatten() {
        dropped.entry(day.key.clone()).or_insert(day.day);
    }
    for (key, day) in dropped {
        keys.remove(&key);
        report.refused.push((
            key.to_string(),
            format!(
                "its entries of {} and maybe later days were dropped by retention; rebuild --from-archive",
                crate::archive::day_text(day)
            ),
        ));
    }
    if !report.refused.is_empty() && matches!(options.scope, Scope::Key(_)) {
        return Ok(report);
    }
    if let Scope::Key(key) = &options.scope
        && !keys.contains_key(key)
    {
        report
            .refused
            .push((key.to_string(), "the ledger has no entry for it".to_owned()));
        return Ok(report);
    }
    let quiet_ms = options.quiet.as_millis() as u64;
    for (key, cells) in keys {
        let now_ms = allocator.redis_time_ms().await?;
        // What each cell is in Redis now, and whether the key is quiet.
        let mut seen = Vec::with_capacity(cells.len());
        let mut busy = None;
        for ((partition, cell), history) in &cells {
            let live = allocator
                .cell(&CellRef {
                    partition: *partition,
                    id: cell.clone(),
                })
                .await?;
            let last_at_ms = history.last().map_or(0, |entry| entry.at_ms);
            let touched_ms = live.as_ref().map_or(0, |cell| cell.touched_ms);
            let latest_ms = last_at_ms.max(touched_ms);
            if now_ms.saturating_sub(latest_ms) < quiet_ms {
                busy = Some(format!(
                    "cell {cell} took a write {} ms ago (quiet window {} ms); pass --force to rebuild anyway",
                    now_ms.saturating_sub(latest_ms),
                    quiet_ms
                ));
            }
            seen.push(live.map_or(-1, |cell| cell.version as i64));
        }
        if let Some(reason) = busy
            && !options.force
        {
            report.refused.push((key.to_string(), reason));
            continue;
        }
        let credited: HashSet<&str> = cells
            .iter()
            .flat_map(|(_, history)| history.iter())
            .filter(|entry| entry.op == LedgerOp::TransferIn)
            .filter_map(|entry| entry.transfer_id.as_deref())
            .collect();
        let mut whole_key = true;
        for (((partition, cell), history), expect_version) in cells.iter().zip(seen) {
            let Some((kind, bucket_node)) = kind_of(cell) else {
                report
                    .refused
                    .push((cell.clone(), "not a cell id this version knows".to_owned()));
                whole_key = false;
                continue;
            };
            let rebuild = plan(
                CellRef {
                    partition: *partition,
                    id: cell.clone(),
                },
                &key,
                kind,
                bucket_node,
                expect_version,
                history,
                &credited,
            );
            match allocator.rebuild_cell(&rebuild).await {
                Ok(outcome) => {
                    report.cells += 1;
                    report.released_units += outcome.released_units;
                    report.released_holds += outcome.released_holds;
                }
                Err(AllocatorError::Conflict(reason)) => {
                    report.refused.push((cell.clone(), reason));
                    whole_key = false;
                }
                Err(error) => return Err(error.into()),
            }
        }
        if whole_key {
            report.keys += 1;
        }
    }
    Ok(report)
}

/// The cell as its ledger history says it should be.
fn plan(
    cell: CellRef,
    key: &StockKey,
    kind: &str,
    bucket_node: Option<String>,
    expect_version: i64,
    history: &[&LedgerEntry],
    credited: &HashSet<&str>,
) -> CellRebuild {
    let last = history.last().expect("a cell has at least one entry");
    let mut open_holds: Vec<String> = Vec::new();
    let mut out_in_flight = 0;
    let mut settings = (0, 0, -1);
    for entry in history {
        let reservation = entry.reservation_id.as_deref();
        match entry.op {
            LedgerOp::Reserve => open_holds.extend(reservation.map(str::to_owned)),
            LedgerOp::Commit | LedgerOp::Release | LedgerOp::Expire => {
                open_holds.retain(|open| Some(open.as_str()) != reservation);
            }
            LedgerOp::Rebuild => {
                let released: HashSet<&str> = entry
                    .released
                    .iter()
                    .flatten()
                    .map(String::as_str)
                    .collect();
                open_holds.retain(|open| !released.contains(open.as_str()));
            }
            LedgerOp::TransferOut
                if !entry
                    .transfer_id
                    .as_deref()
                    .is_some_and(|id| credited.contains(id)) =>
            {
                out_in_flight += entry.qty;
            }
            LedgerOp::Settings => {
                settings = (
                    entry.safety_stock.unwrap_or_default(),
                    entry.backorder_limit.unwrap_or_default(),
                    entry.low_stock_threshold.unwrap_or(-1),
                );
            }
            _ => {}
        }
    }
    CellRebuild {
        cell,
        merchant: key.merchant.clone(),
        sku: key.sku.clone(),
        location: key.location.clone(),
        kind: kind.to_owned(),
        bucket_node,
        expect_version,
        on_hand: last.on_hand_after,
        reserved: last.reserved_after,
        version: last.version,
        out_in_flight,
        safety_stock: settings.0,
        backorder_limit: settings.1,
        low_stock_threshold: settings.2,
        open_holds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cell_ids_name_their_kind() {
        assert_eq!(kind_of("m|s|l|pool"), Some(("pool", None)));
        assert_eq!(
            kind_of("m|s|l|bucket|node-a"),
            Some(("bucket", Some("node-a".to_owned())))
        );
        assert_eq!(kind_of("m|s|l"), None);
    }

    #[test]
    fn the_plan_keeps_open_holds_settings_and_uncredited_transfers() {
        let entries = [
            json!({"op":"adjust","qty":10,"on_hand_after":10,"reserved_after":0,"version":1,
                   "kind":"delta","source":"t","source_event_id":"e","shortfall":false}),
            json!({"op":"settings","safety_stock":2,"backorder_limit":1,"low_stock_threshold":3,
                   "qty":0,"on_hand_after":10,"reserved_after":0,"version":2}),
            json!({"op":"reserve","reservation_id":"r1.a","qty":2,"on_hand_after":10,"reserved_after":2,"version":3}),
            json!({"op":"reserve","reservation_id":"r1.b","qty":1,"on_hand_after":10,"reserved_after":3,"version":4}),
            json!({"op":"commit","reservation_id":"r1.a","qty":2,"on_hand_after":8,"reserved_after":1,"version":5}),
            json!({"op":"transfer_out","transfer_id":"t1","qty":3,"on_hand_after":5,"reserved_after":1,"version":6}),
            json!({"op":"transfer_out","transfer_id":"t2","qty":1,"on_hand_after":4,"reserved_after":1,"version":7}),
        ]
        .map(|mut entry| {
            for (name, value) in [
                ("v", json!(1)), ("partition", json!(1)), ("cell", json!("m|s|l|pool")),
                ("merchant", json!("m")), ("sku", json!("s")), ("location", json!("l")),
                ("on_hand_before", json!(0)), ("reserved_before", json!(0)), ("node", json!("n")),
                ("at_ms", json!(1)),
            ] {
                entry[name] = value;
            }
            LedgerEntry::from_value(entry).expect("valid entry")
        });
        let history: Vec<&LedgerEntry> = entries.iter().collect();
        let credited = HashSet::from(["t1"]);
        let key = StockKey::new("m", "s", "l");
        let cell = CellRef {
            partition: 1,
            id: "m|s|l|pool".to_owned(),
        };
        let plan = plan(cell, &key, "pool", None, -1, &history, &credited);
        assert_eq!((plan.on_hand, plan.reserved, plan.version), (4, 1, 7));
        assert_eq!(plan.open_holds, vec!["r1.b".to_owned()]);
        assert_eq!(plan.out_in_flight, 1);
        assert_eq!(
            (
                plan.safety_stock,
                plan.backorder_limit,
                plan.low_stock_threshold
            ),
            (2, 1, 3)
        );
    }
}
