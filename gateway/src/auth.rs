//! Who is calling, what they may do, and how often.
//!
//! Owns API-key lookup (by the SHA-256 of the bearer token, as the config
//! stores it), scope and merchant checks, and the rate limits (per API key,
//! per customer, per client address for anonymous reads). It does not know
//! routes: handlers say which scope and merchant they need.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

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

/// A token bucket (GCRA) of one API key on this node.
type KeyBucket = governor::DefaultDirectRateLimiter;
/// Token buckets keyed by a value (customer hash, client address).
type Buckets<K> = governor::DefaultKeyedRateLimiter<K>;

/// One API key's bucket and the quota it was built for (kept across
/// reloads that leave the quota as it was).
struct KeyLimit {
    quota: governor::Quota,
    bucket: KeyBucket,
}

/// Keyed buckets with the quota they were built for.
struct KeyedLimit<K: std::hash::Hash + Eq + Clone> {
    quota: governor::Quota,
    buckets: Buckets<K>,
}

/// The node's rate limits, each a GCRA token bucket from the `governor`
/// crate (lock-free, sharded per key):
/// * per API key: `requests_per_second / node.fleet_size` on each node,
///   with one second of burst;
/// * per customer (by the keyed hash of `customer_ref`, never the reference
///   itself): `limits.customer_reservations_per_second`;
/// * per client address for anonymous reads (`auth.public_reads`):
///   `limits.public_reads_per_second_per_client`, one second of burst.
///
/// Buckets follow a config reload; one whose quota did not change keeps
/// its state. [`RateLimiter::forget_idle`] drops the state of keys idle
/// long enough to be full again, so memory follows the active clients.
#[derive(Default)]
pub struct RateLimiter {
    keys: arc_swap::ArcSwap<HashMap<String, Arc<KeyLimit>>>,
    customers: arc_swap::ArcSwapOption<KeyedLimit<String>>,
    clients: arc_swap::ArcSwapOption<KeyedLimit<IpAddr>>,
}

/// `per_second` spread over `share` nodes, with one second of burst
/// (at least one request); `None` when there is no limit.
fn quota(per_second: u32, share: u32) -> Option<governor::Quota> {
    let per_second = NonZeroU32::new(per_second)?;
    let share = share.max(1);
    let burst = NonZeroU32::new((per_second.get() / share).max(1))?;
    let period = Duration::from_secs_f64(f64::from(share) / f64::from(per_second.get()));
    Some(governor::Quota::with_period(period)?.allow_burst(burst))
}

/// Whole seconds (at least 1) until a refused caller may try again.
fn retry_after(
    not_until: &governor::NotUntil<
        <governor::clock::DefaultClock as governor::clock::Clock>::Instant,
    >,
) -> u64 {
    use governor::clock::Clock;
    crate::api::retry_after_seconds(
        not_until.wait_time_from(governor::clock::DefaultClock::default().now()),
    )
}

fn rebuilt<K: std::hash::Hash + Eq + Clone>(
    current: &arc_swap::ArcSwapOption<KeyedLimit<K>>,
    quota: Option<governor::Quota>,
) {
    let kept = current.load();
    if kept.as_ref().map(|limit| limit.quota) == quota {
        return;
    }
    current.store(quota.map(|quota| {
        Arc::new(KeyedLimit {
            quota,
            buckets: governor::RateLimiter::keyed(quota),
        })
    }));
}

impl RateLimiter {
    /// Limits as `config` sets them.
    pub fn new(config: &Config) -> Self {
        let limiter = Self::default();
        limiter.reconfigure(config);
        limiter
    }

    /// Follows a reloaded config (auth keys, fleet size, limits).
    pub fn reconfigure(&self, config: &Config) {
        let share = config.node.fleet_size;
        let old = self.keys.load();
        let keys: HashMap<String, Arc<KeyLimit>> = config
            .auth
            .api_keys
            .iter()
            .filter_map(|key| {
                let quota = quota(key.requests_per_second?, share)?;
                let limit = match old.get(&key.name) {
                    Some(limit) if limit.quota == quota => Arc::clone(limit),
                    _ => Arc::new(KeyLimit {
                        quota,
                        bucket: governor::RateLimiter::direct(quota),
                    }),
                };
                Some((key.name.clone(), limit))
            })
            .collect();
        self.keys.store(Arc::new(keys));
        rebuilt(
            &self.customers,
            quota(config.limits.customer_reservations_per_second, 1),
        );
        rebuilt(
            &self.clients,
            quota(config.limits.public_reads_per_second_per_client, 1),
        );
    }

    /// Takes a token for the caller: one of its API key's (a request), or
    /// for an anonymous read `reads` of its client address's (a batch
    /// costs one per item); 429 with Retry-After when there are not enough.
    pub fn admit(
        &self,
        caller: &Caller,
        client: Option<IpAddr>,
        reads: u32,
    ) -> Result<(), ApiError> {
        match &caller.key {
            Some(key) => {
                let keys = self.keys.load();
                let Some(limit) = keys.get(&key.name) else {
                    return Ok(());
                };
                limit.bucket.check().map_err(|not_until| {
                    ApiError::RateLimited(
                        format!(
                            "api key {} is over its {} requests per second",
                            key.name,
                            key.requests_per_second.unwrap_or_default()
                        ),
                        retry_after(&not_until),
                    )
                })
            }
            None => {
                let (Some(client), Some(limit)) = (client, self.clients.load_full()) else {
                    return Ok(());
                };
                let over = |retry| {
                    ApiError::RateLimited(
                        format!("anonymous reads from {client} are over this node's budget"),
                        retry,
                    )
                };
                let Some(reads) = NonZeroU32::new(reads) else {
                    return Ok(());
                };
                match limit.buckets.check_key_n(&client, reads) {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(not_until)) => Err(over(retry_after(&not_until))),
                    // More at once than a second's budget: never admissible,
                    // so not a matter of waiting.
                    Err(governor::InsufficientCapacity(most)) => {
                        Err(ApiError::BadRequest(format!(
                            "an anonymous batch may read at most {most} items at once on this node; \
                         use fewer items or an API key"
                        )))
                    }
                }
            }
        }
    }

    /// Takes one reservation token for a customer, or refuses with 429.
    pub fn admit_customer(&self, customer_hash: &str) -> Result<(), ApiError> {
        let Some(limit) = self.customers.load_full() else {
            return Ok(());
        };
        limit
            .buckets
            .check_key(&customer_hash.to_owned())
            .map_err(|not_until| {
                ApiError::RateLimited(
                    "this customer is over its reservations per second".to_owned(),
                    retry_after(&not_until),
                )
            })
    }

    /// Forgets buckets that are full again (their keys idle): run now and
    /// then so memory follows the clients seen lately.
    pub fn forget_idle(&self) {
        for limit in [self.customers.load_full()].into_iter().flatten() {
            limit.buckets.retain_recent();
            limit.buckets.shrink_to_fit();
        }
        for limit in [self.clients.load_full()].into_iter().flatten() {
            limit.buckets.retain_recent();
            limit.buckets.shrink_to_fit();
        }
    }
}
