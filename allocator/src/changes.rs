//! Change notifications, typed: what the scripts publish after every change
//! of a cell, as a feed a node follows (its cache and its SSE streams).
//!
//! Owns the subscription (its own connection: a subscribed connection can
//! run nothing else), decoding each notification, and saying when some may
//! have been missed (a burst outran the feed, the connection dropped, or it
//! came back without its subscription), so a follower never trusts what it
//! cached across such a gap. It decides nothing.
//!
//! Notifications are on sharded pub/sub: one shard channel per partition
//! ([`crate::keys::changes_channel`]), each subscribed with its own
//! `SSUBSCRIBE` (fred sends it to the partition's master). A master lost,
//! or failed over to its replica, drops its connection: reported as
//! [`ChangeEvent::Interrupted`], then [`ChangeEvent::Resumed`] once
//! subscribed again. Not covered yet: a slot moved while both masters stay
//! up (resharding, a manual `CLUSTER FAILOVER`) unsubscribes its channel
//! over a connection that stays open, and fred 10.1 drops that message, so
//! the feed goes quiet for those partitions until the next reconnect; the
//! cache's TTL bounds what a node serves meanwhile. Until the feed watches
//! the slot map, reshard with the gateways restarted after.

use fred::prelude::*;
use serde::Deserialize;
use tokio::sync::broadcast;

use crate::keys::changes_channel;
use crate::{Allocator, AllocatorError, Result};

/// One cell of a stock key changed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Change {
    /// The cell's partition.
    pub partition: u32,
    /// The cell id.
    pub cell: String,
    /// Merchant of the changed key.
    pub merchant: String,
    /// SKU of the changed key.
    pub sku: String,
    /// Location of the changed key.
    pub location: String,
    /// The cell's version after the change.
    pub version: u64,
}

/// What the feed says next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeEvent {
    /// A cell changed.
    Changed(Change),
    /// Notifications were missed (a burst outran the feed): anything cached
    /// may be stale.
    Missed,
    /// The connection dropped: until [`ChangeEvent::Resumed`], nothing heard
    /// counts as fresh.
    Interrupted,
    /// Subscribed again after a reconnect (what was published meanwhile is
    /// lost).
    Resumed,
}

/// A live subscription to the change notifications.
pub struct ChangeFeed {
    subscriber: Client,
    /// Partitions, one shard channel each.
    partitions: u32,
    messages: broadcast::Receiver<fred::types::Message>,
    reconnects: broadcast::Receiver<fred::types::config::Server>,
    errors: broadcast::Receiver<(fred::error::Error, Option<fred::types::config::Server>)>,
}

impl Allocator {
    /// Subscribes to the change notifications on a connection of its own,
    /// buffering up to `capacity` of them (a burst beyond it is reported as
    /// [`ChangeEvent::Missed`]).
    pub async fn change_feed(&self, capacity: usize) -> Result<ChangeFeed> {
        let config = fred::types::config::Config::from_url(self.redis_url.as_ref())
            .map_err(|error| AllocatorError::InvalidRequest(format!("redis url: {error}")))?;
        let subscriber = Builder::from_config(config)
            .with_performance_config(|performance| {
                performance.broadcast_channel_capacity = capacity.max(1);
            })
            .set_policy(ReconnectPolicy::new_constant(0, 200))
            .build()
            .map_err(crate::unavailable)?;
        subscriber.init().await.map_err(crate::unavailable)?;
        let messages = subscriber.message_rx();
        let reconnects = subscriber.reconnect_rx();
        let errors = subscriber.error_rx();
        let feed = ChangeFeed {
            subscriber,
            partitions: self.settings.partitions,
            messages,
            reconnects,
            errors,
        };
        feed.subscribe().await.map_err(crate::unavailable)?;
        Ok(feed)
    }
}

impl ChangeFeed {
    /// The next event; `None` when the feed has ended (its connection is
    /// gone for good, or came back and could not subscribe again): start a
    /// new one. A notification that does not decode is skipped with
    /// a warning: it names no cell this node could act on.
    pub async fn next(&mut self) -> Option<ChangeEvent> {
        loop {
            tokio::select! {
                message = self.messages.recv() => match message {
                    Ok(message) => {
                        let Ok(text): std::result::Result<String, _> = message.value.convert() else {
                            continue;
                        };
                        match serde_json::from_str::<Change>(&text) {
                            Ok(change) => return Some(ChangeEvent::Changed(change)),
                            Err(error) => {
                                tracing::warn!(%error, text, "change notification does not decode");
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => return Some(ChangeEvent::Missed),
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = self.errors.recv() => return Some(ChangeEvent::Interrupted),
                _ = self.reconnects.recv() => {
                    // A new connection has no subscriptions.
                    if let Err(error) = self.subscribe().await {
                        // A live connection subscribed to nothing would stay
                        // silent for ever: end the feed, the follower starts
                        // a new one.
                        tracing::warn!(%error, "change feed did not subscribe again; ending it");
                        return None;
                    }
                    return Some(ChangeEvent::Resumed);
                }
            }
        }
    }

    /// Subscribes to every partition's shard channel, one `SSUBSCRIBE` each
    /// (on a cluster each goes to its partition's master; channels of
    /// different slots cannot share one call). Again after a reconnect: a
    /// channel already subscribed stays so.
    async fn subscribe(&self) -> std::result::Result<(), fred::error::Error> {
        for partition in 0..self.partitions {
            self.subscriber
                .ssubscribe(changes_channel(partition))
                .await?;
        }
        Ok(())
    }

    /// Ends the subscription.
    pub async fn close(self) {
        let _ = self.subscriber.quit().await;
    }
}
