//! Flash-sale mode on this node, driven by the config.
//!
//! Owns which sales are in force here: a sale that starts (enabled, inside
//! its window, this node listed) is activated (the pool pre-split across the
//! sale's buckets, once per epoch); a sale that ends has this node's bucket
//! reclaimed to the pool. Buckets of nodes that died are reclaimed by the
//! ledger writer's reconciler, not here. Reservations on a sale's key use this
//! node's bucket through the reserver. Every node, listed or not, puts an
//! active sale's checkout throttle in force (`allocator::Throttle`).

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
    /// The sales (and their buckets' nodes) the gauges have series for.
    shown: std::sync::Mutex<HashMap<String, std::collections::BTreeSet<String>>>,
    /// Wakes the manager when the config changes.
    wake: Notify,
}

impl FlashSales {
    /// A manager over `reserver`, counting into `gauges`.
    pub fn new(reserver: Arc<Reserver>, gauges: SaleGauges) -> Self {
        Self {
            reserver,
            gauges,
            shown: Default::default(),
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

/// Same on every node for the same sale config; changes when the sale's
/// split is edited (a new epoch reclaims and splits again). The fleet-wide
/// fairness limits are not part of it: editing them changes no bucket (and
/// a sale without them hashes as it did before they existed).
fn epoch_of(sale: &FlashSaleConfig) -> String {
    // The fairness settings are not part of how the key is split: editing
    // them reclaims no bucket.
    let split = FlashSaleConfig {
        checkout_attempts_per_second: None,
        customer_units_max: None,
        customer_holds_max: None,
        ..sale.clone()
    };
    let text = serde_json::to_string(&split).unwrap_or_default();
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
        // The throttles first, on every node: a node with no bucket in a
        // sale still admits attempts on its key.
        let throttles: Vec<(String, allocator::StockKey, u32)> = config
            .flash_sales
            .iter()
            .filter(|sale| sale.is_active_at(now))
            .filter_map(|sale| {
                let per_second = sale.checkout_attempts_per_second?;
                let key = allocator::StockKey::new(&sale.merchant, &sale.sku, &sale.location);
                Some((sale.name.clone(), key, per_second))
            })
            .collect();
        self.reserver.set_throttles(&throttles);
        // The customer limits of every enabled sale not yet over: each
        // request checks the sale's window itself (a sale's first moment is
        // limited, whenever this node last got here).
        self.reserver.set_customer_limits(
            config
                .flash_sales
                .iter()
                .filter(|sale| sale.ends_at.is_none_or(|end| now < end))
                .filter_map(allocator::CustomerLimit::from_config)
                .collect(),
        );
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

        let in_force = self.reserver.hot_sales();
        let mut views = Vec::with_capacity(in_force.len());
        for active in &in_force {
            // Each cell is read whole (a script's reply), the cells one
            // after another: each gauge is about one cell, so no view at
            // one instant is needed (which heavy traffic may never give).
            if let Ok(view) = allocator.stock_view(&active.sale.key).await {
                views.push((active.sale.name.as_str(), view));
            }
        }
        let mut shown = self
            .shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (sale, view) in views {
            let nodes = shown.entry(sale.to_owned()).or_default();
            for (bucket_node, bucket) in &view.buckets {
                self.gauges
                    .bucket_level
                    .with_label_values(&[sale, bucket_node.as_str()])
                    .set(bucket.sellable().max(0));
                nodes.insert(bucket_node.clone());
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
        // A sale no longer in force here leaves the exposition (an alert on
        // it resolves; the dashboard stops listing it).
        shown.retain(|sale, nodes| {
            if in_force.iter().any(|active| &active.sale.name == sale) {
                return true;
            }
            let _ = self.gauges.pool_level.remove_label_values(&[sale]);
            let _ = self.gauges.oversold.remove_label_values(&[sale]);
            for node in nodes.iter() {
                let _ = self.gauges.bucket_level.remove_label_values(&[sale, node]);
            }
            false
        });
    }
}

/// Units a key's cells hold for reservations beyond their own on-hand units
/// (and, for the pool, its backorder limit): units promised that do not
/// exist. Cell by cell, as the scripts keep them: a hold lands only on units
/// its cell holds, a transfer moves only free units, so every cell covers
/// its own holds until a loss (or a fault) leaves it short. 0 otherwise.
fn oversold_units(view: &allocator::StockView) -> i64 {
    let beyond = |cell: &allocator::Cell| {
        (cell.reserved - cell.on_hand - cell.backorder_limit.max(0)).max(0)
    };
    view.pool.iter().map(beyond).sum::<i64>()
        + view
            .buckets
            .iter()
            .map(|(_, bucket)| beyond(bucket))
            .sum::<i64>()
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
    fn a_sales_fairness_settings_are_not_part_of_its_epoch_and_a_sale_without_them_hashes_as_before()
     {
        let sale: FlashSaleConfig = serde_json::from_value(json!({
            "name": "drop", "merchant": "m", "sku": "s", "location": "l", "nodes": ["a", "b"],
        }))
        .expect("a sale");
        let throttled = FlashSaleConfig {
            checkout_attempts_per_second: Some(50),
            customer_units_max: Some(2),
            customer_holds_max: Some(1),
            ..sale.clone()
        };
        assert_eq!(epoch_of(&throttled), epoch_of(&sale));
        // The text hashed is the one hashed before the fields existed.
        let text = serde_json::to_string(&sale).expect("json");
        assert!(
            !text.contains("checkout_attempts") && !text.contains("customer_"),
            "{text}"
        );
        let split_otherwise = FlashSaleConfig {
            presplit_fraction: 0.25,
            ..sale.clone()
        };
        assert_ne!(epoch_of(&split_otherwise), epoch_of(&sale));
    }

    #[test]
    fn holds_each_cell_covers_are_not_oversold() {
        let full = view(cell("pool", 10, 2, 0, 0), vec![cell("bucket", 5, 5, 0, 0)]);
        assert_eq!(oversold_units(&full), 0);
        // Units on their way out of a cell were free units: its holds are
        // still covered by what it has.
        let moving = view(cell("pool", 4, 4, 3, 0), vec![cell("bucket", 2, 1, 0, 0)]);
        assert_eq!(oversold_units(&moving), 0);
        let backordered = view(cell("pool", 1, 3, 0, 2), vec![]);
        assert_eq!(oversold_units(&backordered), 0);
    }

    #[test]
    fn holds_beyond_a_cells_units_and_backorders_are_oversold() {
        let short = view(cell("pool", 1, 3, 0, 0), vec![cell("bucket", 2, 4, 0, 0)]);
        assert_eq!(oversold_units(&short), 4);
        let past_backorders = view(cell("pool", 1, 5, 0, 2), vec![]);
        assert_eq!(oversold_units(&past_backorders), 2);
        // A surplus in one cell does not cover a shortfall in another: the
        // bucket's holders were promised the bucket's units.
        let uneven = view(cell("pool", 10, 0, 0, 0), vec![cell("bucket", 1, 3, 0, 0)]);
        assert_eq!(oversold_units(&uneven), 2);
    }
}
