//! Hot reload: watch the config file and SIGHUP, hand subscribers each accepted
//! config together with what changed.
//!
//! Owns the reload loop and the rule "a bad edit never replaces a good config".
//! It does not interpret changes; subscribers get a [`ConfigUpdate`] through a
//! `tokio::sync::watch` channel and act on it. The directory holding the file is
//! watched (not the file), so editors that save by renaming a new file over the
//! old one are seen too; bursts of events are folded into one reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::model::Config;
use crate::{ConfigError, changed_paths, check_reload, load_file};

/// How long file events are gathered before one reload, so a save that writes
/// in several steps is read once, whole.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Capacity of the channel from the file watcher thread; extra events are
/// dropped because one pending reload already covers them.
const FILE_EVENTS_CAPACITY: usize = 16;

/// An accepted configuration and how it differs from the one before.
#[derive(Debug, Clone)]
pub struct ConfigUpdate {
    /// The config now in force.
    pub config: Arc<Config>,
    /// 1 for the config loaded at start, +1 for every accepted reload.
    pub generation: u64,
    /// Field paths that differ from the previous generation (empty at start).
    pub changed: Vec<String>,
}

impl ConfigUpdate {
    /// Whether any changed path starts with `prefix` (for example `flash_sales`).
    pub fn touches(&self, prefix: &str) -> bool {
        self.changed.iter().any(|path| path.starts_with(prefix))
    }
}

type ReloadReply = oneshot::Sender<Result<Arc<ConfigUpdate>, Arc<ConfigError>>>;

/// Keeps a config file loaded and reloads it on change or SIGHUP.
///
/// Dropping the watcher stops the reload loop.
pub struct ConfigWatcher {
    /// Where subscribers read the config in force.
    updates: watch::Receiver<Arc<ConfigUpdate>>,
    /// Manual reload requests (tests, admin tools), each with its reply.
    reload_requests: mpsc::Sender<ReloadReply>,
    /// Count of reloads refused, for metrics.
    rejected: Arc<AtomicU64>,
    /// The reload loop; aborted on drop.
    task: JoinHandle<()>,
    /// Kept alive so file events keep coming.
    _file_watcher: Option<notify::RecommendedWatcher>,
}

impl ConfigWatcher {
    /// Loads `path` (failing if it does not validate) and starts watching it.
    /// Must be called inside a tokio runtime.
    pub fn start(path: impl Into<PathBuf>) -> Result<Self, ConfigError> {
        let path = path.into();
        let initial = load_file(&path)?;
        let (updates_tx, updates) = watch::channel(Arc::new(ConfigUpdate {
            config: Arc::new(initial),
            generation: 1,
            changed: Vec::new(),
        }));
        let (file_events_tx, file_events) = mpsc::channel(FILE_EVENTS_CAPACITY);
        let file_watcher = match watch_file(&path, file_events_tx) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                warn!(path = %path.display(), %error, "cannot watch config file; reload on SIGHUP only");
                None
            }
        };
        let (reload_requests, reload_rx) = mpsc::channel(4);
        let rejected = Arc::new(AtomicU64::new(0));
        let reloader = Reloader {
            path,
            updates: updates_tx,
            rejected: rejected.clone(),
        };
        // Registered before returning: once a handler exists, SIGHUP no longer
        // terminates the process, so a signal sent right after start is safe.
        let hangups = match signal(SignalKind::hangup()) {
            Ok(stream) => Some(stream),
            Err(error) => {
                warn!(%error, "cannot listen for SIGHUP; reload on file change only");
                None
            }
        };
        let task = tokio::spawn(reloader.run(hangups, file_events, reload_rx));
        Ok(Self {
            updates,
            reload_requests,
            rejected,
            task,
            _file_watcher: file_watcher,
        })
    }

    /// A receiver that sees every accepted config, starting with the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ConfigUpdate>> {
        self.updates.clone()
    }

    /// The config in force now.
    pub fn current(&self) -> Arc<Config> {
        self.updates.borrow().config.clone()
    }

    /// Number of reloads refused so far.
    pub fn rejected_reloads(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Reloads now, as SIGHUP would, and says what happened.
    pub async fn reload(&self) -> Result<Arc<ConfigUpdate>, Arc<ConfigError>> {
        let (reply, answer) = oneshot::channel();
        let stopped = || {
            Arc::new(ConfigError::Read {
                path: PathBuf::new(),
                source: std::io::Error::other("config watcher stopped"),
            })
        };
        self.reload_requests
            .send(reply)
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn watch_file(path: &Path, events: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};

    let file_name = path.file_name().map(ToOwned::to_owned);
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.file_name() == file_name.as_deref())
        {
            // Full channel: a reload is already pending and will read the newest file.
            let _ = events.try_send(());
        }
    })?;
    watcher.watch(&directory, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

struct Reloader {
    path: PathBuf,
    updates: watch::Sender<Arc<ConfigUpdate>>,
    rejected: Arc<AtomicU64>,
}

impl Reloader {
    async fn run(
        self,
        mut hangups: Option<Signal>,
        mut file_events: mpsc::Receiver<()>,
        mut requests: mpsc::Receiver<ReloadReply>,
    ) {
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(stream) => stream.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(()) = file_events.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while file_events.try_recv().is_ok() {}
                    let _ = self.reload("file change");
                }
                Some(()) = hangup => {
                    let _ = self.reload("SIGHUP");
                }
                request = requests.recv() => match request {
                    Some(reply) => {
                        let _ = reply.send(self.reload("request"));
                    }
                    None => return,
                },
            }
        }
    }

    fn reload(&self, trigger: &str) -> Result<Arc<ConfigUpdate>, Arc<ConfigError>> {
        let previous = self.updates.borrow().clone();
        let outcome = load_file(&self.path).and_then(|config| {
            check_reload(&previous.config, &config)?;
            Ok(config)
        });
        match outcome {
            Ok(config) => {
                let changed = changed_paths(&previous.config, &config);
                if changed.is_empty() {
                    info!(
                        trigger,
                        generation = previous.generation,
                        "config reloaded, nothing changed"
                    );
                    return Ok(previous);
                }
                let update = Arc::new(ConfigUpdate {
                    config: Arc::new(config),
                    generation: previous.generation + 1,
                    changed,
                });
                info!(
                    trigger,
                    generation = update.generation,
                    changed = ?update.changed,
                    "config reloaded"
                );
                self.updates.send_replace(update.clone());
                Ok(update)
            }
            Err(error) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                warn!(
                    trigger,
                    path = %self.path.display(),
                    %error,
                    generation = previous.generation,
                    "config reload rejected, keeping the previous config"
                );
                Err(Arc::new(error))
            }
        }
    }
}
