//! The checkout throttle of a flash sale (`checkout_attempts_per_second`):
//! reservation attempts on the sale's key, counted across the whole fleet.
//!
//! Owns admitting or refusing one attempt against the sale's budget. It is
//! product-keyed, not client-keyed: a botnet spread over thousands of
//! addresses still shares one key's budget.
//!
//! **Design: a token bucket in Redis, spent in chunks.** The bucket lives in
//! the sale key's pool partition (`lua/throttle.lua`), fills at the budget
//! in Redis time and holds one second of it (the burst). A node takes a
//! chunk of tokens (a tenth of a second of its own recent attempts, at
//! least one, at most a fiftieth of the budget) and spends them locally
//! for up to [`TOKEN_LIFE`]; when the bucket has none it answers how long
//! until the node's chunk is there, and the node refuses locally (429 with
//! `Retry-After`) until then without asking again.
//!
//! * **The bound.** Every attempt admitted anywhere spends a token the
//!   one bucket issued, so over any run that starts with a full bucket the
//!   fleet admits at most `budget × seconds + burst`, whatever the number
//!   of nodes or how unevenly load falls on them; in a sliding window a
//!   token spent up to [`TOKEN_LIFE`] after its issue adds at most
//!   `budget × TOKEN_LIFE`.
//!   Where it can give more, each bounded: Redis time stepping *forward*
//!   refills for the jump (one burst at most); a failover that loses the
//!   last writes to the bucket gives those tokens again (one burst at most);
//!   a sale renamed while active starts a new, full bucket; and while a
//!   budget change rolls out, nodes still on the old config refill at the
//!   old budget. A step *back* refills nothing for the step and carries on.
//! * **The cost.** One script call on the pool's master per chunk. At
//!   saturation a node asks about fifty times a second (a chunk is 20 ms
//!   of the budget, and an empty bucket tells it to wait until its chunk is
//!   there), so the pool's master takes about fifty calls a second per
//!   node; below the budget, one per chunk of each node's attempts. Tokens
//!   a node took and did not spend lapse, and a cart refused on a later
//!   line has spent its earlier lines' tokens, so the fleet may admit
//!   somewhat less than the budget, never more.
//! * **Not chosen: per-node shares** (`budget / fleet_size` per node, no
//!   Redis call, as the per-API-key limits do). Free, but the fleet's
//!   bound then holds only while `node.fleet_size` is right, and a node
//!   that takes more than its share of the traffic refuses while others
//!   have budget idle.
//!
//! Every node throttles a sale's key while the sale is active, whether or
//! not the node has a bucket in it. An attempt is throttled before its
//! Idempotency-Key is looked up, so a retry of an answered request is
//! throttled too (telling it from a new one would take a Redis call per
//! attempt). When Redis does not answer, the attempt fails closed (503), as
//! the hold itself would, and so does every attempt on the key for
//! [`FAILURE_PAUSE`] after (callers do not queue up behind one another's
//! timeouts).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::scripts::Op;
use crate::{Allocator, AllocatorError, RateMeter, Result, StockKey, check_refusal};

/// How long a node may spend tokens it took from the bucket.
pub const TOKEN_LIFE: Duration = Duration::from_millis(250);

/// How long a node fails attempts on the key at once after the bucket's
/// Redis did not answer.
pub const FAILURE_PAUSE: Duration = Duration::from_millis(250);

/// The share of a second of a node's own attempts one chunk covers.
const CHUNK_SECONDS: f64 = 0.1;

/// The largest chunk, as a share of the budget (so a chunk is at most
/// 20 ms of the fleet's budget).
const CHUNK_OF_BUDGET: u32 = 50;

/// One sale's throttle on this node.
#[derive(Debug)]
pub struct Throttle {
    /// The sale's name (its bucket's name in Redis).
    sale: String,
    /// The sale's key.
    key: StockKey,
    /// The fleet's budget, attempts per second (also the burst).
    per_second: u32,
    /// This node's attempts on the key (for chunk sizes).
    attempts: RateMeter,
    /// Tokens taken and not spent yet.
    local: tokio::sync::Mutex<Local>,
    /// Attempts this node refused.
    refused: AtomicU64,
}

#[derive(Debug, Default)]
struct Local {
    tokens: u64,
    /// Until when `tokens` may be spent.
    spend_until: Option<Instant>,
    /// The bucket had none: refuse locally until then.
    empty_until: Option<Instant>,
    /// The bucket's Redis did not answer: fail at once until then.
    failed_until: Option<Instant>,
}

impl Throttle {
    /// The throttle of sale `sale` on `key` at `per_second` attempts.
    pub fn new(sale: &str, key: StockKey, per_second: u32) -> Self {
        Self {
            sale: sale.to_owned(),
            key,
            per_second: per_second.max(1),
            attempts: RateMeter::default(),
            local: tokio::sync::Mutex::new(Local::default()),
            refused: AtomicU64::new(0),
        }
    }

    /// The sale's name.
    pub fn sale(&self) -> &str {
        &self.sale
    }

    /// The sale's key.
    pub fn key(&self) -> &StockKey {
        &self.key
    }

    /// The fleet's budget, attempts per second.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Attempts this node refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Tokens to ask the bucket for: a tenth of a second of this node's
    /// attempts, within 1 and a fiftieth of the budget.
    fn chunk(&self) -> u64 {
        let most = u64::from((self.per_second / CHUNK_OF_BUDGET).max(1));
        let wanted = (self.attempts.units_per_second() * CHUNK_SECONDS).ceil() as u64;
        wanted.clamp(1, most)
    }

    fn refusal(&self, wait: Duration) -> AllocatorError {
        self.refused.fetch_add(1, Ordering::Relaxed);
        AllocatorError::RateLimited {
            reason: format!(
                "checkout attempts on {} are over flash sale {}'s {} per second",
                self.key, self.sale, self.per_second
            ),
            retry_after: wait,
        }
    }

    /// Admits one attempt, or refuses it with how long to wait.
    pub async fn admit(&self, allocator: &Allocator) -> Result<()> {
        self.attempts.record(1);
        // One caller at a time asks the bucket: the others wait for its
        // chunk rather than each taking one (unspent tokens lapse).
        let mut local = self.local.lock().await;
        let now = Instant::now();
        if local.tokens > 0 && local.spend_until.is_some_and(|until| now < until) {
            local.tokens -= 1;
            return Ok(());
        }
        if let Some(until) = local.empty_until
            && now < until
        {
            return Err(self.refusal(until - now));
        }
        if local.failed_until.is_some_and(|until| now < until) {
            return Err(AllocatorError::StoreUnavailable(format!(
                "flash sale {}'s checkout throttle could not reach redis a moment ago",
                self.sale
            )));
        }
        let want = self.chunk();
        let partition = self.key.partition(allocator.settings.partitions);
        let asked = allocator
            .call(
                Op::Throttle,
                partition,
                json!({
                    "sale": self.sale,
                    "per_second": self.per_second,
                    "burst": self.per_second,
                    "want": want,
                }),
            )
            .await;
        let reply = match asked {
            Ok(reply) => reply,
            Err(error) => {
                local.failed_until = Some(Instant::now() + FAILURE_PAUSE);
                return Err(error);
            }
        };
        check_refusal(&reply)?;
        let granted = reply["granted"].as_u64().unwrap_or(0);
        if granted > 0 {
            *local = Local {
                tokens: granted - 1,
                spend_until: Some(now + TOKEN_LIFE),
                ..Local::default()
            };
            return Ok(());
        }
        let wait = Duration::from_millis(reply["wait_ms"].as_u64().unwrap_or(1).max(1));
        *local = Local {
            empty_until: Some(now + wait),
            ..Local::default()
        };
        Err(self.refusal(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_one_token_at_least_and_a_fiftieth_of_the_budget_at_most() {
        let quiet = Throttle::new("s", StockKey::new("m", "s", "l"), 10);
        assert_eq!(quiet.chunk(), 1);
        let busy = Throttle::new("s", StockKey::new("m", "s", "l"), 10_000);
        assert_eq!(busy.chunk(), 1, "no attempts measured yet");
        for _ in 0..1_000_000 {
            busy.attempts.record(1);
        }
        assert_eq!(busy.chunk(), 200);
    }
}
