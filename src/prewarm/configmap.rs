//! The learned history on Kubernetes with `coordination:`: one ConfigMap in the coordination
//! namespace, `<lease>-prewarm-history` (format in docs/prewarm.md), so a restart or a new
//! Lease holder continues the same history.
//!
//! - `history.json`: the history document (the file format), written only by the Lease holder.
//! - `pending-<identity>.json`: a replica's observations the holder has not folded in yet.
//!   Only that replica writes its key (a merge patch with the `resourceVersion` it read).
//! - `folded.json`: per replica, the sequence number of its last batch folded in.
//!
//! Every replica records what it sees in its [`Journal`] and, every sync interval (the lease
//! duration), hands one batch over: the holder folds its own batch and every `pending-*` key
//! into `history.json` and removes those keys, all in one `PUT` carrying the
//! `resourceVersion` it read; a non-holder adds its batch to its own key. A `409` (someone
//! wrote in between) means read again and redo from what is there now; nothing is
//! overwritten blindly. A batch leaves the journal only once a write with it succeeded, and a
//! batch whose write had no answer is resent only if the ConfigMap does not show its sequence
//! number (in the key or in `folded.json`), so each observation is counted once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use parking_lot::Mutex;
use tracing::{debug, warn};

use super::delta::{fold, requests_in, Delta, Miss};
use super::learn::History;
use super::store::Store;
use super::Clock;

/// The data key of the history document.
pub(crate) const HISTORY_KEY: &str = "history.json";
/// The data key of the last batch folded in, per replica.
pub(crate) const FOLDED_KEY: &str = "folded.json";
/// Prefix of a replica's pending key (`pending-<identity>.json`).
pub(crate) const PENDING_PREFIX: &str = "pending-";
/// Attempts of one sync when writes meet conflicts.
const ATTEMPTS: usize = 5;
/// Bound on one API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the last sync at shutdown.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
/// `folded.json` entries older than this are dropped (replicas long gone).
const FOLDED_KEEP_MS: u64 = 30 * 24 * 3600 * 1000;

/// The ConfigMap holding the history for the Lease `lease`.
pub(crate) fn configmap_name(lease: &str) -> String {
    format!("{lease}-prewarm-history")
}

/// `identity` as a ConfigMap data key part (`[-._a-zA-Z0-9]`).
fn key_part(identity: &str) -> String {
    identity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-._".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Why a sync round did not complete.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    /// Someone else wrote first: read again.
    #[error("conflict")]
    Conflict,
    /// The API call failed.
    #[error("{0}")]
    Api(#[from] kube::Error),
    /// `history.json` is not a history (left alone; fix or remove it).
    #[error("{HISTORY_KEY} is not a pre-warm history: {0}")]
    Corrupt(String),
}

/// The ConfigMap as read.
#[derive(Default)]
struct Doc {
    /// The object; `None` when there is none yet.
    cm: Option<ConfigMap>,
    history: History,
    folded: BTreeMap<String, u64>,
    /// Pending batches by replica key part.
    pending: BTreeMap<String, Delta>,
}

impl Doc {
    fn parse(cm: Option<ConfigMap>) -> Result<Doc, SyncError> {
        let Some(cm) = cm else {
            return Ok(Doc::default());
        };
        let data = cm.data.clone().unwrap_or_default();
        let history = match data.get(HISTORY_KEY) {
            Some(text) => {
                serde_json::from_str(text).map_err(|e| SyncError::Corrupt(e.to_string()))?
            }
            None => History::new(),
        };
        let folded = data
            .get(FOLDED_KEY)
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        let mut pending = BTreeMap::new();
        for (key, text) in &data {
            let Some(who) = key
                .strip_prefix(PENDING_PREFIX)
                .and_then(|k| k.strip_suffix(".json"))
            else {
                continue;
            };
            match serde_json::from_str::<Delta>(text) {
                Ok(d) => {
                    pending.insert(who.to_string(), d);
                }
                Err(e) => warn!(%key, error = %e, "unreadable pending pre-warm counts; dropped"),
            }
        }
        Ok(Doc {
            cm: Some(cm),
            history,
            folded,
            pending,
        })
    }

    /// Whether the ConfigMap already has `who`'s batch `seq`.
    fn has(&self, who: &str, seq: u64) -> bool {
        self.folded.get(who).is_some_and(|s| *s >= seq)
            || self.pending.get(who).is_some_and(|d| d.seq >= seq)
    }

    /// The history with every pending batch folded in.
    fn everything(&self) -> History {
        let mut h = self.history.clone();
        for d in self.pending.values() {
            fold(&mut h, d);
        }
        h
    }
}

/// Keeps a [`Store`]'s view in step with the ConfigMap, and hands this replica's
/// observations over.
pub(crate) struct Shared {
    api: Api<ConfigMap>,
    name: String,
    who: String,
    is_leader: Arc<dyn Fn() -> bool + Send + Sync>,
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    interval: Duration,
    last_seq: Mutex<u64>,
    stop: crate::shutdown::Trigger,
}

impl Shared {
    /// A sync for `store` of the ConfigMap for `lease` in `namespace`; this replica is
    /// `identity`, and holds the Lease while `is_leader` says so.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        client: Client,
        namespace: &str,
        lease: &str,
        identity: &str,
        is_leader: Arc<dyn Fn() -> bool + Send + Sync>,
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
        interval: Duration,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            api: Api::namespaced(client, namespace),
            name: configmap_name(lease),
            who: key_part(identity),
            is_leader,
            store,
            clock,
            interval: interval.max(Duration::from_millis(100)),
            last_seq: Mutex::new(0),
            stop: crate::shutdown::channel().0,
        })
    }

    /// The ConfigMap's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Reads the ConfigMap into the view (at start, so planning begins from the shared history).
    pub(crate) async fn load(&self) {
        match self.read().await {
            Ok(doc) => self.store.set_view(doc.everything()),
            Err(e) => {
                warn!(configmap = %self.name, error = %e, "cannot read the pre-warm history; starting empty")
            }
        }
    }

    /// Syncs every interval until [`Shared::finish`].
    pub(crate) fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        let mut stop = self.stop.signal();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(me.interval) => {}
                    () = stop.fired() => return,
                }
                me.sync().await;
            }
        });
    }

    /// Stops the periodic sync and hands the last observations over (at shutdown, while this
    /// replica may still hold the Lease).
    pub(crate) async fn finish(&self) {
        self.stop.fire();
        if tokio::time::timeout(FINISH_TIMEOUT, self.sync())
            .await
            .is_err()
        {
            warn!(configmap = %self.name, "pre-warm history not handed over at shutdown (API server slow); the last observations are lost");
        }
    }

    /// One sync: a few rounds while writes meet conflicts.
    pub(crate) async fn sync(&self) {
        for attempt in 1..=ATTEMPTS {
            match self.round().await {
                Ok(()) => return,
                Err(SyncError::Conflict) => {
                    debug!(configmap = %self.name, attempt, "pre-warm history changed meanwhile; reading again")
                }
                Err(e) => {
                    warn!(configmap = %self.name, error = %e, "cannot sync the pre-warm history; kept for the next round");
                    return;
                }
            }
        }
        debug!(configmap = %self.name, "pre-warm history busy; next round");
    }

    async fn read(&self) -> Result<Doc, SyncError> {
        Doc::parse(bounded(self.api.get_opt(&self.name)).await?)
    }

    /// This replica's batch to write, given what the ConfigMap has: a batch it already has is
    /// done with.
    fn batch(&self, doc: &Doc) -> Option<Delta> {
        let journal = self.store.journal()?;
        let mut j = journal.lock();
        if j.inflight
            .as_ref()
            .is_some_and(|d| doc.has(&self.who, d.seq))
        {
            j.inflight = None;
        }
        let mut last = self.last_seq.lock();
        let now_ms = u64::try_from(self.clock.now().as_millisecond()).unwrap_or(0);
        let batch = j.batch(now_ms, *last);
        if let Some(b) = &batch {
            *last = (*last).max(b.seq);
        }
        batch
    }

    /// Done with `batch` (written), and with `misses` (applied or not the holder's to apply).
    fn written(&self, batch: Option<&Delta>, misses: &[Miss]) {
        let Some(journal) = self.store.journal() else {
            return;
        };
        let mut j = journal.lock();
        if batch.is_some_and(|b| j.inflight.as_ref().is_some_and(|i| i.seq == b.seq)) {
            j.inflight = None;
        }
        j.misses.retain(|m| !misses.contains(m));
    }

    async fn round(&self) -> Result<(), SyncError> {
        let doc = self.read().await?;
        let batch = self.batch(&doc);
        if (self.is_leader)() {
            self.fold_round(doc, batch).await
        } else {
            self.hand_over(doc, batch).await
        }
    }

    /// The holder's round: everything pending folded into `history.json`.
    async fn fold_round(&self, doc: Doc, batch: Option<Delta>) -> Result<(), SyncError> {
        let now = self.clock.now();
        let now_ms = u64::try_from(now.as_millisecond()).unwrap_or(0);
        let mut history = doc.history.clone();
        let mut folded = doc.folded.clone();
        for (who, d) in &doc.pending {
            fold(&mut history, d);
            let f = folded.entry(who.clone()).or_default();
            *f = (*f).max(d.seq);
        }
        if let Some(b) = &batch {
            fold(&mut history, b);
            folded.insert(self.who.clone(), b.seq);
        }
        // A missed window counts once every replica's counts for it had time to come in.
        let grace = jiff::SignedDuration::try_from(self.interval * 2).unwrap_or_default();
        let due: Vec<Miss> = self.store.journal().map_or_else(Vec::new, |j| {
            j.lock()
                .misses
                .iter()
                .filter(|m| m.2 + grace <= now)
                .cloned()
                .collect()
        });
        for (service, start, end) in &due {
            if !requests_in(&history, service, *start, *end) {
                history.service(service).missed(*start, *end);
            }
        }
        for s in history.services.values_mut() {
            s.roll(now);
        }
        folded.retain(|_, seq| seq.saturating_add(FOLDED_KEEP_MS) >= now_ms);
        let unchanged = doc.cm.is_some()
            && doc.pending.is_empty()
            && history == doc.history
            && folded == doc.folded;
        if !unchanged {
            let mut data = doc
                .cm
                .as_ref()
                .and_then(|c| c.data.clone())
                .unwrap_or_default();
            data.retain(|k, _| !k.starts_with(PENDING_PREFIX));
            data.insert(HISTORY_KEY.into(), to_json(&history));
            data.insert(FOLDED_KEY.into(), to_json(&folded));
            self.write(doc.cm, data).await?;
        }
        self.written(batch.as_ref(), &due);
        self.store.set_view(history);
        Ok(())
    }

    /// A non-holder's round: its batch added to its own pending key.
    async fn hand_over(&self, mut doc: Doc, batch: Option<Delta>) -> Result<(), SyncError> {
        if let Some(b) = &batch {
            let mut mine = doc.pending.remove(&self.who).unwrap_or_default();
            mine.absorb(b);
            let key = format!("{PENDING_PREFIX}{}.json", self.who);
            match &doc.cm {
                None => {
                    let data = BTreeMap::from([
                        (HISTORY_KEY.to_string(), to_json(&doc.history)),
                        (key, to_json(&mine)),
                    ]);
                    self.write(None, data).await?;
                }
                Some(cm) => {
                    let patch = serde_json::json!({
                        "metadata": {"resourceVersion": cm.metadata.resource_version},
                        "data": {key: to_json(&mine)},
                    });
                    let (pp, patch) = (PatchParams::default(), Patch::Merge(&patch));
                    bounded(self.api.patch(&self.name, &pp, &patch))
                        .await
                        .map_err(conflict)?;
                }
            }
            doc.pending.insert(self.who.clone(), mine);
        }
        // Missed windows are the holder's to judge (it sees every replica's counts).
        let misses = self
            .store
            .journal()
            .map_or_else(Vec::new, |j| j.lock().misses.clone());
        self.written(batch.as_ref(), &misses);
        self.store.set_view(doc.everything());
        Ok(())
    }

    /// Creates the ConfigMap (`cm` is `None`) or replaces it with `data`, conditional on the
    /// `resourceVersion` read.
    async fn write(
        &self,
        cm: Option<ConfigMap>,
        data: BTreeMap<String, String>,
    ) -> Result<(), SyncError> {
        let pp = PostParams::default();
        match cm {
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        labels: Some(labels()),
                        ..Default::default()
                    },
                    data: Some(data),
                    ..Default::default()
                };
                bounded(self.api.create(&pp, &cm)).await.map_err(conflict)?;
            }
            Some(mut cm) => {
                cm.data = Some(data);
                let l = cm.metadata.labels.get_or_insert_with(Default::default);
                l.extend(labels());
                bounded(self.api.replace(&self.name, &pp, &cm))
                    .await
                    .map_err(conflict)?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("configmap", &self.name)
            .field("identity", &self.who)
            .finish_non_exhaustive()
    }
}

/// The labels of the ConfigMap (no owner: it outlives every replica and the Lease).
fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "reveille".into()),
        ("app.kubernetes.io/managed-by".into(), "reveille".into()),
        (
            "app.kubernetes.io/component".into(),
            "prewarm-history".into(),
        ),
    ])
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A `409` (stale `resourceVersion`, or created by someone else first) is a conflict.
fn conflict(e: kube::Error) -> SyncError {
    match e {
        kube::Error::Api(s) if s.is_conflict() || s.is_already_exists() => SyncError::Conflict,
        e => SyncError::Api(e),
    }
}

async fn bounded<T>(call: impl std::future::Future<Output = kube::Result<T>>) -> kube::Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(kube::Error::Service("ConfigMap call timed out".into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prewarm::delta::Journal;

    fn cm(data: &[(&str, String)]) -> ConfigMap {
        ConfigMap {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn a_batch_the_configmap_shows_is_not_sent_again() {
        let t: jiff::Timestamp = "2026-11-02T08:05:00Z".parse().unwrap();
        let mut j = Journal::default();
        j.delta.requests("orders", t, 3);
        let sent = j.batch(1_000, 0).unwrap();
        assert_eq!(sent.seq, 1_000);
        // Recorded while the write was under way: not in that batch.
        j.delta.requests("orders", t, 1);
        assert_eq!(
            j.batch(2_000, 1_000),
            Some(sent.clone()),
            "resent as it was"
        );
        let mut pending = sent.clone();
        pending.seq = 1_000;
        let doc = Doc::parse(Some(cm(&[
            (FOLDED_KEY, r#"{"a":1000}"#.to_string()),
            ("pending-b.json", to_json(&pending)),
            ("pending-c.json", "not json".into()),
        ])))
        .unwrap();
        assert!(doc.has("a", 1_000) && !doc.has("a", 1_001));
        assert!(doc.has("b", 1_000) && !doc.has("b", 1_001));
        assert!(!doc.has("c", 1));
        assert_eq!(doc.pending.len(), 1, "an unreadable key is left out");
        // The next batch carries a larger number even if the clock went back.
        j.inflight = None;
        assert_eq!(j.batch(500, 1_000).unwrap().seq, 1_001);
    }

    #[test]
    fn a_corrupt_history_is_left_alone() {
        let doc = Doc::parse(Some(cm(&[(HISTORY_KEY, "{".into())])));
        assert!(matches!(doc, Err(SyncError::Corrupt(_))));
        assert_eq!(key_part("reveille-5d8c-x2x9q"), "reveille-5d8c-x2x9q");
        assert_eq!(key_part("a/b c"), "a_b_c");
    }
}
