//! The HTTP contract's vocabulary: replies, errors and request bodies.
//!
//! Owns the one mapping from every failure to one status and one JSON error
//! code of shared/API.md ([`ApiError::reply`]), and the validation of request
//! bodies. Handlers build [`Reply`] values; they never write status codes for
//! errors themselves.

use allocator::{AllocatorError, ReservationStatus, ShortLine};
use bytes::Bytes;
use http::HeaderValue;
use serde::Deserialize;
use serde_json::{Value, json};

/// Largest quantity a request may carry (the allocator's limit).
pub const QTY_MAX: u64 = allocator::limits::QTY_MAX as u64;

/// `Content-Type` of every JSON reply.
const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A reply's headers.
pub type Headers = smallvec::SmallVec<[(&'static str, HeaderValue); 4]>;

/// A response the gateway writes itself.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Headers (a JSON reply starts with its content type); up to four
    /// without a heap allocation.
    pub headers: Headers,
    /// The body; JSON unless a header says otherwise.
    pub body: Bytes,
}

impl Reply {
    /// A JSON reply.
    pub fn json(status: u16, value: &Value) -> Self {
        Self {
            status,
            headers: smallvec::smallvec![("content-type", JSON.clone())],
            body: Bytes::from(value.to_string()),
        }
    }

    /// A reply of JSON bytes rendered before (a cached view).
    pub fn json_bytes(status: u16, body: Bytes) -> Self {
        Self {
            status,
            headers: smallvec::smallvec![("content-type", JSON.clone())],
            body,
        }
    }

    /// A reply with a header added.
    pub fn with_header(mut self, name: &'static str, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// Every way a request fails, each with one status and one error code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, bad id, quantity out of range, too many lines.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or unknown API key.
    #[error("missing or unknown api key")]
    Unauthorized,
    /// The key lacks the scope or belongs to another merchant.
    #[error("{0}")]
    Forbidden(String),
    /// Unknown reservation or stock key.
    #[error("{0}")]
    NotFound(String),
    /// Not enough sellable units; nothing was held.
    #[error("not enough sellable units")]
    InsufficientStock(Vec<ShortLine>),
    /// Commit or extend of a reservation that is not held.
    #[error("reservation is {}", .0.as_str())]
    NotHeld(ReservationStatus),
    /// Body over the configured limit.
    #[error("request body is over {0} bytes")]
    PayloadTooLarge(usize),
    /// Mutating call without JSON.
    #[error("a mutating call takes Content-Type: application/json")]
    UnsupportedMediaType,
    /// Same Idempotency-Key with a different body.
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    /// Mutating call without Idempotency-Key.
    #[error("this call needs an Idempotency-Key header")]
    IdempotencyKeyRequired,
    /// Per-key, per-client or per-node limit; retry after that many seconds.
    #[error("{0}")]
    RateLimited(String, u64),
    /// Redis unreachable; nothing was changed.
    #[error("the stock store is unavailable; nothing was changed")]
    StoreUnavailable,
    /// A request with the same Idempotency-Key is still being worked on.
    #[error("a request with this Idempotency-Key is in progress; retry shortly")]
    RequestInProgress,
    /// A flash sale's customer limit: what it counts, the limit, what the
    /// customer has used.
    #[error("this customer's {0} in the flash sale are at its limit of {1}")]
    CustomerLimit(String, u64, u64),
    /// A path under /v1 that does not exist.
    #[error("no route for {0}")]
    NoRoute(String),
    /// A known path with a method it does not take; the ones it takes
    /// (`Allow`: methods joined by `, `).
    #[error("method not allowed: {0}")]
    MethodNotAllowed(String, String),
    /// A bug; logged, never shown in detail.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The status, error code and body of this error.
    pub fn reply(&self) -> Reply {
        let message = self.to_string();
        let (status, code, mut body) = match self {
            ApiError::BadRequest(_) => (400, "bad_request", json!({})),
            ApiError::Unauthorized => (401, "unauthorized", json!({})),
            ApiError::Forbidden(_) => (403, "forbidden", json!({})),
            ApiError::NotFound(_) | ApiError::NoRoute(_) => (404, "not_found", json!({})),
            ApiError::InsufficientStock(lines) => (
                409,
                "insufficient_stock",
                json!({ "lines": lines.iter().map(|line| {
                    let mut shown = json!({
                        "sku": line.sku, "location": line.location,
                        "requested": line.requested, "available": line.available.max(0),
                    });
                    if let Some(index) = line.line {
                        shown["line"] = json!(index);
                    }
                    shown
                }).collect::<Vec<_>>() }),
            ),
            ApiError::NotHeld(status) => (
                409,
                "reservation_not_held",
                json!({ "status": status.as_str() }),
            ),
            ApiError::MethodNotAllowed(..) => (405, "method_not_allowed", json!({})),
            ApiError::PayloadTooLarge(_) => (413, "payload_too_large", json!({})),
            ApiError::UnsupportedMediaType => (415, "unsupported_media_type", json!({})),
            ApiError::IdempotencyKeyReused => (422, "idempotency_key_reused", json!({})),
            ApiError::IdempotencyKeyRequired => (428, "idempotency_key_required", json!({})),
            ApiError::RateLimited(..) => (429, "rate_limited", json!({})),
            ApiError::StoreUnavailable => (503, "store_unavailable", json!({})),
            ApiError::RequestInProgress => (409, "request_in_progress", json!({})),
            ApiError::CustomerLimit(counts, limit, used) => (
                409,
                "customer_limit",
                json!({ "limit": limit, "used": used, "counts": counts }),
            ),
            ApiError::Internal(_) => (500, "internal", json!({})),
        };
        body["error"] = json!(code);
        body["message"] = json!(message);
        let reply = Reply::json(status, &body);
        match self {
            ApiError::RateLimited(_, seconds) => {
                reply.with_header("retry-after", HeaderValue::from(*seconds))
            }
            ApiError::StoreUnavailable | ApiError::RequestInProgress => {
                reply.with_header("retry-after", HeaderValue::from_static("1"))
            }
            ApiError::MethodNotAllowed(_, allowed) => {
                // Methods are tokens: always a valid header value.
                let allowed =
                    HeaderValue::from_str(allowed).unwrap_or(HeaderValue::from_static("GET"));
                reply.with_header("allow", allowed)
            }
            _ => reply,
        }
    }
}

impl From<AllocatorError> for ApiError {
    fn from(error: AllocatorError) -> Self {
        match error {
            AllocatorError::InsufficientStock { lines } => ApiError::InsufficientStock(lines),
            AllocatorError::NotHeld { status } => ApiError::NotHeld(status),
            AllocatorError::NotFound => {
                ApiError::NotFound("no such reservation or stock key".to_owned())
            }
            AllocatorError::IdempotencyKeyReused => ApiError::IdempotencyKeyReused,
            AllocatorError::InvalidRequest(reason) => ApiError::BadRequest(reason),
            AllocatorError::StoreUnavailable(reason) => {
                tracing::warn!(%reason, "redis unavailable");
                ApiError::StoreUnavailable
            }
            AllocatorError::Protocol(reason) => {
                tracing::error!(%reason, "stock store protocol error");
                ApiError::Internal(reason)
            }
            // A step that must wait (a drain, an activation): try again.
            AllocatorError::Conflict(reason) => {
                tracing::warn!(%reason, "stock store conflict");
                ApiError::StoreUnavailable
            }
            AllocatorError::InProgress => ApiError::RequestInProgress,
            AllocatorError::RateLimited {
                reason,
                retry_after,
            } => ApiError::RateLimited(reason, retry_after_seconds(retry_after)),
            AllocatorError::CustomerLimit {
                limit,
                used,
                counts,
                ..
            } => ApiError::CustomerLimit(counts, limit, used),
            // hold_hot handles a fenced bucket itself; reaching here is a bug.
            AllocatorError::Fenced => {
                tracing::error!("fenced bucket answer reached the edge");
                ApiError::Internal("fenced bucket".to_owned())
            }
        }
    }
}

/// Whole seconds (at least 1) a refused caller waits before trying again:
/// the `Retry-After` of a wait.
pub fn retry_after_seconds(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Checks an id against `[A-Za-z0-9._:-]{1,128}`.
pub fn check_id(field: &str, value: &str) -> Result<(), ApiError> {
    if config::is_valid_id(value) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{field} must match [A-Za-z0-9._:-]{{1,128}}"
        )))
    }
}

/// Checks a requested quantity against 1..=1,000,000.
pub fn check_qty(field: &str, value: i64) -> Result<u32, ApiError> {
    if (1..=QTY_MAX as i64).contains(&value) {
        Ok(value as u32)
    } else {
        Err(ApiError::BadRequest(format!(
            "{field} must be between 1 and {QTY_MAX}"
        )))
    }
}

/// Parses a JSON body into `T`, naming what is wrong.
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    allocator::from_json_object(body).map_err(ApiError::BadRequest)
}

/// `POST /v1/reservations` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationBody {
    /// Merchant of every line.
    pub merchant: String,
    /// The lines.
    pub lines: Vec<LineBody>,
    /// Hold lifetime; config default and maximum.
    #[serde(default)]
    pub ttl_seconds: Option<i64>,
    /// Opaque customer reference, used only hashed.
    #[serde(default)]
    pub customer_ref: Option<String>,
    /// Hold what can be held (201 with each line's `requested` and `held`)
    /// rather than all or nothing.
    #[serde(default)]
    pub allow_partial: bool,
}

/// One reservation line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineBody {
    /// SKU.
    pub sku: String,
    /// Location; absent: the allocator chooses.
    #[serde(default)]
    pub location: Option<String>,
    /// Units.
    pub qty: i64,
    /// Locations in order of preference (a line without a location).
    #[serde(default)]
    pub prefer: Vec<String>,
    /// Whether the line may be held across locations (a line without a
    /// location).
    #[serde(default)]
    pub allow_split: bool,
    /// `"allow"`: a short line is filled with its SKU's substitutes;
    /// `"none"` (the default): it is not.
    #[serde(default)]
    pub substitutes: Option<String>,
}

/// `PUT /v1/substitutes/{merchant}/{sku}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubstitutesBody {
    /// In order of preference.
    pub substitutes: Vec<SubstituteBody>,
}

/// One substitute.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubstituteBody {
    /// The substitute SKU.
    pub sku: String,
    /// Units of it in one group.
    pub units: i64,
    /// Units of the original one group stands in for.
    pub replaces: i64,
}

/// `PUT /v1/locations/{merchant}/{location}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocationBody {
    /// Rank for lines without a location, higher first; 0 when absent.
    #[serde(default)]
    pub priority: i64,
    /// Whether such lines may be held here; true when absent.
    #[serde(default = "yes")]
    pub ship_from: bool,
}

fn yes() -> bool {
    true
}

/// `POST /v1/reservations/{id}/extend` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendBody {
    /// New lifetime from now.
    pub ttl_seconds: i64,
}

/// `PUT /v1/stock/{merchant}/{sku}/{location}/settings` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsBody {
    /// Units never offered for sale.
    #[serde(default)]
    pub safety_stock: u64,
    /// How far sellable may go below zero.
    #[serde(default)]
    pub backorder_limit: u64,
    /// `low` at or under this.
    #[serde(default)]
    pub low_stock_threshold: Option<u64>,
    /// A `reorder` signal at or under this; none when absent.
    #[serde(default)]
    pub reorder_point: Option<u64>,
    /// The quantity a `reorder` signal suggests.
    #[serde(default)]
    pub reorder_qty: u64,
}

/// `POST /v1/availability/batch` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// The keys to read.
    pub items: Vec<BatchItem>,
}

/// One batch read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    /// Merchant.
    pub merchant: String,
    /// SKU.
    pub sku: String,
    /// Only this location, if given.
    #[serde(default)]
    pub location: Option<String>,
}

/// RFC 3339 of a Redis time in ms.
pub fn rfc3339_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    //! The body parser, the one door every request body comes through.

    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes get a verdict (a body or a 400), never a panic.
        #[test]
        fn any_body_gets_a_verdict(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let verdicts = [
                parse_body::<ReservationBody>(&body).err(),
                parse_body::<ExtendBody>(&body).err(),
                parse_body::<SettingsBody>(&body).err(),
                parse_body::<BatchBody>(&body).err(),
            ];
            for error in verdicts.into_iter().flatten() {
                prop_assert!(matches!(error, ApiError::BadRequest(_)), "{error:?}");
            }
        }

        /// Only a JSON object can be a body: an array or a scalar is 400,
        /// though serde would read an array as the fields in order.
        #[test]
        fn a_body_that_is_not_an_object_is_refused(
            body in prop_oneof![
                Just("[]".to_owned()),
                Just(" [0, 0, null] ".to_owned()),
                Just("null".to_owned()),
                "[0-9]{1,5}",
                "\"[a-z]{0,5}\"",
            ],
        ) {
            prop_assert!(parse_body::<SettingsBody>(body.as_bytes()).is_err());
            prop_assert!(parse_body::<ExtendBody>(body.as_bytes()).is_err());
        }
    }

    #[test]
    fn a_line_written_as_its_fields_in_order_is_refused() {
        let lines = br#"{"merchant":"m","lines":[["s","l",1]]}"#;
        assert!(parse_body::<ReservationBody>(lines).is_err());
        let items = br#"{"items":[["m","s"]]}"#;
        assert!(parse_body::<BatchBody>(items).is_err());
        let good = br#"{"merchant":"m","lines":[{"sku":"s","location":"l","qty":1}]}"#;
        assert!(parse_body::<ReservationBody>(good).is_ok());
    }

    #[test]
    fn an_object_body_is_read() {
        let settings: SettingsBody = parse_body(b" {\"safety_stock\": 2}").expect("object");
        assert_eq!(settings.safety_stock, 2);
    }
}
