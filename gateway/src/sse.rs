//! `GET /v1/stream`: availability pushed as server-sent events.
//!
//! Owns one client's stream: the current state of every asked SKU first
//! (also on reconnect with `Last-Event-ID`), then an event whenever a change
//! notification names one of them. Fed by the same notifications that keep
//! the cache fresh, each read after its notification, so a stream's last
//! event is the state the SKU settled in; an event equal to the last one
//! sent is skipped. Limits: `limits.sse_streams_max` streams per node and
//! `limits.sse_streams_per_client_max` per client address (429 with
//! Retry-After past either); a client that falls `limits.sse_client_buffer_events` changes
//! behind, or whose
//! socket does not take an event within the write timeout, is dropped; it
//! never backs up the node.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use config::Scope;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use tokio::sync::broadcast::error::RecvError;

use crate::api::{ApiError, check_id};
use crate::app::App;
use crate::availability::{Source, sse_event};
use crate::routes::{Outcome, admit, client_address, public_read, query_pairs};

/// Most SKUs one stream may follow.
const STREAM_SKUS_MAX: usize = 100;
/// A comment line this often keeps proxies from closing an idle stream.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Retry-After of a stream refused for a full node or client.
const RETRY_AFTER_SECONDS: u64 = 5;
/// How often a stream re-reads SKUs it could not read fresh.
const RETRY: Duration = Duration::from_secs(1);
/// Longest one event may take to reach the client's socket.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Counts an open stream, in the node's gauge and against its client's
/// cap, for as long as it lives.
struct Open<'a> {
    app: &'a App,
    client: Option<IpAddr>,
}

impl<'a> Open<'a> {
    /// Takes a stream slot on the node and for the client, or 429.
    fn take(app: &'a App, client: Option<IpAddr>) -> Result<Self, ApiError> {
        let limits = &app.config().limits;
        if app.metrics.streams.get() >= limits.sse_streams_max as i64 {
            return Err(ApiError::RateLimited(
                format!(
                    "this node serves {} streams already",
                    limits.sse_streams_max
                ),
                RETRY_AFTER_SECONDS,
            ));
        }
        if let Some(client) = client {
            let mut open = lock(app);
            let count = open.entry(client).or_default();
            if *count >= limits.sse_streams_per_client_max {
                return Err(ApiError::RateLimited(
                    format!(
                        "{client} holds {} streams on this node already",
                        limits.sse_streams_per_client_max
                    ),
                    RETRY_AFTER_SECONDS,
                ));
            }
            *count += 1;
        }
        app.metrics.streams.inc();
        Ok(Self { app, client })
    }
}

fn lock(app: &App) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
    app.streams_by_client
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.app.metrics.streams.dec();
        if let Some(client) = self.client {
            let mut open = lock(self.app);
            if let Some(count) = open.get_mut(&client) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&client);
                }
            }
        }
    }
}

/// Why a stream looks at its SKUs again.
enum Wake {
    /// A notification named this SKU.
    Changed(String),
    /// Notifications may have been missed.
    All,
    /// SKUs whose last read failed or was stale.
    Pending,
    /// Time for a keepalive comment.
    Keepalive,
}

/// What a stream has sent, and what it still owes.
#[derive(Default)]
struct Sent {
    /// The ETag of the view last sent per SKU (its versions, and which
    /// locations' sources were offline), and whether it was sent stale:
    /// many notifications often settle into one state, which is sent once
    /// (and once more when a stale copy is confirmed fresh).
    versions: HashMap<String, (http::HeaderValue, bool)>,
    /// SKUs read while Redis was unreachable (nothing, or a stale copy):
    /// read again every [`RETRY`] until a fresh read, so the last event is
    /// the state the SKU settled in.
    pending: HashSet<String>,
}

impl Sent {
    /// Reads the SKU (after the notification that woke us, so at least
    /// that new) and returns the event to send, if it is news.
    async fn refresh(&mut self, app: &App, merchant: &str, sku: &str) -> Option<Bytes> {
        let (rendered, source) = match app.cache.get(merchant, sku).await {
            Ok(found) => found,
            // Unknown: its creation will be notified like any change.
            Err(ApiError::NotFound(_)) => {
                self.pending.remove(sku);
                return None;
            }
            Err(_) => {
                self.pending.insert(sku.to_owned());
                return None;
            }
        };
        let stale = source == Source::Stale;
        if stale {
            self.pending.insert(sku.to_owned());
        } else {
            self.pending.remove(sku);
        }
        let etag = rendered.view(None)?.etag.clone();
        if self
            .versions
            .get(sku)
            .is_some_and(|(sent, sent_stale)| *sent == etag && *sent_stale == stale)
        {
            return None;
        }
        self.versions.insert(sku.to_owned(), (etag, stale));
        Some(sse_event(&rendered, stale))
    }
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
    let _open = Open::take(app, client_address(session, &app.config()))?;

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
    let mut state = Sent::default();
    let mut resyncs = app.resyncs();
    for sku in &skus {
        if let Some(bytes) = state.refresh(app, &merchant, sku).await
            && !send(session, bytes).await
        {
            return Ok(Outcome::Streamed(200));
        }
    }
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.tick().await;
    let mut retry = tokio::time::interval(RETRY);
    // Idle while nothing is pending: no burst of missed ticks afterwards.
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let was_pending = !state.pending.is_empty();
        let wake = tokio::select! {
            change = changes.recv() => match change {
                Ok(change) if change.merchant == merchant && wanted.contains(change.sku.as_str()) => {
                    Wake::Changed(change.sku)
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(missed)) => {
                    app.metrics.streams_dropped.inc();
                    tracing::info!(missed, "sse client too slow; dropped");
                    break;
                }
                Err(RecvError::Closed) => break,
            },
            // The node may have missed notifications: every SKU read again.
            Ok(()) = resyncs.changed() => Wake::All,
            _ = retry.tick(), if !state.pending.is_empty() => Wake::Pending,
            _ = keepalive.tick() => Wake::Keepalive,
            // A GET has no body: this ends only when the client closes the
            // connection, which gives its slot back at once rather than at
            // the next failed write.
            _ = session.as_downstream_mut().read_body_or_idle(true) => {
                return Ok(Outcome::Streamed(200));
            }
        };
        let again: Vec<String> = match wake {
            Wake::Changed(sku) => vec![sku],
            Wake::All => skus.clone(),
            Wake::Pending => state.pending.iter().cloned().collect(),
            Wake::Keepalive => {
                if !send(session, Bytes::from_static(b": keepalive\n\n")).await {
                    app.metrics.streams_dropped.inc();
                    break;
                }
                continue;
            }
        };
        for sku in &again {
            if let Some(bytes) = state.refresh(app, &merchant, sku).await
                && !send(session, bytes).await
            {
                app.metrics.streams_dropped.inc();
                let _ = session.write_response_body(None, true).await;
                return Ok(Outcome::Streamed(200));
            }
        }
        if !was_pending && !state.pending.is_empty() {
            // The first retry a full period from now.
            retry.reset();
        }
    }
    let _ = session.write_response_body(None, true).await;
    Ok(Outcome::Streamed(200))
}
