//! Services from `ReveilleService` objects, watched live through the fake API server: added,
//! changed, removed and invalid objects, without disturbing held requests of the others.

#[path = "support/fake_cluster.rs"]
mod fake_cluster;
#[path = "support/fake_kube.rs"]
mod fake_kube;
mod support;

use std::time::Duration;

use fake_cluster::Cluster;
use serde_json::json;
use support::*;

const NS: &str = "integrations";
const LONG: Duration = Duration::from_secs(30);

fn put_object(cluster: &Cluster, name: &str, generation: i64, spec: serde_json::Value) {
    cluster.api.put(
        "reveilleservices",
        "ReveilleService",
        json!({
            "apiVersion": "reveille.dev/v1alpha1", "kind": "ReveilleService",
            "metadata": {"name": name, "namespace": NS, "generation": generation},
            "spec": spec,
        }),
    );
}

fn spec(host: &str, deployment: &str, port: serde_json::Value) -> serde_json::Value {
    json!({
        "hosts": [host],
        "backend": {"kubernetes": {"deployment": deployment, "service": deployment, "port": port}},
        "queue": {"capacity": 100, "timeout": "30s"},
        "idle_timeout": "5m",
    })
}

fn ready_condition(cluster: &Cluster, name: &str) -> Option<serde_json::Value> {
    cluster.api.get("reveilleservices", NS, name)?["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
}

async fn status_of(c: &TestClient, r: &Running, host: &str) -> u16 {
    get(c, r.proxy_addr, host, "/").await.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_add_change_and_remove_services_live() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(NS, "order-sync", "order-sync", 1, Duration::ZERO);
    // `billing` starts at zero and takes a while: a request to it is held across the changes.
    cluster.add_deployment(NS, "billing", "billing", 0, Duration::from_millis(1500));
    let cfg = reveille::Config::parse("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ncrd: {}\n")
        .expect("a config with only `crd:` is valid");
    let kube = cluster.api.client().await;
    let r = reveille::app::start_with_kube(cfg, Some(kube))
        .await
        .unwrap();
    let c = client();
    assert_eq!(status_of(&c, &r, "orders.test").await, 404);

    // Added.
    put_object(
        &cluster,
        "billing",
        1,
        spec("billing.test", "billing", json!("http")),
    );
    put_object(
        &cluster,
        "orders",
        1,
        spec("orders.test", "order-sync", json!("http")),
    );
    wait_until("orders served", LONG, || async {
        status_of(&c, &r, "orders.test").await == 200
    })
    .await;
    let cond = ready_condition(&cluster, "orders").expect("status written");
    assert_eq!(cond["status"], "True");
    assert_eq!(cond["reason"], "Valid");
    assert_eq!(cond["observedGeneration"], 1);

    // A held request to billing while other objects change.
    let held = {
        let c = c.clone();
        let addr = r.proxy_addr;
        tokio::spawn(async move { get(&c, addr, "billing.test", "/held").await })
    };

    // Changed: new host.
    put_object(
        &cluster,
        "orders",
        2,
        spec("orders2.test", "order-sync", json!("http")),
    );
    wait_until("orders moved to its new host", LONG, || async {
        status_of(&c, &r, "orders2.test").await == 200
            && status_of(&c, &r, "orders.test").await == 404
    })
    .await;

    // Invalid: reported on the object, never a crash; the rest keeps working.
    put_object(
        &cluster,
        "broken",
        1,
        spec("broken.test", "order-sync", json!(70000)),
    );
    wait_until("invalid object reported", LONG, || async {
        ready_condition(&cluster, "broken").is_some_and(|c| c["status"] == "False")
    })
    .await;
    let cond = ready_condition(&cluster, "broken").unwrap();
    assert_eq!(cond["reason"], "Invalid");
    assert_eq!(
        cond["message"],
        "spec.backend.kubernetes.port: 70000 is not a port (1-65535)"
    );
    assert_eq!(status_of(&c, &r, "broken.test").await, 404);
    assert_eq!(status_of(&c, &r, "orders2.test").await, 200);

    // Removed.
    cluster.api.delete("reveilleservices", NS, "orders");
    wait_until("orders removed", LONG, || async {
        status_of(&c, &r, "orders2.test").await == 404
    })
    .await;

    // The held request went through all of it untouched.
    let resp = held.await.unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(resp.body.starts_with("pod=billing-pod-"), "{}", resp.body);
    stop(r).await;
}

/// `depends_on` on objects: `api` names `db` of its namespace; a request to `api` wakes `db`
/// first, each Deployment patched in order. Objects that depend on each other in a cycle are
/// reported invalid on their status and not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_depend_on_objects_and_a_cycle_is_reported_on_them() {
    let cluster = Cluster::start().await;
    for name in ["api", "db"] {
        cluster.add_deployment(NS, name, name, 0, Duration::from_millis(200));
    }
    let cfg = reveille::Config::parse("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ncrd: {}\n")
        .expect("a config with only `crd:` is valid");
    let kube = cluster.api.client().await;
    let r = reveille::app::start_with_kube(cfg, Some(kube))
        .await
        .unwrap();
    let with_deps = |host: &str, deployment: &str, deps: &[&str]| {
        let mut s = spec(host, deployment, json!("http"));
        s["depends_on"] = json!(deps);
        s
    };
    put_object(&cluster, "db", 1, with_deps("db.test", "db", &[]));
    put_object(&cluster, "api", 1, with_deps("api.test", "api", &["db"]));
    wait_until("both valid", LONG, || async {
        ["api", "db"]
            .iter()
            .all(|n| ready_condition(&cluster, n).is_some_and(|c| c["status"] == "True"))
    })
    .await;
    let c = client();
    // Which Deployment got replicas first, seen while the request is held.
    let order = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let (o, c2) = (order.clone(), cluster.clone());
    let watcher = tokio::spawn(async move {
        loop {
            for name in ["api", "db"] {
                let mut o = o.lock();
                if c2.replicas(NS, name) > 0 && !o.iter().any(|n| n == name) {
                    o.push(name.to_string());
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    // A 404 only means the object's service is not swapped in yet: ask again (a held request
    // is answered once both Deployments are up).
    let mut resp = get(&c, r.proxy_addr, "api.test", "/").await;
    let deadline = std::time::Instant::now() + LONG;
    while resp.status == 404 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        resp = get(&c, r.proxy_addr, "api.test", "/").await;
    }
    assert_eq!(resp.status, 200, "{resp:?}");
    wait_until("both patched", LONG, || {
        let o = order.clone();
        async move { o.lock().len() == 2 }
    })
    .await;
    watcher.abort();
    assert_eq!(*order.lock(), vec!["db", "api"]);

    // A cycle: db now depends on api. The first object of the cycle names it; the other then
    // depends on an invalid object; neither is served.
    put_object(&cluster, "db", 2, with_deps("db.test", "db", &["api"]));
    wait_until("cycle reported", LONG, || async {
        ["api", "db"]
            .iter()
            .all(|n| ready_condition(&cluster, n).is_some_and(|c| c["status"] == "False"))
    })
    .await;
    let api = ready_condition(&cluster, "api").unwrap();
    assert_eq!(
        api["message"],
        "spec.depends_on: dependency cycle: api -> db -> api"
    );
    let db = ready_condition(&cluster, "db").unwrap();
    assert_eq!(
        db["message"],
        "spec.depends_on[0]: no valid ReveilleService \"api\" in namespace \"integrations\""
    );
    // Statuses are written before the services are swapped: wait for the swap.
    wait_until("api no longer served", LONG, || async {
        status_of(&c, &r, "api.test").await == 404
    })
    .await;
    stop(r).await;
}
