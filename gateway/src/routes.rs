//! The routes the gateway answers itself: `/v1/*`, `/health`, `/ready`,
//! `/metrics`.
//!
//! Owns matching a request to a handler, reading its body within the limit,
//! and the handlers. Every check happens before the first change: a refused
//! request changes nothing.

use std::time::{Duration, Instant};

use allocator::{
    AdjustmentOutcome, AdjustmentRequest, AllocatorError, CartLine, CartRequest, CartView,
    StockKey, StockSettings,
};
use bytes::{Bytes, BytesMut};
use config::Scope;
use pingora::proxy::Session;
use serde_json::{Value, json};

use crate::api::{
    ApiError, BatchBody, ExtendBody, Reply, ReservationBody, SettingsBody, check_id, check_qty,
    parse_body, rfc3339_ms,
};
use crate::app::App;
use crate::auth::{Caller, authenticate};
use crate::availability::{LocationAvailability, Source, availability};

/// The OpenAPI document of the v1 API.
const OPENAPI: &str = include_str!("../openapi.json");

/// Longest an Idempotency-Key may be.
const IDEMPOTENCY_KEY_LENGTH_MAX: usize = 255;

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

pub(crate) fn query_pairs(session: &Session) -> Vec<(String, String)> {
    session
        .req_header()
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) => (name.to_owned(), value.to_owned()),
            None => (pair.to_owned(), String::new()),
        })
        .collect()
}

fn header<'a>(session: &'a Session, name: &str) -> Option<&'a str> {
    session
        .req_header()
        .headers
        .get(name)
        .and_then(|value| value.to_str().ok())
}

async fn route_request(
    app: &App,
    session: &mut Session,
    method: &str,
    path: &str,
) -> Result<Outcome, ApiError> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let reply = match (method, parts.as_slice()) {
        ("GET", ["health"]) => Reply::json(
            200,
            &json!({ "status": "ok", "node": app.config().node.id }),
        ),
        ("GET", ["ready"]) => ready(app).await,
        ("GET", ["metrics"]) => Reply {
            status: 200,
            headers: vec![("content-type", "text/plain; version=0.0.4".to_owned())],
            body: Bytes::from(app.metrics.render()),
        },
        ("GET", ["v1", "openapi.json"]) => Reply {
            status: 200,
            headers: vec![("content-type", "application/json".to_owned())],
            body: Bytes::from_static(OPENAPI.as_bytes()),
        },
        ("POST", ["v1", "availability", "batch"]) => availability_batch(app, session).await?,
        ("GET", ["v1", "availability", merchant, sku]) => {
            let (merchant, sku) = ((*merchant).to_owned(), (*sku).to_owned());
            availability_one(app, session, &merchant, &sku).await?
        }
        ("POST", ["v1", "reservations"]) => create_reservation(app, session).await?,
        ("GET", ["v1", "reservations", id]) => {
            let id = (*id).to_owned();
            get_reservation(app, session, &id).await?
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
            move_reservation(app, session, &id, &action).await?
        }
        ("POST", ["v1", "stock", "adjustments"]) => adjust(app, session).await?,
        ("PUT", ["v1", "stock", merchant, sku, location, "settings"]) => {
            let key = StockKey::new(*merchant, *sku, *location);
            settings(app, session, key).await?
        }
        ("GET", ["v1", "stream"]) => return crate::sse::stream(app, session).await,
        ("GET", ["v1", "flash-sales"]) => flash_sales(app, session).await?,
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

/// Ready when Redis answers and change notifications reach the cache; the
/// config is loaded by construction (a node does not start without a valid one).
async fn ready(app: &App) -> Reply {
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

/// Authenticates, checks the scope and takes a rate-limit token.
pub(crate) fn admit(
    app: &App,
    session: &Session,
    scope: Scope,
    public: bool,
) -> Result<Caller, ApiError> {
    let config = app.config();
    let caller = authenticate(session, &config, scope, public)?;
    app.limiter.admit(&caller, &config)?;
    Ok(caller)
}

pub(crate) fn public_read(app: &App) -> bool {
    app.config().auth.public_reads
}

/// Reads the body within `limits.body_bytes_max`; a mutating call's body must
/// be JSON (an empty body is allowed where `optional`).
async fn read_json_body(
    app: &App,
    session: &mut Session,
    optional: bool,
) -> Result<Bytes, ApiError> {
    let limit = app.config().limits.body_bytes_max;
    let declared: Option<usize> =
        header(session, "content-length").and_then(|value| value.parse().ok());
    if declared.is_some_and(|length| length > limit) {
        session.set_keepalive(None);
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let mut body = BytesMut::new();
    loop {
        let chunk = session
            .as_downstream_mut()
            .read_request_body()
            .await
            .map_err(|error| {
                ApiError::BadRequest(format!("cannot read the request body: {error}"))
            })?;
        let Some(chunk) = chunk else { break };
        if body.len() + chunk.len() > limit {
            session.set_keepalive(None);
            return Err(ApiError::PayloadTooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    let json = header(session, "content-type")
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    let empty_allowed = optional && body.is_empty();
    if !(json || empty_allowed) {
        return Err(ApiError::UnsupportedMediaType);
    }
    Ok(body.freeze())
}

fn idempotency_key(session: &Session, required: bool) -> Result<Option<String>, ApiError> {
    match header(session, "idempotency-key") {
        None if required => Err(ApiError::IdempotencyKeyRequired),
        None => Ok(None),
        Some(key)
            if key.is_empty()
                || key.len() > IDEMPOTENCY_KEY_LENGTH_MAX
                || !key.bytes().all(|byte| byte.is_ascii_graphic()) =>
        {
            Err(ApiError::BadRequest(format!(
                "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_LENGTH_MAX} visible ASCII characters"
            )))
        }
        Some(key) => Ok(Some(key.to_owned())),
    }
}

fn availability_reply(session: &Session, json: Value, etag: String, app: &App) -> Reply {
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

async fn availability_one(
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
    let (value, source) = availability(app, merchant, sku).await?;
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

async fn availability_batch(app: &App, session: &mut Session) -> Result<Reply, ApiError> {
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
        match availability(app, &item.merchant, &item.sku).await {
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

fn cart_json(cart: &CartView) -> Value {
    json!({
        "reservation_id": cart.reservation_id,
        "merchant": cart.merchant,
        "status": cart.status.as_str(),
        "expires_at": rfc3339_ms(cart.expires_at_ms),
        "lines": cart.lines.iter().map(|line| json!({
            "sku": line.sku, "location": line.location, "qty": line.qty, "backordered": line.backordered,
        })).collect::<Vec<_>>(),
    })
}

async fn create_reservation(app: &App, session: &mut Session) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Checkout, false)?;
    let body = read_json_body(app, session, false).await?;
    let idempotency_key = idempotency_key(session, true)?.unwrap_or_default();
    let body: ReservationBody = parse_body(&body)?;
    let config = app.config();
    check_id("merchant", &body.merchant)?;
    let lines_max = config.limits.reservation_lines_max;
    if body.lines.is_empty() || body.lines.len() > lines_max {
        return Err(ApiError::BadRequest(format!(
            "lines must hold 1 to {lines_max} entries"
        )));
    }
    let mut lines = Vec::with_capacity(body.lines.len());
    for (index, line) in body.lines.iter().enumerate() {
        check_id(&format!("lines[{index}].sku"), &line.sku)?;
        check_id(&format!("lines[{index}].location"), &line.location)?;
        lines.push(CartLine {
            sku: line.sku.clone(),
            location: line.location.clone(),
            qty: check_qty(&format!("lines[{index}].qty"), line.qty)?,
        });
    }
    let ttl_max = config.stock.reservation_ttl_seconds_max;
    let ttl = match body.ttl_seconds {
        None => None,
        Some(seconds) if (1..=ttl_max as i64).contains(&seconds) => {
            Some(Duration::from_secs(seconds as u64))
        }
        Some(_) => {
            return Err(ApiError::BadRequest(format!(
                "ttl_seconds must be between 1 and {ttl_max}"
            )));
        }
    };
    if body
        .customer_ref
        .as_ref()
        .is_some_and(|reference| reference.is_empty() || reference.len() > 256)
    {
        return Err(ApiError::BadRequest(
            "customer_ref must be 1 to 256 characters".to_owned(),
        ));
    }
    caller.require_merchant(&body.merchant)?;
    if let Some(reference) = &body.customer_ref {
        let customer = app.allocator.customer_hash(reference);
        app.limiter
            .admit_customer(&customer, config.limits.customer_reservations_per_second)?;
    }
    let request = CartRequest {
        merchant: body.merchant,
        lines,
        ttl,
        idempotency_key,
        customer_ref: body.customer_ref,
    };
    let outcome = app
        .reserver
        .reserve(&request)
        .await
        .map(|hold| (hold.cart, hold.replayed));
    let label = match &outcome {
        Ok((_, true)) => "replayed",
        Ok((_, false)) => "held",
        Err(AllocatorError::InsufficientStock { .. }) => "insufficient",
        Err(AllocatorError::StoreUnavailable(_)) => "store_unavailable",
        Err(_) => "refused",
    };
    app.metrics.reservations.with_label_values(&[label]).inc();
    let (cart, replayed) = outcome?;
    let reply = Reply::json(201, &cart_json(&cart));
    Ok(if replayed {
        reply.with_header("idempotent-replayed", "true")
    } else {
        reply
    })
}

async fn get_reservation(app: &App, session: &mut Session, id: &str) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Checkout, false)?;
    check_id("reservation_id", id)?;
    let cart = app.allocator.cart(caller.merchant(), id).await?;
    Ok(Reply::json(200, &cart_json(&cart)))
}

async fn move_reservation(
    app: &App,
    session: &mut Session,
    id: &str,
    action: &str,
) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Checkout, false)?;
    let body = read_json_body(app, session, action != "extend").await?;
    check_id("reservation_id", id)?;
    let cart = match action {
        "extend" => {
            let body: ExtendBody = parse_body(&body)?;
            let ttl_max = app.config().stock.reservation_ttl_seconds_max;
            if !(1..=ttl_max as i64).contains(&body.ttl_seconds) {
                return Err(ApiError::BadRequest(format!(
                    "ttl_seconds must be between 1 and {ttl_max}"
                )));
            }
            app.allocator
                .extend_cart(
                    caller.merchant(),
                    id,
                    Duration::from_secs(body.ttl_seconds as u64),
                )
                .await?
        }
        _ => {
            let key = idempotency_key(session, true)?.unwrap_or_default();
            if !body.is_empty() {
                parse_body::<serde_json::Map<String, Value>>(&body)?;
            }
            if action == "commit" {
                app.allocator
                    .commit_cart(caller.merchant(), id, &key)
                    .await?
            } else {
                app.allocator
                    .release_cart(caller.merchant(), id, &key)
                    .await?
            }
        }
    };
    Ok(Reply::json(200, &cart_json(&cart)))
}

async fn location_line(
    app: &App,
    key: &StockKey,
    pool: &allocator::Cell,
) -> Result<LocationAvailability, ApiError> {
    let config = app.config();
    let mut buckets = Vec::new();
    for node in pool.buckets.keys() {
        if let Some(bucket) = app
            .allocator
            .cell(&key.bucket(node, config.stock.partitions))
            .await?
        {
            buckets.push(bucket);
        }
    }
    Ok(LocationAvailability::from_cells(
        &key.location,
        pool,
        &buckets,
        config.cache.low_stock_threshold_default,
    ))
}

async fn adjust(app: &App, session: &mut Session) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Admin, false)?;
    let body = read_json_body(app, session, false).await?;
    idempotency_key(session, false)?;
    let adjustment = parse_body::<AdjustmentRequest>(&body)?
        .check()
        .map_err(ApiError::BadRequest)?;
    caller.require_merchant(&adjustment.merchant)?;
    let key = StockKey::new(&adjustment.merchant, &adjustment.sku, &adjustment.location);
    let outcome = app.allocator.adjust(&adjustment).await?;
    let json = match outcome {
        AdjustmentOutcome::Applied { shortfall, cell } => {
            let mut line = location_line(app, &key, &cell).await?.to_json();
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

async fn settings(app: &App, session: &mut Session, key: StockKey) -> Result<Reply, ApiError> {
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
            },
        )
        .await?;
    let mut line = location_line(app, &key, &cell).await?.to_json();
    line["merchant"] = json!(key.merchant);
    line["sku"] = json!(key.sku);
    line["backorder_limit"] = json!(cell.backorder_limit);
    line["low_stock_threshold"] = json!(body.low_stock_threshold);
    Ok(Reply::json(200, &line))
}

async fn flash_sales(app: &App, session: &mut Session) -> Result<Reply, ApiError> {
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
