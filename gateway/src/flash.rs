//! Flash-sale mode on this node, driven by the config.
//!
//! Owns which sales are in force here: a sale that starts (enabled, inside
//! its window, this node listed) is activated (the pool pre-split across the
//! sale's buckets, once per epoch); a sale that ends has this node's bucket
//! reclaimed to the pool. Buckets of nodes that died are reclaimed by the
//! ledger writer's reconciler, not here. Reservations on a sale's key use this
//! node's bucket through the reserver.

use std::collections::HashMap;
use std::sync::Arc;

use allocator::{FlashSale, HotKey, RateMeter, Reserver};
use config::{Config, FlashSaleConfig};
use prometheus::{IntCounter, IntGaugeVec};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tracing::{info, warn};

/// The flash-sale manager of this node. Which sales are in force here is
/// the reserver's ([`allocator::Reserver::hot_sales`]); this puts them in
/// force and ends them as the config says.
pub struct FlashSales {
    /// Holds the sales in force here.
    reserver: Arc<Reserver>,
    /// Bucket reclaims by this node (`bucket_reclaims_total`).
    reclaims: IntCounter,
    /// Free units per sale and bucket (`bucket_free_units`).
    bucket_level: IntGaugeVec,
    /// Wakes the manager when the config changes.
    wake: Notify,
}

impl FlashSales {
    /// A manager over `reserver`, counting into the given metrics.
    pub fn new(reserver: Arc<Reserver>, reclaims: IntCounter, bucket_level: IntGaugeVec) -> Self {
        Self {
            reserver,
            reclaims,
            bucket_level,
            wake: Notify::new(),
        }
    }

    /// Asks the manager to look at the config again now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves when woken.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

/// Same on every node for the same sale config; changes when the sale is edited.
fn epoch_of(sale: &FlashSaleConfig) -> String {
    let text = serde_json::to_string(sale).unwrap_or_default();
    hex::encode(&Sha256::digest(text.as_bytes())[..6])
}

impl FlashSales {
    /// Brings the sales in force on this node in line with `config`.
    pub async fn reconcile(&self, config: &Config) {
        let allocator = self.reserver.allocator();
        let now = time::OffsetDateTime::now_utc();
        let node = &config.node.id;
        let wanted: HashMap<&str, &FlashSaleConfig> = config
            .flash_sales
            .iter()
            .filter(|sale| sale.nodes.contains(node) && sale.is_active_at(now))
            .map(|sale| (sale.name.as_str(), sale))
            .collect();
        let current = self.reserver.hot_sales();

        for active in &current {
            let still = wanted
                .get(active.sale.name.as_str())
                .is_some_and(|sale| epoch_of(sale) == active.epoch);
            if still {
                continue;
            }
            let ended = async {
                let units = allocator.reclaim(&active.sale, node).await?;
                allocator
                    .end_activation(&active.sale, &active.epoch)
                    .await?;
                Ok::<u64, allocator::AllocatorError>(units)
            };
            match ended.await {
                Ok(units) => {
                    self.reclaims.inc();
                    self.reserver.remove_hot(&active.sale.key);
                    info!(sale = %active.sale.name, units, "flash sale ended here; bucket reclaimed");
                }
                Err(error) => {
                    warn!(sale = %active.sale.name, %error, "cannot reclaim bucket; will retry")
                }
            }
        }

        for (name, sale_config) in wanted {
            let epoch = epoch_of(sale_config);
            let known = self
                .reserver
                .hot_sales()
                .iter()
                .any(|active| active.sale.name == name && active.epoch == epoch);
            if known {
                continue;
            }
            let mut sale = FlashSale::from_config(sale_config);
            if let Err(error) = allocator.place(&mut sale).await {
                warn!(sale = name, %error, "cannot read the sale's buckets; will retry");
                continue;
            }
            match allocator.activate(&sale, &epoch).await {
                Ok(split) => {
                    info!(sale = name, epoch, ?split, "flash sale in force");
                    self.reserver.set_hot(HotKey {
                        sale,
                        epoch,
                        meter: RateMeter::default(),
                    });
                }
                Err(allocator::AllocatorError::NotFound) => {
                    warn!(
                        sale = name,
                        "flash sale key has no stock yet; activating when it has"
                    );
                }
                Err(error) => warn!(sale = name, %error, "cannot activate flash sale; will retry"),
            }
        }

        for active in self.reserver.hot_sales() {
            if let Ok(view) = allocator.stock_view(&active.sale.key).await {
                for (bucket_node, bucket) in &view.buckets {
                    self.bucket_level
                        .with_label_values(&[active.sale.name.as_str(), bucket_node.as_str()])
                        .set(bucket.sellable().max(0));
                }
            }
        }
    }
}
