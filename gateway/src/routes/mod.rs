//! The routes the gateway answers itself: `/v1/*`, `/health`, `/ready`,
//! `/metrics`.
//!
//! Owns the route table ([`table`]: every local route is one line there,
//! with its method and template; [`route_request`] names the handler
//! module of its resource) and the request
//! plumbing ([`request`]: authentication and rate limits, bodies within the
//! limit, Idempotency-Keys, query strings). Handlers live in one module per
//! resource: [`availability`], [`reservations`], [`stock`], [`locations`], [`substitutes`], [`flash_sales`],
//! [`ops`] (and SSE in `crate::sse`); a new route goes into the table and the
//! module of its resource. Every check happens before the first change: a
//! refused request changes nothing.

pub(crate) mod availability;
pub(crate) mod flash_sales;
pub(crate) mod locations;
pub(crate) mod ops;
pub(crate) mod request;
pub(crate) mod reservations;
pub(crate) mod stock;
pub(crate) mod substitutes;
pub(crate) mod webhooks;

use std::time::Instant;

use allocator::StockKey;
use pingora::proxy::Session;
use tracing::Instrument;

use crate::api::{ApiError, Reply};
use crate::app::App;

pub(crate) use ops::{openapi_document, starting};
pub(crate) use request::{admit, client_address, public_read, query_pairs};

/// Whether the gateway answers `path` itself.
pub fn is_local(path: &str) -> bool {
    path == "/v1"
        || path.starts_with("/v1/")
        || matches!(
            path,
            "/health" | "/ready" | "/metrics" | "/health/" | "/ready/" | "/metrics/"
        )
}

/// What a route addresses; its handler is chosen with the method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    Health,
    Ready,
    Metrics,
    OpenApi,
    AvailabilityBatch,
    Availability,
    Reservations,
    Reservation,
    /// Commit, release or extend.
    ReservationAction(&'static str),
    StockAdjustments,
    StockSettings,
    Stream,
    FlashSales,
    /// PUT, GET or DELETE of a webhook registration.
    Webhook,
    /// PUT or GET of a location's allocation settings.
    Location,
    /// PUT, GET or DELETE of a SKU's substitutes.
    Substitutes,
    WebhookDeliveries,
}

/// One entry of the route table: a path template and what each method it
/// takes addresses.
struct Route {
    /// The path template: matched, and the metrics label (a bounded set).
    template: &'static str,
    /// The methods it takes (`Allow` of a 405, in this order).
    methods: Vec<(http::Method, Resource)>,
}

impl Route {
    fn resource(&self, method: &http::Method) -> Option<Resource> {
        self.methods
            .iter()
            .find(|(taken, _)| taken == method)
            .map(|(_, resource)| *resource)
    }

    fn allowed(&self) -> String {
        self.methods
            .iter()
            .map(|(method, _)| method.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The route table, built once (`matchit`: a radix tree; a lookup borrows
/// its parameters from the path, without allocating).
fn table() -> &'static matchit::Router<Route> {
    static TABLE: std::sync::OnceLock<matchit::Router<Route>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        use Resource::*;
        use http::Method;
        let mut table = matchit::Router::new();
        let mut routes: Vec<Route> = Vec::new();
        for (method, template, resource) in [
            (Method::GET, "/health", Health),
            (Method::GET, "/ready", Ready),
            (Method::GET, "/metrics", Metrics),
            (Method::GET, "/v1/openapi.json", OpenApi),
            (Method::POST, "/v1/availability/batch", AvailabilityBatch),
            (
                Method::GET,
                "/v1/availability/{merchant}/{sku}",
                Availability,
            ),
            (Method::POST, "/v1/reservations", Reservations),
            (Method::GET, "/v1/reservations/{id}", Reservation),
            (
                Method::POST,
                "/v1/reservations/{id}/commit",
                ReservationAction("commit"),
            ),
            (
                Method::POST,
                "/v1/reservations/{id}/release",
                ReservationAction("release"),
            ),
            (
                Method::POST,
                "/v1/reservations/{id}/extend",
                ReservationAction("extend"),
            ),
            (Method::POST, "/v1/stock/adjustments", StockAdjustments),
            (
                Method::PUT,
                "/v1/stock/{merchant}/{sku}/{location}/settings",
                StockSettings,
            ),
            (Method::GET, "/v1/stream", Stream),
            (Method::GET, "/v1/flash-sales", FlashSales),
            (Method::PUT, "/v1/locations/{merchant}/{location}", Location),
            (Method::GET, "/v1/locations/{merchant}/{location}", Location),
            (Method::PUT, "/v1/substitutes/{merchant}/{sku}", Substitutes),
            (Method::GET, "/v1/substitutes/{merchant}/{sku}", Substitutes),
            (
                Method::DELETE,
                "/v1/substitutes/{merchant}/{sku}",
                Substitutes,
            ),
            (Method::PUT, "/v1/webhooks/{merchant}/{name}", Webhook),
            (Method::GET, "/v1/webhooks/{merchant}/{name}", Webhook),
            (Method::DELETE, "/v1/webhooks/{merchant}/{name}", Webhook),
            (
                Method::GET,
                "/v1/webhooks/{merchant}/{name}/deliveries",
                WebhookDeliveries,
            ),
        ] {
            let at = routes
                .iter()
                .position(|route: &Route| route.template == template)
                .unwrap_or_else(|| {
                    routes.push(Route {
                        template,
                        methods: Vec::new(),
                    });
                    routes.len() - 1
                });
            routes[at].methods.push((method, resource));
        }
        for route in routes {
            // The templates above are fixed and distinct: inserting cannot fail.
            let _ = table.insert(route.template, route);
        }
        table
    })
}

/// What a local route produced.
// A reply carries its headers inline (no allocation per request); boxing
// it to shrink this enum would add one back.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    /// A complete reply to write.
    Reply(Reply),
    /// The handler streamed its response itself (SSE); the status it sent.
    Streamed(u16),
}

/// Answers a local request.
pub async fn dispatch(app: &App, session: &mut Session) -> Outcome {
    let started = Instant::now();
    // Owned copies (reference counted): the handlers borrow the session
    // mutably while the route's parameters borrow the path.
    let uri = session.req_header().uri.clone();
    let method = session.req_header().method.clone();
    // One trailing slash is the same resource (`/health/`, `/v1/reservations/`).
    let path = match uri.path() {
        "/" => "/",
        path => path.strip_suffix('/').unwrap_or(path),
    };
    let matched = table().at(path).ok();
    let route = matched
        .as_ref()
        .map_or("other", |found| found.value.template);
    let resource = matched
        .as_ref()
        .and_then(|found| found.value.resource(&method));
    let result = match (&matched, resource) {
        (Some(found), Some(resource)) if changes_stock(resource) => {
            // Logged under the request's id: the lines written in the
            // request's own task (the handler's, the error it answers
            // with, the allocator's calls made there) carry `request_id`
            // (a JSON log's span list); a coalesced batch runs in a task of
            // its own for many requests and is not one request's. Reads
            // skip the span: they log nothing and are the path measured in
            // microseconds.
            let span = tracing::info_span!(
                "request",
                request_id = %request_id(app, session),
                route = found.value.template
            );
            route_request(app, session, resource, &found.params)
                .instrument(span)
                .await
        }
        (Some(found), Some(resource)) => route_request(app, session, resource, &found.params).await,
        (Some(found), None) => Err(ApiError::MethodNotAllowed(
            format!("{method} {}", uri.path()),
            found.value.allowed(),
        )),
        (None, _) => Err(ApiError::NoRoute(format!("{method} {}", uri.path()))),
    };
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(error) => {
            if let ApiError::Internal(reason) = &error {
                tracing::error!(%reason, %method, path = uri.path(), "internal error");
            }
            Outcome::Reply(error.reply())
        }
    };
    let status = match &outcome {
        Outcome::Reply(reply) => reply.status,
        Outcome::Streamed(status) => *status,
    };
    let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    app.metrics
        .requests
        .with_label_values(&[route, status.as_str()])
        .inc();
    app.metrics
        .latency
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    outcome
}

/// Whether a route changes stock (and calls the allocator to do it).
fn changes_stock(resource: Resource) -> bool {
    matches!(
        resource,
        Resource::Reservations
            | Resource::ReservationAction(_)
            | Resource::StockAdjustments
            | Resource::StockSettings
    )
}

/// The id a stock-changing request is logged under: the client's
/// `X-Request-Id` when it is an API id (`[A-Za-z0-9._:-]{1,128}`), so a
/// client's and the node's logs meet; else one made here,
/// `<node>-<start ms, hex>-<sequence>` (unique per node and start).
fn request_id(app: &App, session: &Session) -> String {
    if let Some(id) = session
        .req_header()
        .headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .filter(|id| config::is_valid_id(id))
    {
        return id.to_owned();
    }
    static STARTED_MS: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let started = STARTED_MS.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis())
    });
    let sequence = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{started:x}-{sequence}", app.config().node.id)
}

async fn route_request(
    app: &App,
    session: &mut Session,
    resource: Resource,
    params: &matchit::Params<'_, '_>,
) -> Result<Outcome, ApiError> {
    // Percent-decoded (`%3A` is `:`); one that does not decode to UTF-8
    // stays as sent, and the id check refuses it.
    let param = |name: &str| {
        let raw = params.get(name).unwrap_or_default();
        percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .unwrap_or(std::borrow::Cow::Borrowed(raw))
    };
    let reply = match resource {
        Resource::Health => ops::health(app),
        Resource::Ready => ops::ready(app).await,
        Resource::Metrics => ops::metrics(app),
        Resource::OpenApi => ops::openapi(app),
        Resource::AvailabilityBatch => availability::batch(app, session).await?,
        Resource::Availability => {
            availability::one(app, session, &param("merchant"), &param("sku")).await?
        }
        Resource::Reservations => reservations::create(app, session).await?,
        Resource::Reservation => reservations::get(app, session, &param("id")).await?,
        Resource::ReservationAction(action) => {
            reservations::act(app, session, &param("id"), action).await?
        }
        Resource::StockAdjustments => stock::adjust(app, session).await?,
        Resource::StockSettings => {
            let key = StockKey::new(
                param("merchant").into_owned(),
                param("sku").into_owned(),
                param("location").into_owned(),
            );
            stock::settings(app, session, key).await?
        }
        Resource::Stream => return crate::sse::stream(app, session).await,
        Resource::FlashSales => flash_sales::list(app, session).await?,
        Resource::Webhook => {
            let (merchant, name) = (param("merchant"), param("name"));
            match session.req_header().method {
                http::Method::PUT => webhooks::put(app, session, &merchant, &name).await?,
                http::Method::DELETE => webhooks::delete(app, session, &merchant, &name).await?,
                _ => webhooks::get(app, session, &merchant, &name).await?,
            }
        }
        Resource::Location => {
            let (merchant, location) = (param("merchant"), param("location"));
            match session.req_header().method {
                http::Method::PUT => locations::put(app, session, &merchant, &location).await?,
                _ => locations::get(app, session, &merchant, &location).await?,
            }
        }
        Resource::Substitutes => {
            let (merchant, sku) = (param("merchant"), param("sku"));
            match session.req_header().method {
                http::Method::PUT => substitutes::put(app, session, &merchant, &sku).await?,
                http::Method::DELETE => substitutes::delete(app, session, &merchant, &sku).await?,
                _ => substitutes::get(app, session, &merchant, &sku).await?,
            }
        }
        Resource::WebhookDeliveries => {
            webhooks::deliveries(app, session, &param("merchant"), &param("name")).await?
        }
    };
    Ok(Outcome::Reply(reply))
}
