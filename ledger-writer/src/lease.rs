//! Partition leases: which running writer relays which partition's outbox.
//!
//! Owns dividing the partitions between writer instances and fencing a
//! writer that lost one. It does not relay anything.
//!
//! Every writer renews its membership in [`allocator::keys::WRITERS_KEY`] (a sorted set
//! scored by the Redis time its membership lapses) and, for each partition,
//! computes the partition's owner among the live writers by rendezvous
//! hashing ([`owner_of`]).
//! It takes the leases it owns, renews them, and releases those another live
//! writer now owns, so partitions spread evenly and move as little as
//! possible when writers come and go. A writer that dies stops renewing: its
//! membership and its leases lapse after the lease time, and the others take
//! its partitions on their next tick. Takeover is therefore bounded by the
//! lease time plus one tick (a third of it).
//!
//! A lease is `owner token` in `inv:{p}:lease` with a TTL; the token comes
//! from a per-partition counter, so it grows with every new lease. Fencing is
//! not left to timing: the relay's reads and acknowledgements are scripts
//! that check the lease atomically with the stream (`lua/relay_read.lua`,
//! `lua/relay_ack.lua`), and the PostgreSQL batch refuses a token older than
//! the newest it has seen for the partition (table `relay_fence`). A paused
//! writer that wakes after losing its lease can therefore read nothing,
//! acknowledge nothing and write nothing to PostgreSQL; what it may still
//! have in flight to Kafka is a duplicate of entries the new holder relays
//! again from the start of the pending list, with the same entry ids, so the
//! first copy of each entry id in Kafka is still in stream order.
//!
//! A Redis that lost its token counters (replaced, or restored from an old
//! copy) hands out tokens PostgreSQL has seen, and the fence would refuse
//! every batch for ever. A writer that still holds the lease in Redis
//! therefore advances its token past the fence (`relay_lease.lua`'s
//! `advance`), but only once nobody has written that fence for a lease time:
//! a fence still being written means another writer relays the partition,
//! from this Redis (then this writer's lease is stale) or from another store
//! sharing the database, and the writer stays fenced (so two stores cannot
//! take turns). A fence accepts an equal token only from the writer that
//! wrote it.

use std::collections::BTreeMap;
use std::time::Duration;

use allocator::outbox::LeaseReply;
use allocator::{Allocator, AllocatorError};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

/// A lease this writer holds on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The partition.
    pub partition: u32,
    /// The fencing token (grows with every new lease of the partition).
    pub token: u64,
    /// The lease as stored, `owner token`: what the fenced scripts compare.
    pub value: String,
}

/// What a tick changed, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    /// Leases taken.
    pub acquired: usize,
    /// Leases given up to the writer that now owns the partition.
    pub released: usize,
    /// Leases found expired or taken by another writer.
    pub lost: usize,
}

/// This writer's view of the partition leases.
pub struct Leases {
    /// The store, where the leases live (the allocator's relay calls).
    allocator: Allocator,
    /// This writer's id (the config's `node.id`).
    owner: String,
    /// How long a lease and a membership last unless renewed.
    ttl: Duration,
    /// Partitions of the deployment.
    partitions: u32,
    /// What this writer holds now.
    held: BTreeMap<u32, Lease>,
}

impl Leases {
    /// Leases for `owner` over `partitions`, lasting `ttl` unless renewed.
    pub fn new(allocator: Allocator, owner: String, ttl: Duration, partitions: u32) -> Self {
        Self {
            allocator,
            owner,
            ttl,
            partitions,
            held: BTreeMap::new(),
        }
    }

    /// How often [`Leases::tick`] should run: a third of the lease time, so
    /// a lease is renewed twice before it could lapse.
    pub fn tick_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// The leases held after the last tick.
    pub fn held(&self) -> Vec<Lease> {
        self.held.values().cloned().collect()
    }

    /// The live writers, this one included, after renewing its membership
    /// (`join`), or without it (`leave`).
    async fn writers(&self, action: &str) -> Result<Vec<String>, AllocatorError> {
        self.allocator
            .relay_writers(action, &self.owner, self.ttl.as_millis() as u64)
            .await
    }

    /// Renews membership, then takes, renews or gives up each partition's
    /// lease as rendezvous hashing over the live writers says.
    pub async fn tick(&mut self) -> Result<Changes, AllocatorError> {
        let writers = self.writers("join").await?;
        let mut changes = Changes::default();
        for partition in 0..self.partitions {
            let ours = owner_of(partition, &writers) == Some(self.owner.as_str());
            if ours {
                match self.call(partition, "hold").await? {
                    LeaseReply {
                        status,
                        token: Some(token),
                        ..
                    } if status == "acquired" || status == "held" => {
                        if status == "acquired" {
                            changes.acquired += 1;
                        }
                        self.held.insert(
                            partition,
                            Lease {
                                partition,
                                token,
                                value: format!("{} {token}", self.owner),
                            },
                        );
                    }
                    reply => {
                        if self.held.remove(&partition).is_some() {
                            changes.lost += 1;
                            warn!(partition, holder = ?reply.holder, "partition lease lost");
                        }
                    }
                }
            } else if self.held.remove(&partition).is_some() {
                let _ = self.call(partition, "release").await?;
                changes.released += 1;
            }
        }
        if changes != Changes::default() {
            info!(
                writers = writers.len(),
                held = self.held.len(),
                acquired = changes.acquired,
                released = changes.released,
                lost = changes.lost,
                "partition leases changed"
            );
        }
        Ok(changes)
    }

    /// Gives up every lease and the membership (a clean shutdown), so the
    /// other writers take over at once instead of after the lease time.
    pub async fn release_all(&mut self) -> Result<(), AllocatorError> {
        let partitions: Vec<u32> = self.held.keys().copied().collect();
        for partition in partitions {
            let _ = self.call(partition, "release").await?;
            self.held.remove(&partition);
        }
        self.writers("leave").await?;
        Ok(())
    }

    async fn call(&self, partition: u32, action: &str) -> Result<LeaseReply, AllocatorError> {
        self.allocator
            .relay_lease(partition, action, &self.owner, self.ttl.as_millis() as u64)
            .await
    }
}

/// The writer that owns `partition` among `writers`: the one with the highest
/// score, the first 8 bytes of SHA-256 of `writer 0x1F partition`
/// (rendezvous hashing; a cryptographic hash because the scores of similar
/// names must be independent, and it is the same on every writer).
pub fn owner_of(partition: u32, writers: &[String]) -> Option<&str> {
    let score = |writer: &str| {
        let digest = Sha256::new()
            .chain_update(writer.as_bytes())
            .chain_update([0x1F])
            .chain_update(partition.to_be_bytes())
            .finalize();
        u64::from_be_bytes(
            digest[..8]
                .try_into()
                .expect("a SHA-256 digest has 32 bytes"),
        )
    };
    writers
        .iter()
        .max_by_key(|writer| (score(writer), writer.as_str()))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::owner_of;

    fn writers(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn partitions_spread_over_writers_and_move_little_when_one_leaves() {
        let three = writers(&["writer-a", "writer-b", "writer-c"]);
        let two = writers(&["writer-a", "writer-b"]);
        let mut per_writer = std::collections::HashMap::new();
        let mut moved = 0;
        for partition in 0..64 {
            let owner = owner_of(partition, &three).expect("an owner");
            *per_writer.entry(owner).or_insert(0) += 1;
            let after = owner_of(partition, &two).expect("an owner");
            if owner != "writer-c" && after != owner {
                moved += 1;
            }
        }
        assert_eq!(per_writer.len(), 3, "{per_writer:?}");
        assert!(
            per_writer.values().all(|count| *count >= 10),
            "{per_writer:?}"
        );
        assert_eq!(moved, 0, "only the leaving writer's partitions move");
    }

    #[test]
    fn no_writers_own_nothing() {
        assert_eq!(owner_of(3, &[]), None);
    }
}
