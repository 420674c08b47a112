//! The cluster view: this replica's counts plus every peer's, so whichever replica KEDA asks
//! answers for all of them.
//!
//! Peers are asked in parallel, each with `keda.peer_timeout`. A peer that does not answer is
//! counted with its last answer while that is younger than `keda.peer_stale_after`, then left
//! out: one slow or dead replica never fails or stalls the whole answer.
//!
//! For pushes, the replica that holds a KEDA stream long-polls each peer ([`Cluster::watch_peers`])
//! rather than peers pushing to it: the admin port stays read-only (nobody can fake demand by
//! posting to it), peers need not know which replica KEDA's stream landed on, the cost is paid
//! only while a stream is open, and the delay is one request's round trip.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::debug;

use super::local::Local;
use crate::cluster::peers::LocalCounts;
use crate::cluster::peers::{PeerClient, PeerSource};
use crate::config::Keda;
use crate::telemetry::metrics::Metrics;

/// How long one long-poll of a peer waits for a change before asking again.
pub const LONG_POLL: Duration = Duration::from_secs(20);
/// First pause after a failed long-poll; doubles up to [`MAX_RETRY_PAUSE`].
const RETRY_PAUSE: Duration = Duration::from_millis(100);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// One service's counts summed over the replicas that answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Held plus in flight: the concurrency metric.
    pub concurrency: u64,
    /// Requests held.
    pub held: u64,
    /// Requests in flight.
    pub in_flight: u64,
    /// Requests per second over the rate window.
    pub rate: f64,
    /// Replicas counted, this one included.
    pub replicas: usize,
    /// Of those, replicas counted with their last answer because they did not answer now.
    pub stale: usize,
    /// A controlled rollout is validating or switching on some replica.
    pub rolling_out: bool,
    /// A pre-warm window (or an awake dependent) keeps the service up on some replica.
    pub kept_awake: bool,
}

impl Totals {
    /// Whether anything is held or in flight anywhere, or a rollout is in progress (a rollout
    /// already counts as one request in `concurrency`).
    pub fn active(&self) -> bool {
        self.concurrency > 0
    }
}

/// This replica's counts and the peers'.
pub struct Cluster {
    local: Arc<Local>,
    peers: Arc<dyn PeerSource>,
    client: PeerClient,
    last: Mutex<HashMap<SocketAddr, (Instant, LocalCounts)>>,
    timeout: Duration,
    stale_after: Duration,
    metrics: Metrics,
}

impl Cluster {
    /// A cluster view over `local` and the peers from `peers`.
    pub fn new(
        local: Arc<Local>,
        peers: Arc<dyn PeerSource>,
        settings: &Keda,
        metrics: Metrics,
    ) -> Self {
        Cluster {
            local,
            peers,
            client: PeerClient::new(),
            last: Mutex::new(HashMap::new()),
            timeout: settings.peer_timeout,
            stale_after: settings.peer_stale_after,
            metrics,
        }
    }

    /// This replica's own counts.
    pub fn local(&self) -> &Arc<Local> {
        &self.local
    }

    /// Every local service's totals over all replicas.
    pub async fn all_totals(&self) -> Vec<(String, Totals)> {
        let peers = self.gather().await;
        self.local
            .names()
            .into_iter()
            .map(|name| {
                let t = self.sum(&name, &peers);
                (name, t)
            })
            .collect()
    }

    /// One service's totals over all replicas; `None` if this replica does not know it.
    pub async fn totals(&self, service: &str) -> Option<Totals> {
        self.local.gate(service)?;
        let peers = self.gather().await;
        Some(self.sum(service, &peers))
    }

    fn sum(&self, service: &str, peers: &[(LocalCounts, bool)]) -> Totals {
        let own = self.local.counts(service).unwrap_or_default();
        let mut t = Totals {
            held: own.held,
            in_flight: own.in_flight,
            rate: own.rate,
            replicas: 1,
            rolling_out: own.rolling_out,
            kept_awake: own.kept_awake,
            ..Totals::default()
        };
        for (counts, stale) in peers {
            if let Some(c) = counts.services.get(service) {
                t.held += c.held;
                t.in_flight += c.in_flight;
                t.rate += c.rate;
                t.replicas += 1;
                t.stale += usize::from(*stale);
                t.rolling_out |= c.rolling_out;
                t.kept_awake |= c.kept_awake;
            }
        }
        // A rollout in progress, or a pre-warm, counts as one request, so every trigger
        // (metric or activity) keeps the service up until it is done.
        t.concurrency = (t.held + t.in_flight).max(u64::from(t.rolling_out || t.kept_awake));
        t
    }

    /// Every peer's counts: fresh, or (flagged stale) its last answer while that is recent.
    async fn gather(&self) -> Vec<(LocalCounts, bool)> {
        let peers = self.peers.peers();
        let asks = peers.iter().map(|&p| async move {
            let r = self.client.counts(p, self.timeout).await;
            (p, r)
        });
        let results = join_all(asks).await;
        let now = Instant::now();
        let mut last = self.last.lock();
        last.retain(|addr, _| peers.contains(addr));
        let mut out = Vec::with_capacity(results.len());
        for (peer, r) in results {
            match r {
                Ok(counts) => {
                    self.metrics.peer_fetch("ok");
                    last.insert(peer, (now, counts.clone()));
                    out.push((counts, false));
                }
                Err(e) => match last.get(&peer) {
                    Some((at, counts)) if now.duration_since(*at) < self.stale_after => {
                        debug!(%peer, error = %e, "peer did not answer; using its last counts");
                        self.metrics.peer_fetch("stale");
                        out.push((counts.clone(), true));
                    }
                    _ => {
                        debug!(%peer, error = %e, "peer did not answer; left out");
                        self.metrics.peer_fetch("dropped");
                        last.remove(&peer);
                    }
                },
            }
        }
        out
    }

    /// Starts long-polling every current peer for `service`; `events` gets a message whenever
    /// a peer starts holding requests for it. Call [`PeerWatch::sync`] to follow peer changes;
    /// dropping the watch stops it.
    pub fn watch_peers(self: &Arc<Self>, service: &str, events: mpsc::Sender<()>) -> PeerWatch {
        let mut w = PeerWatch {
            cluster: self.clone(),
            service: service.into(),
            events,
            tasks: HashMap::new(),
        };
        w.sync();
        w
    }

    fn remember(&self, peer: SocketAddr, counts: LocalCounts) {
        self.last.lock().insert(peer, (Instant::now(), counts));
    }
}

/// Long-polls of the peers for one stream; aborted on drop.
pub struct PeerWatch {
    cluster: Arc<Cluster>,
    service: Arc<str>,
    events: mpsc::Sender<()>,
    tasks: HashMap<SocketAddr, AbortHandle>,
}

impl PeerWatch {
    /// Starts watching new peers and stops watching gone ones.
    pub fn sync(&mut self) {
        let peers = self.cluster.peers.peers();
        self.tasks.retain(|addr, task| {
            let keep = peers.contains(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        for peer in peers {
            if self.tasks.contains_key(&peer) {
                continue;
            }
            let task = tokio::spawn(watch_peer(
                self.cluster.clone(),
                peer,
                self.service.clone(),
                self.events.clone(),
            ));
            self.tasks.insert(peer, task.abort_handle());
        }
    }
}

impl Drop for PeerWatch {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

async fn watch_peer(
    cluster: Arc<Cluster>,
    peer: SocketAddr,
    service: Arc<str>,
    events: mpsc::Sender<()>,
) {
    // The peer's hold count at our last look; `None` until the first answer.
    let mut since: Option<u64> = None;
    let mut pause = RETRY_PAUSE;
    loop {
        let r = cluster
            .client
            .wait_held(peer, &service, since, LONG_POLL, cluster.timeout)
            .await;
        match r {
            Ok(counts) => {
                pause = RETRY_PAUSE;
                let c = counts.services.get(&*service).copied().unwrap_or_default();
                let push = match since {
                    // First look: held there already.
                    None => c.held > 0,
                    // Something was held since the last look (even if it is gone again).
                    Some(n) => c.holds_total != n,
                };
                since = Some(c.holds_total);
                cluster.remember(peer, counts);
                if push && events.send(()).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                debug!(%peer, error = %e, "peer long-poll failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
            }
        }
        if events.is_closed() {
            return;
        }
    }
}
