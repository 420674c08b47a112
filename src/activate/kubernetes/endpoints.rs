//! Ready pod addresses of a Kubernetes service, from a watch of its EndpointSlices (label
//! `kubernetes.io/service-name`), fed into the service's gate. No polling: a kube-runtime
//! reflector keeps the slices, and every change republishes the addresses.
//!
//! A watch restart (dropped stream, `410 Gone`) re-lists; the reflector swaps in the listed set
//! only when the list is complete, so a pod removed while the watch was down is dropped then.
//! While the API server is unreachable the last known set stays: known-ready pods keep serving.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::PortRef;
use crate::gate::Gate;

/// First pause after a failed watch or list; doubles up to [`WATCH_BACKOFF_MAX`].
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest pause between watch attempts while the API server is unreachable.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The addresses the watch sees, and whether they are offered to the gate. The driver
/// withdraws them while it scales the workload down, so no new request starts on a pod that
/// is about to stop.
pub struct Routing {
    gate: Arc<Gate>,
    inner: Mutex<Inner>,
    seen: watch::Sender<usize>,
}

struct Inner {
    addrs: Vec<SocketAddr>,
    withdrawn: bool,
}

impl Routing {
    /// Routing for `gate`, with no addresses yet.
    pub fn new(gate: Arc<Gate>) -> Arc<Routing> {
        Arc::new(Routing {
            gate,
            inner: Mutex::new(Inner {
                addrs: Vec::new(),
                withdrawn: false,
            }),
            seen: watch::channel(0).0,
        })
    }

    /// Records the watch's current ready addresses and, unless withdrawn, routes to them.
    pub fn publish(&self, addrs: Vec<SocketAddr>) {
        let mut inner = self.inner.lock();
        if inner.addrs == addrs {
            return;
        }
        if !inner.withdrawn {
            self.gate.set_endpoints(&addrs);
        }
        let n = addrs.len();
        inner.addrs = addrs;
        drop(inner);
        self.seen.send_replace(n);
    }

    /// Stops routing new requests to the pods (requests in flight finish).
    pub fn withdraw(&self) {
        let mut inner = self.inner.lock();
        inner.withdrawn = true;
        self.gate.set_endpoints(&[]);
    }

    /// Routes to the watched pods again.
    pub fn restore(&self) {
        let mut inner = self.inner.lock();
        inner.withdrawn = false;
        self.gate.set_endpoints(&inner.addrs);
    }

    /// Switches to another version's addresses: new requests wait while the old version's
    /// in flight finish (at most `quiesce`), then go to `addrs` (see
    /// [`Gate::switch_endpoints`]). True when the old requests finished in time.
    pub async fn switch(&self, addrs: Vec<SocketAddr>, quiesce: Duration) -> bool {
        let n = addrs.len();
        let withdrawn = {
            let mut inner = self.inner.lock();
            inner.addrs = addrs.clone();
            inner.withdrawn
        };
        let drained = withdrawn
            || self
                .gate
                .switch_with(quiesce, || {
                    // A scale-down that withdrew the pods meanwhile wins: decided under the
                    // lock `withdraw` takes, before any held request is released.
                    let inner = self.inner.lock();
                    self.gate
                        .set_endpoints(if inner.withdrawn { &[] } else { &addrs });
                })
                .await;
        self.seen.send_replace(n);
        drained
    }

    /// The service's gate.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// How many ready addresses the watch sees now (routed or not).
    pub fn seen(&self) -> usize {
        *self.seen.borrow()
    }

    /// A receiver that changes whenever the number of seen addresses does.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.seen.subscribe()
    }
}

/// One endpoint of a slice, ready or not, with the pod behind it (for controlled rollouts,
/// which route by the pod's version and validate pods before they are ready).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The pod's address at the service's port.
    pub addr: SocketAddr,
    /// The pod's name (`targetRef`), when the slice names one.
    pub pod: Option<String>,
    /// Whether the endpoint is ready (or its readiness unset).
    pub ready: bool,
}

/// Watches the EndpointSlices of `service` in `namespace` and publishes the ready addresses
/// into `routing` — or, with `rollout`, every endpoint with its pod into that channel (the
/// rollout controller decides what is routed). Runs until its task is aborted.
pub async fn watch_endpoints(
    client: Client,
    namespace: String,
    service: String,
    port: PortRef,
    routing: Arc<Routing>,
    rollout: Option<watch::Sender<Vec<SliceEndpoint>>>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, cfg)).backoff(WatchBackoff::default());
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            // A (re-)list is under way: the store swaps at InitDone; until then keep the old set.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(event) => {
                if failing {
                    info!(%namespace, %service, "EndpointSlice watch recovered");
                    failing = false;
                }
                if matches!(event, watcher::Event::InitDone) {
                    debug!(%namespace, %service, "EndpointSlices listed");
                }
                match &rollout {
                    None => routing.publish(ready_addresses(&reader, &port)),
                    Some(tx) => {
                        let all = all_endpoints(&reader, &port);
                        tx.send_if_modified(|old| {
                            let changed = *old != all;
                            *old = all;
                            changed
                        });
                    }
                }
            }
            Err(e) => {
                routing.gate.metrics().kube_api_error("watch_endpoints");
                if !failing {
                    warn!(%namespace, %service, error = %e, "EndpointSlice watch failed; keeping the known pods and retrying");
                }
                failing = true;
            }
        }
    }
}

/// Every ready address of every slice in the store, deduplicated and sorted.
fn ready_addresses(store: &Store<EndpointSlice>, port: &PortRef) -> Vec<SocketAddr> {
    let mut out = BTreeSet::new();
    for slice in store.state() {
        collect_ready(&slice, port, &mut out);
    }
    out.into_iter().collect()
}

/// Every endpoint of every slice in the store, ready or not, sorted by address.
fn all_endpoints(store: &Store<EndpointSlice>, port: &PortRef) -> Vec<SliceEndpoint> {
    let mut out: Vec<SliceEndpoint> = store
        .state()
        .iter()
        .flat_map(|slice| slice_endpoints(slice, port))
        .collect();
    out.sort_by(|a, b| (a.addr, &a.pod).cmp(&(b.addr, &b.pod)));
    out.dedup();
    out
}

/// A slice's endpoints at `port`. An endpoint is ready when `conditions.ready` is true or
/// unset; only its first address counts (the rest are the same pod's).
fn slice_endpoints<'a>(
    slice: &'a EndpointSlice,
    port: &PortRef,
) -> impl Iterator<Item = SliceEndpoint> + 'a {
    let number = slice_port(slice, port);
    number.into_iter().flat_map(move |number| {
        slice.endpoints.iter().filter_map(move |ep| {
            let ip = ep.addresses.first()?.parse::<IpAddr>().ok()?;
            Some(SliceEndpoint {
                addr: SocketAddr::new(ip, number),
                pod: ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| r.name.clone()),
                ready: ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            })
        })
    })
}

/// The slice's port number for `port`, if the slice carries addresses and the port.
fn slice_port(slice: &EndpointSlice, port: &PortRef) -> Option<u16> {
    if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
        return None;
    }
    match port {
        PortRef::Number(n) => Some(*n),
        PortRef::Name(name) => slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok()),
    }
}

/// Adds a slice's ready addresses at `port` (see [`slice_endpoints`]).
pub fn collect_ready(slice: &EndpointSlice, port: &PortRef, out: &mut BTreeSet<SocketAddr>) {
    out.extend(
        slice_endpoints(slice, port)
            .filter(|e| e.ready)
            .map(|e| e.addr),
    );
}

/// Exponential pause between failed watch attempts, reset once events flow again.
struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff {
            next: WATCH_BACKOFF_MIN,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(WATCH_BACKOFF_MAX);
        Some(now)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    use super::*;

    fn ep(ip: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(kind: &str, eps: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: kind.into(),
            endpoints: eps,
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn ready_or_unset_endpoints_count_at_the_named_or_numbered_port() {
        let s = slice(
            "IPv4",
            vec![
                ep("10.0.0.1", Some(true)),
                ep("10.0.0.2", None),
                ep("10.0.0.3", Some(false)),
                ep("not-an-ip", Some(true)),
            ],
        );
        let mut out = BTreeSet::new();
        collect_ready(&s, &PortRef::Name("http".into()), &mut out);
        let want: Vec<SocketAddr> = vec![
            "10.0.0.1:8080".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
        ];
        assert_eq!(out.iter().copied().collect::<Vec<_>>(), want);
        let mut out = BTreeSet::new();
        collect_ready(&s, &PortRef::Number(9000), &mut out);
        assert!(out.contains(&"10.0.0.2:9000".parse().unwrap()));
        assert_eq!(out.len(), 2);
        // A named port the slice does not have: nothing from it.
        let mut out = BTreeSet::new();
        collect_ready(&s, &PortRef::Name("grpc".into()), &mut out);
        assert!(out.is_empty());
        // FQDN slices are not addresses.
        let mut out = BTreeSet::new();
        collect_ready(
            &slice("FQDN", vec![ep("a.example", Some(true))]),
            &PortRef::Number(1),
            &mut out,
        );
        assert!(out.is_empty());
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = WatchBackoff::default();
        let first: Vec<Duration> = (&mut b).take(7).collect();
        assert_eq!(first[0], WATCH_BACKOFF_MIN);
        assert_eq!(first[1], WATCH_BACKOFF_MIN * 2);
        assert_eq!(*first.last().unwrap(), WATCH_BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next(), Some(WATCH_BACKOFF_MIN));
    }
}
