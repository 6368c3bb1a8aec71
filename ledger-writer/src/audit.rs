//! `ledger-writer audit`: do the books balance?
//!
//! Owns checking Redis against the ledger. The ledger is the PostgreSQL
//! `ledger` table plus whatever is still in the outbox streams (written but
//! not yet relayed), merged by entry id. For every cell it checks that the
//! entries chain (each entry's "before" is the previous entry's "after") and
//! that the last entry's quantities are what Redis holds now; for every stock
//! key it checks the conservation law of DESIGN.md:
//!
//!   Σ cells' on_hand + units in flight = Σ adjust − Σ commit
//!
//! and it matches every transfer's halves by transfer id, the way a human
//! auditor would: exactly one debit and at most one credit per id, of the
//! same quantity, never a credit without its debit, and no transfer in
//! flight longer than the finisher's delay allows ([`transfer_drifts`]).
//! Physical facts are checked against the whole key ([`key_drifts`]): an
//! absolute count of a key with buckets must leave the key's cells holding
//! the count (the entry carries what the buckets held), and no cell of a key
//! takes a reservation while a loss has left the key short.
//!
//! On request it also counts the distinct entry ids in the Kafka ledger topic
//! ([`kafka_entry_ids`]; the topic may hold duplicates after a crash, never
//! fewer ids than PostgreSQL has rows). It changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use allocator::{Allocator, CellRef, LedgerEntry, LedgerOp};
use serde_json::Value;
use tokio_postgres::Client;

/// One problem the audit found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// The cell or stock key it concerns.
    pub subject: String,
    /// What does not add up.
    pub problem: String,
}

/// What the audit saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Entries in PostgreSQL.
    pub entries_in_postgres: usize,
    /// Entries still in the outbox streams and not in PostgreSQL.
    pub entries_not_relayed: usize,
    /// Cells checked.
    pub cells: usize,
    /// Stock keys checked.
    pub keys: usize,
    /// Everything that does not add up; empty when the books balance.
    pub drifts: Vec<Drift>,
}

/// An entry's place in its partition's stream (its id orders it).
fn stream_order(entry: &LedgerEntry) -> (u64, u64) {
    entry.id().map_or((0, 0), |id| (id.ms, id.seq))
}

/// Which stock keys a ledger read covers.
#[derive(Debug, Clone, Default)]
pub enum Scope {
    /// Every key.
    #[default]
    All,
    /// One merchant's keys.
    Merchant(String),
    /// One stock key.
    Key(allocator::StockKey),
}

impl Scope {
    fn covers(&self, entry: &LedgerEntry) -> bool {
        match self {
            Self::All => true,
            Self::Merchant(merchant) => &entry.merchant == merchant,
            Self::Key(key) => &entry.key() == key,
        }
    }
}

/// What a day dropped by retention left of one cell's entries
/// (`ledger_carried`, see [`crate::retention`]).
#[derive(Debug, Clone)]
pub struct Carried {
    /// The dropped day.
    pub day: time::Date,
    /// The cell's stock key.
    pub key: allocator::StockKey,
    /// Stream order of its first entry that day (its place in the chain).
    pub first: (u64, u64),
    /// And of its last (an outbox entry up to it is already counted here).
    pub last: (u64, u64),
    /// The cell's on_hand and reserved before its first entry that day.
    pub before: (i64, i64),
    /// After its last entry that day.
    pub after: (i64, i64),
    /// Σ qty of the day's adjust, commit, transfer_out, transfer_in entries.
    pub adjusted: i64,
    /// See `adjusted`.
    pub committed: i64,
    /// See `adjusted`.
    pub sent: i64,
    /// See `adjusted`.
    pub received: i64,
}

/// Every entry still in the partitions' outbox streams (relayed or not:
/// the relay trims them after PostgreSQL has them). Read it before
/// PostgreSQL, so an entry the relay moves in between is in both.
pub async fn outbox_entries(
    allocator: &Allocator,
    config: &config::Config,
) -> anyhow::Result<Vec<LedgerEntry>> {
    let mut outbox = Vec::new();
    for partition in 0..config.stock.partitions {
        outbox.extend(allocator.ledger_entries(partition, 0).await?);
    }
    Ok(outbox)
}

/// What [`Ledger::read`] reads from PostgreSQL in one snapshot.
struct Snapshot {
    entries: HashMap<String, LedgerEntry>,
    dropped_days: Vec<time::Date>,
    carried_partitions: Vec<(time::Date, u32)>,
    carried: BTreeMap<(u32, String), Vec<Carried>>,
    carried_entries: Vec<LedgerEntry>,
}

/// The ledger as it stands: the PostgreSQL rows plus the outbox entries not
/// yet relayed, by entry id; and what days dropped by retention carried
/// forward (or, read with an archive, those days' entries from it).
pub struct Ledger {
    /// Every entry in scope, by entry id.
    pub entries: HashMap<String, LedgerEntry>,
    /// How many came from PostgreSQL.
    pub in_postgres: usize,
    /// How many are only in the outbox.
    pub not_relayed: usize,
    /// How many came from the archive (days retention dropped).
    pub from_archive: usize,
    /// Per cell `(partition, id)`: the dropped days' balances, oldest first.
    pub carried: BTreeMap<(u32, String), Vec<Carried>>,
    /// Entries of dropped days the audit reads whole (unmatched transfer
    /// halves, settings); not part of any cell's chain.
    pub carried_entries: Vec<LedgerEntry>,
}

impl Ledger {
    /// Reads the ledger of `scope`. With `archive`, the days retention
    /// dropped are read back from it (every entry) instead of their carried
    /// balances; a dropped day the archive does not hold is an error.
    ///
    /// PostgreSQL is read in one snapshot (a repeatable-read, read-only
    /// transaction): a retention drop or a replay committing in between
    /// would otherwise show a day both in the ledger and carried, or in
    /// neither.
    pub async fn read(
        postgres: &Client,
        allocator: &Allocator,
        config: &config::Config,
        scope: &Scope,
        archive: Option<&crate::archive::Archive>,
    ) -> anyhow::Result<Self> {
        // The outbox before PostgreSQL: an entry the relay moves (and
        // trims) between the two reads is then in both, never in neither.
        let outbox = outbox_entries(allocator, config).await?;
        // Only PostgreSQL inside the snapshot: the transaction's locks would
        // otherwise hold a new day partition (and with it the relay) back
        // while the archive is read.
        postgres
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let snapshot = Self::read_postgres(postgres, scope).await;
        postgres
            .batch_execute(if snapshot.is_ok() {
                "COMMIT"
            } else {
                "ROLLBACK"
            })
            .await?;
        let Snapshot {
            mut entries,
            dropped_days,
            carried_partitions,
            mut carried,
            mut carried_entries,
        } = snapshot?;
        let in_postgres = entries.len();
        let mut from_archive = 0;
        if let Some(archive) = archive {
            let manifests = archive.manifests(None).await?;
            for (day, partition) in &carried_partitions {
                if !manifests.contains_key(&(*day, *partition)) {
                    anyhow::bail!(
                        "retention dropped {} (ledger partition {partition}) from postgresql and archive {} does not hold it",
                        crate::archive::day_text(*day),
                        archive.url
                    );
                }
            }
            for day in &dropped_days {
                let of_day: Vec<_> = manifests
                    .iter()
                    .filter(|((archived, _), _)| archived == day)
                    .collect();
                if of_day.is_empty() {
                    anyhow::bail!(
                        "retention dropped {} from postgresql and archive {} does not hold it",
                        crate::archive::day_text(*day),
                        archive.url
                    );
                }
                for (_, manifest) in of_day {
                    for entry in archive.read(manifest).await? {
                        if !scope.covers(&entry) {
                            continue;
                        }
                        let entry_id = entry.entry_id.clone().unwrap_or_default();
                        if let std::collections::hash_map::Entry::Vacant(slot) =
                            entries.entry(entry_id)
                        {
                            from_archive += 1;
                            slot.insert(entry);
                        }
                    }
                }
            }
            // The dropped days' entries stand in for what they carried.
            carried.clear();
            carried_entries.clear();
        }
        // The outbox keeps relayed entries until it is trimmed: one of a
        // dropped day is counted in its cell's carried balance already.
        let carried_up_to: HashMap<(u32, &str), (u64, u64)> = carried
            .iter()
            .filter_map(|((partition, cell), days)| {
                let last = days.iter().map(|day| day.last).max()?;
                Some(((*partition, cell.as_str()), last))
            })
            .collect();
        let mut not_relayed = 0;
        for entry in outbox {
            if !scope.covers(&entry) {
                continue;
            }
            if carried_up_to
                .get(&(entry.partition, entry.cell.as_str()))
                .is_some_and(|last| stream_order(&entry) <= *last)
            {
                continue;
            }
            let entry_id = entry.entry_id.clone().unwrap_or_default();
            if let std::collections::hash_map::Entry::Vacant(slot) = entries.entry(entry_id) {
                not_relayed += 1;
                slot.insert(entry);
            }
        }
        Ok(Self {
            entries,
            in_postgres,
            not_relayed,
            from_archive,
            carried,
            carried_entries,
        })
    }

    /// The PostgreSQL part of [`Ledger::read`], in the caller's snapshot.
    async fn read_postgres(postgres: &Client, scope: &Scope) -> anyhow::Result<Snapshot> {
        let (merchant, sku, location) = match scope {
            Scope::All => (None, None, None),
            Scope::Merchant(merchant) => (Some(merchant.as_str()), None, None),
            Scope::Key(key) => (
                Some(key.merchant.as_str()),
                Some(key.sku.as_str()),
                Some(key.location.as_str()),
            ),
        };
        let mut entries: HashMap<String, LedgerEntry> = HashMap::new();
        for row in postgres
            .query(
                "SELECT entry_id, entry::text FROM ledger
                 WHERE ($1::text IS NULL OR merchant = $1) AND ($2::text IS NULL OR sku = $2)
                   AND ($3::text IS NULL OR location = $3)",
                &[&merchant, &sku, &location],
            )
            .await?
        {
            let entry_id: String = row.get(0);
            let entry = LedgerEntry::parse(row.get::<_, &str>(1))
                .map_err(|error| anyhow::anyhow!("ledger entry {entry_id}: {error}"))?;
            entries.insert(entry_id, entry);
        }
        let dropped_days: Vec<time::Date> = postgres
            .query(
                "SELECT day FROM ledger_carried UNION SELECT day FROM ledger_carried_entries ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut carried_partitions = Vec::new();
        for row in postgres
            .query("SELECT DISTINCT day, partition FROM ledger_carried", &[])
            .await?
        {
            carried_partitions.push((row.get(0), u32::try_from(row.get::<_, i32>(1))?));
        }
        let mut carried: BTreeMap<(u32, String), Vec<Carried>> = BTreeMap::new();
        let mut carried_entries = Vec::new();
        for row in postgres
            .query(
                "SELECT day, partition, cell, split_part(first_entry_id, '-', 2)::bigint,
                     split_part(first_entry_id, '-', 3)::bigint, on_hand_before, reserved_before,
                     on_hand_after, reserved_after, adjusted, committed, sent, received,
                     merchant, sku, location, split_part(last_entry_id, '-', 2)::bigint,
                     split_part(last_entry_id, '-', 3)::bigint
                 FROM ledger_carried
                 WHERE ($1::text IS NULL OR merchant = $1) AND ($2::text IS NULL OR sku = $2)
                   AND ($3::text IS NULL OR location = $3)
                 ORDER BY day",
                &[&merchant, &sku, &location],
            )
            .await?
        {
            let cell = (
                u32::try_from(row.get::<_, i32>(1))?,
                row.get::<_, String>(2),
            );
            carried.entry(cell).or_default().push(Carried {
                day: row.get(0),
                key: allocator::StockKey::new(
                    row.get::<_, &str>(13),
                    row.get::<_, &str>(14),
                    row.get::<_, &str>(15),
                ),
                first: (
                    u64::try_from(row.get::<_, i64>(3))?,
                    u64::try_from(row.get::<_, i64>(4))?,
                ),
                last: (
                    u64::try_from(row.get::<_, i64>(16))?,
                    u64::try_from(row.get::<_, i64>(17))?,
                ),
                before: (row.get(5), row.get(6)),
                after: (row.get(7), row.get(8)),
                adjusted: row.get(9),
                committed: row.get(10),
                sent: row.get(11),
                received: row.get(12),
            });
        }
        for row in postgres
            .query(
                "SELECT entry_id, entry::text FROM ledger_carried_entries ORDER BY day, entry_id",
                &[],
            )
            .await?
        {
            let entry_id: String = row.get(0);
            let entry = LedgerEntry::parse(row.get::<_, &str>(1))
                .map_err(|error| anyhow::anyhow!("carried entry {entry_id}: {error}"))?;
            if scope.covers(&entry) {
                carried_entries.push(entry);
            }
        }
        Ok(Snapshot {
            entries,
            dropped_days,
            carried_partitions,
            carried,
            carried_entries,
        })
    }

    /// Each cell's entries in their true order. A cell's entries are all in
    /// one partition's stream, whose ids order them (versions can repeat:
    /// extend moves no units).
    pub fn cell_histories(&self) -> BTreeMap<(u32, String), Vec<&LedgerEntry>> {
        let mut cells: BTreeMap<(u32, String), Vec<&LedgerEntry>> = BTreeMap::new();
        for entry in self.entries.values() {
            cells
                .entry((entry.partition, entry.cell.clone()))
                .or_default()
                .push(entry);
        }
        for history in cells.values_mut() {
            history.sort_by_key(|entry| stream_order(entry));
        }
        cells
    }
}

/// Passes [`audit_settled`] makes at most, and the pause between them.
const PASSES: u32 = 3;
const PASS_PAUSE: Duration = Duration::from_secs(2);

/// [`audit`], read again while it finds drifts, up to 3 passes
/// 2 s apart; the last pass's report, and how many passes it took. On a
/// live system stock moves while the audit reads: an entry relayed and
/// trimmed from the outbox between the PostgreSQL read and the outbox
/// read is in neither, and a cell changed after its entries were read is
/// ahead of them. Such a drift is gone on the next pass; a real one
/// (entries missing, a cell written behind the ledger's back) stays.
pub async fn audit_settled(
    postgres: &Client,
    allocator: &Allocator,
    config: &config::Config,
    merchant: Option<&str>,
) -> anyhow::Result<(Report, u32)> {
    let mut passes = 1;
    loop {
        let report = audit(postgres, allocator, config, merchant).await?;
        if report.drifts.is_empty() || passes == PASSES {
            return Ok((report, passes));
        }
        passes += 1;
        tokio::time::sleep(PASS_PAUSE).await;
    }
}

/// Audits every cell (or only `merchant`'s).
pub async fn audit(
    postgres: &Client,
    allocator: &Allocator,
    config: &config::Config,
    merchant: Option<&str>,
) -> anyhow::Result<Report> {
    let scope = merchant.map_or(Scope::All, |merchant| Scope::Merchant(merchant.to_owned()));
    let ledger = Ledger::read(postgres, allocator, config, &scope, None).await?;
    let mut report = Report {
        entries_in_postgres: ledger.in_postgres,
        entries_not_relayed: ledger.not_relayed,
        ..Report::default()
    };

    let cells = ledger.cell_histories();
    #[derive(Default)]
    struct Books {
        on_hand: i64,
        adjusted: i64,
        committed: i64,
        sent: i64,
        received: i64,
    }
    let mut keys: BTreeMap<String, Books> = BTreeMap::new();
    let mut all_cells: std::collections::BTreeSet<(u32, String)> = cells.keys().cloned().collect();
    all_cells.extend(ledger.carried.keys().cloned());
    for cell_id in all_cells {
        let history = cells.get(&cell_id).map_or(&[][..], Vec::as_slice);
        let carried = ledger.carried.get(&cell_id).map_or(&[][..], Vec::as_slice);
        let (partition, cell) = cell_id;
        // The cell's chain in stream order: each dropped day's balance as
        // one link, then the entries.
        struct Link {
            order: (u64, u64),
            before: (i64, i64),
            after: (i64, i64),
            what: String,
        }
        let mut links: Vec<Link> = carried
            .iter()
            .map(|day| Link {
                order: day.first,
                before: day.before,
                after: day.after,
                what: format!(
                    "the balance carried from {}",
                    crate::archive::day_text(day.day)
                ),
            })
            .chain(history.iter().map(|entry| Link {
                order: stream_order(entry),
                before: (entry.on_hand_before, entry.reserved_before),
                after: (entry.on_hand_after, entry.reserved_after),
                what: entry.op.to_string(),
            }))
            .collect();
        links.sort_by_key(|link| link.order);
        for pair in links.windows(2) {
            if pair[0].after != pair[1].before {
                report.drifts.push(Drift {
                    subject: cell.clone(),
                    problem: format!(
                        "entries do not chain between stream ids {:?} and {:?} ({} then {})",
                        pair[0].order, pair[1].order, pair[0].what, pair[1].what
                    ),
                });
            }
        }
        let last = links
            .last()
            .expect("a cell has an entry or a carried balance");
        let live = allocator
            .cell(&CellRef {
                partition,
                id: cell.clone(),
            })
            .await?;
        let (on_hand, reserved) = last.after;
        match live {
            Some(live) if (live.on_hand, live.reserved) == (on_hand, reserved) => {}
            Some(live) => report.drifts.push(Drift {
                subject: cell.clone(),
                problem: format!(
                    "redis has on_hand {} reserved {}, the ledger says on_hand {on_hand} reserved {reserved}",
                    live.on_hand, live.reserved
                ),
            }),
            None => report.drifts.push(Drift {
                subject: cell.clone(),
                problem: format!("missing in redis; the ledger says on_hand {on_hand} reserved {reserved}"),
            }),
        }
        let key = history
            .last()
            .map(|entry| key_of(entry))
            .or_else(|| carried.last().map(|day| day.key.to_string()))
            .expect("a cell has an entry or a carried balance");
        let books = keys.entry(key).or_default();
        books.on_hand += on_hand;
        for day in carried {
            books.adjusted += day.adjusted;
            books.committed += day.committed;
            books.sent += day.sent;
            books.received += day.received;
        }
        for entry in history {
            match entry.op {
                LedgerOp::Adjust => books.adjusted += entry.qty,
                LedgerOp::Commit => books.committed += entry.qty,
                LedgerOp::TransferOut => books.sent += entry.qty,
                LedgerOp::TransferIn => books.received += entry.qty,
                _ => {}
            }
        }
        report.cells += 1;
    }
    for (key, books) in &keys {
        let in_flight = books.sent - books.received;
        if books.on_hand + in_flight != books.adjusted - books.committed {
            report.drifts.push(Drift {
                subject: key.clone(),
                problem: format!(
                    "on_hand {} + in flight {in_flight} != adjusted {} - committed {}",
                    books.on_hand, books.adjusted, books.committed
                ),
            });
        }
    }
    report.keys = keys.len();
    let now_ms = allocator.redis_time_ms().await?;
    let in_flight_max_ms =
        (config.stock.transfer_finish_after_seconds + IN_FLIGHT_GRACE_SECONDS) * 1000;
    report.drifts.extend(transfer_drifts(
        ledger.entries.values().chain(&ledger.carried_entries),
        now_ms,
        in_flight_max_ms,
    ));
    report
        .drifts
        .extend(key_drifts(ledger.entries.values(), &ledger.carried_entries));
    Ok(report)
}

/// How long past the finisher's delay a transfer may stay in flight before
/// the audit reports it (the reconciler runs every half second or so).
const IN_FLIGHT_GRACE_SECONDS: u64 = 30;

fn key_of(entry: &LedgerEntry) -> String {
    entry.key().to_string()
}

/// Every transfer's halves matched by id: one debit, at most one credit of
/// the same quantity, no credit without a debit, nothing in flight for longer
/// than `in_flight_max_ms` at Redis time `now_ms`.
pub fn transfer_drifts<'a>(
    entries: impl Iterator<Item = &'a LedgerEntry>,
    now_ms: u64,
    in_flight_max_ms: u64,
) -> Vec<Drift> {
    #[derive(Default)]
    struct Halves<'a> {
        debits: Vec<&'a LedgerEntry>,
        credits: Vec<&'a LedgerEntry>,
    }
    let mut transfers: BTreeMap<String, Halves<'a>> = BTreeMap::new();
    for entry in entries {
        let side = match entry.op {
            LedgerOp::TransferOut => true,
            LedgerOp::TransferIn => false,
            _ => continue,
        };
        let id = entry.transfer_id.clone().unwrap_or_default();
        let halves = transfers.entry(id).or_default();
        if side {
            halves.debits.push(entry);
        } else {
            halves.credits.push(entry);
        }
    }
    let mut drifts = Vec::new();
    for (id, halves) in &transfers {
        let subject = halves
            .debits
            .first()
            .or(halves.credits.first())
            .map(|entry| key_of(entry))
            .unwrap_or_default();
        let mut problem = |text: String| {
            drifts.push(Drift {
                subject: subject.clone(),
                problem: format!("transfer {id}: {text}"),
            })
        };
        match (halves.debits.as_slice(), halves.credits.as_slice()) {
            ([], credits) => problem(format!(
                "{} credit(s) of {} units without a debit: units created",
                credits.len(),
                credits.iter().map(|entry| entry.qty).sum::<i64>()
            )),
            ([debit], []) => {
                let age_ms = now_ms.saturating_sub(debit.at_ms);
                if age_ms > in_flight_max_ms {
                    problem(format!(
                        "{} units in flight for {} s (the finisher credits after {} s)",
                        debit.qty,
                        age_ms / 1000,
                        (in_flight_max_ms / 1000).saturating_sub(IN_FLIGHT_GRACE_SECONDS)
                    ));
                }
            }
            ([debit], [credit]) => {
                if debit.qty != credit.qty {
                    problem(format!(
                        "debited {} units but credited {}",
                        debit.qty, credit.qty
                    ));
                }
            }
            (debits, credits) => problem(format!(
                "{} debits and {} credits; one of each is allowed",
                debits.len(),
                credits.len()
            )),
        }
    }
    drifts
}

/// Physical facts checked against the whole key: a count of a key with
/// buckets leaves its cells holding the count; no cell takes a reservation
/// while the key's pool is short (a loss or a setting left its sellable
/// below −backorder_limit; its buckets were drained first, so the pool holds
/// every free unit then), until a pool entry shows it made good. Of the
/// entries days dropped by retention carried (`carried`), only the settings
/// count: the last one of each key says its safety stock and backorder limit
/// when its entries still in the ledger begin.
pub fn key_drifts<'a>(
    entries: impl Iterator<Item = &'a LedgerEntry>,
    carried: &[LedgerEntry],
) -> Vec<Drift> {
    let mut keys: BTreeMap<String, Vec<&'a LedgerEntry>> = BTreeMap::new();
    for entry in entries {
        keys.entry(key_of(entry)).or_default().push(entry);
    }
    let mut carried_settings: BTreeMap<String, &LedgerEntry> = BTreeMap::new();
    for entry in carried
        .iter()
        .filter(|entry| entry.op == LedgerOp::Settings)
    {
        let slot = carried_settings.entry(key_of(entry)).or_insert(entry);
        if (entry.at_ms, stream_order(entry)) > (slot.at_ms, stream_order(slot)) {
            *slot = entry;
        }
    }
    let mut drifts = Vec::new();
    for (key, mut history) in keys {
        history.sort_by_key(|entry| (entry.at_ms, stream_order(entry)));
        // Each bucket cell's on_hand as of the last entry seen so far.
        let mut buckets: BTreeMap<&str, i64> = BTreeMap::new();
        let (mut safety, mut backorder) = carried_settings.get(&key).map_or((0, 0), |entry| {
            (
                entry.safety_stock.unwrap_or_default(),
                entry.backorder_limit.unwrap_or_default(),
            )
        });
        // Redis times (ms) the pool was short: [from, until).
        let mut short: Vec<(u64, u64)> = Vec::new();
        let mut short_since: Option<u64> = None;
        for entry in &history {
            let at_ms = entry.at_ms;
            if entry.in_bucket() {
                buckets.insert(entry.cell.as_str(), entry.on_hand_after);
                continue;
            }
            if entry.op == LedgerOp::Settings {
                safety = entry.safety_stock.unwrap_or_default();
                backorder = entry.backorder_limit.unwrap_or_default();
            }
            if entry.op == LedgerOp::Adjust
                && entry.kind == Some(allocator::AdjustmentKind::Absolute)
            {
                let counted = entry.counted.unwrap_or(entry.on_hand_after);
                // Older entries, and counts that ignored the buckets, carry
                // no buckets_on_hand: what the ledger says they held then.
                let in_buckets = entry
                    .buckets_on_hand
                    .unwrap_or_else(|| buckets.values().sum());
                if entry.on_hand_after + in_buckets > counted {
                    drifts.push(Drift {
                        subject: key.clone(),
                        problem: format!(
                            "a count of {counted} left the pool {} while the buckets held {in_buckets}: units created",
                            entry.on_hand_after
                        ),
                    });
                }
            }
            let sellable = entry.on_hand_after - entry.reserved_after - safety;
            match (sellable < -backorder, short_since) {
                (true, None) => short_since = Some(at_ms),
                (false, Some(since)) => {
                    short.push((since, at_ms));
                    short_since = None;
                }
                _ => {}
            }
        }
        if let Some(since) = short_since {
            short.push((since, u64::MAX));
        }
        for entry in history.iter().filter(|entry| entry.op == LedgerOp::Reserve) {
            let at_ms = entry.at_ms;
            if let Some((since, _)) = short
                .iter()
                .find(|(from, until)| *from < at_ms && at_ms < *until)
            {
                drifts.push(Drift {
                    subject: key.clone(),
                    problem: format!(
                        "cell {} took reservation {} while the key was short (since {since} ms)",
                        entry.cell,
                        entry.reservation_id.as_deref().unwrap_or_default()
                    ),
                });
            }
        }
    }
    drifts
}

/// What the Kafka ledger topic holds (of one merchant's entries, or all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaCount {
    /// Messages read.
    pub messages: usize,
    /// Distinct entry ids among them (messages less redeliveries).
    pub distinct: usize,
}

/// Distinct entry ids in the ledger topic (only `merchant`'s entries, when
/// given), read from the beginning with a throwaway consumer group until the
/// topic is quiet for a second (or `limit` passes). Watermarks are not used:
/// offsets are not entries.
pub async fn kafka_entry_ids(
    config: &config::Config,
    merchant: Option<&str>,
    limit: Duration,
) -> anyhow::Result<KafkaCount> {
    let merchant = merchant.map(str::to_owned);
    use rdkafka::message::Message;
    let brokers = config.kafka.brokers.clone();
    let topic = config.kafka.ledger_topic.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<KafkaCount> {
        let consumer = crate::tail::throwaway_consumer(&brokers, &topic, "ledger-audit", true)?;
        let started = std::time::Instant::now();
        let mut quiet_since = std::time::Instant::now();
        let mut ids = std::collections::HashSet::new();
        let mut messages = 0;
        while started.elapsed() < limit && quiet_since.elapsed() < Duration::from_secs(1) {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    let payload: Value =
                        serde_json::from_slice(message.payload().unwrap_or_default())?;
                    let theirs = merchant
                        .as_deref()
                        .is_none_or(|merchant| payload["merchant"] == merchant);
                    if let (true, Some(id)) = (theirs, payload["entry_id"].as_str()) {
                        messages += 1;
                        ids.insert(id.to_owned());
                    }
                    quiet_since = std::time::Instant::now();
                }
                Some(Err(error)) => anyhow::bail!("reading {topic}: {error}"),
                None if ids.is_empty() && started.elapsed() < Duration::from_secs(10) => {
                    // Joining the group takes a moment before the first message.
                    quiet_since = std::time::Instant::now();
                }
                None => {}
            }
        }
        Ok(KafkaCount {
            messages,
            distinct: ids.len(),
        })
    })
    .await?
}

#[cfg(test)]
mod tests {
    use allocator::LedgerEntry;
    use serde_json::{Value, json};

    use super::{key_drifts, transfer_drifts};

    fn entry(op: &str, cell: &str, at_ms: u64, extra: Value) -> LedgerEntry {
        let mut entry = json!({
            "v": 1, "op": op, "cell": cell, "partition": 1, "merchant": "m", "sku": "s", "location": "l",
            "at_ms": at_ms, "stream_id": format!("{at_ms}-0"), "qty": 0, "version": 1, "node": "n",
            "on_hand_before": 0, "on_hand_after": 0, "reserved_before": 0, "reserved_after": 0,
        });
        for (name, value) in extra.as_object().expect("object") {
            entry[name] = value.clone();
        }
        if op == "adjust" {
            entry["source"] = json!("test");
            entry["source_event_id"] = json!("e");
            if entry.get("shortfall").is_none() {
                entry["shortfall"] = json!(false);
            }
        }
        let needs = match op {
            "reserve" | "commit" | "release" | "expire" | "extend" => Some("reservation_id"),
            "transfer_out" | "transfer_in" => Some("transfer_id"),
            _ => None,
        };
        if let Some(field) = needs
            && entry.get(field).is_none()
        {
            entry[field] = json!("x1");
        }
        LedgerEntry::from_value(entry).expect("a valid entry")
    }

    #[test]
    fn a_transfer_is_matched_by_id_one_debit_and_at_most_one_credit() {
        let debit = entry(
            "transfer_out",
            "m|s|l|pool",
            10,
            json!({ "transfer_id": "t1", "qty": 5 }),
        );
        let credit = entry(
            "transfer_in",
            "m|s|l|bucket|a",
            11,
            json!({ "transfer_id": "t1", "qty": 5 }),
        );
        assert!(transfer_drifts([&debit, &credit].into_iter(), 20, 1000).is_empty());

        // A restart re-credited it after its dedupe record was gone.
        let again = entry(
            "transfer_in",
            "m|s|l|bucket|a",
            90,
            json!({ "transfer_id": "t1", "qty": 5 }),
        );
        let drifts = transfer_drifts([&debit, &credit, &again].into_iter(), 100, 1000);
        assert_eq!(drifts.len(), 1, "{drifts:?}");
        assert_eq!(drifts[0].subject, "m/s/l");

        let orphan = entry(
            "transfer_in",
            "m|s|l|bucket|a",
            90,
            json!({ "transfer_id": "t2", "qty": 3 }),
        );
        let drifts = transfer_drifts([&orphan].into_iter(), 100, 1000);
        assert!(drifts[0].problem.contains("without a debit"), "{drifts:?}");

        // In flight past the finisher's delay.
        let drifts = transfer_drifts([&debit].into_iter(), 5000, 1000);
        assert!(drifts[0].problem.contains("in flight"), "{drifts:?}");
        assert!(transfer_drifts([&debit].into_iter(), 500, 1000).is_empty());
    }

    #[test]
    fn a_count_that_ignores_the_buckets_is_reported() {
        let bucket = entry(
            "transfer_in",
            "m|s|l|bucket|a",
            10,
            json!({ "on_hand_after": 500 }),
        );
        // The old scripts set the pool to the count and left the buckets.
        let blind = entry(
            "adjust",
            "m|s|l|pool",
            20,
            json!({ "kind": "absolute", "on_hand_after": 1040 }),
        );
        let drifts = key_drifts([&bucket, &blind].into_iter(), &[]);
        assert_eq!(drifts.len(), 1, "{drifts:?}");
        assert!(drifts[0].problem.contains("units created"), "{drifts:?}");

        let counted = entry(
            "adjust",
            "m|s|l|pool",
            20,
            json!({ "kind": "absolute", "counted": 1040, "buckets_on_hand": 500, "on_hand_after": 540 }),
        );
        assert!(key_drifts([&bucket, &counted].into_iter(), &[]).is_empty());
    }

    #[test]
    fn a_reservation_while_the_key_is_short_is_reported() {
        let loss = entry(
            "adjust",
            "m|s|l|pool",
            10,
            json!({ "kind": "delta", "shortfall": true, "on_hand_after": 1, "reserved_after": 3 }),
        );
        let sold = entry(
            "reserve",
            "m|s|l|bucket|a",
            11,
            json!({ "reservation_id": "r1" }),
        );
        let drifts = key_drifts([&loss, &sold].into_iter(), &[]);
        assert_eq!(drifts.len(), 1, "{drifts:?}");
        assert!(drifts[0].problem.contains("short"), "{drifts:?}");

        // A release of the pool's holds makes it good as well as a restock.
        let restock = entry(
            "release",
            "m|s|l|pool",
            12,
            json!({ "on_hand_after": 1, "reserved_after": 0 }),
        );
        let later = entry(
            "reserve",
            "m|s|l|bucket|a",
            13,
            json!({ "reservation_id": "r2" }),
        );
        assert_eq!(
            key_drifts([&loss, &restock, &later].into_iter(), &[]).len(),
            0
        );
    }

    #[test]
    fn a_backorder_limit_set_on_a_dropped_day_still_counts() {
        // The key allows 5 backorders: a pool at sellable -2 is not short.
        let settings = entry(
            "settings",
            "m|s|l|pool",
            5,
            json!({ "backorder_limit": 5, "safety_stock": 0 }),
        );
        let oversold = entry(
            "reserve",
            "m|s|l|pool",
            20,
            json!({ "reservation_id": "r1", "on_hand_after": 3, "reserved_after": 5 }),
        );
        let sold = entry(
            "reserve",
            "m|s|l|bucket|a",
            21,
            json!({ "reservation_id": "r2" }),
        );
        // With the settings entry carried from a dropped day: no drift;
        // without it, the audit would think the key short.
        assert!(
            key_drifts(
                [&oversold, &sold].into_iter(),
                std::slice::from_ref(&settings)
            )
            .is_empty()
        );
        assert_eq!(key_drifts([&oversold, &sold].into_iter(), &[]).len(), 1);
        // A carried transfer half is never read as the pool's level.
        let half = entry(
            "transfer_out",
            "m|s|l|pool",
            6,
            json!({ "transfer_id": "t1", "on_hand_after": -50 }),
        );
        assert!(key_drifts([&oversold, &sold].into_iter(), &[settings, half]).is_empty());
    }
}
