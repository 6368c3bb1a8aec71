//! `/v1/substitutes/{merchant}/{sku}`: which SKUs may stand in for a short
//! one, in order of preference (API.md "Bundles and substitutes"; the fill
//! rule is `allocator::substitutes`'s). Scope `admin`.

use allocator::substitutes::Substitute;
use config::Scope;
use pingora::proxy::Session;
use serde_json::json;

use super::request::{admit, read_json_body};
use crate::api::{ApiError, Reply, SubstitutesBody, check_id, parse_body};
use crate::app::App;

fn shown(merchant: &str, sku: &str, substitutes: &[Substitute]) -> Reply {
    Reply::json(
        200,
        &json!({ "merchant": merchant, "sku": sku, "substitutes": substitutes }),
    )
}

/// `PUT`: sets the SKU's substitutes (replacing any).
pub(crate) async fn put(
    app: &App,
    session: &mut Session,
    merchant: &str,
    sku: &str,
) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Admin, false)?;
    let body = read_json_body(app, session, false).await?;
    check_id("merchant", merchant)?;
    check_id("sku", sku)?;
    let body: SubstitutesBody = parse_body(&body)?;
    let max = i64::from(allocator::substitutes::GROUP_UNITS_MAX);
    let mut substitutes = Vec::with_capacity(body.substitutes.len());
    for (index, substitute) in body.substitutes.iter().enumerate() {
        check_id(&format!("substitutes[{index}].sku"), &substitute.sku)?;
        for (field, value) in [
            ("units", substitute.units),
            ("replaces", substitute.replaces),
        ] {
            if !(1..=max).contains(&value) {
                return Err(ApiError::BadRequest(format!(
                    "substitutes[{index}].{field} must be between 1 and {max}"
                )));
            }
        }
        substitutes.push(Substitute {
            sku: substitute.sku.clone(),
            units: substitute.units as u32,
            replaces: substitute.replaces as u32,
        });
    }
    caller.require_merchant(merchant)?;
    app.allocator
        .set_substitutes(merchant, sku, &substitutes)
        .await?;
    Ok(shown(merchant, sku, &substitutes))
}

/// `GET`: the SKU's substitutes; 404 when it has none.
pub(crate) async fn get(
    app: &App,
    session: &mut Session,
    merchant: &str,
    sku: &str,
) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Admin, false)?;
    check_id("merchant", merchant)?;
    check_id("sku", sku)?;
    caller.require_merchant(merchant)?;
    match app.allocator.substitutes(merchant, sku).await? {
        Some(substitutes) => Ok(shown(merchant, sku, &substitutes)),
        None => Err(ApiError::NotFound(format!(
            "{sku} of {merchant} has no substitutes"
        ))),
    }
}

/// `DELETE`: removes the SKU's substitutes; 404 when it had none.
pub(crate) async fn delete(
    app: &App,
    session: &mut Session,
    merchant: &str,
    sku: &str,
) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Admin, false)?;
    check_id("merchant", merchant)?;
    check_id("sku", sku)?;
    caller.require_merchant(merchant)?;
    if app.allocator.delete_substitutes(merchant, sku).await? {
        Ok(Reply::json(
            200,
            &json!({ "merchant": merchant, "sku": sku, "deleted": true }),
        ))
    } else {
        Err(ApiError::NotFound(format!(
            "{sku} of {merchant} has no substitutes"
        )))
    }
}
