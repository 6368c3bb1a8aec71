//! `/v1/webhooks/{merchant}/{name}`: partner webhook registrations (PUT,
//! GET, DELETE) and their recent deliveries (`.../deliveries`), scope
//! `admin`, a key's own merchant only.
//!
//! Registrations live in PostgreSQL (the `webhooks` crate's tables), which
//! the gateway reaches only for these routes: while PostgreSQL does not
//! answer they answer 503 and every other route goes on. The secret is
//! sealed here before it is stored and never shown again; the URL is
//! checked (https, public addresses) before anything is stored.

use config::Scope;
use pingora::proxy::Session;
use serde::Deserialize;
use serde_json::json;
use webhooks::{Sealer, Webhook};

use super::request::{admit, read_json_body};
use crate::api::{ApiError, Reply, check_id, parse_body};
use crate::app::App;

/// Deliveries `GET .../deliveries` shows, newest first.
const DELIVERIES_SHOWN: i64 = 50;

/// `PUT /v1/webhooks/{merchant}/{name}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookBody {
    url: String,
    events: Vec<String>,
    secret: String,
}

fn shown(webhook: &Webhook) -> serde_json::Value {
    json!({
        "merchant": webhook.merchant, "name": webhook.name, "url": webhook.url,
        "events": webhook.events,
    })
}

/// A webhook-table call: bounded ([`App::in_postgres`]) and its failure
/// answered ([`unavailable`]).
async fn stored<T>(
    app: &App,
    call: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, ApiError> {
    app.in_postgres(call).await?.map_err(unavailable)
}

fn missing(merchant: &str, name: &str) -> ApiError {
    ApiError::NotFound(format!("no webhook {merchant}/{name}"))
}

fn checked(app: &App, session: &Session, merchant: &str, name: &str) -> Result<(), ApiError> {
    let caller = admit(app, session, Scope::Admin, false)?;
    check_id("merchant", merchant)?;
    check_id("name", name)?;
    caller.require_merchant(merchant)
}

/// A PostgreSQL failure as an answer: 503 when it did not answer (or
/// timed out), 500 when it refused a statement (a bug, or a schema the
/// writer has not migrated yet).
fn unavailable(error: tokio_postgres::Error) -> ApiError {
    match error.as_db_error() {
        Some(refused) if refused.code() != &tokio_postgres::error::SqlState::QUERY_CANCELED => {
            ApiError::Internal(format!("postgresql refused a webhook statement: {refused}"))
        }
        _ => {
            tracing::warn!(%error, "postgresql unavailable for webhooks");
            ApiError::StoreUnavailable
        }
    }
}

pub(crate) async fn put(
    app: &App,
    session: &mut Session,
    merchant: &str,
    name: &str,
) -> Result<Reply, ApiError> {
    checked(app, session, merchant, name)?;
    let body = read_json_body(app, session, false).await?;
    let body: WebhookBody = parse_body(&body)?;
    webhooks::check_events(&body.events).map_err(|refused| ApiError::BadRequest(refused.0))?;
    if !webhooks::SECRET_CHARS.contains(&body.secret.chars().count()) {
        return Err(ApiError::BadRequest(format!(
            "secret must be {} to {} characters",
            webhooks::SECRET_CHARS.start(),
            webhooks::SECRET_CHARS.end()
        )));
    }
    let config = app.config();
    let sealer = Sealer::new(&config.webhooks.secret_key).ok_or_else(|| {
        ApiError::BadRequest(
            "webhooks are off on this deployment (webhooks.secret_key is not set)".to_owned(),
        )
    })?;
    let target = webhooks::check_target(&body.url, config.webhooks.allow_private_targets)
        .await
        .map_err(|refused| ApiError::BadRequest(refused.0))?;
    // Kept as parsed (normalised, percent-encoded): what is delivered to.
    let webhook = Webhook {
        merchant: merchant.to_owned(),
        name: name.to_owned(),
        url: target.url.to_string(),
        events: body.events,
    };
    let sealed = sealer.seal(merchant, name, &body.secret);
    let client = app.postgres().await?;
    let others = stored(app, webhooks::store::count_others(&client, merchant, name)).await?;
    if others >= webhooks::WEBHOOKS_PER_MERCHANT_MAX {
        return Err(ApiError::BadRequest(format!(
            "a merchant may register at most {} webhooks",
            webhooks::WEBHOOKS_PER_MERCHANT_MAX
        )));
    }
    let created = stored(app, webhooks::store::put(&client, &webhook, &sealed)).await?;
    Ok(Reply::json(
        if created { 201 } else { 200 },
        &shown(&webhook),
    ))
}

pub(crate) async fn get(
    app: &App,
    session: &mut Session,
    merchant: &str,
    name: &str,
) -> Result<Reply, ApiError> {
    checked(app, session, merchant, name)?;
    let client = app.postgres().await?;
    let webhook = stored(app, webhooks::store::get(&client, merchant, name))
        .await?
        .ok_or_else(|| missing(merchant, name))?;
    Ok(Reply::json(200, &shown(&webhook)))
}

pub(crate) async fn delete(
    app: &App,
    session: &mut Session,
    merchant: &str,
    name: &str,
) -> Result<Reply, ApiError> {
    checked(app, session, merchant, name)?;
    let client = app.postgres().await?;
    if !stored(app, webhooks::store::delete(&client, merchant, name)).await? {
        return Err(missing(merchant, name));
    }
    Ok(Reply::json(
        200,
        &json!({ "merchant": merchant, "name": name, "deleted": true }),
    ))
}

pub(crate) async fn deliveries(
    app: &App,
    session: &mut Session,
    merchant: &str,
    name: &str,
) -> Result<Reply, ApiError> {
    checked(app, session, merchant, name)?;
    let client = app.postgres().await?;
    if stored(app, webhooks::store::get(&client, merchant, name))
        .await?
        .is_none()
    {
        return Err(missing(merchant, name));
    }
    let deliveries = stored(
        app,
        webhooks::store::deliveries(&client, merchant, name, DELIVERIES_SHOWN),
    )
    .await?;
    Ok(Reply::json(
        200,
        &json!({ "merchant": merchant, "name": name, "deliveries": deliveries }),
    ))
}
