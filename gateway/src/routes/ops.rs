//! Operations routes: `/health`, `/ready`, `/metrics`, the OpenAPI document.

use bytes::Bytes;
use config::Config;
use serde_json::{Value, json};

use crate::api::{ApiError, Reply};
use crate::app::{App, Node};

/// The OpenAPI document of the v1 API as checked in; every bound in it is
/// set again from its one home when served ([`openapi_document`]).
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

/// The OpenAPI document of the config in force.
pub(crate) fn openapi(app: &App) -> Reply {
    Reply::json_bytes(200, app.openapi())
}

/// The OpenAPI document for `config`: the checked-in one with every bound
/// set from where it lives (`allocator::limits`, the config), so that it
/// says exactly what this node accepts (a contract fuzzer holds it to
/// that: `scripts/contract`).
pub fn openapi_document(config: &Config) -> Bytes {
    use allocator::limits::{
        COUNT_QTY_MAX, CUSTOMER_REF_CHARS_MAX, DELTA_QTY_MAX, QTY_MAX, SOURCE_SEQ_MAX,
    };
    let mut document: Value =
        serde_json::from_str(OPENAPI).expect("the checked-in document is JSON (unit-tested)");
    let ttl_max = json!(config.stock.reservation_ttl_seconds_max);
    let schemas = &mut document["components"]["schemas"];
    let line = &mut schemas["Line"]["properties"];
    line["qty"]["maximum"] = json!(QTY_MAX);
    let request = &mut schemas["ReservationRequest"]["properties"];
    request["lines"]["maxItems"] = json!(config.limits.reservation_lines_max);
    request["ttl_seconds"]["maximum"] = ttl_max.clone();
    request["customer_ref"]["maxLength"] = json!(CUSTOMER_REF_CHARS_MAX);
    for (index, (minimum, maximum)) in [(-DELTA_QTY_MAX, DELTA_QTY_MAX), (0, COUNT_QTY_MAX)]
        .into_iter()
        .enumerate()
    {
        let kind = &mut schemas["Adjustment"]["oneOf"][index]["properties"];
        kind["qty"]["minimum"] = json!(minimum);
        kind["qty"]["maximum"] = json!(maximum);
        kind["source_seq"]["maximum"] = json!(SOURCE_SEQ_MAX);
    }
    for field in [
        "safety_stock",
        "backorder_limit",
        "low_stock_threshold",
        "reorder_point",
        "reorder_qty",
    ] {
        schemas["Settings"]["properties"][field]["maximum"] = json!(COUNT_QTY_MAX);
    }
    let paths = &mut document["paths"];
    // `auth.public_reads`: reads need no key (they count against the
    // client's address instead).
    if config.auth.public_reads {
        for (path, method) in [
            ("/v1/availability/{merchant}/{sku}", "get"),
            ("/v1/availability/batch", "post"),
            ("/v1/stream", "get"),
        ] {
            paths[path][method]["security"] = json!([{ "bearer": [] }, {}]);
        }
    }
    paths["/v1/availability/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        ["properties"]["items"]["maxItems"] = json!(config.limits.availability_batch_items_max);
    paths["/v1/reservations/{id}/extend"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        ["properties"]["ttl_seconds"]["maximum"] = ttl_max;
    Bytes::from(document.to_string())
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
    fn the_served_document_carries_every_bound_from_its_home() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/dev.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut config = config::parse(&text, path, &|_| None).unwrap();
        config.stock.reservation_ttl_seconds_max = 1234;
        config.limits.availability_batch_items_max = 7;
        let document: Value = serde_json::from_slice(&openapi_document(&config)).unwrap();
        let schemas = &document["components"]["schemas"];
        assert_eq!(
            schemas["ReservationRequest"]["properties"]["ttl_seconds"]["maximum"],
            1234
        );
        assert_eq!(
            schemas["Line"]["properties"]["qty"]["maximum"],
            allocator::limits::QTY_MAX
        );
        let delta = &schemas["Adjustment"]["oneOf"][0]["properties"];
        assert_eq!(delta["kind"]["enum"][0], "delta");
        assert_eq!(delta["qty"]["minimum"], -allocator::limits::DELTA_QTY_MAX);
        let absolute = &schemas["Adjustment"]["oneOf"][1]["properties"];
        assert_eq!(absolute["kind"]["enum"][0], "absolute");
        assert_eq!(absolute["qty"]["maximum"], allocator::limits::COUNT_QTY_MAX);
        let batch = &document["paths"]["/v1/availability/batch"]["post"]["requestBody"]["content"]
            ["application/json"]["schema"]["properties"]["items"];
        assert_eq!(batch["maxItems"], 7);
        let extend = &document["paths"]["/v1/reservations/{id}/extend"]["post"]["requestBody"]["content"]
            ["application/json"]["schema"]["properties"]["ttl_seconds"];
        assert_eq!(extend["maximum"], 1234);
        let read = &document["paths"]["/v1/availability/{merchant}/{sku}"]["get"]["security"];
        assert_eq!(read[1], json!({}), "public reads need no key: {read}");
        config.auth.public_reads = false;
        let document: Value = serde_json::from_slice(&openapi_document(&config)).unwrap();
        let read = &document["paths"]["/v1/availability/{merchant}/{sku}"]["get"];
        assert!(
            read.get("security").is_none(),
            "the document's default: a key"
        );
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
