//! The reconciler: sweeps expired holds, credits transfers and finishes carts
//! a crash left half done, and takes back the buckets of sales that ended or
//! left the config, of nodes whose heartbeat lapsed, and of buckets idle too
//! long.
//!
//! Owns scheduling that work and surviving its failures. Every action is an
//! idempotent allocator call, so every writer runs a reconciler at once. It
//! decides no stock itself.
//!
//! **It never wedges.** Errors are per item (a partition's sweep, a transfer,
//! a cart, a key's buckets): each is counted in `reconciler_errors_total`,
//! logged with its id, and retried with exponential backoff while every other
//! item and partition goes on. An item that failed [`PARK_AFTER_FAILURES`]
//! times in a row is parked: no longer retried by this process, logged once
//! as an error and counted in the `reconciler_parked_items` alert gauge (its
//! units show in the audit as in flight or held). Only an unreachable Redis
//! ends a pass early (nothing else could succeed either).
//!
//! The cart finisher waits a quarter of the cart line grace before finishing
//! a cart left committing or releasing: a commit the cart record accepted
//! before its expiry then reaches its lines while their grace still holds
//! them (config keeps `reconcile_interval_ms` within the same quarter).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allocator::{Allocator, AllocatorError, FlashSale, StockKey};
use config::Config;
use tracing::{error, info, warn};

use crate::metrics::Metrics;

/// Consecutive failures after which an item is parked.
pub const PARK_AFTER_FAILURES: u32 = 8;

/// First retry delay of a failed item; doubles per failure up to the cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Holds due per partition the sweeper releases per pass.
const SWEEP_LIMIT: u32 = 1000;

#[derive(Debug, Clone, Copy)]
struct Failure {
    failures: u32,
    retry_at: Instant,
    /// The partition of a transfer or cart item (its failures are forgotten
    /// once a pass over that partition finds it no longer failing).
    partition: Option<u32>,
}

/// The reconciler of one writer, with its memory of failing items.
pub struct Reconciler {
    /// The stock engine.
    allocator: Allocator,
    /// Partitions, delays, and the sales.
    config: Arc<Config>,
    /// Where actions and failures are counted (none in tests).
    metrics: Option<Arc<Metrics>>,
    /// Items that failed lately, by item id (`transfer:<id>`, `cart:<id>`, ...).
    failing: HashMap<String, Failure>,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    /// Holds released as expired.
    pub expired: u64,
    /// Transfers credited.
    pub transfers_finished: u64,
    /// Carts finished.
    pub carts_finished: u64,
    /// Ended holds whose customer allowance was settled (flash-sale
    /// customer limits).
    pub allowances_settled: u64,
    /// Allowance grants given back whose holds never landed (a crash
    /// between the grant and the hold).
    pub allowances_given_back: u64,
    /// Buckets taken back, by why (indexed by [`ReclaimReason`]).
    pub buckets_reclaimed: [u64; ReclaimReason::ALL.len()],
    /// Units they held free.
    pub units_reclaimed: u64,
    /// Items that failed in this pass.
    pub failures: u64,
    /// Items parked now (over every pass).
    pub parked: u64,
}

/// Why the reconciler took a bucket's free units back
/// (`invgw_writer_bucket_reclaims_total{reason}`; a lapsed node is what
/// the operator is alerted to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReclaimReason {
    /// No sale in force covers the key any more (ended, switched off, gone).
    SaleNotInForce,
    /// The bucket's node stopped renewing its heartbeat (dead, frozen, or
    /// cut off from Redis).
    NodeLapsed,
    /// Its node is alive but sold nothing from it for
    /// `ledger_writer.bucket_idle_reclaim_seconds`.
    Idle,
}

impl ReclaimReason {
    /// Every reason, in the order of [`PassReport::buckets_reclaimed`].
    pub const ALL: [Self; 3] = [Self::SaleNotInForce, Self::NodeLapsed, Self::Idle];

    /// Its place in [`ReclaimReason::ALL`] (and in
    /// [`PassReport::buckets_reclaimed`]).
    pub fn index(self) -> usize {
        match self {
            Self::SaleNotInForce => 0,
            Self::NodeLapsed => 1,
            Self::Idle => 2,
        }
    }

    /// The metric's label.
    pub fn label(self) -> &'static str {
        match self {
            Self::SaleNotInForce => "sale_not_in_force",
            Self::NodeLapsed => "node_lapsed",
            Self::Idle => "idle",
        }
    }
}

impl Reconciler {
    /// A reconciler for `config`'s partitions and sales.
    pub fn new(allocator: Allocator, config: Arc<Config>, metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            allocator,
            config,
            metrics,
            failing: HashMap::new(),
        }
    }

    /// The cart finisher's delay: a quarter of the line grace.
    pub fn cart_finish_after(config: &Config) -> Duration {
        Duration::from_secs(config.stock.cart_line_grace_seconds) / 4
    }

    /// Runs passes every `reconcile_interval_ms` for ever.
    pub async fn run(mut self) {
        let interval = Duration::from_millis(self.config.ledger_writer.reconcile_interval_ms);
        loop {
            if let Err(error) = self.pass().await {
                warn!(%error, "reconciler pass ended early; retrying");
            }
            tokio::time::sleep(interval).await;
        }
    }

    fn count(&self, action: &str, by: u64) {
        if let Some(metrics) = &self.metrics {
            metrics.reconciler.with_label_values(&[action]).inc_by(by);
        }
    }

    /// Whether `item` is backing off or parked now.
    fn skip(&self, item: &str) -> bool {
        self.failing.get(item).is_some_and(|failure| {
            failure.failures >= PARK_AFTER_FAILURES || Instant::now() < failure.retry_at
        })
    }

    fn succeeded(&mut self, item: &str) {
        self.failing.remove(item);
    }

    fn failed(
        &mut self,
        action: &str,
        item: &str,
        partition: Option<u32>,
        failure: &AllocatorError,
        report: &mut PassReport,
    ) {
        report.failures += 1;
        if let Some(metrics) = &self.metrics {
            metrics.reconciler_errors.with_label_values(&[action]).inc();
        }
        let entry = self.failing.entry(item.to_owned()).or_insert(Failure {
            failures: 0,
            retry_at: Instant::now(),
            partition,
        });
        entry.failures += 1;
        let backoff = BACKOFF_FIRST
            .saturating_mul(1 << (entry.failures - 1).min(16))
            .min(BACKOFF_CAP);
        entry.retry_at = Instant::now() + backoff;
        if entry.failures == PARK_AFTER_FAILURES {
            error!(action, item, failures = entry.failures, error = %failure, "reconciler item parked; needs an operator");
        } else {
            warn!(action, item, failures = entry.failures, error = %failure, "reconciler item failed; retrying later");
        }
    }

    /// The ids (without `prefix`) of items of that kind backing off or parked.
    fn skipping(&self, prefix: &str) -> Vec<String> {
        self.failing
            .keys()
            .filter(|item| item.starts_with(prefix) && self.skip(item))
            .map(|item| item[prefix.len()..].to_owned())
            .collect()
    }

    /// Forgets the failures of `prefix` items of `partition` that were tried
    /// this pass and did not fail again (finished, or gone).
    fn settle(
        &mut self,
        prefix: &str,
        partition: u32,
        skipped: &[String],
        failed: &[(String, AllocatorError)],
    ) {
        self.failing.retain(|item, failure| {
            let Some(id) = item.strip_prefix(prefix) else {
                return true;
            };
            failure.partition != Some(partition)
                || skipped.iter().any(|skipped| skipped == id)
                || failed.iter().any(|(failed, _)| failed == id)
        });
    }

    fn parked(&self) -> u64 {
        self.failing
            .values()
            .filter(|failure| failure.failures >= PARK_AFTER_FAILURES)
            .count() as u64
    }

    /// One pass over every partition, every sale and every key with buckets.
    /// Returns early only when Redis is unreachable.
    pub async fn pass(&mut self) -> Result<PassReport, AllocatorError> {
        let mut report = PassReport::default();
        let result = self.pass_into(&mut report).await;
        report.parked = self.parked();
        if let Some(metrics) = &self.metrics {
            metrics.reconciler_parked.set(report.parked as i64);
        }
        for (action, by) in [
            ("expired", report.expired),
            ("transfers_finished", report.transfers_finished),
            ("carts_finished", report.carts_finished),
            ("allowances_settled", report.allowances_settled),
            ("allowances_given_back", report.allowances_given_back),
            ("units_reclaimed", report.units_reclaimed),
        ] {
            self.count(action, by);
        }
        if let Some(metrics) = &self.metrics {
            for (reason, by) in ReclaimReason::ALL.iter().zip(report.buckets_reclaimed) {
                metrics
                    .bucket_reclaims
                    .with_label_values(&[reason.label()])
                    .inc_by(by);
            }
        }
        result.map(|()| report)
    }

    async fn pass_into(&mut self, report: &mut PassReport) -> Result<(), AllocatorError> {
        let transfer_after = Duration::from_secs(self.config.stock.transfer_finish_after_seconds);
        let cart_after = Self::cart_finish_after(&self.config);
        for partition in 0..self.config.stock.partitions {
            let item = format!("sweep:{partition}");
            if !self.skip(&item) {
                match self.allocator.expire_due(partition, SWEEP_LIMIT).await {
                    Ok(outcome) => {
                        report.expired += outcome.expired;
                        self.succeeded(&item);
                    }
                    Err(error @ AllocatorError::StoreUnavailable(_)) => return Err(error),
                    Err(error) => self.failed("expire", &item, None, &error, report),
                }
            }

            let mut failed = Vec::new();
            let skipping = self.skipping("transfer:");
            let skip = |id: &str| skipping.iter().any(|skipped| skipped == id);
            match self
                .allocator
                .finish_transfers_reporting(partition, transfer_after, &skip, &mut failed)
                .await
            {
                Ok(credited) => report.transfers_finished += credited,
                Err(error @ AllocatorError::StoreUnavailable(_)) => return Err(error),
                Err(error) => self.failed(
                    "transfer",
                    &format!("transfers:{partition}"),
                    None,
                    &error,
                    report,
                ),
            }
            self.settle("transfer:", partition, &skipping, &failed);
            for (id, error) in failed {
                self.failed(
                    "transfer",
                    &format!("transfer:{id}"),
                    Some(partition),
                    &error,
                    report,
                );
            }

            let mut failed = Vec::new();
            let skipping = self.skipping("cart:");
            let skip = |id: &str| skipping.iter().any(|skipped| skipped == id);
            match self
                .allocator
                .finish_carts_reporting(partition, cart_after, &skip, &mut failed)
                .await
            {
                Ok(finished) => report.carts_finished += finished,
                Err(error @ AllocatorError::StoreUnavailable(_)) => return Err(error),
                Err(error) => {
                    self.failed("cart", &format!("carts:{partition}"), None, &error, report)
                }
            }
            self.settle("cart:", partition, &skipping, &failed);
            for (id, error) in failed {
                self.failed(
                    "cart",
                    &format!("cart:{id}"),
                    Some(partition),
                    &error,
                    report,
                );
            }

            let mut failed = Vec::new();
            let skipping = self.skipping("allowance:");
            let skip = |id: &str| skipping.iter().any(|skipped| skipped == id);
            match self
                .allocator
                .finish_allowances_reporting(partition, transfer_after, &skip, &mut failed)
                .await
            {
                Ok(finished) => {
                    report.allowances_settled += finished.settled;
                    report.allowances_given_back += finished.given_back;
                }
                Err(error @ AllocatorError::StoreUnavailable(_)) => return Err(error),
                Err(error) => self.failed(
                    "allowance",
                    &format!("allowances:{partition}"),
                    None,
                    &error,
                    report,
                ),
            }
            self.settle("allowance:", partition, &skipping, &failed);
            for (id, error) in failed {
                self.failed(
                    "allowance",
                    &format!("allowance:{id}"),
                    Some(partition),
                    &error,
                    report,
                );
            }
        }

        let now_ms = self.allocator.redis_time_ms().await?;
        let wall_now = time::OffsetDateTime::now_utc();
        let config = Arc::clone(&self.config);
        for key in self.allocator.hot_keys().await? {
            let item = format!("buckets:{key}");
            if self.skip(&item) {
                continue;
            }
            let sale = config.flash_sales.iter().find(|sale| {
                sale.merchant == key.merchant
                    && sale.sku == key.sku
                    && sale.location == key.location
            });
            match self.reclaim_key(&key, sale, now_ms, wall_now, report).await {
                Ok(()) => self.succeeded(&item),
                Err(error @ AllocatorError::StoreUnavailable(_)) => return Err(error),
                Err(error) => self.failed("reclaim", &item, None, &error, report),
            }
        }
        Ok(())
    }

    /// Takes back the buckets of `key` that should not hold free units: all
    /// of them when no sale in force covers the key (ended, switched off, or
    /// gone from the config), else those of lapsed nodes and idle buckets.
    /// A key whose buckets are all empty and which no sale covers any more
    /// is forgotten.
    async fn reclaim_key(
        &self,
        key: &StockKey,
        sale: Option<&config::FlashSaleConfig>,
        now_ms: u64,
        wall_now: time::OffsetDateTime,
        report: &mut PassReport,
    ) -> Result<(), AllocatorError> {
        let in_force = sale.is_some_and(|sale| sale.is_active_at(wall_now));
        let idle_ms = self.config.ledger_writer.bucket_idle_reclaim_seconds * 1000;
        let view = self.allocator.stock_view(key).await?;
        for (node, bucket) in &view.buckets {
            if bucket.sellable() <= 0 {
                continue;
            }
            let idle = now_ms.saturating_sub(bucket.touched_ms) > idle_ms;
            let lapsed = !self.allocator.node_alive(node).await?;
            if in_force && !lapsed && !idle {
                continue;
            }
            let flash = FlashSale {
                name: sale.map_or_else(|| "removed".to_owned(), |sale| sale.name.clone()),
                key: key.clone(),
                nodes: view.buckets.iter().map(|(node, _)| node.clone()).collect(),
                presplit_fraction: 0.0,
                refill_chunk_units_min: 1,
                refill_chunk_units_max: 1,
                buckets: Default::default(),
            };
            let units = self.allocator.try_reclaim(&flash, node).await?;
            let reason = if !in_force {
                ReclaimReason::SaleNotInForce
            } else if lapsed {
                ReclaimReason::NodeLapsed
            } else {
                ReclaimReason::Idle
            };
            report.buckets_reclaimed[reason.index()] += 1;
            report.units_reclaimed += units;
            info!(%key, %node, units, in_force, lapsed, idle, "bucket reclaimed");
        }
        let empty = view.buckets.iter().all(|(_, bucket)| {
            bucket.on_hand == 0 && bucket.reserved == 0 && bucket.out_in_flight == 0
        });
        if sale.is_none()
            && empty
            && view
                .pool
                .as_ref()
                .is_none_or(|pool| pool.out_in_flight == 0)
        {
            self.allocator.forget_hot_key(key).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::ReclaimReason;

    #[test]
    fn each_reason_is_counted_in_its_own_place() {
        for (place, reason) in ReclaimReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), place, "{reason:?}");
        }
    }
}
