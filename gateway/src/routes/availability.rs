//! `GET /v1/availability/{merchant}/{sku}` and `POST /v1/availability/batch`.

use bytes::Bytes;
use config::Scope;
use pingora::proxy::Session;
use serde_json::{Value, json};

use super::request::{admit, header, public_read, query_pairs, read_json_body};
use crate::api::{ApiError, BatchBody, Reply, check_id, parse_body};
use crate::app::App;
use crate::availability::Source;

pub(crate) fn availability_reply(session: &Session, json: Value, etag: String, app: &App) -> Reply {
    let max_age = app.config().cache.cache_control_max_age_seconds;
    let matches = header(session, "if-none-match").is_some_and(|tags| {
        tags.split(',')
            .any(|tag| tag.trim() == etag || tag.trim() == "*")
    });
    let reply = if matches {
        Reply {
            status: 304,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    } else {
        Reply::json(200, &json)
    };
    reply
        .with_header("etag", etag)
        .with_header("cache-control", format!("max-age={max_age}"))
}

pub(crate) async fn one(
    app: &App,
    session: &mut Session,
    merchant: &str,
    sku: &str,
) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Read, public_read(app))?;
    check_id("merchant", merchant)?;
    check_id("sku", sku)?;
    caller.require_merchant(merchant)?;
    let location = query_pairs(session)
        .into_iter()
        .find(|(name, _)| name == "location")
        .map(|(_, value)| value);
    if let Some(location) = &location {
        check_id("location", location)?;
    }
    let (value, source) = app.cache.get(merchant, sku).await?;
    let json = value
        .to_json(location.as_deref(), source == Source::Stale)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no stock key for {merchant}/{sku} at that location"
            ))
        })?;
    Ok(availability_reply(
        session,
        json,
        value.etag(location.as_deref()),
        app,
    ))
}

pub(crate) async fn batch(app: &App, session: &mut Session) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Read, public_read(app))?;
    let body: BatchBody = parse_body(&read_json_body(app, session, false).await?)?;
    let limit = app.config().limits.availability_batch_items_max;
    if body.items.is_empty() || body.items.len() > limit {
        return Err(ApiError::BadRequest(format!(
            "items must hold 1 to {limit} entries"
        )));
    }
    for item in &body.items {
        check_id("merchant", &item.merchant)?;
        check_id("sku", &item.sku)?;
        if let Some(location) = &item.location {
            check_id("location", location)?;
        }
        caller.require_merchant(&item.merchant)?;
    }
    let mut items = Vec::with_capacity(body.items.len());
    for item in &body.items {
        let not_found = json!({ "merchant": item.merchant, "sku": item.sku, "error": "not_found" });
        match app.cache.get(&item.merchant, &item.sku).await {
            Ok((value, source)) => items.push(
                value
                    .to_json(item.location.as_deref(), source == Source::Stale)
                    .unwrap_or(not_found),
            ),
            Err(ApiError::NotFound(_)) => items.push(not_found),
            Err(other) => return Err(other),
        }
    }
    Ok(Reply::json(200, &json!({ "items": items })))
}
