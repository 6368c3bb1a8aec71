//! The allocator on a Redis Cluster of its own, whose slot map changes
//! under it: a slot moved between two live masters, and a master lost and
//! back. Commands follow the map (a stale route is refused `MOVED`, the
//! map is read again, the retry lands), and so does the change feed: it
//! hears every master's partitions, follows a moved slot's channel to its
//! new master, and says when a master's notifications stop and start.
//!
//! Its own test binary: it starts, reshards and kills Redis nodes.

mod common;

use std::time::{Duration, Instant};

use allocator::keys::{self, partition_slot};
use allocator::{Allocator, AllocatorError, AllocatorSettings, ChangeEvent, ChangeFeed, StockKey};
use common::{PARTITIONS, delta, settings};
use testkit::cluster::PrivateCluster;

/// How long a change may take to be heard, or a stale route to be fixed.
const WITHIN: Duration = Duration::from_secs(10);

fn allocator_settings() -> AllocatorSettings {
    AllocatorSettings {
        command_timeout: Duration::from_millis(300),
        ..settings("cluster-node")
    }
}

/// A stock key of `merchant` named `sku`-n whose pool's partition is on the
/// master serving `slots` and is none of `avoid`, and so is its SKU's
/// location index (an adjustment writes both).
fn key_on(merchant: &str, sku: &str, slots: &[(u16, u16)], avoid: &[u32]) -> StockKey {
    let served = |slot: u16| {
        slots
            .iter()
            .any(|(first, last)| (*first..=*last).contains(&slot))
    };
    (0..)
        .map(|n| StockKey::new(merchant, format!("{sku}-{n}"), "dc1"))
        .find(|key| {
            let partition = key.partition(PARTITIONS);
            let index = keys::locations_key(&key.merchant, &key.sku);
            !avoid.contains(&partition)
                && served(partition_slot(partition))
                && served(fred::util::redis_keyslot(index.as_bytes()))
        })
        .expect("a key on every master")
}

/// Adds a unit to `key`, retrying what the store refuses (a route not yet
/// fixed, a master not yet back) until `WITHIN`.
async fn restock(allocator: &Allocator, key: &StockKey) {
    let deadline = Instant::now() + WITHIN;
    let event = testkit::unique_id("restock");
    loop {
        match allocator.adjust(&delta(key, 1, &event)).await {
            Ok(_) => return,
            Err(AllocatorError::StoreUnavailable(reason)) if Instant::now() < deadline => {
                eprintln!("{key}: refused ({reason}); again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("{key}: {other}"),
        }
    }
}

/// Waits for the feed to say `wanted` (other events skipped); the events
/// seen on the way.
async fn expect_event(
    feed: &mut ChangeFeed,
    what: &str,
    wanted: impl Fn(&ChangeEvent) -> bool,
) -> Vec<ChangeEvent> {
    let deadline = Instant::now() + WITHIN;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, feed.next()).await {
            Ok(Some(event)) if wanted(&event) => return seen,
            Ok(Some(event)) => seen.push(event),
            Ok(None) => panic!("the feed ended waiting for {what}; saw {seen:?}"),
            Err(_) => panic!("no {what} within {WITHIN:?}; saw {seen:?}"),
        }
    }
}

fn changed(key: &StockKey) -> impl Fn(&ChangeEvent) -> bool + '_ {
    move |event| {
        matches!(event, ChangeEvent::Changed(change)
            if change.merchant == key.merchant && change.sku == key.sku)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_the_change_feed_follow_a_moved_slot_and_a_lost_master() {
    let directory = tempfile::tempdir().expect("cluster dir");
    let mut cluster = PrivateCluster::start(directory.path(), 3, 0, 2000);
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    let allocator = Allocator::connect(&cluster.url(), allocator_settings(), 2)
        .await
        .expect("allocator");
    let mut feed = allocator.change_feed(1024).await.expect("feed");
    let merchant = testkit::unique_id("moved");

    // Every master's partitions are heard.
    let keys: Vec<StockKey> = masters
        .iter()
        .map(|master| key_on(&merchant, "sku", &master.slots, &[]))
        .collect();
    for key in &keys {
        restock(&allocator, key).await;
        expect_event(&mut feed, &format!("the change of {key}"), changed(key)).await;
    }

    // A slot moved between live masters: the first command after the move
    // may be refused (the store's map is stale: `MOVED`); the map is read
    // again and the command lands on the new master. The feed says the map
    // changed (Resumed: what was published meanwhile may be lost), and
    // hears the slot's next change on its new master.
    let used: Vec<u32> = keys.iter().map(|key| key.partition(PARTITIONS)).collect();
    let moved = key_on(&merchant, "moved", &masters[0].slots, &used);
    let slot = partition_slot(moved.partition(PARTITIONS));
    cluster.move_empty_slot(slot, masters[1].port);
    assert_eq!(cluster.master_of(slot), masters[1].port);
    restock(&allocator, &moved).await;
    // Interrupted first (the cache stops trusting the old map at once),
    // then Resumed once subscribed along the new one.
    let before = expect_event(&mut feed, "Interrupted by the move", |event| {
        *event == ChangeEvent::Interrupted
    })
    .await;
    assert!(
        before.is_empty(),
        "nothing before the interruption: {before:?}"
    );
    expect_event(&mut feed, "Resumed after the move", |event| {
        *event == ChangeEvent::Resumed
    })
    .await;
    restock(&allocator, &moved).await;
    expect_event(&mut feed, "the moved slot's change", changed(&moved)).await;
    assert_eq!(
        allocator
            .stock_view(&moved)
            .await
            .expect("view")
            .pool
            .expect("pool")
            .on_hand,
        2
    );

    // A master lost: its notifications stop (Interrupted), the others' are
    // still heard; back, it is heard again (Resumed).
    let victim = masters[2].port;
    cluster.kill(victim);
    expect_event(&mut feed, "Interrupted", |event| {
        *event == ChangeEvent::Interrupted
    })
    .await;
    let health = allocator.health().await;
    assert_eq!(health.masters, 3);
    assert_eq!(health.not_answering.len(), 1, "{health:?}");
    assert!(allocator.ping().await.is_err());
    restock(&allocator, &keys[0]).await;
    expect_event(&mut feed, "a live master's change", changed(&keys[0])).await;
    cluster.restart(victim);
    cluster.wait_served(Duration::from_secs(30));
    expect_event(&mut feed, "Resumed", |event| *event == ChangeEvent::Resumed).await;
    allocator.ping().await.expect("every master answers again");
    restock(&allocator, &keys[2]).await;
    expect_event(&mut feed, "the returned master's change", changed(&keys[2])).await;
    feed.close().await;
}

/// `MONITOR` of one master into a file: every command it ran, one line
/// each (a command refused before it ran, such as a `CROSSSLOT` script, is
/// not shown). Stopped when dropped.
struct Monitor {
    port: u16,
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Monitor {
    fn start(port: u16, directory: &std::path::Path) -> Self {
        let file = directory.join(format!("monitor-{port}.log"));
        // Line-buffered: a file is block-buffered otherwise, and the last
        // commands would wait in redis-cli.
        let child = std::process::Command::new("stdbuf")
            .args(["-oL", "redis-cli", "-p", &port.to_string(), "monitor"])
            .stdout(std::fs::File::create(&file).expect("monitor file"))
            .spawn()
            .expect("redis-cli is installed by scripts/stack");
        // MONITOR answers OK once it is on.
        let deadline = Instant::now() + WITHIN;
        while !std::fs::read_to_string(&file)
            .unwrap_or_default()
            .starts_with("OK")
        {
            assert!(Instant::now() < deadline, "MONITOR on {port} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child, file }
    }

    /// The functions this master ran (`FCALL`'s first argument), up to
    /// now: a marker is sent after them and waited for.
    fn functions(&self) -> std::collections::BTreeSet<String> {
        let marker = testkit::unique_id("monitor-end");
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "echo", &marker])
            .output()
            .expect("redis-cli");
        let deadline = Instant::now() + WITHIN;
        let text = loop {
            let text = std::fs::read_to_string(&self.file).expect("monitor file");
            if text.contains(&marker) {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "MONITOR on {} fell behind",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        text.lines()
            .filter_map(|line| {
                let at = line.to_ascii_lowercase().find("\"fcall\" \"")?;
                let rest = &line[at + "\"fcall\" \"".len()..];
                Some(rest[..rest.find('"')?].to_owned())
            })
            .collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The functions of the library loaded on the master on `port`.
fn library_functions(port: u16) -> std::collections::BTreeSet<String> {
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "function", "list"])
        .output()
        .expect("redis-cli");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .windows(2)
        .filter(|pair| pair[0] == "name")
        .map(|pair| pair[1].to_owned())
        .collect()
}

/// Every Lua operation runs on a cluster: each function of the library is
/// run by some master (seen by `MONITOR`) while the calls below, which
/// between them use every operation, all answer without error. A script
/// whose keys were in two slots would be refused `CROSSSLOT` by Redis
/// (and not shown by `MONITOR`); one routed to the wrong master, `MOVED`.
/// The ledger writers' relay scripts run in `ledger-writer`'s suites, which
/// `scripts/test` also runs on the stack's cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_lua_operation_runs_on_a_cluster() {
    let directory = tempfile::tempdir().expect("cluster dir");
    let cluster = PrivateCluster::start(directory.path(), 3, 0, 2000);
    let masters = cluster.masters();
    let allocator = Allocator::connect(
        &cluster.url(),
        AllocatorSettings {
            node: "node-a".to_owned(),
            ..settings("node-a")
        },
        2,
    )
    .await
    .expect("allocator");
    let library = library_functions(masters[0].port);
    assert_eq!(library.len(), 20, "one function per operation: {library:?}");
    let monitors: Vec<Monitor> = masters
        .iter()
        .map(|master| Monitor::start(master.port, directory.path()))
        .collect();
    let merchant = testkit::unique_id("ops");
    let key = |sku: &str| StockKey::new(&merchant, sku, "dc1");
    let (plain, shirt, hat, hot, lost) = (
        key("plain"),
        key("shirt"),
        key("hat"),
        key("hot"),
        key("lost"),
    );

    // adjust, settings
    for stock_key in [&plain, &shirt, &hat, &hot] {
        restock(&allocator, stock_key).await;
        allocator
            .adjust(&delta(stock_key, 99, &testkit::unique_id("more")))
            .await
            .expect("adjust");
    }
    allocator
        .settings_of(
            &plain,
            allocator::StockSettings {
                safety_stock: 1,
                backorder_limit: 0,
                low_stock_threshold: None,
                reorder_point: None,
                reorder_qty: 0,
            },
        )
        .await
        .expect("settings");

    // claim, reserve_batch, get_reservation, extend, commit, release,
    // expire_due
    let held = allocator
        .reserve(&common::reserve(&plain, 2, &testkit::unique_id("r")))
        .await
        .expect("reserve");
    let id = held.reservation.reservation_id;
    allocator.reservation(None, &id).await.expect("get");
    allocator
        .extend(None, &id, Duration::from_secs(900))
        .await
        .expect("extend");
    allocator
        .commit(None, &id, "commit-1")
        .await
        .expect("commit");
    let held = allocator
        .reserve(&common::reserve(&plain, 1, &testkit::unique_id("r")))
        .await
        .expect("reserve");
    allocator
        .release(None, &held.reservation.reservation_id, "release-1")
        .await
        .expect("release");
    allocator
        .expire_due(plain.partition(PARTITIONS), 100)
        .await
        .expect("expire_due");

    // cart
    let cart = allocator::CartRequest {
        merchant: merchant.clone(),
        lines: [&shirt, &hat]
            .iter()
            .map(|stock_key| allocator::CartLine::at(&stock_key.sku, &stock_key.location, 1))
            .collect(),
        ttl: None,
        idempotency_key: testkit::unique_id("cart"),
        customer_ref: None,
        allow_partial: false,
    };
    allocator.reserve_cart(&cart).await.expect("cart");

    // throttle: a sale's checkout throttle on a key
    let coalescing = allocator::Coalescing {
        wait: Duration::ZERO,
        batch_max: 64,
    };
    let reserver = allocator::Reserver::new(
        allocator.clone(),
        allocator::Coalescer::new(coalescing, std::sync::Arc::new(|_| {})),
    );
    reserver.set_throttles(&[(testkit::unique_id("sale"), shirt.clone(), 100)]);
    reserver
        .reserve(&common::reserve(&shirt, 1, &testkit::unique_id("r")).as_cart())
        .await
        .expect("throttled reserve");

    // allowance: a sale's customer limit (take before the hold; the release
    // settles it in the allowance's partition, another master's or not)
    let limit = allocator::CustomerLimit::new(
        &testkit::unique_id("sale"),
        hat.clone(),
        0,
        0,
        Some(5),
        None,
    );
    reserver.set_customer_limits(vec![limit.clone()]);
    let limited = allocator::ReserveRequest {
        customer_ref: Some("cluster-customer".to_owned()),
        ..common::reserve(&hat, 1, &testkit::unique_id("r"))
    };
    let held = reserver
        .reserve(&limited.as_cart())
        .await
        .expect("limited reserve");
    allocator
        .release(None, &held.cart.reservation_id, "release-limited")
        .await
        .expect("release");
    let allowance = allocator
        .customer_allowance(&limit, "cluster-customer")
        .await
        .expect("allowance");
    assert_eq!((allowance.units, allowance.holds), (0, 0));

    // activate, transfer_out, transfer_in, transfer_done, pending_transfers,
    // drain, fence: a sale's activation and refill, then a count of the key
    let mut sale = allocator::FlashSale {
        name: testkit::unique_id("sale"),
        key: hot.clone(),
        nodes: ["node-a", "node-b", "node-c"]
            .iter()
            .map(|node| (*node).to_owned())
            .collect(),
        presplit_fraction: 0.5,
        refill_chunk_units_min: 5,
        refill_chunk_units_max: 20,
        buckets: Default::default(),
    };
    allocator.place(&mut sale).await.expect("place");
    allocator.activate(&sale, "e1").await.expect("activate");
    allocator
        .refill(&sale, "node-a", 10.0)
        .await
        .expect("refill");
    allocator
        .finish_transfers(hot.partition(PARTITIONS), Duration::ZERO)
        .await
        .expect("pending transfers");
    allocator
        .adjust(&allocator::Adjustment {
            kind: allocator::AdjustmentKind::Absolute,
            source_seq: Some(1),
            ..delta(&hot, 50, &testkit::unique_id("count"))
        })
        .await
        .expect("count");
    allocator.end_activation(&sale, "e1").await.expect("end");

    // rebuild: a cell Redis lost, from what the ledger says
    let pool = lost.pool(PARTITIONS);
    allocator
        .rebuild_cell(&allocator::CellRebuild {
            cell: pool.clone(),
            merchant: lost.merchant.clone(),
            sku: lost.sku.clone(),
            location: lost.location.clone(),
            kind: "pool".to_owned(),
            bucket_node: None,
            expect_version: -1,
            on_hand: 7,
            reserved: 0,
            version: 3,
            out_in_flight: 0,
            safety_stock: 0,
            backorder_limit: 0,
            low_stock_threshold: -1,
            open_holds: Vec::new(),
        })
        .await
        .expect("rebuild");

    let ran: std::collections::BTreeSet<String> =
        monitors.iter().flat_map(Monitor::functions).collect();
    let missing: Vec<&String> = library.difference(&ran).collect();
    assert!(
        missing.is_empty(),
        "functions no master ran: {missing:?} (ran: {ran:?})"
    );
    let masters_used = monitors
        .iter()
        .filter(|monitor| !monitor.functions().is_empty())
        .count();
    assert_eq!(masters_used, 3, "every master ran some of them");
}
