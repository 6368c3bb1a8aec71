//! Transfers between cells and the flash-sale buckets built on them.
//!
//! Owns moving units between cells in different partitions (debit the source
//! with a transfer id, then credit the destination idempotently by that id),
//! and the hot-SKU operations on top: activation (pre-split), refill, reclaim,
//! heartbeats, and finishing transfers a crash left half done. It does not
//! decide when a sale starts or which node serves a request: the gateway and
//! the reconciler do, from the config.
//!
//! Refill chunks follow the node's recent reservation rate as the node itself
//! measured it ([`RateMeter`]): sizing a chunk is a heuristic, not a stock
//! decision, so it may use the node's clock; whether units exist to move is
//! still decided inside the scripts, on Redis time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::keys::{self, CellRef, StockKey};
use crate::reserve::HoldRequest;
use crate::scripts::Op;
use crate::{Allocator, AllocatorError, Cell, Hold, Result, check_refusal, protocol};
use tracing::warn;

/// Most refill rounds one hot reservation makes; each round that finds no
/// units anywhere ends it sooner.
const HOT_ATTEMPTS_MAX: usize = 32;

/// Double reads a stable view tries before settling for the last one.
const STABLE_VIEW_ROUNDS: usize = 4;

/// Pause before looking again when units are in flight between cells.
const IN_FLIGHT_WAIT: Duration = Duration::from_millis(1);

/// How many seconds of a node's recent demand one refill aims to cover.
pub const REFILL_HORIZON_SECONDS: f64 = 1.0;

/// A hot stock key in flash-sale mode, as the allocator needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct FlashSale {
    /// The sale's name (from config); part of activation transfer ids.
    pub name: String,
    /// The hot stock key.
    pub key: StockKey,
    /// Nodes that get a bucket.
    pub nodes: Vec<String>,
    /// Share of the pool's sellable split into buckets on activation.
    pub presplit_fraction: f64,
    /// Smallest refill.
    pub refill_chunk_units_min: u64,
    /// Largest refill.
    pub refill_chunk_units_max: u64,
    /// Where the key's pool records its nodes' buckets (node → partition),
    /// as [`Allocator::place`] last read it: a bucket the pool lists stays
    /// where it is, whatever the node order of this sale.
    pub buckets: BTreeMap<String, u32>,
}

impl FlashSale {
    /// The allocator's view of a configured sale.
    pub fn from_config(sale: &config::FlashSaleConfig) -> Self {
        Self {
            name: sale.name.clone(),
            key: StockKey::new(&sale.merchant, &sale.sku, &sale.location),
            nodes: sale.nodes.clone(),
            presplit_fraction: sale.presplit_fraction,
            refill_chunk_units_min: sale.refill_chunk_units_min,
            refill_chunk_units_max: sale.refill_chunk_units_max,
            buckets: BTreeMap::new(),
        }
    }

    /// Node `node`'s bucket: where the pool records it, else where
    /// [`StockKey::bucket`] places it for this sale's nodes.
    pub fn bucket(&self, node: &str, partitions: u32) -> CellRef {
        match self.buckets.get(node) {
            Some(&partition) => self.key.bucket_in(node, partition),
            None => self.key.bucket(node, &self.nodes, partitions),
        }
    }

    /// Units one refill asks for at `units_per_second` of recent demand.
    pub fn refill_chunk(&self, units_per_second: f64) -> u64 {
        let wanted = (units_per_second.max(0.0) * REFILL_HORIZON_SECONDS).ceil() as u64;
        wanted.clamp(self.refill_chunk_units_min, self.refill_chunk_units_max)
    }
}

/// A transfer the source partition recorded as debited and not yet credited.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PendingTransfer {
    /// Its id.
    pub transfer_id: String,
    /// Units debited.
    pub qty: u64,
    /// Source cell id.
    pub from_cell: String,
    /// Destination cell id.
    pub to_cell: String,
    /// Destination partition.
    pub to_partition: u32,
    /// Merchant of the stock key.
    pub merchant: String,
    /// SKU of the stock key.
    pub sku: String,
    /// Location of the stock key.
    pub location: String,
    /// `pool` or `bucket`.
    pub to_kind: String,
    /// The node of a bucket destination.
    #[serde(default)]
    pub to_node: Option<String>,
    /// Why it was made (`activate`, `refill`, `reclaim`, `drain`).
    #[serde(default)]
    pub reason: Option<String>,
    /// Redis time of the debit: the credit is refused past the credit window.
    pub debited_at_ms: u64,
    /// The source pool's drain epoch at the debit (none from a bucket).
    #[serde(default)]
    pub epoch: Option<u64>,
}

/// What a debit recorded, which its credit must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debit {
    /// Units debited.
    pub qty: u64,
    /// Redis time of the debit.
    pub debited_at_ms: u64,
    /// The source pool's drain epoch at the debit.
    pub epoch: Option<u64>,
    /// Nothing moved because the source pool's buckets are being drained.
    pub draining: bool,
}

/// What a drain of a key's buckets found and did ([`Allocator::drain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// The drain lease's epoch (the pool's); adjustments inside it carry it.
    pub epoch: u64,
    /// Free units taken back from the buckets to the pool.
    pub moved: u64,
    /// What the fenced buckets still hold (held units only, plus what a
    /// release freed since), read when nothing was in flight.
    pub buckets_on_hand: i64,
}

/// How long a drain holds the key's lease: the pool lends nothing meanwhile.
const DRAIN_LEASE: Duration = Duration::from_millis(2000);

/// How often a drain that finds the lease taken tries again, and how long.
const DRAIN_BUSY_PAUSE: Duration = Duration::from_millis(5);
const DRAIN_BUSY_TRIES: usize = 600;

/// Rounds of finishing in-flight transfers a drain makes before giving up.
const DRAIN_SETTLE_ROUNDS: usize = 20;

/// The cells of a stock key with their sellable units: the pool, and in a
/// flash sale one bucket per node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockView {
    /// The pool cell, if the key exists.
    pub pool: Option<Cell>,
    /// `(node, bucket)` for every node of the sale that has a bucket.
    pub buckets: Vec<(String, Cell)>,
}

impl StockView {
    /// Units every cell of the key holds (physical units, pool and buckets).
    pub fn on_hand(&self) -> i64 {
        self.pool.as_ref().map_or(0, |pool| pool.on_hand)
            + self
                .buckets
                .iter()
                .map(|(_, bucket)| bucket.on_hand)
                .sum::<i64>()
    }

    /// Sellable units of the whole key: the pool plus every bucket's free units.
    pub fn sellable(&self) -> i64 {
        let pool = self.pool.as_ref().map_or(0, Cell::sellable);
        pool + self
            .buckets
            .iter()
            .map(|(_, bucket)| bucket.sellable().max(0))
            .sum::<i64>()
    }

    /// Units debited from one of these cells and not yet known credited.
    pub fn in_flight(&self) -> i64 {
        self.pool.iter().map(|pool| pool.out_in_flight).sum::<i64>()
            + self
                .buckets
                .iter()
                .map(|(_, bucket)| bucket.out_in_flight)
                .sum::<i64>()
    }
}

/// Exponentially weighted reservation rate of one node for one key, in units
/// per second, measured on the node's clock.
#[derive(Debug)]
pub struct RateMeter {
    /// Units counted since `window_start`.
    units_in_window: AtomicU64,
    /// Start of the current window and the last smoothed rate (f64 bits).
    state: std::sync::Mutex<(Instant, f64)>,
}

impl Default for RateMeter {
    fn default() -> Self {
        Self {
            units_in_window: AtomicU64::new(0),
            state: std::sync::Mutex::new((Instant::now(), 0.0)),
        }
    }
}

impl RateMeter {
    /// Window over which units are counted before they are folded in.
    const WINDOW: Duration = Duration::from_millis(250);

    /// Counts `units` reserved now.
    pub fn record(&self, units: u64) {
        self.units_in_window.fetch_add(units, Ordering::Relaxed);
    }

    /// The smoothed rate, folding in the window if it is complete.
    pub fn units_per_second(&self) -> f64 {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = state.0.elapsed();
        let units = self.units_in_window.load(Ordering::Relaxed) as f64;
        if elapsed >= Self::WINDOW {
            let window_rate = units / elapsed.as_secs_f64();
            state.1 = if state.1 == 0.0 {
                window_rate
            } else {
                0.5 * state.1 + 0.5 * window_rate
            };
            state.0 = Instant::now();
            self.units_in_window.store(0, Ordering::Relaxed);
            state.1
        } else {
            state.1.max(units / Self::WINDOW.as_secs_f64())
        }
    }
}

/// What one node's hot path answered for one sale, counted where it
/// answers: the gateway serves the counts as per-sale metrics. A refusal
/// made while the key still had enough sellable units for the request (a
/// fairness fault an operator must see: a customer told "sold out" while
/// units remained in the pool or another node's bucket) is counted apart,
/// and among the refusals. Answers replayed from a request's stored claim
/// never reach the hot path and are not counted here (the gateway's
/// `reservations_total{outcome="replayed"}` has them).
#[derive(Debug, Default)]
pub struct HotOutcomes {
    held: AtomicU64,
    insufficient: AtomicU64,
    insufficient_with_units_left: AtomicU64,
}

/// A reading of [`HotOutcomes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HotOutcomeCounts {
    /// New holds.
    pub held: u64,
    /// Refusals for insufficient stock, those with units left included.
    pub insufficient: u64,
    /// Refusals made while a read of the key right after still showed at
    /// least the request's units sellable (the hot path ran out of rounds: a
    /// drain holding the key, or contention).
    pub insufficient_with_units_left: u64,
}

impl HotOutcomes {
    /// Counts one hold (a replayed one is not a new hold).
    pub(crate) fn record_hold(&self, hold: &Hold) {
        if !hold.replayed {
            self.held.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one refusal, and whether units were left.
    fn record_refusal(&self, units_left: bool) {
        // The subset first: a scrape between the two never shows more
        // refusals with units left than refusals.
        self.insufficient.fetch_add(1, Ordering::Relaxed);
        if units_left {
            self.insufficient_with_units_left
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> HotOutcomeCounts {
        // Read the subset first for the same reason.
        let insufficient_with_units_left =
            self.insufficient_with_units_left.load(Ordering::Relaxed);
        HotOutcomeCounts {
            held: self.held.load(Ordering::Relaxed),
            insufficient: self.insufficient.load(Ordering::Relaxed),
            insufficient_with_units_left,
        }
    }
}

/// A process-unique suffix for transfer ids of refills and reclaims.
pub(crate) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or_default();
    format!(
        "{nanos:x}.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn hot_key_member(key: &StockKey) -> String {
    format!("{}|{}|{}", key.merchant, key.sku, key.location)
}

/// `done`, or the first of the per-item `failed` (the plain, not reporting,
/// forms of the finishers).
pub(crate) fn first_failure(done: u64, failed: Vec<(String, AllocatorError)>) -> Result<u64> {
    match failed.into_iter().next() {
        Some((_, error)) => Err(error),
        None => Ok(done),
    }
}

/// Lua's cjson writes an empty list as `{}`: read either as a list.
pub(crate) fn list<T: serde::de::DeserializeOwned>(value: &Value) -> Result<Vec<T>> {
    match value {
        Value::Object(map) if map.is_empty() => Ok(Vec::new()),
        Value::Null => Ok(Vec::new()),
        other => serde_json::from_value(other.clone()).map_err(protocol),
    }
}

/// One movement of units between two cells of a stock key (the parts both
/// halves of a transfer and its finisher share).
#[derive(Debug, Clone, Copy)]
pub struct Transfer<'a> {
    /// Unique for ever: a reused id is a replay.
    pub id: &'a str,
    /// The stock key both cells belong to.
    pub key: &'a StockKey,
    /// The cell debited.
    pub from: &'a CellRef,
    /// The cell credited.
    pub to: &'a CellRef,
    /// The node of a bucket destination; `None` for the pool.
    pub to_node: Option<&'a str>,
    /// Why (`activate`, `refill`, `reclaim`), written into the ledger.
    pub reason: &'a str,
}

impl Transfer<'_> {
    fn args(&self, qty: u64) -> Value {
        json!({
            "transfer_id": self.id, "from_cell": self.from.id, "to_cell": self.to.id,
            "to_partition": self.to.partition,
            "to_kind": if self.to_node.is_some() { "bucket" } else { "pool" },
            "to_node": self.to_node, "qty": qty, "reason": self.reason,
            "merchant": self.key.merchant, "sku": self.key.sku, "location": self.key.location,
        })
    }
}

fn debit_of(reply: &Value) -> Result<Debit> {
    let qty = reply["qty"]
        .as_u64()
        .ok_or_else(|| AllocatorError::Protocol(format!("debit reply: {reply}")))?;
    Ok(Debit {
        qty,
        debited_at_ms: reply["debited_at_ms"].as_u64().unwrap_or_default(),
        epoch: reply["epoch"].as_u64(),
        draining: reply["why"] == json!("draining"),
    })
}

impl Allocator {
    /// Moves up to `qty` sellable units of `transfer.from` (exactly `qty` or
    /// nothing when `exact`) to `transfer.to`; returns the units moved. A
    /// crash between the debit and the credit leaves the transfer for
    /// [`Allocator::finish_transfers`].
    pub async fn transfer(&self, transfer: &Transfer<'_>, qty: u64, exact: bool) -> Result<u64> {
        let debit = self.transfer_out(transfer, qty, exact).await?;
        self.complete(transfer, &debit).await?;
        Ok(debit.qty)
    }

    /// Credits a debit and marks it done at its source.
    async fn complete(&self, transfer: &Transfer<'_>, debit: &Debit) -> Result<()> {
        if debit.qty > 0 {
            self.transfer_in(transfer, debit).await?;
            self.transfer_done(transfer.from.partition, transfer.id)
                .await?;
        }
        Ok(())
    }

    /// The debit half of a transfer (public so tests can stage a crash after
    /// it). Moves nothing (qty 0) from a pool whose buckets are being drained
    /// or from a fenced bucket.
    pub async fn transfer_out(
        &self,
        transfer: &Transfer<'_>,
        qty: u64,
        exact: bool,
    ) -> Result<Debit> {
        let mut args = transfer.args(qty);
        args["exact"] = json!(exact);
        let reply = self
            .call(Op::TransferOut, transfer.from.partition, args)
            .await?;
        if reply["status"] == json!("insufficient_stock") {
            return Err(AllocatorError::InsufficientStock {
                lines: vec![crate::ShortLine::at(
                    transfer.key,
                    qty.min(u64::from(u32::MAX)) as u32,
                    reply["available"].as_i64().unwrap_or_default(),
                )],
            });
        }
        check_refusal(&reply)?;
        debit_of(&reply)
    }

    /// The credit half; returns false when the transfer was credited before.
    /// A credit past the credit window is not made: within the credit
    /// records' life it is voided and its units return to its source (so a
    /// count never waits on it for ever); later still it is refused
    /// ([`AllocatorError::Conflict`]) and stays in flight for an operator,
    /// the audit shows it.
    async fn transfer_in(&self, transfer: &Transfer<'_>, debit: &Debit) -> Result<bool> {
        let mut args = transfer.args(debit.qty);
        args["debited_at_ms"] = json!(debit.debited_at_ms);
        args["epoch"] = json!(debit.epoch);
        let reply = self
            .call(Op::TransferIn, transfer.to.partition, args)
            .await?;
        if reply["status"] == json!("void") {
            // It can never be credited there now: its source takes it back.
            let args = json!({ "transfer_id": transfer.id, "void": true });
            check_refusal(
                &self
                    .call(Op::TransferDone, transfer.from.partition, args)
                    .await?,
            )?;
            return Ok(false);
        }
        if reply["status"] == json!("too_old") {
            return Err(AllocatorError::Conflict(format!(
                "transfer {} was debited too long ago to be credited safely",
                transfer.id
            )));
        }
        check_refusal(&reply)?;
        Ok(reply["replayed"] != json!(true))
    }

    async fn transfer_done(&self, partition: u32, transfer_id: &str) -> Result<()> {
        let reply = self
            .call(
                Op::TransferDone,
                partition,
                json!({ "transfer_id": transfer_id }),
            )
            .await?;
        check_refusal(&reply)
    }

    /// Credits every transfer of `partition` debited at least `older_than` ago
    /// and not credited (the process that debited it died). Safe to run on
    /// several reconcilers at once: each transfer is credited once. Returns how
    /// many this call credited; a transfer that cannot be credited is reported
    /// in `failed` with its id and the error, and the others go on.
    pub async fn finish_transfers(&self, partition: u32, older_than: Duration) -> Result<u64> {
        let mut failed = Vec::new();
        let credited = self
            .finish_transfers_reporting(partition, older_than, &|_| false, &mut failed)
            .await?;
        first_failure(credited, failed)
    }

    /// [`Allocator::finish_transfers`] that leaves alone the transfers `skip`
    /// names (backing off) and records per-transfer failures in `failed`
    /// instead of stopping at the first (the reconciler's form).
    pub async fn finish_transfers_reporting(
        &self,
        partition: u32,
        older_than: Duration,
        skip: &(dyn Fn(&str) -> bool + Sync),
        failed: &mut Vec<(String, AllocatorError)>,
    ) -> Result<u64> {
        let mut cursor = "0".to_owned();
        let mut credited = 0;
        loop {
            let args = json!({
                "older_than_ms": older_than.as_millis() as u64, "limit": 200, "cursor": cursor,
            });
            let reply = self.call(Op::PendingTransfers, partition, args).await?;
            check_refusal(&reply)?;
            for pending in list::<PendingTransfer>(&reply["transfers"])? {
                if skip(&pending.transfer_id) {
                    continue;
                }
                let key = StockKey::new(&pending.merchant, &pending.sku, &pending.location);
                let from = CellRef {
                    partition,
                    id: pending.from_cell.clone(),
                };
                let to = CellRef {
                    partition: pending.to_partition,
                    id: pending.to_cell.clone(),
                };
                let reason = pending.reason.as_deref().unwrap_or("finish");
                let transfer = Transfer {
                    id: &pending.transfer_id,
                    key: &key,
                    from: &from,
                    to: &to,
                    to_node: pending.to_node.as_deref(),
                    reason,
                };
                let debit = Debit {
                    qty: pending.qty,
                    debited_at_ms: pending.debited_at_ms,
                    epoch: pending.epoch,
                    draining: false,
                };
                match self.transfer_in(&transfer, &debit).await {
                    Ok(fresh) => {
                        credited += u64::from(fresh);
                        if let Err(error) =
                            self.transfer_done(partition, &pending.transfer_id).await
                        {
                            failed.push((pending.transfer_id.clone(), error));
                        }
                    }
                    Err(error @ AllocatorError::StoreUnavailable(_)) => return Err(error),
                    Err(error) => failed.push((pending.transfer_id.clone(), error)),
                }
            }
            cursor = reply["cursor"].as_str().unwrap_or("0").to_owned();
            if cursor == "0" {
                return Ok(credited);
            }
        }
    }

    /// Reads where the key's pool records its buckets into `sale.buckets`,
    /// so the sale's nodes find the buckets an earlier sale over other nodes
    /// left (call it before [`Allocator::activate`]; a bucket placed
    /// elsewhere than the pool records is refused by the scripts). A key
    /// with no pool yet keeps the sale's own placement.
    pub async fn place(&self, sale: &mut FlashSale) -> Result<()> {
        let pool = self.cell(&sale.key.pool(self.settings.partitions)).await?;
        sale.buckets = pool.map(|pool| pool.buckets).unwrap_or_default();
        Ok(())
    }

    /// Pre-splits `presplit_fraction` of the pool's sellable units across the
    /// sale's nodes' buckets, decided in one script call. Idempotent per
    /// `epoch` (one activation of the sale): a second call moves nothing more,
    /// answers the first split, and credits only the shares whose debits are
    /// still waiting for their credit, so a replay at any later time never
    /// credits what was not debited. While the key's buckets are being
    /// drained it is refused with [`AllocatorError::Conflict`] (try later).
    pub async fn activate(&self, sale: &FlashSale, epoch: &str) -> Result<Vec<(String, u64)>> {
        let pool = sale.key.pool(self.settings.partitions);
        let targets: Vec<Value> = sale
            .nodes
            .iter()
            .map(|node| {
                let bucket = sale.bucket(node, self.settings.partitions);
                json!({ "node": node, "to_cell": bucket.id, "to_partition": bucket.partition })
            })
            .collect();
        let args = json!({
            "action": "split",
            "sale": sale.name, "epoch": epoch, "from_cell": pool.id,
            "fraction": sale.presplit_fraction, "targets": targets,
            "merchant": sale.key.merchant, "sku": sale.key.sku, "location": sale.key.location,
        });
        // Registered before the split: a key with buckets is always found.
        self.register_hot_key(&sale.key).await?;
        let reply = self.call(Op::Activate, pool.partition, args).await?;
        if reply["status"] == json!("draining") {
            return Err(AllocatorError::Conflict(
                "the key's buckets are being drained; activate later".to_owned(),
            ));
        }
        check_refusal(&reply)?;
        #[derive(Deserialize)]
        struct Share {
            node: String,
            qty: u64,
            transfer_id: String,
            /// Where the debit sent it (a replay credits there, whatever
            /// this sale's placement says now); every pending share has it.
            #[serde(default)]
            to_partition: Option<u32>,
            #[serde(default)]
            pending: bool,
            #[serde(default)]
            debited_at_ms: u64,
            #[serde(default)]
            epoch: Option<u64>,
        }
        let split: Vec<Share> = list(&reply["split"])?;
        for share in split.iter().filter(|share| share.pending && share.qty > 0) {
            let partition = share.to_partition.ok_or_else(|| {
                AllocatorError::Protocol(format!("activation share without its partition: {reply}"))
            })?;
            let bucket = sale.key.bucket_in(&share.node, partition);
            let transfer = Transfer {
                id: &share.transfer_id,
                key: &sale.key,
                from: &pool,
                to: &bucket,
                to_node: Some(&share.node),
                reason: "activate",
            };
            let debit = Debit {
                qty: share.qty,
                debited_at_ms: share.debited_at_ms,
                epoch: share.epoch,
                draining: false,
            };
            self.complete(&transfer, &debit).await?;
        }
        Ok(split
            .into_iter()
            .map(|share| (share.node, share.qty))
            .collect())
    }

    /// Forgets a sale's activation (the sale ended here): switching the same
    /// sale on again later splits anew, with new transfer ids.
    pub async fn end_activation(&self, sale: &FlashSale, epoch: &str) -> Result<()> {
        let pool = sale.key.pool(self.settings.partitions);
        let args =
            json!({ "action": "end", "sale": sale.name, "epoch": epoch, "from_cell": pool.id });
        check_refusal(&self.call(Op::Activate, pool.partition, args).await?)
    }

    /// Moves a chunk sized from `units_per_second` from the pool to `node`'s
    /// bucket; returns the units moved (0 when the pool has none to lend, or
    /// is being drained).
    pub async fn refill(&self, sale: &FlashSale, node: &str, units_per_second: f64) -> Result<u64> {
        let bucket = sale.bucket(node, self.settings.partitions);
        Ok(self
            .refill_debit(sale, node, &bucket, units_per_second)
            .await?
            .0)
    }

    /// [`Allocator::refill`], also saying whether the pool lent nothing
    /// because its buckets are being drained.
    async fn refill_debit(
        &self,
        sale: &FlashSale,
        node: &str,
        bucket: &CellRef,
        units_per_second: f64,
    ) -> Result<(u64, bool)> {
        self.register_hot_key(&sale.key).await?;
        let pool = sale.key.pool(self.settings.partitions);
        let chunk = sale.refill_chunk(units_per_second);
        let transfer_id = format!("refill.{node}.{}", unique_suffix());
        let transfer = Transfer {
            id: &transfer_id,
            key: &sale.key,
            from: &pool,
            to: bucket,
            to_node: Some(node),
            reason: "refill",
        };
        let debit = self.transfer_out(&transfer, chunk, false).await?;
        self.complete(&transfer, &debit).await?;
        Ok((debit.qty, debit.draining))
    }

    /// Takes `node`'s unreserved bucket units back to the pool through a
    /// drain (the bucket is fenced until a refill reopens it); returns the
    /// units moved. Held units stay until their holds end.
    /// A bucket with nothing free is left alone (no drain, no fence); when
    /// another drain holds the key's lease this waits for it unless
    /// `wait` is false, then it answers 0 (that drain moves the units).
    pub async fn reclaim(&self, sale: &FlashSale, node: &str) -> Result<u64> {
        self.reclaim_waiting(sale, node, true).await
    }

    /// [`Allocator::reclaim`] that answers 0 at once, not waiting, when
    /// another drain holds the key's lease (the reconciler's form: one busy
    /// key must not hold up the others).
    pub async fn try_reclaim(&self, sale: &FlashSale, node: &str) -> Result<u64> {
        self.reclaim_waiting(sale, node, false).await
    }

    async fn reclaim_waiting(&self, sale: &FlashSale, node: &str, wait: bool) -> Result<u64> {
        // The pool's record, not this sale's placement: the reconciler
        // reclaims buckets of sales that are gone from the config.
        let pool = self.cell(&sale.key.pool(self.settings.partitions)).await?;
        let Some(&partition) = pool.as_ref().and_then(|pool| pool.buckets.get(node)) else {
            return Ok(0);
        };
        let bucket = sale.key.bucket_in(node, partition);
        match self.cell(&bucket).await? {
            Some(cell) if cell.sellable() > 0 => {}
            _ => return Ok(0),
        }
        let drained = match self.drain_with(&sale.key, Some(node), false, wait).await {
            Err(AllocatorError::NotFound) => return Ok(0),
            Err(AllocatorError::Conflict(_)) if !wait => return Ok(0),
            other => other?,
        };
        self.end_drain(&sale.key, drained.epoch).await?;
        Ok(drained.moved)
    }

    /// Takes every bucket of `key` back (the buckets the pool lists, or only
    /// `node`'s): takes the key's drain lease (the pool lends nothing while
    /// it lasts), fences each bucket (it sells nothing until a refill made
    /// after the drain reaches it) and moves its free units to the pool.
    /// With `settle`, it then finishes every transfer still in flight between
    /// the key's cells and reads what the buckets still hold at an instant
    /// when nothing was in flight, for a count to be applied against.
    ///
    /// The lease stays with the caller: an adjustment passes the epoch (and
    /// ends it); anyone else calls [`Allocator::end_drain`].
    pub async fn drain(&self, key: &StockKey, node: Option<&str>, settle: bool) -> Result<Drained> {
        self.drain_with(key, node, settle, true).await
    }

    /// [`Allocator::drain`]; without `wait`, a lease held by another drain
    /// is answered at once with [`AllocatorError::Conflict`].
    async fn drain_with(
        &self,
        key: &StockKey,
        node: Option<&str>,
        settle: bool,
        wait: bool,
    ) -> Result<Drained> {
        let pool = key.pool(self.settings.partitions);
        let begin = json!({ "action": "begin", "cell": pool.id, "lease_ms": DRAIN_LEASE.as_millis() as u64 });
        let mut reply = self.call(Op::Drain, pool.partition, begin.clone()).await?;
        let tries = if wait { DRAIN_BUSY_TRIES } else { 0 };
        for _ in 0..tries {
            if reply["status"] != json!("busy") {
                break;
            }
            tokio::time::sleep(DRAIN_BUSY_PAUSE).await;
            reply = self.call(Op::Drain, pool.partition, begin.clone()).await?;
        }
        if reply["status"] == json!("busy") {
            let why = format!("{key} is being drained by another caller");
            return Err(if wait {
                AllocatorError::StoreUnavailable(why)
            } else {
                AllocatorError::Conflict(why)
            });
        }
        check_refusal(&reply)?;
        let epoch = reply["epoch"]
            .as_u64()
            .ok_or_else(|| AllocatorError::Protocol(format!("drain reply: {reply}")))?;
        let buckets: std::collections::BTreeMap<String, u32> =
            serde_json::from_value(match &reply["buckets"] {
                Value::Object(_) => reply["buckets"].clone(),
                _ => json!({}),
            })
            .map_err(protocol)?;
        let mut moved = 0;
        for (bucket_node, partition) in &buckets {
            if node.is_some_and(|only| only != bucket_node) {
                continue;
            }
            let bucket = key.bucket_in(bucket_node, *partition);
            let transfer_id = format!("drain.{bucket_node}.{}", unique_suffix());
            let transfer = Transfer {
                id: &transfer_id,
                key,
                from: &bucket,
                to: &pool,
                to_node: None,
                reason: "drain",
            };
            let mut args = transfer.args(0);
            args["epoch"] = json!(epoch);
            args["bucket_node"] = json!(bucket_node);
            let reply = self.call(Op::Fence, bucket.partition, args).await?;
            if reply["status"] == json!("fenced_out") {
                return Err(AllocatorError::Conflict(format!(
                    "a newer drain of {key} fenced {bucket_node}'s bucket"
                )));
            }
            check_refusal(&reply)?;
            let debit = debit_of(&reply)?;
            self.complete(&transfer, &debit).await?;
            moved += debit.qty;
        }
        let mut buckets_on_hand = 0;
        if settle {
            let mut partitions: Vec<u32> = buckets.values().copied().collect();
            partitions.push(pool.partition);
            partitions.sort_unstable();
            partitions.dedup();
            let mut settled = None;
            for _ in 0..DRAIN_SETTLE_ROUNDS {
                for partition in &partitions {
                    // Another key's transfer that cannot be credited is the
                    // reconciler's to report; this key's in flight decides.
                    let mut others = Vec::new();
                    self.finish_transfers_reporting(
                        *partition,
                        Duration::ZERO,
                        &|_| false,
                        &mut others,
                    )
                    .await?;
                }
                settled = self.settled_buckets_on_hand(key).await?;
                if settled.is_some() {
                    break;
                }
            }
            buckets_on_hand = settled.ok_or_else(|| {
                AllocatorError::StoreUnavailable(format!(
                    "units of {key} kept moving between cells; try again"
                ))
            })?;
        }
        Ok(Drained {
            epoch,
            moved,
            buckets_on_hand,
        })
    }

    /// What the key's buckets hold, if nothing is in flight between its
    /// cells. Read in this order on purpose: while a drain holds the lease
    /// the pool lends nothing, so once its `out_in_flight` is 0 every unit
    /// it lent has landed and the buckets can only shrink from then on
    /// (fenced buckets debit nothing but to a newer drain, which cannot start
    /// while this one holds the lease); a bucket with nothing in flight
    /// towards the pool then holds at most what is read here, until the
    /// adjustment lands.
    async fn settled_buckets_on_hand(&self, key: &StockKey) -> Result<Option<i64>> {
        let Some(pool) = self.cell(&key.pool(self.settings.partitions)).await? else {
            return Err(AllocatorError::NotFound);
        };
        if pool.out_in_flight != 0 {
            return Ok(None);
        }
        let mut on_hand = 0;
        for (node, &partition) in &pool.buckets {
            if let Some(bucket) = self.cell(&key.bucket_in(node, partition)).await? {
                if bucket.out_in_flight != 0 {
                    return Ok(None);
                }
                on_hand += bucket.on_hand;
            }
        }
        Ok(Some(on_hand))
    }

    /// Gives a drain lease up (nothing if another drain holds it now).
    pub async fn end_drain(&self, key: &StockKey, epoch: u64) -> Result<()> {
        let pool = key.pool(self.settings.partitions);
        let args = json!({ "action": "end", "cell": pool.id, "epoch": epoch });
        check_refusal(&self.call(Op::Drain, pool.partition, args).await?)
    }

    /// Holds for a hot key from `node`'s bucket (a request already claimed):
    /// on a short bucket it refills from the pool (chunk sized from `meter`),
    /// and when the pool is dry it first pulls the other buckets' free units
    /// back to the pool ("a drained node may pull from the pool again"), so
    /// a refusal means the whole key is sold out but for units held or in
    /// flight at that instant. A fenced bucket is refilled (which reopens
    /// it); while the pool lends nothing because its buckets are being
    /// drained, it waits a moment. The hold always lands in `node`'s bucket,
    /// where the request's claim placed it (`bucket`: the claim's cell, its
    /// reservation id names that partition), and refills go there too; if
    /// the pool records `node`'s bucket elsewhere now (the sale's nodes were
    /// reordered since the claim), the refill is refused and so is the
    /// request: a hold anywhere else could not be found by its id.
    ///
    /// It refuses once the key as a whole has fewer sellable units than
    /// asked and nothing in flight (no round could then succeed), or after
    /// its last round. What it answers is counted in `hot`'s
    /// [`HotOutcomes`]; a refusal after the last round while a read of the
    /// key still shows the request's units sellable is counted apart and
    /// logged: the request is still refused (its answer is kept for its
    /// retries like any refusal), but an operator sees it.
    pub async fn hold_hot(
        &self,
        hot: &crate::HotKey,
        node: &str,
        bucket: &CellRef,
        request: &HoldRequest,
    ) -> Result<Hold> {
        let (sale, meter) = (&hot.sale, &hot.meter);
        let mut last_refusal = None;
        let mut dry = false;
        for _ in 0..HOT_ATTEMPTS_MAX {
            let mut fenced = false;
            match self.hold(bucket, request).await {
                Ok(hold) => {
                    if !hold.replayed {
                        meter.record(u64::from(request.qty));
                    }
                    hot.outcomes.record_hold(&hold);
                    return Ok(hold);
                }
                Err(refusal @ AllocatorError::InsufficientStock { .. }) => {
                    last_refusal = Some(refusal)
                }
                // No bucket yet (nothing was split to this node): a refill
                // makes it. A fenced bucket: a refill made now reopens it.
                Err(AllocatorError::NotFound) => {}
                Err(AllocatorError::Fenced) => fenced = true,
                Err(other) => return Err(other),
            }
            let rate = meter.units_per_second().max(f64::from(request.qty));
            let (refilled, draining) = self.refill_debit(sale, node, bucket, rate).await?;
            if refilled > 0 {
                continue;
            }
            if draining {
                // A count or a loss is being applied: a few ms.
                tokio::time::sleep(DRAIN_BUSY_PAUSE).await;
                continue;
            }
            // Pull the other buckets' free units back, and this node's own
            // when it is fenced (a release may have freed units in it).
            let mut pulled = 0;
            for other in sale
                .nodes
                .iter()
                .filter(|other| fenced || other.as_str() != node)
            {
                // Another drain under way moves the units itself: no waiting.
                pulled += self.try_reclaim(sale, other).await?;
            }
            if pulled > 0 {
                continue;
            }
            // Pool and other buckets looked dry. Refuse only if the key
            // cannot serve the request now and nothing is on its way
            // between cells (another node's refill or pull still landing);
            // else wait for it.
            if let Some(view) = self.stable_view(&sale.key).await?
                && view.sellable() < i64::from(request.qty)
                && view.in_flight() <= 0
            {
                dry = true;
                break;
            }
            tokio::time::sleep(IN_FLIGHT_WAIT).await;
        }
        // Out of rounds: were the units there? One read, not a stable view
        // (which heavy traffic may never give): a measurement, not a
        // decision; a transfer between its reads may make it count one
        // refusal too many, never hide one.
        let sellable = if dry {
            None
        } else {
            self.stock_view(&sale.key)
                .await
                .ok()
                .map(|view| view.sellable())
                .filter(|sellable| *sellable >= i64::from(request.qty))
        };
        hot.outcomes.record_refusal(sellable.is_some());
        if let Some(sellable) = sellable {
            warn!(
                sale = %sale.name,
                node,
                sellable,
                qty = request.qty,
                "refused a reservation while the key had the units sellable"
            );
        }
        Err(last_refusal.unwrap_or(AllocatorError::InsufficientStock { lines: Vec::new() }))
    }

    /// The pool and every bucket of a key (the buckets its pool lists).
    pub async fn stock_view(&self, key: &StockKey) -> Result<StockView> {
        let mut views = self.stock_views(std::slice::from_ref(key)).await?;
        Ok(views.pop().unwrap_or(StockView {
            pool: None,
            buckets: Vec::new(),
        }))
    }

    /// [`Allocator::stock_view`] of many keys in two pipelined waves: every
    /// pool, then every bucket those pools list (each wave one round trip,
    /// whatever the number of keys). Not one instant: see
    /// [`Allocator::stable_view`] for a view a decision may rest on.
    pub async fn stock_views(&self, stock_keys: &[StockKey]) -> Result<Vec<StockView>> {
        let partitions = self.settings.partitions;
        let pool_refs: Vec<CellRef> = stock_keys.iter().map(|key| key.pool(partitions)).collect();
        let pools = self.cells(&pool_refs).await?;
        // (which key, node) of every bucket the pools list.
        let mut owners: Vec<(usize, String)> = Vec::new();
        let mut bucket_refs: Vec<CellRef> = Vec::new();
        for (index, pool) in pools.iter().enumerate() {
            for (node, &partition) in pool.iter().flat_map(|pool| &pool.buckets) {
                bucket_refs.push(stock_keys[index].bucket_in(node, partition));
                owners.push((index, node.clone()));
            }
        }
        let buckets = self.cells(&bucket_refs).await?;
        let mut views: Vec<StockView> = pools
            .into_iter()
            .map(|pool| StockView {
                pool,
                buckets: Vec::new(),
            })
            .collect();
        for ((index, node), bucket) in owners.into_iter().zip(buckets) {
            if let Some(bucket) = bucket {
                views[index].buckets.push((node, bucket));
            }
        }
        Ok(views)
    }

    /// Every location of `(merchant, sku)` with its view, sorted by
    /// location; locations whose pool is gone are left out. Three round
    /// trips whatever the number of locations and sale nodes: the location
    /// set, then [`Allocator::stock_views`].
    pub async fn sku_views(&self, merchant: &str, sku: &str) -> Result<Vec<(String, StockView)>> {
        let locations = self.locations(merchant, sku).await?;
        let stock_keys: Vec<StockKey> = locations
            .iter()
            .map(|location| StockKey::new(merchant, sku, location))
            .collect();
        let views = self.stock_views(&stock_keys).await?;
        Ok(locations
            .into_iter()
            .zip(views)
            .filter(|(_, view)| view.pool.is_some())
            .collect())
    }

    /// A view of the pool and buckets as they all were at one instant: the
    /// cells live in different partitions and are read one by one, so the
    /// view is read twice and kept only when no cell's version moved between
    /// the two reads (every change bumps the version). `None` when the cells
    /// kept changing for a few rounds: no conclusion may be drawn then.
    pub async fn stable_view(&self, key: &StockKey) -> Result<Option<StockView>> {
        let versions = |view: &StockView| -> Vec<(String, u64)> {
            view.pool
                .iter()
                .map(|pool| ("pool".to_owned(), pool.version))
                .chain(
                    view.buckets
                        .iter()
                        .map(|(node, bucket)| (node.clone(), bucket.version)),
                )
                .collect()
        };
        let mut previous = self.stock_view(key).await?;
        for _ in 0..STABLE_VIEW_ROUNDS {
            let current = self.stock_view(key).await?;
            if versions(&current) == versions(&previous) {
                return Ok(Some(current));
            }
            previous = current;
        }
        Ok(None)
    }

    /// Every stock key that has had buckets ([`keys::hot_keys_set`] of
    /// every partition), sorted. Keys still in the registry of releases
    /// before it was split per partition ([`keys::LEGACY_HOT_KEYS`]) are
    /// moved to their partition's set first, so a sale that ended before
    /// an upgrade still has its buckets reclaimed.
    pub async fn hot_keys(&self) -> Result<Vec<StockKey>> {
        self.move_legacy_hot_keys().await?;
        let partitions: Vec<u32> = (0..self.settings.partitions).collect();
        let sets = self
            .per_partition(&partitions, |partition| {
                ("SMEMBERS", vec![keys::hot_keys_set(partition)])
            })
            .await?;
        let mut members: Vec<String> = Vec::new();
        for set in sets {
            let set: Vec<String> = set.convert().map_err(crate::unavailable)?;
            members.extend(set);
        }
        members.sort();
        Ok(members
            .iter()
            .filter_map(|member| {
                let mut parts = member.split('|');
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(merchant), Some(sku), Some(location), None) => {
                        Some(StockKey::new(merchant, sku, location))
                    }
                    _ => None,
                }
            })
            .collect())
    }

    /// Moves every member of [`keys::LEGACY_HOT_KEYS`] to its partition's
    /// set (added there before it is removed from the old one, so a crash
    /// between leaves it in both, never in neither).
    async fn move_legacy_hot_keys(&self) -> Result<()> {
        let legacy = self.store.for_key(keys::LEGACY_HOT_KEYS)?;
        let members: Vec<String> = self
            .with_timeout(legacy.smembers(keys::LEGACY_HOT_KEYS))
            .await?;
        for member in members {
            let mut parts = member.split('|');
            if let (Some(merchant), Some(sku), Some(location), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            {
                self.register_hot_key(&StockKey::new(merchant, sku, location))
                    .await?;
            }
            let _: i64 = self
                .with_timeout(legacy.srem(keys::LEGACY_HOT_KEYS, member.as_str()))
                .await?;
        }
        Ok(())
    }

    /// Records `key` among the keys that have had buckets (idempotent), before
    /// any of its units moves to one.
    async fn register_hot_key(&self, key: &StockKey) -> Result<()> {
        let partition = key.partition(self.settings.partitions);
        let _: i64 = self
            .with_timeout(
                self.store
                    .for_partition(partition)?
                    .sadd(keys::hot_keys_set(partition), hot_key_member(key)),
            )
            .await?;
        Ok(())
    }

    /// Forgets a key whose buckets are all empty (the reconciler's call).
    pub async fn forget_hot_key(&self, key: &StockKey) -> Result<()> {
        let partition = key.partition(self.settings.partitions);
        let _: i64 = self
            .with_timeout(
                self.store
                    .for_partition(partition)?
                    .srem(keys::hot_keys_set(partition), hot_key_member(key)),
            )
            .await?;
        Ok(())
    }

    /// Announces this node alive for `ttl`.
    pub async fn heartbeat(&self, ttl: Duration) -> Result<()> {
        let key = keys::heartbeat_key(&self.settings.node);
        let client = self.store.for_key(&key)?;
        let _: () = self
            .with_timeout(client.set(
                key,
                "alive",
                Some(Expiration::PX(ttl.as_millis() as i64)),
                None,
                false,
            ))
            .await?;
        Ok(())
    }

    /// Whether `node`'s heartbeat is current.
    pub async fn node_alive(&self, node: &str) -> Result<bool> {
        let key = keys::heartbeat_key(node);
        let client = self.store.for_key(&key)?;
        let count: u64 = self.with_timeout(client.exists(key)).await?;
        Ok(count > 0)
    }

    /// Redis time in ms since the epoch (the one clock stock decisions use).
    pub async fn redis_time_ms(&self) -> Result<u64> {
        self.redis_time_ms_on(&self.store.any()).await
    }

    /// Redis time in ms on `client`'s master (each client of the store is
    /// one master's).
    pub(crate) async fn redis_time_ms_on(&self, client: &fred::clients::Client) -> Result<u64> {
        let time =
            fred::types::CustomCommand::new_static("TIME", fred::types::ClusterHash::Random, false);
        let (seconds, micros): (u64, u64) = self
            .with_timeout(client.custom(time, Vec::<String>::new()))
            .await?;
        Ok(seconds * 1000 + micros / 1000)
    }
}
