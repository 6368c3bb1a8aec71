//! The ledger writer: drains each partition's Redis outbox stream into Kafka
//! `inventory.ledger` and the PostgreSQL ledger, and runs the reconciler that
//! keeps stock tidy.
//!
//! Owns the relay ([`relay`]), ingestion of stock events ([`ingest`]), the
//! schema migrations ([`migrate`]), the audit ([`audit`]) and the reconciler
//! loop. It never decides stock: everything the reconciler does
//! is an idempotent allocator call (expire due holds, credit debited
//! transfers, finish carts left half way, reclaim buckets), so several
//! instances may run it at once.
//!
//! What this version does not do yet (issue 5 lists it): partition leases
//! between several writer instances (run one relay per deployment for now;
//! PostgreSQL stays exact with several, but Kafka per-key order is only kept
//! with one), the `rebuild` command and a `/metrics` listener.

pub mod audit;
pub mod ingest;
pub mod migrate;
pub mod relay;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use allocator::{Allocator, AllocatorSettings, FlashSale};
use anyhow::Context;
use config::Config;
use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;
use tracing::{info, warn};

use crate::relay::{Relay, report};

/// How long the relay rests when every stream was empty.
const IDLE_PAUSE: Duration = Duration::from_millis(50);
/// How long the relay rests after a failed pass (Kafka or PostgreSQL down).
const FAILURE_PAUSE: Duration = Duration::from_millis(500);
/// Carts left committing or releasing this long are finished by the reconciler.
const CART_FINISH_AFTER: Duration = Duration::from_secs(30);

/// Connects to PostgreSQL and spawns the connection task.
pub async fn connect_postgres(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let mut pg_config: tokio_postgres::Config =
        config.postgres.url.parse().context("postgres url")?;
    pg_config.connect_timeout(Duration::from_millis(config.postgres.connect_timeout_ms));
    let (client, connection) = pg_config
        .connect(tokio_postgres::NoTls)
        .await
        .context("connecting to postgresql")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            warn!(%error, "postgresql connection closed");
        }
    });
    client
        .batch_execute(&format!(
            "SET statement_timeout = {}",
            config.postgres.statement_timeout_ms
        ))
        .await?;
    Ok(client)
}

/// The idempotent, `acks=all` producer of the ledger topic.
pub fn producer(config: &Config) -> anyhow::Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            config.kafka.request_timeout_ms.to_string(),
        )
        .set("linger.ms", "5")
        .create()
        .context("creating the kafka producer")
}

/// Runs the relay and the reconciler until `shutdown` resolves.
pub async fn run(config: Arc<Config>, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut postgres = connect_postgres(&config).await?;
    migrate::migrate(&mut postgres)
        .await
        .context("migrating postgresql")?;
    let settings = AllocatorSettings::from_config(&config);
    let allocator = Allocator::connect(&config.redis.url, settings, config.redis.pool_size)
        .await
        .context("connecting to redis")?;
    let relay = Relay {
        redis: allocator.redis().clone(),
        producer: producer(&config)?,
        postgres,
        topic: config.kafka.ledger_topic.clone(),
        topic_partitions: config.kafka.topic_partitions,
        consumer: config.node.id.clone(),
        batch_max: config.ledger_writer.relay_batch_entries_max,
        kafka_timeout: Duration::from_millis(config.kafka.request_timeout_ms),
    };
    let partitions = config.stock.partitions;
    for partition in 0..partitions {
        relay.ensure_group(partition).await?;
    }
    info!(partitions, consumer = %relay.consumer, topic = %relay.topic, "ledger writer running");

    let reconciler = tokio::spawn(reconcile_forever(allocator.clone(), Arc::clone(&config)));
    let stop_ingesting = Arc::new(AtomicBool::new(false));
    let ingestion = {
        let (config, allocator, stop) = (
            Arc::clone(&config),
            allocator.clone(),
            Arc::clone(&stop_ingesting),
        );
        let dead_letters = producer(&config)?;
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("ingest".to_owned())
            .spawn(move || {
                if let Err(error) =
                    ingest::consume(&config, &allocator, &dead_letters, &runtime, &stop)
                {
                    warn!(%error, "ingestion stopped");
                }
            })
            .context("starting ingestion")?
    };
    let relaying = async {
        loop {
            let mut relayed = 0;
            let mut failed = false;
            for partition in 0..partitions {
                match relay.pass(partition).await {
                    Ok(pass) => relayed += pass.relayed,
                    Err(error) => {
                        report(partition, &error);
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
    };
    tokio::select! {
        () = relaying => {}
        () = shutdown => info!("ledger writer stopping"),
    }
    reconciler.abort();
    stop_ingesting.store(true, Ordering::Relaxed);
    if tokio::task::spawn_blocking(move || ingestion.join())
        .await
        .is_err()
    {
        warn!("ingestion thread did not stop cleanly");
    }
    Ok(())
}

/// The reconciler: sweeps expired holds, credits transfers and finishes carts
/// a crash left half done, and reclaims buckets of sales that ended, of nodes
/// whose heartbeat lapsed, and of buckets idle too long.
async fn reconcile_forever(allocator: Allocator, config: Arc<Config>) {
    let interval = Duration::from_millis(config.ledger_writer.reconcile_interval_ms);
    loop {
        if let Err(error) = reconcile_once(&allocator, &config).await {
            warn!(%error, "reconciler pass failed; retrying");
        }
        tokio::time::sleep(interval).await;
    }
}

/// One reconciler pass over every partition and flash sale.
pub async fn reconcile_once(
    allocator: &Allocator,
    config: &Config,
) -> Result<(), allocator::AllocatorError> {
    let transfer_after = Duration::from_secs(config.stock.transfer_finish_after_seconds);
    for partition in 0..config.stock.partitions {
        allocator.expire_due(partition, 1000).await?;
        allocator
            .finish_transfers(partition, transfer_after)
            .await?;
        allocator.finish_carts(partition, CART_FINISH_AFTER).await?;
    }
    let now_ms = allocator.redis_time_ms().await?;
    let idle_ms = config.ledger_writer.bucket_idle_reclaim_seconds * 1000;
    let wall_now = time::OffsetDateTime::now_utc();
    for sale_config in &config.flash_sales {
        let sale = FlashSale::from_config(sale_config);
        let in_force = sale_config.is_active_at(wall_now);
        let view = allocator.stock_view(&sale.key, &sale.nodes).await?;
        for (node, bucket) in &view.buckets {
            if bucket.sellable() <= 0 {
                continue;
            }
            let idle = now_ms.saturating_sub(bucket.touched_ms) > idle_ms;
            let lapsed = !allocator.node_alive(node).await?;
            if !in_force || lapsed || idle {
                let units = allocator.reclaim(&sale, node, 0).await?;
                info!(sale = %sale.name, %node, units, in_force, lapsed, idle, "bucket reclaimed");
            }
        }
    }
    Ok(())
}
