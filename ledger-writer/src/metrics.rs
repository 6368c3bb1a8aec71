//! The writer's Prometheus metrics, served at `/metrics` on
//! `ledger_writer.metrics_listen`.
//!
//! Owns the registry, every series, and the small HTTP listener that serves
//! them (`GET /metrics`; `GET /health`, 200 while the process runs; and
//! `GET /ready`, 503 with the reason while the writer still waits for
//! PostgreSQL or Redis at start, 200 once it runs). The
//! relay, ingestion and reconciler update the typed fields; the outbox lag
//! is measured from Redis for every partition, whoever holds its lease, so
//! a partition nobody relays shows its lag too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing::warn;

/// Every series of one writer.
pub struct Metrics {
    registry: Registry,
    /// The process's own series (`process_cpu_seconds_total`, memory, file
    /// descriptors, threads) under their standard names, which the
    /// `invgw_writer` prefix of `registry` would change.
    process: Registry,
    /// Outbox entries not yet acknowledged (pending or unread), per partition.
    pub lag_entries: IntGaugeVec,
    /// Age of the oldest unacknowledged outbox entry (seconds), per partition.
    pub lag_oldest_seconds: GaugeVec,
    /// Unacknowledged entries over all partitions.
    pub lag_entries_all: IntGauge,
    /// 1 while the total lag is over `ledger_writer.lag_alert_entries`.
    pub lag_alert: IntGauge,
    /// Entries relayed and acknowledged by this writer.
    pub relayed: IntCounter,
    /// Entries per relayed batch.
    pub batch_entries: Histogram,
    /// Seconds from reading a batch to acknowledging it.
    pub batch_seconds: Histogram,
    /// Freshness: seconds from an entry's operation (its stream id's Redis
    /// time) until a sink confirmed it (`kafka`: delivered with acks=all;
    /// `postgresql`: its row committed, visible to the views), by sink.
    pub entry_visible_seconds: HistogramVec,
    /// Failed relay passes by the sink that failed: kafka, postgresql, redis.
    pub errors: IntCounterVec,
    /// Batches refused because this writer had lost the partition's lease.
    pub fenced: IntCounter,
    /// Partition leases held now.
    pub leases_held: IntGauge,
    /// Lease changes: acquired, released, lost.
    pub lease_changes: IntCounterVec,
    /// Stock events applied by ingestion, by outcome (applied, duplicate,
    /// stale, ...).
    pub events: IntCounterVec,
    /// Messages sent to the dead-letter topic.
    pub dead_letters: IntCounter,
    /// Stock signals decided by this writer's relay, by kind.
    pub signals_decided: IntCounterVec,
    /// Stock signals this writer published to Kafka, by kind.
    pub signals: IntCounterVec,
    /// Signals waiting to be published when this writer last looked (0
    /// while another writer publishes).
    pub signals_unpublished: IntGauge,
    /// Webhook attempts by outcome: delivered, retried, dead_lettered.
    pub webhook_deliveries: IntCounterVec,
    /// Seconds from a signal's decision to its delivery's 2xx.
    pub webhook_delivery_seconds: Histogram,
    /// Webhook deliveries not yet delivered or dead-lettered (as the
    /// dispatching writer last counted them).
    pub webhook_pending: IntGauge,
    /// Reconciler actions: expired, transfers_finished, carts_finished,
    /// allowances_settled, allowances_given_back, units_reclaimed.
    pub reconciler: IntCounterVec,
    /// Flash-sale buckets the reconciler took back, by
    /// [`crate::reconcile::ReclaimReason`].
    pub bucket_reclaims: IntCounterVec,
    /// Reconciler items that failed (a transfer, a cart, a partition's
    /// sweep, a key's buckets), by action; each is retried with backoff.
    pub reconciler_errors: IntCounterVec,
    /// Items the reconciler gave up retrying after too many failures: an
    /// alert (they need an operator; the audit shows their units).
    pub reconciler_parked: IntGauge,
    /// What the writer still waits for at start (`GET /ready`).
    pub readiness: Readiness,
}

/// Whether the writer runs, or the dependency it still waits for and why.
pub struct Readiness(std::sync::Mutex<Option<String>>);

impl Readiness {
    /// Still waiting: `reason` names the dependency and its error.
    pub fn waiting(&self, reason: String) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason);
    }

    /// Running: every dependency answered.
    pub fn ready(&self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// The reason it is not ready, if it is not.
    pub fn not_ready(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Metrics {
    /// A fresh registry with every series, labelled with the writer id.
    pub fn new(writer: &str) -> Self {
        let registry = Registry::new_custom(
            Some("invgw_writer".to_owned()),
            Some([("writer".to_owned(), writer.to_owned())].into()),
        )
        .expect("static registry settings are valid");
        let process = process_registry("writer", writer);
        let register = |metric: Box<dyn prometheus::core::Collector>| {
            registry.register(metric).expect("unique metric");
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(metric.clone()));
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric");
            register(Box::new(metric.clone()));
            metric
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(metric.clone()));
            metric
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("valid metric");
            register(Box::new(metric.clone()));
            metric
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid");
            register(Box::new(metric.clone()));
            metric
        };
        let metrics = Self {
            lag_entries: gauge_vec(
                "lag_entries",
                "outbox entries not yet relayed, per partition",
                &["partition"],
            ),
            lag_oldest_seconds: {
                let metric = GaugeVec::new(
                    Opts::new(
                        "lag_oldest_seconds",
                        "age of the oldest outbox entry not yet relayed, per partition",
                    ),
                    &["partition"],
                )
                .expect("valid metric");
                register(Box::new(metric.clone()));
                metric
            },
            lag_entries_all: gauge(
                "lag_all_partitions_entries",
                "outbox entries not yet relayed, all partitions",
            ),
            lag_alert: gauge(
                "lag_alert",
                "1 while the outbox lag is over ledger_writer.lag_alert_entries",
            ),
            relayed: counter(
                "relayed_entries_total",
                "entries relayed to kafka and postgresql and acknowledged",
            ),
            batch_entries: histogram(
                "batch_entries",
                "entries per relayed batch",
                vec![1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0],
            ),
            batch_seconds: histogram(
                "batch_seconds",
                "seconds from reading a batch to acknowledging it",
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            ),
            entry_visible_seconds: {
                let metric = HistogramVec::new(
                    HistogramOpts::new(
                        "entry_visible_seconds",
                        "seconds from a ledger entry's operation (Redis time) until the sink confirmed it",
                    )
                    .buckets(vec![
                        0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
                        30.0, 60.0, 180.0, 600.0,
                    ]),
                    &["sink"],
                )
                .expect("valid metric");
                for sink in ["kafka", "postgresql"] {
                    metric.with_label_values(&[sink]);
                }
                register(Box::new(metric.clone()));
                metric
            },
            errors: counter_vec(
                "errors_total",
                "failed relay passes, by the sink that failed",
                &["sink"],
            ),
            fenced: counter(
                "fenced_batches_total",
                "batches refused because this writer had lost the partition lease",
            ),
            reconciler_errors: counter_vec(
                "reconciler_errors_total",
                "reconciler items that failed, by action (retried with backoff)",
                &["action"],
            ),
            reconciler_parked: gauge(
                "reconciler_parked_items",
                "reconciler items given up after too many failures (alert)",
            ),
            leases_held: gauge("leases_held", "partition leases this writer holds"),
            lease_changes: counter_vec(
                "lease_changes_total",
                "partition leases acquired, released or lost",
                &["change"],
            ),
            events: counter_vec(
                "events_total",
                "stock events ingested from kafka, by outcome",
                &["outcome"],
            ),
            dead_letters: counter(
                "dead_letters_total",
                "stock events sent to the dead-letter topic",
            ),
            signals_decided: counter_vec(
                "signals_decided_total",
                "stock signals this writer's relay decided, by kind",
                &["kind"],
            ),
            signals: counter_vec(
                "signals_published_total",
                "stock signals this writer published to kafka.signals_topic, by kind",
                &["kind"],
            ),
            webhook_deliveries: counter_vec(
                "webhook_deliveries_total",
                "webhook delivery attempts by outcome: delivered (a 2xx), retried, dead_lettered (given up)",
                &["outcome"],
            ),
            webhook_delivery_seconds: histogram(
                "webhook_delivery_seconds",
                "seconds from a signal's decision to its webhook delivery's 2xx",
                vec![
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
                ],
            ),
            webhook_pending: gauge(
                "webhook_pending_deliveries",
                "webhook deliveries waiting for a 2xx, as the dispatching writer last counted them",
            ),
            signals_unpublished: gauge(
                "signals_unpublished",
                "stock signals waiting to be published when this writer last looked",
            ),
            reconciler: counter_vec(
                "reconciler_actions_total",
                "reconciler actions: expired holds, finished transfers and carts, settled and given-back customer allowances, reclaimed units",
                &["action"],
            ),
            bucket_reclaims: counter_vec(
                "bucket_reclaims_total",
                "flash-sale buckets taken back by the reconciler, by why: sale_not_in_force, node_lapsed (its heartbeat lapsed), idle",
                &["reason"],
            ),
            readiness: Readiness(std::sync::Mutex::new(Some("starting".to_owned()))),
            registry,
            process,
        };
        // Every known label value from 0, so a rule's `increase()` sees the
        // first event and every series is there to be looked at.
        for sink in crate::relay::RelayError::SINKS {
            metrics.errors.with_label_values(&[sink]);
        }
        for reason in crate::reconcile::ReclaimReason::ALL {
            metrics.bucket_reclaims.with_label_values(&[reason.label()]);
        }
        for outcome in ["delivered", "retried", "dead_lettered"] {
            metrics.webhook_deliveries.with_label_values(&[outcome]);
        }
        for kind in crate::signals::SignalKind::ALL {
            metrics.signals_decided.with_label_values(&[kind.as_str()]);
            metrics.signals.with_label_values(&[kind.as_str()]);
        }
        metrics
    }

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buffer)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

/// A registry of this process's own series, labelled `label = value`.
fn process_registry(label: &str, value: &str) -> Registry {
    let registry = Registry::new_custom(None, Some([(label.to_owned(), value.to_owned())].into()))
        .expect("static registry settings are valid");
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("unique metric");
    registry
}

/// Serves `/metrics`, `/health` and `/ready` on `listener` until the task
/// is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "metrics listener accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let metrics = Arc::clone(&metrics);
                    async move { Ok::<_, Infallible>(answer(&request, &metrics)) }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // Bounded: a scraper that stalls does not hold a task forever.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), connection).await;
        });
    }
}

/// Binds the metrics listener (so a taken port fails the start, loudly).
pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await
}

fn answer(request: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method().as_str(), request.uri().path()) {
        ("GET", "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        ("GET", "/health") => (
            StatusCode::OK,
            "application/json",
            r#"{"status":"ok"}"#.to_owned(),
        ),
        ("GET", "/ready") => match metrics.readiness.not_ready() {
            None => (
                StatusCode::OK,
                "application/json",
                r#"{"status":"ready"}"#.to_owned(),
            ),
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                serde_json::json!({ "status": "not_ready", "reason": reason }).to_string(),
            ),
        },
        (_, "/metrics" | "/health" | "/ready") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "application/json",
            r#"{"error":"method_not_allowed","message":"only GET is allowed here"}"#.to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"error":"not_found","message":"the writer serves /metrics, /health and /ready"}"#
                .to_owned(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
