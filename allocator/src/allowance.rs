//! Fleet-wide customer limits of a flash sale (`customer_units_max`,
//! `customer_holds_max`): units one customer may hold or buy over the sale,
//! and holds one customer may have at once, whichever node each attempt
//! lands on.
//!
//! Owns a customer's *allowance* and its *grants*. The reservation path
//! ([`crate::Reserver`]) asks for a grant before each hold on a limited key;
//! the hold carries where its grant lives, and its end gives the grant back.
//!
//! **Design: an allowance record taken before the hold, given back on its
//! end.** One record per (sale scope, keyed hash of `customer_ref`), in the
//! partition of that pair (`lua/allowance.lua`; the clear reference is never
//! stored). Holds live elsewhere (a node's bucket, the pool: other
//! partitions, other Redis masters), so the two cannot change in one script;
//! instead every hold on a limited key is paid for by a *grant* named by the
//! hold's own reservation id, and the steps are ordered so that a crash
//! anywhere leaves the customer counted for *more*, never less, until a
//! repair gives back what provably never was held:
//!
//! 1. **take** (the allowance's partition): the grant counts `qty` units and
//!    one hold, or the request is refused 409 `customer_limit`. Taking a
//!    grant again (the same attempt run again after a takeover of its
//!    claim) counts nothing again.
//! 2. **hold** (the cell's partition): the hold records the allowance's
//!    partition. A refusal (insufficient stock, no such key) holds nothing:
//!    the caller gives the grant back at once (**give**, a compare-and-set
//!    on the grant's take number, so a caller whose claim was taken over
//!    cannot give back a grant the new caller's hold uses).
//! 3. **end**: a release, an expiry or a commit of the hold writes a note in
//!    the hold's partition (`allow|<id>`, same script, so no end is missed).
//!    The caller that released or committed settles it at once; the
//!    reconciler settles what is left (expiries, crashes). Settling gives
//!    the hold back, and the units unless it was a commit, and keeps the
//!    grant as ended, so settling twice, or the attempt running again,
//!    counts nothing.
//!
//! **Crash repair.** A taken grant is watched (`grant|<id>` in its
//! partition) until it is settled or given back. Once its caller's lease is
//! over by more than the reconciler's delay, no hold of that attempt can
//! land any more (a hold is made only before its claim's lease, less the
//! clocks' margin), so the reconciler looks the hold up:
//! * held, and paid for by this grant: looked at again when the hold ends
//!   (its end's note normally settles it first);
//! * ended: settled as it ended, whether or not its end wrote a note (a
//!   rebuild releases lost holds without one; so does a node of a release
//!   before customer limits expiring a hold during a rolling deploy);
//! * absent, or a hold this grant did not pay for (a retry that replayed a
//!   hold made before the limit was in force): given back (the same
//!   compare-and-set).
//!
//! Take numbers of a grant never repeat: a given-back grant is kept (as
//! given) and a later take counts it anew under the next number, so a stale
//! give-back cannot match a later caller's take.
//!
//! A retry that finds its hold already made (replayed) and not paid for by
//! this grant gives the grant back at once.
//!
//! **Bound.** A customer's units held or committed on the key, plus units
//! of grants taken whose holds are not made (or were refused and not yet
//! given back), never pass `customer_units_max`; likewise holds. So no
//! interleaving of nodes, retries, releases and expiries lets a customer
//! hold or buy more. The cost of that is on the other side: between a
//! hold's end and its settling (at once for a release or commit answered to
//! the caller; up to a reconciler pass for an expiry or a crash) the
//! customer is still counted.
//!
//! **Scope.** An allowance is per sale name and start (`starts_at`), so a
//! sale run again later under the same name starts everyone afresh; it is
//! kept 24 h after the sale's end (30 days after its last use, for a sale
//! with no end). Each request asks whether the limits are in force now
//! (the sale's window, on the node's clock), so the sale's first moment is
//! limited whenever the node last read its config. Only nodes with the
//! limit in their config take grants: while a config change rolls out, a
//! node still without it admits holds the allowance does not count.
//!
//! **What it cannot survive.** The allowances are Redis data with no copy
//! in the ledger: a master that loses writes (a failover without `WAIT`, a
//! restart without persistence) forgets what its customers used, and they
//! may buy up to the limit again.
//!
//! **Cost.** One script call on the allowance's master before each hold on
//! a limited key (plus a give-back for a refused one), and two calls after
//! a release or a commit of such a hold.

use std::time::Duration;

/// How old a note of an ended hold is before the reconciler settles it (the
/// caller that released or committed the hold settles it at once).
pub const NOTE_SETTLE_AFTER: Duration = Duration::from_secs(1);

use serde::Deserialize;
use serde_json::{Value, json};

use crate::keys::StockKey;
use crate::scripts::Op;
use crate::{Allocator, AllocatorError, Result, check_refusal, protocol};

/// A flash sale's customer limits, as the reservation path enforces them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerLimit {
    /// The sale's name.
    pub sale: String,
    /// The sale's key.
    pub key: StockKey,
    /// Names the allowances of this run of the sale: its name and start.
    scope: String,
    /// In force from this Unix time, ms (0: as soon as enabled).
    starts_at_ms: u64,
    /// In force until this Unix time, ms (0: no end).
    ends_at_ms: u64,
    /// Units one customer may hold or buy over the sale.
    pub units_max: Option<u32>,
    /// Holds one customer may have at once on the key.
    pub holds_max: Option<u32>,
    /// Allowances are kept 24 h past this (Unix ms; the sale's end), or past
    /// their last use if later.
    keep_until_ms: u64,
}

impl CustomerLimit {
    /// The limits of sale `sale` on `key`, starting at `starts_at_ms` (Unix
    /// ms, 0 for "when enabled") and ending at `ends_at_ms` (0 for none).
    pub fn new(
        sale: &str,
        key: StockKey,
        starts_at_ms: u64,
        ends_at_ms: u64,
        units_max: Option<u32>,
        holds_max: Option<u32>,
    ) -> Self {
        Self {
            sale: sale.to_owned(),
            key,
            scope: format!("{sale}@{starts_at_ms}"),
            starts_at_ms,
            ends_at_ms,
            units_max,
            holds_max,
            keep_until_ms: ends_at_ms,
        }
    }

    /// Whether the limits are in force at Unix time `now_ms` (the sale's
    /// window; each request asks, so a sale's first moment is limited too,
    /// whenever the node last read its config).
    pub fn in_force_at(&self, now_ms: u64) -> bool {
        now_ms >= self.starts_at_ms && (self.ends_at_ms == 0 || now_ms < self.ends_at_ms)
    }

    /// The limits of a configured sale, if it sets any and is enabled.
    pub fn from_config(sale: &config::FlashSaleConfig) -> Option<Self> {
        if !sale.enabled || (sale.customer_units_max.is_none() && sale.customer_holds_max.is_none())
        {
            return None;
        }
        let starts_at_ms = sale.starts_at.map_or(0, |at| {
            u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or_default()
        });
        let ends_at_ms = sale.ends_at.map_or(0, |at| {
            u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or_default()
        });
        Some(Self::new(
            &sale.name,
            StockKey::new(&sale.merchant, &sale.sku, &sale.location),
            starts_at_ms,
            ends_at_ms,
            sale.customer_units_max,
            sale.customer_holds_max,
        ))
    }
}

/// A grant this caller took: what a refused hold gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The allowance's partition.
    pub partition: u32,
    /// The grant's id: the id of the hold it pays for.
    pub id: String,
    /// Its take number when this caller took it.
    pub take: u64,
}

/// A customer's allowance as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Allowance {
    /// Units held or bought over the sale (with grants not yet settled).
    pub units: u64,
    /// Holds active now (likewise).
    pub holds: u64,
}

#[derive(Debug, Deserialize)]
struct Note {
    grant: String,
    allow_p: u32,
    op: String,
}

#[derive(Debug, Deserialize)]
struct Watched {
    grant: String,
    take: u64,
}

/// What one finisher pass over a partition did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AllowancesFinished {
    /// Ended holds whose grants were settled.
    pub settled: u64,
    /// Grants given back whose holds never landed.
    pub given_back: u64,
}

impl Allocator {
    /// The allowance of the customer with keyed hash `customer` under
    /// `limit`, and its partition.
    fn allowance_of(&self, limit: &CustomerLimit, customer: &str) -> (String, u32) {
        let partition =
            StockKey::new("allowance", &limit.scope, customer).partition(self.settings.partitions);
        (format!("{}|{customer}", limit.scope), partition)
    }

    /// The partition of the allowance of the customer `customer_ref` under
    /// `limit` (where its grants are watched and repaired).
    pub fn allowance_partition(&self, limit: &CustomerLimit, customer_ref: &str) -> u32 {
        self.allowance_of(limit, &self.customer_hash(customer_ref))
            .1
    }

    /// Takes a grant for hold `grant` of `qty` units (step 1 of the module
    /// docs) for the customer whose keyed hash is `customer`; `until_ms` is
    /// when the caller's claim lease ends (Redis time). The reservation path
    /// calls it; tests use it to stage a grant whose hold never comes (a
    /// crash between the two steps).
    pub async fn take_allowance(
        &self,
        limit: &CustomerLimit,
        customer: &str,
        grant: &str,
        qty: u32,
        until_ms: u64,
    ) -> Result<Grant> {
        let (allowance, partition) = self.allowance_of(limit, customer);
        let args = json!({
            "action": "take", "allowance": allowance, "grant": grant, "qty": qty,
            "until_ms": until_ms, "keep_ms": limit.keep_until_ms,
            "units_max": limit.units_max, "holds_max": limit.holds_max,
        });
        let reply = self.call(Op::Allowance, partition, args).await?;
        if reply["status"] == json!("customer_limit") {
            return Err(AllocatorError::CustomerLimit {
                sale: limit.sale.clone(),
                limit: reply["limit"].as_u64().unwrap_or_default(),
                used: reply["used"].as_u64().unwrap_or_default(),
                counts: reply["counts"].as_str().unwrap_or("units").to_owned(),
            });
        }
        check_refusal(&reply)?;
        Ok(Grant {
            partition,
            id: grant.to_owned(),
            take: reply["take"]
                .as_u64()
                .ok_or_else(|| AllocatorError::Protocol(format!("allowance take: {reply}")))?,
        })
    }

    /// Gives back a grant whose hold was refused (step 2). A failure is
    /// logged: the grant stays counted until the reconciler's repair.
    pub(crate) async fn give_allowance(&self, grant: &Grant) {
        let args = json!({ "action": "give", "grant": grant.id, "take": grant.take });
        let result = match self.call(Op::Allowance, grant.partition, args).await {
            Ok(reply) => check_refusal(&reply),
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            tracing::warn!(grant = %grant.id, %error, "cannot give back a refused hold's allowance; the reconciler will");
        }
    }

    /// Settles the end of hold `grant` (in partition `hold_partition`), paid
    /// for by the allowance in partition `allow_p` (step 3), and deletes its
    /// note. `op`: release, expire or commit.
    async fn settle_allowance(
        &self,
        hold_partition: u32,
        grant: &str,
        allow_p: u32,
        op: &str,
    ) -> Result<bool> {
        let args = json!({ "action": "settle", "grant": grant, "op": op });
        let reply = self.call(Op::Allowance, allow_p, args).await?;
        check_refusal(&reply)?;
        let args = json!({ "action": "note_done", "grant": grant });
        check_refusal(&self.call(Op::Allowance, hold_partition, args).await?)?;
        Ok(reply["settled"] == json!(true))
    }

    /// After a release or commit reply (a reservation view): settles its
    /// allowance at once when the hold had one. A failure is logged; the
    /// reconciler settles it later.
    pub(crate) async fn settle_after(&self, hold_partition: u32, reply: &Value) {
        let Some(allow_p) = reply["allow_p"].as_u64() else {
            return;
        };
        let op = match reply["status"].as_str() {
            Some("released") => "release",
            Some("expired") => "expire",
            Some("committed") => "commit",
            _ => return,
        };
        let Some(grant) = reply["reservation_id"].as_str() else {
            return;
        };
        if let Err(error) = self
            .settle_allowance(hold_partition, grant, allow_p as u32, op)
            .await
        {
            tracing::warn!(grant, %error, "cannot settle a hold's allowance now; the reconciler will");
        }
    }

    /// A customer's allowance under `limit` (by its clear reference: it is
    /// hashed here).
    pub async fn customer_allowance(
        &self,
        limit: &CustomerLimit,
        customer_ref: &str,
    ) -> Result<Allowance> {
        let (allowance, partition) = self.allowance_of(limit, &self.customer_hash(customer_ref));
        let args = json!({ "action": "read", "allowance": allowance });
        let reply = self.call(Op::Allowance, partition, args).await?;
        check_refusal(&reply)?;
        serde_json::from_value(reply).map_err(protocol)
    }

    /// Settles the notes of `partition`'s ended holds written at least
    /// [`NOTE_SETTLE_AFTER`] ago, and repairs its grants whose caller's
    /// lease ended at least `repair_after` ago (never less than twice
    /// [`crate::CLAIM_CLOCK_MARGIN`]; see the module docs). Idempotent, safe
    /// on several reconcilers at once.
    pub async fn finish_allowances(
        &self,
        partition: u32,
        repair_after: Duration,
    ) -> Result<AllowancesFinished> {
        let mut failed = Vec::new();
        let finished = self
            .finish_allowances_reporting(partition, repair_after, &|_| false, &mut failed)
            .await?;
        match failed.into_iter().next() {
            Some((_, error)) => Err(error),
            None => Ok(finished),
        }
    }

    /// [`Allocator::finish_allowances`] for the reconciler: items `skip`
    /// names (`note:<grant>`, `grant:<grant>`) are left alone, and one that
    /// cannot be finished is reported in `failed` under that name while the
    /// others go on. Only an unreachable store stops it.
    pub async fn finish_allowances_reporting(
        &self,
        partition: u32,
        repair_after: Duration,
        skip: &(dyn Fn(&str) -> bool + Sync),
        failed: &mut Vec<(String, AllocatorError)>,
    ) -> Result<AllowancesFinished> {
        let repair_after = repair_after.max(crate::CLAIM_CLOCK_MARGIN * 2);
        let mut cursor = "0".to_owned();
        let mut finished = AllowancesFinished::default();
        loop {
            let args = json!({
                "older_than_ms": NOTE_SETTLE_AFTER.as_millis() as u64,
                "grants_older_than_ms": repair_after.as_millis() as u64,
                "limit": 200, "cursor": cursor,
            });
            let reply = self.call(Op::PendingTransfers, partition, args).await?;
            check_refusal(&reply)?;
            // Each item on its own: one that cannot be read or finished is
            // reported and the others go on.
            for raw in crate::hot::list::<Value>(&reply["notes"])? {
                let id = format!("note:{}", raw["grant"].as_str().unwrap_or_default());
                if skip(&id) {
                    continue;
                }
                let settled = match serde_json::from_value::<Note>(raw) {
                    Ok(note) => {
                        self.settle_allowance(partition, &note.grant, note.allow_p, &note.op)
                            .await
                    }
                    Err(error) => Err(protocol(error)),
                };
                match settled {
                    Ok(settled) => finished.settled += u64::from(settled),
                    Err(error @ AllocatorError::StoreUnavailable(_)) => return Err(error),
                    Err(error) => failed.push((id, error)),
                }
            }
            for raw in crate::hot::list::<Value>(&reply["grants"])? {
                let id = format!("grant:{}", raw["grant"].as_str().unwrap_or_default());
                if skip(&id) {
                    continue;
                }
                let repaired = match serde_json::from_value::<Watched>(raw) {
                    Ok(watched) => self.repair_grant(partition, &watched).await,
                    Err(error) => Err(protocol(error)),
                };
                match repaired {
                    Ok(given) => finished.given_back += u64::from(given),
                    Err(error @ AllocatorError::StoreUnavailable(_)) => return Err(error),
                    Err(error) => failed.push((id, error)),
                }
            }
            cursor = reply["cursor"].as_str().unwrap_or("0").to_owned();
            if cursor == "0" {
                return Ok(finished);
            }
        }
    }

    /// A watched grant whose caller's lease (or whose hold's end) is long
    /// past: a hold that paid with it and is still held is looked at again
    /// when it ends; one that ended is settled as it ended (also when its end
    /// wrote no note: a rebuild that released it, or a node of an older
    /// release that expired it); none (never landed, gone, or a hold that
    /// this grant did not pay for) gives it back. True if given back.
    async fn repair_grant(&self, partition: u32, watched: &Watched) -> Result<bool> {
        let found = match self.reservation(None, &watched.grant).await {
            Ok(reservation) if reservation.allow_p == Some(partition) => Some(reservation),
            Ok(_) | Err(AllocatorError::NotFound) => None,
            Err(error) => return Err(error),
        };
        let Some(reservation) = found else {
            let args = json!({ "action": "give", "grant": watched.grant, "take": watched.take });
            let reply = self.call(Op::Allowance, partition, args).await?;
            check_refusal(&reply)?;
            return Ok(reply["given"] == json!(true));
        };
        let op = match reservation.status {
            crate::ReservationStatus::Held => {
                let args = json!({
                    "action": "confirm", "grant": watched.grant, "take": watched.take,
                    "check_at_ms": reservation.hold_until_ms,
                });
                check_refusal(&self.call(Op::Allowance, partition, args).await?)?;
                return Ok(false);
            }
            crate::ReservationStatus::Released => "release",
            crate::ReservationStatus::Expired => "expire",
            crate::ReservationStatus::Committed => "commit",
        };
        let hold_partition = self.reservation_partition(&watched.grant)?;
        self.settle_allowance(hold_partition, &watched.grant, partition, op)
            .await?;
        Ok(false)
    }
}
