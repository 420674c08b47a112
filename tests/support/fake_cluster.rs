//! A simulated cluster on top of [`FakeApi`]: Deployments whose replica count starts real pods
//! (tiny hyper servers on distinct 127.0.0.x addresses that answer with their identity), an
//! EndpointSlice per Service listing them not-ready, then ready after a delay, and workload
//! status the way the Deployment controller writes it. Scaling down removes pods at once.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::fake_kube::FakeApi;

/// Loopback addresses handed to pods, unique within the test process (127.0.1.1 upwards).
static NEXT_IP: AtomicU32 = AtomicU32::new(0x7f00_0101);

/// A running pod.
pub struct Pod {
    pub name: String,
    pub addr: SocketAddr,
    pub ready: bool,
    _server: JoinSet<()>,
}

/// One simulated workload and its pods.
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub port: u16,
    pub ready_delay: Duration,
    /// While true the controller does not observe spec changes (a rollout in progress).
    pub rollout_stuck: bool,
    pub pods: Vec<Pod>,
    next_pod: u32,
}

/// The simulated cluster.
pub struct Cluster {
    pub api: Arc<FakeApi>,
    pub workloads: Mutex<BTreeMap<String, Workload>>,
}

impl Cluster {
    /// A fake API server with a controller that reconciles workloads after every write.
    pub async fn start() -> Arc<Cluster> {
        let api = FakeApi::start().await;
        let cluster = Arc::new(Cluster {
            api,
            workloads: Mutex::new(BTreeMap::new()),
        });
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            loop {
                let Some(c) = weak.upgrade() else { return };
                let api = c.api.clone();
                let changed = api.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                c.reconcile().await;
                drop(c);
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
        cluster
    }

    /// Adds a Deployment (at `replicas`) and its Service's EndpointSlice; pods listen on `port`
    /// (named `http` in the slice) and turn ready `ready_delay` after they start.
    pub fn add_deployment(
        &self,
        ns: &str,
        name: &str,
        service: &str,
        replicas: i64,
        ready_delay: Duration,
    ) -> u16 {
        let port = free_port_on_many();
        self.workloads.lock().insert(
            name.to_string(),
            Workload {
                namespace: ns.into(),
                name: name.into(),
                service: service.into(),
                port,
                ready_delay,
                rollout_stuck: false,
                pods: Vec::new(),
                next_pod: 0,
            },
        );
        self.api.put(
            "endpointslices",
            "EndpointSlice",
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{service}-abcde"), "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4", "endpoints": [], "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            }),
        );
        self.api.put(
            "deployments",
            "Deployment",
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns, "generation": 1},
                "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}}, "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": []}}},
                "status": {"observedGeneration": 1, "replicas": 0, "updatedReplicas": 0, "readyReplicas": 0},
            }),
        );
        port
    }

    /// The Deployment's `spec.replicas`.
    pub fn replicas(&self, ns: &str, name: &str) -> i64 {
        self.api.get("deployments", ns, name).unwrap()["spec"]["replicas"]
            .as_i64()
            .unwrap_or(0)
    }

    /// Sets `spec.replicas` as another actor would (an HPA, a person with kubectl).
    pub fn set_replicas(&self, ns: &str, name: &str, n: i64) {
        let mut d = self.api.get("deployments", ns, name).unwrap();
        d["spec"]["replicas"] = json!(n);
        d["metadata"]["generation"] = json!(d["metadata"]["generation"].as_i64().unwrap() + 1);
        self.api.put("deployments", "Deployment", d);
    }

    /// Starts (true) or finishes (false) a rollout: a new spec the controller has not observed.
    pub fn set_rollout(&self, ns: &str, name: &str, stuck: bool) {
        self.workloads.lock().get_mut(name).unwrap().rollout_stuck = stuck;
        if stuck {
            let mut d = self.api.get("deployments", ns, name).unwrap();
            d["metadata"]["generation"] = json!(d["metadata"]["generation"].as_i64().unwrap() + 1);
            d["spec"]["template"]["metadata"]["annotations"] = json!({"restartedAt": "now"});
            self.api.put("deployments", "Deployment", d);
        } else {
            self.api.changed.notify_waiters();
        }
    }

    /// Addresses of the running pods.
    pub fn pod_addrs(&self, name: &str) -> Vec<SocketAddr> {
        self.workloads.lock()[name]
            .pods
            .iter()
            .map(|p| p.addr)
            .collect()
    }

    /// Stops a pod as if it was deleted (the slice loses it).
    pub fn kill_pod(&self, name: &str, addr: SocketAddr) {
        self.workloads
            .lock()
            .get_mut(name)
            .unwrap()
            .pods
            .retain(|p| p.addr != addr);
        self.publish(name);
    }

    async fn reconcile(self: &Arc<Self>) {
        let names: Vec<String> = self.workloads.lock().keys().cloned().collect();
        for name in names {
            let (ns, stuck) = {
                let w = self.workloads.lock();
                (w[&name].namespace.clone(), w[&name].rollout_stuck)
            };
            let Some(d) = self.api.get("deployments", &ns, &name) else {
                continue;
            };
            let want = d["spec"]["replicas"].as_i64().unwrap_or(0).max(0) as usize;
            let have = self.workloads.lock()[&name].pods.len();
            if have < want {
                for _ in have..want {
                    self.start_pod(&name).await;
                }
            } else if have > want {
                self.workloads
                    .lock()
                    .get_mut(&name)
                    .unwrap()
                    .pods
                    .truncate(want);
            }
            if have != want {
                self.publish(&name);
            }
            self.write_status(&name, stuck);
        }
    }

    async fn start_pod(self: &Arc<Self>, name: &str) {
        let (port, delay, pod_name) = {
            let mut w = self.workloads.lock();
            let w = w.get_mut(name).unwrap();
            w.next_pod += 1;
            (w.port, w.ready_delay, format!("{name}-pod-{}", w.next_pod))
        };
        let (listener, addr) = bind_pod(port).await;
        let mut server = JoinSet::new();
        let identity = format!("{pod_name} {addr}");
        server.spawn(serve_pod(listener, identity));
        self.workloads.lock().get_mut(name).unwrap().pods.push(Pod {
            name: pod_name,
            addr,
            ready: delay.is_zero(),
            _server: server,
        });
        if !delay.is_zero() {
            let weak = Arc::downgrade(self);
            let name = name.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Some(c) = weak.upgrade() {
                    c.mark_ready(&name, addr);
                }
            });
        }
    }

    /// Marks pods ready whose delay has passed: called by a timer per pod.
    fn mark_ready(&self, name: &str, addr: SocketAddr) {
        let mut found = false;
        if let Some(w) = self.workloads.lock().get_mut(name) {
            for p in &mut w.pods {
                if p.addr == addr && !p.ready {
                    p.ready = true;
                    found = true;
                }
            }
        }
        if found {
            self.publish(name);
            let stuck = self.workloads.lock()[name].rollout_stuck;
            self.write_status(name, stuck);
        }
    }

    /// Writes the EndpointSlice from the pods.
    fn publish(&self, name: &str) {
        let (ns, service, endpoints) = {
            let w = self.workloads.lock();
            let w = &w[name];
            let eps: Vec<Value> = w
                .pods
                .iter()
                .map(|p| json!({"addresses": [p.addr.ip().to_string()], "conditions": {"ready": p.ready, "serving": p.ready, "terminating": false}, "targetRef": {"kind": "Pod", "name": p.name, "namespace": w.namespace}}))
                .collect();
            (w.namespace.clone(), w.service.clone(), eps)
        };
        let slice_name = format!("{service}-abcde");
        let mut slice = self.api.get("endpointslices", &ns, &slice_name).unwrap();
        if slice["endpoints"] != json!(endpoints) {
            slice["endpoints"] = json!(endpoints);
            self.api.put("endpointslices", "EndpointSlice", slice);
        }
    }

    fn write_status(&self, name: &str, stuck: bool) {
        let (ns, total, ready) = {
            let w = self.workloads.lock();
            let w = &w[name];
            (
                w.namespace.clone(),
                w.pods.len() as i64,
                w.pods.iter().filter(|p| p.ready).count() as i64,
            )
        };
        let Some(mut d) = self.api.get("deployments", &ns, name) else {
            return;
        };
        let mut status = d["status"].clone();
        if !stuck {
            status["observedGeneration"] = d["metadata"]["generation"].clone();
            status["updatedReplicas"] = json!(total);
        }
        status["replicas"] = json!(total);
        status["readyReplicas"] = json!(ready);
        if status != d["status"] {
            d["status"] = status;
            self.api.put("deployments", "Deployment", d);
        }
    }
}

/// A port free on the pod loopback addresses a moment ago.
fn free_port_on_many() -> u16 {
    std::net::TcpListener::bind("127.0.1.250:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn bind_pod(port: u16) -> (TcpListener, SocketAddr) {
    loop {
        let n = NEXT_IP.fetch_add(1, Ordering::SeqCst);
        let ip = IpAddr::V4(Ipv4Addr::from(n));
        if let Ok(l) = TcpListener::bind(SocketAddr::new(ip, port)).await {
            return (l, SocketAddr::new(ip, port));
        }
    }
}

/// A pod's server: answers every request with `pod=<name> <addr>`.
async fn serve_pod(listener: TcpListener, identity: String) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let identity = identity.clone();
        conns.spawn(async move {
            let svc = service_fn(move |_req| {
                let body = format!("pod={identity}");
                async move {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
