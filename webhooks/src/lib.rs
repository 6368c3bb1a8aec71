//! Partner webhooks: what the gateway's `/v1/webhooks` routes and the ledger
//! writer's deliveries share.
//!
//! Owns a registration's rules (its URL, events and secret), sealing
//! secrets, signing deliveries, checking where a delivery may go, and the
//! PostgreSQL tables both processes read and write (`webhooks`,
//! `webhook_deliveries`, `webhook_attempts`; the ledger writer's migrations
//! create them). It makes no HTTP request itself.
//!
//! **Secrets are sealed, never shown.** A delivery's signature needs the
//! secret itself, so it cannot be stored hashed: it is sealed with
//! XChaCha20-Poly1305 under `webhooks.secret_key` (a random nonce per seal,
//! the registration's merchant and name as associated data, so a sealed
//! secret moved to another registration does not open). No answer of the
//! API carries it.
//!
//! **Signatures** (API.md): `Webhook-Signature: v1=<hex HMAC-SHA256 of
//! "<Webhook-Id>.<Webhook-Timestamp>.<body>" with the secret>`.
//!
//! **Targets.** `https` only, and every address the host resolves to must
//! be public (not loopback, private, link-local, shared, multicast or
//! unspecified), checked at registration and again before every attempt
//! (DNS may change in between); the attempt then connects to the checked
//! address only. `webhooks.allow_private_targets` lifts both rules, for
//! tests and development.

use std::net::{IpAddr, SocketAddr};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_postgres::Client;

/// The events a webhook may ask for: the stock signals.
pub const EVENTS: [&str; 5] = [
    "out_of_stock",
    "back_in_stock",
    "low_stock",
    "reorder",
    "shortfall",
];

/// Shortest and longest secret, in characters.
pub const SECRET_CHARS: std::ops::RangeInclusive<usize> = 16..=256;

/// Longest URL.
pub const URL_CHARS_MAX: usize = 2_048;

/// Bound on resolving a webhook's host.
pub const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Most webhooks one merchant may register (each is a delivery of every
/// signal it asks for: a bound on what one merchant costs every partner).
pub const WEBHOOKS_PER_MERCHANT_MAX: i64 = 20;

/// A webhook as registered (its secret is not here: it stays sealed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    /// Its merchant: it is sent that merchant's signals only.
    pub merchant: String,
    /// Its name, unique per merchant.
    pub name: String,
    /// Where deliveries are POSTed.
    pub url: String,
    /// The signal kinds it is sent.
    pub events: Vec<String>,
}

/// Why a registration, a secret or a target is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Checks a registration's events: some, each known, none twice.
pub fn check_events(events: &[String]) -> Result<(), Refused> {
    if events.is_empty() {
        return Err(Refused("events must name at least one event".to_owned()));
    }
    for (index, event) in events.iter().enumerate() {
        if event == "availability" {
            return Err(Refused(format!(
                "event availability is not delivered yet: ask for {}",
                EVENTS.join(", ")
            )));
        }
        if !EVENTS.contains(&event.as_str()) {
            return Err(Refused(format!(
                "unknown event {event:?}: one of {}",
                EVENTS.join(", ")
            )));
        }
        if events[..index].contains(event) {
            return Err(Refused(format!("event {event} is listed twice")));
        }
    }
    Ok(())
}

/// Seals and opens webhook secrets with `webhooks.secret_key`.
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl Sealer {
    /// A sealer with the 64-hex-digit key; `None` when webhooks are off
    /// (an empty key) or the key is not 32 bytes of hex.
    pub fn new(key_hex: &str) -> Option<Self> {
        let key = hex::decode(key_hex).ok()?;
        let cipher = XChaCha20Poly1305::new_from_slice(&key).ok()?;
        Some(Self { cipher })
    }

    /// `secret` sealed for the registration `(merchant, name)`: the nonce
    /// and the ciphertext.
    pub fn seal(&self, merchant: &str, name: &str, secret: &str) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        rand::fill(&mut nonce);
        let aad = associated(merchant, name);
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: &aad,
                },
            )
            // Encrypting a bounded secret in memory cannot fail.
            .expect("sealing a secret");
        let mut out = nonce.to_vec();
        out.extend(sealed);
        out
    }

    /// The secret `sealed` holds for `(merchant, name)`; a refusal when it
    /// does not open (another key, another registration, altered bytes).
    pub fn open(&self, merchant: &str, name: &str, sealed: &[u8]) -> Result<String, Refused> {
        if sealed.len() < 24 {
            return Err(Refused("sealed secret too short".to_owned()));
        }
        let (nonce, ciphertext) = sealed.split_at(24);
        let aad = associated(merchant, name);
        let secret = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| Refused("the secret does not open with this key".to_owned()))?;
        String::from_utf8(secret).map_err(|_| Refused("the secret is not UTF-8".to_owned()))
    }
}

fn associated(merchant: &str, name: &str) -> Vec<u8> {
    format!("webhook\u{1f}{merchant}\u{1f}{name}").into_bytes()
}

/// The `Webhook-Signature` value of one delivery attempt.
pub fn signature(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Where a delivery may go: the URL, its host, and the addresses checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as registered.
    pub url: url::Url,
    /// Its host name.
    pub host: String,
    /// The addresses it resolved to, each allowed.
    pub addresses: Vec<SocketAddr>,
}

/// Checks `text` as a webhook URL and resolves its host: `https` (or
/// `http` with `allow_private`), no credentials, every address public
/// unless `allow_private`.
pub async fn check_target(text: &str, allow_private: bool) -> Result<Target, Refused> {
    if text.len() > URL_CHARS_MAX {
        return Err(Refused(format!(
            "url must be at most {URL_CHARS_MAX} characters"
        )));
    }
    if text.chars().any(char::is_control) {
        return Err(Refused("url must not hold control characters".to_owned()));
    }
    let url = url::Url::parse(text).map_err(|error| Refused(format!("url: {error}")))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_private => {}
        other => return Err(Refused(format!("url must be https, not {other}"))),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refused("url must not carry credentials".to_owned()));
    }
    let host = url
        .host_str()
        .ok_or_else(|| Refused("url has no host".to_owned()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| Refused("url has no port".to_owned()))?;
    // Bounded, and said without the addresses (a refusal must not map a
    // network's names for whoever registers a webhook).
    let lookup = tokio::time::timeout(
        LOOKUP_TIMEOUT,
        tokio::net::lookup_host((host.as_str(), port)),
    );
    let addresses: Vec<SocketAddr> = match lookup.await {
        Ok(Ok(addresses)) => addresses.collect(),
        Ok(Err(_)) | Err(_) => {
            return Err(Refused(format!("url host {host} does not resolve")));
        }
    };
    if addresses.is_empty() {
        return Err(Refused(format!("url host {host} does not resolve")));
    }
    if !allow_private && addresses.iter().any(|address| !is_public(address.ip())) {
        return Err(Refused(format!(
            "url host {host} must resolve to public addresses only, which it does not"
        )));
    }
    Ok(Target {
        url,
        host,
        addresses,
    })
}

/// Whether `ip` is an address on the public internet: IPv4 outside the
/// special ranges; IPv6 only global unicast (`2000::/3`) outside its
/// special ranges, and forms that embed an IPv4 address (mapped, NAT64,
/// 6to4) only when that address is.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            let embedded = |high: u16, low: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new(
                    (high >> 8) as u8,
                    high as u8,
                    (low >> 8) as u8,
                    low as u8,
                ))
            };
            // NAT64 (64:ff9b::/96: the IPv4 address it reaches; the local
            // 64:ff9b:1::/48 never).
            if s[0] == 0x64 && s[1] == 0xff9b {
                return s[2..6] == [0, 0, 0, 0] && is_public(embedded(s[6], s[7]));
            }
            // 6to4 (2002::/16): the IPv4 address in its next 32 bits.
            if s[0] == 0x2002 {
                return is_public(embedded(s[1], s[2]));
            }
            (s[0] & 0xe000) == 0x2000
                // Teredo, benchmarking, ORCHID, documentation.
                && !(s[0] == 0x2001 && s[1] == 0)
                && !(s[0] == 0x2001 && s[1] == 0x2)
                && !(s[0] == 0x2001 && (0x10..0x30).contains(&s[1]))
                && !(s[0] == 0x2001 && s[1] == 0xdb8)
        }
    }
}

/// One delivery as `GET /v1/webhooks/{merchant}/{name}/deliveries` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryView {
    /// The `Webhook-Id` of its every attempt (the signal's id).
    pub webhook_id: String,
    /// The signal kind.
    pub event: String,
    /// `pending`, `delivered` or `failed` (dead-lettered).
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// The last attempt's HTTP status, if it got one.
    pub last_status_code: Option<i32>,
    /// The last attempt's failure, if any.
    pub last_error: Option<String>,
    /// When it was decided (RFC 3339).
    pub created_at: String,
    /// When the next attempt is due, while pending.
    pub next_attempt_at: Option<String>,
    /// When a 2xx ended it.
    pub delivered_at: Option<String>,
}

/// The registrations' table operations, and the connection both processes
/// make to PostgreSQL.
pub mod store {
    use super::*;

    /// Connects to `config`'s PostgreSQL (bounded by its connect timeout,
    /// its statements by `statement_timeout_ms`) and drives the connection
    /// in the background: the one way the gateway and the ledger writer
    /// connect.
    pub async fn connect(config: &config::PostgresConfig) -> Result<Client, tokio_postgres::Error> {
        let mut pg_config: tokio_postgres::Config = config.url.parse()?;
        pg_config.connect_timeout(std::time::Duration::from_millis(config.connect_timeout_ms));
        let (client, connection) = pg_config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "postgresql connection closed");
            }
        });
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                config.statement_timeout_ms
            ))
            .await?;
        Ok(client)
    }

    fn rfc3339(at: time::OffsetDateTime) -> String {
        at.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    }

    /// Creates or replaces a registration; true when it is new.
    pub async fn put(
        client: &Client,
        webhook: &Webhook,
        sealed_secret: &[u8],
    ) -> Result<bool, tokio_postgres::Error> {
        let row = client
            .query_one(
                "INSERT INTO webhooks (merchant, name, url, events, secret_sealed)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (merchant, name) DO UPDATE
                     SET url = EXCLUDED.url, events = EXCLUDED.events,
                         secret_sealed = EXCLUDED.secret_sealed, updated_at = now()
                 RETURNING (xmax = 0)",
                &[
                    &webhook.merchant,
                    &webhook.name,
                    &webhook.url,
                    &webhook.events,
                    &sealed_secret,
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    /// How many webhooks `merchant` has besides `name`.
    pub async fn count_others(
        client: &Client,
        merchant: &str,
        name: &str,
    ) -> Result<i64, tokio_postgres::Error> {
        Ok(client
            .query_one(
                "SELECT count(*) FROM webhooks WHERE merchant = $1 AND name <> $2",
                &[&merchant, &name],
            )
            .await?
            .get(0))
    }

    /// A registration.
    pub async fn get(
        client: &Client,
        merchant: &str,
        name: &str,
    ) -> Result<Option<Webhook>, tokio_postgres::Error> {
        let row = client
            .query_opt(
                "SELECT url, events FROM webhooks WHERE merchant = $1 AND name = $2",
                &[&merchant, &name],
            )
            .await?;
        Ok(row.map(|row| Webhook {
            merchant: merchant.to_owned(),
            name: name.to_owned(),
            url: row.get(0),
            events: row.get(1),
        }))
    }

    /// Deletes a registration and its deliveries; true when there was one.
    pub async fn delete(
        client: &Client,
        merchant: &str,
        name: &str,
    ) -> Result<bool, tokio_postgres::Error> {
        let deleted = client
            .execute(
                "DELETE FROM webhooks WHERE merchant = $1 AND name = $2",
                &[&merchant, &name],
            )
            .await?;
        Ok(deleted > 0)
    }

    /// The registration's `limit` most recent deliveries, newest first.
    pub async fn deliveries(
        client: &Client,
        merchant: &str,
        name: &str,
        limit: i64,
    ) -> Result<Vec<DeliveryView>, tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT webhook_id, event, status, attempts, last_status_code, last_error,
                        created_at, next_attempt_at, delivered_at
                 FROM webhook_deliveries WHERE merchant = $1 AND name = $2
                 ORDER BY id DESC LIMIT $3",
                &[&merchant, &name, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let status: String = row.get(2);
                DeliveryView {
                    webhook_id: row.get(0),
                    event: row.get(1),
                    attempts: row.get(3),
                    last_status_code: row.get(4),
                    last_error: row.get(5),
                    created_at: rfc3339(row.get(6)),
                    next_attempt_at: (status == "pending")
                        .then(|| row.get::<_, time::OffsetDateTime>(7))
                        .map(rfc3339),
                    delivered_at: row.get::<_, Option<time::OffsetDateTime>>(8).map(rfc3339),
                    status,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    //! Pure rules: no services.
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_for_its_registration_and_key() {
        let sealer = Sealer::new(&"ab".repeat(32)).expect("key");
        let sealed = sealer.seal("m1", "erp", "s3cret-s3cret-s3cret");
        assert_eq!(
            sealer.open("m1", "erp", &sealed).expect("opens"),
            "s3cret-s3cret-s3cret"
        );
        assert!(sealer.open("m1", "other", &sealed).is_err());
        assert!(
            Sealer::new(&"cd".repeat(32))
                .expect("key")
                .open("m1", "erp", &sealed)
                .is_err()
        );
        assert_ne!(sealer.seal("m1", "erp", "x"), sealer.seal("m1", "erp", "x"));
        assert!(Sealer::new("").is_none());
        assert!(Sealer::new("abc").is_none());
    }

    #[test]
    fn a_signature_is_the_hex_hmac_of_id_timestamp_and_body() {
        // Computed independently (Python's hmac):
        // hmac.new(b'whsec-test', b'msg_1.1700000000.{"a":1}', sha256)
        assert_eq!(
            signature("whsec-test", "msg_1", 1_700_000_000, r#"{"a":1}"#),
            "v1=26178b842f976b359f29cccf76d74277bc0a6c32386e25dbde12d28aa08d4015"
        );
    }

    #[test]
    fn only_public_addresses_are_targets() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "198.18.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "fec0::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2001::1",
            "2001:db8::1",
            "100::1",
        ] {
            assert!(!is_public(private.parse().expect("ip")), "{private}");
        }
        for public in [
            "93.184.216.34",
            "2606:2800:220:1:248:1893:25c8:1946",
            "64:ff9b::5db8:d822",
            "2002:5db8:d822::1",
        ] {
            assert!(is_public(public.parse().expect("ip")), "{public}");
        }
    }

    #[tokio::test]
    async fn a_target_must_be_https_and_public_unless_allowed() {
        assert!(
            check_target("http://example.com/hook", false)
                .await
                .is_err()
        );
        assert!(
            check_target("https://user:pw@example.com/", false)
                .await
                .is_err()
        );
        let local = check_target("https://127.0.0.1:9/hook", false).await;
        assert!(
            local
                .as_ref()
                .is_err_and(|refused| refused.0.contains("public addresses only")
                    && !refused.0.contains("127.0.0.1:")),
            "{local:?}"
        );
        let named = check_target("https://localhost/hook", false).await;
        assert!(
            named
                .as_ref()
                .is_err_and(|refused| !refused.0.contains("127.0.0.1")),
            "{named:?}"
        );
        let allowed = check_target("http://127.0.0.1:9/hook", true)
            .await
            .expect("allowed for tests");
        assert_eq!(allowed.addresses, ["127.0.0.1:9".parse().expect("addr")]);
    }

    #[test]
    fn events_are_known_and_listed_once() {
        let events = |list: &[&str]| list.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>();
        assert!(check_events(&events(&["out_of_stock", "reorder"])).is_ok());
        assert!(check_events(&events(&[])).is_err());
        assert!(check_events(&events(&["sold_out"])).is_err());
        assert!(check_events(&events(&["reorder", "reorder"])).is_err());
        assert!(check_events(&events(&["availability"])).is_err());
    }
}
