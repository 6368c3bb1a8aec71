//! A Redis Cluster of one test's own: masters (and replicas) on free
//! loopback ports, joined by `redis-cli --cluster create`, each node's data
//! (append-only, `appendfsync everysec`) and `nodes.conf` in a directory of
//! the test's, so a node killed with SIGKILL and started again rejoins the
//! cluster with what it had written. Made with `cluster-require-full-coverage
//! no`, as the stack's cluster is: a lost master stops its own slots only.
//! Killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{KillOnDrop, free_port, stack, wait_for_port};

/// Hash slots of a Redis Cluster.
const SLOTS: u32 = 16384;

/// One node: its ports, its directory and its process (none while killed).
struct Node {
    port: u16,
    /// Its cluster bus port, chosen free too: the default, `port + 10000`,
    /// is past 65535 for a quarter of the ephemeral ports, or taken.
    bus_port: u16,
    directory: PathBuf,
    process: Option<KillOnDrop>,
}

/// A private Redis Cluster (see the module docs).
pub struct PrivateCluster {
    nodes: Vec<Node>,
    node_timeout_ms: u64,
}

/// A master and the slot ranges it serves, as `CLUSTER NODES` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// `(first, last)` slot ranges it serves.
    pub slots: Vec<(u16, u16)>,
}

impl PrivateCluster {
    /// `masters` masters with `replicas` replicas each, under `directory`;
    /// a node not heard from for `node_timeout_ms` is failed (and its
    /// replica promoted). Returns once every slot is served.
    pub fn start(directory: &Path, masters: usize, replicas: usize, node_timeout_ms: u64) -> Self {
        stack();
        let mut cluster = Self {
            nodes: Vec::new(),
            node_timeout_ms,
        };
        for _ in 0..masters * (1 + replicas) {
            let port = free_port();
            let bus_port = free_port();
            let node_directory = directory.join(format!("node-{port}"));
            std::fs::create_dir_all(&node_directory).expect("node directory");
            cluster.nodes.push(Node {
                port,
                bus_port,
                directory: node_directory,
                process: None,
            });
        }
        for index in 0..cluster.nodes.len() {
            cluster.run(index);
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let log = directory.join("create.log");
        let mut child = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(std::fs::File::create(&log).expect("create log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli is installed by scripts/stack");
        // It waits for the nodes to join with no limit of its own.
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("redis-cli") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "redis-cli --cluster create did not finish in 60 s: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "redis-cli --cluster create: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        cluster.wait_served(Duration::from_secs(30));
        cluster.wait_replicated(Duration::from_secs(30));
        cluster
    }

    /// Waits until every running replica has its master's data (its link
    /// up): a replica that never synchronised does not take over.
    fn wait_replicated(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for node in self.nodes.iter().filter(|node| node.process.is_some()) {
            loop {
                let info = redis_cli(node.port, &["info", "replication"]);
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica {} did not synchronise within {limit:?}: {info}",
                    node.port
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `redis-cluster://` URL of the cluster (its first node that runs).
    pub fn url(&self) -> String {
        let port = self
            .nodes
            .iter()
            .find(|node| node.process.is_some())
            .map_or(self.nodes[0].port, |node| node.port);
        format!("redis-cluster://127.0.0.1:{port}")
    }

    /// The masters serving slots now, as a running node sees them.
    pub fn masters(&self) -> Vec<Master> {
        masters_seen_by(self.running_port())
    }

    /// Moves `slot`, which must hold no keys, to the master on `to` by the
    /// resharding steps (`CLUSTER SETSLOT … IMPORTING` on `to`, `MIGRATING`
    /// on its master, then `NODE` on every master), and waits until every
    /// running node sees it there.
    pub fn move_empty_slot(&self, slot: u16, to: u16) {
        let from = self.master_of(slot);
        assert_ne!(from, to, "slot {slot} is on {to} already");
        let id = |port: u16| redis_cli(port, &["cluster", "myid"]).trim().to_owned();
        let (from_id, to_id) = (id(from), id(to));
        let slot_text = slot.to_string();
        let set = |port: u16, arguments: &[&str]| {
            let mut command = vec!["cluster", "setslot", slot_text.as_str()];
            command.extend_from_slice(arguments);
            let answer = redis_cli(port, &command);
            assert_eq!(answer.trim(), "OK", "{command:?} on {port}: {answer}");
        };
        set(to, &["importing", &from_id]);
        set(from, &["migrating", &to_id]);
        let keys = redis_cli(from, &["cluster", "countkeysinslot", &slot_text]);
        assert_eq!(keys.trim(), "0", "slot {slot} holds keys");
        set(to, &["node", &to_id]);
        set(from, &["node", &to_id]);
        for master in self.masters() {
            if master.port != to && master.port != from {
                set(master.port, &["node", &to_id]);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let running: Vec<u16> = self
            .nodes
            .iter()
            .filter(|node| node.process.is_some())
            .map(|node| node.port)
            .collect();
        while !running.iter().all(|&port| {
            masters_seen_by(port).iter().any(|master| {
                master.port == to
                    && master
                        .slots
                        .iter()
                        .any(|(first, last)| (*first..=*last).contains(&slot))
            })
        }) {
            assert!(
                Instant::now() < deadline,
                "slot {slot} not seen on {to} by every node: {}",
                self.ask(&["cluster", "nodes"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The port of the first running node.
    fn running_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|node| node.process.is_some())
            .expect("a running node")
            .port
    }

    /// The port of the master serving `slot` now.
    pub fn master_of(&self, slot: u16) -> u16 {
        self.masters()
            .into_iter()
            .find(|master| {
                master
                    .slots
                    .iter()
                    .any(|(first, last)| (*first..=*last).contains(&slot))
            })
            .map(|master| master.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// Kills the node on `port` (SIGKILL: no shutdown, no final write).
    pub fn kill(&mut self, port: u16) {
        let node = self.node(port);
        node.process = None;
    }

    /// Starts the node on `port` again with its directory (its data and
    /// `nodes.conf`): it rejoins the cluster.
    pub fn restart(&mut self, port: u16) {
        let index = self
            .nodes
            .iter()
            .position(|node| node.port == port)
            .expect("a node of this cluster");
        self.run(index);
    }

    /// Waits until every slot is served by a master that runs, as every
    /// running node sees it (after a restart, or a replica's promotion).
    pub fn wait_served(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let served = self
                .nodes
                .iter()
                .filter(|node| node.process.is_some())
                .all(|node| {
                    let info = redis_cli(node.port, &["cluster", "info"]);
                    info.contains("cluster_state:ok")
                        && info.contains(&format!("cluster_slots_ok:{SLOTS}"))
                });
            if served {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not serve every slot within {limit:?}: {}",
                self.ask(&["cluster", "nodes"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every slot is served by a running master other than
    /// `port` (the replica of a killed master promoted in its place).
    pub fn wait_served_without(&self, port: u16, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let masters = self.masters();
            let served: u32 = masters
                .iter()
                .flat_map(|master| master.slots.iter())
                .map(|(first, last)| u32::from(last - first) + 1)
                .sum();
            if served == SLOTS && masters.iter().all(|master| master.port != port) {
                return self.wait_served(limit);
            }
            assert!(
                Instant::now() < deadline,
                "no master took over from {port} within {limit:?}: {}",
                self.ask(&["cluster", "nodes"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The node timeout the cluster was made with.
    pub fn node_timeout(&self) -> Duration {
        Duration::from_millis(self.node_timeout_ms)
    }

    fn node(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of this cluster")
    }

    /// Asks the first running node.
    fn ask(&self, arguments: &[&str]) -> String {
        redis_cli(self.running_port(), arguments)
    }

    fn run(&mut self, index: usize) {
        let node_timeout = self.node_timeout_ms.to_string();
        let node = &mut self.nodes[index];
        let child = Command::new("redis-server")
            .args(["--port", &node.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-port", &node.bus_port.to_string()])
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(node.directory.join("nodes.conf"))
            .args(["--cluster-node-timeout", &node_timeout])
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--cluster-announce-ip", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            // A replica synchronises at once (the default waits 5 s for
            // more replicas to share one transfer).
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--save", "", "--dir"])
            .arg(&node.directory)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed by scripts/stack");
        wait_for_port(node.port);
        node.process = Some(KillOnDrop(child));
    }
}

fn redis_cli(port: u16, arguments: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(arguments)
        .output()
        .expect("redis-cli is installed by scripts/stack");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The masters serving slots, as the node on `port` sees them.
fn masters_seen_by(port: u16) -> Vec<Master> {
    let text = redis_cli(port, &["cluster", "nodes"]);
    let mut masters = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 || !fields[2].contains("master") || fields[2].contains("fail") {
            continue;
        }
        let port = fields[1]
            .split('@')
            .next()
            .and_then(|address| address.rsplit(':').next())
            .and_then(|port| port.parse().ok())
            .expect("node address");
        let slots: Vec<(u16, u16)> = fields[8..]
            .iter()
            .filter(|part| !part.starts_with('['))
            .map(|part| {
                let (first, last) = part.split_once('-').unwrap_or((part, part));
                (first.parse().expect("slot"), last.parse().expect("slot"))
            })
            .collect();
        if !slots.is_empty() {
            masters.push(Master { port, slots });
        }
    }
    masters.sort_by_key(|master| master.slots[0]);
    masters
}
