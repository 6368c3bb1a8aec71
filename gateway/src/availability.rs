//! Availability answers and the node's edge cache of them.
//!
//! Owns turning cells into the API's availability objects (status bands,
//! versions, ETags), rendering them once per change, and the bounded cache
//! that serves them. A reservation never decides on a cached value.
//!
//! How the cache stays right (the choices, and why):
//! * **One slot per `(merchant, sku)`** in a bounded moka cache, keyed by
//!   `merchant/sku` (ids cannot hold `/`) and looked up without building a
//!   key on the heap. A slot holds the last answer it loaded (the rendered
//!   views, or "unknown" for a 404) and the fill in flight, if any.
//! * **Generations, not flags.** A change notification bumps its slot's
//!   generation; a lost subscription bumps the cache-wide epoch. An answer
//!   is fresh only while both still equal what they were when its fill
//!   *started*, so a fill that read Redis before a change can never land as
//!   fresh, however late its reply comes.
//! * **Single flight.** Readers of a key with a fill in flight under the
//!   current generation wait for it instead of reading Redis again. A reader
//!   that finds an *outdated* fill (a change came after it started) waits
//!   for it to end and then starts, or joins, the next one: every reader
//!   gets data read after it arrived, and a key changing thousands of times
//!   a second costs Redis one fill at a time per node.
//! * **Fills run as their own task**, so a client that goes away mid-fill
//!   cannot strand the readers waiting on it.
//! * **Unknown keys** are answered from memory for `cache.not_found_ttl_ms`;
//!   the key's creation publishes a change like any other, which ends it.
//! * **Rendered once.** The all-locations view is rendered when loaded and
//!   each one-location view on first use; a hit clones reference-counted
//!   bytes. With Redis unreachable, the last answer is served re-rendered
//!   with `"stale": true` (rare, so not prebuilt).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use allocator::{Allocator, StockView};
use bytes::{BufMut, Bytes, BytesMut};
use config::Config;
use http::HeaderValue;
use moka::sync::Cache;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::api::{ApiError, Headers, Reply};
use crate::sources::SourceHealth;

/// One location of a SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocationAvailability {
    /// The location id.
    pub location: String,
    /// Sellable units shown to buyers (never below 0; less the location's
    /// offline buffer while its source is offline).
    pub available: i64,
    /// Physical units (pool plus flash-sale buckets).
    pub on_hand: i64,
    /// Units held by reservations.
    pub reserved: i64,
    /// Units never offered.
    pub safety_stock: i64,
    /// Units that may still be sold on backorder.
    pub backorderable: i64,
    /// `in_stock`, `low` or `out_of_stock`.
    pub status: &'static str,
    /// Sum of the versions of the key's cells: grows with every change.
    pub version: u64,
    /// Whether the source that reports this location's stock is quiet
    /// ([`crate::sources`]).
    pub source_offline: bool,
}

impl LocationAvailability {
    /// The location as the API shows it.
    pub fn to_json(&self) -> Value {
        json!({
            "location": self.location, "available": self.available, "on_hand": self.on_hand,
            "reserved": self.reserved, "safety_stock": self.safety_stock,
            "backorderable": self.backorderable, "status": self.status, "version": self.version,
            "source_offline": self.source_offline,
        })
    }

    /// A location with `units` on hand, none held or set aside, in stock
    /// (for tests and tools that need a view without cells).
    pub fn on_shelf(location: &str, units: i64, version: u64) -> Self {
        Self {
            location: location.to_owned(),
            available: units,
            on_hand: units,
            reserved: 0,
            safety_stock: 0,
            backorderable: 0,
            status: "in_stock",
            version,
            source_offline: false,
        }
    }

    /// Builds a location's view from its cells (the pool and, in a flash
    /// sale, buckets; `None` without a pool); `offline_buffer` is the
    /// location's buffer while its source is offline
    /// ([`crate::sources::SourceHealth::offline_buffer`]). What is sellable
    /// is [`StockView::sellable`]'s, the allocator's one home of it.
    pub fn from_view(
        location: &str,
        view: &StockView,
        low_default: u64,
        offline_buffer: Option<u32>,
    ) -> Option<Self> {
        let pool = view.pool.as_ref()?;
        let buckets = view.buckets.iter().map(|(_, bucket)| bucket);
        let available = (view.sellable() - i64::from(offline_buffer.unwrap_or(0))).max(0);
        let threshold = if pool.low_stock_threshold >= 0 {
            pool.low_stock_threshold
        } else {
            low_default as i64
        };
        let status = allocator::stock_status(available, threshold);
        Some(Self {
            location: location.to_owned(),
            available,
            on_hand: view.on_hand(),
            reserved: pool.reserved + buckets.clone().map(|bucket| bucket.reserved).sum::<i64>(),
            safety_stock: pool.safety_stock,
            backorderable: (pool.backorder_limit + pool.sellable().min(0)).max(0),
            status,
            version: pool.version + buckets.map(|bucket| bucket.version).sum::<u64>(),
            source_offline: offline_buffer.is_some(),
        })
    }
}

/// Every location of one `(merchant, sku)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkuAvailability {
    /// Merchant.
    pub merchant: String,
    /// SKU.
    pub sku: String,
    /// Its locations, sorted.
    pub locations: Vec<LocationAvailability>,
}

impl SkuAvailability {
    fn shown<'a>(
        &'a self,
        only: Option<&'a str>,
    ) -> impl Iterator<Item = &'a LocationAvailability> + 'a {
        self.locations
            .iter()
            .filter(move |location| only.is_none_or(|wanted| location.location == wanted))
    }

    /// The API object, for all locations or one; `None` if `only` is unknown.
    pub fn to_json(&self, only: Option<&str>, stale: bool) -> Option<Value> {
        let locations: Vec<&LocationAvailability> = self.shown(only).collect();
        if only.is_some() && locations.is_empty() {
            return None;
        }
        Some(json!({
            "merchant": self.merchant, "sku": self.sku,
            "available": locations.iter().map(|location| location.available).sum::<i64>(),
            "locations": locations.iter().map(|location| location.to_json()).collect::<Vec<_>>(),
            "stale": stale,
        }))
    }

    /// A strong ETag over the shown locations' versions and whether their
    /// sources are offline (which changes what is shown, not the version).
    pub fn etag(&self, only: Option<&str>) -> String {
        let mut hash = Sha256::new();
        for location in self.shown(only) {
            hash.update(location.location.as_bytes());
            hash.update(b"=");
            hash.update(location.version.to_string().as_bytes());
            if location.source_offline {
                // What is shown then depends on the buffer too.
                hash.update(b"~offline=");
                hash.update(location.available.to_string().as_bytes());
            }
            hash.update(b";");
        }
        format!("\"{}\"", &hex::encode(hash.finalize())[..20])
    }

    /// The sum of the shown locations' versions.
    pub fn version(&self, only: Option<&str>) -> u64 {
        self.shown(only).map(|location| location.version).sum()
    }
}

/// One view of a SKU (all locations, or one) as the API answers it.
#[derive(Debug)]
pub struct View {
    /// The JSON body, with `"stale": false`.
    pub body: Bytes,
    /// Its strong ETag, quoted, ready for the header.
    pub etag: HeaderValue,
    /// The sum of the shown locations' versions (the SSE event id).
    pub version: u64,
}

impl View {
    fn render(value: &SkuAvailability, only: Option<&str>) -> Option<Self> {
        let json = value.to_json(only, false)?;
        Some(Self {
            body: Bytes::from(json.to_string()),
            // Hex digits in quotes: always a valid header value.
            etag: HeaderValue::from_str(&value.etag(only)).ok()?,
            version: value.version(only),
        })
    }

    /// The answer to a read of this view: 200 with the body, or 304 when
    /// `if_none_match` names the ETag; both with the ETag and
    /// `cache_control`. Clones reference-counted bytes only.
    pub fn reply(&self, if_none_match: Option<&[u8]>, cache_control: HeaderValue) -> Reply {
        let reply = if if_none_match.is_some_and(|tags| self.matches(tags)) {
            Reply {
                status: 304,
                headers: Headers::new(),
                body: Bytes::new(),
            }
        } else {
            Reply::json_bytes(200, self.body.clone())
        };
        reply
            .with_header("etag", self.etag.clone())
            .with_header("cache-control", cache_control)
    }

    /// Whether an `If-None-Match` header value names this view's ETag.
    pub fn matches(&self, if_none_match: &[u8]) -> bool {
        let etag = self.etag.as_bytes();
        if_none_match
            .split(|&byte| byte == b',')
            .map(<[u8]>::trim_ascii)
            .any(|tag| tag == etag || tag == b"*")
    }
}

/// A SKU's answers, rendered once per change and shared by every hit.
#[derive(Debug)]
pub struct Rendered {
    /// The availability they were rendered from.
    pub value: SkuAvailability,
    /// All locations.
    all: View,
    /// One per location, in `value.locations` order, rendered on first use.
    locations: Vec<OnceLock<Option<View>>>,
}

impl Rendered {
    /// Renders the all-locations view now; one-location views wait for use.
    /// `None` for a SKU without locations.
    pub fn new(value: SkuAvailability) -> Option<Self> {
        let all = View::render(&value, None)?;
        let locations = value.locations.iter().map(|_| OnceLock::new()).collect();
        Some(Self {
            value,
            all,
            locations,
        })
    }

    /// The view of all locations, or of `only`; `None` if `only` is not one
    /// of the SKU's locations.
    pub fn view(&self, only: Option<&str>) -> Option<&View> {
        let Some(wanted) = only else {
            return Some(&self.all);
        };
        let index = self
            .value
            .locations
            .binary_search_by(|location| location.location.as_str().cmp(wanted))
            .ok()?;
        self.locations[index]
            .get_or_init(|| View::render(&self.value, Some(wanted)))
            .as_ref()
    }

    /// The body of a view marked `"stale": true` (Redis unreachable).
    pub fn stale_body(&self, only: Option<&str>) -> Option<Bytes> {
        Some(Bytes::from(self.value.to_json(only, true)?.to_string()))
    }
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A fresh cache entry.
    Hit,
    /// Read from Redis for this request (or by a fill it joined).
    Miss,
    /// A cached entry served because Redis is unreachable.
    Stale,
}

/// What a fill found.
#[derive(Clone)]
enum Answer {
    /// The SKU's rendered views.
    Found(Arc<Rendered>),
    /// No such stock key (404).
    Unknown,
}

/// How a fill ended.
#[derive(Clone)]
enum Outcome {
    /// Redis answered.
    Loaded(Answer),
    /// Redis could not be reached.
    Unavailable,
    /// Anything else (logged; a 500).
    Failed(String),
}

/// The last answer a slot loaded.
struct Loaded {
    answer: Answer,
    at: Instant,
    /// The slot's generation and the cache's epoch when its fill started.
    generation: u64,
    epoch: u64,
}

/// A fill in flight, and where its outcome will appear.
struct Fill {
    generation: u64,
    epoch: u64,
    done: watch::Receiver<Option<Outcome>>,
}

impl Fill {
    async fn outcome(&self) -> Outcome {
        let mut done = self.done.clone();
        match done.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(Outcome::Unavailable),
            // The fill task ended without an answer (its runtime stopped).
            Err(_) => Outcome::Unavailable,
        }
    }
}

#[derive(Default)]
struct SlotState {
    /// Bumped by every change notification naming the SKU.
    generation: u64,
    loaded: Option<Loaded>,
    filling: Option<Arc<Fill>>,
}

/// One `(merchant, sku)`'s place in the cache.
#[derive(Default)]
struct Slot(Mutex<SlotState>);

impl Slot {
    /// Never held across an await.
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A future of a load, boxed (loads run as their own task).
pub type LoadFuture =
    Pin<Box<dyn Future<Output = Result<Option<SkuAvailability>, ApiError>> + Send>>;

/// Reads one SKU from the store: `(merchant, sku, low-stock default)`;
/// `Ok(None)` for an unknown key.
pub type Loader = Arc<dyn Fn(String, String, u64) -> LoadFuture + Send + Sync>;

/// The loader of a running node: every location's pool and buckets, in
/// three pipelined round trips ([`Allocator::sku_views`]), shown with the
/// buffers of locations whose source is offline (`health` as the fill
/// finds it: a flip marks the cache dirty after it is in force, so a fill
/// that saw the old health never lands as fresh).
pub fn redis_loader(allocator: Allocator, health: Arc<SourceHealth>) -> Loader {
    Arc::new(move |merchant, sku, low_default| {
        let allocator = allocator.clone();
        let health = Arc::clone(&health);
        Box::pin(async move {
            let locations: Vec<LocationAvailability> = allocator
                .sku_views(&merchant, &sku)
                .await?
                .into_iter()
                .filter_map(|(location, view)| {
                    LocationAvailability::from_view(
                        &location,
                        &view,
                        low_default,
                        health.offline_buffer(&merchant, &location),
                    )
                })
                .collect();
            Ok((!locations.is_empty()).then_some(SkuAvailability {
                merchant,
                sku,
                locations,
            }))
        })
    })
}

/// The metrics the cache counts into.
pub struct CacheCounters {
    /// `availability_cache_total{result}`: hit, negative (a 404 from
    /// memory), miss (started a fill), joined (waited on another's fill),
    /// stale.
    pub results: prometheus::IntCounterVec,
    /// Reads that found Redis unreachable.
    pub redis_errors: prometheus::IntCounter,
}

/// The counters, resolved once (no label lookup per read).
struct Counts {
    hit: prometheus::IntCounter,
    negative: prometheus::IntCounter,
    miss: prometheus::IntCounter,
    joined: prometheus::IntCounter,
    stale: prometheus::IntCounter,
    redis_errors: prometheus::IntCounter,
}

/// Longest key: two ids of at most 128 bytes and the `/` between them.
const KEY_BYTES_MAX: usize = 2 * 128 + 1;

/// `merchant/sku` in a stack buffer, as the slot map's key (`None` past
/// the id limit, which request validation refuses first).
struct SlotKey {
    bytes: [u8; KEY_BYTES_MAX],
    length: usize,
}

impl SlotKey {
    fn new(merchant: &str, sku: &str) -> Option<Self> {
        let length = merchant.len() + 1 + sku.len();
        if length > KEY_BYTES_MAX {
            return None;
        }
        let mut bytes = [0; KEY_BYTES_MAX];
        bytes[..merchant.len()].copy_from_slice(merchant.as_bytes());
        bytes[merchant.len()] = b'/';
        bytes[merchant.len() + 1..length].copy_from_slice(sku.as_bytes());
        Some(Self { bytes, length })
    }

    fn as_str(&self) -> &str {
        // Two `&str`s and an ASCII byte: valid UTF-8.
        std::str::from_utf8(&self.bytes[..self.length]).unwrap_or_default()
    }
}

struct Inner {
    /// Slots; the least recently used are evicted past the bound.
    slots: Cache<String, Arc<Slot>>,
    /// Bumped when change notifications may have been missed.
    epoch: AtomicU64,
    /// Longest an answer is served without a refresh, ms.
    ttl_ms: AtomicU64,
    /// Longest an unknown key's 404 is served from memory, ms.
    not_found_ttl_ms: AtomicU64,
    /// `low` status at or under this when a key sets no threshold.
    low_stock_default: AtomicU64,
    /// Where answers come from.
    loader: Loader,
    /// Whether change notifications reach this node (the app's change
    /// follower sets it): without them no cached answer counts as fresh.
    hearing: Arc<AtomicBool>,
    counts: Counts,
}

/// The bounded cache of availability per `(merchant, sku)`.
pub struct AvailabilityCache {
    inner: Arc<Inner>,
}

/// What a reader does after looking at its slot.
enum Next {
    Answer(Result<(Arc<Rendered>, Source), ApiError>),
    Join(Arc<Fill>, Source),
    WaitOut(Arc<Fill>),
}

impl AvailabilityCache {
    /// A cache sized from the config, filled by `loader`, fresh only while
    /// `hearing` says change notifications arrive.
    pub fn new(
        config: &Config,
        loader: Loader,
        hearing: Arc<AtomicBool>,
        counters: CacheCounters,
    ) -> Self {
        let result = |name: &str| counters.results.with_label_values(&[name]);
        Self {
            inner: Arc::new(Inner {
                slots: Cache::builder()
                    .max_capacity(config.cache.availability_entries_max)
                    .time_to_idle(Duration::from_secs(3600))
                    .build(),
                epoch: AtomicU64::new(0),
                ttl_ms: AtomicU64::new(config.cache.availability_ttl_ms),
                not_found_ttl_ms: AtomicU64::new(config.cache.not_found_ttl_ms),
                low_stock_default: AtomicU64::new(config.cache.low_stock_threshold_default),
                loader,
                hearing,
                counts: Counts {
                    hit: result("hit"),
                    negative: result("negative"),
                    miss: result("miss"),
                    joined: result("joined"),
                    stale: result("stale"),
                    redis_errors: counters.redis_errors,
                },
            }),
        }
    }

    /// Applies a reloaded `[cache]` section (the bound applies from restart).
    /// A new low-stock default shows from each key's next fill.
    pub fn reconfigure(&self, config: &Config) {
        let inner = &self.inner;
        inner
            .ttl_ms
            .store(config.cache.availability_ttl_ms, Ordering::Relaxed);
        inner
            .not_found_ttl_ms
            .store(config.cache.not_found_ttl_ms, Ordering::Relaxed);
        let low = config.cache.low_stock_threshold_default;
        if inner.low_stock_default.swap(low, Ordering::Relaxed) != low {
            self.mark_all_dirty();
        }
    }

    /// A change notification named this SKU: whatever was loaded, or is
    /// being loaded, before it is no longer fresh.
    pub fn invalidate(&self, merchant: &str, sku: &str) {
        let Some(key) = SlotKey::new(merchant, sku) else {
            return;
        };
        if let Some(slot) = self.inner.slots.get(key.as_str()) {
            slot.lock().generation += 1;
        }
    }

    /// Notifications may have been missed: nothing loaded or being loaded
    /// until now is fresh.
    pub fn mark_all_dirty(&self) {
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The availability of `(merchant, sku)`: from the cache, else Redis,
    /// else a stale cached copy; 404 for an unknown SKU, 503 when nothing is
    /// cached and Redis is unreachable.
    pub async fn get(
        &self,
        merchant: &str,
        sku: &str,
    ) -> Result<(Arc<Rendered>, Source), ApiError> {
        let key = SlotKey::new(merchant, sku)
            .ok_or_else(|| ApiError::BadRequest("merchant or sku is too long".to_owned()))?;
        let inner = &self.inner;
        let slot = match inner.slots.get(key.as_str()) {
            Some(slot) => slot,
            None => inner
                .slots
                .get_with(key.as_str().to_owned(), || Arc::new(Slot::default())),
        };
        // What this reader must not be answered from anything older than.
        let mut arrived = None;
        loop {
            let (fill, source) = match self.look(&slot, &mut arrived, merchant, sku) {
                Next::Answer(answer) => return answer,
                Next::Join(fill, source) => (fill, source),
                Next::WaitOut(fill) => {
                    // Started before this reader arrived under a change:
                    // its answer is not ours. Bounded: the next fill starts
                    // after our arrival, and one that could not reach
                    // Redis is not tried again for this reader.
                    if let Outcome::Unavailable = fill.outcome().await {
                        return self.unavailable(&slot);
                    }
                    continue;
                }
            };
            return match fill.outcome().await {
                Outcome::Loaded(Answer::Found(rendered)) => Ok((rendered, source)),
                Outcome::Loaded(Answer::Unknown) => Err(not_found(merchant, sku)),
                Outcome::Unavailable => self.unavailable(&slot),
                Outcome::Failed(reason) => Err(ApiError::Internal(reason)),
            };
        }
    }

    /// Redis could not be reached: the last answer found, marked stale.
    fn unavailable(&self, slot: &Slot) -> Result<(Arc<Rendered>, Source), ApiError> {
        let counts = &self.inner.counts;
        counts.redis_errors.inc();
        let loaded = slot
            .lock()
            .loaded
            .as_ref()
            .map(|loaded| loaded.answer.clone());
        match loaded {
            Some(Answer::Found(rendered)) => {
                counts.stale.inc();
                Ok((rendered, Source::Stale))
            }
            _ => Err(ApiError::StoreUnavailable),
        }
    }

    /// Under the slot's lock: a fresh answer, or the fill to wait on
    /// (started here if none runs). `arrived` is the reader's stamp
    /// (generation, epoch) from its first look: a fill or answer stamped at
    /// or after it was read after the reader arrived.
    fn look(
        &self,
        slot: &Arc<Slot>,
        arrived: &mut Option<(u64, u64)>,
        merchant: &str,
        sku: &str,
    ) -> Next {
        let inner = &self.inner;
        // `hearing` before `epoch`: a resubscription bumps the epoch, then
        // sets `hearing`; read the other way round, a reader could pair the
        // new `hearing` with the old epoch.
        let hearing = inner.hearing.load(Ordering::SeqCst);
        let mut state = slot.lock();
        // Under the lock: a fill started here carries an epoch no older
        // than what any reader that locks after it has seen.
        let epoch = inner.epoch.load(Ordering::SeqCst);
        let now = (state.generation, epoch);
        let first_look = arrived.is_none();
        let arrived = *arrived.get_or_insert(now);
        let after_arrival =
            |generation: u64, epoch: u64| generation >= arrived.0 && epoch >= arrived.1;
        if let Some(loaded) = &state.loaded {
            // Fresh: nothing changed since its fill started (and the node
            // hears changes). Or, for a reader that waited, read since it
            // arrived.
            let fresh = hearing && (loaded.generation, loaded.epoch) == now;
            let waited_for = !first_look && after_arrival(loaded.generation, loaded.epoch);
            let ttl = match &loaded.answer {
                Answer::Found(_) => inner.ttl_ms.load(Ordering::Relaxed),
                Answer::Unknown => inner.not_found_ttl_ms.load(Ordering::Relaxed),
            };
            if (fresh && loaded.at.elapsed() < Duration::from_millis(ttl)) || waited_for {
                let answer = match &loaded.answer {
                    Answer::Found(rendered) => {
                        let source = if fresh { Source::Hit } else { Source::Miss };
                        Ok((Arc::clone(rendered), source))
                    }
                    Answer::Unknown => Err(not_found(merchant, sku)),
                };
                if fresh {
                    match &answer {
                        Ok(_) => inner.counts.hit.inc(),
                        Err(_) => inner.counts.negative.inc(),
                    }
                }
                return Next::Answer(answer);
            }
        }
        if let Some(fill) = &state.filling {
            if after_arrival(fill.generation, fill.epoch) {
                inner.counts.joined.inc();
                return Next::Join(Arc::clone(fill), Source::Miss);
            }
            return Next::WaitOut(Arc::clone(fill));
        }
        inner.counts.miss.inc();
        let (done, watched) = watch::channel(None);
        let fill = Arc::new(Fill {
            generation: now.0,
            epoch: now.1,
            done: watched,
        });
        state.filling = Some(Arc::clone(&fill));
        drop(state);
        let finish = Finish {
            slot: Arc::clone(slot),
            fill: Arc::clone(&fill),
            done: Some(done),
        };
        let (inner, merchant, sku) = (Arc::clone(inner), merchant.to_owned(), sku.to_owned());
        tokio::spawn(async move {
            let low = inner.low_stock_default.load(Ordering::Relaxed);
            let outcome = match (inner.loader)(merchant, sku, low).await {
                Ok(Some(value)) => match Rendered::new(value) {
                    Some(rendered) => Outcome::Loaded(Answer::Found(Arc::new(rendered))),
                    None => Outcome::Loaded(Answer::Unknown),
                },
                Ok(None) => Outcome::Loaded(Answer::Unknown),
                Err(ApiError::StoreUnavailable) => Outcome::Unavailable,
                Err(other) => Outcome::Failed(other.to_string()),
            };
            finish.with(outcome);
        });
        Next::Join(fill, Source::Miss)
    }
}

/// Ends a fill: keeps what it loaded under the stamp it started with,
/// clears it from its slot and wakes its readers. Dropped without an
/// outcome (the load panicked, its runtime stopped), it ends the fill as
/// failed, so no reader waits on it and the next starts a new one.
struct Finish {
    slot: Arc<Slot>,
    fill: Arc<Fill>,
    done: Option<watch::Sender<Option<Outcome>>>,
}

impl Finish {
    fn with(mut self, outcome: Outcome) {
        self.end(outcome);
    }

    fn end(&mut self, outcome: Outcome) {
        let Some(done) = self.done.take() else {
            return;
        };
        {
            let mut state = self.slot.lock();
            if let Outcome::Loaded(answer) = &outcome {
                // If a change came since the fill started, this is
                // already not fresh: its stamp is older than the slot's.
                state.loaded = Some(Loaded {
                    answer: answer.clone(),
                    at: Instant::now(),
                    generation: self.fill.generation,
                    epoch: self.fill.epoch,
                });
            }
            if state
                .filling
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, &self.fill))
            {
                state.filling = None;
            }
        }
        let _ = done.send(Some(outcome));
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.end(Outcome::Failed(
            "an availability fill ended without an answer".to_owned(),
        ));
    }
}

fn not_found(merchant: &str, sku: &str) -> ApiError {
    ApiError::NotFound(format!("no stock key for {merchant}/{sku}"))
}

/// An SSE `availability` event of all locations.
pub fn sse_event(rendered: &Rendered, stale: bool) -> Bytes {
    let view = rendered.view(None).unwrap_or(&rendered.all);
    let stale_body;
    let body = if stale {
        stale_body = rendered
            .stale_body(None)
            .unwrap_or_else(|| view.body.clone());
        &stale_body
    } else {
        &view.body
    };
    let mut event = BytesMut::with_capacity(body.len() + 48);
    event.put_slice(b"event: availability\nid: ");
    event.put_slice(view.version.to_string().as_bytes());
    event.put_slice(b"\ndata: ");
    event.put_slice(body);
    event.put_slice(b"\n\n");
    event.freeze()
}

#[cfg(test)]
mod tests {
    //! The cache's own logic against a loader the test controls: the shelf
    //! a load reads, and a gate that holds a load half way.

    use super::*;
    use tokio::sync::Semaphore;

    struct Shelf {
        /// What the store holds now (None: unknown key).
        units: Mutex<Option<i64>>,
        /// Loads wait for a permit here after reading the shelf.
        gate: Semaphore,
        /// Loads started.
        loads: AtomicU64,
    }

    fn availability(units: i64) -> SkuAvailability {
        SkuAvailability {
            merchant: "m".to_owned(),
            sku: "s".to_owned(),
            locations: vec![LocationAvailability::on_shelf("dc1", units, units as u64)],
        }
    }

    #[test]
    fn an_offline_source_holds_back_its_buffer_never_below_zero_and_changes_the_etag() {
        let pool: allocator::Cell = serde_json::from_value(json!({
            "merchant": "m", "sku": "s", "location": "store-12", "kind": "pool",
            "on_hand": 12, "reserved": 2, "safety_stock": 1, "backorder_limit": 0,
            "low_stock_threshold": 5, "version": 7, "out_in_flight": 0,
        }))
        .expect("a cell");
        let view = StockView {
            pool: Some(pool),
            buckets: Vec::new(),
        };
        let line =
            |buffer| LocationAvailability::from_view("store-12", &view, 3, buffer).expect("a pool");
        let online = line(None);
        assert_eq!(
            (online.available, online.status, online.source_offline),
            (9, "in_stock", false)
        );
        let offline = line(Some(4));
        assert_eq!(
            (
                offline.available,
                offline.status,
                offline.source_offline,
                offline.on_hand
            ),
            (5, "low", true, 12),
            "shown less the buffer, status from what is shown; the shelf as it is"
        );
        let emptied = line(Some(40));
        assert_eq!((emptied.available, emptied.status), (0, "out_of_stock"));
        let sku = |line: LocationAvailability| SkuAvailability {
            merchant: "m".to_owned(),
            sku: "s".to_owned(),
            locations: vec![line],
        };
        assert_eq!(
            sku(offline.clone()).version(None),
            sku(online.clone()).version(None)
        );
        assert_ne!(sku(offline).etag(None), sku(online).etag(None));
    }

    fn cache(shelf: &Arc<Shelf>, config: &Config) -> AvailabilityCache {
        let shelf = Arc::clone(shelf);
        let loader: Loader = Arc::new(move |_, _, _| {
            let shelf = Arc::clone(&shelf);
            Box::pin(async move {
                shelf.loads.fetch_add(1, Ordering::SeqCst);
                let read = *shelf.units.lock().unwrap();
                shelf.gate.acquire().await.unwrap().forget();
                Ok(read.map(availability))
            })
        });
        cache_over(loader, config)
    }

    /// A cache that hears changes, over `loader`.
    fn cache_over(loader: Loader, config: &Config) -> AvailabilityCache {
        let registry =
            prometheus::IntCounterVec::new(prometheus::Opts::new("results", "test"), &["result"])
                .unwrap();
        AvailabilityCache::new(
            config,
            loader,
            Arc::new(AtomicBool::new(true)),
            CacheCounters {
                results: registry,
                redis_errors: prometheus::IntCounter::new("errors", "test").unwrap(),
            },
        )
    }

    fn shelf(units: Option<i64>) -> Arc<Shelf> {
        Arc::new(Shelf {
            units: Mutex::new(units),
            gate: Semaphore::new(0),
            loads: AtomicU64::new(0),
        })
    }

    fn config() -> Config {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/dev.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut config = config::parse(&text, path, &|_| None).unwrap();
        config.cache.availability_ttl_ms = 60_000;
        config.cache.not_found_ttl_ms = 60_000;
        config
    }

    fn units(answer: &(Arc<Rendered>, Source)) -> i64 {
        answer.0.value.locations[0].available
    }

    /// A reader of `m/s` as its own task: the units it was answered.
    fn reader(cache: &Arc<AvailabilityCache>) -> tokio::task::JoinHandle<Result<i64, ApiError>> {
        let cache = Arc::clone(cache);
        tokio::spawn(async move { cache.get("m", "s").await.map(|answer| units(&answer)) })
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_fill_that_read_before_a_change_never_lands_as_fresh() {
        let shelf = shelf(Some(10));
        let cache = Arc::new(cache(&shelf, &config()));
        // A reader starts a fill, which reads 10 and is held there.
        let first = reader(&cache);
        settle().await;
        assert_eq!(shelf.loads.load(Ordering::SeqCst), 1);
        // The store changes and its notification arrives mid-fill.
        *shelf.units.lock().unwrap() = Some(7);
        cache.invalidate("m", "s");
        // A reader arriving now must not get the pre-change read.
        let second = reader(&cache);
        settle().await;
        shelf.gate.add_permits(1);
        assert_eq!(
            first.await.unwrap().unwrap(),
            10,
            "the first reader asked before the change"
        );
        settle().await;
        assert_eq!(
            shelf.loads.load(Ordering::SeqCst),
            2,
            "the late reader fills again"
        );
        shelf.gate.add_permits(1);
        assert_eq!(second.await.unwrap().unwrap(), 7);
        // And what is cached now is the post-change read, served as a hit.
        let (rendered, source) = cache.get("m", "s").await.unwrap();
        assert_eq!(
            (rendered.value.locations[0].available, source),
            (7, Source::Hit)
        );
        assert_eq!(shelf.loads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_fill_finishing_after_a_change_is_not_served_as_fresh() {
        let shelf = shelf(Some(10));
        let cache = Arc::new(cache(&shelf, &config()));
        let first = reader(&cache);
        settle().await;
        *shelf.units.lock().unwrap() = Some(3);
        cache.invalidate("m", "s");
        shelf.gate.add_permits(1);
        assert_eq!(first.await.unwrap().unwrap(), 10);
        // The 10 landed after the change: the next read goes to the store.
        shelf.gate.add_permits(1);
        let (rendered, source) = cache.get("m", "s").await.unwrap();
        assert_eq!(
            (rendered.value.locations[0].available, source),
            (3, Source::Miss)
        );
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_fill() {
        let shelf = shelf(Some(5));
        let cache = Arc::new(cache(&shelf, &config()));
        let readers: Vec<_> = (0..20).map(|_| reader(&cache)).collect();
        settle().await;
        shelf.gate.add_permits(1);
        for reader in readers {
            assert_eq!(reader.await.unwrap().unwrap(), 5);
        }
        assert_eq!(shelf.loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_unknown_key_is_answered_from_memory_until_it_is_created() {
        let shelf = shelf(None);
        let cache = cache(&shelf, &config());
        shelf.gate.add_permits(1);
        assert!(matches!(
            cache.get("m", "s").await,
            Err(ApiError::NotFound(_))
        ));
        assert!(matches!(
            cache.get("m", "s").await,
            Err(ApiError::NotFound(_))
        ));
        assert_eq!(
            shelf.loads.load(Ordering::SeqCst),
            1,
            "the second 404 came from memory"
        );
        // Created: its change notification ends the negative answer.
        *shelf.units.lock().unwrap() = Some(4);
        cache.invalidate("m", "s");
        shelf.gate.add_permits(1);
        assert_eq!(units(&cache.get("m", "s").await.unwrap()), 4);
    }

    #[tokio::test]
    async fn a_lost_subscription_makes_every_answer_and_fill_in_flight_old() {
        let shelf = shelf(Some(10));
        let cache = Arc::new(cache(&shelf, &config()));
        shelf.gate.add_permits(1);
        assert_eq!(units(&cache.get("m", "s").await.unwrap()), 10);
        *shelf.units.lock().unwrap() = Some(9);
        cache.mark_all_dirty();
        shelf.gate.add_permits(1);
        let (rendered, source) = cache.get("m", "s").await.unwrap();
        assert_eq!(
            (rendered.value.locations[0].available, source),
            (9, Source::Miss)
        );
    }

    #[tokio::test]
    async fn a_fill_that_panics_fails_its_readers_and_the_next_read_fills_again() {
        let calls = Arc::new(AtomicU64::new(0));
        let loader: Loader = Arc::new({
            let calls = Arc::clone(&calls);
            move |_, _, _| {
                let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                Box::pin(async move {
                    assert!(!first, "the store's client panicked");
                    Ok(Some(availability(2)))
                })
            }
        });
        let cache = cache_over(loader, &config());
        assert!(matches!(
            cache.get("m", "s").await,
            Err(ApiError::Internal(_))
        ));
        let (rendered, source) = cache.get("m", "s").await.expect("filled again");
        assert_eq!(
            (rendered.value.locations[0].available, source),
            (2, Source::Miss)
        );
    }

    #[test]
    fn views_are_rendered_once_and_match_their_etag() {
        let rendered = Rendered::new(availability(3)).unwrap();
        let all = rendered.view(None).unwrap();
        let one = rendered.view(Some("dc1")).unwrap();
        assert!(std::ptr::eq(one, rendered.view(Some("dc1")).unwrap()));
        assert!(rendered.view(Some("dc9")).is_none());
        assert!(all.matches(all.etag.as_bytes()));
        assert!(all.matches(format!("\"x\", {}", all.etag.to_str().unwrap()).as_bytes()));
        assert!(!all.matches(b"\"other\""));
        let body: Value = serde_json::from_slice(&all.body).unwrap();
        assert_eq!(body["available"], 3);
        assert_eq!(body["stale"], false);
    }
}
