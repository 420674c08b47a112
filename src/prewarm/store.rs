//! The learned history on disk: one JSON document, `<state_dir>/prewarm-history.json`
//! (format in docs/prewarm.md), read at start, written atomically (a temporary file renamed
//! over it) every [`SAVE_INTERVAL`] when it changed and at shutdown.
//!
//! On Kubernetes with `coordination:` the history is shared through a ConfigMap instead
//! ([`super::configmap`]): the store is then this replica's view of it, and what the replica
//! observes is also kept in a [`Journal`] until the ConfigMap has it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tracing::warn;

use super::delta::{Delta, Journal};
use super::learn::History;

/// The history file's name under `state_dir`.
pub const HISTORY_FILE: &str = "prewarm-history.json";
/// How often a changed history is written.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(60);
/// Bound on the history file read at start.
pub const MAX_HISTORY_BYTES: u64 = 64 << 20;

/// Why the history cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `state_dir` cannot be created or written.
    #[error("state_dir {}: not writable ({source}); learning (prewarm.learn) keeps its history there", dir.display())]
    NotWritable {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is there but is not a history.
    #[error("{}: not a pre-warm history ({reason}); fix or remove it", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The shared history and where it is kept.
pub struct Store {
    path: PathBuf,
    history: Mutex<History>,
    dirty: AtomicBool,
    /// Shared history (Kubernetes): observations the ConfigMap does not have yet.
    journal: Option<Mutex<Journal>>,
}

impl Store {
    /// Opens (creating `state_dir` when missing, and checking it is writable) and reads the
    /// history; an empty one when the file does not exist yet.
    pub fn open(state_dir: &Path) -> Result<Arc<Store>, StoreError> {
        let not_writable = |source| StoreError::NotWritable {
            dir: state_dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(not_writable)?;
        let probe = state_dir.join(format!(".prewarm-probe-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(not_writable)?;
        let _ = std::fs::remove_file(&probe);
        let path = state_dir.join(HISTORY_FILE);
        let history = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => History::new(),
            Err(e) => return Err(not_writable(e)),
            Ok(m) if m.len() > MAX_HISTORY_BYTES => {
                return Err(StoreError::Corrupt {
                    path,
                    reason: format!("larger than {MAX_HISTORY_BYTES} bytes"),
                })
            }
            Ok(_) => {
                let text = std::fs::read_to_string(&path).map_err(not_writable)?;
                serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
            }
        };
        Ok(Arc::new(Store {
            path,
            history: Mutex::new(history),
            dirty: AtomicBool::new(false),
            journal: None,
        }))
    }

    /// An empty view of a shared history (kept in the ConfigMap `name`, for the messages).
    pub(crate) fn shared(name: &str) -> Arc<Store> {
        Arc::new(Store {
            path: PathBuf::from(format!("configmap/{name}")),
            history: Mutex::new(History::new()),
            dirty: AtomicBool::new(false),
            journal: Some(Mutex::new(Journal::default())),
        })
    }

    /// `n` requests of `service` at `now`, the first a start of activity when `start`.
    pub(crate) fn record(&self, service: &str, now: jiff::Timestamp, start: bool, n: u64) {
        let mut journal = self.journal.as_ref().map(|j| j.lock());
        if let Some(j) = journal.as_mut() {
            if start {
                j.delta.start(service, now);
            }
            j.delta.requests(service, now, n);
        }
        self.update(|h| {
            let s = h.service(service);
            if start {
                s.start(now);
            }
            s.requests(now, n);
        });
    }

    /// A learned window of `service` over `[start, end)` saw no request here.
    pub(crate) fn record_miss(&self, service: &str, start: jiff::Timestamp, end: jiff::Timestamp) {
        let mut journal = self.journal.as_ref().map(|j| j.lock());
        if let Some(j) = journal.as_mut() {
            j.misses.push((service.to_string(), start, end));
        }
        self.update(|h| h.service(service).missed(start, end));
    }

    /// The journal of a shared history (`None` for a file).
    pub(crate) fn journal(&self) -> Option<&Mutex<Journal>> {
        self.journal.as_ref()
    }

    /// Replaces the view of a shared history with `base` plus what the journal holds (under
    /// its lock, so nothing recorded meanwhile is missing from the view).
    pub(crate) fn set_view(&self, mut base: History) {
        let Some(journal) = &self.journal else { return };
        let j = journal.lock();
        let pending = j.inflight.iter().chain(std::iter::once(&j.delta));
        pending.for_each(|d: &Delta| super::delta::fold(&mut base, d));
        for (service, start, end) in &j.misses {
            base.service(service).missed(*start, *end);
        }
        *self.history.lock() = base;
    }

    /// The history in `state_dir` without creating or checking anything (empty when there is
    /// none): for `reveille prewarm plan`.
    pub fn peek(state_dir: &Path) -> Result<History, StoreError> {
        let path = state_dir.join(HISTORY_FILE);
        match std::fs::read_to_string(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(History::new()),
            Err(e) => Err(StoreError::NotWritable {
                dir: state_dir.to_path_buf(),
                source: e,
            }),
            Ok(text) => serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// Changes the history (marks it for the next save).
    pub fn update<R>(&self, f: impl FnOnce(&mut History) -> R) -> R {
        let r = f(&mut self.history.lock());
        self.dirty.store(true, Ordering::Relaxed);
        r
    }

    /// Reads the history.
    pub fn read<R>(&self, f: impl FnOnce(&History) -> R) -> R {
        f(&self.history.lock())
    }

    /// Writes the history if it changed since the last save.
    pub fn save(&self) -> std::io::Result<()> {
        // A shared history is written by its ConfigMap sync.
        if self.journal.is_some() || !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let text = self.read(serde_json::to_vec_pretty)?;
        let tmp = self.path.with_extension("json.tmp");
        let r = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.path));
        if r.is_err() {
            self.dirty.store(true, Ordering::Relaxed);
        }
        r
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Saves every [`SAVE_INTERVAL`] while the store is in use (a task).
    pub fn spawn_saver(self: &Arc<Self>) {
        let weak: Weak<Store> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SAVE_INTERVAL).await;
                let Some(store) = weak.upgrade() else { return };
                if let Err(e) = store.save() {
                    warn!(path = %store.path.display(), error = %e, "cannot save the pre-warm history");
                }
            }
        });
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}
