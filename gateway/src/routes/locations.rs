//! `/v1/locations/{merchant}/{location}`: how a merchant ranks a location
//! for reservation lines that name none (API.md "Allocation").
//!
//! The config's `locations[]` give each location's `priority` and
//! `ship_from`; what this route sets overrides them for every node at once
//! (the allocator keeps it in Redis and reads it at each placement). GET
//! answers the settings in force and where they come from.

use allocator::LocationSettings;
use config::Scope;
use pingora::proxy::Session;
use serde_json::json;

use super::request::{admit, read_json_body};
use crate::api::{ApiError, LocationBody, Reply, check_id, parse_body};
use crate::app::App;

fn shown(merchant: &str, location: &str, settings: LocationSettings, from: &str) -> Reply {
    Reply::json(
        200,
        &json!({
            "merchant": merchant, "location": location,
            "priority": settings.priority, "ship_from": settings.ship_from,
            "set_by": from,
        }),
    )
}

/// `PUT`: sets the location's settings (scope `admin`; the allocator
/// bounds the priority, a 400 past it).
pub(crate) async fn put(
    app: &App,
    session: &mut Session,
    merchant: &str,
    location: &str,
) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Admin, false)?;
    let body = read_json_body(app, session, false).await?;
    check_id("merchant", merchant)?;
    check_id("location", location)?;
    let body: LocationBody = parse_body(&body)?;
    caller.require_merchant(merchant)?;
    let settings = LocationSettings {
        priority: body.priority,
        ship_from: body.ship_from,
    };
    app.allocator
        .set_location_settings(merchant, location, settings)
        .await?;
    Ok(shown(merchant, location, settings, "api"))
}

/// `GET`: the settings in force (scope `admin`): set through this route,
/// else the config's, else the defaults (priority 0, may ship).
pub(crate) async fn get(
    app: &App,
    session: &mut Session,
    merchant: &str,
    location: &str,
) -> Result<Reply, ApiError> {
    let caller = admit(app, session, Scope::Admin, false)?;
    check_id("merchant", merchant)?;
    check_id("location", location)?;
    caller.require_merchant(merchant)?;
    if let Some(settings) = app
        .allocator
        .location_settings(merchant)
        .await?
        .get(location)
    {
        return Ok(shown(merchant, location, *settings, "api"));
    }
    let config = app.config();
    Ok(
        match config
            .locations
            .iter()
            .find(|known| known.merchant == merchant && known.location == location)
        {
            Some(known) => shown(
                merchant,
                location,
                LocationSettings {
                    priority: known.priority,
                    ship_from: known.ship_from,
                },
                "config",
            ),
            None => shown(merchant, location, LocationSettings::default(), "default"),
        },
    )
}
