//! A fake Kubernetes API server for integration tests: hyper on 127.0.0.1, speaking the real
//! protocol to the real `kube` client through a kubeconfig. Objects are JSON with a global
//! `resourceVersion`; collections LIST and WATCH (chunked JSON lines, bookmarks, `410 Gone` in
//! the stream for a compacted resourceVersion); items GET, POST, PUT and merge-PATCH with
//! optimistic concurrency (`409 Conflict`); Deployments and StatefulSets have a `scale`
//! subresource, every object a `status` one. PATCH follows the request's content type: JSON
//! merge patch, strategic merge patch (lists of objects with a `type` — conditions — merged by
//! it, as for pod status), or JSON patch (RFC 6902). POST honours `metadata.generateName`.
//!
//! [`Cluster`](super::fake_cluster) builds on it to simulate workloads and their pods.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, Notify};

/// An object's address: resource plural, namespace, name.
pub type Key = (String, String, String);

/// One change, as watches see it.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub kind: &'static str,
    pub plural: String,
    pub namespace: String,
    pub object: Value,
}

/// The stored objects and their history.
pub struct Store {
    pub rv: u64,
    pub objects: BTreeMap<Key, Value>,
    log: Vec<Change>,
    /// Watches from a resourceVersion below this get `410 Gone`.
    compacted: u64,
    /// Whether changes reach open watches (off: a watch silently misses them).
    pub deliver: bool,
}

/// Another writer, run just before a write it races with.
pub type Interloper = Box<dyn FnOnce(&FakeApi) + Send>;

/// Counters and knobs the tests read and set.
#[derive(Default)]
pub struct Knobs {
    /// PATCHes of a `scale` subresource that succeeded.
    pub scale_patches: AtomicUsize,
    /// PATCHes of a `scale` subresource answered 409.
    pub scale_conflicts: AtomicUsize,
    /// The next this-many scale PATCHes meet a concurrent writer (another change lands first).
    pub inject_conflicts: AtomicUsize,
    /// Connections are refused and open ones cut (an API server outage).
    pub down: AtomicBool,
    /// Watch requests seen (each restart is one more).
    pub watches: AtomicUsize,
    /// Watch streams answered with `410 Gone`.
    pub gones: AtomicUsize,
    /// ConfigMap writes (POST, PUT, PATCH) answered `409`.
    pub configmap_conflicts: AtomicUsize,
    /// Other writers: each runs just before the next ConfigMap write is handled (it lands
    /// between that writer's read and its write).
    pub interlopers: Mutex<Vec<Interloper>>,
}

/// The fake API server.
pub struct FakeApi {
    pub addr: SocketAddr,
    pub store: Mutex<Store>,
    pub knobs: Knobs,
    events: broadcast::Sender<Change>,
    kill_watches: broadcast::Sender<()>,
    /// Woken after every write (the simulated controllers reconcile).
    pub changed: Notify,
    conns: Mutex<Vec<tokio::task::AbortHandle>>,
    dir: PathBuf,
}

impl FakeApi {
    /// Starts the server on 127.0.0.1:0.
    pub async fn start() -> Arc<FakeApi> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = std::env::temp_dir().join(format!(
            "reveille-fake-kube-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let api = Arc::new(FakeApi {
            addr,
            store: Mutex::new(Store {
                rv: 100,
                objects: BTreeMap::new(),
                log: Vec::new(),
                compacted: 0,
                deliver: true,
            }),
            knobs: Knobs::default(),
            events: broadcast::channel(4096).0,
            kill_watches: broadcast::channel(16).0,
            changed: Notify::new(),
            conns: Mutex::new(Vec::new()),
            dir,
        });
        let weak = Arc::downgrade(&api);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let Some(api) = weak.upgrade() else { return };
                if api.knobs.down.load(Ordering::SeqCst) {
                    drop(stream);
                    continue;
                }
                let conns = api.clone();
                let task = tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                let mut list = conns.conns.lock();
                list.retain(|h| !h.is_finished());
                list.push(task.abort_handle());
            }
        });
        api
    }

    /// A kube client configured through a kubeconfig file pointing here.
    pub async fn client(&self) -> kube::Client {
        let path = self.dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: tester\n  user:\n    token: test-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n    namespace: default\ncurrent-context: fake\n",
                self.addr
            ),
        )
        .unwrap();
        let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    }

    /// Stores `object` (create or replace), bumping its resourceVersion; returns the stored one.
    pub fn put(&self, plural: &str, kind: &'static str, mut object: Value) -> Value {
        let mut st = self.store.lock();
        st.rv += 1;
        let rv = st.rv;
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let key = (plural.to_string(), ns.clone(), name);
        let existed = st.objects.contains_key(&key);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["kind"].is_null() {
            object["kind"] = json!(kind);
        }
        if object["metadata"]["generation"].is_null() {
            object["metadata"]["generation"] = json!(1);
        }
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{rv}"));
        }
        st.objects.insert(key, object.clone());
        let change = Change {
            rv,
            kind: if existed { "MODIFIED" } else { "ADDED" },
            plural: plural.to_string(),
            namespace: ns,
            object: object.clone(),
        };
        self.record(&mut st, change);
        drop(st);
        self.changed.notify_waiters();
        object
    }

    /// Deletes an object.
    pub fn delete(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let mut st = self.store.lock();
        let mut obj = st
            .objects
            .remove(&(plural.into(), ns.into(), name.into()))?;
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            rv,
            kind: "DELETED",
            plural: plural.to_string(),
            namespace: ns.to_string(),
            object: obj.clone(),
        };
        self.record(&mut st, change);
        drop(st);
        self.changed.notify_waiters();
        Some(obj)
    }

    fn record(&self, st: &mut Store, change: Change) {
        st.log.push(change.clone());
        if st.deliver {
            let _ = self.events.send(change);
        }
    }

    /// A copy of a stored object.
    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .objects
            .get(&(plural.into(), ns.into(), name.into()))
            .cloned()
    }

    /// Ends every open watch stream (the client re-watches from its last resourceVersion).
    pub fn drop_watches(&self) {
        let _ = self.kill_watches.send(());
    }

    /// Forgets history: a watch resumed from any version seen so far gets `410 Gone`.
    pub fn compact(&self) {
        let mut st = self.store.lock();
        st.compacted = st.rv + 1;
        st.log.clear();
    }

    /// Starts or ends an outage: while down, connections are closed as soon as they open, and
    /// the open ones (watches included) are cut.
    pub fn set_down(&self, down: bool) {
        self.knobs.down.store(down, Ordering::SeqCst);
        if down {
            self.drop_watches();
            for h in self.conns.lock().drain(..) {
                h.abort();
            }
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<WatchBody> {
        let method = req.method().clone();
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let path = req.uri().path().to_string();
        let query: HashMap<String, String> = req.uri().query().map(url_pairs).unwrap_or_default();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        // /apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}[/{sub}]] or /api/v1/...
        let rest = match segs.as_slice() {
            ["apis", _, _, rest @ ..] => rest,
            ["api", _, rest @ ..] => rest,
            _ => return status(404, "NotFound", "no such path"),
        };
        let (ns, plural, name, sub) = match rest {
            ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
            ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
            ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
            [plural] => (None, *plural, None, None),
            _ => return status(404, "NotFound", "no such path"),
        };
        let write = matches!(method, Method::POST | Method::PUT | Method::PATCH);
        if plural == "configmaps" && write {
            let next = {
                let mut queue = self.knobs.interlopers.lock();
                (!queue.is_empty()).then(|| queue.remove(0))
            };
            if let Some(other) = next {
                other(&self);
            }
        }
        let resp = self.dispatch(method, plural, ns, name, sub, &query, &content_type, &body);
        if plural == "configmaps" && resp.status() == StatusCode::CONFLICT {
            self.knobs
                .configmap_conflicts
                .fetch_add(1, Ordering::SeqCst);
        }
        resp
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        method: Method,
        plural: &str,
        ns: Option<&str>,
        name: Option<&str>,
        sub: Option<&str>,
        query: &HashMap<String, String>,
        content_type: &str,
        body: &[u8],
    ) -> Response<WatchBody> {
        match (method, name, sub) {
            (Method::GET, None, _)
                if query.get("watch").map(|v| v == "true" || v == "1") == Some(true) =>
            {
                self.watch(plural, ns, query)
            }
            (Method::GET, None, _) => self.list(plural, ns, query),
            (Method::GET, Some(name), None) => match self.get(plural, ns.unwrap_or(""), name) {
                Some(o) => json_resp(200, &o),
                None => status(404, "NotFound", &format!("{plural} {name:?} not found")),
            },
            (Method::GET, Some(name), Some("scale")) => {
                match self.get(plural, ns.unwrap_or(""), name) {
                    Some(o) => json_resp(200, &scale_of(&o)),
                    None => status(404, "NotFound", &format!("{plural} {name:?} not found")),
                }
            }
            (Method::PATCH, Some(name), Some("scale")) => {
                self.patch_scale(plural, ns.unwrap_or(""), name, body)
            }
            (Method::PATCH, Some(name), sub) => {
                self.patch(plural, ns.unwrap_or(""), name, sub, content_type, body)
            }
            (Method::PUT, Some(name), sub) => {
                self.replace(plural, ns.unwrap_or(""), name, sub, body)
            }
            (Method::POST, None, _) => self.create(plural, ns.unwrap_or(""), body),
            (Method::DELETE, Some(name), None) => match self.delete(plural, ns.unwrap_or(""), name)
            {
                Some(o) => json_resp(200, &o),
                None => status(404, "NotFound", "not found"),
            },
            _ => status(405, "MethodNotAllowed", "not supported by the fake"),
        }
    }

    fn list(
        &self,
        plural: &str,
        ns: Option<&str>,
        q: &HashMap<String, String>,
    ) -> Response<WatchBody> {
        let st = self.store.lock();
        let sel = q.get("labelSelector").cloned().unwrap_or_default();
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((p, n, _), o)| {
                p == plural && ns.is_none_or(|ns| ns == n) && matches_labels(o, &sel)
            })
            .map(|(_, o)| o.clone())
            .collect();
        json_resp(
            200,
            &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
        )
    }

    fn watch(
        &self,
        plural: &str,
        ns: Option<&str>,
        q: &HashMap<String, String>,
    ) -> Response<WatchBody> {
        self.knobs.watches.fetch_add(1, Ordering::SeqCst);
        let sel = q.get("labelSelector").cloned().unwrap_or_default();
        let bookmarks = q.get("allowWatchBookmarks").map(|v| v == "true") == Some(true);
        let from: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::channel::<Bytes>(1024);
        let filter = {
            let plural = plural.to_string();
            let ns = ns.map(str::to_string);
            move |c: &Change| {
                c.plural == plural
                    && ns.as_ref().is_none_or(|n| *n == c.namespace)
                    && matches_labels(&c.object, &sel)
            }
        };
        let st = self.store.lock();
        if from != 0 && from < st.compacted {
            self.knobs.gones.fetch_add(1, Ordering::SeqCst);
            let line = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
            let _ = tx.try_send(Bytes::from(format!("{line}\n")));
            return Response::new(WatchBody(rx));
        }
        let backlog: Vec<Change> = st
            .log
            .iter()
            .filter(|c| c.rv > from && filter(c))
            .cloned()
            .collect();
        let mut events = self.events.subscribe();
        let mut kill = self.kill_watches.subscribe();
        let current = st.rv;
        drop(st);
        let kind = kind_of(plural);
        tokio::spawn(async move {
            let line = |typ: &str, obj: &Value| {
                Bytes::from(format!("{}\n", json!({"type": typ, "object": obj})))
            };
            let mut last = from.max(current);
            for c in backlog {
                last = last.max(c.rv);
                if tx.send(line(c.kind, &c.object)).await.is_err() {
                    return;
                }
            }
            let bookmark = |rv: u64| json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}});
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(c) if c.rv > from && filter(&c) => {
                            last = last.max(c.rv);
                            if tx.send(line(c.kind, &c.object)).await.is_err() { return; }
                        }
                        Ok(c) => last = last.max(c.rv),
                        Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tick.tick(), if bookmarks => {
                        if tx.send(line("BOOKMARK", &bookmark(last))).await.is_err() { return; }
                    }
                    _ = kill.recv() => return,
                }
            }
        });
        let mut r = Response::new(WatchBody(rx));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    }

    fn create(&self, plural: &str, ns: &str, body: &[u8]) -> Response<WatchBody> {
        let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
            return status(400, "BadRequest", "invalid JSON");
        };
        obj["metadata"]["namespace"] = json!(ns);
        if obj["metadata"]["name"].as_str().unwrap_or("").is_empty() {
            if let Some(prefix) = obj["metadata"]["generateName"].as_str() {
                let n = self.store.lock().rv + 1;
                obj["metadata"]["name"] = json!(format!("{prefix}{n:05x}"));
            }
        }
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        if self.get(plural, ns, &name).is_some() {
            return already_exists(plural, &name);
        }
        json_resp(201, &self.put(plural, kind_of(plural), obj))
    }

    fn replace(
        &self,
        plural: &str,
        ns: &str,
        name: &str,
        sub: Option<&str>,
        body: &[u8],
    ) -> Response<WatchBody> {
        let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
            return status(400, "BadRequest", "invalid JSON");
        };
        let Some(current) = self.get(plural, ns, name) else {
            return status(404, "NotFound", "not found");
        };
        if let Some(rv) = obj["metadata"]["resourceVersion"].as_str() {
            if Some(rv) != current["metadata"]["resourceVersion"].as_str() {
                return conflict(plural, name);
            }
        }
        if sub == Some("status") {
            let mut merged = current.clone();
            merged["status"] = obj["status"].take();
            obj = merged;
        } else {
            obj["status"] = current["status"].clone();
        }
        obj["metadata"]["namespace"] = json!(ns);
        json_resp(200, &self.put(plural, kind_of(plural), obj))
    }

    fn patch(
        &self,
        plural: &str,
        ns: &str,
        name: &str,
        sub: Option<&str>,
        content_type: &str,
        body: &[u8],
    ) -> Response<WatchBody> {
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return status(400, "BadRequest", "invalid JSON");
        };
        let Some(mut obj) = self.get(plural, ns, name) else {
            return status(404, "NotFound", "not found");
        };
        if content_type.starts_with("application/json-patch+json") {
            if let Err(why) = json_patch(&mut obj, &patch) {
                return status(422, "Invalid", &why);
            }
            let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
            if sub.is_none() {
                obj["metadata"]["generation"] = json!(g + 1);
            }
            return json_resp(200, &self.put(plural, kind_of(plural), obj));
        }
        let strategic = content_type.starts_with("application/strategic-merge-patch+json");
        if let Some(rv) = patch["metadata"]["resourceVersion"].as_str() {
            if Some(rv) != obj["metadata"]["resourceVersion"].as_str() {
                return conflict(plural, name);
            }
        }
        if sub == Some("status") {
            // Only the status changes through the status subresource.
            let mut st = obj["status"].clone();
            let p = &patch["status"];
            if strategic {
                strategic_merge(&mut st, p);
            } else {
                merge(&mut st, p);
            }
            obj["status"] = st;
        } else if strategic {
            strategic_merge(&mut obj, &patch);
        } else {
            merge(&mut obj, &patch);
        }
        json_resp(200, &self.put(plural, kind_of(plural), obj))
    }

    fn patch_scale(&self, plural: &str, ns: &str, name: &str, body: &[u8]) -> Response<WatchBody> {
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return status(400, "BadRequest", "invalid JSON");
        };
        let Some(mut obj) = self.get(plural, ns, name) else {
            return status(404, "NotFound", "not found");
        };
        let injected = self
            .knobs
            .inject_conflicts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if injected {
            // Another writer touches the object first.
            obj = self.put(plural, kind_of(plural), obj);
        }
        if let Some(rv) = patch["metadata"]["resourceVersion"].as_str() {
            if Some(rv) != obj["metadata"]["resourceVersion"].as_str() {
                self.knobs.scale_conflicts.fetch_add(1, Ordering::SeqCst);
                return status(
                    409,
                    "Conflict",
                    "Operation cannot be fulfilled: the object has been modified",
                );
            }
        }
        let Some(replicas) = patch["spec"]["replicas"].as_i64() else {
            return status(422, "Invalid", "spec.replicas is required");
        };
        if obj["spec"]["replicas"].as_i64() != Some(replicas) {
            obj["spec"]["replicas"] = json!(replicas);
            let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = json!(g + 1);
        }
        self.knobs.scale_patches.fetch_add(1, Ordering::SeqCst);
        let stored = self.put(plural, kind_of(plural), obj);
        json_resp(200, &scale_of(&stored))
    }
}

/// The `autoscaling/v1` Scale of a workload.
fn scale_of(o: &Value) -> Value {
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": o["metadata"]["name"],
            "namespace": o["metadata"]["namespace"],
            "resourceVersion": o["metadata"]["resourceVersion"],
        },
        "spec": {"replicas": o["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {"replicas": o["status"]["replicas"].as_i64().unwrap_or(0), "selector": ""},
    })
}

fn kind_of(plural: &str) -> &'static str {
    match plural {
        "deployments" => "Deployment",
        "statefulsets" => "StatefulSet",
        "endpointslices" => "EndpointSlice",
        "leases" => "Lease",
        "reveilleservices" => "ReveilleService",
        "pods" => "Pod",
        "replicasets" => "ReplicaSet",
        "events" => "Event",
        "configmaps" => "ConfigMap",
        _ => "Object",
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// A strategic merge patch, as far as the tests need it: objects merge like a merge patch, and
/// a list of objects that all have a `type` (conditions) merges item by item on it.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    strategic_merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t @ Value::Array(_), Value::Array(p))
            if p.iter().all(|i| i["type"].is_string())
                && t.as_array().unwrap().iter().all(|i| i["type"].is_string()) =>
        {
            let items = t.as_array_mut().unwrap();
            for item in p {
                match items.iter_mut().find(|i| i["type"] == item["type"]) {
                    Some(old) => strategic_merge(old, item),
                    None => items.push(item.clone()),
                }
            }
        }
        (t, p) => {
            if t.is_null() && p.is_object() {
                *t = json!({});
                strategic_merge(t, p);
            } else {
                *t = p.clone();
            }
        }
    }
}

/// RFC 6902 JSON patch: `add`, `replace`, `remove` and `test` on object paths.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch is a list")?;
    for op in ops {
        let path = op["path"].as_str().ok_or("op without a path")?;
        let keys: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|k| k.replace("~1", "/").replace("~0", "~"))
            .collect();
        let (last, parents) = keys.split_last().ok_or("empty path")?;
        let mut at = &mut *target;
        for k in parents {
            at = at
                .get_mut(k.as_str())
                .ok_or(format!("{path}: no such parent"))?;
        }
        let map = at
            .as_object_mut()
            .ok_or(format!("{path}: parent is not an object"))?;
        match op["op"].as_str() {
            Some("add") => {
                map.insert(last.clone(), op["value"].clone());
            }
            Some("replace") => {
                if !map.contains_key(last) {
                    return Err(format!("{path}: nothing to replace"));
                }
                map.insert(last.clone(), op["value"].clone());
            }
            Some("remove") => {
                map.remove(last)
                    .ok_or(format!("{path}: nothing to remove"))?;
            }
            Some("test") => {
                if map.get(last) != Some(&op["value"]) {
                    return Err(format!("{path}: test failed"));
                }
            }
            other => return Err(format!("unsupported op {other:?}")),
        }
    }
    Ok(())
}

/// Equality-only label selectors: `a=b,c=d`.
fn matches_labels(o: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => {
                o["metadata"]["labels"][k.trim_end_matches('=')].as_str()
                    == Some(v.trim_start_matches('='))
            }
            None => false,
        })
}

fn url_pairs(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (unescape(k), unescape(v)))
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match h {
                    Some(c) => {
                        out.push(c);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_resp(code: u16, v: &Value) -> Response<WatchBody> {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Bytes::from(v.to_string()));
    let mut r = Response::new(WatchBody(rx));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn status(code: u16, reason: &str, message: &str) -> Response<WatchBody> {
    json_resp(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}

/// The `409` a real API server sends for a write with a stale `resourceVersion`.
fn conflict(plural: &str, name: &str) -> Response<WatchBody> {
    json_resp(
        409,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
            "reason": "Conflict", "details": {"name": name, "kind": plural}, "code": 409}),
    )
}

/// The `409` a real API server sends for a create that finds the object there.
fn already_exists(plural: &str, name: &str) -> Response<WatchBody> {
    json_resp(
        409,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{plural} \"{name}\" already exists"),
            "reason": "AlreadyExists", "details": {"name": name, "kind": plural}, "code": 409}),
    )
}

/// A response body fed from a channel: whole answers and chunked watch streams alike.
pub struct WatchBody(mpsc::Receiver<Bytes>);

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}
