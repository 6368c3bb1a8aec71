//! `GET /v1/availability/{merchant}/{sku}` and `POST /v1/availability/batch`.
//!
//! Both answer from the cache's rendered views: a hit copies no JSON, it
//! clones reference-counted bytes and header values.

use bytes::{BufMut, Bytes, BytesMut};
use config::Scope;
use pingora::proxy::Session;
use serde_json::json;

use super::request::{admit, client_address, public_read, query_value, read_json_body};
use crate::api::{ApiError, BatchBody, Reply, check_id, parse_body};
use crate::app::App;
use crate::availability::{Rendered, Source};

fn not_at_location(merchant: &str, sku: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no stock key for {merchant}/{sku} at that location"
    ))
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
    let location = query_value(session, "location");
    if let Some(location) = &location {
        check_id("location", location)?;
    }
    let location = location.as_deref();
    let (rendered, source) = app.cache.get(merchant, sku).await?;
    let view = rendered
        .view(location)
        .ok_or_else(|| not_at_location(merchant, sku))?;
    let if_none_match = session
        .req_header()
        .headers
        .get(http::header::IF_NONE_MATCH)
        .map(|tags| tags.as_bytes());
    let mut reply = view.reply(if_none_match, app.cache_control());
    if source == Source::Stale && reply.status == 200 {
        reply.body = rendered
            .stale_body(location)
            .ok_or_else(|| not_at_location(merchant, sku))?;
    }
    Ok(reply)
}

/// One batch item's bytes: the view's body, or the not-found object.
fn item(
    found: Option<(&Rendered, Source)>,
    location: Option<&str>,
    merchant: &str,
    sku: &str,
) -> Bytes {
    let body = found.and_then(|(rendered, source)| {
        let view = rendered.view(location)?;
        if source == Source::Stale {
            rendered.stale_body(location)
        } else {
            Some(view.body.clone())
        }
    });
    body.unwrap_or_else(|| {
        Bytes::from(json!({ "merchant": merchant, "sku": sku, "error": "not_found" }).to_string())
    })
}

pub(crate) async fn batch(app: &App, session: &mut Session) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Read, public_read(app))?;
    let body: BatchBody = parse_body(&read_json_body(app, session, false).await?)?;
    let config = app.config();
    let limit = config.limits.availability_batch_items_max;
    if body.items.is_empty() || body.items.len() > limit {
        return Err(ApiError::BadRequest(format!(
            "items must hold 1 to {limit} entries"
        )));
    }
    // An anonymous batch costs one read per item (admit took the first);
    // a keyed one is one request of its key, already taken.
    if caller.key.is_none() {
        let more = u32::try_from(body.items.len() - 1).unwrap_or(u32::MAX);
        app.limiter
            .admit(&caller, client_address(session, &config), more)?;
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
    for wanted in &body.items {
        let found = match app.cache.get(&wanted.merchant, &wanted.sku).await {
            Ok(found) => Some(found),
            Err(ApiError::NotFound(_)) => None,
            Err(other) => return Err(other),
        };
        items.push(item(
            found
                .as_ref()
                .map(|(rendered, source)| (&**rendered, *source)),
            wanted.location.as_deref(),
            &wanted.merchant,
            &wanted.sku,
        ));
    }
    // {"items":[a,b,...]} from the items' own bytes.
    let length = items.iter().map(Bytes::len).sum::<usize>() + items.len() + 12;
    let mut out = BytesMut::with_capacity(length);
    out.put_slice(b"{\"items\":[");
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            out.put_u8(b',');
        }
        out.put_slice(item);
    }
    out.put_slice(b"]}");
    Ok(Reply::json_bytes(200, out.freeze()))
}
