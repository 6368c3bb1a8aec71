//! The node's shared state and its background tasks.
//!
//! Owns what every request handler reads: the config in force (swapped
//! atomically on reload), the allocator, the availability cache, the change
//! fan-out for SSE, rate limiters, flash-sale state and metrics. Background
//! tasks on the io runtime keep them current: the config watcher, the Redis
//! change subscriber (cache invalidation and SSE), heartbeats and flash-sale
//! activation. It does not serve HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use allocator::{Allocator, AllocatorSettings, Change, ChangeEvent};
use anyhow::Context;
use arc_swap::ArcSwap;
use config::{Config, ConfigWatcher};
use http::HeaderValue;
use tokio::sync::{Notify, broadcast};
use tracing::{info, warn};

use crate::auth::RateLimiter;
use crate::availability::{AvailabilityCache, CacheCounters};
use crate::flash::{FlashSales, SaleGauges};
use crate::metrics::Metrics;

/// Depth of fred's pub/sub channel: a burst of notifications (lazy expiry
/// releasing many holds) must not outrun the subscriber.
const NOTIFICATIONS_CAPACITY: usize = 4096;

/// A node from the moment it listens: starting, with what it waits for,
/// until its [`App`] is up. While it starts, `/health` answers 200, `/ready`
/// 503 with the reason, and every other path 503 `store_unavailable`.
pub struct Node {
    /// The node's id (for `/health` before the app is up).
    pub id: String,
    app: std::sync::OnceLock<Arc<App>>,
    /// Why it is not up yet.
    waiting: std::sync::Mutex<String>,
}

impl Node {
    /// A node that has not connected to anything yet.
    pub fn starting(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            app: std::sync::OnceLock::new(),
            waiting: std::sync::Mutex::new("starting: connecting to Redis".to_owned()),
        }
    }

    /// The node's state, once it is up.
    pub fn app(&self) -> Option<&Arc<App>> {
        self.app.get()
    }

    /// Why the node is not up yet.
    pub fn waiting_for(&self) -> String {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Starts the app with `watcher`'s config, retrying Redis until it
    /// answers (logging each try's cause and showing it on `/ready`); a
    /// start that fails for another reason is logged and ends the process
    /// (it cannot serve, and a supervisor must see it).
    pub async fn start(self: Arc<Self>, watcher: ConfigWatcher) {
        let started = App::start(watcher, |reason| {
            warn!(dependency = "Redis", %reason, "waiting for a dependency to answer");
            *self
                .waiting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                format!("waiting for Redis: {reason}");
        })
        .await;
        match started {
            Ok(app) => {
                info!(node = %self.id, "gateway ready: Redis answers");
                let _ = self.app.set(app);
            }
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "the gateway cannot start");
                std::process::exit(1);
            }
        }
    }
}

/// Everything a request handler needs.
pub struct App {
    /// The config in force; replaced whole on an accepted reload.
    config: ArcSwap<Config>,
    /// Keeps the config file watched; dropping it stops reloads.
    watcher: ConfigWatcher,
    /// Origin upstreams resolved to addresses, per config generation.
    origins: ArcSwap<Vec<SocketAddr>>,
    /// The stock engine.
    pub allocator: Allocator,
    /// The edge cache of availability.
    pub cache: AvailabilityCache,
    /// Change notifications for SSE streams.
    pub changes: broadcast::Sender<Change>,
    /// Bumped whenever notifications may have been missed: SSE streams
    /// read all their SKUs again.
    resync: tokio::sync::watch::Sender<u64>,
    /// Rate limits: per API key, per customer, per client address.
    pub limiter: RateLimiter,
    /// Open SSE streams per client address (`limits.sse_streams_per_client_max`).
    pub streams_by_client: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// `Cache-Control` of availability answers, rendered once per config.
    cache_control: ArcSwap<HeaderValue>,
    /// The OpenAPI document with this config's bounds, rendered once per
    /// config.
    openapi: ArcSwap<bytes::Bytes>,
    /// Reservation requests: placement, coalescing, the hot path and each
    /// request's one idempotency record (the allocator's).
    pub reserver: Arc<allocator::Reserver>,
    /// Flash sales in force on this node.
    pub flash: FlashSales,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Whether the change subscription is live (the cache hears changes;
    /// it holds this flag too).
    subscribed: Arc<AtomicBool>,
    /// Set when the node stops; background tasks end.
    stopping: AtomicBool,
    /// Wakes background tasks on stop.
    stop: Notify,
    /// Which locations' stock sources are offline, and the sources this
    /// node heard from over HTTP.
    pub sources: Arc<crate::sources::SourceHealth>,
    /// PostgreSQL, for the webhook routes only: connected on first use,
    /// again after it closed.
    postgres: tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
}

impl App {
    /// Connects to Redis under the config `watcher` keeps, waiting until it
    /// answers (each failed try's cause goes to `waiting`), then builds the
    /// node from the config in force at that moment and starts the
    /// background tasks on the current (io) runtime.
    pub async fn start(
        watcher: ConfigWatcher,
        waiting: impl FnMut(&str),
    ) -> anyhow::Result<Arc<Self>> {
        let config = watcher.current();
        allocator::limits::check_config(&config).map_err(|reason| anyhow::anyhow!(reason))?;
        let settings = AllocatorSettings::from_config(&config);
        let allocator = Allocator::connect_waiting(
            &config.redis.url,
            settings,
            config.redis.pool_size,
            waiting,
        )
        .await
        .context("connecting to redis")?;
        // The wait may have been long: build from the config in force now,
        // with every edit made meanwhile (one the allocator refuses leaves
        // the start's in force, as a refused reload does).
        let latest = watcher.current();
        let config = match allocator::limits::check_config(&latest) {
            Ok(()) => latest,
            Err(reason) => {
                warn!(%reason, "config edit refused; the start's config stays in force");
                config
            }
        };
        allocator
            .reconfigure(&config)
            .context("applying the config's hold limits")?;
        let origins = resolve_origins(&config.origin.upstreams).await;
        let metrics = Metrics::new(&config.node.id);
        let subscribed = Arc::new(AtomicBool::new(false));
        let reserver = Arc::new(allocator::Reserver::new(allocator.clone(), {
            let (sizes, waits) = (metrics.batch_size.clone(), metrics.batch_wait.clone());
            allocator::Coalescer::new(
                coalescing(&config),
                Arc::new(move |flushed: allocator::Flushed| {
                    sizes.observe(flushed.size as f64);
                    waits.observe(flushed.waited.as_secs_f64());
                }),
            )
        }));
        reserver.set_location_defaults(allocator::placement::location_defaults(&config));
        metrics.serve_sales(Arc::clone(&reserver));
        // Every watched location offline until the first look at the
        // record (nothing says its counts are current yet).
        let sources = Arc::new(crate::sources::SourceHealth::default());
        sources.set(crate::sources::judge(&config, &[], 0).1);
        let app = Arc::new(Self {
            cache: AvailabilityCache::new(
                &config,
                crate::availability::redis_loader(allocator.clone(), Arc::clone(&sources)),
                Arc::clone(&subscribed),
                CacheCounters {
                    results: metrics.cache.clone(),
                    redis_errors: metrics.redis_errors.clone(),
                },
            ),
            limiter: RateLimiter::new(&config),
            streams_by_client: Default::default(),
            cache_control: ArcSwap::from_pointee(cache_control(&config)),
            openapi: ArcSwap::from_pointee(crate::routes::openapi_document(&config)),
            flash: FlashSales::new(
                Arc::clone(&reserver),
                SaleGauges {
                    reclaims: metrics.reclaims.clone(),
                    bucket_level: metrics.bucket_level.clone(),
                    pool_level: metrics.pool_level.clone(),
                    oversold: metrics.oversold.clone(),
                },
            ),
            reserver,
            changes: broadcast::channel(config.limits.sse_client_buffer_events.max(1)).0,
            resync: tokio::sync::watch::channel(0).0,
            origins: ArcSwap::from_pointee(origins),
            config: ArcSwap::new(config),
            watcher,
            allocator,
            metrics,
            subscribed,
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            postgres: tokio::sync::Mutex::new(None),
            sources,
        });
        tokio::spawn(Arc::clone(&app).follow_config());
        tokio::spawn(Arc::clone(&app).follow_changes());
        tokio::spawn(Arc::clone(&app).heartbeat());
        tokio::spawn(Arc::clone(&app).run_flash_sales());
        tokio::spawn(Arc::clone(&app).forget_idle_limits());
        tokio::spawn(Arc::clone(&app).watch_sources());
        Ok(app)
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// PostgreSQL (the webhook routes' store), connected on first use and
    /// again once closed; 503 while it does not answer.
    pub async fn postgres(&self) -> Result<Arc<tokio_postgres::Client>, crate::api::ApiError> {
        if let Some(client) = self
            .postgres
            .lock()
            .await
            .as_ref()
            .filter(|client| !client.is_closed())
        {
            return Ok(Arc::clone(client));
        }
        // Connected outside the lock: requests do not queue behind one
        // another's connect timeouts.
        let client = webhooks::store::connect(&self.config().postgres)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "cannot reach postgresql for the webhook routes");
                crate::api::ApiError::StoreUnavailable
            })?;
        let client = Arc::new(client);
        *self.postgres.lock().await = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Runs a PostgreSQL call of the webhook routes, bounded by the
    /// statement timeout and a second (a connection that stopped answering
    /// without closing is dropped, and the call answers 503).
    pub async fn in_postgres<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<Result<T, tokio_postgres::Error>, crate::api::ApiError> {
        let bound =
            std::time::Duration::from_millis(self.config().postgres.statement_timeout_ms + 1_000);
        match tokio::time::timeout(bound, call).await {
            Ok(result) => Ok(result),
            Err(_) => {
                tracing::warn!("postgresql did not answer a webhook route in time");
                *self.postgres.lock().await = None;
                Err(crate::api::ApiError::StoreUnavailable)
            }
        }
    }

    /// Origin addresses, in the configured order.
    pub fn origins(&self) -> Arc<Vec<SocketAddr>> {
        self.origins.load_full()
    }

    /// `Cache-Control` of availability answers.
    pub fn cache_control(&self) -> HeaderValue {
        HeaderValue::clone(&self.cache_control.load())
    }

    /// The OpenAPI document of the config in force.
    pub fn openapi(&self) -> bytes::Bytes {
        bytes::Bytes::clone(&self.openapi.load())
    }

    /// A receiver of resyncs (notifications may have been missed), marked
    /// seen as of now.
    pub fn resyncs(&self) -> tokio::sync::watch::Receiver<u64> {
        self.resync.subscribe()
    }

    /// Notifications may have been missed: nothing cached is fresh, and
    /// every stream reads its SKUs again.
    fn may_have_missed_changes(&self) {
        self.cache.mark_all_dirty();
        self.resync.send_modify(|count| *count += 1);
    }

    /// Whether change notifications reach this node's cache.
    pub fn hears_changes(&self) -> bool {
        self.subscribed.load(Ordering::SeqCst)
    }

    /// Ends the background tasks.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.notify_waiters();
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Sleeps `duration` or until the node stops; false when stopping.
    async fn pause(&self, duration: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(duration) => !self.stopping(),
            _ = self.stop.notified() => false,
        }
    }

    async fn follow_config(self: Arc<Self>) {
        let mut updates = self.watcher.subscribe();
        while updates.changed().await.is_ok() && !self.stopping() {
            let update = updates.borrow_and_update().clone();
            let config = Arc::clone(&update.config);
            // A limit the allocator cannot take: the old config stays.
            if let Err(reason) = allocator::limits::check_config(&config) {
                warn!(%reason, "config reload refused; the old config stays in force");
                continue;
            }
            self.openapi
                .store(Arc::new(crate::routes::openapi_document(&config)));
            if update.touches("origin") {
                self.origins
                    .store(Arc::new(resolve_origins(&config.origin.upstreams).await));
            }
            if update.touches("cache") {
                self.cache.reconfigure(&config);
                self.cache_control.store(Arc::new(cache_control(&config)));
            }
            if update.touches("auth") || update.touches("node") || update.touches("limits") {
                self.limiter.reconfigure(&config);
            }
            if update.touches("stock")
                && let Err(error) = self.allocator.reconfigure(&config)
            {
                warn!(%error, "hold limits not reloaded");
            }
            if update.touches("limits") {
                self.reserver.coalescer().reconfigure(coalescing(&config));
            }
            if update.touches("locations") {
                self.reserver
                    .set_location_defaults(allocator::placement::location_defaults(&config));
            }
            self.config.store(config);
            self.metrics.config_reloads.inc();
            info!(generation = update.generation, changed = ?update.changed, "config in force");
            self.flash.wake();
        }
    }

    /// Subscribes to the scripts' change notifications: invalidates the cache
    /// and feeds SSE streams. Reconnects by itself when Redis comes back.
    async fn follow_changes(self: Arc<Self>) {
        while !self.stopping() {
            let outcome = self.subscribe_changes().await;
            self.subscribed.store(false, Ordering::SeqCst);
            if let Err(error) = outcome {
                warn!(%error, "change subscription lost; retrying");
                self.metrics.redis_errors.inc();
                // Streams are told when a subscription is back, not on
                // every failed attempt.
                self.cache.mark_all_dirty();
            }
            if !self.pause(Duration::from_millis(500)).await {
                return;
            }
        }
    }

    async fn subscribe_changes(&self) -> anyhow::Result<()> {
        let mut feed = self.allocator.change_feed(NOTIFICATIONS_CAPACITY).await?;
        // Anything cached may have changed while we were not listening.
        self.may_have_missed_changes();
        self.subscribed.store(true, Ordering::SeqCst);
        loop {
            let event = tokio::select! {
                event = feed.next() => event,
                _ = self.stop.notified() => break,
            };
            match event {
                Some(ChangeEvent::Changed(change)) => {
                    self.cache.invalidate(&change.merchant, &change.sku);
                    // No receivers is fine: nobody is streaming.
                    let _ = self.changes.send(change);
                }
                Some(ChangeEvent::Missed) => {
                    // A burst (lazy expiry releasing many holds) outran us:
                    // whatever is cached may be stale now.
                    warn!("change notifications missed; cache marked dirty");
                    self.may_have_missed_changes();
                }
                Some(ChangeEvent::Interrupted) => {
                    // Until the subscription is back, no cached answer
                    // counts as fresh.
                    self.subscribed.store(false, Ordering::SeqCst);
                    self.cache.mark_all_dirty();
                }
                Some(ChangeEvent::Resumed) => {
                    // Notifications published while disconnected are lost.
                    self.may_have_missed_changes();
                    self.subscribed.store(true, Ordering::SeqCst);
                }
                None => {
                    feed.close().await;
                    anyhow::bail!("the change feed ended");
                }
            }
        }
        feed.close().await;
        Ok(())
    }

    async fn heartbeat(self: Arc<Self>) {
        loop {
            let ttl = Duration::from_secs(self.config().stock.node_heartbeat_ttl_seconds);
            if let Err(error) = self.allocator.heartbeat(ttl).await {
                warn!(%error, "heartbeat failed");
                self.metrics.redis_errors.inc();
            }
            if !self.pause(ttl / 3).await {
                return;
            }
        }
    }

    /// Drops the rate-limit state of customers and clients idle long
    /// enough to have full buckets again.
    async fn forget_idle_limits(self: Arc<Self>) {
        while self.pause(Duration::from_secs(30)).await {
            self.limiter.forget_idle();
        }
    }

    /// Once a second: writes the sources this node heard from, reads when
    /// every configured source was last heard from, and puts the locations
    /// of quiet ones offline ([`crate::sources`]). A flip makes nothing
    /// cached fresh and wakes every stream. Redis unreachable: what is shown
    /// stays as last judged.
    async fn watch_sources(self: Arc<Self>) {
        loop {
            let heard = self.sources.seen.take();
            if let Err(error) = self.allocator.record_sources_seen(&heard).await {
                warn!(%error, "recording the sources heard from failed; retrying");
                self.metrics.redis_errors.inc();
                self.sources.seen.restore(heard);
            }
            let config = self.config();
            match self
                .allocator
                .sources_seen(&crate::sources::members(&config))
                .await
            {
                Ok((seen, now_ms)) => {
                    let (states, offline) = crate::sources::judge(&config, &seen, now_ms);
                    self.metrics.show_sources(&states);
                    if self.sources.set(offline) {
                        let offline: Vec<String> = states
                            .iter()
                            .filter(|state| state.offline)
                            .map(|state| format!("{}/{}", state.merchant, state.name))
                            .collect();
                        info!(
                            ?offline,
                            "sources offline changed; their locations' availability is shown with their buffers"
                        );
                        self.may_have_missed_changes();
                    }
                }
                Err(error) => {
                    warn!(%error, "reading when sources were heard from failed");
                    self.metrics.redis_errors.inc();
                }
            }
            if !self.pause(Duration::from_secs(1)).await {
                return;
            }
        }
    }

    async fn run_flash_sales(self: Arc<Self>) {
        loop {
            let config = self.config();
            self.flash.reconcile(&config).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.flash.woken() => {}
                _ = self.stop.notified() => return,
            }
            if self.stopping() {
                return;
            }
        }
    }
}

fn cache_control(config: &Config) -> HeaderValue {
    let seconds = config.cache.cache_control_max_age_seconds;
    // Digits after ASCII: always a valid header value.
    HeaderValue::from_str(&format!("max-age={seconds}"))
        .unwrap_or(HeaderValue::from_static("no-cache"))
}

fn coalescing(config: &Config) -> allocator::Coalescing {
    allocator::Coalescing {
        wait: Duration::from_micros(config.limits.coalesce_wait_us),
        batch_max: config.limits.coalesce_batch_max,
    }
}

async fn resolve_origins(upstreams: &[String]) -> Vec<SocketAddr> {
    let mut addresses = Vec::new();
    for upstream in upstreams {
        match tokio::net::lookup_host(upstream.as_str()).await {
            Ok(mut resolved) => match resolved.next() {
                Some(address) => addresses.push(address),
                None => warn!(upstream, "origin resolves to no address"),
            },
            Err(error) => warn!(upstream, %error, "cannot resolve origin"),
        }
    }
    addresses
}
