//! Request plumbing every handler shares: authentication, scopes and rate
//! limits, reading a body within the limit, Idempotency-Keys, query strings.

use std::net::{IpAddr, Ipv6Addr};

use bytes::{Bytes, BytesMut};
use config::{Config, Scope};
use pingora::proxy::Session;

use crate::api::ApiError;
use crate::app::App;
use crate::auth::{Caller, authenticate};

/// Longest an Idempotency-Key may be.
const IDEMPOTENCY_KEY_LENGTH_MAX: usize = 255;

/// The query's `(name, value)` pairs, percent-decoded (`form_urlencoded`:
/// borrowed from the request unless a value needed decoding).
pub(crate) fn query_pairs(session: &Session) -> Vec<(String, String)> {
    form_urlencoded::parse(query_bytes(session))
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect()
}

fn query_bytes(session: &Session) -> &[u8] {
    session
        .req_header()
        .uri
        .query()
        .unwrap_or_default()
        .as_bytes()
}

/// The first value of query parameter `name`, if any.
pub(crate) fn query_value(session: &Session, name: &str) -> Option<String> {
    form_urlencoded::parse(query_bytes(session))
        .find(|(found, _)| found == name)
        .map(|(_, value)| value.into_owned())
}

/// The client a request counts against in the per-client limits: the TCP
/// peer, or, when the peer is a trusted proxy, the rightmost address of
/// `auth.client_address_header` that is not itself a trusted proxy. An
/// IPv6 client is its /64 (one host can take any address of it). `None` on
/// a Unix socket.
pub(crate) fn client_address(session: &Session, config: &Config) -> Option<IpAddr> {
    // Canonical: an IPv4 peer of a dual-stack listener is `::ffff:a.b.c.d`.
    let peer = session
        .client_addr()
        .and_then(|address| address.as_inet())
        .map(|address| address.ip().to_canonical())?;
    let trusted = &config.auth.trusted_proxies;
    let mut client = peer;
    if trusted.contains(&peer) {
        // From the last line and the last entry (the nearest proxy's) back
        // to the first address no trusted proxy vouches for; anything
        // unreadable on the way means the chain cannot be trusted past it.
        let lines = session
            .req_header()
            .headers
            .get_all(config.auth.client_address_header.as_str());
        'chain: for line in lines.iter().rev() {
            let Ok(line) = line.to_str() else { break };
            for entry in line.rsplit(',') {
                match entry
                    .trim()
                    .parse::<IpAddr>()
                    .map(|address| address.to_canonical())
                {
                    Ok(address) if trusted.contains(&address) => continue,
                    Ok(address) => {
                        client = address;
                        break 'chain;
                    }
                    Err(_) => break 'chain,
                }
            }
        }
    }
    Some(match client {
        IpAddr::V6(address) => {
            let prefix = u128::from(address) & !u128::from(u64::MAX);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    })
}

pub(crate) fn header<'a>(session: &'a Session, name: &str) -> Option<&'a str> {
    session
        .req_header()
        .headers
        .get(name)
        .and_then(|value| value.to_str().ok())
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
    app.limiter
        .admit(&caller, client_address(session, &config), 1)?;
    Ok(caller)
}

pub(crate) fn public_read(app: &App) -> bool {
    app.config().auth.public_reads
}

/// Reads the body within `limits.body_bytes_max`; a mutating call's body must
/// be JSON (an empty body is allowed where `optional`).
pub(crate) async fn read_json_body(
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

pub(crate) fn idempotency_key(
    session: &Session,
    required: bool,
) -> Result<Option<String>, ApiError> {
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
