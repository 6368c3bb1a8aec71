//! The gateway node: a Pingora HTTP service that answers `/v1/*`, `/health`,
//! `/ready` and `/metrics` locally and proxies every other path to the origin.
//!
//! It owns routing, authentication, rate limits, request validation, the
//! availability cache, server-sent events, flash-sale activation from config,
//! and the mapping of `allocator` errors to the HTTP error codes of
//! shared/API.md (in one place: [`api::ApiError`]). It owns no stock
//! decision: where a hold lands, coalescing, the hot path and each request's
//! idempotency record are the allocator's (`allocator::Reserver`), and every
//! stock change goes through it.
//!
//! Runtime layout: Pingora runs the HTTP service on its own runtime; one more
//! tokio runtime (`io`) owns the Redis connections and the background tasks
//! (config reload, change notifications, heartbeats, flash-sale activation).
//! Handlers call the allocator from Pingora's runtime; fred's connections
//! live on `io` and are reached through channels.
//!
//! Choices the API left open, written down here:
//! * Reservations addressed by id (get, commit, release, extend) answer 404
//!   for another merchant's reservation, so ids cannot be probed; routes
//!   naming a merchant (availability, create, adjustments, settings) answer
//!   403 when the key belongs to another merchant.
//! * Too many SSE streams on a node is 429 `rate_limited` with Retry-After.
//! * A node listens before Redis answers: while it waits (Redis not up,
//!   or still loading its dataset) it logs each try's cause, `/health` is
//!   200, `/ready` 503 naming what it waits for, and every other path 503
//!   `store_unavailable` with Retry-After (the origin's too: a node that is
//!   not ready takes no traffic). A config that does not validate stops it
//!   at once.
//! * `/ready` on a Redis Cluster with some (not all) masters not answering
//!   is 200 with status `degraded`, naming them: the node serves every key
//!   on the others, and 503s only theirs.
//! * A flash sale's activation epoch is a hash of its configuration, the same
//!   on every node: activation is idempotent per epoch, and editing the sale
//!   starts a new one.
//! * Rate limits are token buckets (GCRA, the `governor` crate) per API
//!   key, each node enforcing `requests_per_second / node.fleet_size`; an
//!   anonymous read (`public_reads`) counts against its client address
//!   instead (`limits.public_reads_per_second_per_client`, per node), and
//!   an anonymous batch costs one read per item. The client is the TCP
//!   peer (the gateway is the edge), or behind a configured trusted proxy
//!   the address that proxy forwards; an IPv6 client is its /64.
//! * SSE streams are capped per node and per client address; a refused
//!   stream is 429 with Retry-After.
//! * A path with one trailing slash is the same route as without it; a
//!   known path with another method is 405 with `Allow`.

pub mod api;
pub mod app;
mod auth;
pub mod availability;
mod flash;
mod metrics;
mod proxy;
mod routes;
pub mod sources;
mod sse;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignalWatch};

pub use app::{App, Node};

/// Runs a gateway node with the config at `config_path` until `shutdown`
/// fires (SIGTERM/SIGINT/SIGQUIT with [`unix_shutdown`]). Blocks the calling
/// thread; in-flight requests drain for `listen.shutdown_grace_seconds`.
pub fn run(config_path: &Path, shutdown: Box<dyn ShutdownSignalWatch>) -> anyhow::Result<()> {
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gateway-io")
        .enable_all()
        .build()
        .context("starting the io runtime")?;
    // A config that does not load or validate stops the start at once:
    // waiting would not change it. Redis is waited for while the node
    // listens (`app::Node`).
    let watcher = {
        let _entered = io.enter();
        config::ConfigWatcher::start(config_path)
            .with_context(|| format!("loading the config {}", config_path.display()))?
    };
    let config = watcher.current();
    allocator::limits::check_config(&config)
        .map_err(|reason| anyhow::anyhow!(reason))
        .with_context(|| format!("checking the config {}", config_path.display()))?;
    let node = Arc::new(app::Node::starting(&config.node.id));
    let starting = io.spawn(Arc::clone(&node).start(watcher));
    // A start that panics must end the process, not leave a node that says
    // "waiting" for ever.
    io.spawn(async move {
        if let Err(error) = starting.await
            && error.is_panic()
        {
            tracing::error!("the gateway's start panicked");
            std::process::exit(1);
        }
    });

    let mut server_conf = ServerConf {
        threads: config.listen.threads,
        grace_period_seconds: Some(config.listen.shutdown_grace_seconds),
        graceful_shutdown_timeout_seconds: Some(config.listen.shutdown_grace_seconds),
        ..ServerConf::default()
    };
    server_conf.work_stealing = true;
    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        proxy::Gateway::new(Arc::clone(&node)),
        "inventory gateway",
    );
    let address = config.listen.http.to_string();
    match (&config.listen.tls_cert_path, &config.listen.tls_key_path) {
        (Some(cert), Some(key)) => service
            .add_tls(&address, &cert.to_string_lossy(), &key.to_string_lossy())
            .context("loading the TLS certificate and key")?,
        _ => service.add_tcp(&address),
    }
    server.add_service(service);
    tracing::info!(node = %config.node.id, %address, "gateway listening");
    server.run(RunArgs {
        shutdown_signal: shutdown,
    });
    if let Some(app) = node.app() {
        app.stop();
    }
    drop(io);
    Ok(())
}

/// The standard shutdown signals: SIGTERM drains gracefully, SIGINT fast.
pub fn unix_shutdown() -> Box<dyn ShutdownSignalWatch> {
    Box::new(pingora::server::UnixShutdownSignalWatch)
}
