//! Availability answers and the node's edge cache of them.
//!
//! Owns turning cells into the API's availability objects (status bands,
//! versions, ETags) and the bounded moka cache that serves them. Entries are
//! filled from Redis through the allocator, dropped when a change
//! notification names their SKU, marked dirty when notifications may have
//! been missed (a lost subscription), and served with `"stale": true` when
//! Redis cannot be reached. A reservation never decides on a cached value.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use allocator::{Allocator, Cell, StockKey};
use config::Config;
use moka::sync::Cache;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::ApiError;

/// One location of a SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocationAvailability {
    /// The location id.
    pub location: String,
    /// Sellable units shown to buyers (never below 0).
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
}

impl LocationAvailability {
    /// The location as the API shows it.
    pub fn to_json(&self) -> Value {
        json!({
            "location": self.location, "available": self.available, "on_hand": self.on_hand,
            "reserved": self.reserved, "safety_stock": self.safety_stock,
            "backorderable": self.backorderable, "status": self.status, "version": self.version,
        })
    }

    /// Builds a location's view from its pool and (in a flash sale) buckets.
    pub fn from_cells(location: &str, pool: &Cell, buckets: &[Cell], low_default: u64) -> Self {
        let bucket_free: i64 = buckets.iter().map(|bucket| bucket.sellable().max(0)).sum();
        let sellable = pool.sellable() + bucket_free;
        let available = sellable.max(0);
        let threshold = if pool.low_stock_threshold >= 0 {
            pool.low_stock_threshold
        } else {
            low_default as i64
        };
        let status = if available == 0 {
            "out_of_stock"
        } else if available <= threshold {
            "low"
        } else {
            "in_stock"
        };
        Self {
            location: location.to_owned(),
            available,
            on_hand: pool.on_hand + buckets.iter().map(|bucket| bucket.on_hand).sum::<i64>(),
            reserved: pool.reserved + buckets.iter().map(|bucket| bucket.reserved).sum::<i64>(),
            safety_stock: pool.safety_stock,
            backorderable: (pool.backorder_limit + pool.sellable().min(0)).max(0),
            status,
            version: pool.version + buckets.iter().map(|bucket| bucket.version).sum::<u64>(),
        }
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
    /// The API object, for all locations or one; `None` if `only` is unknown.
    pub fn to_json(&self, only: Option<&str>, stale: bool) -> Option<Value> {
        let locations: Vec<&LocationAvailability> = self
            .locations
            .iter()
            .filter(|location| only.is_none_or(|wanted| location.location == wanted))
            .collect();
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

    /// A strong ETag over the shown locations' versions.
    pub fn etag(&self, only: Option<&str>) -> String {
        let mut hash = Sha256::new();
        for location in &self.locations {
            if only.is_none_or(|wanted| location.location == wanted) {
                hash.update(location.location.as_bytes());
                hash.update(b"=");
                hash.update(location.version.to_string().as_bytes());
                hash.update(b";");
            }
        }
        format!("\"{}\"", &hex::encode(hash.finalize())[..20])
    }
}

struct Entry {
    value: Arc<SkuAvailability>,
    fetched_at: Instant,
    dirty: AtomicBool,
}

/// The bounded cache of availability per `(merchant, sku)`.
pub struct AvailabilityCache {
    /// Entries; the least recently used are evicted past the bound.
    entries: Cache<(String, String), Arc<Entry>>,
    /// Longest an entry is served without a refresh, ms.
    ttl_ms: AtomicU64,
    /// `low` status at or under this when a key sets no threshold.
    low_stock_default: AtomicU64,
    /// Where entries are filled from.
    allocator: Allocator,
    /// Whether change notifications reach this node (the app's change
    /// follower sets it): without them no cached entry counts as fresh.
    hearing: Arc<AtomicBool>,
    /// `availability_cache_total{result}` and `redis_errors_total`.
    counters: CacheCounters,
}

/// The metrics the cache counts into.
pub struct CacheCounters {
    /// Hits, misses and stale answers.
    pub results: prometheus::IntCounterVec,
    /// Reads that found Redis unreachable.
    pub redis_errors: prometheus::IntCounter,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A fresh cache entry.
    Hit,
    /// Read from Redis now.
    Miss,
    /// A cached entry served because Redis is unreachable.
    Stale,
}

impl AvailabilityCache {
    /// A cache sized from the config, filled through `allocator`, fresh
    /// only while `hearing` says change notifications arrive.
    pub fn new(
        config: &Config,
        allocator: Allocator,
        hearing: Arc<AtomicBool>,
        counters: CacheCounters,
    ) -> Self {
        Self {
            entries: Cache::builder()
                .max_capacity(config.cache.availability_entries_max)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            ttl_ms: AtomicU64::new(config.cache.availability_ttl_ms),
            low_stock_default: AtomicU64::new(config.cache.low_stock_threshold_default),
            allocator,
            hearing,
            counters,
        }
    }

    /// Applies a reloaded `[cache]` section (the bound applies from restart).
    pub fn reconfigure(&self, config: &Config) {
        self.ttl_ms
            .store(config.cache.availability_ttl_ms, Ordering::Relaxed);
        self.low_stock_default
            .store(config.cache.low_stock_threshold_default, Ordering::Relaxed);
    }

    /// Drops a SKU's entry after a change notification.
    pub fn invalidate(&self, merchant: &str, sku: &str) {
        if let Some(entry) = self.entries.get(&(merchant.to_owned(), sku.to_owned())) {
            entry.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Marks every entry dirty: notifications may have been missed.
    pub fn mark_all_dirty(&self) {
        for (_, entry) in self.entries.iter() {
            entry.dirty.store(true, Ordering::Relaxed);
        }
    }

    fn fresh(&self, key: &(String, String)) -> Option<Arc<SkuAvailability>> {
        let entry = self.entries.get(key)?;
        let ttl = Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed));
        (!entry.dirty.load(Ordering::Relaxed) && entry.fetched_at.elapsed() < ttl)
            .then(|| Arc::clone(&entry.value))
    }
}

impl AvailabilityCache {
    /// The availability of `(merchant, sku)`: from the cache, else Redis,
    /// else a stale cached copy; 404 for an unknown SKU, 503 when nothing is
    /// cached and Redis is unreachable.
    pub async fn get(
        &self,
        merchant: &str,
        sku: &str,
    ) -> Result<(Arc<SkuAvailability>, Source), ApiError> {
        let key = (merchant.to_owned(), sku.to_owned());
        // A node that does not hear changes cannot vouch for what it cached.
        if self.hearing.load(Ordering::SeqCst)
            && let Some(value) = self.fresh(&key)
        {
            self.counters.results.with_label_values(&["hit"]).inc();
            return Ok((value, Source::Hit));
        }
        match self.load(merchant, sku).await {
            Ok(Some(value)) => {
                let value = Arc::new(value);
                self.entries.insert(
                    key,
                    Arc::new(Entry {
                        value: Arc::clone(&value),
                        fetched_at: Instant::now(),
                        dirty: AtomicBool::new(false),
                    }),
                );
                self.counters.results.with_label_values(&["miss"]).inc();
                Ok((value, Source::Miss))
            }
            Ok(None) => Err(ApiError::NotFound(format!(
                "no stock key for {merchant}/{sku}"
            ))),
            Err(ApiError::StoreUnavailable) => {
                self.counters.redis_errors.inc();
                match self.entries.get(&key) {
                    Some(entry) => {
                        self.counters.results.with_label_values(&["stale"]).inc();
                        Ok((Arc::clone(&entry.value), Source::Stale))
                    }
                    None => Err(ApiError::StoreUnavailable),
                }
            }
            Err(other) => Err(other),
        }
    }

    async fn load(&self, merchant: &str, sku: &str) -> Result<Option<SkuAvailability>, ApiError> {
        let low_default = self.low_stock_default.load(Ordering::Relaxed);
        let mut locations = Vec::new();
        for location in self.allocator.locations(merchant, sku).await? {
            let key = StockKey::new(merchant, sku, &location);
            // The pool and the buckets it lists, in a sale or after it.
            let view = self.allocator.stock_view(&key).await?;
            let Some(pool) = &view.pool else { continue };
            let buckets: Vec<Cell> = view.buckets.into_iter().map(|(_, cell)| cell).collect();
            locations.push(LocationAvailability::from_cells(
                &location,
                pool,
                &buckets,
                low_default,
            ));
        }
        if locations.is_empty() {
            return Ok(None);
        }
        Ok(Some(SkuAvailability {
            merchant: merchant.to_owned(),
            sku: sku.to_owned(),
            locations,
        }))
    }
}
