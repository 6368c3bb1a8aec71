//! Where a stock key's data lives in Redis: partitions, hash tags, cell ids.
//!
//! Owns the key layout; nothing outside this crate builds a Redis key. Every
//! partition `p` has the same nine keys, all under the hash tag `{p}` so one
//! script can touch them together on a Redis Cluster:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `inv:{p}:cells` | hash | cell id → cell JSON (`on_hand`, `reserved`, `version`, settings) |
//! | `inv:{p}:res` | hash | reservation id → reservation JSON |
//! | `inv:{p}:due` | zset | held reservation ids by the time their hold ends (ms) |
//! | `inv:{p}:idem` | hash | idempotency key → fingerprint and stored reply; `e|…` adjustment event ids |
//! | `inv:{p}:seq` | hash | `stock key|source` → last applied `source_seq` |
//! | `inv:{p}:ledger` | stream | the partition's ledger entries: the outbox the writer relays |
//! | `inv:{p}:gc` | zset | retained records to delete, by time (24 h after they end) |
//! | `inv:{p}:duecell` | zset | `cell|hold_until_ms|id` (score 0, ordered by name): a cell's due holds, so a decision on a cell releases exactly that cell's dead holds first |
//! | `inv:{p}:xfer` | hash | transfers debited here (`id`), credited here (`in|id`), flash-sale activations (`activation|sale|epoch`), carts being committed or released (`cart|id`) |
//!
//! The ledger writers add two keys per partition, `inv:{p}:lease` and
//! `inv:{p}:lease_token` ([`relay_lease_key`], [`relay_lease_token_key`]),
//! and one registry, [`WRITERS_KEY`]. Each partition's cell changes are
//! published on its shard channel `inv:{p}:changes` ([`changes_channel`]).
//!
//! Reservation records in `inv:{p}:res` are either one line (a hold in one
//! cell of this partition) or a cart (its lines' ids and partitions; the
//! lines live in their own keys' partitions). Node heartbeats are plain keys
//! `inv:node:<node>:heartbeat` with a TTL, outside the partitions, as is
//! the record of when stock-reporting sources were last heard from
//! ([`SOURCES_SEEN`]).
//!
//! A stock key `(merchant, sku, location)` lives in partition
//! `fnv1a64(merchant 0x1F sku 0x1F location) mod P`; its pool cell id is
//! `merchant|sku|location|pool`. A hot key's bucket for node `n` has cell id
//! `merchant|sku|location|bucket|n`, in the partition the key's pool records
//! for `n` (the pool is the one home of where its buckets are); a bucket the
//! pool does not list yet goes where [`StockKey::bucket`] places it.
//! `|` cannot appear in an id, so cell ids are unambiguous. The hash is part of
//! the deployment contract: changing it moves every key.
//!
//! ## Spreading a sale's buckets over Redis Cluster masters
//!
//! A hot SKU grows with shards only if its buckets are on different masters,
//! and hashing alone puts three nodes' buckets on three different masters of
//! three only 2 times in 9. So the `i`-th of a sale's `n` nodes gets its
//! bucket in a partition whose hash slot lies in the `i`-th `n`-th of the slot
//! space (`slot · n / 16384 = i`): the first partition that
//! `fnv1a64(merchant 0x1F sku 0x1F location 0x1F node [0x1F attempt])`
//! names there, attempt 0 being the plain hash. A cluster made by
//! `redis-cli --cluster create` gives each of `m` masters one contiguous
//! `m`-th of the slots, so a sale over `n = m` nodes has one bucket on every
//! master (over `n > m` nodes, `n / m` or so on each). The placement is
//! chosen from the config alone, so every node and the reconciler agree
//! without asking the cluster. It depends on the sale's node order, so the
//! pool's record wins over it: a bucket never moves while the pool lists it
//! (the transfer scripts refuse a bucket in another partition), and a later
//! sale over other nodes finds the earlier buckets where they are.

use std::fmt;

/// `(merchant, sku, location)`: the unit stock is counted in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StockKey {
    /// Merchant id.
    pub merchant: String,
    /// SKU id.
    pub sku: String,
    /// Location id (warehouse, store).
    pub location: String,
}

impl StockKey {
    /// A stock key from its three ids (validated by the caller's API layer and
    /// again by the scripts).
    pub fn new(
        merchant: impl Into<String>,
        sku: impl Into<String>,
        location: impl Into<String>,
    ) -> Self {
        Self {
            merchant: merchant.into(),
            sku: sku.into(),
            location: location.into(),
        }
    }

    fn hash_with(&self, node: Option<&str>) -> u64 {
        self.hasher(node).finish()
    }

    fn hasher(&self, node: Option<&str>) -> Fnv1a64 {
        let mut hash = Fnv1a64::new();
        hash.write(self.merchant.as_bytes());
        hash.write(&[0x1F]);
        hash.write(self.sku.as_bytes());
        hash.write(&[0x1F]);
        hash.write(self.location.as_bytes());
        if let Some(node) = node {
            hash.write(&[0x1F]);
            hash.write(node.as_bytes());
        }
        hash
    }

    /// The partition of this key's pool cell.
    pub fn partition(&self, partitions: u32) -> u32 {
        (self.hash_with(None) % u64::from(partitions)) as u32
    }

    /// The pool cell.
    pub fn pool(&self, partitions: u32) -> CellRef {
        CellRef {
            partition: self.partition(partitions),
            id: format!("{}|{}|{}|pool", self.merchant, self.sku, self.location),
        }
    }

    /// Where node `node`'s bucket for this key goes when a sale over `nodes`
    /// first lends to it (see the module docs: the `i`-th node's bucket in
    /// the `i`-th `n`-th of the hash slots). A node the list does not name,
    /// and a partition count too small to have a partition in its share of
    /// the slots, get the plain hash.
    pub fn bucket(&self, node: &str, nodes: &[String], partitions: u32) -> CellRef {
        let hashed = |attempt: Option<u32>| {
            let mut hash = self.hasher(Some(node));
            if let Some(attempt) = attempt {
                hash.write(&[0x1F]);
                hash.write(&attempt.to_be_bytes());
            }
            (hash.finish() % u64::from(partitions)) as u32
        };
        let spread = nodes.iter().position(|n| n == node).and_then(|index| {
            (0..SPREAD_ATTEMPTS)
                .map(|attempt| hashed((attempt > 0).then_some(attempt)))
                .find(|&partition| slot_share(partition, nodes.len()) == index)
        });
        self.bucket_in(node, spread.unwrap_or_else(|| hashed(None)))
    }

    /// Node `node`'s bucket cell for this key in `partition` (where the
    /// key's pool records it).
    pub fn bucket_in(&self, node: &str, partition: u32) -> CellRef {
        CellRef {
            partition,
            id: format!(
                "{}|{}|{}|bucket|{}",
                self.merchant, self.sku, self.location, node
            ),
        }
    }
}

impl fmt::Display for StockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.merchant, self.sku, self.location)
    }
}

/// A cell: where it lives and its id inside the partition's `cells` hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CellRef {
    /// Partition of the cell.
    pub partition: u32,
    /// Cell id, `merchant|sku|location|pool` or `…|bucket|node`.
    pub id: String,
}

/// The nine Redis keys of one partition, in the order every script expects.
pub fn partition_keys(partition: u32) -> Vec<String> {
    [
        "cells", "res", "due", "idem", "seq", "ledger", "gc", "xfer", "duecell",
    ]
    .iter()
    .map(|name| format!("inv:{{{partition}}}:{name}"))
    .collect()
}

/// The partition's ledger stream (the outbox).
pub fn ledger_stream(partition: u32) -> String {
    format!("inv:{{{partition}}}:ledger")
}

/// The ledger writers' lease on the partition's outbox (`owner token`, with
/// a TTL), in the partition's slot so the relay's fenced reads and
/// acknowledgements check it atomically with the stream.
pub fn relay_lease_key(partition: u32) -> String {
    format!("inv:{{{partition}}}:lease")
}

/// The partition's lease token counter: every new lease gets a larger token,
/// which PostgreSQL checks too (a writer with an older token is fenced out).
pub fn relay_lease_token_key(partition: u32) -> String {
    format!("inv:{{{partition}}}:lease_token")
}

/// The running ledger writers: a sorted set of writer ids scored by the Redis
/// time (ms) their membership lapses unless renewed.
pub const WRITERS_KEY: &str = "inv:writers";

/// The partition's cells hash.
pub fn cells_hash(partition: u32) -> String {
    format!("inv:{{{partition}}}:cells")
}

/// The set of locations a `(merchant, sku)` has stock keys at. Kept by the
/// allocator before each adjustment, settings or rebuild script (an
/// idempotent SADD; the key is in another slot than the cell), so a reader
/// that hears the script's change finds the location. A location whose
/// first change was refused or lost stays in the set without a pool;
/// readers skip it.
pub fn locations_key(merchant: &str, sku: &str) -> String {
    format!("inv:locations:{{{merchant}|{sku}}}")
}

/// A merchant's location settings set through the admin API (location →
/// JSON `{"priority","ship_from"}`, `crate::placement`): they override the
/// config's for the location. One hash per merchant, outside the
/// partitions; read by every placement of a line without a location.
pub fn location_settings_key(merchant: &str) -> String {
    format!("inv:location-settings:{{{merchant}}}")
}

/// A merchant's substitutes (SKU → JSON list of `{"sku","units","replaces"}`
/// in order of preference, `crate::substitutes`): one hash per merchant,
/// outside the partitions.
pub fn substitutes_key(merchant: &str) -> String {
    format!("inv:substitutes:{{{merchant}}}")
}

/// The stock keys of `partition` (their pools' partition) that have had
/// flash-sale buckets: a set of `merchant|sku|location`. Added before every
/// activation and refill, so the reconciler finds buckets whose sale is
/// gone from the config; removed by it once every bucket of the key is
/// empty. In the pool's slot, not one set for all keys: a refill touches
/// only its pool's master and its bucket's, so one master lost stops no
/// other master's sales.
pub fn hot_keys_set(partition: u32) -> String {
    format!("inv:{{{partition}}}:hotkeys")
}

/// The one set of hot keys of releases before [`hot_keys_set`]: read only
/// to move its members to their partitions' sets
/// (`Allocator::hot_keys`).
pub const LEGACY_HOT_KEYS: &str = "inv:hotkeys";

/// When each stock-reporting source was last heard from: a sorted set,
/// source → ms (`crate::sources`), outside the partitions.
pub const SOURCES_SEEN: &str = "inv:sources:seen";

/// A node's heartbeat (a plain key with a TTL, outside the partitions).
pub fn heartbeat_key(node: &str) -> String {
    format!("inv:node:{node}:heartbeat")
}

/// The shard channel the scripts publish partition `partition`'s cell
/// changes on (`SPUBLISH`), under the partition's hash tag: on a Redis
/// Cluster a notification goes to the subscribers of the partition's master
/// only. Classic `PUBLISH` on a cluster is broadcast over the cluster bus to
/// every node, so every change cost every master a bus message (seen in
/// `CLUSTER INFO` after a `scripts/bench-cluster` run on classic channels:
/// each of three masters had sent and received ~62,000 publish messages).
/// The scripts derive the name from the partition's `cells` key
/// (`inv:{p}:cells` → `inv:{p}:changes`).
pub fn changes_channel(partition: u32) -> String {
    format!("inv:{{{partition}}}:changes")
}

/// Reservation ids carry their partition so any node finds the record from the
/// id alone: `r<partition>.<24 hex digits>`.
pub fn reservation_partition(reservation_id: &str, partitions: u32) -> Option<u32> {
    let rest = reservation_id.strip_prefix('r')?;
    let (partition, random) = rest.split_once('.')?;
    if random.is_empty() || partition.is_empty() || partition.len() > 5 {
        return None;
    }
    let partition: u32 = partition.parse().ok()?;
    (partition < partitions).then_some(partition)
}

/// A new reservation id in `partition`, from 96 bits of `random`.
pub fn reservation_id(partition: u32, random: [u8; 12]) -> String {
    format!("r{partition}.{}", hex::encode(random))
}

/// Candidate partitions [`StockKey::bucket`] tries for a node's share of the
/// slots before it settles for the plain hash (a share holds about `P / n`
/// partitions, so a few tries find one whenever there is one).
const SPREAD_ATTEMPTS: u32 = 256;

/// Hash slots of a Redis Cluster.
const CLUSTER_SLOTS: usize = 16384;

/// The hash slot of every key of `partition` (its hash tag `{partition}`).
pub fn partition_slot(partition: u32) -> u16 {
    // The tag's decimal digits, written on the stack: this runs on the
    // hot-SKU reservation path (placing a bucket the pool does not list yet).
    let mut digits = [0u8; 10];
    let mut start = digits.len();
    let mut rest = partition;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    fred::util::redis_keyslot(&digits[start..])
}

/// Which of `shares` equal, contiguous shares of the hash slots holds
/// `partition`'s slot.
fn slot_share(partition: u32, shares: usize) -> usize {
    usize::from(partition_slot(partition)) * shares / CLUSTER_SLOTS
}

/// FNV-1a, 64 bit: small, stable across versions and platforms, and good
/// enough to spread keys over partitions.
struct Fnv1a64(u64);

impl Fnv1a64 {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        let hash = |text: &str| {
            let mut h = Fnv1a64::new();
            h.write(text.as_bytes());
            h.finish()
        };
        assert_eq!(hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn keys_of_a_partition_share_one_hash_tag() {
        let keys = partition_keys(17);
        assert_eq!(keys.len(), 9);
        assert!(keys.iter().all(|key| key.starts_with("inv:{17}:")));
        assert_eq!(ledger_stream(17), keys[5]);
        assert_eq!(cells_hash(17), keys[0]);
        // The scripts publish on the cells key's name with `changes` for `cells`.
        assert_eq!(changes_channel(17), keys[0].replace(":cells", ":changes"));
    }

    #[test]
    fn a_sales_buckets_take_one_share_of_the_slots_each() {
        let nodes: Vec<String> = ["node-a", "node-b", "node-c"].map(String::from).to_vec();
        for sku in 0..200 {
            let key = StockKey::new("m1", format!("sku-{sku}"), "dc1");
            let shares: Vec<usize> = nodes
                .iter()
                .map(|node| slot_share(key.bucket(node, &nodes, 64).partition, 3))
                .collect();
            assert_eq!(shares, [0, 1, 2], "{key}");
        }
        // The slot of a partition is Redis' own (CLUSTER KEYSLOT "{0}" is 13907).
        assert_eq!(partition_slot(0), 13907);
        for partition in [7, 17, 63, 1024, u32::MAX] {
            assert_eq!(
                partition_slot(partition),
                fred::util::redis_keyslot(partition.to_string().as_bytes())
            );
        }
        assert_eq!(
            fred::util::redis_keyslot(ledger_stream(0).as_bytes()),
            13907
        );
    }

    #[test]
    fn a_node_no_sale_lists_gets_the_plain_hash() {
        let key = StockKey::new("m1", "console", "dc1");
        let nodes: Vec<String> = vec!["node-a".into()];
        let plain = (key.hash_with(Some("node-z")) % 64) as u32;
        assert_eq!(key.bucket("node-z", &nodes, 64).partition, plain);
        // One node: every slot is its share, so the plain hash is taken.
        let plain = (key.hash_with(Some("node-a")) % 64) as u32;
        assert_eq!(key.bucket("node-a", &nodes, 64).partition, plain);
        let partitions: std::collections::HashSet<u32> = (0..8)
            .map(|n| key.bucket(&format!("node-{n}"), &[], 64).partition)
            .collect();
        assert!(partitions.len() >= 4, "{partitions:?}");
        assert_eq!(key.pool(64).id, "m1|console|dc1|pool");
        assert_eq!(
            key.bucket("node-a", &nodes, 64).id,
            "m1|console|dc1|bucket|node-a"
        );
        assert_eq!(key.bucket_in("node-a", 5).partition, 5);
    }

    #[test]
    fn reservation_ids_carry_their_partition() {
        let id = reservation_id(42, [7; 12]);
        assert_eq!(id, "r42.070707070707070707070707");
        assert_eq!(reservation_partition(&id, 64), Some(42));
        assert_eq!(
            reservation_partition(&id, 42),
            None,
            "partition out of range"
        );
        assert_eq!(reservation_partition("x42.abc", 64), None);
        assert_eq!(reservation_partition("r.abc", 64), None);
        assert_eq!(reservation_partition("r42.", 64), None);
    }
}
