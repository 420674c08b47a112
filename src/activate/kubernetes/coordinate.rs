//! Cluster-wide scale-down decisions for several Reveille replicas. A replica that saw no
//! traffic must never scale to zero a workload another replica still serves or holds for, so
//! the replica holding the Lease ([`lease`](super::lease)) decides, and only after every peer
//! replica answered that the service has been idle for the whole idle timeout.
//!
//! Peers are the other replicas' admin listeners, from `keda.peers` or from the EndpointSlices
//! of Reveille's own admin Service ([`KubePeers`]). Their counts come from admin `/api/local`.
//! A peer that does not answer, or answers without an idle time, puts the scale-down off: an
//! unknown peer delays a scale-down, it never causes one.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::task::JoinHandle;
use tracing::warn;

use super::endpoints::collect_ready;
use crate::cluster::lease::Leadership;
use crate::cluster::peers::{PeerClient, PeerSource};
use crate::config::PortRef;

/// Why a scale-down must wait (a metric label).
pub type Deferral = &'static str;

/// What the drivers ask before scaling to zero.
pub struct Coordinator {
    leadership: Arc<Leadership>,
    peers: Arc<dyn PeerSource>,
    peers_synced: Arc<AtomicBool>,
    client: PeerClient,
    timeout: Duration,
}

impl Coordinator {
    /// The peer replicas this coordinator asks (KEDA's aggregation asks the same ones).
    pub fn peers(&self) -> Arc<dyn PeerSource> {
        self.peers.clone()
    }

    /// A coordinator over `peers`, deciding while `leadership` says so; `peers_synced` turns
    /// true once the peer list is known (until then nothing is scaled down).
    pub fn new(
        leadership: Arc<Leadership>,
        peers: Arc<dyn PeerSource>,
        peers_synced: Arc<AtomicBool>,
        timeout: Duration,
    ) -> Coordinator {
        Coordinator {
            leadership,
            peers,
            peers_synced,
            client: PeerClient::new(),
            timeout,
        }
    }

    /// Whether this replica holds the lease (cheap; asked first).
    pub fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }

    /// `Ok` when this replica leads and every peer has had `service` idle for `idle`;
    /// otherwise the reason to wait.
    pub async fn may_scale_down(&self, service: &str, idle: Duration) -> Result<(), Deferral> {
        if !self.is_leader() {
            return Err("not_leader");
        }
        if !self.peers_synced.load(Ordering::SeqCst) {
            return Err("peer_unknown");
        }
        let peers = self.peers.peers();
        let answers = join_all(peers.iter().map(|p| self.client.counts(*p, self.timeout))).await;
        for (peer, answer) in peers.iter().zip(answers) {
            let counts = match answer {
                Ok(c) => c,
                Err(e) => {
                    warn!(%peer, error = %e, "peer unreachable; scale-down put off");
                    return Err("peer_unknown");
                }
            };
            // A peer that does not serve this service at all has nothing to say about it.
            let Some(c) = counts.services.get(service) else {
                continue;
            };
            let Some(idle_ms) = c.idle_for_ms else {
                return Err("peer_unknown");
            };
            if c.held > 0 || c.in_flight > 0 || Duration::from_millis(idle_ms) < idle {
                return Err("peer_active");
            }
        }
        if !self.is_leader() {
            return Err("not_leader");
        }
        Ok(())
    }
}

/// Peers found through the EndpointSlices of Reveille's own admin Service (its port named
/// `admin`, or the first), leaving this replica out. Not-ready replicas count too (the Service
/// publishes them): one that is shutting down may still hold requests.
pub struct KubePeers {
    store: Store<EndpointSlice>,
    own: Option<SocketAddr>,
    /// True once the first list is complete.
    pub synced: Arc<AtomicBool>,
    _watch: AbortOnDrop,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl KubePeers {
    /// Starts watching `service` in `namespace`; `own` is this replica's admin address.
    pub fn start(
        client: Client,
        namespace: &str,
        service: &str,
        pod_ip: Option<IpAddr>,
        admin_port: u16,
    ) -> KubePeers {
        let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
        let cfg =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
        let (reader, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
        let service = service.to_string();
        let synced = Arc::new(AtomicBool::new(false));
        let flag = synced.clone();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::InitDone) => flag.store(true, Ordering::SeqCst),
                    Ok(_) => {}
                    Err(e) => {
                        warn!(%service, error = %e, "admin Service EndpointSlice watch failed; retrying")
                    }
                }
            }
        });
        KubePeers {
            store: reader,
            own: pod_ip.map(|ip| SocketAddr::new(ip, admin_port)),
            synced,
            _watch: AbortOnDrop(task),
        }
    }
}

impl PeerSource for KubePeers {
    fn peers(&self) -> Vec<SocketAddr> {
        let mut all = BTreeSet::new();
        for slice in self.store.state() {
            let named = slice
                .ports
                .iter()
                .flatten()
                .any(|p| p.name.as_deref() == Some("admin"));
            let port = if named {
                PortRef::Name("admin".into())
            } else {
                match slice.ports.iter().flatten().find_map(|p| p.port) {
                    Some(p) => PortRef::Number(p as u16),
                    None => continue,
                }
            };
            let mut every = slice.as_ref().clone();
            for ep in &mut every.endpoints {
                // Not-ready replicas are peers too.
                if let Some(c) = ep.conditions.as_mut() {
                    c.ready = Some(true);
                }
            }
            collect_ready(&every, &port, &mut all);
        }
        all.into_iter().filter(|a| Some(*a) != self.own).collect()
    }
}
