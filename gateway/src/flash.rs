//! Flash-sale mode on this node, driven by the config.
//!
//! Owns which sales are in force here: a sale that starts (enabled, inside
//! its window, this node listed) is activated (the pool pre-split across the
//! sale's buckets, once per epoch); a sale that ends has this node's bucket
//! reclaimed to the pool. Buckets of nodes that died are reclaimed by the
//! ledger writer's reconciler, not here. Reservations on a sale's key use this
//! node's bucket through the reserver.

use std::collections::HashMap;

use allocator::{FlashSale, HotKey, RateMeter};
use config::{Config, FlashSaleConfig};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::app::App;

/// Wakes the flash-sale manager when the config changes. Which sales are in
/// force here is the reserver's ([`allocator::Reserver::hot_sales`]).
#[derive(Default)]
pub struct FlashSales {
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
    let current = app.reserver.hot_sales();

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
                app.reserver.remove_hot(&active.sale.key);
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
            .reserver
            .hot_sales()
            .iter()
            .any(|active| active.sale.name == name && active.epoch == epoch);
        if known {
            continue;
        }
        let sale = FlashSale::from_config(sale_config);
        match app.allocator.activate(&sale, &epoch).await {
            Ok(split) => {
                info!(sale = name, epoch, ?split, "flash sale in force");
                app.reserver.set_hot(HotKey {
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

    for active in app.reserver.hot_sales() {
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
