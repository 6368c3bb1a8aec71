//! Flash-sale mode on this node, driven by the config.
//!
//! Owns which sales are in force here: a sale that starts (enabled, inside
//! its window, this node listed) is activated (the pool pre-split across the
//! sale's buckets, once per epoch); a sale that ends has this node's bucket
//! reclaimed to the pool. Buckets of nodes that died are reclaimed by the
//! ledger writer's reconciler, not here. Reservations on a sale's key use this
//! node's bucket through [`hot_sale`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use allocator::{FlashSale, RateMeter, StockKey};
use config::{Config, FlashSaleConfig};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::app::App;

/// A sale in force on this node.
pub struct ActiveSale {
    /// The allocator's view of the sale.
    pub sale: FlashSale,
    /// The activation epoch (hash of the sale's config).
    pub epoch: String,
    /// This node's reservation rate on the sale's key.
    pub meter: RateMeter,
}

/// Sales in force on this node, by name.
#[derive(Default)]
pub struct FlashSales {
    active: Mutex<HashMap<String, Arc<ActiveSale>>>,
    wake: Notify,
}

impl FlashSales {
    /// Asks the manager to look at the config again now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves when woken.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// The sales in force here.
    pub fn active(&self) -> Vec<Arc<ActiveSale>> {
        self.active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

/// The sale in force on this node for `key`, if any.
pub fn hot_sale(app: &App, key: &StockKey) -> Option<Arc<ActiveSale>> {
    app.flash
        .active()
        .into_iter()
        .find(|active| &active.sale.key == key)
}

/// Same on every node for the same sale config; changes when the sale is edited.
fn epoch_of(sale: &FlashSaleConfig) -> String {
    let text = serde_json::to_string(sale).unwrap_or_default();
    hex::encode(&Sha256::digest(text.as_bytes())[..6])
}

/// Brings the sales in force on this node in line with `config`.
pub async fn reconcile(app: &App, config: &Config) {
    let now = time::OffsetDateTime::now_utc();
    let node = &config.node.id;
    let wanted: HashMap<&str, &FlashSaleConfig> = config
        .flash_sales
        .iter()
        .filter(|sale| sale.nodes.contains(node) && sale.is_active_at(now))
        .map(|sale| (sale.name.as_str(), sale))
        .collect();
    let current = app.flash.active();

    for active in &current {
        let still = wanted
            .get(active.sale.name.as_str())
            .is_some_and(|sale| epoch_of(sale) == active.epoch);
        if still {
            continue;
        }
        let ended = async {
            let units = app.allocator.reclaim(&active.sale, node).await?;
            app.allocator
                .end_activation(&active.sale, &active.epoch)
                .await?;
            Ok::<u64, allocator::AllocatorError>(units)
        };
        match ended.await {
            Ok(units) => {
                app.metrics.reclaims.inc();
                app.flash
                    .active
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&active.sale.name);
                info!(sale = %active.sale.name, units, "flash sale ended here; bucket reclaimed");
            }
            Err(error) => {
                warn!(sale = %active.sale.name, %error, "cannot reclaim bucket; will retry")
            }
        }
    }

    for (name, sale_config) in wanted {
        let epoch = epoch_of(sale_config);
        let known = app
            .flash
            .active()
            .iter()
            .any(|active| active.sale.name == name && active.epoch == epoch);
        if known {
            continue;
        }
        let sale = FlashSale::from_config(sale_config);
        match app.allocator.activate(&sale, &epoch).await {
            Ok(split) => {
                info!(sale = name, epoch, ?split, "flash sale in force");
                app.flash
                    .active
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(
                        name.to_owned(),
                        Arc::new(ActiveSale {
                            sale,
                            epoch,
                            meter: RateMeter::default(),
                        }),
                    );
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

    for active in app.flash.active() {
        if let Ok(view) = app.allocator.stock_view(&active.sale.key).await {
            for (bucket_node, bucket) in &view.buckets {
                app.metrics
                    .bucket_level
                    .with_label_values(&[active.sale.name.as_str(), bucket_node.as_str()])
                    .set(bucket.sellable().max(0));
            }
        }
    }
}
