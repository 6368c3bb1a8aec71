//! Test harness shared by every crate's integration tests: where the real
//! services are.
//!
//! Owns finding the stack: when the `INVGW_REDIS_URL`, `INVGW_POSTGRES_URL` and
//! `INVGW_KAFKA_BROKERS` variables are set (as `scripts/test` does with
//! `scripts/stack env`), those are used; otherwise `scripts/stack up` is run once
//! per test process and its settings are read. It does not create test data:
//! each test isolates itself (its own ids, database schema or topic).

pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Connection settings of the running stack.
#[derive(Debug, Clone)]
pub struct Stack {
    /// `redis://127.0.0.1:PORT`.
    pub redis_url: String,
    /// `postgres://postgres@127.0.0.1:PORT/inventory`.
    pub postgres_url: String,
    /// `127.0.0.1:PORT` of the Kafka-protocol broker.
    pub kafka_brokers: String,
}

/// The repository root (where `scripts/` lives).
pub fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits one level below the root")
        .to_owned()
}

/// The running stack, started on first use if the environment does not name one.
///
/// Panics with the script's output if the stack cannot be started: a test that
/// needs the real services cannot do anything useful without them.
pub fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let from_env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        if let (Some(redis_url), Some(postgres_url), Some(kafka_brokers)) = (
            from_env("INVGW_REDIS_URL"),
            from_env("INVGW_POSTGRES_URL"),
            from_env("INVGW_KAFKA_BROKERS"),
        ) {
            return Stack {
                redis_url,
                postgres_url,
                kafka_brokers,
            };
        }
        let script = repository_root().join("scripts/stack");
        let output = Command::new(&script)
            .arg("up")
            .output()
            .unwrap_or_else(|error| panic!("cannot run {}: {error}", script.display()));
        assert!(
            output.status.success(),
            "scripts/stack up failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        parse_exports(&String::from_utf8_lossy(&output.stdout))
    })
}

fn parse_exports(text: &str) -> Stack {
    let value = |name: &str| {
        text.lines()
            .filter_map(|line| line.strip_prefix("export "))
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("scripts/stack printed no {name}"))
            .to_owned()
    };
    Stack {
        redis_url: value("INVGW_REDIS_URL"),
        postgres_url: value("INVGW_POSTGRES_URL"),
        kafka_brokers: value("INVGW_KAFKA_BROKERS"),
    }
}

/// An id no other test (in this run or an earlier one) has used: a prefix for
/// merchants, SKUs, schemas or topics so tests never see each other's data.
pub fn unique_id(label: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or_default();
    format!(
        "{label}-{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// First of the ports [`free_port`] hands out.
const TEST_PORTS_FIRST: u16 = 20_000;
/// How many: up to 31,999, below Linux's default ephemeral range
/// (32768–60999) and above the stack's and the bench's fixed ports.
const TEST_PORTS: u16 = 12_000;

/// A loopback TCP port nothing listens on right now, from below the
/// kernel's ephemeral range. A port from that range (what binding port 0
/// gives) can be taken by any outgoing connection between the moment it is
/// chosen and the moment a test's server binds it, or while a killed server
/// is down before its restart on the same port: a cluster test once failed
/// with "port … did not open" that way. The kernel never picks a port below
/// the range for a connection, so one found free here stays free for the
/// test. Ports are tried in turn from a start that differs per process.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = u64::from(std::process::id()).wrapping_mul(7_919);
    for _ in 0..TEST_PORTS {
        let offset =
            start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % u64::from(TEST_PORTS);
        let port = TEST_PORTS_FIRST + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free loopback port in {TEST_PORTS_FIRST}..{}",
        TEST_PORTS_FIRST + TEST_PORTS
    )
}

/// Waits (up to 10 s) until something listens on `port`.
pub fn wait_for_port(port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "port {port} did not open"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Redis of one test's own on `port` (so the test may stop it without
/// disturbing others), with its data in `directory` (append-only, so a
/// restart on the same directory keeps it) or nowhere. Killed when dropped.
/// `redis-server` comes from `scripts/stack`'s install.
pub fn private_redis(port: u16, directory: Option<&Path>) -> KillOnDrop {
    stack();
    let mut command = Command::new("redis-server");
    command.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ]);
    match directory {
        Some(directory) => {
            command
                .args(["--appendonly", "yes", "--dir"])
                .arg(directory);
        }
        None => {
            command.args(["--appendonly", "no"]);
        }
    }
    let child = command
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server is installed by scripts/stack");
    wait_for_port(port);
    KillOnDrop(child)
}

/// A Redis on `port` that is still loading its dataset (answering every
/// command with `-LOADING`) for about `loading` after it opens its port,
/// as one restarted with a large dump does; then it serves an empty
/// database (the dump's filler keys are in database 9, out of the way).
/// Its files live in `directory`. Killed when dropped.
pub fn loading_redis(port: u16, directory: &Path, loading: std::time::Duration) -> KillOnDrop {
    stack();
    /// Keys in the dump, and the pause per key that spreads their load over
    /// `loading` (`key-load-delay`, microseconds: a test setting of Redis).
    const KEYS: u128 = 100_000;
    let delay_us = (loading.as_micros() / KEYS).max(1);
    let filler_port = free_port();
    let filler = KillOnDrop(
        Command::new("redis-server")
            .args(["--port", &filler_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "yes", "--dir"])
            .arg(directory)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed by scripts/stack"),
    );
    wait_for_port(filler_port);
    let cli = |commands: &[&str]| {
        let output = Command::new("redis-cli")
            .args(["-p", &filler_port.to_string()])
            .args(commands)
            .output()
            .expect("redis-cli is installed by scripts/stack");
        assert!(
            output.status.success() && !String::from_utf8_lossy(&output.stdout).contains("ERR"),
            "redis-cli {commands:?}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    };
    cli(&["-n", "9", "debug", "populate", &KEYS.to_string(), "filler"]);
    cli(&["save"]);
    drop(filler);
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        // Answer clients between every few keys, as a loading Redis does
        // between chunks of a large file (the default, 2 MB, is most of
        // this small dump).
        .args(["--loading-process-events-interval-bytes", "1024"])
        .args(["--key-load-delay", &delay_us.to_string(), "--dir"])
        .arg(directory)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server is installed by scripts/stack");
    wait_for_port(port);
    KillOnDrop(child)
}

/// Lints a Prometheus text exposition with `promtool check metrics` (from
/// Debian's `prometheus`, which `scripts/stack` installs): `Err` with what
/// promtool found (naming, units, help, types), or why it could not run.
pub fn promtool_check_metrics(exposition: &str) -> Result<(), String> {
    use std::io::Write;
    use std::process::Stdio;
    stack();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| {
            format!("running promtool (Debian's prometheus; scripts/stack up installs it): {error}")
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(exposition.as_bytes())
        .map_err(|error| format!("writing to promtool: {error}"))?;
    let output = child
        .wait_with_output()
        .map_err(|error| format!("waiting for promtool: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The series the alert rules (`ops/prometheus/alerts.yml`) name that start
/// with `prefix`, each once: what a process's `/metrics` must have for its
/// alerts to mean anything.
pub fn alert_rule_series(prefix: &str) -> Vec<String> {
    let path = repository_root().join("ops/prometheus/alerts.yml");
    let rules = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    let mut names: Vec<String> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Panics unless `exposition` (a process's `/metrics`) passes `promtool
/// check metrics` and serves the process's own series, every series the
/// alert rules name that starts with `prefix` but not with `except`, and
/// each of `also`.
pub fn assert_metrics_serve_the_alerts(
    exposition: &str,
    prefix: &str,
    except: Option<&str>,
    also: &[&str],
) {
    if let Err(findings) = promtool_check_metrics(exposition) {
        panic!("{findings}\n{exposition}");
    }
    let named: Vec<String> = alert_rule_series(prefix)
        .into_iter()
        .filter(|series| except.is_none_or(|except| !series.starts_with(except)))
        .collect();
    assert!(!named.is_empty(), "the alert rules use {prefix} series");
    let process = [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ];
    for series in named
        .iter()
        .map(String::as_str)
        .chain(process)
        .chain(also.iter().copied())
    {
        assert!(exposes(exposition, series), "{series} in {exposition}");
    }
}

/// Whether a text exposition has a sample of `series` (any labels).
pub fn exposes(exposition: &str, series: &str) -> bool {
    exposition.lines().any(|line| {
        line.strip_prefix(series)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_are_read_from_the_stack_script_output() {
        let stack = parse_exports(
            "export INVGW_REDIS_URL=redis://127.0.0.1:1\n\
             export INVGW_POSTGRES_URL=postgres://postgres@127.0.0.1:2/inventory\n\
             export INVGW_KAFKA_BROKERS=127.0.0.1:3\n",
        );
        assert_eq!(stack.redis_url, "redis://127.0.0.1:1");
        assert_eq!(
            stack.postgres_url,
            "postgres://postgres@127.0.0.1:2/inventory"
        );
        assert_eq!(stack.kafka_brokers, "127.0.0.1:3");
    }

    #[test]
    fn unique_ids_differ() {
        assert_ne!(unique_id("t"), unique_id("t"));
    }

    #[test]
    fn free_ports_are_below_the_ephemeral_range_and_not_handed_out_twice() {
        let ports: std::collections::HashSet<u16> = (0..200).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 200, "handed out twice");
        for port in ports {
            assert!(
                (TEST_PORTS_FIRST..TEST_PORTS_FIRST + TEST_PORTS).contains(&port),
                "{port}"
            );
        }
    }
}
