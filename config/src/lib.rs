//! Typed configuration of the inventory gateway and the ledger writer.
//!
//! This crate owns reading the TOML file, applying environment overrides for
//! addresses and secrets, validating every field (errors name the field path),
//! and watching the file so running processes pick up edits (file change or
//! SIGHUP) without a restart. It does not act on a configuration: the gateway
//! and the ledger writer subscribe to [`ConfigWatcher`] and decide what a change
//! means for them (for example activating a flash sale).
//!
//! Reload rules, chosen to keep the stock invariants provable: a reload that
//! does not validate is rejected and the previous config stays in force; a
//! reload may not change `stock.partitions` (every Redis key would move),
//! `auth.customer_ref_key` (every idempotency record is keyed by it) or
//! `node.id` (the node's buckets and heartbeat are named by it). Both need a
//! restart of the whole fleet or of the node.
//!
//! Environment overrides (applied after the file, before validation):
//!
//! | variable | field |
//! |---|---|
//! | `INVGW_NODE_ID` | `node.id` |
//! | `INVGW_LISTEN_HTTP` | `listen.http` |
//! | `INVGW_ORIGIN_UPSTREAMS` | `origin.upstreams` (comma separated) |
//! | `INVGW_REDIS_URL` | `redis.url` |
//! | `INVGW_KAFKA_BROKERS` | `kafka.brokers` |
//! | `INVGW_POSTGRES_URL` | `postgres.url` |
//! | `INVGW_CUSTOMER_REF_KEY` | `auth.customer_ref_key` |
//! | `INVGW_LEDGER_METRICS_LISTEN` | `ledger_writer.metrics_listen` |
//! | `INVGW_LOG_FORMAT` | `log.format` (`text` or `json`) |
//! | `INVGW_WEBHOOK_SECRET_KEY` | `webhooks.secret_key` |

mod diff;
mod model;
mod validate;
mod watch;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use diff::changed_paths;
pub use model::*;
pub use validate::{FieldError, ID_LENGTH_MAX, LOCATION_PRIORITY_MAX, is_valid_id, validate};
pub use watch::{ConfigUpdate, ConfigWatcher};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not valid TOML for the schema (syntax, type, unknown field).
    #[error("cannot parse config {origin}: {message}")]
    Parse {
        /// The file, or `<string>` for text given directly.
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// Fields break the rules; every broken rule is listed.
    #[error("invalid config: {}", join_errors(.0))]
    Invalid(Vec<FieldError>),
    /// The new config is valid but changes a field that needs a restart.
    #[error("config reload refused: {0}")]
    ReloadRefused(FieldError),
}

fn join_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ConfigError {
    /// The broken fields, for callers that want to show them one per line.
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            ConfigError::Invalid(errors) => errors,
            ConfigError::ReloadRefused(error) => std::slice::from_ref(error),
            _ => &[],
        }
    }
}

/// Reads, overrides from the process environment, and validates a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string(), &|name| {
        std::env::var(name).ok()
    })
}

/// Parses TOML text, applies overrides from `env`, and validates.
///
/// `origin` names the text in errors; `env` looks up an override variable (tests
/// pass a closure over a map instead of touching the process environment).
pub fn parse(
    text: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
        origin: origin.to_owned(),
        message: error.to_string(),
    })?;
    let mut errors = apply_env_overrides(&mut config, env);
    if let Err(mut rule_errors) = validate(&config) {
        errors.append(&mut rule_errors);
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

fn apply_env_overrides(
    config: &mut Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut parse_addr = |variable: &str, path: &str, target: &mut std::net::SocketAddr| {
        if let Some(value) = env(variable) {
            match value.trim().parse() {
                Ok(addr) => *target = addr,
                Err(_) => errors.push(FieldError {
                    path: format!("{path} (from {variable})"),
                    reason: format!("{value:?} is not an ip:port address"),
                }),
            }
        }
    };
    parse_addr("INVGW_LISTEN_HTTP", "listen.http", &mut config.listen.http);
    parse_addr(
        "INVGW_LEDGER_METRICS_LISTEN",
        "ledger_writer.metrics_listen",
        &mut config.ledger_writer.metrics_listen,
    );
    if let Some(value) = env("INVGW_NODE_ID") {
        config.node.id = value;
    }
    if let Some(value) = env("INVGW_ORIGIN_UPSTREAMS") {
        config.origin.upstreams = value
            .split(',')
            .map(|upstream| upstream.trim().to_owned())
            .filter(|upstream| !upstream.is_empty())
            .collect();
    }
    if let Some(value) = env("INVGW_REDIS_URL") {
        config.redis.url = value;
    }
    if let Some(value) = env("INVGW_KAFKA_BROKERS") {
        config.kafka.brokers = value;
    }
    if let Some(value) = env("INVGW_POSTGRES_URL") {
        config.postgres.url = value;
    }
    if let Some(value) = env("INVGW_CUSTOMER_REF_KEY") {
        config.auth.customer_ref_key = value;
    }
    if let Some(value) = env("INVGW_WEBHOOK_SECRET_KEY") {
        config.webhooks.secret_key = value;
    }
    if let Some(value) = env("INVGW_LOG_FORMAT") {
        match value.trim() {
            "text" => config.log.format = LogFormat::Text,
            "json" => config.log.format = LogFormat::Json,
            other => errors.push(FieldError {
                path: "log.format (from INVGW_LOG_FORMAT)".to_owned(),
                reason: format!("{other:?} is neither \"text\" nor \"json\""),
            }),
        }
    }
    errors
}

/// Starts the process's log on stderr in `format`, at the levels of
/// `RUST_LOG`, else of `default_directives` (such as `"info,pingora=warn"`).
/// One home for both binaries' logging: a JSON line carries the event's
/// fields and those of the spans it is in (`request_id` on the gateway's
/// stock-changing requests).
pub fn init_logging(format: LogFormat, default_directives: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_directives));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}

/// The log format `path` asks for (env override included), or the default
/// when it cannot be read: the process reports that error itself once its
/// log is up.
pub fn log_format_of(path: &Path) -> LogFormat {
    load_file(path).map_or_else(|_| LogFormat::default(), |config| config.log.format)
}

/// Checks that `new` may replace `old` in a running process.
pub fn check_reload(old: &Config, new: &Config) -> Result<(), ConfigError> {
    if old.stock.partitions != new.stock.partitions {
        return Err(ConfigError::ReloadRefused(FieldError {
            path: "stock.partitions".to_owned(),
            reason: format!(
                "changing it from {} to {} moves every key; restart the fleet",
                old.stock.partitions, new.stock.partitions
            ),
        }));
    }
    if old.node.id != new.node.id {
        return Err(ConfigError::ReloadRefused(FieldError {
            path: "node.id".to_owned(),
            reason: "a node's buckets are named by its id; restart the node".to_owned(),
        }));
    }
    if old.auth.customer_ref_key != new.auth.customer_ref_key {
        return Err(ConfigError::ReloadRefused(FieldError {
            path: "auth.customer_ref_key".to_owned(),
            reason: "idempotency records and customer hashes are keyed by it; restart the fleet"
                .to_owned(),
        }));
    }
    Ok(())
}

/// The `key_sha256` to put in the config for a bearer token.
pub fn hash_api_key(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Config {
    /// The API key whose hash matches `token`, if any.
    pub fn api_key_for_token(&self, token: &str) -> Option<&ApiKeyConfig> {
        let hash = hash_api_key(token);
        self.auth.api_keys.iter().find(|key| key.key_sha256 == hash)
    }
}

#[cfg(test)]
mod tests {
    //! The config parser against text it was never meant to read.

    use super::*;
    use proptest::prelude::*;

    fn dev() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dev.toml")).unwrap()
    }

    proptest! {
        /// Any text gets a config or an error, never a panic.
        #[test]
        fn any_text_gets_a_verdict(text in "\\PC{0,300}") {
            let _ = parse(&text, "<fuzz>", &|_| None);
        }

        /// The dev config with one value replaced by another of any shape
        /// gets a config or an error that names where (a field or a line),
        /// never a panic.
        #[test]
        fn a_changed_value_gets_a_verdict_that_names_its_place(
            line in 0usize..400,
            value in prop_oneof![
                Just("-1"), Just("0"), Just("18446744073709551616"), Just("\"\""),
                Just("true"), Just("[]"), Just("{}"), Just("\"x y\""), Just("1.5"),
                Just("\"127.0.0.1:0\""), Just("\"redis://\""),
            ],
        ) {
            let text = dev();
            let lines: Vec<&str> = text.lines().collect();
            let assignments: Vec<usize> = (0..lines.len())
                .filter(|&index| {
                    let line = lines[index].trim_start();
                    !line.starts_with('#') && !line.starts_with('[') && line.contains(" = ")
                })
                .collect();
            let index = assignments[line % assignments.len()];
            let key = lines[index].split(" = ").next().unwrap_or_default();
            let mut changed: Vec<String> = lines.iter().map(|line| (*line).to_owned()).collect();
            changed[index] = format!("{key} = {value}");
            match parse(&changed.join("\n"), "<fuzz>", &|_| None) {
                Ok(_) => {}
                Err(error) => {
                    let message = error.to_string();
                    prop_assert!(
                        message.contains(key.trim()) || message.contains("line"),
                        "{message} names neither {key} nor a line"
                    );
                }
            }
        }
    }
}
