//! Operations routes: `/health`, `/ready`, `/metrics`, the OpenAPI document.

use bytes::Bytes;
use serde_json::json;

use crate::api::{ApiError, Reply};
use crate::app::{App, Node};

/// The OpenAPI document of the v1 API.
const OPENAPI: &str = include_str!("../../openapi.json");

/// 200 while the process runs.
pub(crate) fn health(app: &App) -> Reply {
    Reply::json(
        200,
        &json!({ "status": "ok", "node": app.config().node.id }),
    )
}

/// The answer to any request before the node is up (`crate::app::Node`):
/// `/health` 200 (the process runs), `/ready` 503 naming what it waits
/// for, anything else 503 `store_unavailable` with Retry-After (nothing was
/// changed; the node is not ready for traffic, the origin's included).
pub(crate) fn starting(node: &Node, path: &str) -> Reply {
    let path = path.strip_suffix('/').unwrap_or(path);
    match path {
        "/health" => Reply::json(200, &json!({ "status": "ok", "node": node.id })),
        "/ready" => Reply::json(
            503,
            &json!({ "status": "not_ready", "reason": node.waiting_for() }),
        ),
        _ => ApiError::StoreUnavailable.reply(),
    }
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
    readiness(&app.allocator.health().await, app.hears_changes())
}

/// `/ready`'s answer. On a cluster with some masters not answering it is
/// 200 `degraded`, naming them: the node answers every request whose keys
/// are on the others (its cache is bypassed meanwhile, so what it answers
/// is current) and 503 the rest, and a load balancer taking every node out
/// because one master is down would stop every key instead of a share.
fn readiness(health: &allocator::StoreHealth, hears_changes: bool) -> Reply {
    if !health.is_whole() {
        if health.some_answer() {
            return Reply::json(
                200,
                &json!({
                    "status": "degraded",
                    "reason": format!("{} (requests on their slots answer 503)", health.describe()),
                }),
            );
        }
        return Reply::json(
            503,
            &json!({ "status": "not_ready", "reason": health.describe() }),
        );
    }
    if !hears_changes {
        return Reply::json(
            503,
            &json!({ "status": "not_ready", "reason": "change notifications not subscribed yet" }),
        );
    }
    Reply::json(200, &json!({ "status": "ready" }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(masters: usize, down: usize) -> allocator::StoreHealth {
        allocator::StoreHealth {
            masters,
            not_answering: (0..down).map(|n| format!("127.0.0.1:{n}: gone")).collect(),
            uncovered_slots: 0,
        }
    }

    fn status(reply: &Reply) -> (u16, String) {
        let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("json");
        (
            reply.status,
            body["status"].as_str().unwrap_or("").to_owned(),
        )
    }

    #[test]
    fn readiness_is_degraded_while_some_masters_answer() {
        assert_eq!(
            status(&readiness(&health(1, 0), true)),
            (200, "ready".into())
        );
        assert_eq!(
            status(&readiness(&health(1, 0), false)),
            (503, "not_ready".into())
        );
        assert_eq!(
            status(&readiness(&health(1, 1), true)),
            (503, "not_ready".into())
        );
        assert_eq!(
            status(&readiness(&health(3, 1), false)),
            (200, "degraded".into())
        );
        assert_eq!(
            status(&readiness(&health(3, 3), true)),
            (503, "not_ready".into())
        );
        let uncovered = allocator::StoreHealth {
            uncovered_slots: 5461,
            ..health(3, 0)
        };
        assert_eq!(
            status(&readiness(&uncovered, false)),
            (200, "degraded".into())
        );
    }
}
