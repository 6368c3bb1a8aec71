//! Behaviour of loading, validating and hot-reloading the configuration.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{ConfigError, ConfigWatcher, Scope, changed_paths, parse};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn example_text(name: &str) -> String {
    std::fs::read_to_string(example(name)).expect("example config is readable")
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse_text(text: &str) -> Result<config::Config, ConfigError> {
    parse(text, "test.toml", &no_env)
}

fn field_messages(error: &ConfigError) -> Vec<String> {
    error
        .field_errors()
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn both_example_configs_load_and_validate() {
    let dev = parse_text(&example_text("dev.toml")).expect("dev.toml is valid");
    assert_eq!(dev.node.id, "node-a");
    assert!(dev.flash_sales.is_empty());
    assert_eq!(dev.auth.api_keys.len(), 5);

    let fleet = parse_text(&example_text("flash-sale-3node.toml")).expect("3-node config is valid");
    assert_eq!(fleet.flash_sales.len(), 2);
    let sale = &fleet.flash_sales[0];
    assert_eq!(sale.nodes, ["node-a", "node-b", "node-c"]);
    let before = time::macros::datetime!(2026-11-27 07:59 UTC);
    let during = time::macros::datetime!(2026-11-27 12:00 UTC);
    let after = time::macros::datetime!(2026-11-27 20:00 UTC);
    assert!(!sale.is_active_at(before));
    assert!(sale.is_active_at(during));
    assert!(!sale.is_active_at(after), "ends_at is exclusive");
    assert!(
        !fleet.flash_sales[1].is_active_at(during),
        "disabled sale is off"
    );
}

#[test]
fn a_flash_sale_without_nodes_is_rejected_with_its_field_path() {
    let text = example_text("flash-sale-3node.toml").replacen(
        r#"nodes = ["node-a", "node-b", "node-c"]"#,
        "nodes = []",
        1,
    );
    let error = parse_text(&text).expect_err("empty nodes must be refused");
    assert!(matches!(error, ConfigError::Invalid(_)));
    assert_eq!(
        field_messages(&error),
        ["flash_sales[0].nodes: must not be empty"]
    );
}

#[test]
fn a_flash_sale_throttle_of_zero_is_rejected_and_a_sane_one_parses() {
    let with = |per_second: &str| {
        example_text("flash-sale-3node.toml").replacen(
            r#"nodes = ["node-a", "node-b", "node-c"]"#,
            &format!(
                "nodes = [\"node-a\", \"node-b\", \"node-c\"]\ncheckout_attempts_per_second = {per_second}"
            ),
            1,
        )
    };
    let error = parse_text(&with("0")).expect_err("a throttle of 0 must be refused");
    assert_eq!(
        field_messages(&error),
        ["flash_sales[0].checkout_attempts_per_second: must be between 1 and 10000000"]
    );
    let config = parse_text(&with("2500")).expect("a throttle of 2,500 a second");
    assert_eq!(
        config.flash_sales[0].checkout_attempts_per_second,
        Some(2_500)
    );
}

#[test]
fn flash_sale_customer_limits_of_zero_are_rejected_and_sane_ones_parse() {
    let with = |units: &str, holds: &str| {
        example_text("flash-sale-3node.toml").replacen(
            r#"nodes = ["node-a", "node-b", "node-c"]"#,
            &format!(
                "nodes = [\"node-a\", \"node-b\", \"node-c\"]\ncustomer_units_max = {units}\ncustomer_holds_max = {holds}"
            ),
            1,
        )
    };
    let error = parse_text(&with("0", "2000000")).expect_err("limits out of range");
    assert_eq!(
        field_messages(&error),
        [
            "flash_sales[0].customer_units_max: must be between 1 and 1000000",
            "flash_sales[0].customer_holds_max: must be between 1 and 1000000",
        ]
    );
    let config = parse_text(&with("2", "1")).expect("two units, one hold at a time");
    assert_eq!(
        (
            config.flash_sales[0].customer_units_max,
            config.flash_sales[0].customer_holds_max
        ),
        (Some(2), Some(1))
    );
}

#[test]
fn sources_and_locations_are_checked_and_name_each_other() {
    let text = |extra: &str| example_text("dev.toml") + extra;
    let error = parse_text(&text(
        "\n[[sources]]\nmerchant = \"m1\"\nname = \"pos\"\noffline_after_seconds = 1\n\
         \n[[sources]]\nmerchant = \"m1\"\nname = \"pos\"\noffline_after_seconds = 60\n\
         \n[[sources]]\nmerchant = \"m2\"\nname = \"pos\"\noffline_after_seconds = 60\n\
         \n[[locations]]\nmerchant = \"m1\"\nlocation = \"s1\"\nsource = \"nobody\"\n\
         \n[[locations]]\nmerchant = \"m1\"\nlocation = \"s1\"\n\
         \n[[locations]]\nmerchant = \"m3\"\nlocation = \"s1\"\nsource = \"pos\"\n",
    ))
    .expect_err("refused");
    assert_eq!(
        field_messages(&error),
        [
            "sources[0].offline_after_seconds: must be between 10 and 604800",
            "sources[1].name: this merchant has a source of this name already",
            "locations[0].source: names no source of this merchant in sources[]",
            "locations[1].location: this merchant's location is listed already",
            "locations[2].source: names no source of this merchant in sources[]",
        ]
    );
    let config = parse_text(&text(
        "\n[[sources]]\nmerchant = \"m1\"\nname = \"pos-12\"\noffline_after_seconds = 120\n\
         \n[[locations]]\nmerchant = \"m1\"\nlocation = \"store-12\"\nsource = \"pos-12\"\noffline_buffer_units = 2\n",
    ))
    .expect("a POS feeding one store");
    assert_eq!(
        (
            config.sources[0].offline_after_seconds,
            config.locations[0].source.as_deref(),
            config.locations[0].offline_buffer_units
        ),
        (120, Some("pos-12"), 2)
    );
}

#[test]
fn every_broken_field_is_reported_at_once() {
    let text = example_text("dev.toml")
        .replace("partitions = 64", "partitions = 0")
        .replace(
            r#"upstreams = ["127.0.0.1:8090"]"#,
            r#"upstreams = ["no-port"]"#,
        )
        .replace("reservation_lines_max = 50", "reservation_lines_max = 0");
    let error = parse_text(&text).expect_err("three broken fields");
    let messages = field_messages(&error);
    assert!(
        messages.contains(&"stock.partitions: must be between 1 and 16384".to_owned()),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"origin.upstreams[0]: must be host:port".to_owned()),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"limits.reservation_lines_max: must be between 1 and 256".to_owned()),
        "{messages:?}"
    );
    assert_eq!(messages.len(), 3, "{messages:?}");
}

#[test]
fn an_unknown_field_is_a_parse_error_naming_it() {
    let text = example_text("dev.toml").replace("[redis]\n", "[redis]\ncomand_timeout_ms = 3\n");
    let error = parse_text(&text).expect_err("misspelt key");
    let message = error.to_string();
    assert!(matches!(error, ConfigError::Parse { .. }), "{message}");
    assert!(message.contains("comand_timeout_ms"), "{message}");
}

#[test]
fn api_keys_must_be_hashes_and_unique() {
    let text = example_text("dev.toml").replacen(
        "bb22af3bbb7413af1d7c8f58b0a8c03350ab86a93e30cb92eb5021f477294ace",
        "dev-read-key",
        1,
    );
    let error = parse_text(&text).expect_err("clear-text key");
    assert_eq!(
        field_messages(&error),
        ["auth.api_keys[0].key_sha256: must be 64 lower-case hex digits (invgw-config hash-key)"]
    );
}

#[test]
fn environment_overrides_addresses_and_secrets() {
    let env: HashMap<&str, &str> = HashMap::from([
        ("INVGW_NODE_ID", "node-b"),
        ("INVGW_LISTEN_HTTP", "127.0.0.1:18081"),
        ("INVGW_REDIS_URL", "redis://127.0.0.1:7000"),
        ("INVGW_POSTGRES_URL", "postgres://app@127.0.0.1:7001/inv"),
        ("INVGW_KAFKA_BROKERS", "127.0.0.1:7002"),
        ("INVGW_ORIGIN_UPSTREAMS", "127.0.0.1:7003, 127.0.0.1:7004"),
        ("INVGW_CUSTOMER_REF_KEY", "a-production-secret-of-length"),
    ]);
    let lookup = |name: &str| env.get(name).map(|value| (*value).to_owned());
    let config = parse(&example_text("dev.toml"), "dev.toml", &lookup).expect("valid");
    assert_eq!(config.node.id, "node-b");
    assert_eq!(config.listen.http.port(), 18081);
    assert_eq!(config.redis.url, "redis://127.0.0.1:7000");
    assert_eq!(config.postgres.url, "postgres://app@127.0.0.1:7001/inv");
    assert_eq!(config.kafka.brokers, "127.0.0.1:7002");
    assert_eq!(
        config.origin.upstreams,
        ["127.0.0.1:7003", "127.0.0.1:7004"]
    );
    assert_eq!(
        config.auth.customer_ref_key,
        "a-production-secret-of-length"
    );
}

#[test]
fn a_bad_environment_override_names_its_variable() {
    let lookup = |name: &str| (name == "INVGW_LISTEN_HTTP").then(|| "localhost".to_owned());
    let error = parse(&example_text("dev.toml"), "dev.toml", &lookup).expect_err("not an address");
    assert_eq!(
        field_messages(&error),
        [r#"listen.http (from INVGW_LISTEN_HTTP): "localhost" is not an ip:port address"#]
    );
}

#[test]
fn api_keys_are_found_by_the_hash_of_the_token() {
    let config = parse_text(&example_text("dev.toml")).expect("valid");
    let key = config
        .api_key_for_token("dev-checkout-key")
        .expect("known token");
    assert_eq!(key.name, "checkout-m1");
    assert_eq!(key.merchant, "m1");
    assert!(key.scopes.contains(&Scope::Checkout));
    assert!(config.api_key_for_token("dev-checkout-key ").is_none());
    assert!(config.api_key_for_token("").is_none());
}

#[test]
fn changes_are_reported_as_paths_with_sales_matched_by_name() {
    let old = parse_text(&example_text("flash-sale-3node.toml")).expect("valid");
    let mut new = old.clone();
    new.flash_sales.reverse();
    assert!(
        changed_paths(&old, &new).is_empty(),
        "reordering is not a change"
    );

    new.flash_sales[0].enabled = true;
    new.cache.availability_ttl_ms = 500;
    new.flash_sales.retain(|sale| sale.name != "console-drop");
    assert_eq!(
        changed_paths(&old, &new),
        [
            "cache.availability_ttl_ms",
            "flash_sales[console-drop]",
            "flash_sales[sneaker-drop].enabled"
        ]
    );
}

async fn wait_for_generation(
    updates: &mut tokio::sync::watch::Receiver<std::sync::Arc<config::ConfigUpdate>>,
    generation: u64,
) -> std::sync::Arc<config::ConfigUpdate> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let current = updates.borrow_and_update().clone();
            if current.generation >= generation {
                return current;
            }
            updates.changed().await.expect("watcher alive");
        }
    })
    .await
    .expect("reload within 10 s")
}

fn write_config(path: &Path, text: &str) {
    // Write then rename, as editors do, so the watcher never reads half a file.
    let staging = path.with_extension("tmp");
    std::fs::write(&staging, text).expect("write staging file");
    std::fs::rename(&staging, path).expect("rename over config");
}

#[tokio::test]
async fn an_edit_is_applied_and_a_broken_edit_keeps_the_old_config() {
    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("gateway.toml");
    let original = example_text("flash-sale-3node.toml");
    write_config(&path, &original);

    let watcher = ConfigWatcher::start(&path).expect("valid at start");
    let mut updates = watcher.subscribe();
    assert_eq!(updates.borrow().generation, 1);

    // Ops turn the second sale on: the file change alone reloads it.
    let turned_on = original.replacen("enabled = false", "enabled = true", 1);
    write_config(&path, &turned_on);
    let update = wait_for_generation(&mut updates, 2).await;
    assert_eq!(update.changed, ["flash_sales[sneaker-drop].enabled"]);
    assert!(update.touches("flash_sales"));
    assert!(update.config.flash_sales[1].enabled);

    // A broken edit is refused with its reason; generation 2 stays in force.
    let broken = turned_on.replacen("presplit_fraction = 0.5", "presplit_fraction = 1.5", 1);
    write_config(&path, &broken);
    let error = watcher.reload().await.expect_err("invalid edit refused");
    assert_eq!(
        error.field_errors()[0].to_string(),
        "flash_sales[1].presplit_fraction: must be between 0 and 1"
    );
    assert!(watcher.rejected_reloads() >= 1);
    assert_eq!(watcher.current().flash_sales[1].presplit_fraction, 0.5);
    assert_eq!(updates.borrow().generation, 2);

    // Changing the partition count would move every key: refused on reload.
    write_config(
        &path,
        &turned_on.replacen("partitions = 64", "partitions = 32", 1),
    );
    let error = watcher.reload().await.expect_err("partitions fixed");
    assert!(matches!(*error, ConfigError::ReloadRefused(_)), "{error}");
    assert_eq!(watcher.current().stock.partitions, 64);

    // Fixing the file is picked up again.
    write_config(&path, &original);
    let update = wait_for_generation(&mut updates, 3).await;
    assert!(!update.config.flash_sales[1].enabled);
}

#[tokio::test]
async fn sighup_reloads_the_file() {
    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("gateway.toml");
    let original = example_text("dev.toml");
    std::fs::write(&path, &original).expect("write");
    let watcher = ConfigWatcher::start(&path).expect("valid");
    let mut updates = watcher.subscribe();

    // Change the file behind the watcher's back, then signal, as ops would.
    let edited = original.replace("availability_ttl_ms = 2000", "availability_ttl_ms = 750");
    std::fs::write(&path, edited).expect("write");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let update = wait_for_generation(&mut updates, 2).await;
    assert_eq!(update.config.cache.availability_ttl_ms, 750);
    assert_eq!(update.changed, ["cache.availability_ttl_ms"]);
}

#[test]
fn a_missing_file_says_which_file() {
    let error = config::load_file(Path::new("/nonexistent/gateway.toml")).expect_err("missing");
    assert!(
        error.to_string().contains("/nonexistent/gateway.toml"),
        "{error}"
    );
}
