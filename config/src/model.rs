//! The configuration as typed structs, exactly as the TOML file spells it.
//!
//! This module owns the shape and the defaults. It does not read files, apply
//! environment overrides or check cross-field rules: `load` and `validate` do.
//! Every struct rejects unknown fields, so a misspelt key is an error and not a
//! silently ignored setting.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The whole configuration of one process (a gateway node or a ledger writer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Who this process is; node ids name hot-SKU buckets and heartbeats.
    pub node: NodeConfig,
    /// Where the gateway listens for HTTP(S).
    pub listen: ListenConfig,
    /// Where requests outside the v1 API are proxied.
    pub origin: OriginConfig,
    /// The Redis that holds stock cells, reservations and the outbox streams.
    pub redis: RedisConfig,
    /// Partitioning and reservation lifetimes of the stock model.
    pub stock: StockConfig,
    /// The Kafka-protocol broker and the topic names.
    pub kafka: KafkaConfig,
    /// The PostgreSQL system of record.
    pub postgres: PostgresConfig,
    /// The gateway's in-process availability cache.
    pub cache: CacheConfig,
    /// Bounds on request sizes, batches, streams and coalescing.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// API keys, scopes and the public-reads switch.
    pub auth: AuthConfig,
    /// The ledger writer's own settings.
    #[serde(default)]
    pub ledger_writer: LedgerWriterConfig,
    /// Hot SKUs split into per-node quota buckets while a sale is on.
    #[serde(default)]
    pub flash_sales: Vec<FlashSaleConfig>,
    /// How the process writes its log.
    #[serde(default)]
    pub log: LogConfig,
    /// Partner webhooks: how deliveries are made and secrets kept.
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    /// Systems that report stock (POS, WMS): how long one may stay quiet
    /// before the locations it feeds are shown as `source_offline`.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Per-location settings of a merchant: which source feeds it and what
    /// is held back from shown availability while that source is offline.
    #[serde(default)]
    pub locations: Vec<LocationConfig>,
}

/// A system that reports a merchant's stock: the `source` of its
/// adjustments and the sender of its `heartbeat` events on
/// `kafka.events_topic`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The merchant whose stock it reports (two merchants' sources of one
    /// name are two sources).
    pub merchant: String,
    /// The `source` its events carry.
    pub name: String,
    /// Quiet longer than this (no event of any kind, heartbeat or
    /// adjustment, applied from it), it is offline: the locations it feeds
    /// show `source_offline: true` and hold back their buffer.
    pub offline_after_seconds: u64,
}

/// One location of a merchant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocationConfig {
    /// The merchant.
    pub merchant: String,
    /// The location id.
    pub location: String,
    /// The source (a `sources[].name` of the same merchant) whose reports
    /// keep this location's counts current, typically its store's POS.
    /// Absent: none is watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Units taken off each SKU's shown `available` here while its source
    /// is offline (sales it may be making that have not reached us).
    #[serde(default)]
    pub offline_buffer_units: u32,
    /// Rank among the merchant's locations when a reservation line names
    /// none: higher is chosen first (after the line's own preferences and
    /// whether a location can hold the whole line). The admin API's
    /// `PUT /v1/locations/{merchant}/{location}` overrides it.
    #[serde(default)]
    pub priority: i64,
    /// Whether a line that names no location may be held here (false: only
    /// when the line names it, in `location` or `prefer`). Overridden like
    /// `priority`.
    #[serde(default = "default_true")]
    pub ship_from: bool,
}

/// Partner webhooks (`/v1/webhooks`): the key that seals their secrets,
/// and how the ledger writer delivers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// 64 hex digits: the key (XChaCha20-Poly1305) that seals webhook
    /// secrets in PostgreSQL; the gateway seals with it, the writer opens.
    /// Empty: webhooks are off (registering one is refused). Env override:
    /// `INVGW_WEBHOOK_SECRET_KEY`.
    #[serde(default)]
    pub secret_key: String,
    /// Bound on one delivery attempt (connect, send, answer).
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts in flight to one endpoint at once (each of a different
    /// stock key: one key's deliveries go one after another).
    #[serde(default = "default_webhook_concurrency")]
    pub concurrency_per_endpoint: u32,
    /// The first retry's delay; each next one doubles, up to
    /// `retry_max_ms`, with ±50% jitter.
    #[serde(default = "default_webhook_retry_first_ms")]
    pub retry_first_ms: u64,
    /// The longest delay between two attempts.
    #[serde(default = "default_webhook_retry_max_ms")]
    pub retry_max_ms: u64,
    /// A delivery not accepted this long after its signal is dead-lettered
    /// (shown as failed, not retried).
    #[serde(default = "default_webhook_give_up_after_seconds")]
    pub give_up_after_seconds: u64,
    /// Lets webhooks target loopback, private and link-local addresses and
    /// plain `http`: for tests and development only (a partner URL that
    /// resolves there could reach this network's services otherwise).
    #[serde(default)]
    pub allow_private_targets: bool,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            secret_key: String::new(),
            timeout_ms: default_webhook_timeout_ms(),
            concurrency_per_endpoint: default_webhook_concurrency(),
            retry_first_ms: default_webhook_retry_first_ms(),
            retry_max_ms: default_webhook_retry_max_ms(),
            give_up_after_seconds: default_webhook_give_up_after_seconds(),
            allow_private_targets: false,
        }
    }
}

fn default_webhook_timeout_ms() -> u64 {
    5_000
}
fn default_webhook_concurrency() -> u32 {
    4
}
fn default_webhook_retry_first_ms() -> u64 {
    1_000
}
fn default_webhook_retry_max_ms() -> u64 {
    3_600_000
}
fn default_webhook_give_up_after_seconds() -> u64 {
    86_400
}

/// How a process writes its log lines (to stderr). Read at start: a reload
/// that changes it takes effect at the next start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (lines for a terminal) or `json` (one object a line, with
    /// the fields of every span it is in, such as a request's
    /// `request_id`: for log shippers). Env override: `INVGW_LOG_FORMAT`.
    #[serde(default)]
    pub format: LogFormat,
}

/// A log line's form; see [`LogConfig::format`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// JSON lines.
    Json,
}

/// Identity of this process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id (`[A-Za-z0-9._:-]{1,64}`); must be listed in a sale's `nodes` for
    /// this node to get a bucket. Env override: `INVGW_NODE_ID`.
    pub id: String,
    /// Gateway nodes in the fleet: each node enforces `1 / fleet_size` of an
    /// API key's `requests_per_second`.
    #[serde(default = "default_fleet_size")]
    pub fleet_size: u32,
}

/// The gateway's listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Address of the HTTP listener. Env override: `INVGW_LISTEN_HTTP`.
    pub http: SocketAddr,
    /// PEM certificate chain; with `tls_key_path`, the listener speaks TLS.
    #[serde(default)]
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key matching `tls_cert_path`.
    #[serde(default)]
    pub tls_key_path: Option<PathBuf>,
    /// Worker threads of the HTTP server (Pingora defaults to one).
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// How long shutdown waits for in-flight requests before closing them.
    #[serde(default = "default_grace_seconds")]
    pub shutdown_grace_seconds: u64,
}

/// The origin behind the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginConfig {
    /// `host:port` of each origin server; a failed connect is retried on the next.
    /// Env override: `INVGW_ORIGIN_UPSTREAMS` (comma separated).
    pub upstreams: Vec<String>,
    /// Bound on establishing a connection to one upstream.
    #[serde(default = "default_origin_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Bound on waiting for the origin's response bytes.
    #[serde(default = "default_origin_read_timeout_ms")]
    pub read_timeout_ms: u64,
}

/// Redis connection settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port[/db]`; `redis-cluster://host:port` for a cluster.
    /// Env override: `INVGW_REDIS_URL`.
    pub url: String,
    /// Bound on one command or script call, after which it counts as failed.
    #[serde(default = "default_redis_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// Bound on establishing a connection.
    #[serde(default = "default_redis_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Connections in the pool.
    #[serde(default = "default_redis_pool_size")]
    pub pool_size: usize,
}

/// The stock model's deployment constants and lifetimes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StockConfig {
    /// P in `partition = hash(stock key) mod P`. Fixed for a deployment: changing
    /// it moves every key, so a reload that changes it is refused.
    pub partitions: u32,
    /// Hold lifetime when a reservation does not ask for one.
    #[serde(default = "default_ttl_seconds")]
    pub reservation_ttl_seconds_default: u64,
    /// Longest hold a reservation or an extend may ask for.
    #[serde(default = "default_ttl_seconds_max")]
    pub reservation_ttl_seconds_max: u64,
    /// Extra life of a cart's line holds past the cart's advertised expiry, so a
    /// commit accepted just before expiry still finds its lines held.
    #[serde(default = "default_cart_line_grace_seconds")]
    pub cart_line_grace_seconds: u64,
    /// Age after which the reconciler credits a transfer that was debited only.
    #[serde(default = "default_transfer_finish_after_seconds")]
    pub transfer_finish_after_seconds: u64,
    /// Lifetime of a node's heartbeat; a lapsed one gets its buckets reclaimed.
    #[serde(default = "default_heartbeat_ttl_seconds")]
    pub node_heartbeat_ttl_seconds: u64,
    /// Entries kept in each partition's ledger stream after they are relayed.
    #[serde(default = "default_ledger_stream_entries_max")]
    pub ledger_stream_entries_max: u64,
}

/// The Kafka-protocol broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`. Env override: `INVGW_KAFKA_BROKERS`.
    pub brokers: String,
    /// Where every ledger entry is published, keyed by stock key.
    #[serde(default = "default_ledger_topic")]
    pub ledger_topic: String,
    /// Where POS, WMS and ERP feeds send adjustments.
    #[serde(default = "default_events_topic")]
    pub events_topic: String,
    /// Where malformed adjustment messages go, with their reason.
    #[serde(default = "default_dlq_topic")]
    pub dlq_topic: String,
    /// Where stock signals go (`low_stock`, `out_of_stock`, `back_in_stock`,
    /// `reorder`), keyed by stock key.
    #[serde(default = "default_signals_topic")]
    pub signals_topic: String,
    /// Partitions of each topic; ledger partition p maps onto p mod this.
    #[serde(default = "default_topic_partitions")]
    pub topic_partitions: u32,
    /// Bound on a produce or metadata request.
    #[serde(default = "default_kafka_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// The writer's producer is idempotent (`enable.idempotence`): no
    /// duplicate from its own retries, order kept with several requests in
    /// flight. `false` for a broker that mishandles an idempotent producer's
    /// epoch bump after timed-out deliveries (tansu 0.6's SQLite engine
    /// panics on it): then one request is in flight per connection, so order
    /// still holds, and a retry may duplicate an entry, which consumers drop
    /// by `entry_id` as they already must.
    #[serde(default = "default_true")]
    pub idempotent_producer: bool,
}

/// The PostgreSQL system of record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user[:password]@host:port/db`. Env override: `INVGW_POSTGRES_URL`.
    pub url: String,
    /// Server-side bound on one statement.
    #[serde(default = "default_pg_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// Bound on establishing a connection.
    #[serde(default = "default_pg_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

/// The gateway's availability cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Most stock keys held in memory; the least recently used are evicted.
    pub availability_entries_max: u64,
    /// Longest a cached availability is served without a change notification.
    pub availability_ttl_ms: u64,
    /// `Cache-Control: max-age` on availability responses, for CDNs.
    pub cache_control_max_age_seconds: u64,
    /// Availability at or under this is reported as `low` unless a key sets its own.
    #[serde(default = "default_low_stock_threshold")]
    pub low_stock_threshold_default: u64,
    /// How long a node answers 404 for an unknown stock key from memory
    /// before asking Redis again (0: never cached). A key's creation is
    /// heard at once through its change notification; this bounds the
    /// answer only when a notification was missed.
    #[serde(default = "default_not_found_ttl_ms")]
    pub not_found_ttl_ms: u64,
}

/// Bounds on everything a client can make the node hold or do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body accepted (413 above it).
    #[serde(default = "default_body_bytes_max")]
    pub body_bytes_max: usize,
    /// Most lines in one reservation (400 above it).
    #[serde(default = "default_lines_max")]
    pub reservation_lines_max: usize,
    /// Most items in one availability batch read (400 above it).
    #[serde(default = "default_batch_items_max")]
    pub availability_batch_items_max: usize,
    /// Most reservations coalesced into one `reserve_batch` script call.
    #[serde(default = "default_coalesce_batch_max")]
    pub coalesce_batch_max: usize,
    /// How long the first reservation on an idle cell lingers for others to
    /// join its batch (0: none; reservations arriving while a call runs
    /// always go together in the next one).
    #[serde(default = "default_coalesce_wait_us")]
    pub coalesce_wait_us: u64,
    /// Most concurrent SSE streams per node.
    #[serde(default = "default_sse_streams_max")]
    pub sse_streams_max: usize,
    /// How far (in change events of the whole node) one SSE stream may fall
    /// behind before it is dropped as too slow; applies from restart.
    #[serde(default = "default_sse_client_buffer_events")]
    pub sse_client_buffer_events: usize,
    /// Reservations one customer (by `customer_ref`) may create per second on
    /// one node; 0 turns the limit off.
    #[serde(default = "default_customer_reservations_per_second")]
    pub customer_reservations_per_second: u32,
    /// Anonymous reads (`auth.public_reads`: availability, batch, stream)
    /// one client address may make per second on one node, with one
    /// second of burst; 0 turns the limit off. Requests with an API key
    /// count against the key's own `requests_per_second` instead.
    #[serde(default = "default_public_reads_per_second_per_client")]
    pub public_reads_per_second_per_client: u32,
    /// Most concurrent SSE streams one client address may hold on one node.
    #[serde(default = "default_sse_streams_per_client_max")]
    pub sse_streams_per_client_max: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            body_bytes_max: default_body_bytes_max(),
            reservation_lines_max: default_lines_max(),
            availability_batch_items_max: default_batch_items_max(),
            coalesce_batch_max: default_coalesce_batch_max(),
            coalesce_wait_us: default_coalesce_wait_us(),
            sse_streams_max: default_sse_streams_max(),
            sse_client_buffer_events: default_sse_client_buffer_events(),
            customer_reservations_per_second: default_customer_reservations_per_second(),
            public_reads_per_second_per_client: default_public_reads_per_second_per_client(),
            sse_streams_per_client_max: default_sse_streams_per_client_max(),
        }
    }
}

/// Who may call the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// When true, availability reads and the stream need no API key.
    #[serde(default)]
    pub public_reads: bool,
    /// Secret for the keyed hash of `customer_ref`; never logged.
    /// Env override: `INVGW_CUSTOMER_REF_KEY`.
    pub customer_ref_key: String,
    /// The API keys, stored as SHA-256 hashes of the bearer token.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// Load balancers or CDNs in front of the gateway. A request whose TCP
    /// peer is one of them is counted against the client its
    /// `client_address_header` names (the rightmost address there that is
    /// not itself a trusted proxy); any other request, against its peer.
    #[serde(default)]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// The header a trusted proxy puts the client's address in, as a
    /// comma-separated list (`X-Forwarded-For` style).
    #[serde(default = "default_client_address_header")]
    pub client_address_header: String,
}

/// One API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Human name, used in logs and metrics instead of the key.
    pub name: String,
    /// Lower-case hex SHA-256 of the bearer token (`invgw-config hash-key`).
    pub key_sha256: String,
    /// The merchant this key acts for; `*` is the platform (every merchant).
    pub merchant: String,
    /// What the key may do.
    pub scopes: Vec<Scope>,
    /// Requests per second this key may make across the fleet; each node
    /// enforces its share. `None` is unlimited.
    #[serde(default)]
    pub requests_per_second: Option<u32>,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Availability reads.
    Read,
    /// Reservations: create, get, commit, release, extend.
    Checkout,
    /// Adjustments, settings, flash-sale status.
    Admin,
    /// Server-sent availability events.
    Stream,
}

/// The ledger writer's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerWriterConfig {
    /// Address of the writer's `/metrics` listener. Env override:
    /// `INVGW_LEDGER_METRICS_LISTEN`.
    #[serde(default = "default_ledger_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Most outbox entries relayed in one batch.
    #[serde(default = "default_relay_batch_entries_max")]
    pub relay_batch_entries_max: usize,
    /// Outbox lag, in entries, above which the writer warns.
    #[serde(default = "default_lag_alert_entries")]
    pub lag_alert_entries: u64,
    /// Lifetime of a writer's lease on a partition.
    #[serde(default = "default_lease_ttl_ms")]
    pub partition_lease_ttl_ms: u64,
    /// A bucket untouched this long is reclaimed to its pool.
    #[serde(default = "default_bucket_idle_reclaim_seconds")]
    pub bucket_idle_reclaim_seconds: u64,
    /// How often the reconciler sweeps.
    #[serde(default = "default_reconcile_interval_ms")]
    pub reconcile_interval_ms: u64,
    /// Where `ledger-writer archive` writes the ledger's days as Parquet: a
    /// local directory (a path, relative to the working directory, or
    /// `file:///abs/path`) or `s3://bucket/prefix` (credentials and endpoint
    /// from the `AWS_*` environment variables).
    #[serde(default = "default_archive_url")]
    pub archive_url: String,
    /// Days the PostgreSQL ledger keeps a day's raw entries: older days are
    /// dropped by `ledger-writer retention --apply`, once archived and
    /// verified. The seeds ask for 180.
    #[serde(default = "default_raw_retention_days")]
    pub raw_retention_days: u32,
    /// Days the curated daily history (`stock_history_daily`) is kept. The
    /// seeds ask for two years.
    #[serde(default = "default_history_retention_days")]
    pub history_retention_days: u32,
    /// Day partitions created ahead of today, at start and every hour.
    #[serde(default = "default_partitions_ahead_days")]
    pub partitions_ahead_days: u32,
}

impl Default for LedgerWriterConfig {
    fn default() -> Self {
        Self {
            metrics_listen: default_ledger_metrics_listen(),
            relay_batch_entries_max: default_relay_batch_entries_max(),
            lag_alert_entries: default_lag_alert_entries(),
            partition_lease_ttl_ms: default_lease_ttl_ms(),
            bucket_idle_reclaim_seconds: default_bucket_idle_reclaim_seconds(),
            reconcile_interval_ms: default_reconcile_interval_ms(),
            archive_url: default_archive_url(),
            raw_retention_days: default_raw_retention_days(),
            history_retention_days: default_history_retention_days(),
            partitions_ahead_days: default_partitions_ahead_days(),
        }
    }
}

/// One hot SKU in flash-sale mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlashSaleConfig {
    /// Unique name of the sale, used in logs, metrics and `/v1/flash-sales`.
    pub name: String,
    /// Merchant of the stock key.
    pub merchant: String,
    /// SKU of the stock key.
    pub sku: String,
    /// Location of the stock key.
    pub location: String,
    /// Node ids that get a bucket.
    pub nodes: Vec<String>,
    /// Master switch: ops turn a sale on and off with it.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The sale is on from this instant (RFC 3339); absent means "as soon as enabled".
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub starts_at: Option<OffsetDateTime>,
    /// The sale is off from this instant (RFC 3339); absent means "until disabled".
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub ends_at: Option<OffsetDateTime>,
    /// Fraction of the pool's sellable units split across the buckets on activation.
    #[serde(default = "default_presplit_fraction")]
    pub presplit_fraction: f64,
    /// Smallest refill a bucket takes from the pool.
    #[serde(default = "default_refill_chunk_units_min")]
    pub refill_chunk_units_min: u64,
    /// Largest refill a bucket takes from the pool.
    #[serde(default = "default_refill_chunk_units_max")]
    pub refill_chunk_units_max: u64,
    /// Reservation attempts on the key the whole fleet admits per second
    /// while the sale is active (a product-keyed throttle, one second of
    /// burst); past it 429 `rate_limited` with `Retry-After`. Absent: no
    /// throttle. Every node enforces it, with a bucket in the sale or not;
    /// editing it does not reclaim the sale's buckets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout_attempts_per_second: Option<u32>,
    /// Units one customer (by `customer_ref`, then required on the key) may
    /// hold or buy over the sale, across the whole fleet; past it 409
    /// `customer_limit`. Released and expired holds give their units back,
    /// commits do not. Absent: no limit. Editing it reclaims no bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_units_max: Option<u32>,
    /// Holds one customer may have on the key at once (hoarding), across
    /// the whole fleet; past it 409 `customer_limit`. Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_holds_max: Option<u32>,
}

impl FlashSaleConfig {
    /// Whether the sale is on at `now` (the caller's clock; stock decisions use
    /// Redis time, this only schedules activation).
    pub fn is_active_at(&self, now: OffsetDateTime) -> bool {
        self.enabled
            && self.starts_at.is_none_or(|start| now >= start)
            && self.ends_at.is_none_or(|end| now < end)
    }
}

fn default_customer_reservations_per_second() -> u32 {
    5
}
fn default_public_reads_per_second_per_client() -> u32 {
    100
}
fn default_sse_streams_per_client_max() -> usize {
    8
}
fn default_client_address_header() -> String {
    "x-forwarded-for".to_owned()
}
fn default_not_found_ttl_ms() -> u64 {
    1_000
}
fn default_fleet_size() -> u32 {
    1
}
fn default_true() -> bool {
    true
}
fn default_threads() -> usize {
    2
}
fn default_grace_seconds() -> u64 {
    5
}
fn default_origin_connect_timeout_ms() -> u64 {
    500
}
fn default_origin_read_timeout_ms() -> u64 {
    30_000
}
fn default_redis_command_timeout_ms() -> u64 {
    250
}
fn default_redis_connect_timeout_ms() -> u64 {
    1_000
}
fn default_redis_pool_size() -> usize {
    4
}
fn default_ttl_seconds() -> u64 {
    600
}
fn default_ttl_seconds_max() -> u64 {
    3_600
}
fn default_cart_line_grace_seconds() -> u64 {
    30
}
fn default_transfer_finish_after_seconds() -> u64 {
    10
}
fn default_heartbeat_ttl_seconds() -> u64 {
    5
}
fn default_ledger_stream_entries_max() -> u64 {
    100_000
}
fn default_ledger_topic() -> String {
    "inventory.ledger".to_owned()
}
fn default_events_topic() -> String {
    "inventory.events".to_owned()
}
fn default_dlq_topic() -> String {
    "inventory.events.dlq".to_owned()
}
fn default_signals_topic() -> String {
    "inventory.signals".to_owned()
}
fn default_topic_partitions() -> u32 {
    8
}
fn default_kafka_request_timeout_ms() -> u64 {
    5_000
}
fn default_pg_statement_timeout_ms() -> u64 {
    5_000
}
fn default_pg_connect_timeout_ms() -> u64 {
    2_000
}
fn default_low_stock_threshold() -> u64 {
    5
}
fn default_body_bytes_max() -> usize {
    64 * 1024
}
fn default_lines_max() -> usize {
    50
}
fn default_batch_items_max() -> usize {
    100
}
fn default_coalesce_batch_max() -> usize {
    32
}
fn default_coalesce_wait_us() -> u64 {
    0
}
fn default_sse_streams_max() -> usize {
    1_000
}
fn default_sse_client_buffer_events() -> usize {
    4096
}
fn default_ledger_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9310))
}
fn default_relay_batch_entries_max() -> usize {
    500
}
fn default_lag_alert_entries() -> u64 {
    10_000
}
fn default_lease_ttl_ms() -> u64 {
    5_000
}
fn default_bucket_idle_reclaim_seconds() -> u64 {
    300
}
fn default_archive_url() -> String {
    "archive".to_owned()
}

fn default_raw_retention_days() -> u32 {
    180
}

fn default_history_retention_days() -> u32 {
    730
}

fn default_partitions_ahead_days() -> u32 {
    7
}

fn default_reconcile_interval_ms() -> u64 {
    500
}
fn default_presplit_fraction() -> f64 {
    0.5
}
fn default_refill_chunk_units_min() -> u64 {
    5
}
fn default_refill_chunk_units_max() -> u64 {
    200
}
