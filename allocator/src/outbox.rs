//! The ledger writers' side of the store: reading and acknowledging each
//! partition's outbox stream under a partition lease, measuring its lag,
//! the leases themselves and the registry of running writers.
//!
//! Owns the calls to `lua/relay_*.lua` (plain scripts: no stock library, no
//! stock keys), typed, with every reply's schema version checked, so nothing
//! outside this crate touches Redis. It decides no stock; fencing is checked
//! inside the scripts, atomically with the stream.

use std::sync::Arc;

use fred::prelude::*;
use fred::types::scripts::Script;
use serde::Deserialize;
use serde_json::Value;

use crate::keys::{self, WRITERS_KEY};
use crate::{Allocator, AllocatorError, Result};

/// The consumer group every writer of a deployment shares.
pub const OUTBOX_GROUP: &str = "ledger-writer";

/// The one consumer name every writer reads as: only the lease holder reads,
/// and what a dead holder left pending is the next holder's to relay.
pub const OUTBOX_CONSUMER: &str = "relay";

/// The reply schema version of the relay scripts.
const RELAY_REPLY_VERSION: u64 = 1;

/// The relay scripts, loaded once, run by SHA.
#[derive(Clone)]
pub(crate) struct RelayScripts(Arc<[Script; 5]>);

impl RelayScripts {
    pub(crate) fn new() -> Self {
        Self(Arc::new([
            Script::from_lua(include_str!("../../lua/relay_read.lua")),
            Script::from_lua(include_str!("../../lua/relay_ack.lua")),
            Script::from_lua(include_str!("../../lua/relay_lag.lua")),
            Script::from_lua(include_str!("../../lua/relay_lease.lua")),
            Script::from_lua(include_str!("../../lua/relay_writers.lua")),
        ]))
    }
}

#[derive(Clone, Copy)]
enum Relay {
    Read = 0,
    Ack = 1,
    Lag = 2,
    Lease = 3,
    Writers = 4,
}

/// A batch of the outbox, as read by the lease holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxRead {
    /// Entries: stream id and the entry's text (none: the entry was deleted
    /// from the stream while pending).
    Entries(Vec<(String, Option<String>)>),
    /// The caller no longer holds the partition's lease: nothing was read.
    Fenced,
}

/// How far behind one partition's outbox is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct OutboxLag {
    /// Entries not yet acknowledged (pending or never read).
    pub entries: u64,
    /// Redis time (ms) of the oldest of them; 0 when there is none.
    pub oldest_ms: u64,
    /// Redis time (ms) when measured.
    pub now_ms: u64,
}

impl OutboxLag {
    /// Age of the oldest unrelayed entry, in ms (0 when there is none).
    pub fn oldest_age_ms(&self) -> u64 {
        if self.oldest_ms == 0 {
            0
        } else {
            self.now_ms.saturating_sub(self.oldest_ms)
        }
    }
}

/// What a lease call answered.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LeaseReply {
    /// `held`, `acquired`, `advanced`, `taken`, `released` or `not_held`.
    pub status: String,
    /// The fencing token of a lease held or acquired.
    #[serde(default)]
    pub token: Option<u64>,
    /// Who holds it, when another writer does.
    #[serde(default)]
    pub holder: Option<String>,
}

impl Allocator {
    async fn relay_call(
        &self,
        script: Relay,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value> {
        // Every relay script's keys share one slot: the first names it.
        let client = match keys.first() {
            Some(key) => self.store.for_key(key)?,
            None => self.store.any(),
        };
        let text: String = self
            .with_timeout(
                self.relay_scripts.0[script as usize].evalsha_with_reload(&client, keys, args),
            )
            .await?;
        let reply: Value = serde_json::from_str(&text).map_err(|error| {
            AllocatorError::Protocol(format!("relay script reply {text:?}: {error}"))
        })?;
        if reply["v"].as_u64() != Some(RELAY_REPLY_VERSION) {
            return Err(AllocatorError::Protocol(format!(
                "relay script reply version: {text}"
            )));
        }
        if reply["status"] == "bad_argument" {
            return Err(AllocatorError::InvalidRequest(format!(
                "relay script refused its arguments: {text}"
            )));
        }
        Ok(reply)
    }

    /// Creates the writers' consumer group on `partition`'s outbox if it is
    /// missing (reading from the very first entry).
    pub async fn outbox_ensure_group(&self, partition: u32) -> Result<()> {
        let client = self.store.for_partition(partition)?;
        let created: Result<()> = self
            .with_timeout(client.xgroup_create(
                keys::ledger_stream(partition),
                OUTBOX_GROUP,
                "0",
                true,
            ))
            .await;
        match created {
            Err(AllocatorError::StoreUnavailable(error)) if error.contains("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// The next batch (at most `count`) of `partition`'s outbox for the
    /// holder of `lease` (`owner token`): entries left pending first.
    pub async fn outbox_read(
        &self,
        partition: u32,
        lease: &str,
        count: usize,
    ) -> Result<OutboxRead> {
        let reply = self
            .relay_call(
                Relay::Read,
                vec![
                    keys::relay_lease_key(partition),
                    keys::ledger_stream(partition),
                ],
                vec![
                    lease.to_owned(),
                    OUTBOX_GROUP.to_owned(),
                    OUTBOX_CONSUMER.to_owned(),
                    count.to_string(),
                ],
            )
            .await?;
        match reply["status"].as_str() {
            Some("fenced") => Ok(OutboxRead::Fenced),
            Some("ok") => {
                let entries = match &reply["entries"] {
                    Value::Object(map) if map.is_empty() => Vec::new(),
                    entries => serde_json::from_value(entries.clone()).map_err(crate::protocol)?,
                };
                Ok(OutboxRead::Entries(entries))
            }
            _ => Err(AllocatorError::Protocol(format!(
                "relay_read reply: {reply}"
            ))),
        }
    }

    /// Acknowledges `ids` of `partition`'s outbox and trims below the oldest
    /// unacknowledged entry, for the holder of `lease`; false when fenced
    /// (nothing was acknowledged).
    pub async fn outbox_ack(&self, partition: u32, lease: &str, ids: Vec<String>) -> Result<bool> {
        let mut args = vec![lease.to_owned(), OUTBOX_GROUP.to_owned()];
        args.extend(ids);
        let reply = self
            .relay_call(
                Relay::Ack,
                vec![
                    keys::relay_lease_key(partition),
                    keys::ledger_stream(partition),
                ],
                args,
            )
            .await?;
        match reply["status"].as_str() {
            Some("ok") => Ok(true),
            Some("fenced") => Ok(false),
            _ => Err(AllocatorError::Protocol(format!(
                "relay_ack reply: {reply}"
            ))),
        }
    }

    /// How far behind `partition`'s outbox is (read only).
    pub async fn outbox_lag(&self, partition: u32) -> Result<OutboxLag> {
        let reply = self
            .relay_call(
                Relay::Lag,
                vec![keys::ledger_stream(partition)],
                vec![OUTBOX_GROUP.to_owned()],
            )
            .await?;
        serde_json::from_value(reply).map_err(crate::protocol)
    }

    /// Takes or renews (`hold`) or gives up (`release`) `owner`'s lease on
    /// `partition`'s outbox, lasting `ttl_ms`.
    pub async fn relay_lease(
        &self,
        partition: u32,
        action: &str,
        owner: &str,
        ttl_ms: u64,
    ) -> Result<LeaseReply> {
        self.lease_call(
            partition,
            vec![action.to_owned(), owner.to_owned(), ttl_ms.to_string()],
        )
        .await
    }

    /// Gives `owner`'s lease on `partition` a new token larger than `floor`
    /// (PostgreSQL's fence for the partition) when `owner` holds it
    /// (`advanced`, with the token; else `not_held`): for a token counter
    /// that went back, Redis having lost or replaced it.
    pub async fn relay_lease_advance(
        &self,
        partition: u32,
        owner: &str,
        floor: u64,
    ) -> Result<LeaseReply> {
        // The lease time is not used by `advance` (the lease keeps its own).
        let args = ["advance", owner, "1", &floor.to_string()].map(str::to_owned);
        self.lease_call(partition, args.to_vec()).await
    }

    /// `lua/relay_lease.lua` on `partition`'s lease and token counter.
    async fn lease_call(&self, partition: u32, args: Vec<String>) -> Result<LeaseReply> {
        let reply = self
            .relay_call(
                Relay::Lease,
                vec![
                    keys::relay_lease_key(partition),
                    keys::relay_lease_token_key(partition),
                ],
                args,
            )
            .await?;
        serde_json::from_value(reply).map_err(crate::protocol)
    }

    /// The live writers after `writer` joins or renews (`join`) or leaves
    /// (`leave`) the registry, its membership lasting `ttl_ms`.
    pub async fn relay_writers(
        &self,
        action: &str,
        writer: &str,
        ttl_ms: u64,
    ) -> Result<Vec<String>> {
        let reply = self
            .relay_call(
                Relay::Writers,
                vec![WRITERS_KEY.to_owned()],
                vec![action.to_owned(), writer.to_owned(), ttl_ms.to_string()],
            )
            .await?;
        crate::hot::list(&reply["writers"])
    }
}
