//! The Kubernetes backend end to end: Reveille in-process with the real `kube` client, talking
//! through a kubeconfig to a fake API server on 127.0.0.1 that simulates Deployments, their
//! pods (real loopback listeners) and EndpointSlices.

#[path = "support/fake_cluster.rs"]
mod fake_cluster;
#[path = "support/fake_kube.rs"]
mod fake_kube;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fake_cluster::Cluster;
use support::*;

const NS: &str = "integrations";
const LONG: Duration = Duration::from_secs(30);

/// A one-service config for the `order-sync` Deployment; `backend_extra` goes into the
/// `kubernetes` mapping, `extra` under the service.
fn config(backend_extra: &str, extra: &[&str]) -> reveille::Config {
    let mut s = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: orders\n    hosts: [orders.test]\n    backend:\n      kubernetes: {{ namespace: {NS}, deployment: order-sync, service: order-sync, port: http{backend_extra} }}\n    queue: {{ capacity: 1000, timeout: 30s }}\n"
    );
    for line in extra {
        s.push_str("    ");
        s.push_str(line);
        s.push('\n');
    }
    reveille::Config::parse(&s).unwrap_or_else(|e| panic!("bad test config: {e}\n{s}"))
}

async fn start_reveille(cluster: &Cluster, cfg: reveille::Config) -> Running {
    let client = cluster.api.client().await;
    reveille::app::start_with_kube(cfg, Some(client))
        .await
        .expect("start reveille")
}

async fn burst(c: &TestClient, r: &Running, n: usize) -> Vec<Resp> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = c.clone();
        let addr = r.proxy_addr;
        tasks.push(tokio::spawn(async move {
            get(&c, addr, "orders.test", &format!("/order/{i}")).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_burst_wakes_once_and_every_request_is_answered() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(
        NS,
        "order-sync",
        "order-sync",
        0,
        Duration::from_millis(500),
    );
    let r = start_reveille(
        &cluster,
        config(", replicas: 2", &["idle_timeout: 5m", "concurrency: 20"]),
    )
    .await;
    let c = client();
    let resps = burst(&c, &r, 150).await;
    for resp in &resps {
        assert_eq!(resp.status, 200, "{resp:?}");
        assert!(
            resp.body.starts_with("pod=order-sync-pod-"),
            "{}",
            resp.body
        );
    }
    assert_eq!(
        cluster.api.knobs.scale_patches.load(Ordering::SeqCst),
        1,
        "one wake-up patch"
    );
    assert_eq!(cluster.replicas(NS, "order-sync"), 2);
    let m = metrics_text(&c, &r).await;
    assert_eq!(
        metric(
            &m,
            "reveille_activations_total{outcome=\"ready\",service=\"orders\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "reveille_scale_patches_total{direction=\"up\",service=\"orders\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "reveille_requests_total{code=\"200\",service=\"orders\"}"
        ),
        Some(150.0)
    );
    for phase in ["scale_accepted", "endpoint_ready", "first_forwarded"] {
        let series =
            format!("reveille_wakeup_seconds_count{{phase=\"{phase}\",service=\"orders\"}}");
        assert_eq!(metric(&m, &series), Some(1.0), "{phase}");
    }
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_to_zero_after_idle_and_wakes_again() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(
        NS,
        "order-sync",
        "order-sync",
        0,
        Duration::from_millis(100),
    );
    let r = start_reveille(&cluster, config("", &["idle_timeout: 1s"])).await;
    let c = client();
    assert_eq!(get(&c, r.proxy_addr, "orders.test", "/").await.status, 200);
    assert_eq!(cluster.replicas(NS, "order-sync"), 1);
    wait_until("scale to zero", LONG, || async {
        cluster.replicas(NS, "order-sync") == 0
    })
    .await;
    wait_until("pods gone from routing", LONG, || async {
        routed(&r).is_empty()
    })
    .await;
    let m = metrics_text(&c, &r).await;
    assert_eq!(
        metric(
            &m,
            "reveille_scale_patches_total{direction=\"down\",service=\"orders\"}"
        ),
        Some(1.0)
    );
    // The next request wakes it again.
    let resp = get(&c, r.proxy_addr, "orders.test", "/again").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("x-reveille-cold-start"), Some("true"));
    assert_eq!(
        cluster.api.knobs.scale_patches.load(Ordering::SeqCst),
        3,
        "up, down, up"
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_in_progress_blocks_scale_down() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(NS, "order-sync", "order-sync", 1, Duration::ZERO);
    let r = start_reveille(&cluster, config("", &["idle_timeout: 1s"])).await;
    wait_until("pod routed", LONG, || async { routed(&r).len() == 1 }).await;
    cluster.set_rollout(NS, "order-sync", true);
    let c = client();
    wait_until("a deferred scale-down", LONG, || async {
        metric(
            &metrics_text(&c, &r).await,
            "reveille_scale_down_deferred_total{reason=\"rollout\",service=\"orders\"}",
        )
        .unwrap_or(0.0)
            >= 2.0
    })
    .await;
    assert_eq!(
        cluster.replicas(NS, "order-sync"),
        1,
        "no scale-down mid-rollout"
    );
    assert_eq!(cluster.api.knobs.scale_patches.load(Ordering::SeqCst), 0);
    cluster.set_rollout(NS, "order-sync", false);
    wait_until("scale to zero after the rollout", LONG, || async {
        cluster.replicas(NS, "order-sync") == 0
    })
    .await;
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_restarts_and_410_relist_and_drop_removed_pods() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(NS, "order-sync", "order-sync", 2, Duration::ZERO);
    let r = start_reveille(&cluster, config(", scale_down: false", &[])).await;
    wait_until("two pods routed", LONG, || async { routed(&r).len() == 2 }).await;

    // A plain restart: the stream ends, the client resumes from its last resourceVersion.
    let watches = cluster.api.knobs.watches.load(Ordering::SeqCst);
    cluster.api.drop_watches();
    wait_until("re-watch", LONG, || async {
        cluster.api.knobs.watches.load(Ordering::SeqCst) > watches
    })
    .await;
    cluster.set_replicas(NS, "order-sync", 3);
    wait_until("third pod routed", LONG, || async { routed(&r).len() == 3 }).await;

    // A pod removed while the watch misses it, history compacted: the resumed watch gets 410,
    // the client re-lists, and the removed pod is dropped.
    cluster.api.store.lock().deliver = false;
    let gone = cluster.pod_addrs("order-sync")[2];
    cluster.set_replicas(NS, "order-sync", 2);
    wait_until("pod stopped", LONG, || async {
        !cluster.pod_addrs("order-sync").contains(&gone)
    })
    .await;
    cluster.api.compact();
    cluster.api.store.lock().deliver = true;
    assert!(
        routed(&r).contains(&gone),
        "the watch has not seen the removal yet"
    );
    cluster.api.drop_watches();
    wait_until("410 answered", LONG, || async {
        cluster.api.knobs.gones.load(Ordering::SeqCst) >= 1
    })
    .await;
    wait_until("removed pod dropped", LONG, || async {
        !routed(&r).contains(&gone) && routed(&r).len() == 2
    })
    .await;
    let c = client();
    for resp in burst(&c, &r, 40).await {
        assert_eq!(resp.status, 200, "{resp:?}");
        assert!(!resp.body.contains(&gone.to_string()), "{}", resp.body);
    }
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_outage_keeps_warm_traffic_flowing() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(NS, "order-sync", "order-sync", 1, Duration::ZERO);
    let r = start_reveille(&cluster, config("", &["idle_timeout: 1s"])).await;
    wait_until("pod routed", LONG, || async { routed(&r).len() == 1 }).await;
    let c = client();
    cluster.api.set_down(true);
    // Longer than the idle timeout: scale-down must not happen (it cannot be checked), and
    // requests keep going to the known pod.
    for i in 0..30 {
        let resp = get(&c, r.proxy_addr, "orders.test", &format!("/during/{i}")).await;
        assert_eq!(resp.status, 200, "{resp:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(routed(&r).len(), 1, "the known pod stays routed");
    assert_eq!(
        get(&c, r.proxy_addr, "orders.test", "/idle-then")
            .await
            .status,
        200
    );
    let m = metrics_text(&c, &r).await;
    assert!(
        metric(&m, "reveille_kubernetes_api_errors_total{operation=\"watch_endpoints\",service=\"orders\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    cluster.api.set_down(false);
    // Back up: changes flow again, and the idle scale-down goes ahead.
    wait_until("scale to zero after the outage", LONG, || async {
        cluster.replicas(NS, "order-sync") == 0
    })
    .await;
    wait_until("pods gone", LONG, || async { routed(&r).is_empty() }).await;
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_patch_is_re_read_and_retried() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(NS, "order-sync", "order-sync", 0, Duration::ZERO);
    cluster
        .api
        .knobs
        .inject_conflicts
        .store(2, Ordering::SeqCst);
    let r = start_reveille(&cluster, config("", &["idle_timeout: 5m"])).await;
    let c = client();
    assert_eq!(get(&c, r.proxy_addr, "orders.test", "/").await.status, 200);
    assert_eq!(cluster.api.knobs.scale_conflicts.load(Ordering::SeqCst), 2);
    assert_eq!(cluster.api.knobs.scale_patches.load(Ordering::SeqCst), 1);
    assert_eq!(cluster.replicas(NS, "order-sync"), 1);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_never_lowers_a_count_someone_else_raised() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(
        NS,
        "order-sync",
        "order-sync",
        0,
        Duration::from_millis(300),
    );
    let r = start_reveille(&cluster, config(", replicas: 1", &["idle_timeout: 5m"])).await;
    // An HPA raised it to 3 just before the first request.
    cluster.set_replicas(NS, "order-sync", 3);
    let c = client();
    assert_eq!(get(&c, r.proxy_addr, "orders.test", "/").await.status, 200);
    assert_eq!(cluster.api.knobs.scale_patches.load(Ordering::SeqCst), 0);
    assert_eq!(cluster.replicas(NS, "order-sync"), 3);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_mode_never_patches_and_only_waits_for_endpoints() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(
        NS,
        "order-sync",
        "order-sync",
        0,
        Duration::from_millis(100),
    );
    let r = start_reveille(&cluster, config(", scaling: keda", &["idle_timeout: 1s"])).await;
    let c = client();
    let held = {
        let c = c.clone();
        let addr = r.proxy_addr;
        tokio::spawn(async move { get(&c, addr, "orders.test", "/held").await })
    };
    wait_until("request held", LONG, || async { r.gates()[0].held() == 1 }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        cluster.replicas(NS, "order-sync"),
        0,
        "Reveille does not scale in KEDA mode"
    );
    // KEDA scales it up.
    cluster.set_replicas(NS, "order-sync", 1);
    assert_eq!(held.await.unwrap().status, 200);
    // Idle well past the timeout: still no patch from Reveille.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(cluster.replicas(NS, "order-sync"), 1);
    assert_eq!(cluster.api.knobs.scale_patches.load(Ordering::SeqCst), 0);
    let _ = Arc::strong_count(&cluster);
    stop(r).await;
}

/// A Reveille replica's "pod": its own loopback address (127.0.3.x, unused by other tests) and
/// an admin port free on it.
fn replica_addr() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
    let ip = std::net::Ipv4Addr::new(127, 0, 3, NEXT.fetch_add(1, Ordering::SeqCst));
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Reveille replicas: admin addresses chosen up front, each listed in its own EndpointSlice of
/// the `reveille-admin` Service (as Kubernetes would list two pods).
fn replica_config(identity: &str, admin: SocketAddr) -> reveille::Config {
    replica_config_with_lease(identity, admin, "2s")
}

fn replica_config_with_lease(identity: &str, admin: SocketAddr, lease: &str) -> reveille::Config {
    let ip = admin.ip();
    let s = format!(
        "listen: 127.0.0.1:0\nadmin: {admin}\ncoordination: {{ namespace: reveille, identity: {identity}, lease_duration: {lease}, peers_service: reveille-admin, pod_ip: {ip}, peer_timeout: 1s }}\nservices:\n  - name: orders\n    hosts: [orders.test]\n    backend:\n      kubernetes: {{ namespace: {NS}, deployment: order-sync, service: order-sync, port: http }}\n    idle_timeout: 1s\n"
    );
    reveille::Config::parse(&s).unwrap_or_else(|e| panic!("bad test config: {e}\n{s}"))
}

fn publish_admin(cluster: &Cluster, identity: &str, admin: SocketAddr) {
    let (ip, port) = (admin.ip().to_string(), admin.port());
    cluster.api.put(
        "endpointslices",
        "EndpointSlice",
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("reveille-admin-{identity}"), "namespace": "reveille", "labels": {"kubernetes.io/service-name": "reveille-admin"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
            "ports": [{"name": "admin", "port": port, "protocol": "TCP"}],
        }),
    );
}

fn lease_holder(cluster: &Cluster) -> Option<String> {
    cluster
        .api
        .get("leases", "reveille", "reveille-scale-down")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

fn deferred(m: &str, reason: &str) -> f64 {
    metric(
        m,
        &format!("reveille_scale_down_deferred_total{{reason=\"{reason}\",service=\"orders\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_scale_down_only_when_both_are_idle() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(NS, "order-sync", "order-sync", 0, Duration::ZERO);
    let (pa, pb) = (replica_addr(), replica_addr());
    publish_admin(&cluster, "a", pa);
    publish_admin(&cluster, "b", pb);
    let a = start_reveille(&cluster, replica_config("a", pa)).await;
    let b = start_reveille(&cluster, replica_config("b", pb)).await;
    wait_until("a lease holder", LONG, || async {
        lease_holder(&cluster).is_some()
    })
    .await;
    let (leader, other) = if lease_holder(&cluster).as_deref() == Some("a") {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let c = client();
    // Wake through the leader, then keep only the other replica busy: the leader is idle
    // locally but must not scale down while its peer serves.
    assert_eq!(
        get(&c, leader.proxy_addr, "orders.test", "/").await.status,
        200
    );
    for i in 0..25 {
        let resp = get(&c, other.proxy_addr, "orders.test", &format!("/busy/{i}")).await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(
            cluster.replicas(NS, "order-sync"),
            1,
            "scaled down while a peer was busy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = metrics_text(&c, leader).await;
    assert!(deferred(&m, "peer_active") >= 1.0, "{m}");
    assert_eq!(cluster.api.knobs.scale_patches.load(Ordering::SeqCst), 1);
    // Both idle now: the leader scales to zero, once.
    wait_until("scale to zero when both are idle", LONG, || async {
        cluster.replicas(NS, "order-sync") == 0
    })
    .await;
    assert_eq!(cluster.api.knobs.scale_patches.load(Ordering::SeqCst), 2);
    stop(a).await;
    stop(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_an_unreachable_peer_only_delays() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(NS, "order-sync", "order-sync", 1, Duration::ZERO);
    let (pa, pb) = (replica_addr(), replica_addr());
    publish_admin(&cluster, "a", pa);
    publish_admin(&cluster, "b", pb);
    // Only `a` runs: it leads, but its peer `b` does not answer, so nothing is scaled down.
    let a = start_reveille(&cluster, replica_config("a", pa)).await;
    wait_until("a leads", LONG, || async {
        lease_holder(&cluster).as_deref() == Some("a")
    })
    .await;
    let c = client();
    wait_until(
        "scale-down put off for the unreachable peer",
        LONG,
        || async { deferred(&metrics_text(&c, &a).await, "peer_unknown") >= 2.0 },
    )
    .await;
    assert_eq!(cluster.replicas(NS, "order-sync"), 1);
    // `b` starts and serves; `a` is killed and its pod leaves the admin Service.
    let b = start_reveille(&cluster, replica_config("b", pb)).await;
    let busy = {
        let c = c.clone();
        let addr = b.proxy_addr;
        tokio::spawn(async move {
            for i in 0..20 {
                let resp = get(&c, addr, "orders.test", &format!("/busy/{i}")).await;
                assert_eq!(resp.status, 200, "{resp:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    stop(a).await;
    cluster
        .api
        .delete("endpointslices", "reveille", "reveille-admin-a");
    wait_until("b takes over the lease", LONG, || async {
        lease_holder(&cluster).as_deref() == Some("b")
    })
    .await;
    busy.await.unwrap();
    assert_eq!(
        cluster.api.knobs.scale_patches.load(Ordering::SeqCst),
        0,
        "no scale-down while b was busy"
    );
    wait_until("the new leader scales to zero", LONG, || async {
        cluster.replicas(NS, "order-sync") == 0
    })
    .await;
    stop(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_hands_the_lease_over_at_once() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(NS, "order-sync", "order-sync", 1, Duration::ZERO);
    let (pa, pb) = (replica_addr(), replica_addr());
    publish_admin(&cluster, "a", pa);
    // A lease far longer than the test's patience: `b` can only lead this soon if `a` lets go.
    let a = start_reveille(&cluster, replica_config_with_lease("a", pa, "300s")).await;
    wait_until("a leads", LONG, || async {
        lease_holder(&cluster).as_deref() == Some("a")
    })
    .await;
    stop(a).await;
    assert_eq!(lease_holder(&cluster), None, "a stopped but kept the lease");
    publish_admin(&cluster, "b", pb);
    let b = start_reveille(&cluster, replica_config_with_lease("b", pb, "300s")).await;
    wait_until("b takes over the released lease", LONG, || async {
        lease_holder(&cluster).as_deref() == Some("b")
    })
    .await;
    stop(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_sums_cover_the_replicas_found_through_the_admin_service() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(NS, "order-sync", "order-sync", 0, Duration::from_secs(3));
    let (pa, pb) = (replica_addr(), replica_addr());
    publish_admin(&cluster, "a", pa);
    publish_admin(&cluster, "b", pb);
    let a = start_reveille(&cluster, replica_config("a", pa)).await;
    let b = start_reveille(&cluster, replica_config("b", pb)).await;
    let c = client();
    // A request held on b (the pods take 3 s to turn ready)...
    let (cb, baddr) = (c.clone(), b.proxy_addr);
    let held = tokio::spawn(async move { get(&cb, baddr, "orders.test", "/held").await });
    // ...shows in a's cluster-wide answer, though a holds nothing itself.
    wait_until("a's sum includes b's held request", LONG, || {
        let c = c.clone();
        let admin = a.admin_addr;
        async move {
            let body = get(&c, admin, "a", "/api/scaling").await.body;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["services"]["orders"]["held"].as_u64() == Some(1)
        }
    })
    .await;
    assert_eq!(a.gates()[0].held(), 0);
    assert_eq!(held.await.unwrap().status, 200);
    stop(a).await;
    stop(b).await;
}
