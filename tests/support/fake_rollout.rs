//! A Deployment mid-rollout on top of [`FakeApi`]: ReplicaSets with revisions, pods with the
//! `reveille.dev/validated` readiness gate (real loopback servers answering with their version),
//! and the Service's EndpointSlice. A background task plays kubelet and the EndpointSlice
//! controller: a pod whose containers are ready and whose readiness gate condition is True turns
//! Ready, and its endpoint turns ready. The test plays the Deployment controller (it starts a
//! version's pods and removes the old ones).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::fake_kube::FakeApi;

/// Pod addresses: 127.0.2.1 upwards (other fakes use 127.0.1.x).
static NEXT_IP: AtomicU32 = AtomicU32::new(0x7f00_0201);

pub const CONDITION: &str = "reveille.dev/validated";

/// What one version's pods answer to the validation path `/validate`.
pub struct VersionBehaviour {
    pub validate_status: AtomicU16,
    /// How long `/validate` takes to answer, in milliseconds (default 0).
    pub validate_delay_ms: AtomicU64,
    /// Validation requests received (any path but `/work`), with method, path and body.
    pub validation_requests: Mutex<Vec<String>>,
    /// `/work` requests served.
    pub served: AtomicUsize,
}

struct SimPod {
    name: String,
    version: String,
    addr: SocketAddr,
    _server: JoinSet<()>,
}

/// The simulated Deployment `name`, its Service of the same name, and their pods.
pub struct Rollout {
    pub api: Arc<FakeApi>,
    pub ns: String,
    pub name: String,
    pub port: u16,
    pods: Mutex<Vec<SimPod>>,
    pub versions: Mutex<BTreeMap<String, Arc<VersionBehaviour>>>,
    deploy_uid: String,
}

impl Rollout {
    /// A Deployment with no ReplicaSet yet, its EndpointSlice (port named `http`), and the
    /// kubelet/endpoints loop.
    pub async fn start(ns: &str, name: &str) -> Arc<Rollout> {
        Rollout::start_on(FakeApi::start().await, ns, name).await
    }

    /// [`Rollout::start`] on an API server already running (several Deployments on one).
    pub async fn start_on(api: Arc<FakeApi>, ns: &str, name: &str) -> Arc<Rollout> {
        let port = {
            let l = std::net::TcpListener::bind("127.0.2.250:0").unwrap();
            l.local_addr().unwrap().port()
        };
        api.put(
            "endpointslices",
            "EndpointSlice",
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-abcde"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "endpoints": [], "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            }),
        );
        let d = api.put(
            "deployments",
            "Deployment",
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns, "annotations": {"deployment.kubernetes.io/revision": "0"}},
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}}, "template": template(name, "none")},
                "status": {"observedGeneration": 1, "replicas": 0, "updatedReplicas": 0, "readyReplicas": 0},
            }),
        );
        let r = Arc::new(Rollout {
            api: api.clone(),
            ns: ns.into(),
            name: name.into(),
            port,
            pods: Mutex::new(Vec::new()),
            versions: Mutex::new(BTreeMap::new()),
            deploy_uid: d["metadata"]["uid"].as_str().unwrap().to_string(),
        });
        let weak = Arc::downgrade(&r);
        tokio::spawn(async move {
            loop {
                let Some(r) = weak.upgrade() else { return };
                let api = r.api.clone();
                let changed = api.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                r.kubelet();
                drop(r);
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        r
    }

    /// Rolls the Deployment to `version` (revision `revision`): its template, a ReplicaSet, and
    /// `pods` pods with the readiness gate. `validated`: the pods start with the condition True
    /// (a version validated before Reveille started). `containers_ready`: whether the pods'
    /// containers are ready (else they wait for [`Rollout::containers_ready`]).
    pub async fn roll_to(
        &self,
        version: &str,
        revision: i64,
        pods: usize,
        validated: bool,
        containers_ready: bool,
    ) -> Arc<VersionBehaviour> {
        let behaviour = Arc::new(VersionBehaviour {
            validate_status: AtomicU16::new(200),
            validate_delay_ms: AtomicU64::new(0),
            validation_requests: Mutex::new(Vec::new()),
            served: AtomicUsize::new(0),
        });
        self.versions
            .lock()
            .insert(version.into(), behaviour.clone());
        let (ns, name) = (self.ns.as_str(), self.name.as_str());
        let mut d = self.api.get("deployments", ns, name).unwrap();
        d["spec"]["template"] = template(name, version);
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] =
            json!(revision.to_string());
        d["metadata"]["generation"] = json!(d["metadata"]["generation"].as_i64().unwrap() + 1);
        self.api.put("deployments", "Deployment", d);
        let mut rs_template = template(name, version);
        rs_template["metadata"]["labels"]["pod-template-hash"] = json!(version);
        self.api.put(
            "replicasets",
            "ReplicaSet",
            json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {
                    "name": format!("{name}-{version}"), "namespace": ns,
                    "labels": {"app": name, "pod-template-hash": version},
                    "annotations": {"deployment.kubernetes.io/revision": revision.to_string()},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": self.deploy_uid, "controller": true}],
                },
                "spec": {"replicas": pods, "selector": {"matchLabels": {"app": name, "pod-template-hash": version}}, "template": rs_template},
            }),
        );
        self.add_pods(version, pods, validated, containers_ready)
            .await;
        behaviour
    }

    /// Starts `pods` more pods of `version` (the ReplicaSet scaled up).
    pub async fn add_pods(
        &self,
        version: &str,
        pods: usize,
        validated: bool,
        containers_ready: bool,
    ) {
        let behaviour = self.versions.lock()[version].clone();
        let (ns, name) = (self.ns.as_str(), self.name.as_str());
        let first = self
            .pods
            .lock()
            .iter()
            .filter(|p| p.version == version)
            .count();
        for i in first..first + pods {
            let pod_name = format!("{name}-{version}-{i}");
            let (listener, addr) = bind(self.port).await;
            let mut server = JoinSet::new();
            server.spawn(serve(listener, version.to_string(), behaviour.clone()));
            let mut conditions = vec![
                json!({"type": "ContainersReady", "status": if containers_ready { "True" } else { "False" }}),
            ];
            conditions.push(json!({"type": "Ready", "status": "False"}));
            if validated {
                conditions
                    .push(json!({"type": CONDITION, "status": "True", "reason": "Validated"}));
            }
            self.api.put(
                "pods",
                "Pod",
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {
                        "name": pod_name, "namespace": ns,
                        "labels": {"app": name, "pod-template-hash": version},
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-{version}"), "uid": "rs", "controller": true}],
                    },
                    "spec": {
                        "containers": [{"name": "app", "image": format!("app:{version}"), "ports": [{"name": "http", "containerPort": self.port}]}],
                        "readinessGates": [{"conditionType": CONDITION}],
                    },
                    "status": {"phase": "Running", "podIP": addr.ip().to_string(), "conditions": conditions},
                }),
            );
            self.pods.lock().push(SimPod {
                name: pod_name,
                version: version.into(),
                addr,
                _server: server,
            });
        }
        let total = self
            .pods
            .lock()
            .iter()
            .filter(|p| p.version == version)
            .count();
        self.set_rs_replicas(version, total);
        self.kubelet();
    }

    fn set_rs_replicas(&self, version: &str, n: usize) {
        let rs_name = format!("{}-{version}", self.name);
        if let Some(mut rs) = self.api.get("replicasets", &self.ns, &rs_name) {
            if rs["spec"]["replicas"] != json!(n) {
                rs["spec"]["replicas"] = json!(n);
                self.api.put("replicasets", "ReplicaSet", rs);
            }
        }
    }

    /// The Deployment's `spec.replicas`.
    pub fn replicas(&self) -> i64 {
        self.api.get("deployments", &self.ns, &self.name).unwrap()["spec"]["replicas"]
            .as_i64()
            .unwrap()
    }

    /// Marks the containers of `version`'s pods ready.
    pub fn containers_ready(&self, version: &str) {
        for pod in self.pod_objects(version) {
            let mut pod = pod;
            for c in pod["status"]["conditions"].as_array_mut().unwrap() {
                if c["type"] == "ContainersReady" {
                    c["status"] = json!("True");
                }
            }
            self.api.put("pods", "Pod", pod);
        }
    }

    /// Sets the Deployment's `spec.strategy.type` (`Recreate` or `RollingUpdate`).
    pub fn set_strategy(&self, strategy: &str) {
        let mut d = self.api.get("deployments", &self.ns, &self.name).unwrap();
        d["spec"]["strategy"] = json!({"type": strategy});
        self.api.put("deployments", "Deployment", d);
    }

    /// Starts terminating `version`'s pods, as a deletion does: `deletionTimestamp` set, not
    /// ready any more (their endpoints turn not-ready), while their servers keep answering
    /// what they were sent (a graceful shutdown). [`Rollout::remove_version`] ends them.
    pub fn terminate_version(&self, version: &str) {
        for mut pod in self.pod_objects(version) {
            pod["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            for c in pod["status"]["conditions"].as_array_mut().unwrap() {
                if c["type"] == "ContainersReady" {
                    c["status"] = json!("False");
                }
            }
            self.api.put("pods", "Pod", pod);
        }
        self.kubelet();
    }

    /// Removes `version`'s pods (the Deployment controller scaled its ReplicaSet to zero).
    pub fn remove_version(&self, version: &str) {
        let names: Vec<String> = {
            let mut pods = self.pods.lock();
            let names = pods
                .iter()
                .filter(|p| p.version == version)
                .map(|p| p.name.clone())
                .collect();
            pods.retain(|p| p.version != version);
            names
        };
        for n in names {
            self.api.delete("pods", &self.ns, &n);
        }
        self.set_rs_replicas(version, 0);
        self.publish();
    }

    /// The stored pod objects of `version`.
    pub fn pod_objects(&self, version: &str) -> Vec<Value> {
        let names: Vec<String> = self
            .pods
            .lock()
            .iter()
            .filter(|p| p.version == version)
            .map(|p| p.name.clone())
            .collect();
        names
            .iter()
            .filter_map(|n| self.api.get("pods", &self.ns, n))
            .collect()
    }

    /// The `reveille.dev/validated` condition of each of `version`'s pods.
    pub fn validated_conditions(&self, version: &str) -> Vec<Value> {
        self.pod_objects(version)
            .into_iter()
            .map(|p| {
                p["status"]["conditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["type"] == CONDITION)
                    .cloned()
                    .unwrap_or(Value::Null)
            })
            .collect()
    }

    /// Addresses of `version`'s pods.
    pub fn addrs(&self, version: &str) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self
            .pods
            .lock()
            .iter()
            .filter(|p| p.version == version)
            .map(|p| p.addr)
            .collect();
        v.sort();
        v
    }

    /// Every stored Event.
    pub fn events(&self) -> Vec<Value> {
        self.api
            .store
            .lock()
            .objects
            .iter()
            .filter(|((p, _, _), _)| p == "events")
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Kubelet and the EndpointSlice controller: a pod is Ready when its containers are and
    /// every readiness gate's condition is True; the slice lists every pod with its readiness.
    /// The Deployment's status always looks settled: what holds a rollout back here is the
    /// readiness gate, which only Reveille's own check knows about.
    fn kubelet(&self) {
        if let Some(mut d) = self.api.get("deployments", &self.ns, &self.name) {
            let want = d["spec"]["replicas"].clone();
            let status = json!({"observedGeneration": d["metadata"]["generation"], "replicas": want, "updatedReplicas": want, "readyReplicas": want});
            if d["status"] != status {
                d["status"] = status;
                self.api.put("deployments", "Deployment", d);
            }
        }
        let names: Vec<String> = self.pods.lock().iter().map(|p| p.name.clone()).collect();
        for n in names {
            let Some(mut pod) = self.api.get("pods", &self.ns, &n) else {
                continue;
            };
            let conds = pod["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let is_true = |t: &str| {
                conds
                    .iter()
                    .any(|c| c["type"] == t && c["status"] == "True")
            };
            let ready = is_true("ContainersReady") && is_true(CONDITION);
            if is_true("Ready") != ready {
                for c in pod["status"]["conditions"].as_array_mut().unwrap() {
                    if c["type"] == "Ready" {
                        c["status"] = json!(if ready { "True" } else { "False" });
                    }
                }
                self.api.put("pods", "Pod", pod);
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let pods: Vec<(String, SocketAddr)> = self
            .pods
            .lock()
            .iter()
            .map(|p| (p.name.clone(), p.addr))
            .collect();
        let eps: Vec<Value> = pods
            .iter()
            .filter_map(|(n, addr)| {
                let pod = self.api.get("pods", &self.ns, n)?;
                let ready = pod["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                Some(json!({"addresses": [addr.ip().to_string()], "conditions": {"ready": ready, "serving": ready, "terminating": false}, "targetRef": {"kind": "Pod", "name": n, "namespace": self.ns}}))
            })
            .collect();
        let slice_name = format!("{}-abcde", self.name);
        let mut slice = self
            .api
            .get("endpointslices", &self.ns, &slice_name)
            .unwrap();
        if slice["endpoints"] != json!(eps) {
            slice["endpoints"] = json!(eps);
            self.api.put("endpointslices", "EndpointSlice", slice);
        }
    }
}

/// A pod template as users write it (with the readiness gate).
fn template(name: &str, version: &str) -> Value {
    json!({
        "metadata": {"labels": {"app": name}, "annotations": {"version": version}},
        "spec": {
            "containers": [{"name": "app", "image": format!("app:{version}")}],
            "readinessGates": [{"conditionType": CONDITION}],
        },
    })
}

async fn bind(port: u16) -> (TcpListener, SocketAddr) {
    loop {
        let n = NEXT_IP.fetch_add(1, Ordering::SeqCst);
        let ip = IpAddr::V4(Ipv4Addr::from(n));
        if let Ok(l) = TcpListener::bind(SocketAddr::new(ip, port)).await {
            return (l, SocketAddr::new(ip, port));
        }
    }
}

/// A pod: `/work?ms=N` answers `version=<v>` after N ms; `/validate` answers the version's
/// configured status; anything else 200. Validation requests are recorded.
async fn serve(listener: TcpListener, version: String, b: Arc<VersionBehaviour>) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let version = version.clone();
        let b = b.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let version = version.clone();
                let b = b.clone();
                async move {
                    let path = req.uri().path().to_string();
                    let query = req.uri().query().unwrap_or("").to_string();
                    let method = req.method().to_string();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let status = if path == "/work" {
                        let ms: u64 = query
                            .strip_prefix("ms=")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        b.served.fetch_add(1, Ordering::SeqCst);
                        200
                    } else {
                        b.validation_requests.lock().push(format!(
                            "{method} {path} {}",
                            String::from_utf8_lossy(&body)
                        ));
                        if path == "/validate" {
                            let delay = b.validate_delay_ms.load(Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                            b.validate_status.load(Ordering::SeqCst)
                        } else {
                            200
                        }
                    };
                    let mut r = Response::new(Full::new(Bytes::from(format!("version={version}"))));
                    *r.status_mut() = StatusCode::from_u16(status).unwrap();
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Another service a validation step asks (`via`): answers each request with the next of
/// `answers` (the last one repeats), status 200; records each request's path and its
/// `x-candidate-version` header.
/// Requests a [`Scripted`] service saw: path, `x-candidate-version`.
pub type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

pub struct Scripted {
    pub addr: SocketAddr,
    pub seen: Seen,
    _server: JoinSet<()>,
}

impl Scripted {
    pub async fn start(answers: &[&str]) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answers: Arc<Vec<String>> = Arc::new(answers.iter().map(|a| a.to_string()).collect());
        let seen: Seen = Arc::default();
        let mut server = JoinSet::new();
        let recorded = seen.clone();
        server.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (answers, seen) = (answers.clone(), recorded.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let answer = {
                            let mut seen = seen.lock();
                            seen.push((
                                req.uri().path().to_string(),
                                req.headers()
                                    .get("x-candidate-version")
                                    .map(|v| v.to_str().unwrap().to_string()),
                            ));
                            answers[(seen.len() - 1).min(answers.len() - 1)].clone()
                        };
                        async move {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(answer),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Scripted {
            addr,
            seen,
            _server: server,
        }
    }
}
