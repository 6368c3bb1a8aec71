//! `GET /v1/stream`: availability pushed as server-sent events.
//!
//! Owns one client's stream: the current state of every asked SKU first
//! (also on reconnect with `Last-Event-ID`), then an event whenever a change
//! notification names one of them. Fed by the same notifications that keep
//! the cache fresh. Limits: `limits.sse_streams_max` streams per node (429
//! past it); a client that falls `limits.sse_client_buffer_events` changes
//! behind, or whose
//! socket does not take an event within the write timeout, is dropped; it
//! never backs up the node.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use config::Scope;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use tokio::sync::broadcast::error::RecvError;

use crate::api::{ApiError, check_id};
use crate::app::App;
use crate::availability::Source;
use crate::routes::{Outcome, admit, public_read, query_pairs};

/// Most SKUs one stream may follow.
const STREAM_SKUS_MAX: usize = 100;
/// A comment line this often keeps proxies from closing an idle stream.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Longest one event may take to reach the client's socket.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Counts an open stream in the gauge for as long as it lives.
struct Open<'a>(&'a App);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.metrics.streams.dec();
    }
}

async fn event(app: &App, merchant: &str, sku: &str) -> Option<Bytes> {
    let (value, source) = app.cache.get(merchant, sku).await.ok()?;
    let json = value.to_json(None, source == Source::Stale)?;
    let version: u64 = value
        .locations
        .iter()
        .map(|location| location.version)
        .sum();
    Some(Bytes::from(format!(
        "event: availability\nid: {version}\ndata: {json}\n\n"
    )))
}

async fn send(session: &mut Session, bytes: Bytes) -> bool {
    matches!(
        tokio::time::timeout(
            WRITE_TIMEOUT,
            session.write_response_body(Some(bytes), false)
        )
        .await,
        Ok(Ok(()))
    )
}

/// Serves one stream until the client leaves or is dropped.
pub async fn stream(app: &App, session: &mut Session) -> Result<Outcome, ApiError> {
    let caller = admit(app, session, Scope::Stream, public_read(app))?;
    let query = query_pairs(session);
    let merchant = query
        .iter()
        .find(|(name, _)| name == "merchant")
        .map(|(_, value)| value.clone())
        .ok_or_else(|| ApiError::BadRequest("merchant is required".to_owned()))?;
    check_id("merchant", &merchant)?;
    let skus: Vec<String> = query
        .iter()
        .filter(|(name, _)| name == "sku")
        .map(|(_, value)| value.clone())
        .collect();
    if skus.is_empty() || skus.len() > STREAM_SKUS_MAX {
        return Err(ApiError::BadRequest(format!(
            "give 1 to {STREAM_SKUS_MAX} sku parameters"
        )));
    }
    for sku in &skus {
        check_id("sku", sku)?;
    }
    caller.require_merchant(&merchant)?;
    let limit = app.config().limits.sse_streams_max;
    if app.metrics.streams.get() >= limit as i64 {
        return Err(ApiError::RateLimited(format!(
            "this node serves {limit} streams already"
        )));
    }
    app.metrics.streams.inc();
    let _open = Open(app);

    // Subscribe before reading the current state, so no change falls between.
    let mut changes = app.changes.subscribe();
    let mut header =
        ResponseHeader::build(200, None).map_err(|error| ApiError::Internal(error.to_string()))?;
    for (name, value) in [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("x-accel-buffering", "no"),
    ] {
        header
            .insert_header(name, value)
            .map_err(|error| ApiError::Internal(error.to_string()))?;
    }
    if session
        .write_response_header(Box::new(header), false)
        .await
        .is_err()
    {
        return Ok(Outcome::Streamed(200));
    }
    let wanted: HashSet<&str> = skus.iter().map(String::as_str).collect();
    for sku in &skus {
        if let Some(bytes) = event(app, &merchant, sku).await
            && !send(session, bytes).await
        {
            return Ok(Outcome::Streamed(200));
        }
    }
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.tick().await;
    loop {
        let bytes = tokio::select! {
            change = changes.recv() => match change {
                Ok(change) if change.merchant == merchant && wanted.contains(change.sku.as_str()) => {
                    match event(app, &merchant, &change.sku).await {
                        Some(bytes) => bytes,
                        None => continue,
                    }
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(missed)) => {
                    app.metrics.streams_dropped.inc();
                    tracing::info!(missed, "sse client too slow; dropped");
                    break;
                }
                Err(RecvError::Closed) => break,
            },
            _ = keepalive.tick() => Bytes::from_static(b": keepalive\n\n"),
        };
        if !send(session, bytes).await {
            app.metrics.streams_dropped.inc();
            break;
        }
    }
    let _ = session.write_response_body(None, true).await;
    Ok(Outcome::Streamed(200))
}
