//! The stock model of shared/DESIGN.md: Redis keys, Lua scripts (from `lua/`)
//! and typed results.
//!
//! This crate is the only code that builds Redis keys or calls the scripts; the
//! gateway and the ledger writer use it through [`Allocator`] (reservation
//! requests through [`Reserver`], the writers' outbox through [`outbox`],
//! change notifications through [`changes`]). Every stock
//! change is one script call that checks its arguments, releases the
//! partition's due holds (lazy expiry), decides, writes, appends its ledger
//! entry to the partition's stream and publishes a change notification, in one
//! atomic step. All time is Redis `TIME`. The key layout is in [`keys`];
//! which master serves a key, and the connections to each, are `store`'s
//! (one Redis, or a cluster routed by slot by this crate, not by fred).
//!
//! # Ledger entry schema, version 1
//!
//! Its Rust home is [`LedgerEntry`] ([`ledger`]): the relay, the audit and
//! the rebuild read entries only through it, and an unknown or missing field
//! is an error there, never a silent 0.
//!
//! Each partition's stream `inv:{p}:ledger` holds entries with one field `e`,
//! a JSON object. The entry id is `<partition>-<stream id>` (for example
//! `17-1732000000000-0`): unique, and ordered within a partition, so every
//! consumer can be idempotent on it.
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `v` | int | schema version, 1 |
//! | `op` | string | `reserve`, `commit`, `release`, `expire`, `extend`, `adjust`, `settings`, `transfer_out`, `transfer_in`, `rebuild` |
//! | `partition` | int | the stream's partition |
//! | `cell` | string | cell id, `merchant\|sku\|location\|pool` or `…\|bucket\|node` |
//! | `merchant`, `sku`, `location` | string | the stock key |
//! | `on_hand_before`, `on_hand_after` | int | the cell's on_hand around the change |
//! | `reserved_before`, `reserved_after` | int | the cell's reserved around the change |
//! | `version` | int | the cell's version after the change |
//! | `qty` | int | units the op moved (for `adjust`, the applied delta) |
//! | `reservation_id` | string? | reserve, commit, release, expire, extend |
//! | `cart_id` | string? | the cart a reservation line belongs to |
//! | `backordered` | int? | reserve: units beyond sellable |
//! | `kind`, `source`, `source_event_id` | string? | adjust: its origin |
//! | `source_seq` | string? | adjust: the sender's sequence, a decimal string (Lua's cjson keeps 14 digits) |
//! | `counted`, `buckets_on_hand`, `drain_epoch` | int? | absolute adjust: the count, what the fenced buckets held (set on keys with buckets), the drain it ran in |
//! | `shortfall` | bool? | adjust: sellable fell below −backorder_limit |
//! | `safety_stock`, `backorder_limit`, `low_stock_threshold` | int? | settings (`low_stock_threshold` since the rebuild command; older entries lack it) |
//! | `reorder_point`, `reorder_qty` | int? | settings: the point (-1: none) and quantity of `reorder` signals (since signals; older entries lack them: none) |
//! | `released` | array of strings? | rebuild: open holds whose records Redis had lost, released (their units are `qty`) |
//! | `found_on_hand`, `found_reserved`, `found_version` | int? | rebuild: what Redis held before (absent when the cell was missing) |
//! | `expires_at_ms` | int? | extend: the new expiry |
//! | `transfer_id` | string? | transfer_out, transfer_in: the transfer both halves share |
//! | `to_cell`, `from_cell` | string? | transfer_out names its destination, transfer_in its source |
//! | `reason` | string? | transfers: `activate`, `refill`, `drain` (reclaims and drains) or `reclaim` (older entries) |
//! | `node` | string | the node that made the call |
//! | `at_ms` | int | Redis time of the change, ms since the epoch |
//!
//! Conservation, from the ledger alone: for a stock key, the sum over its
//! cells of the last `on_hand_after`, plus units in flight (Σ `transfer_out`
//! qty − Σ `transfer_in` qty), equals Σ `adjust` qty − Σ `commit` qty. A
//! reservation's units never leave their cell until `commit`; `expire` and
//! `release` only lower `reserved`.
//!
//! No PII and no client text: a `customer_ref` is kept only as a keyed hash
//! (HMAC-SHA-256 with `auth.customer_ref_key`) on the reservation record, and
//! never in the ledger; Idempotency-Keys only as keyed hashes naming their
//! claims and commit/release records, and never in the ledger either.
//!
//! # Choices the design left open
//!
//! * Script replies are JSON objects `{"v":1,"status":…}` decoded into typed
//!   values here; an unknown status or version is a protocol error, never
//!   guessed at.
//! * A reservation id carries its partition (`r17.…`) and is derived from the
//!   request's claim (a keyed hash of the merchant and the idempotency key),
//!   so the same request sent to two nodes at once lands on the same record
//!   and holds stock once ([`reserve`]).
//! * A physical loss may take a cell below what backorders allow (API.md: a
//!   loss is a fact); the entry is flagged `shortfall`, and reserve refuses
//!   until stock is restored. Every change a request makes keeps the invariant
//!   `sellable ≥ −backorder_limit`, asserted in the script before writing and
//!   again here on the reply.
//! * Idempotency records, event dedupe records and finished reservations are
//!   kept 24 hours, then dropped by the scripts' own housekeeping (bounded
//!   work per call). A refusal (`insufficient_stock`, `not_found`) is
//!   remembered in the request's claim like a success: the same key and body
//!   get the same answer on every node for those 24 hours.
//! * Refill chunks are sized from the node's own measured rate
//!   ([`RateMeter`]); whether units exist to move is decided in the script.
//! * A hot reservation is refused only when no cell of the key has free
//!   units: the node refills from the pool and, if the pool is dry, pulls the
//!   other buckets' free units back first ([`Allocator::reserve_hot`]).
//!
//! # A key is one shelf: how flash-sale keys conserve units
//!
//! A hot key's units live in its pool and in per-node buckets in other
//! partitions, so no script sees them all. Physical facts are about the key,
//! so they are applied through a **drain** ([`Allocator::drain`]):
//!
//! 1. The pool is the one home of the list of its key's buckets (`buckets`,
//!    written whenever it lends to one) and of the key's **drain lease**
//!    (`lua/drain.lua`): a new drain epoch, and until the lease ends the pool
//!    lends nothing (refills and activations move no units).
//! 2. Each listed bucket is **fenced** at that epoch (`lua/fence.lua`): it
//!    refuses every reservation and gives units back only to a drain at
//!    least that recent; its free units are debited to the pool and credited
//!    there. A bucket the pool listed but whose first credit has not landed
//!    is created empty and fenced, so the late credit keeps it shut.
//! 3. For a count, every transfer in flight between the key's cells is
//!    finished, then the pool is read (nothing in flight from it: every unit
//!    it lent has landed) and then each bucket (nothing in flight from it).
//!    From that moment a fenced bucket can only shrink (commits), since the
//!    pool lends nothing and the buckets give nothing but to a newer drain,
//!    which cannot start while this lease lives.
//! 4. The adjustment runs at the pool with the drain's epoch, refused if the
//!    lease lapsed or was taken (then everything is tried again). A count
//!    sets the pool to `count − what the buckets held at step 3`, so the
//!    key's cells hold at most the count (exactly the count less units sold
//!    between the read and the count, which the count is taken to precede);
//!    a delta is added to the pool. The shortfall is judged at the pool,
//!    which now holds every free unit of the key.
//!
//! Only what could create units or sell phantom ones takes a drain: an
//! absolute count, and a loss or settings change that would leave the pool
//! short (the scripts answer `needs_drain` without writing anything); a
//! restock, or a loss the pool covers itself, is applied at once (the
//! buckets' units are real, and the pool still covers its own holds).
//! A key left short keeps its buckets fenced: a bucket reopens only when a
//! refill debited after its fence reaches it (the refill carries the pool's
//! drain epoch), and the pool refills only from units it has free, so the
//! key refuses on every node until a restock makes it good.
//!
//! Reclaiming a bucket (sale ended or left the config, node dead, bucket
//! idle, or a node pulling the others' free units) is a drain of that one
//! bucket. Transfers stay idempotent by id: a credit carries its debit's
//! time and is refused more than 12 h after it, while the credit's dedupe
//! record lives 24 h after the credit, so no credit outlives its dedupe
//! record. An activation is recorded per (sale, epoch) for at most 7 days
//! and forgotten when the sale ends; its replay credits only the shares whose
//! debit records still say `debited`, so a replay at any later time never
//! credits what was not debited, or twice.
//!
//! # Retention of records
//!
//! | record | kept | must outlive |
//! |---|---|---|
//! | idempotency records, finished reservations | 24 h after they end | client retries (minutes) |
//! | adjustment dedupe `(source, event_id)` | 24 h after applied | redelivery: ingestion re-delivers at most the last second of messages; WMS/POS resends within hours |
//! | `source_seq` per key and source | for ever (one integer per key and source) | every later count of that source |
//! | transfer debit record | until credited, then 24 h | the finisher (every few seconds) |
//! | transfer credit record `in|id` | 24 h after the credit | every credit attempt, which is refused 12 h after the debit |
//! | activation record | until the sale ends here, at most 7 days | node restarts during the sale |
//! | drain lease | 2 s | one drain (a few round trips) |

mod allocate;
mod allowance;
mod cart;
pub mod changes;
mod hot;
pub mod keys;
pub mod ledger;
pub mod limits;
mod model;
pub mod outbox;
pub mod placement;
pub mod reserve;
mod scripts;
pub mod sources;
mod store;
pub mod substitutes;
mod throttle;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use fred::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::warn;

pub use allowance::{Allowance, AllowancesFinished, CustomerLimit, Grant, NOTE_SETTLE_AFTER};
pub use cart::{CART_LINES_MAX, CartHold, CartLine, CartLineView, CartRequest, CartView, Unfilled};
pub use changes::{Change, ChangeEvent, ChangeFeed};
pub use hot::{
    Debit, Drained, FlashSale, HotOutcomeCounts, HotOutcomes, PendingTransfer,
    REFILL_HORIZON_SECONDS, RateMeter, StockView, Transfer,
};
pub use keys::{CellRef, StockKey};
pub use ledger::{EntryId, LEDGER_VERSION, LedgerEntry, LedgerOp};
pub use model::*;
pub use placement::{LocationDefaults, LocationSettings};
pub use reserve::{
    CLAIM_CLOCK_MARGIN, Coalescer, Coalescing, Flushed, HoldRequest, HotKey, Reserver,
};
use scripts::{Op, Scripts};
pub use sources::SourcesSeen;
pub use throttle::{FAILURE_PAUSE, TOKEN_LIFE, Throttle};

/// Why an allocator call did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum AllocatorError {
    /// Not enough sellable units; nothing was held.
    #[error("insufficient stock")]
    InsufficientStock {
        /// Every line that was short.
        lines: Vec<ShortLine>,
    },
    /// The reservation is not held (committed, released or expired).
    #[error("reservation is {}", status.as_str())]
    NotHeld {
        /// Its status now.
        status: ReservationStatus,
    },
    /// Unknown reservation or stock key (or another merchant's).
    #[error("not found")]
    NotFound,
    /// The idempotency key was used before with a different request.
    #[error("idempotency key reused with a different request")]
    IdempotencyKeyReused,
    /// The request breaks a rule the scripts check (id, quantity, ttl).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Redis did not answer in time or at all; nothing may be assumed changed
    /// for a refused connection, and callers fail closed.
    #[error("stock store unavailable: {0}")]
    StoreUnavailable(String),
    /// A reply broke the schema or an invariant: a bug, reported loudly.
    #[error("stock store protocol error: {0}")]
    Protocol(String),
    /// A compare-and-set refused, or a step that must wait: the data changed
    /// since the caller looked (`rebuild_cell`), a newer drain took the key's
    /// buckets, an activation waits for a drain to end, a transfer is too old
    /// to credit safely.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The bucket sells nothing now (its key is being counted, is short, or
    /// its units were taken back): [`Allocator::hold_hot`] then refills it;
    /// nothing was held.
    #[error("the bucket is fenced")]
    Fenced,
    /// Another caller is working on a request with the same Idempotency-Key
    /// (its lease has not lapsed): try again in a moment.
    #[error("a request with this idempotency key is in progress")]
    InProgress,
    /// A flash sale's checkout throttle refused the attempt; nothing was
    /// held or claimed.
    #[error("{reason}")]
    RateLimited {
        /// What was over which budget.
        reason: String,
        /// How long until the budget has room again.
        retry_after: Duration,
    },
    /// A flash sale's customer limit refused the hold (409
    /// `customer_limit`); nothing was held.
    #[error("this customer's {counts} in the flash sale are at its limit of {limit}")]
    CustomerLimit {
        /// The sale whose limit it is.
        sale: String,
        /// The limit.
        limit: u64,
        /// What the customer has used of it.
        used: u64,
        /// What it counts: `units` (`customer_units_max`) or `holds`
        /// (`customer_holds_max`).
        counts: String,
    },
}

/// Most times an adjustment or a settings change of a key with buckets
/// drains them and tries again when another drain took the lease meanwhile.
const DRAIN_ATTEMPTS_MAX: usize = 5;

/// How long idempotency records and claims are kept.
pub const IDEMPOTENCY_RETENTION_SECONDS: i64 = 24 * 3600;

pub use limits::RESERVE_BATCH_MAX;

/// Result of allocator calls.
pub type Result<T, E = AllocatorError> = std::result::Result<T, E>;

/// Settings the allocator takes from the config.
#[derive(Debug, Clone)]
pub struct AllocatorSettings {
    /// This node's id, written into every ledger entry.
    pub node: String,
    /// P: the number of partitions.
    pub partitions: u32,
    /// Bound on every Redis call.
    pub command_timeout: Duration,
    /// Hold lifetime when none is asked for.
    pub ttl_default: Duration,
    /// Longest hold or extension allowed.
    pub ttl_max: Duration,
    /// Secret of the keyed hash of customer references.
    pub customer_ref_key: String,
    /// How long a cart's line holds outlive the cart's advertised expiry.
    pub cart_line_grace: Duration,
}

impl AllocatorSettings {
    /// The settings of a process running `config` (check it first with
    /// [`limits::check_config`]).
    pub fn from_config(config: &config::Config) -> Self {
        Self {
            node: config.node.id.clone(),
            partitions: config.stock.partitions,
            command_timeout: Duration::from_millis(config.redis.command_timeout_ms),
            ttl_default: Duration::from_secs(config.stock.reservation_ttl_seconds_default),
            ttl_max: Duration::from_secs(config.stock.reservation_ttl_seconds_max),
            customer_ref_key: config.auth.customer_ref_key.clone(),
            cart_line_grace: Duration::from_secs(config.stock.cart_line_grace_seconds),
        }
    }
}

/// A request to hold units of one stock key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    /// The stock key.
    pub key: StockKey,
    /// Units to hold, 1..=1,000,000.
    pub qty: u32,
    /// Hold lifetime; the configured default when `None`, at most the maximum.
    pub ttl: Option<Duration>,
    /// The client's idempotency key: a retry with the same key and request gets
    /// the same answer and changes nothing.
    pub idempotency_key: String,
    /// Opaque customer reference; stored only as a keyed hash.
    pub customer_ref: Option<String>,
}

/// The stock engine's client.
#[derive(Clone)]
pub struct Allocator {
    /// Connections to every master, and which serves each key.
    store: store::Store,
    /// The loaded scripts.
    scripts: Scripts,
    /// Node id, partitions, timeouts (fixed for the process's life).
    settings: AllocatorSettings,
    /// Hold lifetimes and the cart line grace as the config now says (a
    /// reload changes them: [`Allocator::reconfigure`]); shared by clones.
    holds: Arc<RwLock<HoldLimits>>,
    /// The ledger writers' scripts ([`outbox`]).
    relay_scripts: outbox::RelayScripts,
}

/// Which of the store's masters answer ([`Allocator::health`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHealth {
    /// Masters in the slot map (1 for one Redis).
    pub masters: usize,
    /// Those that did not answer, each with why (`host:port: error`).
    pub not_answering: Vec<String>,
    /// Hash slots no master serves (a cluster without full coverage).
    pub uncovered_slots: usize,
}

impl StoreHealth {
    /// Every master answers and every slot has one.
    pub fn is_whole(&self) -> bool {
        self.not_answering.is_empty() && self.uncovered_slots == 0
    }

    /// Some masters answer: keys on them are served.
    pub fn some_answer(&self) -> bool {
        self.not_answering.len() < self.masters
    }

    /// What is missing, for a log or a `/ready` reason.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.not_answering.is_empty() {
            parts.push(format!(
                "{} of {} Redis masters not answering: {}",
                self.not_answering.len(),
                self.masters,
                self.not_answering.join("; ")
            ));
        }
        if self.uncovered_slots > 0 {
            parts.push(format!(
                "{} hash slots have no master",
                self.uncovered_slots
            ));
        }
        parts.join("; ")
    }
}

/// The hold limits a config reload may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// Hold lifetime when none is asked for.
    pub ttl_default: Duration,
    /// Longest hold or extension allowed.
    pub ttl_max: Duration,
    /// How long a cart's line holds outlive the cart's advertised expiry.
    pub cart_line_grace: Duration,
}

/// The pace of a process's tries while it waits for a dependency at start
/// ([`Allocator::connect_waiting`], the writer's PostgreSQL): 0.1 s, then
/// doubling to 1 s, so a process serves within a second of its dependency
/// answering.
#[derive(Debug)]
pub struct StartRetry {
    pause: Duration,
}

impl StartRetry {
    /// The first pause.
    const FIRST: Duration = Duration::from_millis(100);
    /// The longest pause.
    const MAX: Duration = Duration::from_secs(1);

    /// A wait that has not tried yet.
    pub fn new() -> Self {
        Self { pause: Self::FIRST }
    }

    /// Sleeps before the next try.
    pub async fn rest(&mut self) {
        let now = self.pause;
        self.pause = (self.pause * 2).min(Self::MAX);
        tokio::time::sleep(now).await;
    }
}

impl Default for StartRetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Allocator {
    /// The Redis function serving the operation named `op` (a file of
    /// `lua/` without `.lua`) in the library this allocator loaded: for
    /// tools and tests that call a function directly, e.g. to check that it
    /// refuses what this crate never sends.
    pub fn function_name(&self, op: &str) -> Option<String> {
        self.scripts.function_name(op).map(str::to_owned)
    }

    /// Connects to `redis_url` and loads the scripts.
    pub async fn connect(
        redis_url: &str,
        settings: AllocatorSettings,
        pool_size: usize,
    ) -> Result<Self> {
        let scripts = Scripts::new();
        let store = store::Store::connect(
            redis_url,
            pool_size,
            settings.command_timeout,
            scripts.clone(),
        )
        .await?;
        let holds = Arc::new(RwLock::new(HoldLimits {
            ttl_default: settings.ttl_default,
            ttl_max: settings.ttl_max,
            cart_line_grace: settings.cart_line_grace,
        }));
        Ok(Self {
            store,
            scripts,
            settings,
            holds,
            relay_scripts: outbox::RelayScripts::new(),
        })
    }

    /// [`Allocator::connect`] for a process starting up: waits until Redis
    /// connects and a master answers a `PING` (a Redis still loading its
    /// dataset answers `LOADING`, which is waiting too; on a cluster one
    /// master is enough, the others are served once they answer). Each
    /// failed try is handed to `waiting` with its cause, for the log and
    /// the process's `/ready`; tries are paced by [`StartRetry`]. Only a
    /// URL it cannot use is
    /// an error: nothing would change by waiting.
    pub async fn connect_waiting(
        redis_url: &str,
        settings: AllocatorSettings,
        pool_size: usize,
        mut waiting: impl FnMut(&str),
    ) -> Result<Self> {
        let mut retry = StartRetry::new();
        let allocator = loop {
            match Self::connect(redis_url, settings.clone(), pool_size).await {
                Ok(allocator) => break allocator,
                Err(AllocatorError::StoreUnavailable(reason)) => waiting(&reason),
                Err(other) => return Err(other),
            }
            retry.rest().await;
        };
        loop {
            let health = allocator.health().await;
            if health.some_answer() {
                return Ok(allocator);
            }
            waiting(&health.describe());
            retry.rest().await;
        }
    }

    /// The settings in use (hold limits as at start: [`Allocator::hold_limits`]
    /// has the ones in force).
    pub fn settings(&self) -> &AllocatorSettings {
        &self.settings
    }

    /// The hold limits in force.
    pub fn hold_limits(&self) -> HoldLimits {
        *self
            .holds
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies a reloaded config's hold limits (the lifetimes and the cart
    /// line grace) to every clone of this allocator; the rest of
    /// [`AllocatorSettings`] cannot change without a restart (the config's
    /// reload check refuses it).
    pub fn reconfigure(&self, config: &config::Config) -> Result<()> {
        limits::check_config(config).map_err(AllocatorError::InvalidRequest)?;
        let fresh = AllocatorSettings::from_config(config);
        *self
            .holds
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = HoldLimits {
            ttl_default: fresh.ttl_default,
            ttl_max: fresh.ttl_max,
            cart_line_grace: fresh.cart_line_grace,
        };
        Ok(())
    }

    /// Whether Redis answers now: every master, and every hash slot has
    /// one (an error says which do not).
    pub async fn ping(&self) -> Result<()> {
        let health = self.health().await;
        if health.is_whole() {
            Ok(())
        } else {
            Err(AllocatorError::StoreUnavailable(health.describe()))
        }
    }

    /// Which masters answer a `PING` now (all asked side by side; one with
    /// no connection up is not asked, it does not answer).
    pub async fn health(&self) -> StoreHealth {
        let routes = self.store.routes();
        let answers = futures::future::join_all(routes.masters.iter().map(|master| async move {
            if !master.connected() {
                return Some(format!("{}: not connected", master.server));
            }
            let answer: Result<String> = self.with_timeout(master.client().ping(None)).await;
            answer
                .err()
                .map(|error| format!("{}: {error}", master.server))
        }))
        .await;
        StoreHealth {
            masters: routes.masters.len(),
            not_answering: answers.into_iter().flatten().collect(),
            uncovered_slots: routes.uncovered(),
        }
    }

    pub(crate) async fn with_timeout<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T> {
        // Boxed: a fred command future is ~5 KB, and would make every
        // caller's future that much larger (see `Scripts::run`).
        match tokio::time::timeout(self.settings.command_timeout, Box::pin(call)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => {
                self.store.failed(Some(&error));
                Err(unavailable(error))
            }
            Err(_) => {
                self.store.failed(None);
                Err(AllocatorError::StoreUnavailable(format!(
                    "no answer within {} ms",
                    self.settings.command_timeout.as_millis()
                )))
            }
        }
    }

    pub(crate) async fn call(&self, op: Op, partition: u32, args: Value) -> Result<Value> {
        self.call_with(op, partition, args, Vec::new()).await
    }

    /// [`Allocator::call`] with plain string arguments after the JSON one
    /// (a batch's requests: no JSON for the script to decode per request).
    pub(crate) async fn call_with(
        &self,
        op: Op,
        partition: u32,
        mut args: Value,
        extra: Vec<String>,
    ) -> Result<Value> {
        strip_nulls(&mut args);
        args["partition"] = json!(partition);
        args["node"] = json!(self.settings.node);
        let keys = keys::partition_keys(partition);
        let mut argv = Vec::with_capacity(2 + extra.len());
        argv.push(args.to_string());
        argv.push(scripts::REPLY_VERSION.to_string());
        argv.extend(extra);
        let client = self.store.for_partition(partition)?;
        let text: String = self
            .with_timeout(self.scripts.run(op, &client, keys, argv))
            .await?;
        let reply: Value = serde_json::from_str(&text).map_err(|error| {
            AllocatorError::Protocol(format!("{op:?} reply is not JSON: {error}: {text}"))
        })?;
        if reply["v"] != json!(scripts::REPLY_VERSION) {
            return Err(AllocatorError::Protocol(format!(
                "{op:?} reply version: {text}"
            )));
        }
        Ok(reply)
    }

    pub(crate) fn ttl_ms(&self, ttl: Option<Duration>) -> Result<u64> {
        let limits = self.hold_limits();
        let ttl = ttl.unwrap_or(limits.ttl_default);
        if ttl.is_zero() || ttl > limits.ttl_max {
            return Err(AllocatorError::InvalidRequest(format!(
                "ttl must be between 1 and {} seconds",
                limits.ttl_max.as_secs()
            )));
        }
        Ok(ttl.as_millis() as u64)
    }

    /// The keyed hash of a customer reference (HMAC-SHA-256, hex).
    pub fn customer_hash(&self, customer_ref: &str) -> String {
        self.keyed_hash(customer_ref)
    }

    /// HMAC-SHA-256 with `auth.customer_ref_key`, hex: how client text
    /// (customer references, idempotency keys) is kept, when it must be.
    pub(crate) fn keyed_hash(&self, text: &str) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<Sha256>::new_from_slice(self.settings.customer_ref_key.as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(text.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    pub(crate) fn reservation_partition(&self, reservation_id: &str) -> Result<u32> {
        keys::reservation_partition(reservation_id, self.settings.partitions)
            .ok_or(AllocatorError::NotFound)
    }

    /// Commits a held reservation: its units are sold. `merchant` is the
    /// caller's merchant (`None` for the platform).
    pub async fn commit(
        &self,
        merchant: Option<&str>,
        reservation_id: &str,
        idempotency_key: &str,
    ) -> Result<Reservation> {
        self.finish(Op::Commit, merchant, reservation_id, idempotency_key)
            .await
    }

    /// Releases a held reservation; a released or expired one is answered as it
    /// is, a committed one is refused.
    pub async fn release(
        &self,
        merchant: Option<&str>,
        reservation_id: &str,
        idempotency_key: &str,
    ) -> Result<Reservation> {
        self.finish(Op::Release, merchant, reservation_id, idempotency_key)
            .await
    }

    async fn finish(
        &self,
        op: Op,
        merchant: Option<&str>,
        reservation_id: &str,
        idempotency_key: &str,
    ) -> Result<Reservation> {
        let partition = self.reservation_partition(reservation_id)?;
        let name = if op == Op::Commit {
            "commit"
        } else {
            "release"
        };
        let args = json!({
            "reservation_id": reservation_id, "merchant": merchant,
            "idempotency_key": format!(
                "{name}|{}",
                self.keyed_hash(&format!(
                    "{name}\u{1f}{}\u{1f}{reservation_id}\u{1f}{idempotency_key}",
                    merchant.unwrap_or("*")
                ))
            ),
            "fingerprint": fingerprint(&json!({ "op": name, "reservation_id": reservation_id })),
        });
        let reply = self.call(op, partition, args).await?;
        self.settle_after(partition, &reply).await;
        decode_reservation(reply)
    }

    /// Gives a held reservation a new lifetime from now.
    pub async fn extend(
        &self,
        merchant: Option<&str>,
        reservation_id: &str,
        ttl: Duration,
    ) -> Result<Reservation> {
        let partition = self.reservation_partition(reservation_id)?;
        let ttl_ms = self.ttl_ms(Some(ttl))?;
        let args = json!({
            "reservation_id": reservation_id, "merchant": merchant, "ttl_ms": ttl_ms, "grace_ms": 0,
        });
        decode_reservation(self.call(Op::Extend, partition, args).await?)
    }

    /// The reservation as it stands (a due hold is expired first).
    pub async fn reservation(
        &self,
        merchant: Option<&str>,
        reservation_id: &str,
    ) -> Result<Reservation> {
        let partition = self.reservation_partition(reservation_id)?;
        let args = json!({ "reservation_id": reservation_id, "merchant": merchant });
        decode_reservation(self.call(Op::GetReservation, partition, args).await?)
    }

    /// The sweeper's call: expires up to `limit` due holds of `partition`.
    pub async fn expire_due(&self, partition: u32, limit: u32) -> Result<SweepOutcome> {
        let reply = self
            .call(Op::ExpireDue, partition, json!({ "limit": limit }))
            .await?;
        check_refusal(&reply)?;
        serde_json::from_value(reply).map_err(protocol)
    }

    /// Applies a physical stock change (deduplicated, ordered by `source_seq`)
    /// to the key as a whole: while the key has buckets, a count, or a loss
    /// that would leave the pool short, first drains them ([`Allocator::drain`]:
    /// fenced, free units back in the pool, nothing in flight), and a count
    /// sets the pool to the count less what the fenced buckets still hold.
    pub async fn adjust(&self, adjustment: &Adjustment) -> Result<AdjustmentOutcome> {
        let key = StockKey::new(&adjustment.merchant, &adjustment.sku, &adjustment.location);
        let cell = key.pool(self.settings.partitions);
        let mut args = serde_json::to_value(adjustment).map_err(protocol)?;
        args["cell"] = json!(cell.id);
        self.index_location(&key).await?;
        let mut reply = self.call(Op::Adjust, cell.partition, args.clone()).await?;
        for _ in 0..DRAIN_ATTEMPTS_MAX {
            if !matches!(reply["status"].as_str(), Some("needs_drain" | "drain_lost")) {
                break;
            }
            let settle = adjustment.kind == AdjustmentKind::Absolute;
            let drained = self.drain(&key, None, settle).await?;
            let mut inside = args.clone();
            inside["drain_epoch"] = json!(drained.epoch);
            if settle {
                inside["buckets_on_hand"] = json!(drained.buckets_on_hand);
            }
            reply = self.call(Op::Adjust, cell.partition, inside).await?;
            if reply["status"] != json!("adjusted") {
                // Refused inside the drain (lost lease): give it up, try again.
                self.end_drain(&key, drained.epoch).await?;
            }
        }
        if matches!(reply["status"].as_str(), Some("needs_drain" | "drain_lost")) {
            return Err(AllocatorError::StoreUnavailable(format!(
                "{key} kept being drained by others; try again"
            )));
        }
        check_refusal(&reply)?;
        if reply["applied"] == json!(true) {
            let cell: Cell = serde_json::from_value(reply["cell"].clone()).map_err(protocol)?;
            let shortfall = reply["shortfall"] == json!(true);
            if shortfall != cell.is_short() {
                return Err(AllocatorError::Protocol(format!(
                    "shortfall flag disagrees with cell: {reply}"
                )));
            }
            return Ok(AdjustmentOutcome::Applied {
                shortfall,
                cell: Box::new(cell),
            });
        }
        match reply["reason"].as_str() {
            Some("duplicate") => Ok(AdjustmentOutcome::Duplicate),
            Some("stale") => Ok(AdjustmentOutcome::Stale {
                last_source_seq: exact_integer(&reply["last_source_seq"])?,
            }),
            _ => Err(AllocatorError::Protocol(format!("adjust reply: {reply}"))),
        }
    }

    /// Sets safety stock, backorder limit and low-stock threshold of a key's
    /// pool (and records its reorder point and quantity in the ledger); while the key has buckets, settings that would leave the pool
    /// short drain them first, so the key stops selling everywhere.
    pub async fn settings_of(&self, key: &StockKey, settings: StockSettings) -> Result<Cell> {
        let cell = key.pool(self.settings.partitions);
        let threshold = settings.low_stock_threshold.map_or(-1, |t| t as i64);
        let reorder_point = settings.reorder_point.map_or(-1, |point| point as i64);
        let args = json!({
            "merchant": key.merchant, "sku": key.sku, "location": key.location, "cell": cell.id,
            "safety_stock": settings.safety_stock, "backorder_limit": settings.backorder_limit,
            "low_stock_threshold": threshold,
            "reorder_point": reorder_point, "reorder_qty": settings.reorder_qty,
        });
        self.index_location(key).await?;
        let mut reply = self
            .call(Op::Settings, cell.partition, args.clone())
            .await?;
        for _ in 0..DRAIN_ATTEMPTS_MAX {
            if !matches!(reply["status"].as_str(), Some("needs_drain" | "drain_lost")) {
                break;
            }
            let drained = self.drain(key, None, false).await?;
            let mut inside = args.clone();
            inside["drain_epoch"] = json!(drained.epoch);
            reply = self.call(Op::Settings, cell.partition, inside).await?;
            if reply["status"] != json!("ok") {
                self.end_drain(key, drained.epoch).await?;
            }
        }
        if matches!(reply["status"].as_str(), Some("needs_drain" | "drain_lost")) {
            return Err(AllocatorError::StoreUnavailable(format!(
                "{key} kept being drained by others; try again"
            )));
        }
        check_refusal(&reply)?;
        serde_json::from_value(reply["cell"].clone()).map_err(protocol)
    }

    /// Sets one cell to what the ledger says (`ledger-writer rebuild`): the
    /// quantities, version and settings of its last entry, keeping the open
    /// holds Redis still has and releasing those it lost, with a `rebuild`
    /// ledger entry. Refused with [`AllocatorError::Conflict`] when the cell
    /// is no longer as `cell.expect_version` says (it took a write).
    pub async fn rebuild_cell(&self, cell: &CellRebuild) -> Result<RebuildOutcome> {
        let args = serde_json::to_value(cell).map_err(protocol)?;
        if cell.kind == "pool" {
            let key = StockKey::new(&cell.merchant, &cell.sku, &cell.location);
            self.index_location(&key).await?;
        }
        let reply = self
            .call(
                Op::Rebuild,
                cell.cell.partition,
                args_with_cell(args, &cell.cell),
            )
            .await?;
        if reply["status"] == json!("conflict") {
            return Err(AllocatorError::Conflict(
                reply["reason"].as_str().unwrap_or("conflict").to_owned(),
            ));
        }
        check_refusal(&reply)?;
        serde_json::from_value(reply).map_err(protocol)
    }

    /// Adds the key's location to its SKU's location set. Done *before* the
    /// script that may create the pool: the script's change notification
    /// sends readers to the set, which must already name the location
    /// (else a reader hearing the creation would find the SKU unknown, and
    /// cache that). A location whose first change was refused stays in the
    /// set without a pool; readers skip it.
    async fn index_location(&self, key: &StockKey) -> Result<()> {
        let set = keys::locations_key(&key.merchant, &key.sku);
        let client = self.store.for_key(&set)?;
        let _: i64 = self
            .with_timeout(client.sadd(set, key.location.as_str()))
            .await?;
        Ok(())
    }

    /// Every location `(merchant, sku)` has stock at, sorted.
    pub async fn locations(&self, merchant: &str, sku: &str) -> Result<Vec<String>> {
        let set = keys::locations_key(merchant, sku);
        let client = self.store.for_key(&set)?;
        let mut locations: Vec<String> = self.with_timeout(client.smembers(set)).await?;
        locations.sort();
        Ok(locations)
    }

    /// Cells as stored now, in the order asked: one `HMGET` per partition
    /// (`Allocator::per_partition`: one round trip). No script: reads
    /// never decide anything.
    pub async fn cells(&self, cells: &[CellRef]) -> Result<Vec<Option<Cell>>> {
        let mut by_partition: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
        for (index, cell) in cells.iter().enumerate() {
            by_partition.entry(cell.partition).or_default().push(index);
        }
        let mut found: Vec<Option<Cell>> = vec![None; cells.len()];
        if by_partition.is_empty() {
            return Ok(found);
        }
        let partitions: Vec<u32> = by_partition.keys().copied().collect();
        let answers = self
            .per_partition(&partitions, |partition| {
                let mut args = Vec::with_capacity(1 + by_partition[&partition].len());
                args.push(keys::cells_hash(partition));
                args.extend(
                    by_partition[&partition]
                        .iter()
                        .map(|&index| cells[index].id.clone()),
                );
                ("HMGET", args)
            })
            .await?;
        for (indexes, answer) in by_partition.values().zip(answers) {
            let raws = array_of(answer, indexes.len(), "cells")?;
            for (&index, raw) in indexes.iter().zip(raws) {
                found[index] = match raw {
                    fred::types::Value::Null => None,
                    raw => {
                        let text = raw.as_bytes().ok_or_else(|| {
                            AllocatorError::Protocol(format!("a cell is not text: {raw:?}"))
                        })?;
                        Some(serde_json::from_slice(text).map_err(protocol)?)
                    }
                };
            }
        }
        Ok(found)
    }

    /// One command per partition, `(name, arguments)` from `command`, sent
    /// in one pipeline per master serving any of them, the masters'
    /// pipelines side by side (one round trip); the answers in the order of
    /// `partitions`, read as plain values (no conversion guesses at
    /// nesting). Any master's failure fails the whole read.
    pub(crate) async fn per_partition(
        &self,
        partitions: &[u32],
        command: impl Fn(u32) -> (&'static str, Vec<String>),
    ) -> Result<Vec<fred::types::Value>> {
        let routes = self.store.routes();
        let mut by_master: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (position, &partition) in partitions.iter().enumerate() {
            let master = routes.index_of(keys::partition_slot(partition))?;
            by_master.entry(master).or_default().push(position);
        }
        let mut reads = Vec::with_capacity(by_master.len());
        for (&master, positions) in &by_master {
            let pipeline = routes.masters[master].pool.next().pipeline();
            for &position in positions {
                let (name, args) = command(partitions[position]);
                let name = fred::types::CustomCommand::new_static(
                    name,
                    fred::types::ClusterHash::FirstKey,
                    false,
                );
                let _: () = pipeline.custom(name, args).await.map_err(unavailable)?;
            }
            // `all` answers in sending order.
            reads.push(async move {
                let reply: fred::types::Value = self.with_timeout(pipeline.all()).await?;
                array_of(reply, positions.len(), "pipelined answers")
            });
        }
        let mut answers = vec![fred::types::Value::Null; partitions.len()];
        for (positions, replies) in by_master
            .values()
            .zip(futures::future::join_all(reads).await)
        {
            for (&position, reply) in positions.iter().zip(replies?) {
                answers[position] = reply;
            }
        }
        Ok(answers)
    }

    /// A cell as stored now (no script: reads never decide anything).
    pub async fn cell(&self, cell: &CellRef) -> Result<Option<Cell>> {
        let client = self.store.for_partition(cell.partition)?;
        let raw: Option<String> = self
            .with_timeout(client.hget(keys::cells_hash(cell.partition), &cell.id))
            .await?;
        raw.map(|text| serde_json::from_str(&text).map_err(protocol))
            .transpose()
    }

    /// The ledger entries of `partition` written at or after Redis time
    /// `since_ms` (0: all), typed, with their entry and stream ids, oldest
    /// first (for audits and tests; the writer reads with a consumer group).
    /// An entry that breaks the schema is a protocol error.
    pub async fn ledger_entries(&self, partition: u32, since_ms: u64) -> Result<Vec<LedgerEntry>> {
        let start = if since_ms == 0 {
            "-".to_owned()
        } else {
            format!("{since_ms}-0")
        };
        let client = self.store.for_partition(partition)?;
        let raw: Vec<(String, Vec<(String, String)>)> = self
            .with_timeout(client.xrange(keys::ledger_stream(partition), start, "+", None))
            .await?;
        raw.into_iter()
            .map(|(id, fields)| {
                let text = fields
                    .into_iter()
                    .find(|(name, _)| name == "e")
                    .map(|(_, text)| text)
                    .ok_or_else(|| {
                        AllocatorError::Protocol(format!("ledger entry {id} has no e field"))
                    })?;
                let mut entry = LedgerEntry::parse(&text).map_err(|error| {
                    AllocatorError::Protocol(format!("ledger entry {partition}-{id}: {error}"))
                })?;
                entry.entry_id = Some(format!("{partition}-{id}"));
                entry.stream_id = Some(id);
                Ok(entry)
            })
            .collect()
    }
}

/// Removes null fields: Lua's cjson turns null into a sentinel that is not
/// `nil`, so an absent optional must be absent from the JSON.
fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, field| !field.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// A reply that must be an array of `length` values (`what` names them in
/// the error).
fn array_of(
    reply: fred::types::Value,
    length: usize,
    what: &str,
) -> Result<Vec<fred::types::Value>> {
    match reply {
        fred::types::Value::Array(values) if values.len() == length => Ok(values),
        other => Err(AllocatorError::Protocol(format!(
            "{length} {what} asked, answered {other:?}"
        ))),
    }
}

pub(crate) fn unavailable(error: fred::error::Error) -> AllocatorError {
    AllocatorError::StoreUnavailable(error.to_string())
}

pub(crate) fn protocol(error: serde_json::Error) -> AllocatorError {
    AllocatorError::Protocol(error.to_string())
}

/// SHA-256 of the canonical JSON of a request (serde_json keeps key order).
pub(crate) fn fingerprint(request: &Value) -> String {
    hex::encode(Sha256::digest(request.to_string().as_bytes()))
}

/// 96 bits derived from a scoped idempotency key: the same request gets the
/// same reservation id on every node.
pub(crate) fn derive_random(scoped_key: &str) -> [u8; 12] {
    let digest = Sha256::digest(scoped_key.as_bytes());
    let mut out = [0u8; 12];
    out.copy_from_slice(&digest[..12]);
    out
}

/// Maps the scripts' refusals to errors; `Ok` for anything else.
fn args_with_cell(mut args: Value, cell: &CellRef) -> Value {
    args["cell"] = json!(cell.id);
    args
}

pub(crate) fn check_refusal(reply: &Value) -> Result<()> {
    match reply["status"].as_str() {
        Some("not_found") => Err(AllocatorError::NotFound),
        Some("idempotency_key_reused") => Err(AllocatorError::IdempotencyKeyReused),
        Some("bad_argument") => Err(AllocatorError::InvalidRequest(
            reply["reason"]
                .as_str()
                .unwrap_or("bad argument")
                .to_owned(),
        )),
        Some("not_held") => {
            let status =
                ReservationStatus::deserialize(&reply["reservation_status"]).map_err(protocol)?;
            Err(AllocatorError::NotHeld { status })
        }
        Some(_) => Ok(()),
        None => Err(AllocatorError::Protocol(format!(
            "reply without status: {reply}"
        ))),
    }
}

/// An integer the scripts send as a decimal string (Lua's cjson keeps only
/// 14 digits of a number) or, when small, as a number.
pub(crate) fn exact_integer(value: &Value) -> Result<u64> {
    match value {
        Value::String(text) => text
            .parse()
            .map_err(|_| AllocatorError::Protocol(format!("integer {text:?}"))),
        Value::Number(number) => number
            .as_u64()
            .ok_or_else(|| AllocatorError::Protocol(format!("integer {number}"))),
        other => Err(AllocatorError::Protocol(format!("integer {other}"))),
    }
}

pub(crate) fn decode_reservation(reply: Value) -> Result<Reservation> {
    check_refusal(&reply)?;
    serde_json::from_value(reply).map_err(protocol)
}

pub(crate) fn decode_hold(key: &StockKey, qty: u32, reply: Value) -> Result<Hold> {
    if reply["status"] == json!("fenced") {
        return Err(AllocatorError::Fenced);
    }
    if reply["status"] == json!("insufficient_stock") {
        return Err(AllocatorError::InsufficientStock {
            lines: vec![ShortLine::at(
                key,
                qty,
                reply["available"].as_i64().unwrap_or_default(),
            )],
        });
    }
    let replayed = reply["replayed"] == json!(true);
    let reservation = decode_reservation(reply)?;
    if reservation.qty != qty || reservation.status != ReservationStatus::Held && !replayed {
        warn!(
            ?reservation,
            qty, "reserve reply does not match the request"
        );
        return Err(AllocatorError::Protocol(format!(
            "reserve of {qty} answered with {reservation:?}"
        )));
    }
    Ok(Hold {
        reservation,
        replayed,
    })
}
