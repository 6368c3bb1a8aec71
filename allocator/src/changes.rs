//! Change notifications, typed: what the scripts publish after every change
//! of a cell, as a feed a node follows (its cache and its SSE streams).
//!
//! Owns the subscriptions (connections of their own: a subscribed
//! connection can run nothing else), decoding each notification, and
//! saying when some may have been missed (a burst outran the feed, a
//! connection dropped, or the slot map changed), so a follower never
//! trusts what it cached across such a gap. It decides nothing.
//!
//! Notifications are on sharded pub/sub: one shard channel per partition
//! ([`crate::keys::changes_channel`]). The feed has one subscriber
//! connection per master (the store's slot map, `store.rs`), each
//! `SSUBSCRIBE`d to the channels of the partitions that master serves,
//! one call per channel (channels of different slots cannot share one).
//! A master's connection dropping is [`ChangeEvent::Interrupted`]; once
//! every master's subscriber is back, [`ChangeEvent::Resumed`]. When the
//! slot map changes (a failover, a reshard) the feed subscribes afresh
//! along the new map and says [`ChangeEvent::Resumed`] (what was
//! published on the old one meanwhile may be lost): so a moved slot's
//! channel is followed to its new master, not silently lost.

use std::collections::BTreeSet;

use fred::prelude::*;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, watch};

use crate::keys::changes_channel;
use crate::store::{Store, Tasks};
use crate::{Allocator, Result};

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
    /// A connection dropped: until [`ChangeEvent::Resumed`], nothing heard
    /// counts as fresh.
    Interrupted,
    /// Subscribed everywhere again after a reconnect or a change of the
    /// slot map (what was published meanwhile is lost).
    Resumed,
}

/// How long subscribing waits for a master before going on without it (it
/// is subscribed once it answers).
const SUBSCRIBE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The mark in `ChangeFeed::down` of partitions no master serves: only
/// a later slot map clears it.
const UNCOVERED: usize = usize::MAX;

/// What one master's subscriber reports.
enum Report {
    Changed(Change),
    Missed,
    Interrupted,
    Resumed,
    /// Its connection is gone for good, or came back and could not
    /// subscribe again.
    Ended,
}

/// One master's subscriber connection and the task that forwards what it
/// hears.
struct Subscriber {
    client: Client,
    /// Its connection's task, ended when dropped (`quit` alone can miss a
    /// reconnect loop mid-attempt).
    connection: Tasks,
    forwarder: tokio::task::JoinHandle<()>,
}

/// A live subscription to the change notifications.
pub struct ChangeFeed {
    store: Store,
    /// Partitions, one shard channel each.
    partitions: u32,
    /// Depth of each subscriber's buffer.
    capacity: usize,
    /// The slot map's epoch the subscribers follow.
    epoch: u64,
    routes: watch::Receiver<u64>,
    subscribers: Vec<Subscriber>,
    /// Bumped per set of subscribers: reports of an older set are dropped.
    generation: u64,
    reports: mpsc::Receiver<(u64, usize, Report)>,
    sender: mpsc::Sender<(u64, usize, Report)>,
    /// Subscribers whose connection is down now.
    down: BTreeSet<usize>,
    /// An event to give before reading more (set when subscribing).
    pending: Option<ChangeEvent>,
    /// The slot map changed: subscribe afresh on the next call.
    resubscribe: bool,
}

impl Allocator {
    /// Subscribes to the change notifications on connections of their own,
    /// buffering up to `capacity` of them per master (a burst beyond it is
    /// reported as [`ChangeEvent::Missed`]).
    pub async fn change_feed(&self, capacity: usize) -> Result<ChangeFeed> {
        let (sender, reports) = mpsc::channel(64);
        let mut routes = self.store.routes_changed();
        let epoch = *routes.borrow_and_update();
        let mut feed = ChangeFeed {
            store: self.store.clone(),
            partitions: self.settings.partitions,
            capacity: capacity.max(1),
            epoch,
            routes,
            subscribers: Vec::new(),
            generation: 0,
            reports,
            sender,
            down: BTreeSet::new(),
            pending: None,
            resubscribe: false,
        };
        feed.subscribe_all().await?;
        Ok(feed)
    }
}

impl ChangeFeed {
    /// The next event; `None` when the feed has ended (a connection is
    /// gone for good, or came back and could not subscribe again): start a
    /// new one. A notification that does not decode is skipped with
    /// a warning: it names no cell this node could act on.
    pub async fn next(&mut self) -> Option<ChangeEvent> {
        if self.resubscribe {
            if let Err(error) = self.subscribe_all().await {
                tracing::warn!(%error, "change feed did not follow the new slot map; ending it");
                return None;
            }
            // Cleared only now: a call cancelled half way subscribes again.
            self.resubscribe = false;
            // A gap: what was published since the old subscriptions ended
            // is lost.
            return Some(self.pending.take().unwrap_or(ChangeEvent::Resumed));
        }
        if let Some(event) = self.pending.take() {
            return Some(event);
        }
        loop {
            tokio::select! {
                changed = self.routes.changed() => {
                    if changed.is_err() {
                        // The store is gone: nothing will be published.
                        return None;
                    }
                    let epoch = *self.routes.borrow_and_update();
                    if epoch == self.epoch {
                        continue;
                    }
                    // The map is changing (odd) or changed (even): stop
                    // trusting what the old subscriptions say at once, and
                    // once a map is in force subscribe along it on the
                    // next call.
                    self.epoch = epoch;
                    self.close_subscribers();
                    self.generation += 1;
                    self.resubscribe = epoch.is_multiple_of(2);
                    return Some(ChangeEvent::Interrupted);
                }
                report = self.reports.recv() => {
                    let (generation, index, report) = report?;
                    if generation != self.generation {
                        continue;
                    }
                    match report {
                        Report::Changed(change) => return Some(ChangeEvent::Changed(change)),
                        Report::Missed => return Some(ChangeEvent::Missed),
                        Report::Interrupted => {
                            self.down.insert(index);
                            return Some(ChangeEvent::Interrupted);
                        }
                        Report::Resumed => {
                            let was_down = self.down.remove(&index);
                            if self.down.is_empty() {
                                return Some(ChangeEvent::Resumed);
                            }
                            if was_down {
                                // Others are still down: not fresh yet.
                                continue;
                            }
                            return Some(ChangeEvent::Missed);
                        }
                        Report::Ended => return None,
                    }
                }
            }
        }
    }

    /// One subscriber per master of the slot map in force, each subscribed
    /// to the channels of the partitions it serves. A master that does not
    /// answer now is subscribed once it does ([`ChangeEvent::Interrupted`]
    /// comes first).
    async fn subscribe_all(&mut self) -> Result<()> {
        // Whatever a cancelled call left.
        self.close_subscribers();
        self.generation += 1;
        self.down.clear();
        let routes = self.store.routes();
        let mut channels: Vec<Vec<String>> = vec![Vec::new(); routes.masters.len()];
        for partition in 0..self.partitions {
            match routes.index_of(crate::keys::partition_slot(partition)) {
                Ok(master) => channels[master].push(changes_channel(partition)),
                // No master serves it (a lost master the cluster dropped
                // from its map): not heard until a map that covers it.
                Err(_) => {
                    self.down.insert(UNCOVERED);
                }
            }
        }
        // Every master's subscriber connects side by side (a dead one waits
        // out `SUBSCRIBE_WAIT`, not each in turn); one serving none of the
        // partitions gets none.
        let mut opened = Vec::new();
        for (index, (master, channels)) in routes.masters.iter().zip(channels).enumerate() {
            if channels.is_empty() {
                continue;
            }
            let capacity = self.capacity;
            let mut builder = self.store.builder_for(&master.server);
            builder.with_performance_config(|performance| {
                performance.broadcast_channel_capacity = capacity;
            });
            let client = builder.build().map_err(crate::unavailable)?;
            // Taken before it connects, so its first connection is heard.
            let receivers = Receivers {
                messages: client.message_rx(),
                reconnects: client.reconnect_rx(),
                errors: client.error_rx(),
            };
            let connection = Tasks(vec![client.connect()]);
            opened.push((
                index,
                master.server.clone(),
                client,
                receivers,
                connection,
                channels,
            ));
        }
        let connected = futures::future::join_all(opened.iter().map(|(_, _, client, ..)| async {
            matches!(
                tokio::time::timeout(SUBSCRIBE_WAIT, client.wait_for_connect()).await,
                Ok(Ok(()))
            )
        }))
        .await;
        for ((index, server, client, mut receivers, connection, channels), connected) in
            opened.into_iter().zip(connected)
        {
            // Connected: what its attempts so far reported (failed tries,
            // the connection itself) is history; subscribed over it now, a
            // drop after is reported afresh. Not connected: the forwarder
            // subscribes when its connection comes.
            let subscribed = connected && {
                receivers.forget_history();
                subscribe(&client, &channels).await.is_ok()
            };
            if !subscribed {
                tracing::warn!(%server, "change feed: a master is not subscribed yet");
                self.down.insert(index);
            }
            let forwarder = tokio::spawn(forward(
                client.clone(),
                channels,
                (self.generation, index),
                receivers,
                self.sender.clone(),
            ));
            self.subscribers.push(Subscriber {
                client,
                connection,
                forwarder,
            });
        }
        self.pending = (!self.down.is_empty()).then_some(ChangeEvent::Interrupted);
        Ok(())
    }

    /// Lets every subscriber go: its forwarder at once, its connection
    /// closed in the background (a dead master's would wait for it) and
    /// then its task ended.
    fn close_subscribers(&mut self) {
        for subscriber in self.subscribers.drain(..) {
            subscriber.forwarder.abort();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(SUBSCRIBE_WAIT, subscriber.client.quit()).await;
                drop(subscriber.connection);
            });
        }
    }

    /// Ends the subscription.
    pub async fn close(mut self) {
        self.close_subscribers();
    }
}

impl Drop for ChangeFeed {
    fn drop(&mut self) {
        // Their connection tasks end with them.
        for subscriber in &self.subscribers {
            subscriber.forwarder.abort();
        }
    }
}

/// A subscriber client's streams, taken before it connects (so its first
/// connection is heard).
struct Receivers {
    messages: broadcast::Receiver<fred::types::Message>,
    reconnects: broadcast::Receiver<fred::types::config::Server>,
    errors: broadcast::Receiver<(fred::error::Error, Option<fred::types::config::Server>)>,
}

impl Receivers {
    /// Drops the connection news queued so far.
    fn forget_history(&mut self) {
        fn drain<T: Clone>(receiver: &mut broadcast::Receiver<T>) {
            while !matches!(
                receiver.try_recv(),
                Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed)
            ) {}
        }
        drain(&mut self.reconnects);
        drain(&mut self.errors);
    }
}

/// `SSUBSCRIBE`s every channel (one call each; again after a reconnect: a
/// channel already subscribed stays so).
async fn subscribe(
    client: &Client,
    channels: &[String],
) -> std::result::Result<(), fred::error::Error> {
    for channel in channels {
        client.ssubscribe(channel.as_str()).await?;
    }
    Ok(())
}

/// Forwards what one master's subscriber hears, tagged `(generation,
/// index)`, until its client's streams close or the feed aborts it. A
/// full feed makes it wait, so a burst fills the client's own buffer and
/// is reported there as missed.
async fn forward(
    client: Client,
    channels: Vec<String>,
    tag: (u64, usize),
    mut receivers: Receivers,
    sender: mpsc::Sender<(u64, usize, Report)>,
) {
    let send = |report: Report| sender.send((tag.0, tag.1, report));
    loop {
        let report = tokio::select! {
            // A drop heard before what followed it (a reconnect queued
            // behind it would otherwise leave this master marked down).
            biased;
            _ = receivers.errors.recv() => Report::Interrupted,
            message = receivers.messages.recv() => match message {
                Ok(message) => {
                    let Ok(text): std::result::Result<String, _> = message.value.convert() else {
                        continue;
                    };
                    match serde_json::from_str::<Change>(&text) {
                        Ok(change) => Report::Changed(change),
                        Err(error) => {
                            tracing::warn!(%error, text, "change notification does not decode");
                            continue;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => Report::Missed,
                Err(broadcast::error::RecvError::Closed) => Report::Ended,
            },
            _ = receivers.reconnects.recv() => {
                // A new connection has no subscriptions.
                match subscribe(&client, &channels).await {
                    Ok(()) => Report::Resumed,
                    // The new connection broke too (a master dying as it
                    // was reached): fred connects again, and says so.
                    Err(error) if *error.kind() == ErrorKind::IO => Report::Interrupted,
                    Err(error) => {
                        // A live connection subscribed to nothing would stay
                        // silent for ever: end the feed, the follower starts
                        // a new one.
                        tracing::warn!(%error, "change feed did not subscribe again; ending it");
                        Report::Ended
                    }
                }
            }
        };
        let ended = matches!(report, Report::Ended);
        if send(report).await.is_err() || ended {
            return;
        }
    }
}
