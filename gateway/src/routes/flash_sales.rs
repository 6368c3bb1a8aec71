//! `GET /v1/flash-sales`: every sale, every node's bucket and heartbeat.

use allocator::StockKey;
use config::Scope;
use pingora::proxy::Session;
use serde_json::json;

use super::request::admit;
use crate::api::{ApiError, Reply};
use crate::app::App;

pub(crate) async fn list(app: &App, session: &mut Session) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Admin, false)?;
    let config = app.config();
    let active = app.reserver.hot_sales();
    let now = time::OffsetDateTime::now_utc();
    let mut sales = Vec::new();
    for sale in &config.flash_sales {
        if caller
            .merchant()
            .is_some_and(|merchant| merchant != sale.merchant)
        {
            continue;
        }
        let key = StockKey::new(&sale.merchant, &sale.sku, &sale.location);
        let view = app.allocator.stock_view(&key).await?;
        let mut nodes = Vec::new();
        for node in &sale.nodes {
            let bucket = view
                .buckets
                .iter()
                .find(|(name, _)| name == node)
                .map(|(_, cell)| cell);
            nodes.push(json!({
                "node": node,
                "alive": app.allocator.node_alive(node).await?,
                "bucket": bucket.map(|cell| json!({
                    "on_hand": cell.on_hand, "reserved": cell.reserved,
                    "free": cell.sellable().max(0), "version": cell.version,
                })),
            }));
        }
        let here = active
            .iter()
            .find(|candidate| candidate.sale.name == sale.name);
        sales.push(json!({
            "name": sale.name, "merchant": sale.merchant, "sku": sale.sku, "location": sale.location,
            "enabled": sale.enabled, "in_window": sale.is_active_at(now),
            "active_on_this_node": here.is_some(), "epoch": here.map(|active| active.epoch.clone()),
            "pool": view.pool.as_ref().map(|cell| json!({
                "on_hand": cell.on_hand, "reserved": cell.reserved, "free": cell.sellable().max(0),
            })),
            "sellable_total": view.sellable(),
            "in_flight": view.in_flight(),
            "nodes": nodes,
        }));
    }
    Ok(Reply::json(
        200,
        &json!({
            "node": config.node.id,
            "refills_by_this_node": app.metrics.refills.get(),
            "reclaims_by_this_node": app.metrics.reclaims.get(),
            "sales": sales,
        }),
    ))
}
