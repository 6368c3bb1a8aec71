//! The node's Prometheus metrics, served at `/metrics`.
//!
//! Owns the registry and every series; handlers and background tasks update
//! them through the typed fields. Route labels are route templates, never raw
//! paths, so the label set stays bounded.

use std::sync::{Arc, Mutex};

use allocator::Reserver;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every series of the node.
pub struct Metrics {
    registry: Registry,
    /// The process's own series (`process_cpu_seconds_total`, memory, file
    /// descriptors, threads) under their standard names, which the `invgw`
    /// prefix of `registry` would change.
    process: Registry,
    /// Requests answered locally, by route template and status.
    pub requests: IntCounterVec,
    /// Latency of locally answered requests, by route template.
    pub latency: HistogramVec,
    /// Requests proxied to the origin, by status.
    pub proxied: IntCounterVec,
    /// Reservation outcomes: held, replayed, insufficient, refused, error.
    pub reservations: IntCounterVec,
    /// Availability cache lookups: hit, miss, stale.
    pub cache: IntCounterVec,
    /// Reservations per coalesced `reserve_batch` call.
    pub batch_size: Histogram,
    /// How long a coalesced batch's oldest hold waited for its call.
    pub batch_wait: Histogram,
    /// Bucket free units per sale and node, as last seen.
    pub bucket_level: IntGaugeVec,
    /// Sellable units of a sale's pool, as last seen.
    pub pool_level: IntGaugeVec,
    /// Units a sale's cells hold for reservations beyond their own on-hand
    /// units and backorder limit (0 but in a fault or a loss the shelf
    /// cannot cover).
    pub oversold: IntGaugeVec,
    /// Refills this node made.
    pub refills: IntCounter,
    /// Reclaims this node made.
    pub reclaims: IntCounter,
    /// Redis calls that failed.
    pub redis_errors: IntCounter,
    /// Open SSE streams.
    pub streams: IntGauge,
    /// SSE streams dropped for being too slow.
    pub streams_dropped: IntCounter,
    /// Accepted config reloads.
    pub config_reloads: IntCounter,
    /// 1 while a configured stock source is offline, per source.
    pub source_offline: IntGaugeVec,
    /// Seconds since a configured source was last heard from, per source
    /// (absent for one never heard from).
    pub source_quiet: IntGaugeVec,
    /// The sources (merchant, name) the two gauges above show.
    sources_shown: std::sync::Mutex<Vec<(String, String)>>,
}

/// `metric`, registered in `registry`.
fn registered<T: Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Metrics {
    /// A fresh registry with every series, labelled with the node id.
    pub fn new(node: &str) -> Self {
        let registry = Registry::new_custom(
            Some("invgw".to_owned()),
            Some([("node".to_owned(), node.to_owned())].into()),
        )
        .expect("static registry settings are valid");
        let process =
            Registry::new_custom(None, Some([("node".to_owned(), node.to_owned())].into()))
                .expect("static registry settings are valid");
        process
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            registered(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let counter = |name: &str, help: &str| {
            registered(
                &registry,
                IntCounter::new(name, help).expect("valid metric"),
            )
        };
        let requests = counter_vec(
            "requests_total",
            "Requests answered by the gateway",
            &["route", "status"],
        );
        let proxied = counter_vec(
            "proxied_requests_total",
            "Requests proxied to the origin",
            &["status"],
        );
        let reservations = counter_vec("reservations_total", "Reservation outcomes", &["outcome"]);
        let cache = counter_vec(
            "availability_cache_total",
            "Availability cache lookups",
            &["result"],
        );
        let latency = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "request_duration_seconds",
                    "Latency of requests answered by the gateway",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["route"],
            )
            .expect("valid metric"),
        );
        let batch_size = registered(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "coalesced_batch_size",
                    "Reservations per reserve_batch call",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            )
            .expect("valid metric"),
        );
        let batch_wait = registered(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "coalesced_wait_seconds",
                    "How long a reserve_batch call's oldest reservation waited for the call",
                )
                .buckets(vec![
                    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                ]),
            )
            .expect("valid metric"),
        );
        let bucket_level = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new("bucket_free_units", "Free units in a flash-sale bucket"),
                &["sale", "bucket_node"],
            )
            .expect("valid metric"),
        );
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            registered(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let pool_level = gauge_vec(
            "sale_pool_sellable_units",
            "Sellable units of a flash sale's pool",
            &["sale"],
        );
        let oversold = gauge_vec(
            "sale_oversold_units",
            "Units a flash sale's cells hold for reservations beyond their on-hand units and backorder limit",
            &["sale"],
        );
        let source_offline = gauge_vec(
            "source_offline",
            "1 while a configured stock source (POS, WMS) is quiet past its offline_after_seconds or was never heard from",
            &["merchant", "source"],
        );
        let source_quiet = gauge_vec(
            "source_quiet_seconds",
            "Seconds since a configured stock source was last heard from",
            &["merchant", "source"],
        );
        let streams = registered(
            &registry,
            IntGauge::new("sse_streams", "Open server-sent event streams").expect("valid metric"),
        );
        Self {
            requests,
            latency,
            proxied,
            reservations,
            cache,
            batch_size,
            batch_wait,
            bucket_level,
            pool_level,
            oversold,
            refills: counter("bucket_refills_total", "Bucket refills made by this node"),
            reclaims: counter("bucket_reclaims_total", "Bucket reclaims made by this node"),
            redis_errors: counter("redis_errors_total", "Redis calls that failed"),
            streams,
            streams_dropped: counter(
                "sse_streams_dropped_total",
                "SSE streams dropped as too slow",
            ),
            config_reloads: counter("config_reloads_total", "Accepted config reloads"),
            source_offline,
            source_quiet,
            sources_shown: Default::default(),
            registry,
            process,
        }
    }

    /// Shows the configured sources as last judged (only those: a source
    /// removed from the config leaves the series).
    pub fn show_sources(&self, states: &[crate::sources::SourceState]) {
        let mut shown = self
            .sources_shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (merchant, name) in shown.iter().filter(|(merchant, name)| {
            !states
                .iter()
                .any(|state| &state.merchant == merchant && &state.name == name)
        }) {
            let _ = self.source_offline.remove_label_values(&[merchant, name]);
            let _ = self.source_quiet.remove_label_values(&[merchant, name]);
        }
        *shown = states
            .iter()
            .map(|state| (state.merchant.clone(), state.name.clone()))
            .collect();
        for state in states {
            let labels = [state.merchant.as_str(), state.name.as_str()];
            self.source_offline
                .with_label_values(&labels)
                .set(i64::from(state.offline));
            match state.quiet_seconds {
                Some(quiet) => self
                    .source_quiet
                    .with_label_values(&labels)
                    .set(quiet as i64),
                None => {
                    let _ = self.source_quiet.remove_label_values(&labels);
                }
            }
        }
    }

    /// Serves what each flash sale in force on this node answered
    /// (`sale_reservations_total`, `sale_refused_with_units_left_total`),
    /// read from `reserver`'s sales at every scrape.
    pub fn serve_sales(&self, reserver: Arc<Reserver>) {
        self.registry
            .register(Box::new(SaleOutcomes::new(reserver)))
            .expect("unique metric");
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let mut out = Vec::new();
        if TextEncoder::new().encode(&families, &mut out).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The per-sale outcome counters of the sales in force here, as series.
/// The allocator counts them on its hot path ([`allocator::HotOutcomes`],
/// their one home); this reads them at each scrape. A sale put in force
/// again (a new epoch) starts from 0, which Prometheus takes as a reset; a
/// sale that ends here leaves the exposition with it (what it answered after
/// the last scrape is not exported).
struct SaleOutcomes {
    reserver: Arc<Reserver>,
    /// Filled afresh at each scrape, under the lock (scrapes may overlap).
    series: Mutex<(IntCounterVec, IntCounterVec)>,
    descs: Vec<Desc>,
}

impl SaleOutcomes {
    fn new(reserver: Arc<Reserver>) -> Self {
        let outcomes = IntCounterVec::new(
            Opts::new(
                "sale_reservations_total",
                "New holds and refusals on a flash sale's key made by this node's hot path, and attempts its checkout throttle refused here (outcome throttled), and requests its customer limits refused here (outcome customer_limit)",
            ),
            &["sale", "outcome"],
        )
        .expect("valid metric");
        let units_left = IntCounterVec::new(
            Opts::new(
                "sale_refused_with_units_left_total",
                "Flash-sale reservations refused while the key still had the units sellable",
            ),
            &["sale"],
        )
        .expect("valid metric");
        let descs = outcomes
            .desc()
            .into_iter()
            .chain(units_left.desc())
            .cloned()
            .collect();
        Self {
            reserver,
            series: Mutex::new((outcomes, units_left)),
            descs,
        }
    }
}

impl Collector for SaleOutcomes {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (outcomes, units_left) = &*series;
        outcomes.reset();
        units_left.reset();
        for hot in self.reserver.hot_sales() {
            let sale = hot.sale.name.as_str();
            let counts = hot.outcomes.counts();
            for (outcome, count) in [("held", counts.held), ("insufficient", counts.insufficient)] {
                outcomes.with_label_values(&[sale, outcome]).inc_by(count);
            }
            units_left
                .with_label_values(&[sale])
                .inc_by(counts.insufficient_with_units_left);
        }
        for throttle in self.reserver.throttles() {
            outcomes
                .with_label_values(&[throttle.sale(), "throttled"])
                .inc_by(throttle.refused());
        }
        for (sale, refused) in self.reserver.customer_limit_refusals() {
            outcomes
                .with_label_values(&[&sale, "customer_limit"])
                .inc_by(refused);
        }
        let mut families = outcomes.collect();
        families.extend(units_left.collect());
        families
    }
}
