//! `/v1/reservations`: create, read, commit, release, extend.

use std::time::Duration;

use allocator::limits::{CUSTOMER_REF_CHARS_MAX, PREFER_MAX};
use allocator::{AllocatorError, CartLine, CartRequest, CartView};
use config::Scope;
use pingora::proxy::Session;
use serde_json::{Value, json};

use super::request::{admit, idempotency_key, read_json_body};
use crate::api::{
    ApiError, ExtendBody, Reply, ReservationBody, check_id, check_qty, parse_body, rfc3339_ms,
};
use crate::app::App;

/// A reservation as the API shows it: every hold with the index of the
/// request line it serves; a partial one (`allow_partial`) adds to each
/// hold its line's `requested` and `held`, and lists in `unfilled` every
/// line holding less than asked (none at all included).
pub(crate) fn cart_json(cart: &CartView) -> Value {
    let held = |line: u32| -> u32 {
        cart.lines
            .iter()
            .filter(|hold| hold.line == line)
            .map(allocator::CartLineView::counts_for)
            .sum()
    };
    let lines: Vec<Value> = cart
        .lines
        .iter()
        .map(|hold| {
            let mut shown = json!({
                "sku": hold.sku, "location": hold.location, "qty": hold.qty,
                "backordered": hold.backordered, "line": hold.line,
            });
            if let (Some(original), Some(stands_for)) = (&hold.substitute_for, hold.stands_for) {
                shown["substitute_for"] = json!(original);
                shown["stands_for"] = json!(stands_for);
            }
            if cart.partial {
                let requested = cart
                    .unfilled
                    .iter()
                    .find(|unfilled| unfilled.line == hold.line)
                    .map_or_else(|| held(hold.line), |unfilled| unfilled.requested);
                shown["requested"] = json!(requested);
                shown["held"] = json!(held(hold.line));
            }
            shown
        })
        .collect();
    let mut body = json!({
        "reservation_id": cart.reservation_id,
        "merchant": cart.merchant,
        "status": cart.status.as_str(),
        "expires_at": rfc3339_ms(cart.expires_at_ms),
        "lines": lines,
    });
    if cart.partial {
        body["unfilled"] = json!(
            cart.unfilled
                .iter()
                .map(|unfilled| json!({
                    "line": unfilled.line, "sku": unfilled.sku,
                    "requested": unfilled.requested, "held": unfilled.held,
                }))
                .collect::<Vec<_>>()
        );
    }
    body
}

pub(crate) async fn create(app: &App, session: &mut Session) -> Result<Reply, ApiError> {
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
        if let Some(location) = &line.location {
            check_id(&format!("lines[{index}].location"), location)?;
            if !line.prefer.is_empty() || line.allow_split {
                return Err(ApiError::BadRequest(format!(
                    "lines[{index}] names its location: prefer and allow_split are for lines without one"
                )));
            }
        }
        if line.prefer.len() > PREFER_MAX {
            return Err(ApiError::BadRequest(format!(
                "lines[{index}].prefer names at most {PREFER_MAX} locations"
            )));
        }
        for (at, preferred) in line.prefer.iter().enumerate() {
            check_id(&format!("lines[{index}].prefer[{at}]"), preferred)?;
        }
        let substitutes = match line.substitutes.as_deref() {
            None | Some("none") => false,
            Some("allow") => true,
            Some(_) => {
                return Err(ApiError::BadRequest(format!(
                    "lines[{index}].substitutes is \"allow\" or \"none\""
                )));
            }
        };
        lines.push(CartLine {
            sku: line.sku.clone(),
            location: line.location.clone(),
            qty: check_qty(&format!("lines[{index}].qty"), line.qty)?,
            prefer: line.prefer.clone(),
            allow_split: line.allow_split,
            substitutes,
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
    if body.customer_ref.as_ref().is_some_and(|reference| {
        reference.is_empty() || reference.chars().count() > CUSTOMER_REF_CHARS_MAX
    }) {
        return Err(ApiError::BadRequest(format!(
            "customer_ref must be 1 to {CUSTOMER_REF_CHARS_MAX} characters"
        )));
    }
    caller.require_merchant(&body.merchant)?;
    if let Some(reference) = &body.customer_ref {
        let customer = app.allocator.customer_hash(reference);
        app.limiter.admit_customer(&customer)?;
    }
    let request = CartRequest {
        merchant: body.merchant,
        lines,
        ttl,
        idempotency_key,
        customer_ref: body.customer_ref,
        allow_partial: body.allow_partial,
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
        Err(AllocatorError::RateLimited { .. }) => "throttled",
        Err(AllocatorError::CustomerLimit { .. }) => "customer_limit",
        Err(_) => "refused",
    };
    app.metrics.reservations.with_label_values(&[label]).inc();
    let (cart, replayed) = outcome?;
    let reply = Reply::json(201, &cart_json(&cart));
    Ok(if replayed {
        reply.with_header(
            "idempotent-replayed",
            http::HeaderValue::from_static("true"),
        )
    } else {
        reply
    })
}

pub(crate) async fn get(app: &App, session: &mut Session, id: &str) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Checkout, false)?;
    check_id("reservation_id", id)?;
    let cart = app.allocator.cart(caller.merchant(), id).await?;
    Ok(Reply::json(200, &cart_json(&cart)))
}

pub(crate) async fn act(
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
