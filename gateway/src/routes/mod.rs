//! The routes the gateway answers itself: `/v1/*`, `/health`, `/ready`,
//! `/metrics`.
//!
//! Owns the route table ([`route_request`]: every local route is one line
//! there, naming the handler module of its resource) and the request
//! plumbing ([`request`]: authentication and rate limits, bodies within the
//! limit, Idempotency-Keys, query strings). Handlers live in one module per
//! resource: [`availability`], [`reservations`], [`stock`], [`flash_sales`],
//! [`ops`] (and SSE in `crate::sse`); a new route goes into the table and the
//! module of its resource. Every check happens before the first change: a
//! refused request changes nothing.

pub(crate) mod availability;
pub(crate) mod flash_sales;
pub(crate) mod ops;
pub(crate) mod request;
pub(crate) mod reservations;
pub(crate) mod stock;

use std::time::Instant;

use allocator::StockKey;
use pingora::proxy::Session;

use crate::api::{ApiError, Reply};
use crate::app::App;

pub(crate) use request::{admit, public_read, query_pairs};

/// Whether the gateway answers `path` itself.
pub fn is_local(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/") || matches!(path, "/health" | "/ready" | "/metrics")
}

/// The route template of a path, for metrics labels (bounded set).
pub fn template(method: &str, path: &str) -> &'static str {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (_, ["health"]) => "/health",
        (_, ["ready"]) => "/ready",
        (_, ["metrics"]) => "/metrics",
        (_, ["v1", "openapi.json"]) => "/v1/openapi.json",
        (_, ["v1", "availability", "batch"]) => "/v1/availability/batch",
        (_, ["v1", "availability", _, _]) => "/v1/availability/{merchant}/{sku}",
        (_, ["v1", "reservations"]) => "/v1/reservations",
        (_, ["v1", "reservations", _]) => "/v1/reservations/{id}",
        (_, ["v1", "reservations", _, "commit"]) => "/v1/reservations/{id}/commit",
        (_, ["v1", "reservations", _, "release"]) => "/v1/reservations/{id}/release",
        (_, ["v1", "reservations", _, "extend"]) => "/v1/reservations/{id}/extend",
        (_, ["v1", "stock", "adjustments"]) => "/v1/stock/adjustments",
        (_, ["v1", "stock", _, _, _, "settings"]) => {
            "/v1/stock/{merchant}/{sku}/{location}/settings"
        }
        (_, ["v1", "stream"]) => "/v1/stream",
        (_, ["v1", "flash-sales"]) => "/v1/flash-sales",
        _ => "other",
    }
}

/// What a local route produced.
pub enum Outcome {
    /// A complete reply to write.
    Reply(Reply),
    /// The handler streamed its response itself (SSE); the status it sent.
    Streamed(u16),
}

/// Answers a local request.
pub async fn dispatch(app: &App, session: &mut Session) -> Outcome {
    let started = Instant::now();
    let method = session.req_header().method.as_str().to_owned();
    let path = session.req_header().uri.path().to_owned();
    let route = template(&method, &path);
    let outcome = match route_request(app, session, &method, &path).await {
        Ok(outcome) => outcome,
        Err(error) => {
            if let ApiError::Internal(reason) = &error {
                tracing::error!(%reason, %method, %path, "internal error");
            }
            Outcome::Reply(error.reply())
        }
    };
    let status = match &outcome {
        Outcome::Reply(reply) => reply.status,
        Outcome::Streamed(status) => *status,
    };
    app.metrics
        .requests
        .with_label_values(&[route, &status.to_string()])
        .inc();
    app.metrics
        .latency
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    outcome
}

async fn route_request(
    app: &App,
    session: &mut Session,
    method: &str,
    path: &str,
) -> Result<Outcome, ApiError> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let reply = match (method, parts.as_slice()) {
        ("GET", ["health"]) => ops::health(app),
        ("GET", ["ready"]) => ops::ready(app).await,
        ("GET", ["metrics"]) => ops::metrics(app),
        ("GET", ["v1", "openapi.json"]) => ops::openapi(),
        ("POST", ["v1", "availability", "batch"]) => availability::batch(app, session).await?,
        ("GET", ["v1", "availability", merchant, sku]) => {
            let (merchant, sku) = ((*merchant).to_owned(), (*sku).to_owned());
            availability::one(app, session, &merchant, &sku).await?
        }
        ("POST", ["v1", "reservations"]) => reservations::create(app, session).await?,
        ("GET", ["v1", "reservations", id]) => {
            let id = (*id).to_owned();
            reservations::get(app, session, &id).await?
        }
        (
            "POST",
            [
                "v1",
                "reservations",
                id,
                action @ ("commit" | "release" | "extend"),
            ],
        ) => {
            let (id, action) = ((*id).to_owned(), (*action).to_owned());
            reservations::act(app, session, &id, &action).await?
        }
        ("POST", ["v1", "stock", "adjustments"]) => stock::adjust(app, session).await?,
        ("PUT", ["v1", "stock", merchant, sku, location, "settings"]) => {
            let key = StockKey::new(*merchant, *sku, *location);
            stock::settings(app, session, key).await?
        }
        ("GET", ["v1", "stream"]) => return crate::sse::stream(app, session).await,
        ("GET", ["v1", "flash-sales"]) => flash_sales::list(app, session).await?,
        _ => {
            let known = template(method, path) != "other";
            return Err(if known {
                ApiError::MethodNotAllowed(format!("{method} {path}"))
            } else {
                ApiError::NoRoute(format!("{method} {path}"))
            });
        }
    };
    Ok(Outcome::Reply(reply))
}
