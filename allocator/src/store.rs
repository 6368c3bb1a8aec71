//! The connections to Redis, and which master serves each key.
//!
//! Owns one fred pool per master (plain connections to that one server),
//! the slot map (the master serving each of the 16,384 hash slots, as the
//! cluster's `CLUSTER SLOTS` says) and keeping that map current. Every
//! command goes to the master of its key's slot: a script's keys share
//! one slot (its partition's hash tag), a pipeline is split per master.
//! It decides nothing about stock and reads no reply.
//!
//! **Why not fred's cluster client.** fred 10.1 rebuilds its whole set of
//! cluster connections when any one of them drops (`router::clustered::
//! sync` joins a fresh connection to every master the slot map lists),
//! and holds every command, for every key, until that succeeds. A master
//! that died and was not replaced stays in the map, so one lost master
//! stopped every key of the cluster until it came back. Here a master's
//! connections are its own: a dead master's commands wait for it (and give
//! up after `redis.command_timeout_ms`: 503), every other master's run on.
//!
//! **Keeping the map current.** A cluster's map is read again every
//! [`REFRESH_EVERY`], and early (at most once per [`REFRESH_GAP`]) when a
//! command fails in a way a moved slot or a lost master explains: a
//! `MOVED`/`ASK`/`CLUSTERDOWN` reply, a dropped connection, no answer in
//! time. It asks the masters it knows, then the URL's nodes, and takes the
//! first answer. A new master (a promoted replica, a node resharded into)
//! is connected and given the library in the refresh task, so no command
//! waits for it; a master that serves no slot any more is disconnected.
//! Until the refresh that sees a move, its slot's commands go to the old
//! master and are refused (`MOVED`: the script did not run) or time out:
//! 503 either way, and a retry with the same idempotency key is safe.
//! Subscribers follow the map through [`Store::routes_changed`].
//!
//! A single Redis (`redis://`) is the same with one master serving every
//! slot, and no refresh.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use fred::prelude::*;
use fred::types::cluster::ClusterRouting;
use fred::types::config::{Server, ServerConfig};
use tokio::sync::{Notify, watch};

use crate::scripts::Scripts;
use crate::{AllocatorError, Result};

/// How often a cluster's slot map is read again when nothing failed.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The shortest time between two refreshes (a burst of failures asks once).
pub const REFRESH_GAP: Duration = Duration::from_millis(100);

/// How long a refresh waits for one node's `CLUSTER SLOTS`.
const ASK_TIMEOUT: Duration = Duration::from_millis(500);

/// Hash slots of a Redis Cluster.
const SLOTS: usize = 16_384;

/// A slot no master serves (a cluster without full coverage).
const NO_MASTER: u16 = u16::MAX;

/// One master and its connections.
#[derive(Clone)]
pub(crate) struct Master {
    /// Where it is.
    pub(crate) server: Server,
    /// Connections to it alone.
    pub(crate) pool: Pool,
}

/// The slot map: which master serves each slot.
pub(crate) struct Routes {
    /// Bumped on every change of the map (0: the first one).
    pub(crate) epoch: u64,
    /// The masters, in the order `CLUSTER SLOTS` first names them.
    pub(crate) masters: Vec<Master>,
    /// Index in `masters` per slot (`NO_MASTER` for none).
    slots: Vec<u16>,
    /// The map as read: slot ranges and their master (to tell a change).
    ranges: Vec<(u16, u16, Server)>,
}

impl Routes {
    /// The master serving `slot`.
    pub(crate) fn master_of(&self, slot: u16) -> Result<&Master> {
        match self.slots.get(usize::from(slot)) {
            Some(&index) if index != NO_MASTER => Ok(&self.masters[usize::from(index)]),
            _ => Err(AllocatorError::StoreUnavailable(format!(
                "no master serves hash slot {slot}"
            ))),
        }
    }

    /// The index in `masters` of the one serving `slot`.
    pub(crate) fn index_of(&self, slot: u16) -> Result<usize> {
        self.master_of(slot)?;
        Ok(usize::from(self.slots[usize::from(slot)]))
    }
}

/// The connections, shared by every clone of an `Allocator`.
#[derive(Clone)]
pub(crate) struct Store {
    shared: Arc<Shared>,
}

struct Shared {
    /// The slot map in force.
    routes: RwLock<Arc<Routes>>,
    /// The URL's config: every master's connections are made from it.
    template: fred::types::config::Config,
    /// The URL's nodes: asked for the map when no known master answers.
    seeds: Vec<Server>,
    /// A cluster (else one server, no refresh).
    cluster: bool,
    /// Connections per master.
    pool_size: usize,
    /// `redis.command_timeout_ms`.
    timeout: Duration,
    /// The library every master is given.
    scripts: Scripts,
    /// Wakes the refresh task early.
    stale: Arc<Notify>,
    /// The epoch of the map in force, for subscribers.
    changed: watch::Sender<u64>,
}

impl Store {
    /// Connects to every master `redis_url` names (a cluster: every master
    /// its map lists) and gives each the library. A cluster's refresh task
    /// runs on the current runtime for as long as a clone of the store
    /// lives.
    pub(crate) async fn connect(
        redis_url: &str,
        pool_size: usize,
        timeout: Duration,
        scripts: Scripts,
    ) -> Result<Self> {
        let template = fred::types::config::Config::from_url(redis_url)
            .map_err(|error| AllocatorError::InvalidRequest(format!("redis url: {error}")))?;
        let (cluster, seeds) = match &template.server {
            ServerConfig::Centralized { server } => (false, vec![server.clone()]),
            ServerConfig::Clustered { hosts, .. } => (true, hosts.clone()),
            _ => {
                return Err(AllocatorError::InvalidRequest(
                    "redis url: only redis:// (one server) and redis-cluster:// are supported"
                        .to_owned(),
                ));
            }
        };
        let shared = Shared {
            routes: RwLock::new(Arc::new(Routes {
                epoch: 0,
                masters: Vec::new(),
                slots: Vec::new(),
                ranges: Vec::new(),
            })),
            template,
            seeds,
            cluster,
            pool_size: pool_size.max(1),
            timeout,
            scripts,
            stale: Arc::new(Notify::new()),
            changed: watch::Sender::new(0),
        };
        let routes = if cluster {
            let ranges = shared.ask_ranges(&[]).await?;
            shared.routes_from(ranges, &[], 0, true).await?
        } else {
            let server = shared.seeds[0].clone();
            let master = shared.open(&server, true).await?;
            Routes {
                epoch: 0,
                masters: vec![master],
                slots: vec![0; SLOTS],
                ranges: vec![(0, (SLOTS - 1) as u16, server)],
            }
        };
        *shared.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
        let shared = Arc::new(shared);
        if cluster {
            tokio::spawn(refresh_task(
                Arc::downgrade(&shared),
                Arc::clone(&shared.stale),
            ));
        }
        Ok(Self { shared })
    }

    /// The slot map in force.
    pub(crate) fn routes(&self) -> Arc<Routes> {
        Arc::clone(&self.shared.routes.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// A connection to the master serving `slot`.
    pub(crate) fn for_slot(&self, slot: u16) -> Result<Client> {
        if !self.shared.cluster {
            return Ok(self.routes().masters[0].pool.next().clone());
        }
        match self.routes().master_of(slot) {
            Ok(master) => Ok(master.pool.next().clone()),
            Err(error) => {
                // Perhaps served again since the map was read.
                self.failed(None);
                Err(error)
            }
        }
    }

    /// A connection to the master serving `key`.
    pub(crate) fn for_key(&self, key: &str) -> Result<Client> {
        if !self.shared.cluster {
            return self.for_slot(0);
        }
        self.for_slot(fred::util::redis_keyslot(key.as_bytes()))
    }

    /// A connection to the master serving `partition`'s keys.
    pub(crate) fn for_partition(&self, partition: u32) -> Result<Client> {
        if !self.shared.cluster {
            return self.for_slot(0);
        }
        self.for_slot(crate::keys::partition_slot(partition))
    }

    /// A connection to some master (for a command of no key: `TIME`).
    pub(crate) fn any(&self) -> Client {
        let routes = self.routes();
        let connected = routes
            .masters
            .iter()
            .find(|master| master.pool.next().is_connected());
        connected.unwrap_or(&routes.masters[0]).pool.next().clone()
    }

    /// The epoch of the map in force, changing with it.
    pub(crate) fn routes_changed(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// A client builder for one `server` of this store (its own
    /// connection: the change feed's subscribers), retrying from its first
    /// connection on.
    pub(crate) fn builder_for(&self, server: &Server) -> Builder {
        self.shared.builder_for(server, false)
    }

    /// Notes a failed command: one a moved slot or a lost master explains
    /// reads the map again soon.
    pub(crate) fn failed(&self, error: Option<&fred::error::Error>) {
        let suspect = match error {
            None => true,
            Some(error) => matches!(
                error.kind(),
                ErrorKind::IO
                    | ErrorKind::Cluster
                    | ErrorKind::Timeout
                    | ErrorKind::Canceled
                    | ErrorKind::Routing
                    | ErrorKind::Backpressure
            ),
        };
        if suspect && self.shared.cluster {
            self.shared.stale.notify_one();
        }
    }
}

impl Shared {
    /// Connections to `server` alone. `fail_fast`: a first connection
    /// that fails ends the client (at start: the caller is told); else it
    /// is retried like any later one.
    fn builder_for(&self, server: &Server, fail_fast: bool) -> Builder {
        let mut config = self.template.clone();
        config.server = ServerConfig::Centralized {
            server: server.clone(),
        };
        config.fail_fast = fail_fast;
        let timeout = self.timeout;
        let mut builder = Builder::from_config(config);
        builder
            .with_performance_config(|performance| {
                performance.default_command_timeout = timeout;
            })
            .with_connection_config(|connection| {
                connection.connection_timeout = Duration::from_secs(1).max(timeout);
                connection.internal_command_timeout = Duration::from_secs(1).max(timeout);
            })
            .set_policy(ReconnectPolicy::new_constant(0, 200));
        builder
    }

    /// Connections to `server`, given the library. `required`: it must
    /// answer now (at start); else one that does not is kept connecting
    /// in the background (its commands wait for it, and time out).
    async fn open(&self, server: &Server, required: bool) -> Result<Master> {
        let pool = self
            .builder_for(server, required)
            .build_pool(self.pool_size)
            .map_err(crate::unavailable)?;
        if required {
            pool.init().await.map_err(crate::unavailable)?;
        } else {
            // Its connection tasks run on, detached: `quit` ends them.
            drop(pool.connect());
            let wait = Duration::from_secs(1).max(self.timeout);
            if tokio::time::timeout(wait, pool.wait_for_connect())
                .await
                .is_err()
            {
                tracing::warn!(%server, "a new master does not answer yet; connecting in the background");
                return Ok(Master {
                    server: server.clone(),
                    pool,
                });
            }
        }
        let loaded = tokio::time::timeout(
            Duration::from_secs(1).max(self.timeout),
            self.scripts.load(pool.next()),
        )
        .await;
        match loaded {
            Ok(Ok(())) => {}
            // A later call loads it (`Scripts::run`).
            Ok(Err(error)) if !required => {
                tracing::warn!(%server, %error, "library not loaded on a new master yet");
            }
            Ok(Err(error)) => return Err(crate::unavailable(error)),
            Err(_) if !required => {
                tracing::warn!(%server, "library not loaded on a new master yet");
            }
            Err(_) => {
                return Err(AllocatorError::StoreUnavailable(format!(
                    "{server}: the library did not load in time"
                )));
            }
        }
        Ok(Master {
            server: server.clone(),
            pool,
        })
    }

    /// The map as `CLUSTER SLOTS` answers it: from `known` masters first
    /// (connected ones), then the URL's nodes.
    async fn ask_ranges(&self, known: &[Master]) -> Result<Vec<(u16, u16, Server)>> {
        let mut last_error = String::from("no node to ask");
        for master in known {
            let client = master.pool.next();
            if !client.is_connected() {
                continue;
            }
            match ask(client, &master.server).await {
                Ok(ranges) => return Ok(ranges),
                Err(error) => last_error = format!("{}: {error}", master.server),
            }
        }
        for seed in &self.seeds {
            let client = self
                .builder_for(seed, true)
                .build()
                .map_err(crate::unavailable)?;
            let asked = async {
                client.init().await.map_err(|error| error.to_string())?;
                ask(&client, seed).await
            };
            let answer = tokio::time::timeout(ASK_TIMEOUT.max(self.timeout), asked).await;
            let _ = tokio::time::timeout(ASK_TIMEOUT, client.quit()).await;
            match answer {
                Ok(Ok(ranges)) => return Ok(ranges),
                Ok(Err(error)) => last_error = format!("{seed}: {error}"),
                Err(_) => last_error = format!("{seed}: no answer in time"),
            }
        }
        Err(AllocatorError::StoreUnavailable(format!(
            "no cluster node answered CLUSTER SLOTS (last: {last_error})"
        )))
    }

    /// A slot map from `ranges`, reusing `known` masters' connections and
    /// opening the others.
    async fn routes_from(
        &self,
        ranges: Vec<(u16, u16, Server)>,
        known: &[Master],
        epoch: u64,
        required: bool,
    ) -> Result<Routes> {
        let mut masters: Vec<Master> = Vec::new();
        let mut slots = vec![NO_MASTER; SLOTS];
        for (first, last, server) in &ranges {
            let index = match masters.iter().position(|master| master.server == *server) {
                Some(index) => index,
                None => {
                    let master = match known.iter().find(|master| master.server == *server) {
                        Some(master) => master.clone(),
                        None => self.open(server, required).await?,
                    };
                    masters.push(master);
                    masters.len() - 1
                }
            };
            for slot in *first..=*last {
                slots[usize::from(slot)] = index as u16;
            }
        }
        Ok(Routes {
            epoch,
            masters,
            slots,
            ranges,
        })
    }

    /// Reads the map again; swaps it in when it changed, disconnecting
    /// the masters that serve nothing now.
    async fn refresh(&self) -> Result<()> {
        let current = Arc::clone(&self.routes.read().unwrap_or_else(|e| e.into_inner()));
        let ranges = self.ask_ranges(&current.masters).await?;
        if ranges == current.ranges {
            return Ok(());
        }
        let routes = self
            .routes_from(ranges, &current.masters, current.epoch + 1, false)
            .await?;
        tracing::info!(
            epoch = routes.epoch,
            masters = ?routes.masters.iter().map(|m| m.server.to_string()).collect::<Vec<_>>(),
            "the cluster's slot map changed"
        );
        for old in &current.masters {
            if !routes
                .masters
                .iter()
                .any(|master| master.server == old.server)
            {
                let pool = old.pool.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(ASK_TIMEOUT, pool.quit()).await;
                });
            }
        }
        let epoch = routes.epoch;
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
        self.changed.send_replace(epoch);
        Ok(())
    }
}

/// One node's `CLUSTER SLOTS`, as (first, last, master) ranges in slot
/// order.
async fn ask(
    client: &Client,
    server: &Server,
) -> std::result::Result<Vec<(u16, u16, Server)>, String> {
    let command =
        fred::types::CustomCommand::new_static("CLUSTER", fred::types::ClusterHash::Random, false);
    let reply: fred::types::Value =
        tokio::time::timeout(ASK_TIMEOUT, client.custom(command, vec!["SLOTS"]))
            .await
            .map_err(|_| "no answer in time".to_owned())?
            .map_err(|error| error.to_string())?;
    let routing = ClusterRouting::from_cluster_slots(reply, server.host.clone())
        .map_err(|error| error.to_string())?;
    Ok(routing
        .slots()
        .iter()
        .map(|range| (range.start, range.end, range.primary.clone()))
        .collect())
}

/// Refreshes the map every [`REFRESH_EVERY`], or early when told, while
/// the store lives.
async fn refresh_task(shared: Weak<Shared>, stale: Arc<Notify>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REFRESH_EVERY) => {}
            _ = stale.notified() => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Err(error) = shared.refresh().await {
            tracing::warn!(%error, "the cluster's slot map could not be read");
        }
        drop(shared);
        tokio::time::sleep(REFRESH_GAP).await;
    }
}
