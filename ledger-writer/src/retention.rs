//! `ledger-writer partitions`, `history` and `retention`: the PostgreSQL
//! ledger's days, from created ahead to dropped.
//!
//! Owns the life of a day partition after the relay (which creates a day's
//! partition when an entry for it arrives, [`crate::relay::ensure_days`]):
//!
//! * **Ahead.** [`ensure_ahead`] creates today's partition and the next
//!   `ledger_writer.partitions_ahead_days`; the writer runs it at start and
//!   every hour, so the relay rarely has to.
//! * **History.** [`build_history`] writes the curated daily history of a
//!   day (`stock_history_daily`, from the `stock_reconciliation_daily` and
//!   `stockouts` views): kept `ledger_writer.history_retention_days` after
//!   the raw entries are gone.
//! * **Drop.** A day older than `ledger_writer.raw_retention_days` is
//!   dropped only when the archive verifies ([`crate::archive::verify_day`]:
//!   every file matches its manifest and holds every entry PostgreSQL has for
//!   the day), and the check is made again under a lock on the partition, in
//!   the transaction that drops it. That transaction also writes the day's
//!   history, and what the day leaves behind for the audit: each cell's
//!   balance carried forward (`ledger_carried`: the first "before", the last
//!   "after", the sums of the flows the conservation law counts) and the
//!   entries the audit reads whole (`ledger_carried_entries`: the halves of
//!   every transfer not settled within the day by exactly one debit and one
//!   credit of the same quantity, and settings). A day whose cells do not
//!   chain within it is refused: the audit must see the break before the
//!   entries go. Every archive run, drop and replay of a day holds the
//!   day's advisory lock ([`crate::archive::lock_day`]). A day is in `ledger` or carried,
//!   never both: a replay of the day removes its carried rows in the
//!   transaction that lands it ([`take_carried`], [`check_covered`]).
//!
//! Entries for a dropped day can still arrive (a relay backlog): the relay
//! creates the partition again, the next archive adds them to the day's file,
//! and the next drop adds them to the carried rows.
//!
//! Why not pg_partman: creating days ahead is one SQL function here
//! (`ledger_day_partition`), and dropping must wait for our own archive's
//! verification and carry balances forward in the same transaction, which
//! partman's retention cannot be told to do; it would add an extension to
//! install for the part we need least.

use std::collections::BTreeSet;

use anyhow::Context;
use time::{Date, Duration};
use tokio_postgres::{Client, Transaction};

use crate::archive::{self, Archive};

/// Today (UTC) by PostgreSQL's clock.
pub async fn today(client: &Client) -> anyhow::Result<Date> {
    Ok(client
        .query_one("SELECT (now() AT TIME ZONE 'UTC')::date", &[])
        .await?
        .get(0))
}

/// Creates the partitions of today and the next `days_ahead` days; returns
/// the days.
pub async fn ensure_ahead(client: &Client, days_ahead: u32) -> anyhow::Result<Vec<Date>> {
    let today = today(client).await?;
    let days: Vec<Date> = (0..=i64::from(days_ahead))
        .map(|offset| today + Duration::days(offset))
        .collect();
    crate::relay::ensure_days(client, &days.iter().copied().collect()).await?;
    Ok(days)
}

/// How often the writer creates the days ahead again.
const AHEAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// [`ensure_ahead`] every hour (the first at start is the
/// writer's own), on a connection of its own; a failure is logged and tried
/// again next time (the relay creates a missing day itself meanwhile).
pub async fn partitions_ahead_forever(config: std::sync::Arc<config::Config>) {
    loop {
        tokio::time::sleep(AHEAD_INTERVAL).await;
        let made = async {
            let client = crate::connect_postgres(&config).await?;
            ensure_ahead(&client, config.ledger_writer.partitions_ahead_days).await
        };
        if let Err(error) = made.await {
            tracing::warn!(
                error = format!("{error:#}"),
                "creating the ledger's days ahead failed"
            );
        }
    }
}

/// Writes (or writes again) the curated history of `day`: one row per
/// stock key that moved that day. Stockout minutes are the day's share of
/// each episode the `stockouts` view shows (an episode that began on a day
/// already dropped is counted from the first entry the ledger still has).
/// With `merge` (the day was dropped before, and the ledger holds only
/// entries that came after), the rows are added to what the day's history
/// already says: flows summed, the opening kept, the closing replaced, and
/// minutes added only for the part of the day after the row was last
/// built (the earlier build counted every episode up to then, an open one
/// to its own time; a late entry that starts an episode again must not
/// count those minutes twice). So a key's row built after its day ended
/// gains no minutes from late entries: where they fall among the dropped
/// entries' episodes is not known any more (a key with no row yet gets
/// them whole: nothing counted them before).
pub async fn build_history(
    transaction: &Transaction<'_>,
    day: Date,
    merge: bool,
) -> anyhow::Result<u64> {
    let update = if merge {
        "received = h.received + EXCLUDED.received, removed = h.removed + EXCLUDED.removed,
         sold = h.sold + EXCLUDED.sold, moved_in = h.moved_in + EXCLUDED.moved_in,
         moved_out = h.moved_out + EXCLUDED.moved_out, rebuilt = h.rebuilt + EXCLUDED.rebuilt,
         closing_on_hand = EXCLUDED.closing_on_hand,
         stockout_minutes = h.stockout_minutes + EXCLUDED.stockout_minutes,
         entries = h.entries + EXCLUDED.entries, built_at = now()"
    } else {
        "opening_on_hand = EXCLUDED.opening_on_hand, received = EXCLUDED.received,
         removed = EXCLUDED.removed, sold = EXCLUDED.sold, moved_in = EXCLUDED.moved_in,
         moved_out = EXCLUDED.moved_out, rebuilt = EXCLUDED.rebuilt,
         closing_on_hand = EXCLUDED.closing_on_hand,
         stockout_minutes = EXCLUDED.stockout_minutes, entries = EXCLUDED.entries,
         built_at = now()"
    };
    // The part of the day an earlier build did not count (all of it
    // without `merge`).
    let counted_until = if merge { "p.built_at" } else { "NULL" };
    transaction
        .batch_execute("SET LOCAL TimeZone = 'UTC'")
        .await?;
    Ok(transaction
        .execute(
            &format!("WITH bounds AS (
                 SELECT $1::date::timestamptz AS day_start, ($1::date + 1)::timestamptz AS day_end
             ), minutes AS MATERIALIZED (
                 SELECT s.merchant, s.sku, s.location,
                        SUM(GREATEST(0, EXTRACT(EPOCH FROM LEAST(COALESCE(s.ended_at, now()), b.day_end)
                            - GREATEST(s.started_at, b.day_start,
                                       COALESCE({counted_until}, b.day_start))))) / 60 AS minutes
                 FROM stockouts s CROSS JOIN bounds b
                 LEFT JOIN stock_history_daily p
                   ON p.merchant = s.merchant AND p.sku = s.sku AND p.location = s.location
                  AND p.day = $1::date
                 WHERE s.started_at < b.day_end AND COALESCE(s.ended_at, now()) > b.day_start
                 GROUP BY s.merchant, s.sku, s.location
             )
             INSERT INTO stock_history_daily AS h (merchant, sku, location, day, opening_on_hand, received,
                 removed, sold, moved_in, moved_out, rebuilt, closing_on_hand, stockout_minutes, entries)
             SELECT r.merchant, r.sku, r.location, $1::date, r.opening_on_hand, r.received, r.removed,
                 r.sold, r.moved_in, r.moved_out, r.rebuilt, r.closing_on_hand,
                 COALESCE(m.minutes, 0)::numeric(8, 2), r.entries
             FROM stock_reconciliation_daily r
             CROSS JOIN bounds b
             LEFT JOIN minutes m USING (merchant, sku, location)
             WHERE r.day = b.day_start
             ON CONFLICT (merchant, sku, location, day) DO UPDATE SET {update}"),
            &[&day],
        )
        .await?)
}

/// Whether retention dropped `day` before (it has carried rows).
async fn dropped_before(transaction: &Transaction<'_>, day: Date) -> anyhow::Result<bool> {
    Ok(transaction
        .query_opt(
            "SELECT 1 FROM ledger_carried WHERE day = $1 LIMIT 1",
            &[&day],
        )
        .await?
        .is_some())
}

/// The closed days PostgreSQL holds (before today, UTC), or only `day`:
/// what `archive` and `verify` go through.
pub async fn closed_days(client: &Client, day: Option<Date>) -> anyhow::Result<Vec<Date>> {
    let today = today(client).await?;
    Ok(match day {
        Some(day) => vec![day],
        None => archive::postgres_days(client)
            .await?
            .into_iter()
            .filter(|day| *day < today)
            .collect(),
    })
}

/// [`build_history`] of `day` in a transaction of its own, unless
/// retention dropped the day before: its history already holds the
/// dropped entries (and the ledger only later ones, which are added when
/// the day is dropped again), so it is kept and `None` returned.
pub async fn history(client: &mut Client, day: Date) -> anyhow::Result<Option<u64>> {
    let transaction = client.transaction().await?;
    let dropped_before = dropped_before(&transaction, day).await?;
    if dropped_before {
        return Ok(None);
    }
    let rows = build_history(&transaction, day, false).await?;
    transaction.commit().await?;
    Ok(Some(rows))
}

/// What a dropped day left of one cell: `(partition, cell, entries, last
/// entry id)`.
pub type CarriedCell = (i32, String, i64, String);

/// Removes what a dropped `day` left for the audit, as the day comes back
/// into the ledger (a replay); returns what it removed, for
/// [`check_covered`] once the entries are in.
pub async fn take_carried(
    transaction: &Transaction<'_>,
    day: Date,
) -> anyhow::Result<Vec<CarriedCell>> {
    let taken = transaction
        .query(
            "DELETE FROM ledger_carried WHERE day = $1
             RETURNING partition, cell, entries, last_entry_id",
            &[&day],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    transaction
        .execute("DELETE FROM ledger_carried_entries WHERE day = $1", &[&day])
        .await?;
    Ok(taken)
}

/// Whether the ledger now holds, for every cell in `carried`, exactly as
/// many entries up to its carried row's last one as the row stood for, that
/// last one among them (entries after it came later, and count apart); an
/// error
/// saying which cell falls short otherwise (an archive that is not the one
/// the day was dropped on the word of, or lacks a partition).
pub async fn check_covered(
    transaction: &Transaction<'_>,
    day: Date,
    carried: &[CarriedCell],
) -> anyhow::Result<()> {
    for (partition, cell, entries, last_entry_id) in carried {
        let row = transaction
            .query_one(
                "SELECT count(*) FILTER (
                            WHERE (split_part(stream_id, '-', 1)::bigint, split_part(stream_id, '-', 2)::bigint)
                               <= (split_part($4, '-', 2)::bigint, split_part($4, '-', 3)::bigint)),
                        bool_or(entry_id = $4)
                 FROM ledger
                 WHERE at >= $1::date::timestamp AT TIME ZONE 'UTC'
                   AND at < ($1::date + 1)::timestamp AT TIME ZONE 'UTC'
                   AND partition = $2 AND cell = $3",
                &[&day, partition, cell, last_entry_id],
            )
            .await?;
        let (present, has_last): (i64, Option<bool>) = (row.get(0), row.get(1));
        if present != *entries || has_last != Some(true) {
            anyhow::bail!(
                "cell {cell} had {entries} entries up to {last_entry_id} when the day was dropped; the archive gives {present}"
            );
        }
    }
    Ok(())
}

/// What retention decided for one day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Past retention, archived and verified: dropped (or, in a dry run,
    /// would be).
    Dropped {
        /// Entries the partition held.
        entries: u64,
        /// Curated history rows written for the day.
        history: u64,
    },
    /// Past retention but not dropped, with why.
    Refused(String),
}

/// What [`retention`] did.
#[derive(Debug, Default)]
pub struct Report {
    /// The days past retention (or the one asked for), with the decision.
    pub days: Vec<(Date, Decision)>,
    /// Curated history rows past their retention, deleted.
    pub history_deleted: u64,
    /// Whether anything was changed (`--apply`).
    pub applied: bool,
}

/// Drops the days past raw retention (or only `day`, when given: an
/// operator's explicit request, honoured whatever its age) that the archive
/// verifies, and deletes curated history past its own retention. Changes
/// nothing unless `apply`.
pub async fn retention(
    client: &mut Client,
    archive: &Archive,
    config: &config::Config,
    day: Option<Date>,
    apply: bool,
) -> anyhow::Result<Report> {
    let today = today(client).await?;
    let writer = &config.ledger_writer;
    let days: Vec<Date> = match day {
        Some(day) => vec![day],
        None => {
            let oldest_kept = today - Duration::days(i64::from(writer.raw_retention_days));
            archive::postgres_days(client)
                .await?
                .into_iter()
                .filter(|day| *day < oldest_kept)
                .collect()
        }
    };
    let mut report = Report {
        applied: apply,
        ..Report::default()
    };
    for day in days {
        let verified = archive::verify_day(client, archive, day).await?;
        let decision = if verified.files == 0 && verified.in_postgres > 0 {
            Decision::Refused(format!("not archived in {}", archive.url))
        } else if !verified.problems.is_empty() {
            Decision::Refused(verified.problems.join("; "))
        } else if apply {
            drop_day(client, day, &verified.archived_ids).await?
        } else {
            Decision::Dropped {
                entries: verified.in_postgres,
                history: 0,
            }
        };
        report.days.push((day, decision));
    }
    if apply {
        let oldest_history = today - Duration::days(i64::from(writer.history_retention_days));
        report.history_deleted = client
            .execute(
                "DELETE FROM stock_history_daily WHERE day < $1",
                &[&oldest_history],
            )
            .await?;
    }
    Ok(report)
}

/// Drops `day`'s partition in one transaction (else refuses), if under the
/// day's lock every entry it holds is among `archived` and each cell's
/// entries chain within the day: writes its history and carried balances
/// first. A lock it cannot get within a few seconds (the relay writing the
/// day, a deadlock) is a refusal to try again, not an error.
async fn drop_day(
    client: &mut Client,
    day: Date,
    archived: &BTreeSet<String>,
) -> anyhow::Result<Decision> {
    match drop_day_locked(client, day, archived).await {
        Err(error)
            if error
                .downcast_ref::<tokio_postgres::Error>()
                .and_then(tokio_postgres::Error::code)
                .is_some_and(|code| {
                    *code == tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE
                        || *code == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
                }) =>
        {
            Ok(Decision::Refused(format!(
                "the day is busy (a relay or another run holds it: {error}); try again"
            )))
        }
        other => other,
    }
}

async fn drop_day_locked(
    client: &mut Client,
    day: Date,
    archived: &BTreeSet<String>,
) -> anyhow::Result<Decision> {
    let transaction = client.transaction().await?;
    transaction
        .batch_execute("SET LOCAL lock_timeout = '5s'")
        .await?;
    archive::lock_day(&transaction, day).await?;
    let table: String = transaction
        .query_one(
            "SELECT partition_table FROM ledger_days WHERE day = $1",
            &[&day],
        )
        .await
        .with_context(|| format!("no ledger partition for {}", archive::day_text(day)))?
        .get(0);
    // The relay waits for this transaction to end before it can add a row.
    transaction
        .batch_execute(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .await?;
    let ids: Vec<String> = transaction
        .query(&format!("SELECT entry_id FROM {table}"), &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let missing = ids.iter().filter(|id| !archived.contains(*id)).count();
    if missing > 0 {
        transaction.rollback().await?;
        return Ok(Decision::Refused(format!(
            "{missing} entries arrived after the archive was verified; archive again"
        )));
    }
    // A break in a cell's chain within the day (or against what an earlier
    // drop of the day carried) would be hidden once the entries are gone:
    // the audit must see it first.
    let breaks: i64 = transaction
        .query_one(
            &format!(
                "WITH l AS (
                     SELECT partition, cell, on_hand_before, reserved_before,
                            LAG(on_hand_after) OVER w AS previous_on_hand,
                            LAG(reserved_after) OVER w AS previous_reserved,
                            ROW_NUMBER() OVER w AS n
                     FROM (SELECT *, split_part(stream_id, '-', 1)::bigint AS ms,
                                  split_part(stream_id, '-', 2)::bigint AS seq
                           FROM {table}) AS x
                     WINDOW w AS (PARTITION BY partition, cell ORDER BY ms, seq))
                 SELECT count(DISTINCT (l.partition, l.cell)) FROM l
                 LEFT JOIN ledger_carried c
                     ON c.day = $1 AND c.partition = l.partition AND c.cell = l.cell
                 WHERE (l.n > 1 AND (l.previous_on_hand <> l.on_hand_before
                                     OR l.previous_reserved <> l.reserved_before))
                    OR (l.n = 1 AND c.cell IS NOT NULL
                        AND (c.on_hand_after <> l.on_hand_before
                             OR c.reserved_after <> l.reserved_before))"
            ),
            &[&day],
        )
        .await?
        .get(0);
    if breaks > 0 {
        transaction.rollback().await?;
        return Ok(Decision::Refused(format!(
            "the entries of {breaks} cells do not chain within the day (ledger-writer audit shows where); dropping them would hide it"
        )));
    }
    let dropped_before = dropped_before(&transaction, day).await?;
    let history = build_history(&transaction, day, dropped_before).await?;
    transaction
        .execute(
            &format!(
                "INSERT INTO ledger_carried (day, partition, cell, merchant, sku, location, entries,
                     first_entry_id, last_entry_id, on_hand_before, reserved_before, on_hand_after,
                     reserved_after, version, adjusted, committed, sent, received)
                 SELECT $1, partition, cell, merchant, sku, location, COUNT(*),
                     (array_agg(entry_id ORDER BY ms, seq))[1],
                     (array_agg(entry_id ORDER BY ms DESC, seq DESC))[1],
                     (array_agg(on_hand_before ORDER BY ms, seq))[1],
                     (array_agg(reserved_before ORDER BY ms, seq))[1],
                     (array_agg(on_hand_after ORDER BY ms DESC, seq DESC))[1],
                     (array_agg(reserved_after ORDER BY ms DESC, seq DESC))[1],
                     (array_agg(version ORDER BY ms DESC, seq DESC))[1],
                     COALESCE(SUM(qty) FILTER (WHERE op = 'adjust'), 0),
                     COALESCE(SUM(qty) FILTER (WHERE op = 'commit'), 0),
                     COALESCE(SUM(qty) FILTER (WHERE op = 'transfer_out'), 0),
                     COALESCE(SUM(qty) FILTER (WHERE op = 'transfer_in'), 0)
                 FROM (SELECT *, split_part(stream_id, '-', 1)::bigint AS ms,
                              split_part(stream_id, '-', 2)::bigint AS seq
                       FROM {table}) AS l
                 GROUP BY partition, cell, merchant, sku, location
                 ON CONFLICT (day, partition, cell) DO UPDATE SET
                     entries = ledger_carried.entries + EXCLUDED.entries,
                     last_entry_id = EXCLUDED.last_entry_id,
                     on_hand_after = EXCLUDED.on_hand_after,
                     reserved_after = EXCLUDED.reserved_after,
                     version = EXCLUDED.version,
                     adjusted = ledger_carried.adjusted + EXCLUDED.adjusted,
                     committed = ledger_carried.committed + EXCLUDED.committed,
                     sent = ledger_carried.sent + EXCLUDED.sent,
                     received = ledger_carried.received + EXCLUDED.received"
            ),
            &[&day],
        )
        .await?;
    transaction
        .execute(
            &format!(
                "INSERT INTO ledger_carried_entries (day, entry_id, entry)
                 SELECT $1, l.entry_id, l.entry FROM {table} AS l
                 WHERE l.op = 'settings'
                    OR (l.op IN ('transfer_out', 'transfer_in') AND l.transfer_id IN (
                        SELECT transfer_id FROM {table}
                        WHERE op IN ('transfer_out', 'transfer_in')
                        GROUP BY transfer_id
                        HAVING NOT (count(*) FILTER (WHERE op = 'transfer_out') = 1
                                    AND count(*) FILTER (WHERE op = 'transfer_in') = 1
                                    AND sum(qty) FILTER (WHERE op = 'transfer_out')
                                        = sum(qty) FILTER (WHERE op = 'transfer_in'))))
                 ON CONFLICT (day, entry_id) DO NOTHING"
            ),
            &[&day],
        )
        .await?;
    transaction
        .batch_execute(&format!("DROP TABLE {table}"))
        .await?;
    transaction.commit().await?;
    Ok(Decision::Dropped {
        entries: ids.len() as u64,
        history,
    })
}
