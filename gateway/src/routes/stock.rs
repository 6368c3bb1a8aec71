//! `/v1/stock`: adjustments and settings.

use std::time::Duration;

use allocator::{AdjustmentOutcome, AdjustmentRequest, StockKey, StockSettings};
use config::Scope;
use pingora::proxy::Session;
use serde_json::json;

use super::request::{admit, idempotency_key, read_json_body};
use crate::api::{ApiError, Reply, SettingsBody, check_id, parse_body};
use crate::app::App;
use crate::availability::LocationAvailability;

/// The location's availability line after a change to its pool `pool`
/// (the buckets are read as they stand). `reported_by`: the source whose
/// report made the change; when it is the one that feeds the location, the
/// location is shown online (it just reported; the node's judgement
/// catches up within a second).
pub(crate) async fn location_line(
    app: &App,
    key: &StockKey,
    pool: &allocator::Cell,
    reported_by: Option<&str>,
) -> Result<LocationAvailability, ApiError> {
    let config = app.config();
    let just_reported = reported_by.is_some_and(|source| {
        crate::sources::source_of(&config, &key.merchant, &key.location) == Some(source)
    });
    let view = allocator::StockView {
        pool: Some(pool.clone()),
        buckets: app.allocator.stock_view(key).await?.buckets,
    };
    LocationAvailability::from_view(
        &key.location,
        &view,
        config.cache.low_stock_threshold_default,
        app.sources
            .offline_buffer(&key.merchant, &key.location)
            .filter(|_| !just_reported),
    )
    .ok_or_else(|| ApiError::Internal("the adjusted key has no pool".to_owned()))
}

pub(crate) async fn adjust(app: &App, session: &mut Session) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Admin, false)?;
    let body = read_json_body(app, session, false).await?;
    idempotency_key(session, false)?;
    let adjustment = parse_body::<AdjustmentRequest>(&body)?
        .check()
        .map_err(ApiError::BadRequest)?;
    caller.require_merchant(&adjustment.merchant)?;
    let key = StockKey::new(&adjustment.merchant, &adjustment.sku, &adjustment.location);
    let outcome = app.allocator.adjust(&adjustment).await?;
    // Any answer says the source is there (a duplicate too: it resends).
    app.sources
        .seen
        .note(&adjustment.merchant, &adjustment.source, Duration::ZERO);
    let json = match outcome {
        AdjustmentOutcome::Applied { shortfall, cell } => {
            let mut line = location_line(app, &key, &cell, Some(&adjustment.source))
                .await?
                .to_json();
            line["applied"] = json!(true);
            line["version"] = json!(cell.version);
            line["shortfall"] = json!(shortfall);
            line["merchant"] = json!(key.merchant);
            line["sku"] = json!(key.sku);
            line
        }
        AdjustmentOutcome::Duplicate => json!({ "applied": false, "reason": "duplicate" }),
        AdjustmentOutcome::Stale { last_source_seq } => {
            json!({ "applied": false, "reason": "stale", "last_source_seq": last_source_seq })
        }
    };
    Ok(Reply::json(200, &json))
}

pub(crate) async fn settings(
    app: &App,
    session: &mut Session,
    key: StockKey,
) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Admin, false)?;
    let body = read_json_body(app, session, false).await?;
    check_id("merchant", &key.merchant)?;
    check_id("sku", &key.sku)?;
    check_id("location", &key.location)?;
    let body: SettingsBody = parse_body(&body)?;
    let max = allocator::limits::COUNT_QTY_MAX as u64;
    for (field, value) in [
        ("safety_stock", Some(body.safety_stock)),
        ("backorder_limit", Some(body.backorder_limit)),
        ("low_stock_threshold", body.low_stock_threshold),
        ("reorder_point", body.reorder_point),
        ("reorder_qty", Some(body.reorder_qty)),
    ] {
        if value.is_some_and(|value| value > max) {
            return Err(ApiError::BadRequest(format!(
                "{field} must be at most {max}"
            )));
        }
    }
    caller.require_merchant(&key.merchant)?;
    let cell = app
        .allocator
        .settings_of(
            &key,
            StockSettings {
                safety_stock: body.safety_stock,
                backorder_limit: body.backorder_limit,
                low_stock_threshold: body.low_stock_threshold,
                reorder_point: body.reorder_point,
                reorder_qty: body.reorder_qty,
            },
        )
        .await?;
    let mut line = location_line(app, &key, &cell, None).await?.to_json();
    line["merchant"] = json!(key.merchant);
    line["sku"] = json!(key.sku);
    line["backorder_limit"] = json!(cell.backorder_limit);
    line["low_stock_threshold"] = json!(body.low_stock_threshold);
    line["reorder_point"] = json!(body.reorder_point);
    line["reorder_qty"] = json!(body.reorder_qty);
    Ok(Reply::json(200, &line))
}
