//! Who is calling, what they may do, and how often.
//!
//! Owns API-key lookup (by the SHA-256 of the bearer token, as the config
//! stores it), scope and merchant checks, and the per-key token buckets. It
//! does not know routes: handlers say which scope and merchant they need.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use config::{ApiKeyConfig, Config, Scope};
use pingora::proxy::Session;

use crate::api::ApiError;

/// The caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The matched key; `None` for an anonymous public read.
    pub key: Option<ApiKeyConfig>,
}

impl Caller {
    /// The merchant the caller acts for; `None` for the platform (`*`) or an
    /// anonymous public read.
    pub fn merchant(&self) -> Option<&str> {
        self.key
            .as_ref()
            .map(|key| key.merchant.as_str())
            .filter(|merchant| *merchant != "*")
    }

    /// Refuses unless the caller may act for `merchant`.
    pub fn require_merchant(&self, merchant: &str) -> Result<(), ApiError> {
        match self.merchant() {
            Some(own) if own != merchant => Err(ApiError::Forbidden(format!(
                "this api key belongs to another merchant than {merchant}"
            ))),
            _ => Ok(()),
        }
    }

    /// The key's name for logs and metrics.
    pub fn name(&self) -> &str {
        self.key
            .as_ref()
            .map_or("anonymous", |key| key.name.as_str())
    }
}

/// Authenticates the request and checks `scope`. With `public` (a read when
/// `public_reads` is on) a request without a key is let through anonymously;
/// a request that presents a key is still checked.
pub fn authenticate(
    session: &Session,
    config: &Config,
    scope: Scope,
    public: bool,
) -> Result<Caller, ApiError> {
    let header = session
        .req_header()
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let token = match header {
        None if public => return Ok(Caller { key: None }),
        None => return Err(ApiError::Unauthorized),
        Some(value) => value
            .strip_prefix("Bearer ")
            .map(str::trim)
            .ok_or(ApiError::Unauthorized)?,
    };
    let key = config
        .api_key_for_token(token)
        .ok_or(ApiError::Unauthorized)?;
    if !key.scopes.contains(&scope) {
        return Err(ApiError::Forbidden(format!(
            "this api key lacks the {} scope",
            scope_name(scope)
        )));
    }
    Ok(Caller {
        key: Some(key.clone()),
    })
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Read => "read",
        Scope::Checkout => "checkout",
        Scope::Admin => "admin",
        Scope::Stream => "stream",
    }
}

/// Most customers tracked for the per-customer limit; past it the ones idle
/// for 10 s are forgotten (they start again with a full bucket).
const CUSTOMERS_TRACKED_MAX: usize = 100_000;

/// Token buckets per API key name (each node admits `requests_per_second /
/// fleet_size` per key, with one second of burst) and per customer (by the
/// keyed hash of `customer_ref`, never the reference itself).
#[derive(Default)]
pub struct RateLimiter {
    /// Key name → (tokens, last refill).
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    /// Customer hash → (tokens, last refill).
    customers: Mutex<HashMap<String, (f64, Instant)>>,
}

/// Takes a token from `bucket`, refilled at `rate` per second up to `burst`.
fn take(bucket: &mut (f64, Instant), rate: f64, burst: f64) -> bool {
    let now = Instant::now();
    bucket.0 = (bucket.0 + now.duration_since(bucket.1).as_secs_f64() * rate).min(burst);
    bucket.1 = now;
    if bucket.0 >= 1.0 {
        bucket.0 -= 1.0;
        true
    } else {
        false
    }
}

impl RateLimiter {
    /// Takes one token for the caller's API key, or refuses with 429.
    pub fn admit(&self, caller: &Caller, config: &Config) -> Result<(), ApiError> {
        let Some(key) = &caller.key else {
            return Ok(());
        };
        let Some(per_second) = key.requests_per_second else {
            return Ok(());
        };
        let rate = f64::from(per_second) / f64::from(config.node.fleet_size.max(1));
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bucket = buckets
            .entry(key.name.clone())
            .or_insert((rate.max(1.0), Instant::now()));
        if take(bucket, rate, rate.max(1.0)) {
            Ok(())
        } else {
            Err(ApiError::RateLimited(format!(
                "api key {} is over its {per_second} requests per second",
                key.name
            )))
        }
    }

    /// Takes one reservation token for a customer, or refuses with 429.
    pub fn admit_customer(&self, customer_hash: &str, per_second: u32) -> Result<(), ApiError> {
        if per_second == 0 {
            return Ok(());
        }
        let rate = f64::from(per_second);
        let mut customers = self
            .customers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if customers.len() >= CUSTOMERS_TRACKED_MAX {
            let idle = std::time::Duration::from_secs(10);
            customers.retain(|_, (_, last)| last.elapsed() < idle);
        }
        let bucket = customers
            .entry(customer_hash.to_owned())
            .or_insert((rate, Instant::now()));
        if take(bucket, rate, rate) {
            Ok(())
        } else {
            Err(ApiError::RateLimited(format!(
                "this customer is over {per_second} reservations per second"
            )))
        }
    }
}
