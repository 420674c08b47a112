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
    reveille::server::start_with_kube(cfg, Some(client))
        .await
        .expect("start reveille")
}

fn routed(r: &Running) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = r.gates[0].endpoints().iter().map(|e| e.addr).collect();
    v.sort();
    v
}

async fn metrics_text(c: &TestClient, r: &Running) -> String {
    get(c, r.admin_addr, "admin", "/metrics").await.body
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
    wait_until("request held", LONG, || async { r.gates[0].held() == 1 }).await;
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
