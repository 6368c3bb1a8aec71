//! Source health: when each system that reports a merchant's stock (a POS,
//! a WMS) was last heard from.
//!
//! Owns the one record of it, the sorted set [`keys::SOURCES_SEEN`]
//! (member `merchant|source`, score: Redis time in ms), and the set of
//! sources a process heard from between two writes of it. Who writes: the
//! ledger writer for the events of a source it takes from
//! `kafka.events_topic` (a `heartbeat`, or an adjustment applied, found a
//! duplicate or stale: any event says the source is there), and a gateway
//! for every adjustment it takes over HTTP. Who reads: every gateway, about
//! once a second, to show the locations a quiet source feeds as
//! `source_offline` (the rule is the gateway's; this module records, and
//! answers Redis time to judge against).
//!
//! **Choices.**
//! * *Per merchant.* A source is named by its merchant and its `source`:
//!   two merchants' tills both called `pos-1` are two sources, and a
//!   merchant's admin key cannot keep another merchant's store online.
//! * *When it reported, on Redis's clock.* A sighting is noted with how
//!   long ago the source reported (for a Kafka event, the writer's clock
//!   against the message's timestamp; for an HTTP adjustment, nothing), and
//!   recorded as Redis time less that age (less the time it waited to be
//!   written). So a writer behind on its partitions, or a sighting kept
//!   through a Redis outage, records when the source spoke, not when we
//!   got to it; and the gateways judge against the same Redis clock. The
//!   one host clock left is the till's (or the broker's, for a topic with
//!   `message.timestamp.type=LogAppendTime`), against the writer's.
//! * *Forward only.* `ZADD GT`: whatever order writers flush in, a
//!   source's time never moves back.
//! * *Batched.* A process writes what it heard once a second (one call,
//!   whatever the event rate); a crash forgets at most that second: the
//!   source then looks quiet a second early, never online when it is not.
//! * Entries untouched for [`FORGET_AFTER`] are removed with each write
//!   (sources that were retired).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

use crate::keys;
use crate::{Allocator, Result};

/// How long a source nobody heard from stays in the record.
pub const FORGET_AFTER: Duration = Duration::from_secs(30 * 86_400);

/// A source's member in the record: `merchant|source` (`|` is in no id).
pub fn source_member(merchant: &str, source: &str) -> String {
    format!("{merchant}|{source}")
}

/// The sources a process heard from since its last write: member → when
/// it last reported (this process's monotonic clock).
#[derive(Debug, Default)]
pub struct SourcesSeen {
    seen: Mutex<HashMap<String, Instant>>,
}

impl SourcesSeen {
    /// `source` of `merchant` reported `age` ago (keeps the latest report;
    /// one from before this process started is dropped).
    pub fn note(&self, merchant: &str, source: &str, age: Duration) {
        let Some(reported) = Instant::now().checked_sub(age) else {
            return;
        };
        self.keep(source_member(merchant, source), reported);
    }

    fn keep(&self, member: String, reported: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let latest = seen.entry(member).or_insert(reported);
        *latest = (*latest).max(reported);
    }

    /// Everything noted since the last take.
    pub fn take(&self) -> Vec<(String, Instant)> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *seen).into_iter().collect()
    }

    /// Notes again what a failed write did not store (a later report of
    /// the same source wins).
    pub fn restore(&self, taken: Vec<(String, Instant)>) {
        for (member, reported) in taken {
            self.keep(member, reported);
        }
    }
}

/// A command on the one key it names first (routed by that key's slot).
fn command(name: &'static str) -> CustomCommand {
    CustomCommand::new_static(name, ClusterHash::FirstKey, false)
}

impl Allocator {
    /// Records when the sources `sightings` ([`SourcesSeen::take`])
    /// reported: Redis time of the record's master less how long ago each
    /// did (`ZADD GT`); forgets sources unheard of for [`FORGET_AFTER`].
    pub async fn record_sources_seen(&self, sightings: &[(String, Instant)]) -> Result<()> {
        if sightings.is_empty() {
            return Ok(());
        }
        let client = self.store.for_key(keys::SOURCES_SEEN)?;
        let now_ms = self.redis_time_ms_on(&client).await?;
        let mut zadd = vec![keys::SOURCES_SEEN.to_owned(), "GT".to_owned()];
        for (member, reported) in sightings {
            let age_ms = reported.elapsed().as_millis() as u64;
            zadd.push(now_ms.saturating_sub(age_ms).to_string());
            zadd.push(member.clone());
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

    /// When each of `members` ([`source_member`]) was last heard from (ms,
    /// Redis time), `None` for one never heard from (or forgotten), and
    /// Redis time now on the record's master, to judge them against (0
    /// when `members` is empty: nothing is asked).
    pub async fn sources_seen(&self, members: &[String]) -> Result<(Vec<Option<u64>>, u64)> {
        if members.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let client = self.store.for_key(keys::SOURCES_SEEN)?;
        let now_ms = self.redis_time_ms_on(&client).await?;
        let mut args = vec![keys::SOURCES_SEEN.to_owned()];
        args.extend(members.iter().cloned());
        // ZMSCORE answers an array even for one member (Redis >= 6.2).
        let scores: Vec<Option<String>> = self
            .with_timeout(client.custom(command("ZMSCORE"), args))
            .await?;
        let seen = scores
            .into_iter()
            .map(|score| {
                score
                    .and_then(|ms| ms.parse::<f64>().ok())
                    .map(|ms| ms.max(0.0) as u64)
            })
            .collect();
        Ok((seen, now_ms))
    }
}
