//! The ledger writer: drains each partition's Redis outbox stream into Kafka
//! `inventory.ledger` and the PostgreSQL ledger, and runs the reconciler that
//! keeps stock tidy.
//!
//! Owns the relay ([`relay`]), the partition leases that divide the relay
//! between writer instances ([`lease`]), ingestion of stock events
//! ([`ingest`]), the schema migrations ([`migrate`]), the audit ([`audit`]),
//! the reconciler ([`reconcile`]),
//! the rebuild of Redis from the ledger ([`rebuild`]), the ledger's life in
//! PostgreSQL after the relay (day partitions, curated history and
//! retention, [`retention`]; the Parquet archive and replay, [`archive`];
//! undoing a bad import, [`compensate`]), stock signals derived from the
//! relayed ledger and published to Kafka ([`signals`]) and delivered to
//! partner webhooks ([`deliver`]), the writer's metrics
//! ([`metrics`]) and the reconciler loop. It never decides stock: everything
//! the reconciler does is an idempotent allocator call (expire due holds,
//! credit debited transfers, finish carts left half way, reclaim buckets),
//! so every instance runs it at once, while each partition's outbox is
//! relayed by the one instance holding its lease.

pub mod archive;
pub mod audit;
pub mod compensate;
pub mod deliver;
pub mod ingest;
pub mod lease;
pub mod metrics;
pub mod migrate;
pub mod rebuild;
pub mod reconcile;
pub mod redrive;
pub mod relay;
pub mod retention;
pub mod signals;
pub mod tail;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use allocator::{Allocator, AllocatorSettings};
use anyhow::Context;
use config::Config;
use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;
use tracing::{info, warn};

use crate::lease::{Lease, Leases};
use crate::metrics::Metrics;
use crate::relay::{Relay, RelayError, report};

/// How long the relay rests when every stream was empty.
const IDLE_PAUSE: Duration = Duration::from_millis(50);
/// How long the relay rests after a failed pass (Kafka or PostgreSQL down).
const FAILURE_PAUSE: Duration = Duration::from_millis(500);

/// The SHA-256 of `bytes`, in lowercase hex (archive checksums, the views'
/// version).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Connects to PostgreSQL and spawns the connection task.
pub async fn connect_postgres(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let _: tokio_postgres::Config = config.postgres.url.parse().context("postgres url")?;
    webhooks::store::connect(&config.postgres)
        .await
        .context("connecting to postgresql")
}

/// Bounds how long a session may sit inside a transaction doing nothing:
/// for the relay's and the signal publisher's sessions, whose transactions
/// hold locks other writers wait on (a stock key's signal state, the
/// publishing lock). A writer frozen or cut off mid-transaction then frees
/// them within this, not when TCP gives up hours later.
/// The bound is 30 s, or twice `kafka.request_timeout_ms` if longer (the
/// publisher awaits Kafka inside its transaction).
pub async fn bound_idle_transactions(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<(), tokio_postgres::Error> {
    let bound_ms = (2 * config.kafka.request_timeout_ms).max(30_000);
    client
        .batch_execute(&format!(
            "SET idle_in_transaction_session_timeout = {bound_ms}"
        ))
        .await
}

/// The `acks=all` producer of the ledger topic: idempotent unless
/// `kafka.idempotent_producer` is false.
pub fn producer(config: &Config) -> anyhow::Result<FutureProducer> {
    let mut client = ClientConfig::new();
    if config.kafka.idempotent_producer {
        client.set("enable.idempotence", "true");
    } else {
        // Order by one request in flight instead (config docs).
        client
            .set("enable.idempotence", "false")
            .set("max.in.flight.requests.per.connection", "1");
    }
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            config.kafka.request_timeout_ms.to_string(),
        )
        .set("linger.ms", "5")
        .create()
        .context("creating the kafka producer")
}

/// Connects to PostgreSQL, waiting while it does not answer (not started
/// yet, starting up, restarting): each failed try is logged and made the
/// writer's `/ready` reason, and tries are paced by
/// [`allocator::StartRetry`]. A URL it cannot parse is an error.
pub async fn wait_for_postgres(
    config: &Config,
    readiness: &metrics::Readiness,
) -> anyhow::Result<tokio_postgres::Client> {
    let _: tokio_postgres::Config = config.postgres.url.parse().context("postgres url")?;
    let mut retry = allocator::StartRetry::new();
    loop {
        match connect_postgres(config).await {
            Ok(client) => return Ok(client),
            Err(error) => waiting(readiness, "PostgreSQL", &format!("{error:#}")),
        }
        retry.rest().await;
    }
}

/// Logs, and shows on `/ready`, that the writer waits for `dependency`.
fn waiting(readiness: &metrics::Readiness, dependency: &str, reason: &str) {
    warn!(dependency, %reason, "waiting for a dependency to answer");
    readiness.waiting(format!("waiting for {dependency}: {reason}"));
}

/// Runs the relay, the leases, ingestion, the reconciler and the metrics
/// listener until `shutdown` resolves; then gives up its leases so another
/// writer takes over at once.
///
/// The metrics listener comes first: while PostgreSQL or Redis do not
/// answer yet, the writer waits for them (logging each try's cause) and its
/// `/ready` says which it waits for; a stop signal meanwhile ends it.
pub async fn run(config: Arc<Config>, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    allocator::limits::check_config(&config).map_err(|reason| anyhow::anyhow!(reason))?;
    let metrics = Arc::new(Metrics::new(&config.node.id));
    let listener = metrics::bind(config.ledger_writer.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "binding ledger_writer.metrics_listen {}",
                config.ledger_writer.metrics_listen
            )
        })?;
    let mut background = tokio::task::JoinSet::new();
    background.spawn(metrics::serve(listener, Arc::clone(&metrics)));
    let mut shutdown = std::pin::pin!(shutdown);
    let dependencies = async {
        let mut postgres = wait_for_postgres(&config, &metrics.readiness).await?;
        migrate::migrate(&mut postgres)
            .await
            .context("migrating postgresql")?;
        retention::ensure_ahead(&postgres, config.ledger_writer.partitions_ahead_days)
            .await
            .context("creating the ledger's day partitions")?;
        let settings = AllocatorSettings::from_config(&config);
        let allocator = Allocator::connect_waiting(
            &config.redis.url,
            settings,
            config.redis.pool_size,
            |reason| waiting(&metrics.readiness, "Redis", reason),
        )
        .await
        .context("connecting to redis")?;
        // Every partition's outbox group, on every master: on a cluster
        // one master may answer while another still loads its dataset.
        let mut retry = allocator::StartRetry::new();
        for partition in 0..config.stock.partitions {
            while let Err(error) = allocator.outbox_ensure_group(partition).await {
                let reason = format!("partition {partition}'s outbox: {error}");
                waiting(&metrics.readiness, "Redis", &reason);
                retry.rest().await;
            }
        }
        anyhow::Ok((postgres, allocator))
    };
    let (postgres, allocator) = tokio::select! {
        started = dependencies => started?,
        () = &mut shutdown => {
            info!("ledger writer stopping before its dependencies answered");
            return Ok(());
        }
    };
    let mut relays = (0..RELAY_WORKERS)
        .map(|_| Relay::new(Arc::clone(&config), allocator.clone(), Arc::clone(&metrics)))
        .collect::<anyhow::Result<Vec<Relay>>>()?;
    bound_idle_transactions(&postgres, &config).await?;
    relays[0].postgres = Some(postgres);
    let partitions = config.stock.partitions;
    let mut leases = Leases::new(
        allocator.clone(),
        config.node.id.clone(),
        Duration::from_millis(config.ledger_writer.partition_lease_ttl_ms),
        partitions,
    );
    info!(
        partitions,
        writer = %config.node.id,
        topic = %config.kafka.ledger_topic,
        metrics = %config.ledger_writer.metrics_listen,
        "ledger writer running"
    );

    background.spawn(
        reconcile::Reconciler::new(
            allocator.clone(),
            Arc::clone(&config),
            Some(Arc::clone(&metrics)),
        )
        .run(),
    );
    background.spawn(retention::partitions_ahead_forever(Arc::clone(&config)));
    background.spawn(signals::publish_forever(
        Arc::clone(&config),
        Arc::clone(&metrics),
    ));
    background.spawn(deliver::deliver_forever(
        Arc::clone(&config),
        Arc::clone(&metrics),
    ));
    background.spawn(measure_lag_forever(
        allocator.clone(),
        Arc::clone(&metrics),
        partitions,
        config.ledger_writer.lag_alert_entries,
    ));
    let stop_ingesting = Arc::new(AtomicBool::new(false));
    let ingestion = {
        let (config, allocator, stop, metrics) = (
            Arc::clone(&config),
            allocator.clone(),
            Arc::clone(&stop_ingesting),
            Arc::clone(&metrics),
        );
        let dead_letters = producer(&config)?;
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("ingest".to_owned())
            .spawn(move || {
                if let Err(error) = ingest::consume(
                    &config,
                    &allocator,
                    &dead_letters,
                    &runtime,
                    &stop,
                    &metrics,
                ) {
                    warn!(%error, "ingestion stopped");
                }
            })
            .context("starting ingestion")?
    };
    metrics.readiness.ready();
    let (held_sender, held) = tokio::sync::watch::channel(Arc::new(Vec::<Lease>::new()));
    let retick = Arc::new(tokio::sync::Notify::new());
    for (worker, relay) in relays.into_iter().enumerate() {
        background.spawn(relay_forever(
            worker,
            relay,
            held.clone(),
            Arc::clone(&retick),
        ));
    }
    let leasing = async {
        loop {
            match leases.tick().await {
                Ok(changes) => {
                    for (change, count) in [
                        ("acquired", changes.acquired),
                        ("released", changes.released),
                        ("lost", changes.lost),
                    ] {
                        metrics
                            .lease_changes
                            .with_label_values(&[change])
                            .inc_by(count as u64);
                    }
                }
                Err(error) => warn!(%error, "partition lease renewal failed; retrying"),
            }
            let now_held = leases.held();
            metrics.leases_held.set(now_held.len() as i64);
            held_sender.send_replace(Arc::new(now_held));
            tokio::select! {
                () = tokio::time::sleep(leases.tick_interval()) => {}
                // A relay worker found a lease lost: ask Redis what is ours now.
                () = retick.notified() => {}
            }
        }
    };
    tokio::select! {
        () = leasing => {}
        () = &mut shutdown => info!("ledger writer stopping"),
    }
    background.abort_all();
    stop_ingesting.store(true, Ordering::Relaxed);
    if let Err(error) = leases.release_all().await {
        warn!(%error, "releasing partition leases failed; they lapse after the lease time");
    }
    if tokio::task::spawn_blocking(move || ingestion.join())
        .await
        .is_err()
    {
        warn!("ingestion thread did not stop cleanly");
    }
    Ok(())
}

/// Relay workers per writer: partition `p` is relayed by worker `p mod N`,
/// each with its own PostgreSQL connection and Kafka producer, so one
/// partition's entries stay in order while partitions move in parallel (one
/// worker relaying 64 partitions in turn fell seconds behind a reservation
/// ceiling of about 6,000 a second here).
const RELAY_WORKERS: usize = 4;

/// Relays the partitions of `held` that are this worker's, round after round.
async fn relay_forever(
    worker: usize,
    mut relay: Relay,
    held: tokio::sync::watch::Receiver<Arc<Vec<Lease>>>,
    retick: Arc<tokio::sync::Notify>,
) {
    loop {
        let leases = Arc::clone(&held.borrow());
        let mut relayed = 0;
        let mut failed = false;
        for lease in leases
            .iter()
            .filter(|lease| lease.partition as usize % RELAY_WORKERS == worker)
        {
            match relay.pass(lease).await {
                Ok(pass) => relayed += pass.relayed,
                Err(RelayError::Fenced) => {
                    relay.metrics.fenced.inc();
                    report(lease.partition, &RelayError::Fenced);
                    retick.notify_one();
                }
                Err(RelayError::Behind {
                    newest, idle_ms, ..
                }) => {
                    match relay.advance(lease, newest, idle_ms).await {
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            relay.metrics.fenced.inc();
                            report(lease.partition, &RelayError::Fenced);
                        }
                        Err(error) => {
                            report(lease.partition, &error);
                            failed = true;
                        }
                    }
                    // The lease loop reads the new token (or the loss).
                    retick.notify_one();
                }
                Err(error) => {
                    relay
                        .metrics
                        .errors
                        .with_label_values(&[error.sink()])
                        .inc();
                    report(lease.partition, &error);
                    failed = true;
                }
            }
        }
        if failed {
            tokio::time::sleep(FAILURE_PAUSE).await;
        } else if relayed == 0 {
            tokio::time::sleep(IDLE_PAUSE).await;
        }
    }
}

/// How often the outbox lag of every partition is measured.
const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// Measures every partition's outbox lag into the metrics, and warns while
/// the total is over `alert_entries`.
async fn measure_lag_forever(
    outbox: Allocator,
    metrics: Arc<Metrics>,
    partitions: u32,
    alert_entries: u64,
) {
    loop {
        let mut total = 0;
        for partition in 0..partitions {
            match outbox.outbox_lag(partition).await {
                Ok(lag) => {
                    let label = partition.to_string();
                    metrics
                        .lag_entries
                        .with_label_values(&[label.as_str()])
                        .set(lag.entries as i64);
                    metrics
                        .lag_oldest_seconds
                        .with_label_values(&[label.as_str()])
                        .set(lag.oldest_age_ms() as f64 / 1000.0);
                    total += lag.entries;
                }
                Err(error) => warn!(partition, %error, "measuring outbox lag failed"),
            }
        }
        metrics.lag_entries_all.set(total as i64);
        let over = total > alert_entries;
        if over {
            warn!(
                lag_entries = total,
                alert_entries, "outbox lag over threshold"
            );
        }
        metrics.lag_alert.set(i64::from(over));
        tokio::time::sleep(LAG_INTERVAL).await;
    }
}
