//! Source health as availability shows it: which locations are fed by a
//! source that has gone quiet, and what they hold back meanwhile.
//!
//! Owns the rule (a source is offline when nothing current from it was
//! taken for longer than its `sources[].offline_after_seconds`, or it was
//! never heard from) and the node's current answer. The record of when each source was
//! last heard from is the allocator's ([`allocator::sources`]): the ledger
//! writer fills it from `kafka.events_topic`, and this node from the
//! adjustments it takes over HTTP ([`SourceHealth::seen`], written by the
//! app's source watcher once a second, just before it reads the record).
//!
//! **What offline changes.** Each location whose `locations[].source` is
//! offline shows `source_offline: true` on every SKU, and its shown
//! `available` (and status) is reduced by the location's
//! `offline_buffer_units`, never below 0: units the store may be selling
//! while its sales do not reach us. Only what is *shown* changes, as
//! shared/API.md says: holds are decided on the cells, and the backlog the
//! source sends when it is back is applied as facts (deltas, any order,
//! once each), a loss past what was sellable flagged as a shortfall and
//! signalled by the writer.
//!
//! **Choices.** A source never heard from is offline: nothing says its
//! counts are current (after a fresh start, its first event puts it right
//! within a second); a node starts with every watched location offline
//! until its first look at the record. Quiet is judged against Redis time
//! (the record's clock), never a host's. Each node decides for itself once
//! a second from the shared record, so nodes agree within a second; with
//! Redis unreachable a node keeps what it last decided. A flip marks the
//! whole cache dirty and wakes every stream: each cached SKU is read again
//! once, on its next read (flips are rare, minutes apart per source; a
//! per-merchant generation would spare other merchants' SKUs at the cost of
//! a lookup on every hit).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use config::{Config, LocationConfig, SourceConfig};

/// The source that feeds `location` of `merchant` (`locations[].source`).
pub fn source_of<'c>(config: &'c Config, merchant: &str, location: &str) -> Option<&'c str> {
    config
        .locations
        .iter()
        .find(|entry| entry.merchant == merchant && entry.location == location)
        .and_then(|entry| entry.source.as_deref())
}

/// The record's members of `config`'s sources, in `config.sources` order.
pub fn members(config: &Config) -> Vec<String> {
    config
        .sources
        .iter()
        .map(|source| allocator::sources::source_member(&source.merchant, &source.name))
        .collect()
}

/// merchant → location → units held back, for locations whose source is
/// offline now.
pub type OfflineLocations = HashMap<String, HashMap<String, u32>>;

/// One configured source as last judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceState {
    /// Its merchant.
    pub merchant: String,
    /// Its name.
    pub name: String,
    /// Whether it is offline.
    pub offline: bool,
    /// Seconds since it was last heard from; `None`: never.
    pub quiet_seconds: Option<u64>,
}

/// Judges every source of `config` at `now_ms` (Redis time), given when
/// each was last heard from (`seen[i]` for `config.sources[i]`; missing:
/// never), and lists the locations the offline ones feed with their
/// buffers.
pub fn judge(
    config: &Config,
    seen: &[Option<u64>],
    now_ms: u64,
) -> (Vec<SourceState>, OfflineLocations) {
    judge_sources(&config.sources, &config.locations, seen, now_ms)
}

fn judge_sources(
    sources: &[SourceConfig],
    locations: &[LocationConfig],
    seen: &[Option<u64>],
    now_ms: u64,
) -> (Vec<SourceState>, OfflineLocations) {
    let states: Vec<SourceState> = sources
        .iter()
        .zip(seen.iter().copied().chain(std::iter::repeat(None)))
        .map(|(source, seen)| {
            let quiet_ms = seen.map(|at| now_ms.saturating_sub(at));
            SourceState {
                merchant: source.merchant.clone(),
                name: source.name.clone(),
                offline: quiet_ms.is_none_or(|quiet| quiet > source.offline_after_seconds * 1000),
                quiet_seconds: quiet_ms.map(|quiet| quiet / 1000),
            }
        })
        .collect();
    let quiet: std::collections::HashSet<(&str, &str)> = states
        .iter()
        .filter(|state| state.offline)
        .map(|state| (state.merchant.as_str(), state.name.as_str()))
        .collect();
    let mut offline = OfflineLocations::new();
    for location in locations {
        let Some(source) = &location.source else {
            continue;
        };
        if quiet.contains(&(location.merchant.as_str(), source.as_str())) {
            offline
                .entry(location.merchant.clone())
                .or_default()
                .insert(location.location.clone(), location.offline_buffer_units);
        }
    }
    (states, offline)
}

/// The node's view of source health.
#[derive(Default)]
pub struct SourceHealth {
    /// Locations shown offline now.
    offline: ArcSwap<OfflineLocations>,
    /// Sources of the adjustments this node took since its last write.
    pub seen: allocator::SourcesSeen,
}

impl SourceHealth {
    /// The buffer `location` of `merchant` holds back while its source is
    /// offline; `None` while it is not.
    pub fn offline_buffer(&self, merchant: &str, location: &str) -> Option<u32> {
        self.offline
            .load()
            .get(merchant)
            .and_then(|locations| locations.get(location))
            .copied()
    }

    /// Puts `offline` in force; whether it differs from what was.
    pub fn set(&self, offline: OfflineLocations) -> bool {
        if **self.offline.load() == offline {
            return false;
        }
        self.offline.store(Arc::new(offline));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Setup {
        sources: Vec<SourceConfig>,
        locations: Vec<LocationConfig>,
    }

    fn judge(
        setup: &Setup,
        seen: &[Option<u64>],
        now_ms: u64,
    ) -> (Vec<SourceState>, OfflineLocations) {
        judge_sources(&setup.sources, &setup.locations, seen, now_ms)
    }

    fn config() -> Setup {
        let sources = vec![
            SourceConfig {
                merchant: "m1".to_owned(),
                name: "pos-12".to_owned(),
                offline_after_seconds: 60,
            },
            SourceConfig {
                merchant: "m1".to_owned(),
                name: "wms".to_owned(),
                offline_after_seconds: 300,
            },
            // Another merchant's source of the same name feeds nothing of m1.
            SourceConfig {
                merchant: "m2".to_owned(),
                name: "pos-12".to_owned(),
                offline_after_seconds: 60,
            },
        ];
        let location = |location: &str, source: Option<&str>, buffer| LocationConfig {
            merchant: "m1".to_owned(),
            location: location.to_owned(),
            source: source.map(str::to_owned),
            offline_buffer_units: buffer,
            priority: 0,
            ship_from: true,
        };
        Setup {
            sources,
            locations: vec![
                location("store-12", Some("pos-12"), 3),
                location("dc1", Some("wms"), 0),
                location("dc2", None, 9),
            ],
        }
    }

    #[test]
    fn a_source_is_offline_once_quiet_past_its_limit_or_never_heard_from() {
        let config = config();
        let now = 1_000_000_000;
        let (states, offline) = judge(&config, &[Some(now - 60_000), Some(now - 10), None], now);
        assert!(states[..2].iter().all(|state| !state.offline), "{states:?}");
        assert!(states[2].offline, "m2's pos-12, never heard from");
        assert!(offline.is_empty(), "m2 lists no location: {offline:?}");
        let (states, offline) = judge(&config, &[Some(now - 60_001), None, Some(now)], now);
        assert_eq!(
            states[..2],
            [
                SourceState {
                    merchant: "m1".to_owned(),
                    name: "pos-12".to_owned(),
                    offline: true,
                    quiet_seconds: Some(60)
                },
                SourceState {
                    merchant: "m1".to_owned(),
                    name: "wms".to_owned(),
                    offline: true,
                    quiet_seconds: None
                },
            ]
        );
        // Each location its source feeds, with its buffer; a location
        // without a source never.
        assert_eq!(offline["m1"].get("store-12"), Some(&3));
        assert_eq!(offline["m1"].get("dc1"), Some(&0));
        assert_eq!(offline["m1"].get("dc2"), None);
        // A report from the future (a skewed clock) is not quiet.
        let (states, _) = judge(&config, &[Some(now + 5_000), Some(now), Some(now)], now);
        assert!(states.iter().all(|state| !state.offline));
    }

    #[test]
    fn health_says_when_what_is_shown_changes() {
        let health = SourceHealth::default();
        let config = config();
        let now = 10_000_000;
        let (_, offline) = judge(&config, &[None, Some(now), Some(now)], now);
        assert!(health.set(offline.clone()));
        assert!(!health.set(offline), "the same set again is no change");
        assert_eq!(health.offline_buffer("m1", "store-12"), Some(3));
        assert_eq!(health.offline_buffer("m2", "store-12"), None);
        assert!(health.set(OfflineLocations::new()));
        assert_eq!(health.offline_buffer("m1", "store-12"), None);
    }
}
