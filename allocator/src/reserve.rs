//! Reservation requests end to end: the one idempotency record of a request,
//! where its hold lands, coalescing, and the flash-sale hot path.
//!
//! Owns the node-local entry point [`Reserver::reserve`] (and the
//! [`Allocator`] forms tests and tools use): the gateway parses HTTP and maps
//! errors; it never builds a cell, a reservation id or a fingerprint.
//!
//! **One record per (merchant, Idempotency-Key).** A request's *claim*
//! (`lua/claim.lua`) lives in the partition of a keyed hash of the pair (no
//! client text is stored anywhere: not in Redis keys, records, the ledger or
//! Kafka). The first caller records the request's fingerprint, where the
//! first attempt holds (the pool, or this node's bucket; for a cart, its
//! id) and as what reservation id, and takes a lease. The hold runs. A
//! refusal (409 insufficient stock, 404 no such key) or a cart's answer is
//! then stored in the claim; a one-line hold *is* its answer and is not
//! stored again (that saved one script call of three per reservation): its
//! reservation id is fixed by the claim, so a retry finds it at the claim's
//! placement and answers it as it was made (`Reservation::answer`: status
//! held, the expiry it was made with). Every later use of the key, on any
//! node, before or after a sale starts or ends, gets the first answer
//! (`replayed`); another body is refused. A caller that finds the claim
//! pending with its lease live answers from the hold once it is there, or
//! waits; one that finds the lease lapsed (the first caller died, or Redis
//! failed it half way) takes the claim over and runs *the same attempt
//! again*: same cell, same reservation id, which the cell's script answers
//! as it stands if it was held, so a request never holds twice. A refusal
//! writes nothing, so re-running one decides anew.
//!
//! **A slow caller cannot hold after a takeover.** Each hold carries
//! `hold_by_ms`, its claim's lease end less [`CLAIM_CLOCK_MARGIN`]; the
//! cell's script makes no new hold at or after it. So once a lease has
//! lapsed (by the claim shard's clock) no hold of the lapsed caller can
//! land, and the caller that took over decides alone: if it stores a
//! refusal, no hold of that attempt exists or will. The margin covers the
//! skew between two shards' clocks.
//!
//! **Ids, and a claim's life.** A cart's line ids derive from the claim's
//! digest and life, its attempt and the line's index (`line|…`), its own id
//! from the digest and life (`cart|…`), and a one-line reservation's from
//! the digest, life and attempt (`one|…`): no client key can reach another
//! request's ids. The life is a fresh value the caller that makes the claim
//! records in it. A claim answers for 24 h less 10 min from its first use;
//! after that the key names a new request, whose new life makes new ids:
//! the holds, carts and lines of the life before are kept longer (24 h
//! after they end) and must never be answered, or held again, as the new
//! request's. An attempt that cannot end
//! (a store error half way, or a takeover that finds one of its lines no
//! longer held) releases what it held and is abandoned (`advance`): the
//! next attempt holds with fresh line ids, so a retried cart never reuses a
//! line that was released.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::allowance::{CustomerLimit, Grant};
use crate::cart::{CartLine, CartRequest, CartView};
use crate::keys::{self, CellRef, StockKey};
use crate::placement::LocationDefaults;
use crate::scripts::Op;
use crate::{
    Allocator, AllocatorError, CART_LINES_MAX, CartHold, FlashSale, Hold, HotOutcomes, RateMeter,
    ReservationStatus, Result, ShortLine, Throttle, check_refusal, decode_hold, derive_random,
    protocol,
};

/// How long a claim's lease lasts: longer than any one attempt takes
/// (the hot path is bounded well under it).
const CLAIM_LEASE: Duration = Duration::from_secs(10);

/// How much earlier than its claim's lease a caller stops making new holds
/// (`hold_by_ms`): more than the clocks of two Redis shards can differ, so a
/// slow caller's hold never lands after another caller took the claim over
/// (the lease is timed by the claim's shard, the hold by the cell's).
pub const CLAIM_CLOCK_MARGIN: Duration = Duration::from_secs(2);

/// A held one-line request that took longer than this from its claim's
/// opening stores its answer in the claim as well, and releases its hold if
/// another caller answered meanwhile: near the lease's end the clocks'
/// margin is all that keeps a takeover from deciding alongside it, and
/// this check does not rest on clocks.
const ANSWER_IN_CLAIM_AFTER: Duration = Duration::from_secs(5);

/// How long a second caller waits for a claim another caller holds.
const CLAIM_WAIT_MAX: Duration = Duration::from_secs(3);
const CLAIM_POLL: Duration = Duration::from_millis(20);

/// One hold of one cell whose request is already claimed: the cell and the
/// reservation id come from the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest {
    /// The stock key.
    pub key: StockKey,
    /// Units, 1..=1,000,000.
    pub qty: u32,
    /// Hold lifetime, ms.
    pub ttl_ms: u64,
    /// How long past `ttl_ms` the units stay held (cart lines).
    pub grace_ms: u64,
    /// The reservation id the claim fixed.
    pub reservation_id: String,
    /// Keyed hash of the customer reference.
    pub customer_hash: Option<String>,
    /// The cart a line belongs to.
    pub cart_id: Option<String>,
    /// A new hold is made only before this Redis time (ms): the request's
    /// claim lease less [`CLAIM_CLOCK_MARGIN`]. After it another caller may
    /// have taken the claim over, and this caller's hold must not land.
    pub hold_by_ms: Option<u64>,
    /// The partition of the customer's allowance that paid for the hold
    /// (a flash sale's customer limits, `crate::allowance`): its end gives
    /// the allowance back.
    pub allowance_partition: Option<u32>,
}

impl HoldRequest {
    /// This request's fields as `lua/reserve_batch.lua` reads them (see
    /// `hold_requests` in `lua/lib.lua`): plain strings, empty for none.
    fn push_argv(&self, argv: &mut Vec<String>) {
        argv.push(self.reservation_id.clone());
        argv.push(self.qty.to_string());
        argv.push(self.ttl_ms.to_string());
        argv.push(self.grace_ms.to_string());
        argv.push(self.customer_hash.clone().unwrap_or_default());
        argv.push(self.cart_id.clone().unwrap_or_default());
        argv.push(self.hold_by_ms.map(|ms| ms.to_string()).unwrap_or_default());
        argv.push(
            self.allowance_partition
                .map(|partition| partition.to_string())
                .unwrap_or_default(),
        );
    }

    /// The answer `lua/reserve_batch.lua` gave this request (see
    /// `reserve_many` in `lua/lib.lua`), at Redis time `now_ms`.
    fn decode_answer(&self, cell: &CellRef, now_ms: u64, answer: &Value) -> Result<Hold> {
        let unexpected = || AllocatorError::Protocol(format!("reserve_batch answer: {answer}"));
        match answer[0].as_str().ok_or_else(unexpected)? {
            "h" => Ok(Hold {
                reservation: crate::Reservation {
                    reservation_id: self.reservation_id.clone(),
                    merchant: self.key.merchant.clone(),
                    sku: self.key.sku.clone(),
                    location: self.key.location.clone(),
                    cell: cell.id.clone(),
                    qty: self.qty,
                    backordered: answer[1]
                        .as_u64()
                        .and_then(|units| u32::try_from(units).ok())
                        .ok_or_else(unexpected)?,
                    status: ReservationStatus::Held,
                    expires_at_ms: now_ms + self.ttl_ms,
                    hold_until_ms: now_ms + self.ttl_ms + self.grace_ms,
                    cart_id: self.cart_id.clone(),
                    held_expires_at_ms: None,
                    allow_p: self.allowance_partition,
                },
                replayed: false,
            }),
            "p" => decode_hold(&self.key, self.qty, answer[1].clone()),
            "s" => Err(AllocatorError::InsufficientStock {
                lines: vec![ShortLine::at(
                    &self.key,
                    self.qty,
                    answer[1].as_i64().ok_or_else(unexpected)?,
                )],
            }),
            "f" => Err(AllocatorError::Fenced),
            "n" => Err(AllocatorError::NotFound),
            // This caller's claim lease ran out before its hold: another
            // caller may be deciding the request now.
            "l" => Err(AllocatorError::InProgress),
            "b" => Err(AllocatorError::InvalidRequest(
                answer[1].as_str().unwrap_or("bad argument").to_owned(),
            )),
            _ => Err(unexpected()),
        }
    }
}

/// A flash sale in force on this node: what the hot path needs.
#[derive(Debug)]
pub struct HotKey {
    /// The sale.
    pub sale: FlashSale,
    /// Its activation epoch (same on every node for the same config).
    pub epoch: String,
    /// This node's reservation rate on the key, for refill sizes.
    pub meter: RateMeter,
    /// What this node's hot path answered for the sale.
    pub outcomes: HotOutcomes,
}

impl HotKey {
    /// A sale put in force at `epoch`, with nothing measured yet.
    pub fn new(sale: FlashSale, epoch: String) -> Self {
        Self {
            sale,
            epoch,
            meter: RateMeter::default(),
            outcomes: HotOutcomes::default(),
        }
    }
}

/// The answer stored in a claim: what every use of the key gets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub(crate) enum Stored {
    Held {
        cart: CartView,
    },
    InsufficientStock {
        lines: Vec<ShortLine>,
    },
    NotFound,
    CustomerLimit {
        sale: String,
        limit: u64,
        used: u64,
        counts: String,
    },
}

impl Stored {
    fn into_result(self, replayed: bool) -> Result<CartHold> {
        match self {
            Stored::Held { cart } => Ok(CartHold {
                cart: cart.number_lines(),
                replayed,
            }),
            Stored::InsufficientStock { lines } => Err(AllocatorError::InsufficientStock { lines }),
            Stored::NotFound => Err(AllocatorError::NotFound),
            Stored::CustomerLimit {
                sale,
                limit,
                used,
                counts,
            } => Err(AllocatorError::CustomerLimit {
                sale,
                limit,
                used,
                counts,
            }),
        }
    }
}

/// A claim this caller holds.
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    pub(crate) partition: u32,
    pub(crate) digest: String,
    pub(crate) token: u64,
    pub(crate) attempt: u64,
    pub(crate) taken_over: bool,
    /// When this caller's lease ends (Redis time of the claim's shard, ms).
    pub(crate) lease_until_ms: u64,
    /// The claim's life: every id the request makes derives from it and the
    /// digest (empty for claims made before lives were kept).
    pub(crate) life: String,
    /// Where a one-line request's attempt holds (fixed at the first use).
    placement: Option<(CellRef, String)>,
    /// The holds the current attempt of a request of several makes (JSON
    /// text, `crate::allocate`), recorded before any of them.
    pub(crate) plan: Option<String>,
    /// Whether the claim was made for a request of several holds (claims
    /// made before plans were recorded are not).
    pub(crate) planned: bool,
    /// The plan of the last attempt abandoned (its holds released, unless
    /// the caller that abandoned it died first).
    pub(crate) abandoned: Option<String>,
}

enum Opened {
    Claimed(Claim),
    Done(Stored),
}

/// What a claim made now records besides the request's fingerprint and
/// life: where a one-line request holds, or a request of several holds'
/// first plan.
#[derive(Default)]
struct Proposal<'a> {
    placement: Option<(CellRef, String)>,
    plan: Option<&'a str>,
    /// A request of several holds (its claim is marked so).
    planned: bool,
}

/// How a caller opens a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenMode {
    /// A request arriving: makes the claim if there is none; a live lease
    /// of another caller is answered by its one-line hold once that landed.
    First,
    /// A caller whose claim was taken over: waits for the stored answer
    /// only (its own hold may be what the caller that took over refused to
    /// store, when clocks are off by more than the margin).
    Reopen,
    /// A request that may not make a claim (it lacks the `customer_ref` a
    /// customer limit needs): as `First` when its claim exists (a retry of
    /// a request made before the limit was in force gets its answer), and
    /// `NotFound` when it does not.
    Existing,
}

/// Where a request's holds go and how.
pub(crate) struct Route<'a> {
    /// The flash sales in force on this node on the request's SKUs.
    pub(crate) hot: Vec<&'a HotKey>,
    pub(crate) coalescer: Option<&'a Coalescer>,
    /// The customer limits of the flash sales on the request's keys.
    pub(crate) limits: &'a [Arc<CustomerLimit>],
    /// The config's location settings (placement of lines without a
    /// location).
    pub(crate) locations: &'a LocationDefaults,
}

impl<'a> Route<'a> {
    /// A route with no sale, limit, coalescing or configured location.
    fn plain(hot: Option<&'a HotKey>) -> Self {
        Route {
            hot: hot.into_iter().collect(),
            coalescer: None,
            limits: &[],
            locations: no_locations(),
        }
    }

    pub(crate) fn limit(&self, key: &StockKey) -> Option<&CustomerLimit> {
        self.limits
            .iter()
            .find(|limit| limit.key == *key)
            .map(|limit| &**limit)
    }

    /// The sale in force here on `key`.
    pub(crate) fn hot_of(&self, key: &StockKey) -> Option<&'a HotKey> {
        self.hot.iter().copied().find(|hot| hot.sale.key == *key)
    }
}

/// The empty location defaults (requests made without a config).
fn no_locations() -> &'static LocationDefaults {
    static NONE: std::sync::OnceLock<LocationDefaults> = std::sync::OnceLock::new();
    NONE.get_or_init(LocationDefaults::new)
}

impl Allocator {
    /// The keyed hash (HMAC-SHA-256 with `auth.customer_ref_key`) naming a
    /// request's claim: no client text is stored.
    pub(crate) fn request_digest(&self, merchant: &str, idempotency_key: &str) -> String {
        self.keyed_hash(&format!("request\u{1f}{merchant}\u{1f}{idempotency_key}"))
    }

    fn claim_partition(&self, digest: &str) -> u32 {
        StockKey::new("claim", digest, "claim").partition(self.settings.partitions)
    }

    /// The partition where the request `(merchant, idempotency_key)` keeps
    /// its claim and, for a cart, its cart record.
    pub fn request_partition(&self, merchant: &str, idempotency_key: &str) -> u32 {
        self.claim_partition(&self.request_digest(merchant, idempotency_key))
    }

    /// Opens the request's claim (see the module docs). `life` is what a
    /// claim made now records; `placement` where its one-line attempt
    /// holds. After losing a claim (`Reopen`), the caller only waits for the
    /// answer stored in it: it makes no claim and does not read the hold.
    async fn open_claim(
        &self,
        digest: &str,
        fingerprint: &str,
        life: &str,
        proposal: Proposal<'_>,
        mode: OpenMode,
    ) -> Result<Opened> {
        let Proposal {
            placement,
            plan,
            planned,
        } = proposal;
        let partition = self.claim_partition(digest);
        let started = Instant::now();
        loop {
            let mut args = json!({
                "action": "open", "digest": digest, "fingerprint": fingerprint,
                "lease_ms": CLAIM_LEASE.as_millis() as u64, "life": life,
            });
            if matches!(mode, OpenMode::Reopen | OpenMode::Existing) {
                args["existing_only"] = json!(true);
            }
            if let Some((cell, reservation_id)) = &placement {
                args["cell"] = json!(cell.id);
                args["cell_partition"] = json!(cell.partition);
                args["reservation_id"] = json!(reservation_id);
            }
            if let Some(plan) = plan {
                args["plan"] = json!(plan);
            }
            if planned {
                args["planned"] = json!(true);
            }
            let reply = self.call(Op::Claim, partition, args).await?;
            match reply["status"].as_str() {
                Some("claimed") => {
                    let placement = match (
                        reply["cell"].as_str(),
                        reply["cell_partition"].as_u64(),
                        reply["reservation_id"].as_str(),
                    ) {
                        (Some(cell), Some(cell_partition), Some(id)) => Some((
                            CellRef {
                                partition: cell_partition as u32,
                                id: cell.to_owned(),
                            },
                            id.to_owned(),
                        )),
                        _ => None,
                    };
                    return Ok(Opened::Claimed(Claim {
                        partition,
                        digest: digest.to_owned(),
                        token: reply["token"].as_u64().ok_or_else(|| {
                            AllocatorError::Protocol(format!("claim reply: {reply}"))
                        })?,
                        attempt: reply["attempt"].as_u64().unwrap_or_default(),
                        taken_over: reply["taken_over"] == json!(true),
                        lease_until_ms: reply["lease_until_ms"].as_u64().ok_or_else(|| {
                            AllocatorError::Protocol(format!("claim reply: {reply}"))
                        })?,
                        life: reply["life"].as_str().unwrap_or_default().to_owned(),
                        placement,
                        plan: reply["plan"].as_str().map(str::to_owned),
                        planned: reply["planned"] == json!(true),
                        abandoned: reply["abandoned"].as_str().map(str::to_owned),
                    }));
                }
                Some("done") => return Ok(Opened::Done(stored(&reply)?)),
                Some("in_progress") => {
                    // A one-line request is answered by its hold once that
                    // has landed: its holder does not store the answer.
                    if let (Some(id), OpenMode::First | OpenMode::Existing) =
                        (reply["reservation_id"].as_str(), mode)
                    {
                        match self.reservation(None, id).await {
                            Ok(reservation) => {
                                return Ok(Opened::Done(Stored::Held {
                                    cart: reservation.answer(),
                                }));
                            }
                            Err(AllocatorError::NotFound) => {}
                            Err(other) => return Err(other),
                        }
                    }
                    if started.elapsed() >= CLAIM_WAIT_MAX {
                        return Err(AllocatorError::InProgress);
                    }
                    tokio::time::sleep(CLAIM_POLL).await;
                }
                // A reopened claim that is gone (past its life): there is no
                // answer to wait for; a retry makes a new claim.
                Some("not_found") if mode == OpenMode::Reopen => {
                    return Err(AllocatorError::InProgress);
                }
                _ => {
                    check_refusal(&reply)?;
                    return Err(AllocatorError::Protocol(format!("claim reply: {reply}")));
                }
            }
        }
    }

    pub(crate) async fn finish_claim(
        &self,
        claim: &Claim,
        answer: &Stored,
    ) -> Result<Option<Stored>> {
        let text = serde_json::to_string(answer).map_err(protocol)?;
        let args = json!({ "action": "finish", "digest": claim.digest, "token": claim.token, "reply": text });
        let reply = self.call(Op::Claim, claim.partition, args).await?;
        match reply["status"].as_str() {
            Some("done") => Ok(Some(stored(&reply)?)),
            Some("lost") => Ok(None),
            _ => {
                check_refusal(&reply)?;
                Err(AllocatorError::Protocol(format!("claim finish: {reply}")))
            }
        }
    }

    /// Abandons the claim's current attempt (the next one has no plan
    /// until one is recorded). False when another caller holds the claim
    /// now.
    pub(crate) async fn advance_claim(&self, claim: &mut Claim) -> Result<bool> {
        let args = json!({
            "action": "advance", "digest": claim.digest, "token": claim.token,
            "lease_ms": CLAIM_LEASE.as_millis() as u64,
        });
        let reply = self.call(Op::Claim, claim.partition, args).await?;
        match reply["status"].as_str() {
            Some("ok") => {
                claim.attempt = reply["attempt"].as_u64().unwrap_or(claim.attempt + 1);
                if let Some(lease_until_ms) = reply["lease_until_ms"].as_u64() {
                    claim.lease_until_ms = lease_until_ms;
                }
                Ok(true)
            }
            Some("lost") => Ok(false),
            _ => {
                check_refusal(&reply)?;
                Err(AllocatorError::Protocol(format!("claim advance: {reply}")))
            }
        }
    }

    /// The request's fingerprint: SHA-256 of its canonical JSON, the
    /// request as sent (a line's location, or its preferences and split).
    /// A request of fixed locations has the form it had before allocation,
    /// so a claim made before an upgrade still matches its retries.
    fn request_fingerprint(&self, request: &CartRequest) -> String {
        let lines: Vec<Value> = request
            .lines
            .iter()
            .map(|line| match &line.location {
                Some(location) if !line.substitutes => json!([line.sku, location, line.qty]),
                location => json!({
                    "sku": line.sku, "location": location, "qty": line.qty, "prefer": line.prefer,
                    "split": line.allow_split, "substitutes": line.substitutes,
                }),
            })
            .collect();
        let customer = request
            .customer_ref
            .as_deref()
            .map(|reference| self.customer_hash(reference));
        let ttl_ms = request.ttl.map(|ttl| ttl.as_millis() as u64);
        let mut canonical = json!({ "merchant": request.merchant, "lines": lines, "ttl_ms": ttl_ms, "customer": customer });
        if request.allow_partial {
            canonical["partial"] = json!(true);
        }
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }

    fn check_cart(request: &CartRequest) -> Result<()> {
        if request.lines.is_empty() || request.lines.len() > CART_LINES_MAX {
            return Err(AllocatorError::InvalidRequest(format!(
                "a cart has 1 to {CART_LINES_MAX} lines"
            )));
        }
        if let Some(line) = request
            .lines
            .iter()
            .find(|line| !(1..=crate::limits::QTY_MAX).contains(&line.qty))
        {
            return Err(AllocatorError::InvalidRequest(format!(
                "qty of {} must be between 1 and {}",
                line.sku,
                crate::limits::QTY_MAX
            )));
        }
        if let Some(line) = request
            .lines
            .iter()
            .find(|line| line.location.is_some() && (line.allow_split || !line.prefer.is_empty()))
        {
            return Err(AllocatorError::InvalidRequest(format!(
                "the line of {} names its location: prefer and allow_split are for lines without one",
                line.sku
            )));
        }
        if let Some(line) = request
            .lines
            .iter()
            .find(|line| line.prefer.len() > crate::limits::PREFER_MAX)
        {
            return Err(AllocatorError::InvalidRequest(format!(
                "the line of {} prefers more than {} locations",
                line.sku,
                crate::limits::PREFER_MAX
            )));
        }
        let mut seen = HashSet::new();
        if !request
            .lines
            .iter()
            .all(|line| seen.insert((&line.sku, &line.location)))
        {
            return Err(AllocatorError::InvalidRequest(
                "a sku may appear once per cart at each location, and once without one".to_owned(),
            ));
        }
        Ok(())
    }

    /// The one line of a request that is a single hold at a named
    /// location (the path of one script call), if it is one.
    fn single_hold(request: &CartRequest) -> Option<(&CartLine, &str)> {
        match request.lines.as_slice() {
            [line] if !request.allow_partial && !line.substitutes => {
                line.location.as_deref().map(|location| (line, location))
            }
            _ => None,
        }
    }

    /// The cell a hold of `key` lands in: this node's bucket while a sale
    /// of the key is in force here, else the key's pool.
    pub(crate) fn cell_for(&self, key: &StockKey, hot: Option<&HotKey>) -> CellRef {
        match hot {
            Some(hot) => hot
                .sale
                .bucket(&self.settings.node, self.settings.partitions),
            None => key.pool(self.settings.partitions),
        }
    }

    /// The whole flow of one request: claim, hold, store the answer.
    pub(crate) async fn reserve_claimed(
        &self,
        request: &CartRequest,
        route: Route<'_>,
    ) -> Result<CartHold> {
        Self::check_cart(request)?;
        let ttl_ms = self.ttl_ms(request.ttl)?;
        let digest = self.request_digest(&request.merchant, &request.idempotency_key);
        let fingerprint = self.request_fingerprint(request);
        // The life a claim made now records (unique to this attempt).
        let life = claim_life(&self.settings.node);
        let single = Self::single_hold(request);
        let placement = single.map(|(line, location)| {
            let key = StockKey::new(&request.merchant, &line.sku, location);
            let cell = self.cell_for(&key, route.hot_of(&key));
            let id = one_line_id(cell.partition, &digest, &life, 0);
            (cell, id)
        });
        // A request of several holds plans its first attempt before its
        // claim is made, so the claim records the plan before any hold.
        // A plan that cannot be made (its read failed, or it places more
        // holds than one reservation makes) refuses the request, unless the
        // request has its claim already: a retry gets its answer whatever
        // a read says now.
        let mut opened_already = None;
        let plan = match single {
            Some(_) => None,
            None => {
                match Box::pin(self.plan_all(request, &route, &lived(&digest, &life), 0)).await {
                    Ok(plan) => Some(plan),
                    Err(error) => {
                        match Box::pin(self.open_claim(
                            &digest,
                            &fingerprint,
                            &life,
                            Proposal {
                                planned: true,
                                ..Proposal::default()
                            },
                            OpenMode::Existing,
                        ))
                        .await
                        {
                            Ok(opened) => opened_already = Some(opened),
                            Err(reused @ AllocatorError::IdempotencyKeyReused) => {
                                return Err(reused);
                            }
                            Err(_) => return Err(error),
                        }
                        None
                    }
                }
            }
        };
        let opened_at = Instant::now();
        // A limited key needs the customer; a request without one may only
        // be a retry of one made before the limit was in force.
        let mode = match (route.limits.first(), &request.customer_ref) {
            (Some(_), None) => OpenMode::Existing,
            _ => OpenMode::First,
        };
        let plan_text = plan.as_ref().and_then(|plan| plan.text());
        let opening = match opened_already {
            Some(opened) => Ok(opened),
            None => {
                self.open_claim(
                    &digest,
                    &fingerprint,
                    &life,
                    Proposal {
                        placement,
                        plan: plan_text.as_deref(),
                        planned: single.is_none(),
                    },
                    mode,
                )
                .await
            }
        };
        let opened = match opening {
            Err(AllocatorError::NotFound) if mode == OpenMode::Existing => {
                let limit = &route.limits[0];
                return Err(AllocatorError::InvalidRequest(format!(
                    "customer_ref is required: flash sale {} limits what one customer may reserve of {} at {}",
                    limit.sale, limit.key.sku, limit.key.location
                )));
            }
            other => other?,
        };
        let mut claim = match opened {
            Opened::Claimed(claim) => claim,
            Opened::Done(stored) => return stored.into_result(true),
        };
        let outcome = match (single, plan) {
            // Boxed, like the rarer paths below: the future of a request
            // is moved and boxed per request, and each path's state would
            // otherwise be carried by all of them.
            (Some((line, location)), _) => {
                Box::pin(self.hold_one(&claim, request, line, location, ttl_ms, &route)).await
            }
            (None, plan) => {
                Box::pin(self.hold_planned(&mut claim, request, plan, ttl_ms, &route)).await
            }
        };
        let (answer, replayed) = match outcome {
            // A one-line hold is its request's answer: it lives with the
            // units (its reservation id is fixed by the claim, and a retry
            // finds it there), so it is not stored in the claim as well;
            // except after a takeover (retries of this request: the claim
            // answers the next ones without the cell) or a slow attempt.
            Ok(hold)
                if single.is_some()
                    && !claim.taken_over
                    && opened_at.elapsed() < ANSWER_IN_CLAIM_AFTER =>
            {
                return Ok(CartHold {
                    cart: hold.cart,
                    replayed: hold.replayed || claim.taken_over,
                });
            }
            Ok(hold) => (Stored::Held { cart: hold.cart }, hold.replayed),
            Err(AllocatorError::InsufficientStock { lines }) => {
                (Stored::InsufficientStock { lines }, false)
            }
            Err(AllocatorError::NotFound) => (Stored::NotFound, false),
            Err(AllocatorError::CustomerLimit {
                sale,
                limit,
                used,
                counts,
            }) => (
                Stored::CustomerLimit {
                    sale,
                    limit,
                    used,
                    counts,
                },
                false,
            ),
            // Nothing is known to be decided: the claim stays pending and a
            // retry after its lease runs this attempt again.
            Err(other) => return Err(other),
        };
        match self.finish_claim(&claim, &answer).await? {
            Some(stored) => {
                Box::pin(self.drop_if_not_answered(&request.merchant, &answer, &stored)).await;
                stored.into_result(replayed || claim.taken_over)
            }
            // Another caller took the claim over meanwhile (this one was
            // slower than the lease): its answer is the one to give.
            None => match Box::pin(self.open_claim(
                &digest,
                &fingerprint,
                &life,
                Proposal::default(),
                OpenMode::Reopen,
            ))
            .await?
            {
                Opened::Done(stored) => {
                    Box::pin(self.drop_if_not_answered(&request.merchant, &answer, &stored)).await;
                    stored.into_result(true)
                }
                Opened::Claimed(_) => Err(AllocatorError::InProgress),
            },
        }
    }

    /// A hold this caller made that the request's stored answer does not
    /// name (another caller answered first) is released: no hold outlives
    /// its request's answer.
    async fn drop_if_not_answered(&self, merchant: &str, ours: &Stored, answer: &Stored) {
        let Stored::Held { cart: mine } = ours else {
            return;
        };
        if matches!(answer, Stored::Held { cart } if cart.reservation_id == mine.reservation_id) {
            return;
        }
        let key = format!("unanswered|{}", mine.reservation_id);
        if let Err(error) = self
            .release_cart(Some(merchant), &mine.reservation_id, &key)
            .await
        {
            tracing::warn!(reservation = %mine.reservation_id, %error, "cannot release a hold its request did not answer with; it will expire");
        }
    }

    async fn hold_one(
        &self,
        claim: &Claim,
        request: &CartRequest,
        line: &CartLine,
        location: &str,
        ttl_ms: u64,
        route: &Route<'_>,
    ) -> Result<CartHold> {
        let (cell, reservation_id) = claim.placement.clone().ok_or_else(|| {
            AllocatorError::Protocol("a one-line claim without placement".to_owned())
        })?;
        let key = StockKey::new(&request.merchant, &line.sku, location);
        let mut hold = HoldRequest {
            key: key.clone(),
            qty: line.qty,
            ttl_ms,
            grace_ms: 0,
            reservation_id,
            customer_hash: request
                .customer_ref
                .as_deref()
                .map(|reference| self.customer_hash(reference)),
            cart_id: None,
            hold_by_ms: Some(
                claim
                    .lease_until_ms
                    .saturating_sub(CLAIM_CLOCK_MARGIN.as_millis() as u64),
            ),
            allowance_partition: None,
        };
        let grant = self.take_grant(route.limit(&key), &mut hold, claim).await?;
        let held = self.hold_one_cell(&cell, &hold, route).await;
        if let Some(grant) = &grant {
            self.give_back_unless_paid(grant, &held).await;
        }
        let hold = held?;
        Ok(CartHold {
            cart: hold.reservation.answer(),
            replayed: hold.replayed,
        })
    }

    /// Takes the customer's grant for `hold` under `limit` (none without a
    /// limit or a customer), before the hold: see `crate::allowance`.
    pub(crate) async fn take_grant(
        &self,
        limit: Option<&CustomerLimit>,
        hold: &mut HoldRequest,
        claim: &Claim,
    ) -> Result<Option<Grant>> {
        let (Some(limit), Some(customer)) = (limit, hold.customer_hash.as_deref()) else {
            return Ok(None);
        };
        let grant = self
            .take_allowance(
                limit,
                customer,
                &hold.reservation_id,
                hold.qty,
                claim.lease_until_ms,
            )
            .await?;
        hold.allowance_partition = Some(grant.partition);
        // A paid-for hold lands only while the claim's lease lasts (a cart
        // line too): the reconciler's repair rests on it.
        hold.hold_by_ms = Some(
            claim
                .lease_until_ms
                .saturating_sub(CLAIM_CLOCK_MARGIN.as_millis() as u64),
        );
        Ok(Some(grant))
    }

    /// A hold that was refused holds nothing, and one found made already
    /// without this grant (a retry of a request held before the limit was
    /// in force) was not paid for by it: either way the grant goes back at
    /// once. Any other failure may have held (or may yet): the grant stays,
    /// and the reconciler's repair decides once the claim's lease is over.
    pub(crate) async fn give_back_unless_paid(&self, grant: &Grant, held: &Result<Hold>) {
        let unpaid = match held {
            Err(
                AllocatorError::InsufficientStock { .. }
                | AllocatorError::NotFound
                | AllocatorError::InvalidRequest(_),
            ) => true,
            Ok(hold) => hold.replayed && hold.reservation.allow_p != Some(grant.partition),
            Err(_) => false,
        };
        if unpaid {
            self.give_allowance(grant).await;
        }
    }

    /// A hold on the cell its claim fixed, with the hot path behind it
    /// when the key's sale is in force here.
    pub(crate) async fn hold_one_cell(
        &self,
        cell: &CellRef,
        hold: &HoldRequest,
        route: &Route<'_>,
    ) -> Result<Hold> {
        let key = &hold.key;
        let bucket_node = bucket_node_of(&cell.id);
        let first = match route.coalescer {
            Some(coalescer) => coalescer.hold(self, cell, hold.clone()).await,
            None => self.hold(cell, hold).await,
        };
        match (first, route.hot_of(key), bucket_node) {
            (
                Err(
                    AllocatorError::InsufficientStock { .. }
                    | AllocatorError::NotFound
                    | AllocatorError::Fenced,
                ),
                Some(hot),
                Some(node),
            ) => {
                // It counts what it answers in the sale's outcomes.
                Box::pin(self.hold_hot(hot, node, cell, hold)).await
            }
            (Ok(held), Some(hot), _) => {
                if !held.replayed {
                    hot.meter.record(u64::from(hold.qty));
                }
                hot.outcomes.record_hold(&held);
                Ok(held)
            }
            // A bucket whose sale is not in force here (a takeover of
            // another node's attempt): not an answer to remember; a retry
            // on a node where the sale is in force refills it.
            (Err(AllocatorError::Fenced), _, _) => Err(AllocatorError::StoreUnavailable(
                "the request's bucket is fenced and its sale is not in force here".to_owned(),
            )),
            (result, _, _) => result,
        }
    }

    /// Holds one cell for a request already claimed (a pool, or a bucket).
    /// Tests and benchmarks use it to stage holds; requests go through
    /// [`Allocator::reserve`], [`Allocator::reserve_cart`] or [`Reserver`].
    pub async fn hold(&self, cell: &CellRef, hold: &HoldRequest) -> Result<Hold> {
        self.hold_batch(cell, std::slice::from_ref(hold))
            .await?
            .pop()
            .unwrap_or_else(|| Err(AllocatorError::Protocol("an empty batch answer".to_owned())))
    }

    /// Several holds on one cell in one script call (coalescing). Each gets
    /// the answer it would have had alone, in order; the call as a whole
    /// fails only when Redis does.
    pub async fn hold_batch(
        &self,
        cell: &CellRef,
        holds: &[HoldRequest],
    ) -> Result<Vec<Result<Hold>>> {
        if holds.is_empty() || holds.len() > crate::RESERVE_BATCH_MAX {
            return Err(AllocatorError::InvalidRequest(format!(
                "a batch holds 1 to {} requests",
                crate::RESERVE_BATCH_MAX
            )));
        }
        let mut argv = Vec::with_capacity(holds.len() * 6);
        for hold in holds {
            hold.push_argv(&mut argv);
        }
        let reply = self
            .call_with(
                Op::ReserveBatch,
                cell.partition,
                json!({ "cell": cell.id, "count": holds.len() }),
                argv,
            )
            .await?;
        check_refusal(&reply)?;
        let now_ms = reply["now_ms"].as_u64();
        let answers = reply["answers"]
            .as_array()
            .filter(|answers| answers.len() == holds.len());
        let (Some(now_ms), Some(answers)) = (now_ms, answers) else {
            return Err(AllocatorError::Protocol(format!(
                "reserve_batch reply: {reply}"
            )));
        };
        Ok(holds
            .iter()
            .zip(answers)
            .map(|(hold, answer)| hold.decode_answer(cell, now_ms, answer))
            .collect())
    }

    /// Holds units of one stock key's pool for a one-line request,
    /// idempotent on `request.idempotency_key` on every node.
    pub async fn reserve(&self, request: &crate::ReserveRequest) -> Result<Hold> {
        let cart = request.as_cart();
        let hold = self.reserve_claimed(&cart, Route::plain(None)).await?;
        self.line_of(hold).await
    }

    /// Holds a one-line request on a flash-sale key from `node`'s bucket
    /// (this allocator's node must be `node`), refilling and pulling from the
    /// other buckets as needed; see [`Allocator::hold_hot`].
    pub async fn reserve_hot(&self, hot: &HotKey, request: &crate::ReserveRequest) -> Result<Hold> {
        let cart = request.as_cart();
        let hold = self.reserve_claimed(&cart, Route::plain(Some(hot))).await?;
        self.line_of(hold).await
    }

    /// Holds every line of `request` or none (or what it can, with
    /// `allow_partial`), idempotent on `request.idempotency_key` on every
    /// node; holds land in pools.
    pub async fn reserve_cart(&self, request: &CartRequest) -> Result<CartHold> {
        self.reserve_claimed(request, Route::plain(None)).await
    }

    /// [`Allocator::reserve_cart`] on a node where the sales `hot` are in
    /// force (this allocator's node): holds of their keys land in this
    /// node's buckets, through the hot path.
    pub async fn reserve_cart_hot(
        &self,
        hot: &[&HotKey],
        request: &CartRequest,
    ) -> Result<CartHold> {
        let mut route = Route::plain(None);
        route.hot = hot.to_vec();
        self.reserve_claimed(request, route).await
    }

    async fn line_of(&self, hold: CartHold) -> Result<Hold> {
        let reservation = self.reservation(None, &hold.cart.reservation_id).await?;
        Ok(Hold {
            reservation,
            replayed: hold.replayed,
        })
    }
}

/// The node of a bucket cell id (`m|s|l|bucket|node`).
fn bucket_node_of(cell: &str) -> Option<&str> {
    let mut parts = cell.rsplitn(3, '|');
    match (parts.next(), parts.next()) {
        (Some(node), Some("bucket")) => Some(node),
        _ => None,
    }
}

fn one_line_id(partition: u32, digest: &str, life: &str, attempt: u64) -> String {
    keys::reservation_id(
        partition,
        derive_random(&format!("one|{}|{attempt}", lived(digest, life))),
    )
}

/// The digest scoped to a claim's life (claims made before lives were kept
/// have none, and their ids derive from the digest alone, as they did).
pub(crate) fn lived(digest: &str, life: &str) -> String {
    if life.is_empty() {
        digest.to_owned()
    } else {
        format!("{digest}.{life}")
    }
}

/// A fresh claim life: unique per attempt to make a claim (node, time,
/// process, counter), so a key used again after its claim's life never
/// makes the ids of the life before.
fn claim_life(node: &str) -> String {
    hex::encode(&derive_random(&format!("life|{node}|{}", crate::hot::unique_suffix()))[..8])
}

fn stored(reply: &Value) -> Result<Stored> {
    let text = reply["reply"]
        .as_str()
        .ok_or_else(|| AllocatorError::Protocol(format!("claim without a reply: {reply}")))?;
    serde_json::from_str(text).map_err(protocol)
}

type Answer = tokio::sync::oneshot::Sender<Result<Hold>>;

/// The holds waiting on one cell, and how many calls on it are under way.
#[derive(Default)]
struct CellQueue {
    waiting: Vec<(HoldRequest, Answer, Instant)>,
    /// Calls in flight (or lingering before their first flush).
    running: usize,
}

/// How concurrent holds on one cell are coalesced (from the config; a
/// reload replaces it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalescing {
    /// How long the first hold on an idle cell lingers for company before
    /// its call; zero flushes at once (the default: see [`Coalescer`]).
    pub wait: Duration,
    /// A batch this large flushes at once, even while a call is running.
    pub batch_max: usize,
}

/// What a flushed batch was: told to the coalescer's observer (metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Holds in the call.
    pub size: usize,
    /// How long the batch's oldest hold waited for the call to start.
    pub waited: Duration,
}

/// Coalescing: concurrent holds on one cell become one `reserve_batch`
/// script call, and each request still gets its own answer.
///
/// Policy (Nagle's, chosen from the measurements in `bench/report.md`): a
/// hold on a cell with no call running starts a call at once (after
/// `wait`, when that is set); holds that arrive while a call runs queue, and
/// go together in the next call, which starts the moment the running one
/// returns. So an idle node adds no delay, and under load each call carries
/// what arrived during the previous one: batches grow with the load, with no
/// timer to tune. A queue that reaches `batch_max` starts a call of its own
/// at once. Calls run as tasks of their own, so a client that goes away
/// never strands the others.
pub struct Coalescer {
    queues: Arc<Mutex<HashMap<String, CellQueue>>>,
    settings: RwLock<Coalescing>,
    /// Told about every batch flushed (for metrics).
    observe: Arc<dyn Fn(Flushed) + Send + Sync>,
}

impl Coalescer {
    /// A coalescer with `settings`, telling `observe` about every batch.
    pub fn new(settings: Coalescing, observe: Arc<dyn Fn(Flushed) + Send + Sync>) -> Self {
        Self {
            queues: Arc::default(),
            settings: RwLock::new(settings),
            observe,
        }
    }

    /// Applies reloaded settings to the next batches.
    pub fn reconfigure(&self, settings: Coalescing) {
        *self
            .settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = settings;
    }

    fn settings(&self) -> Coalescing {
        *self
            .settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn hold(&self, allocator: &Allocator, cell: &CellRef, hold: HoldRequest) -> Result<Hold> {
        let Coalescing { wait, batch_max } = self.settings();
        let batch_max = batch_max.clamp(1, crate::RESERVE_BATCH_MAX);
        let (answer, reply) = tokio::sync::oneshot::channel();
        // (linger first, batch to run now)
        let start = {
            let mut queues = self
                .queues
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let queue = queues.entry(cell.id.clone()).or_default();
            queue.waiting.push((hold, answer, Instant::now()));
            if queue.running == 0 {
                queue.running = 1;
                Some(wait)
            } else if queue.waiting.len() >= batch_max {
                queue.running += 1;
                Some(Duration::ZERO)
            } else {
                None
            }
        };
        if let Some(linger) = start {
            let run = Run {
                queues: Arc::clone(&self.queues),
                observe: Arc::clone(&self.observe),
                allocator: allocator.clone(),
                cell: cell.clone(),
                batch_max,
                done: false,
            };
            tokio::spawn(run.calls(linger));
        }
        reply.await.unwrap_or_else(|_| {
            Err(AllocatorError::StoreUnavailable(
                "reservation batch was dropped".to_owned(),
            ))
        })
    }
}

/// One running sequence of calls on a cell: each takes what queued while
/// the one before it ran, until the queue is empty.
struct Run {
    queues: Arc<Mutex<HashMap<String, CellQueue>>>,
    observe: Arc<dyn Fn(Flushed) + Send + Sync>,
    allocator: Allocator,
    cell: CellRef,
    batch_max: usize,
    /// Set when the queue was found empty (and this run counted out).
    done: bool,
}

impl Drop for Run {
    /// A run that ends any other way (a panic) still counts itself out; the
    /// holds still queued then get an error rather than wait for ever.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut queues = self
            .queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(queue) = queues.get_mut(&self.cell.id) {
            queue.running = queue.running.saturating_sub(1);
            if queue.running == 0 {
                queues.remove(&self.cell.id);
            }
        }
    }
}

impl Run {
    /// Takes up to `batch_max` of the queue; `None` (and this run ends) when
    /// it is empty.
    fn take(&mut self) -> Option<Vec<(HoldRequest, Answer, Instant)>> {
        let mut queues = self
            .queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(queue) = queues.get_mut(&self.cell.id) else {
            self.done = true;
            return None;
        };
        if queue.waiting.is_empty() {
            queue.running = queue.running.saturating_sub(1);
            if queue.running == 0 {
                queues.remove(&self.cell.id);
            }
            self.done = true;
            return None;
        }
        let size = queue.waiting.len().min(self.batch_max);
        Some(queue.waiting.drain(..size).collect())
    }

    async fn calls(mut self, linger: Duration) {
        if !linger.is_zero() {
            tokio::time::sleep(linger).await;
        }
        while let Some(batch) = self.take() {
            let waited = batch
                .iter()
                .map(|(_, _, queued)| queued.elapsed())
                .max()
                .unwrap_or_default();
            let (holds, answers): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|(hold, answer, _)| (hold, answer))
                .unzip();
            (self.observe)(Flushed {
                size: holds.len(),
                waited,
            });
            match self.allocator.hold_batch(&self.cell, &holds).await {
                Ok(results) => {
                    for (answer, result) in answers.into_iter().zip(results) {
                        let _ = answer.send(result);
                    }
                }
                Err(error) => {
                    let message = error.to_string();
                    for answer in answers {
                        let _ = answer.send(Err(match &error {
                            AllocatorError::StoreUnavailable(_) => {
                                AllocatorError::StoreUnavailable(message.clone())
                            }
                            AllocatorError::InvalidRequest(_) => {
                                AllocatorError::InvalidRequest(message.clone())
                            }
                            _ => AllocatorError::Protocol(message.clone()),
                        }));
                    }
                }
            }
        }
    }
}

/// The node-local entry point for reservation requests: decides where each
/// hold lands (this node's bucket while a flash sale of the key is in force
/// here, else the pool), coalesces concurrent holds on one cell, runs the
/// hot path, and keeps the one idempotency record of every request.
pub struct Reserver {
    /// The stock engine.
    allocator: Allocator,
    /// The sales in force on this node, by key (the gateway's flash-sale
    /// manager keeps it in line with the config).
    hot: RwLock<HashMap<StockKey, Arc<HotKey>>>,
    /// Coalesces concurrent holds on one cell.
    coalescer: Coalescer,
    /// The checkout throttles of the sales active in the fleet, by key
    /// (on every node, a bucket in the sale or not).
    throttles: RwLock<HashMap<StockKey, Arc<Throttle>>>,
    /// The customer limits of the sales active in the fleet, by key (on
    /// every node, likewise).
    customer_limits: RwLock<HashMap<StockKey, Arc<CustomerLimit>>>,
    /// Requests this node answered 409 `customer_limit`, by sale.
    limit_refusals: Mutex<HashMap<String, u64>>,
    /// The config's location settings (priority, ship_from).
    locations: RwLock<Arc<LocationDefaults>>,
}

impl Reserver {
    /// A reserver over `allocator`.
    pub fn new(allocator: Allocator, coalescer: Coalescer) -> Self {
        Self {
            allocator,
            hot: RwLock::default(),
            coalescer,
            throttles: RwLock::default(),
            customer_limits: RwLock::default(),
            limit_refusals: Mutex::default(),
            locations: RwLock::default(),
        }
    }

    /// Puts the config's location settings in force (placement of lines
    /// without a location; the admin API's settings override them).
    pub fn set_location_defaults(&self, defaults: LocationDefaults) {
        *self
            .locations
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(defaults);
    }

    fn location_defaults(&self) -> Arc<LocationDefaults> {
        Arc::clone(
            &self
                .locations
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The allocator underneath.
    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// The coalescer (to apply reloaded settings).
    pub fn coalescer(&self) -> &Coalescer {
        &self.coalescer
    }

    /// Holds `request` (one line or a cart), idempotent on its key on every
    /// node.
    pub async fn reserve(&self, request: &CartRequest) -> Result<CartHold> {
        // The SKUs a line may hold besides its own (its substitutes): a
        // sale on one of them applies as on the line's own SKU.
        let mut substituted: Vec<&str> = request
            .lines
            .iter()
            .filter(|line| line.substitutes)
            .map(|line| line.sku.as_str())
            .collect();
        substituted.sort_unstable();
        substituted.dedup();
        let substitutes: Vec<String> = if substituted.is_empty() || !self.any_sale() {
            Vec::new()
        } else {
            self.allocator
                .substitutes_of(&request.merchant, &substituted)
                .await?
                .into_values()
                .flatten()
                .map(|substitute| substitute.sku)
                .collect()
        };
        // A throttled key's attempt takes a token first: a refusal has
        // claimed and held nothing.
        let throttles = on_lines(&self.throttles, request, &substitutes, |_| true);
        for throttle in &throttles {
            throttle.admit(&self.allocator).await?;
        }
        let limits = self.customer_limits_of(request, &substitutes);
        let hot = on_lines(&self.hot, request, &substitutes, |_| true);
        let locations = self.location_defaults();
        let route = Route {
            hot: hot.iter().map(|hot| &**hot).collect(),
            coalescer: Some(&self.coalescer),
            limits: &limits,
            locations: &locations,
        };
        let result = self.allocator.reserve_claimed(request, route).await;
        if let Err(AllocatorError::CustomerLimit { sale, .. }) = &result {
            *self
                .limit_refusals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(sale.clone())
                .or_default() += 1;
        }
        result
    }

    /// Requests this node answered 409 `customer_limit`, by sale (since the
    /// process started).
    pub fn customer_limit_refusals(&self) -> Vec<(String, u64)> {
        self.limit_refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(sale, count)| (sale.clone(), *count))
            .collect()
    }

    /// Whether any sale (buckets, throttle or customer limit) is known
    /// here.
    fn any_sale(&self) -> bool {
        let known = |empty: bool| !empty;
        known(
            self.hot
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_empty(),
        ) || known(
            self.throttles
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_empty(),
        ) || known(
            self.customer_limits
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_empty(),
        )
    }

    /// The customer limits in force now on `request`'s keys (and every
    /// location of `also`, SKUs its lines may hold as substitutes).
    fn customer_limits_of(
        &self,
        request: &CartRequest,
        also: &[String],
    ) -> Vec<Arc<CustomerLimit>> {
        on_lines(&self.customer_limits, request, also, |limit| {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as u64);
            limit.in_force_at(now_ms)
        })
    }

    /// Sets the customer limits (one per key) of every enabled sale that
    /// has not ended: each request checks the sale's window itself.
    pub fn set_customer_limits(&self, wanted: Vec<CustomerLimit>) {
        let mut limits = self
            .customer_limits
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *limits = wanted
            .into_iter()
            .map(|limit| (limit.key.clone(), Arc::new(limit)))
            .collect();
    }

    /// Puts in force exactly these throttles, `(sale, key, attempts per
    /// second)`: one kept from before keeps its unspent tokens.
    pub fn set_throttles(&self, wanted: &[(String, StockKey, u32)]) {
        let mut throttles = self
            .throttles
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let kept = std::mem::take(&mut *throttles);
        for (sale, key, per_second) in wanted {
            let throttle = match kept.get(key) {
                Some(old) if old.sale() == sale && old.per_second() == *per_second => {
                    Arc::clone(old)
                }
                _ => Arc::new(Throttle::new(sale, key.clone(), *per_second)),
            };
            throttles.insert(key.clone(), throttle);
        }
    }

    /// Every throttle in force.
    pub fn throttles(&self) -> Vec<Arc<Throttle>> {
        self.throttles
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// The sale in force here for `key`.
    pub fn hot_sale(&self, key: &StockKey) -> Option<Arc<HotKey>> {
        self.hot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Every sale in force here.
    pub fn hot_sales(&self) -> Vec<Arc<HotKey>> {
        self.hot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Puts a sale in force here (after its activation).
    pub fn set_hot(&self, hot: HotKey) {
        self.hot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(hot.sale.key.clone(), Arc::new(hot));
    }

    /// Ends a sale here (after its bucket was reclaimed).
    pub fn remove_hot(&self, key: &StockKey) {
        self.hot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }
}

/// What `by_key` (a sale's throttle, limits or buckets, by stock key)
/// holds for `request`'s lines and `keep` accepts (for a line without a
/// location, every location of its SKU, and every location of each SKU in
/// `also`, the substitutes its lines may hold: where a hold lands is
/// decided later, so it is throttled, and needs a `customer_ref`, as if it
/// might land at any sale's key of those SKUs); nothing is built for a
/// request when no sale has any (the common case).
fn on_lines<T>(
    by_key: &RwLock<HashMap<StockKey, Arc<T>>>,
    request: &CartRequest,
    also: &[String],
    keep: impl Fn(&T) -> bool,
) -> Vec<Arc<T>> {
    let by_key = by_key
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if by_key.is_empty() {
        return Vec::new();
    }
    let mut found: Vec<Arc<T>> = Vec::new();
    for line in &request.lines {
        match &line.location {
            Some(location) => found.extend(
                by_key
                    .get(&StockKey::new(&request.merchant, &line.sku, location))
                    .filter(|found| keep(found))
                    .cloned(),
            ),
            None => found.extend(
                by_key
                    .iter()
                    .filter(|(key, value)| {
                        key.merchant == request.merchant && key.sku == line.sku && keep(value)
                    })
                    .map(|(_, value)| Arc::clone(value)),
            ),
        }
    }
    for sku in also {
        found.extend(
            by_key
                .iter()
                .filter(|(key, value)| {
                    key.merchant == request.merchant && key.sku == *sku && keep(value)
                })
                .map(|(_, value)| Arc::clone(value)),
        );
    }
    // One sale's throttle or limit counts once, however many lines reach it.
    found.sort_by_key(|value| Arc::as_ptr(value) as *const () as usize);
    found.dedup_by(|a, b| Arc::ptr_eq(a, b));
    found
}

impl crate::ReserveRequest {
    /// This one-line request as the cart form [`Reserver::reserve`] and
    /// [`Allocator::reserve_cart`] take.
    pub fn as_cart(&self) -> CartRequest {
        CartRequest {
            merchant: self.key.merchant.clone(),
            lines: vec![CartLine::at(&self.key.sku, &self.key.location, self.qty)],
            ttl: self.ttl,
            idempotency_key: self.idempotency_key.clone(),
            customer_ref: self.customer_ref.clone(),
            allow_partial: false,
        }
    }
}
