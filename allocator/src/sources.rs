//! Source health: when each system that reports stock (a POS, a WMS) was
//! last heard from.
//!
//! Owns the one record of it, the sorted set [`keys::SOURCES_SEEN`]
//! (`source` → ms since the epoch), and the batch a process fills between
//! two writes of it. Who writes: the ledger writer for every event of a
//! source it applies from `kafka.events_topic` (a `heartbeat`, or an
//! adjustment applied, found a duplicate or stale: any event says the
//! source is there), at the time the source *reported* it (the message's
//! timestamp, never later than the writer's clock); a gateway for every
//! adjustment it takes over HTTP, at its arrival. Who reads: every gateway,
//! about once a second, to show the locations a quiet source feeds as
//! `source_offline` (the rule is the gateway's; this module only records).
//!
//! **Choices.** Writes use `ZADD GT`, so whatever order writers flush in,
//! the record only moves forward; a process batches what it saw and writes
//! it once a second (one call, whatever the event rate), so a crash forgets
//! at most a second of sightings: a source then looks quiet a second early,
//! never online when it is not. Event time, not arrival time, for Kafka
//! events: a writer working through a backlog has not applied what the
//! source reported since, and shown counts still miss those sales. Entries
//! untouched for [`FORGET_AFTER`] are removed with each write (sources
//! that were retired).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

use crate::keys;
use crate::{Allocator, Result};

/// How long a source nobody heard from stays in the record.
pub const FORGET_AFTER: Duration = Duration::from_secs(30 * 86_400);

/// What a process saw since its last write: source → latest ms.
#[derive(Debug, Default)]
pub struct SourcesSeen {
    seen: Mutex<HashMap<String, u64>>,
}

impl SourcesSeen {
    /// `source` reported at `at_ms` (keeps the latest).
    pub fn note(&self, source: &str, at_ms: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        match seen.get_mut(source) {
            Some(latest) => *latest = (*latest).max(at_ms),
            None => {
                seen.insert(source.to_owned(), at_ms);
            }
        }
    }

    /// Everything noted since the last take.
    pub fn take(&self) -> Vec<(String, u64)> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *seen).into_iter().collect()
    }

    /// Notes again what a failed write did not store (never moves a
    /// source back: a later sighting wins).
    pub fn restore(&self, taken: Vec<(String, u64)>) {
        for (source, at_ms) in taken {
            self.note(&source, at_ms);
        }
    }
}

/// A command on the one key it names first (routed by that key's slot).
fn command(name: &'static str) -> CustomCommand {
    CustomCommand::new_static(name, ClusterHash::FirstKey, false)
}

impl Allocator {
    /// Records sightings (`ZADD GT`: a source's time only moves forward)
    /// and forgets sources unheard of for [`FORGET_AFTER`] before `now_ms`.
    pub async fn record_sources_seen(&self, seen: &[(String, u64)], now_ms: u64) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let client = self.store.for_key(keys::SOURCES_SEEN)?;
        let mut zadd = vec![keys::SOURCES_SEEN.to_owned(), "GT".to_owned()];
        for (source, at_ms) in seen {
            zadd.push(at_ms.to_string());
            zadd.push(source.clone());
        }
        let _: i64 = self
            .with_timeout(client.custom(command("ZADD"), zadd))
            .await?;
        let forget_before = now_ms.saturating_sub(FORGET_AFTER.as_millis() as u64);
        let _: i64 = self
            .with_timeout(client.custom(
                command("ZREMRANGEBYSCORE"),
                vec![
                    keys::SOURCES_SEEN.to_owned(),
                    "-inf".to_owned(),
                    format!("({forget_before}"),
                ],
            ))
            .await?;
        Ok(())
    }

    /// When each of `sources` was last heard from (ms), `None` for one
    /// never heard from (or forgotten).
    pub async fn sources_seen(&self, sources: &[String]) -> Result<Vec<Option<u64>>> {
        if sources.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.store.for_key(keys::SOURCES_SEEN)?;
        let mut args = vec![keys::SOURCES_SEEN.to_owned()];
        args.extend(sources.iter().cloned());
        // ZMSCORE answers an array even for one member (Redis >= 6.2).
        let scores: Vec<Option<String>> = self
            .with_timeout(client.custom(command("ZMSCORE"), args))
            .await?;
        Ok(scores
            .into_iter()
            .map(|score| {
                score
                    .and_then(|ms| ms.parse::<f64>().ok())
                    .map(|ms| ms.max(0.0) as u64)
            })
            .collect())
    }
}
