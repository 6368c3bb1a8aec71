//! Load tests: goose scenarios (browse, flash sale, checkout, ingest), the
//! catalog seeder and the end-of-run checks behind `scripts/bench`.
//!
//! It talks to the gateway over HTTP only (plus Kafka for the half of the
//! ingest feed that arrives as `inventory.events` messages) and shares no
//! code with it, so it measures what a real client sees.
//!
//! What each scenario does:
//!
//! * `browse`: availability reads, Zipf-distributed over the seeded catalog
//!   (`sku-000000` …), one in ten a batch read of 20 keys.
//! * `flash-sale`: users race for a few hot keys (`hot-0` …) across every
//!   gateway node; each hold is then committed (60%), released (25%) or left
//!   to expire (15%, with a short TTL). Refusals (409) are counted, and so
//!   is every refusal while the key still showed units available (read
//!   right after the refusal: the figure of "sold out while units remained
//!   elsewhere", an upper bound since the read is a moment later).
//! * `checkout`: carts of 2 to 4 lines on catalog keys, committed (80%) or
//!   released; a third name each line's location (`reserve`), a third
//!   leave it to the allocator (`reserve_anywhere`), and a third have one
//!   line of 3 that prefers the split location (`--split-location`, where
//!   the working keys are seeded with few units) and may be split
//!   (`reserve_split`). Each kind is its own request name, so its
//!   percentiles stand beside the others'.
//! * `ingest`: stock adjustments (+1 deltas with unique event ids), half
//!   through `POST /v1/stock/adjustments`, half as Kafka messages.
//!
//! The end-of-run check reads each touched key back over HTTP: units
//! oversold (sold beyond what was available at the start) and units
//! unaccounted for (on hand at the end ≠ on hand at the start − sold) must
//! both be 0. The ledger's own audit is `ledger-writer audit`, which
//! `scripts/bench` runs after every scenario.

use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Zipf};
use serde::Serialize;

/// The catalog key of index `index` (what `seed` creates).
pub fn catalog_sku(index: u64) -> String {
    format!("sku-{index:06}")
}

/// Zipf-distributed catalog indexes: index 0 is the most read.
pub struct Catalog {
    /// The distribution over 1..=keys.
    zipf: Zipf<f64>,
}

impl Catalog {
    /// A catalog of `keys` keys with Zipf exponent `exponent` (1.0 is the
    /// classic web-shop skew).
    pub fn new(keys: u64, exponent: f64) -> anyhow::Result<Self> {
        let zipf = Zipf::new(keys.max(1) as f64, exponent)
            .map_err(|error| anyhow::anyhow!("zipf over {keys} keys: {error}"))?;
        Ok(Self { zipf })
    }

    /// One catalog index.
    pub fn pick(&self, rng: &mut StdRng) -> u64 {
        (self.zipf.sample(rng) as u64).saturating_sub(1)
    }
}

/// A uniform index below `count`.
pub fn uniform(rng: &mut StdRng, count: u64) -> u64 {
    rng.random_range(0..count.max(1))
}

/// What the scenarios saw beyond request timings, counted across users.
#[derive(Default)]
pub struct Outcomes {
    /// Holds granted (201).
    pub held: AtomicU64,
    /// Refused for stock (409 insufficient_stock).
    pub refused: AtomicU64,
    /// Refused by a flash sale's checkout throttle (429).
    pub throttled: AtomicU64,
    /// Refused by a flash sale's limit per customer (409 customer_limit).
    pub customer_limited: AtomicU64,
    /// Refused while a read right after still showed units available.
    pub refused_while_available: AtomicU64,
    /// Units sold (holds committed, times their quantity).
    pub sold_units: AtomicU64,
    /// Holds committed.
    pub committed: AtomicU64,
    /// Holds released.
    pub released: AtomicU64,
    /// Holds left to expire.
    pub left_to_expire: AtomicU64,
    /// Adjustments sent over HTTP and applied.
    pub adjustments_http: AtomicU64,
    /// Adjustments published to Kafka.
    pub adjustments_kafka: AtomicU64,
    /// Responses that were neither success nor an expected refusal.
    pub unexpected: AtomicU64,
    /// Reservations granted with a line held across several locations.
    pub split_lines: AtomicU64,
}

impl Outcomes {
    /// Adds one to `counter`.
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts as plain numbers.
    pub fn snapshot(&self) -> OutcomeCounts {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        OutcomeCounts {
            held: get(&self.held),
            refused: get(&self.refused),
            throttled: get(&self.throttled),
            customer_limited: get(&self.customer_limited),
            refused_while_available: get(&self.refused_while_available),
            sold_units: get(&self.sold_units),
            committed: get(&self.committed),
            released: get(&self.released),
            left_to_expire: get(&self.left_to_expire),
            adjustments_http: get(&self.adjustments_http),
            adjustments_kafka: get(&self.adjustments_kafka),
            unexpected: get(&self.unexpected),
            split_lines: get(&self.split_lines),
        }
    }
}

/// [`Outcomes`] as numbers, for the summary.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct OutcomeCounts {
    /// Holds granted.
    pub held: u64,
    /// Refused for stock.
    pub refused: u64,
    /// Refused by a checkout throttle.
    pub throttled: u64,
    /// Refused by a limit per customer.
    pub customer_limited: u64,
    /// Refused while units still showed available.
    pub refused_while_available: u64,
    /// Units sold.
    pub sold_units: u64,
    /// Holds committed.
    pub committed: u64,
    /// Holds released.
    pub released: u64,
    /// Holds left to expire.
    pub left_to_expire: u64,
    /// Adjustments applied over HTTP.
    pub adjustments_http: u64,
    /// Adjustments published to Kafka.
    pub adjustments_kafka: u64,
    /// Unexpected responses.
    pub unexpected: u64,
    /// Reservations granted with a line held across several locations.
    pub split_lines: u64,
}

/// Latency and throughput of one request kind, from goose's metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestFigures {
    /// The request name (`reserve`, `availability`, ...).
    pub name: String,
    /// Requests made.
    pub requests: u64,
    /// Requests per second over the run.
    pub requests_per_second: f64,
    /// Latency percentiles and maximum, ms.
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
    /// Share of requests that failed (neither success nor an expected 409).
    pub error_rate: f64,
    /// Share of requests answered 409.
    pub conflict_rate: f64,
}

/// The end-of-run check of the keys a scenario touched.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StockCheck {
    /// Units sold beyond what was available at the start: must be 0.
    pub units_oversold: i64,
    /// On hand at the start − sold − on hand at the end, over the checked
    /// keys (0 unless units went missing; adjustments are counted in).
    pub units_unaccounted: i64,
    /// Keys checked.
    pub keys_checked: u64,
}

/// What one scenario run reports (`--summary FILE`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// The scenario.
    pub scenario: String,
    /// Gateway nodes it spread users over.
    pub hosts: Vec<String>,
    /// Users goose ran.
    pub users: usize,
    /// Seconds the load ran.
    pub duration_seconds: usize,
    /// Requests per second cap (goose `--throttle-requests`; 0: none).
    pub throttle_requests_per_second: usize,
    /// Random seed.
    pub seed: u64,
    /// Per request kind.
    pub requests: Vec<RequestFigures>,
    /// Outcome counts.
    pub outcomes: OutcomeCounts,
    /// The stock check.
    pub check: StockCheck,
}

/// Availability of one stock key (a SKU at a location) as the gateway
/// answers it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLevels {
    /// on_hand (pool and buckets).
    pub on_hand: i64,
    /// What the gateway says can be sold.
    pub available: i64,
}

/// Reads `sku`'s levels at every location it has, by location (a
/// reservation that names no location may hold at any; each location is
/// checked on its own, so units oversold at one are never hidden by units
/// left at another). Reads may be served from the node's cache, so a
/// caller comparing before and after waits out the cache TTL first.
pub async fn key_levels(
    client: &reqwest::Client,
    host: &str,
    api_key: &str,
    merchant: &str,
    sku: &str,
) -> anyhow::Result<std::collections::HashMap<String, KeyLevels>> {
    let response = client
        .get(format!("{host}/v1/availability/{merchant}/{sku}"))
        .bearer_auth(api_key)
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "availability of {sku}: {}",
        response.status()
    );
    let body: serde_json::Value = response.json().await?;
    Ok(body["locations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|line| {
            Some((
                line["location"].as_str()?.to_owned(),
                KeyLevels {
                    on_hand: line["on_hand"].as_i64()?,
                    available: line["available"].as_i64()?,
                },
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn zipf_picks_stay_in_the_catalog_and_favour_the_head() {
        let catalog = Catalog::new(1000, 1.0).expect("catalog");
        let mut rng = StdRng::seed_from_u64(7);
        let picks: Vec<u64> = (0..10_000).map(|_| catalog.pick(&mut rng)).collect();
        assert!(picks.iter().all(|pick| *pick < 1000));
        let head = picks.iter().filter(|pick| **pick < 10).count();
        let tail = picks.iter().filter(|pick| **pick >= 990).count();
        assert!(head > 10 * tail.max(1), "head {head}, tail {tail}");
    }

    #[test]
    fn the_same_seed_gives_the_same_picks() {
        let catalog = Catalog::new(100_000, 1.0).expect("catalog");
        let picks = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..100).map(|_| catalog.pick(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(picks(3), picks(3));
        assert_ne!(picks(3), picks(4));
    }

    #[test]
    fn key_names_are_fixed_width() {
        assert_eq!(catalog_sku(42), "sku-000042");
    }
}
