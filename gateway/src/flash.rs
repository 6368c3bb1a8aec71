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

use allocator::{FlashSale, HotKey, Reserver};
use config::{Config, FlashSaleConfig};
use prometheus::{IntCounter, IntGaugeVec};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tracing::{info, warn};

/// The series the manager keeps (see [`crate::metrics::Metrics`]).
pub struct SaleGauges {
    /// Bucket reclaims by this node (`bucket_reclaims_total`).
    pub reclaims: IntCounter,
    /// Free units per sale and bucket (`bucket_free_units`).
    pub bucket_level: IntGaugeVec,
    /// Sellable units of each sale's pool (`sale_pool_sellable_units`).
    pub pool_level: IntGaugeVec,
    /// Units held beyond the shelf (`sale_oversold_units`).
    pub oversold: IntGaugeVec,
}

/// The flash-sale manager of this node. Which sales are in force here is
/// the reserver's ([`allocator::Reserver::hot_sales`]); this puts them in
/// force and ends them as the config says.
pub struct FlashSales {
    /// Holds the sales in force here.
    reserver: Arc<Reserver>,
    /// What it measures.
    gauges: SaleGauges,
    /// Wakes the manager when the config changes.
    wake: Notify,
}

impl FlashSales {
    /// A manager over `reserver`, counting into `gauges`.
    pub fn new(reserver: Arc<Reserver>, gauges: SaleGauges) -> Self {
        Self {
            reserver,
            gauges,
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
                    self.gauges.reclaims.inc();
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
                    self.reserver.set_hot(HotKey::new(sale, epoch));
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
            // A view at one instant (no cell moved between two reads): the
            // oversold check compares cells with each other, which a view
            // read while units moved between them would get wrong. Under
            // heavy traffic there may be none this round; the gauges keep
            // their last values then.
            if let Ok(Some(view)) = allocator.stable_view(&active.sale.key).await {
                let sale = active.sale.name.as_str();
                for (bucket_node, bucket) in &view.buckets {
                    self.gauges
                        .bucket_level
                        .with_label_values(&[sale, bucket_node.as_str()])
                        .set(bucket.sellable().max(0));
                }
                let pool = view.pool.as_ref();
                self.gauges
                    .pool_level
                    .with_label_values(&[sale])
                    .set(pool.map_or(0, |pool| pool.sellable().max(0)));
                self.gauges
                    .oversold
                    .with_label_values(&[sale])
                    .set(oversold_units(&view));
            }
        }
    }
}

/// Units a key's cells hold for reservations beyond what is on its shelf
/// (every cell's on-hand units plus those in flight between cells) and the
/// pool's backorder limit: units promised that do not exist. 0 unless the
/// allocator broke its promise or a loss left the key short of its holds.
fn oversold_units(view: &allocator::StockView) -> i64 {
    let promised = view.pool.iter().map(|pool| pool.reserved).sum::<i64>()
        + view
            .buckets
            .iter()
            .map(|(_, bucket)| bucket.reserved)
            .sum::<i64>();
    let backorders = view.pool.as_ref().map_or(0, |pool| pool.backorder_limit);
    (promised - view.on_hand() - view.in_flight() - backorders).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use allocator::{Cell, StockView};
    use serde_json::json;

    fn cell(kind: &str, on_hand: i64, reserved: i64, in_flight: i64, backorders: i64) -> Cell {
        serde_json::from_value(json!({
            "merchant": "m", "sku": "s", "location": "l", "kind": kind,
            "on_hand": on_hand, "reserved": reserved, "safety_stock": 0,
            "backorder_limit": backorders, "low_stock_threshold": -1, "version": 1,
            "out_in_flight": in_flight,
        }))
        .expect("a cell")
    }

    fn view(pool: Cell, buckets: Vec<Cell>) -> StockView {
        StockView {
            pool: Some(pool),
            buckets: buckets
                .into_iter()
                .enumerate()
                .map(|(index, bucket)| (format!("node-{index}"), bucket))
                .collect(),
        }
    }

    #[test]
    fn holds_the_shelf_covers_are_not_oversold() {
        let full = view(cell("pool", 10, 2, 0, 0), vec![cell("bucket", 5, 5, 0, 0)]);
        assert_eq!(oversold_units(&full), 0);
        // Units debited from the pool and not yet credited to the bucket
        // whose holds they cover are still on the shelf.
        let moving = view(cell("pool", 0, 0, 3, 0), vec![cell("bucket", 0, 3, 0, 0)]);
        assert_eq!(oversold_units(&moving), 0);
        let backordered = view(cell("pool", 1, 3, 0, 2), vec![]);
        assert_eq!(oversold_units(&backordered), 0);
    }

    #[test]
    fn holds_beyond_the_shelf_and_backorders_are_oversold() {
        let short = view(cell("pool", 1, 3, 0, 0), vec![cell("bucket", 2, 4, 0, 0)]);
        assert_eq!(oversold_units(&short), 4);
        let past_backorders = view(cell("pool", 1, 5, 0, 2), vec![]);
        assert_eq!(oversold_units(&past_backorders), 2);
    }
}
