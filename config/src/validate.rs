//! Cross-field and range checks on a parsed configuration.
//!
//! Owns the rules a config must meet before any process uses it; every failure
//! names the field path (`flash_sales[0].nodes`) and the reason, and all failures
//! are reported at once so ops fix a file in one pass. It does not parse TOML.

use std::collections::HashSet;
use std::fmt;

use crate::model::Config;

/// One rule a field breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, as in the TOML file: `auth.api_keys[1].key_sha256`.
    pub path: String,
    /// Why the value is refused, in a short lowercase phrase.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Longest id the API accepts (`[A-Za-z0-9._:-]{1,128}`, shared/API.md).
pub const ID_LENGTH_MAX: usize = 128;

/// Most checkout attempts per second a flash sale's throttle may admit
/// (`flash_sales[].checkout_attempts_per_second`): far above what one key
/// takes, and small enough that its bucket's arithmetic stays exact.
pub const CHECKOUT_ATTEMPTS_PER_SECOND_MAX: u32 = 10_000_000;

/// Largest `flash_sales[].customer_units_max` and `customer_holds_max`
/// (a request's largest quantity).
pub const CUSTOMER_LIMIT_MAX: u32 = 1_000_000;

/// Shortest `sources[].offline_after_seconds`: well above the second a
/// writer takes to record what it applied, and clock skew between hosts.
pub const OFFLINE_AFTER_SECONDS_MIN: u64 = 10;

/// Largest `locations[].priority`, either sign (the admin API's bound too).
pub const LOCATION_PRIORITY_MAX: i64 = 1_000_000;

/// Largest `locations[].offline_buffer_units` (the largest count a POS
/// may report).
pub const OFFLINE_BUFFER_UNITS_MAX: u32 = 1_000_000_000;

/// Whether `id` is a valid API id: `[A-Za-z0-9._:-]{1,128}`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= ID_LENGTH_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn fail(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            reason: reason.into(),
        });
    }

    fn check(&mut self, ok: bool, path: impl Into<String>, reason: impl Into<String>) {
        if !ok {
            self.fail(path, reason);
        }
    }

    fn id(&mut self, path: impl Into<String>, value: &str) {
        self.check(
            is_valid_id(value),
            path,
            "must match [A-Za-z0-9._:-]{1,128}",
        );
    }

    fn range<T: PartialOrd + fmt::Display + Copy>(&mut self, path: &str, value: T, min: T, max: T) {
        self.check(
            value >= min && value <= max,
            path,
            format!("must be between {min} and {max}"),
        );
    }
}

/// Checks every rule; `Ok` or the full list of broken ones.
pub fn validate(config: &Config) -> Result<(), Vec<FieldError>> {
    let mut c = Checker { errors: Vec::new() };

    c.id("node.id", &config.node.id);
    c.range("node.fleet_size", config.node.fleet_size, 1, 10_000);
    c.check(
        config.node.id.len() <= 64,
        "node.id",
        "must be at most 64 characters",
    );

    let listen = &config.listen;
    c.check(
        listen.tls_cert_path.is_some() == listen.tls_key_path.is_some(),
        "listen.tls_key_path",
        "tls_cert_path and tls_key_path must be set together",
    );
    c.range("listen.threads", listen.threads, 1, 256);
    c.range(
        "listen.shutdown_grace_seconds",
        listen.shutdown_grace_seconds,
        0,
        300,
    );

    let origin = &config.origin;
    c.check(
        !origin.upstreams.is_empty(),
        "origin.upstreams",
        "must not be empty",
    );
    for (i, upstream) in origin.upstreams.iter().enumerate() {
        c.check(
            is_host_port(upstream),
            format!("origin.upstreams[{i}]"),
            "must be host:port",
        );
    }
    c.range(
        "origin.connect_timeout_ms",
        origin.connect_timeout_ms,
        1,
        60_000,
    );
    c.range("origin.read_timeout_ms", origin.read_timeout_ms, 1, 600_000);

    let redis = &config.redis;
    c.check(
        ["redis://", "rediss://", "redis-cluster://"]
            .iter()
            .any(|scheme| redis.url.starts_with(scheme)),
        "redis.url",
        "must start with redis://, rediss:// or redis-cluster://",
    );
    c.range(
        "redis.command_timeout_ms",
        redis.command_timeout_ms,
        1,
        60_000,
    );
    c.range(
        "redis.connect_timeout_ms",
        redis.connect_timeout_ms,
        1,
        60_000,
    );
    c.range("redis.pool_size", redis.pool_size, 1, 64);

    let stock = &config.stock;
    c.range("stock.partitions", stock.partitions, 1, 16_384);
    c.range(
        "stock.reservation_ttl_seconds_max",
        stock.reservation_ttl_seconds_max,
        1,
        7 * 24 * 3600,
    );
    c.range(
        "stock.reservation_ttl_seconds_default",
        stock.reservation_ttl_seconds_default,
        1,
        stock.reservation_ttl_seconds_max.max(1),
    );
    c.range(
        "stock.cart_line_grace_seconds",
        stock.cart_line_grace_seconds,
        1,
        3_600,
    );
    c.range(
        "stock.transfer_finish_after_seconds",
        stock.transfer_finish_after_seconds,
        1,
        3_600,
    );
    c.range(
        "stock.node_heartbeat_ttl_seconds",
        stock.node_heartbeat_ttl_seconds,
        1,
        3_600,
    );
    c.range(
        "stock.ledger_stream_entries_max",
        stock.ledger_stream_entries_max,
        1_000,
        100_000_000,
    );

    let kafka = &config.kafka;
    c.check(
        !kafka.brokers.trim().is_empty() && kafka.brokers.split(',').all(is_host_port),
        "kafka.brokers",
        "must be host:port[,host:port...]",
    );
    for (path, topic) in [
        ("kafka.ledger_topic", &kafka.ledger_topic),
        ("kafka.events_topic", &kafka.events_topic),
        ("kafka.dlq_topic", &kafka.dlq_topic),
        ("kafka.signals_topic", &kafka.signals_topic),
    ] {
        c.check(
            is_valid_topic(topic),
            path,
            "must match [A-Za-z0-9._-]{1,249}",
        );
    }
    let topics = [
        &kafka.ledger_topic,
        &kafka.events_topic,
        &kafka.dlq_topic,
        &kafka.signals_topic,
    ];
    c.check(
        topics
            .iter()
            .enumerate()
            .all(|(i, topic)| !topics[..i].contains(topic)),
        "kafka.dlq_topic",
        "ledger, events, dlq and signals topics must be different",
    );
    c.range("kafka.topic_partitions", kafka.topic_partitions, 1, 1_024);
    c.range(
        "kafka.request_timeout_ms",
        kafka.request_timeout_ms,
        1,
        300_000,
    );

    let postgres = &config.postgres;
    c.check(
        postgres.url.starts_with("postgres://") || postgres.url.starts_with("postgresql://"),
        "postgres.url",
        "must start with postgres:// or postgresql://",
    );
    c.range(
        "postgres.statement_timeout_ms",
        postgres.statement_timeout_ms,
        1,
        600_000,
    );
    c.range(
        "postgres.connect_timeout_ms",
        postgres.connect_timeout_ms,
        1,
        60_000,
    );

    let cache = &config.cache;
    c.range(
        "cache.availability_entries_max",
        cache.availability_entries_max,
        1,
        100_000_000,
    );
    c.range(
        "cache.availability_ttl_ms",
        cache.availability_ttl_ms,
        1,
        3_600_000,
    );
    c.range("cache.not_found_ttl_ms", cache.not_found_ttl_ms, 0, 60_000);
    c.range(
        "cache.cache_control_max_age_seconds",
        cache.cache_control_max_age_seconds,
        0,
        86_400,
    );

    let limits = &config.limits;
    c.range(
        "limits.body_bytes_max",
        limits.body_bytes_max,
        256,
        16 * 1024 * 1024,
    );
    // At most the allocator's CART_LINES_MAX (256): its cart records and
    // their stored answers are bounded by it.
    c.range(
        "limits.reservation_lines_max",
        limits.reservation_lines_max,
        1,
        256,
    );
    c.range(
        "limits.availability_batch_items_max",
        limits.availability_batch_items_max,
        1,
        1_000,
    );
    c.range(
        "limits.coalesce_batch_max",
        limits.coalesce_batch_max,
        1,
        256,
    );
    c.range(
        "limits.coalesce_wait_us",
        limits.coalesce_wait_us,
        0,
        100_000,
    );
    c.range(
        "limits.sse_streams_max",
        limits.sse_streams_max,
        1,
        1_000_000,
    );
    c.range(
        "limits.sse_client_buffer_events",
        limits.sse_client_buffer_events,
        1,
        100_000,
    );

    c.range(
        "limits.public_reads_per_second_per_client",
        limits.public_reads_per_second_per_client,
        0,
        100_000_000,
    );
    c.range(
        "limits.sse_streams_per_client_max",
        limits.sse_streams_per_client_max,
        1,
        1_000_000,
    );
    c.range(
        "limits.customer_reservations_per_second",
        limits.customer_reservations_per_second,
        0,
        100_000,
    );

    let auth = &config.auth;
    c.check(
        auth.customer_ref_key.len() >= 16,
        "auth.customer_ref_key",
        "must be at least 16 characters",
    );
    let mut key_names = HashSet::new();
    let mut key_hashes = HashSet::new();
    let header = &auth.client_address_header;
    c.check(
        !header.is_empty()
            && header.len() <= 64
            && header
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-'),
        "auth.client_address_header",
        "must be a header name of 1 to 64 lower-case letters, digits and '-'",
    );
    for (i, key) in auth.api_keys.iter().enumerate() {
        let path = format!("auth.api_keys[{i}]");
        c.id(format!("{path}.name"), &key.name);
        c.check(
            key_names.insert(key.name.as_str()),
            format!("{path}.name"),
            "duplicate api key name",
        );
        c.check(
            key.key_sha256.len() == 64
                && key
                    .key_sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            format!("{path}.key_sha256"),
            "must be 64 lower-case hex digits (invgw-config hash-key)",
        );
        c.check(
            key_hashes.insert(key.key_sha256.as_str()),
            format!("{path}.key_sha256"),
            "duplicate api key",
        );
        if key.merchant != "*" {
            c.id(format!("{path}.merchant"), &key.merchant);
        }
        c.check(
            !key.scopes.is_empty(),
            format!("{path}.scopes"),
            "must not be empty",
        );
        if let Some(rps) = key.requests_per_second {
            c.check(
                rps > 0,
                format!("{path}.requests_per_second"),
                "must be positive",
            );
        }
    }

    let webhooks = &config.webhooks;
    c.check(
        webhooks.secret_key.is_empty()
            || (webhooks.secret_key.len() == 64
                && webhooks.secret_key.bytes().all(|b| b.is_ascii_hexdigit())),
        "webhooks.secret_key",
        "must be empty (webhooks off) or 64 hex digits",
    );
    c.range("webhooks.timeout_ms", webhooks.timeout_ms, 100, 60_000);
    c.range(
        "webhooks.concurrency_per_endpoint",
        webhooks.concurrency_per_endpoint,
        1,
        64,
    );
    c.range(
        "webhooks.retry_first_ms",
        webhooks.retry_first_ms,
        10,
        3_600_000,
    );
    c.range(
        "webhooks.retry_max_ms",
        webhooks.retry_max_ms,
        webhooks.retry_first_ms.max(10),
        86_400_000,
    );
    c.range(
        "webhooks.give_up_after_seconds",
        webhooks.give_up_after_seconds,
        1,
        7 * 86_400,
    );

    let writer = &config.ledger_writer;
    c.range(
        "ledger_writer.relay_batch_entries_max",
        writer.relay_batch_entries_max,
        1,
        10_000,
    );
    c.range(
        "ledger_writer.partition_lease_ttl_ms",
        writer.partition_lease_ttl_ms,
        100,
        600_000,
    );
    // The cart finisher reaches a cart a quarter of the line grace after its
    // decision; a pass that comes later than another quarter could find the
    // lines past their grace. So a pass must come at least that often.
    c.range(
        "ledger_writer.reconcile_interval_ms",
        writer.reconcile_interval_ms,
        10,
        (stock.cart_line_grace_seconds * 1000 / 4).clamp(10, 600_000),
    );
    c.check(
        !writer.archive_url.trim().is_empty(),
        "ledger_writer.archive_url",
        "must not be empty",
    );
    c.range(
        "ledger_writer.raw_retention_days",
        writer.raw_retention_days,
        1,
        36_500,
    );
    c.range(
        "ledger_writer.history_retention_days",
        writer.history_retention_days,
        writer.raw_retention_days.max(1),
        36_500,
    );
    c.range(
        "ledger_writer.partitions_ahead_days",
        writer.partitions_ahead_days,
        1,
        366,
    );
    c.range(
        "ledger_writer.bucket_idle_reclaim_seconds",
        writer.bucket_idle_reclaim_seconds,
        1,
        86_400,
    );

    let mut sale_names = HashSet::new();
    let mut sale_keys = HashSet::new();
    for (i, sale) in config.flash_sales.iter().enumerate() {
        let path = format!("flash_sales[{i}]");
        c.id(format!("{path}.name"), &sale.name);
        c.check(
            sale_names.insert(sale.name.as_str()),
            format!("{path}.name"),
            "duplicate flash sale name",
        );
        c.id(format!("{path}.merchant"), &sale.merchant);
        c.id(format!("{path}.sku"), &sale.sku);
        c.id(format!("{path}.location"), &sale.location);
        c.check(
            sale_keys.insert((&sale.merchant, &sale.sku, &sale.location)),
            format!("{path}.sku"),
            "another flash sale already covers this stock key",
        );
        c.check(
            !sale.nodes.is_empty(),
            format!("{path}.nodes"),
            "must not be empty",
        );
        let mut nodes = HashSet::new();
        for (j, node) in sale.nodes.iter().enumerate() {
            c.id(format!("{path}.nodes[{j}]"), node);
            c.check(
                nodes.insert(node.as_str()),
                format!("{path}.nodes[{j}]"),
                "duplicate node",
            );
        }
        c.check(
            (0.0..=1.0).contains(&sale.presplit_fraction),
            format!("{path}.presplit_fraction"),
            "must be between 0 and 1",
        );
        c.check(
            sale.refill_chunk_units_min >= 1,
            format!("{path}.refill_chunk_units_min"),
            "must be at least 1",
        );
        c.check(
            sale.refill_chunk_units_min <= sale.refill_chunk_units_max,
            format!("{path}.refill_chunk_units_max"),
            "must not be below refill_chunk_units_min",
        );
        if let Some(per_second) = sale.checkout_attempts_per_second {
            c.range(
                &format!("{path}.checkout_attempts_per_second"),
                per_second,
                1,
                CHECKOUT_ATTEMPTS_PER_SECOND_MAX,
            );
        }
        for (field, limit) in [
            ("customer_units_max", sale.customer_units_max),
            ("customer_holds_max", sale.customer_holds_max),
        ] {
            if let Some(limit) = limit {
                c.range(&format!("{path}.{field}"), limit, 1, CUSTOMER_LIMIT_MAX);
            }
        }
        if let (Some(start), Some(end)) = (sale.starts_at, sale.ends_at) {
            c.check(
                start < end,
                format!("{path}.ends_at"),
                "must be after starts_at",
            );
        }
    }

    let mut source_names = HashSet::new();
    for (i, source) in config.sources.iter().enumerate() {
        let path = format!("sources[{i}]");
        c.id(format!("{path}.merchant"), &source.merchant);
        c.id(format!("{path}.name"), &source.name);
        c.check(
            source_names.insert((source.merchant.as_str(), source.name.as_str())),
            format!("{path}.name"),
            "this merchant has a source of this name already",
        );
        c.range(
            &format!("{path}.offline_after_seconds"),
            source.offline_after_seconds,
            OFFLINE_AFTER_SECONDS_MIN,
            86_400 * 7,
        );
    }
    let mut location_keys = HashSet::new();
    for (i, location) in config.locations.iter().enumerate() {
        let path = format!("locations[{i}]");
        c.id(format!("{path}.merchant"), &location.merchant);
        c.id(format!("{path}.location"), &location.location);
        c.check(
            location_keys.insert((&location.merchant, &location.location)),
            format!("{path}.location"),
            "this merchant's location is listed already",
        );
        if let Some(source) = &location.source {
            c.check(
                source_names.contains(&(location.merchant.as_str(), source.as_str())),
                format!("{path}.source"),
                "names no source of this merchant in sources[]",
            );
        }
        c.range(
            &format!("{path}.offline_buffer_units"),
            location.offline_buffer_units,
            0,
            OFFLINE_BUFFER_UNITS_MAX,
        );
        c.range(
            &format!("{path}.priority"),
            location.priority,
            -LOCATION_PRIORITY_MAX,
            LOCATION_PRIORITY_MAX,
        );
    }

    if c.errors.is_empty() {
        Ok(())
    } else {
        Err(c.errors)
    }
}

fn is_host_port(value: &str) -> bool {
    match value.trim().rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

fn is_valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_api_alphabet() {
        assert!(is_valid_id("sku-1.blue:XL_2"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("ü"));
        assert!(!is_valid_id(&"a".repeat(129)));
        assert!(is_valid_id(&"a".repeat(128)));
    }

    #[test]
    fn host_port_needs_both_parts() {
        assert!(is_host_port("127.0.0.1:9092"));
        assert!(is_host_port("origin.internal:80"));
        assert!(!is_host_port("127.0.0.1"));
        assert!(!is_host_port(":80"));
        assert!(!is_host_port("host:0"));
        assert!(!is_host_port("host:99999"));
    }
}
