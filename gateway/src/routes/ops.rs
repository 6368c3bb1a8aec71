//! Operations routes: `/health`, `/ready`, `/metrics`, the OpenAPI document.

use bytes::Bytes;
use serde_json::json;

use crate::api::Reply;
use crate::app::App;

/// The OpenAPI document of the v1 API.
const OPENAPI: &str = include_str!("../../openapi.json");

/// 200 while the process runs.
pub(crate) fn health(app: &App) -> Reply {
    Reply::json(
        200,
        &json!({ "status": "ok", "node": app.config().node.id }),
    )
}

/// The node's Prometheus metrics.
pub(crate) fn metrics(app: &App) -> Reply {
    Reply {
        status: 200,
        headers: smallvec::smallvec![(
            "content-type",
            http::HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        body: Bytes::from(app.metrics.render()),
    }
}

/// The OpenAPI document.
pub(crate) fn openapi() -> Reply {
    Reply::json_bytes(200, Bytes::from_static(OPENAPI.as_bytes()))
}

/// Ready when Redis answers and change notifications reach the cache; the
/// config is loaded by construction (a node does not start without a valid one).
pub(crate) async fn ready(app: &App) -> Reply {
    match app.allocator.ping().await {
        Ok(()) if app.hears_changes() => Reply::json(200, &json!({ "status": "ready" })),
        Ok(()) => Reply::json(
            503,
            &json!({ "status": "not_ready", "reason": "change notifications not subscribed yet" }),
        ),
        Err(error) => Reply::json(
            503,
            &json!({ "status": "not_ready", "reason": error.to_string() }),
        ),
    }
}
