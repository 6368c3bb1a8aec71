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
//! Every connected master is asked and the answer covering the most slots
//! wins (an empty answer, from a node that lost its cluster state, is never
//! taken); subscribers are told as soon as a different map is seen, before
//! its new masters are connected, and again once it is in force.
//! Until the refresh that sees a move, its slot's commands go to the old
//! master and are refused (`MOVED`: the script did not run) or time out:
//! 503 either way, and a retry with the same idempotency key is safe.
//! Subscribers follow the map through [`Store::routes_changed`].
//!
//! **Starting while a master is down.** A cluster store starts when at
//! least one master answers; the others are kept connecting in the
//! background (their slots answer 503 meanwhile). One Redis must answer.
//!
//! A single Redis (`redis://`) is the same with one master serving every
//! slot, and no refresh.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use fred::prelude::*;
use fred::types::ConnectHandle;
use fred::types::cluster::ClusterRouting;
use fred::types::config::{Server, ServerConfig};
use tokio::sync::{Notify, watch};

use crate::scripts::Scripts;
use crate::{AllocatorError, Result};

/// How often a cluster's slot map is read again when nothing failed.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The shortest time between two refreshes (a burst of failures asks once).
pub const REFRESH_GAP: Duration = Duration::from_millis(100);

/// How long a refresh waits for one known master's `CLUSTER SLOTS` (a
/// seed asked afresh, as at connect, gets the whole connect wait: on a busy
/// two-core machine a cluster node starting up or running a long script
/// took longer than this to answer, and a first connect failed on it).
const ASK_TIMEOUT: Duration = Duration::from_millis(500);

/// Hash slots of a Redis Cluster.
const SLOTS: usize = 16_384;

/// A slot no master serves (a cluster without full coverage).
const NO_MASTER: u16 = u16::MAX;

/// A slot map as read: `(first, last, master)` ranges in slot order.
type Ranges = Vec<(u16, u16, Server)>;

/// Connection tasks, aborted when dropped: fred's `quit` is not heard by a
/// reconnect loop in the middle of an attempt, which would then try a dead
/// address for ever.
pub(crate) struct Tasks(pub(crate) Vec<ConnectHandle>);

impl Drop for Tasks {
    fn drop(&mut self) {
        self.0.iter().for_each(ConnectHandle::abort);
    }
}

/// One master and its connections.
#[derive(Clone)]
pub(crate) struct Master {
    /// Where it is.
    pub(crate) server: Server,
    /// Connections to it alone.
    pub(crate) pool: Pool,
    /// Each connection's task, ended with the last clone of the master.
    tasks: Arc<Tasks>,
}

impl Master {
    /// Whether any of its connections is up now.
    pub(crate) fn connected(&self) -> bool {
        self.pool
            .clients()
            .iter()
            .any(|client| client.is_connected())
    }

    /// A connection to it, a connected one when there is one.
    pub(crate) fn client(&self) -> &Client {
        self.pool.next_connected()
    }

    /// Closes its connections (in the background: a dead master's would
    /// wait for it), then ends their tasks.
    fn let_go(self) {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(ASK_TIMEOUT, self.pool.quit()).await;
            drop(self.tasks);
        });
    }
}

/// The slot map: which master serves each slot.
pub(crate) struct Routes {
    /// Bumped on every change of the map (0: the first one).
    pub(crate) epoch: u64,
    /// The masters, in the order `CLUSTER SLOTS` first names them.
    pub(crate) masters: Vec<Master>,
    /// Index in `masters` per slot (`NO_MASTER` for none).
    slots: Vec<u16>,
    /// The map as read (to tell a change).
    ranges: Ranges,
}

impl Routes {
    /// The master serving `slot`.
    pub(crate) fn master_of(&self, slot: u16) -> Result<&Master> {
        Ok(&self.masters[self.index_of(slot)?])
    }

    /// Hash slots no master serves (0 for one Redis).
    pub(crate) fn uncovered(&self) -> usize {
        self.slots
            .iter()
            .filter(|&&index| index == NO_MASTER)
            .count()
    }

    /// The index in `masters` of the one serving `slot`.
    pub(crate) fn index_of(&self, slot: u16) -> Result<usize> {
        match self.slots.get(usize::from(slot)) {
            Some(&index) if index != NO_MASTER => Ok(usize::from(index)),
            _ => Err(AllocatorError::StoreUnavailable(format!(
                "no master serves hash slot {slot}"
            ))),
        }
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
    /// Odd while a different map is being put in force, for subscribers
    /// ([`Store::routes_changed`]).
    changed: watch::Sender<u64>,
}

impl Store {
    /// Connects to the masters `redis_url` names (a cluster: every master
    /// its map lists) and gives each the library. One Redis must answer; of
    /// a cluster's masters, one (the others connect in the background). A
    /// cluster's refresh task runs on the current runtime for as long as a
    /// clone of the store lives.
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
        let ranges = if cluster {
            shared.ask_ranges(&[]).await?
        } else {
            vec![(0, (SLOTS - 1) as u16, shared.seeds[0].clone())]
        };
        let routes = shared.routes_from(ranges, &[], 0).await?;
        let answering: Vec<&Master> = routes
            .masters
            .iter()
            .filter(|master| master.connected())
            .collect();
        if answering.is_empty() {
            let causes = futures::future::join_all(
                routes
                    .masters
                    .iter()
                    .map(|master| shared.why_not(&master.server)),
            )
            .await;
            // Dropping the routes ends the connection tasks.
            return Err(AllocatorError::StoreUnavailable(format!(
                "no Redis answered: {}",
                causes.join("; ")
            )));
        }
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
        // One Redis: its one master serves every slot.
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

    /// A connection to some master, a connected one when there is one (for
    /// a command of no key: `TIME`).
    pub(crate) fn any(&self) -> Client {
        let routes = self.routes();
        // Never empty: a store starts with a master, and a map without one
        // is never taken.
        let master = routes
            .masters
            .iter()
            .find(|master| master.connected())
            .unwrap_or(&routes.masters[0]);
        master.client().clone()
    }

    /// A count of slot map changes: made odd when a different map is seen
    /// (before its new masters are connected), even again once a map is in
    /// force (the new one, or the old one if the new could not be made).
    pub(crate) fn routes_changed(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// A client builder for one `server` of this store (its own
    /// connection: the change feed's subscribers), retrying from its first
    /// connection on.
    pub(crate) fn builder_for(&self, server: &Server) -> Builder {
        self.shared.builder_for(server, true)
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
    /// Connections to `server` alone. `retry`: each retried from its first
    /// attempt on (a master down now is connected once it answers; fred
    /// waits its reconnect delay before that first attempt); else a first
    /// attempt that fails ends the client (a one-shot question).
    fn builder_for(&self, server: &Server, retry: bool) -> Builder {
        let mut config = self.template.clone();
        config.server = ServerConfig::Centralized {
            server: server.clone(),
        };
        config.fail_fast = !retry;
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

    /// How long opening a master waits for it to answer.
    fn connect_wait(&self) -> Duration {
        Duration::from_secs(1).max(self.timeout)
    }

    /// Connections to `server`, given the library when it answers within
    /// [`Shared::connect_wait`]; else kept connecting in the background (its
    /// commands wait for it and time out; the library is loaded by the
    /// first call that finds it missing, `Scripts::run`).
    async fn open(&self, server: &Server) -> Result<Master> {
        let pool = self
            .builder_for(server, true)
            .build_pool(self.pool_size)
            .map_err(crate::unavailable)?;
        let tasks = Arc::new(Tasks(pool.connect_pool()));
        let master = Master {
            server: server.clone(),
            pool,
            tasks,
        };
        let wait = self.connect_wait();
        if !matches!(
            tokio::time::timeout(wait, master.pool.wait_for_connect()).await,
            Ok(Ok(()))
        ) {
            tracing::warn!(%server, "a master does not answer; connecting in the background");
            return Ok(master);
        }
        match tokio::time::timeout(wait, self.scripts.load(master.client())).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%server, %error, "the library is not loaded on a master yet");
            }
            Err(_) => tracing::warn!(%server, "the library is not loaded on a master yet"),
        }
        Ok(master)
    }

    /// The map as `CLUSTER SLOTS` answers it: every connected one of
    /// `known` is asked and the answer covering the most slots wins (an
    /// empty one never does); when none answers, the URL's nodes in turn.
    async fn ask_ranges(&self, known: &[Master]) -> Result<Ranges> {
        let asked = futures::future::join_all(
            known
                .iter()
                .filter(|master| master.connected())
                .map(|master| ask(master.client(), &master.server, ASK_TIMEOUT)),
        )
        .await;
        let mut last_error = String::from("no node to ask");
        let mut best: Option<Ranges> = None;
        for answer in asked {
            match answer {
                Ok(ranges) if covered(&ranges) > best.as_ref().map_or(0, covered) => {
                    best = Some(ranges)
                }
                Ok(_) => {}
                Err(error) => last_error = error,
            }
        }
        if let Some(best) = best {
            return Ok(best);
        }
        for seed in &self.seeds {
            match self
                .ask_once(seed, async |client| {
                    ask(client, seed, self.connect_wait()).await
                })
                .await
            {
                Ok(ranges) if covered(&ranges) > 0 => return Ok(ranges),
                Ok(_) => last_error = format!("{seed}: serves no slot"),
                Err(error) => last_error = error,
            }
        }
        Err(AllocatorError::StoreUnavailable(format!(
            "no cluster node answered CLUSTER SLOTS with a map (last: {last_error})"
        )))
    }

    /// One fresh connection to `server` (no retry, closed after), asked
    /// `question`: its answer, or the connection's or the question's error
    /// as text naming the server.
    async fn ask_once<T>(
        &self,
        server: &Server,
        question: impl AsyncFnOnce(&Client) -> std::result::Result<T, String>,
    ) -> std::result::Result<T, String> {
        let client = self
            .builder_for(server, false)
            .build()
            .map_err(|error| format!("{server}: {error}"))?;
        // `init` listens for the connection before starting it: `connect`
        // then `wait_for_connect` misses a connection made between the
        // latter's state check and its subscription (fred 10.1), and then
        // waits for ever (a cluster's first slot-map read failed with "no
        // answer in time" under the test suites' load while Redis was idle).
        let mut task = None;
        let answer = tokio::time::timeout(self.connect_wait(), async {
            let handle = client
                .init()
                .await
                .map_err(|error| format!("{server}: {error}"))?;
            task = Some(Tasks(vec![handle]));
            question(&client).await
        })
        .await;
        let _ = tokio::time::timeout(ASK_TIMEOUT, client.quit()).await;
        drop(task);
        answer.unwrap_or_else(|_| Err(format!("{server}: no answer in time")))
    }

    /// Why `server` does not answer (refused, timed out, still loading its
    /// dataset...), from one fresh connection's `PING`.
    async fn why_not(&self, server: &Server) -> String {
        let pinged = self
            .ask_once(server, async |client| {
                client
                    .ping::<String>(None)
                    .await
                    .map_err(|error| format!("{server}: {error}"))
            })
            .await;
        match pinged {
            Ok(_) => format!("{server}: answers now"),
            Err(error) => error,
        }
    }

    /// A slot map from `ranges`, reusing `known` masters' connections and
    /// opening the others (side by side).
    async fn routes_from(&self, ranges: Ranges, known: &[Master], epoch: u64) -> Result<Routes> {
        let mut servers: Vec<Server> = Vec::new();
        for (_, _, server) in &ranges {
            if !servers.contains(server) {
                servers.push(server.clone());
            }
        }
        let opened = futures::future::join_all(servers.iter().map(|server| async move {
            match known.iter().find(|master| master.server == *server) {
                Some(master) => Ok(master.clone()),
                None => self.open(server).await,
            }
        }))
        .await;
        let masters = opened.into_iter().collect::<Result<Vec<Master>>>()?;
        let mut slots = vec![NO_MASTER; SLOTS];
        for (first, last, server) in &ranges {
            let index = servers
                .iter()
                .position(|candidate| candidate == server)
                .expect("every range's master is listed") as u16;
            for slot in *first..=*last {
                slots[usize::from(slot)] = index;
            }
        }
        Ok(Routes {
            epoch,
            masters,
            slots,
            ranges,
        })
    }

    /// Reads the map again; swaps it in when it changed, letting go of the
    /// masters that serve nothing now.
    async fn refresh(&self) -> Result<()> {
        let current = Arc::clone(&self.routes.read().unwrap_or_else(|e| e.into_inner()));
        let ranges = self.ask_ranges(&current.masters).await?;
        if ranges == current.ranges {
            return Ok(());
        }
        // Subscribers stop trusting the old map now (odd: changing), not
        // once the new masters answer; and follow the map in force once it
        // is (even), or the old one still if the new one could not be made.
        self.changed.send_modify(|count| *count += 1);
        let made = self
            .routes_from(ranges, &current.masters, current.epoch + 1)
            .await;
        let routes = match made {
            Ok(routes) => routes,
            Err(error) => {
                self.changed.send_modify(|count| *count += 1);
                return Err(error);
            }
        };
        tracing::info!(
            epoch = routes.epoch,
            masters = ?routes.masters.iter().map(|m| m.server.to_string()).collect::<Vec<_>>(),
            "the cluster's slot map changed"
        );
        let gone: Vec<Master> = current
            .masters
            .iter()
            .filter(|old| {
                !routes
                    .masters
                    .iter()
                    .any(|master| master.server == old.server)
            })
            .cloned()
            .collect();
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
        self.changed.send_modify(|count| *count += 1);
        // After the swap: no command is sent to a pool being closed.
        gone.into_iter().for_each(Master::let_go);
        Ok(())
    }
}

/// Slots a map covers.
fn covered(ranges: &Ranges) -> usize {
    ranges
        .iter()
        .map(|(first, last, _)| usize::from(last - first) + 1)
        .sum()
}

/// One node's `CLUSTER SLOTS`, as ranges in slot order, if it answers
/// within `wait`.
async fn ask(
    client: &Client,
    server: &Server,
    wait: Duration,
) -> std::result::Result<Ranges, String> {
    let command =
        fred::types::CustomCommand::new_static("CLUSTER", fred::types::ClusterHash::Random, false);
    let reply: fred::types::Value =
        tokio::time::timeout(wait, client.custom(command, vec!["SLOTS"]))
            .await
            .map_err(|_| format!("{server}: no answer in time"))?
            .map_err(|error| format!("{server}: {error}"))?;
    let routing = ClusterRouting::from_cluster_slots(reply, server.host.clone())
        .map_err(|error| format!("{server}: {error}"))?;
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
