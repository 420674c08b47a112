//! Pre-warming on Kubernetes, against the fake API server: in direct mode the scale patch
//! comes `lead` before the window; with `scaling: keda` Reveille patches nothing and tells KEDA
//! the service is active (with one replica's worth of demand) for the window.

#[path = "support/fake_cluster.rs"]
mod fake_cluster;
#[path = "support/fake_kube.rs"]
mod fake_kube;
mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use fake_cluster::Cluster;
use support::keda::{grpc, is_active, metric_value};
use support::*;

const NS: &str = "integrations";
const LONG: Duration = Duration::from_secs(30);
const ALL_DAYS: &str = "[mon, tue, wed, thu, fri, sat, sun]";

/// `HH:MM:SS` in UTC, `secs` from now, and that instant.
fn utc_in(secs: i64) -> (String, jiff::Timestamp) {
    let t = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(secs);
    let z = t.to_zoned(jiff::tz::TimeZone::UTC);
    (z.strftime("%H:%M:%S").to_string(), t)
}

fn config(backend_extra: &str, top: &str, start: &str, end: &str) -> reveille::Config {
    let s = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{top}services:\n  - name: orders\n    hosts: [orders.test]\n    backend:\n      kubernetes: {{ namespace: {NS}, deployment: order-sync, service: order-sync, port: http{backend_extra} }}\n    idle_timeout: 1s\n    prewarm:\n      lead: 2s\n      schedule:\n        - {{ days: {ALL_DAYS}, start: \"{start}\", end: \"{end}\" }}\n"
    );
    reveille::Config::parse(&s).unwrap_or_else(|e| panic!("bad test config: {e}\n{s}"))
}

async fn start_reveille(cluster: &Cluster, cfg: reveille::Config) -> Running {
    let client = cluster.api.client().await;
    reveille::app::start_with_kube(cfg, Some(client))
        .await
        .expect("start reveille")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scale_patch_comes_lead_before_the_window_and_scale_down_after_it() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(
        NS,
        "order-sync",
        "order-sync",
        0,
        Duration::from_millis(100),
    );
    let (start_s, start_t) = utc_in(6);
    let (end_s, end_t) = utc_in(10);
    let r = start_reveille(&cluster, config("", "", &start_s, &end_s)).await;
    let patches = || cluster.api.knobs.scale_patches.load(Ordering::SeqCst);
    wait_until("scale-up patch", LONG, || async { patches() >= 1 }).await;
    let at = jiff::Timestamp::now();
    assert!(
        at < start_t,
        "patched at {at}, after the window opened ({start_t})"
    );
    assert!(
        at > start_t - jiff::SignedDuration::from_secs(3),
        "patched at {at}: earlier than lead (2 s) before {start_t}"
    );
    assert_eq!(cluster.replicas(NS, "order-sync"), 1);
    wait_until("ready", LONG, || async {
        r.gates()[0].state() == reveille::gate::State::Ready
    })
    .await;
    // Inside the window, past the idle timeout: still one replica, no second patch.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        jiff::Timestamp::now() < end_t,
        "test too slow to look inside the window"
    );
    assert_eq!(patches(), 1, "scaled down inside the window");
    wait_until("scale-down patch", LONG, || async { patches() >= 2 }).await;
    assert!(
        jiff::Timestamp::now() >= end_t,
        "scaled down before the window ended"
    );
    assert_eq!(cluster.replicas(NS, "order-sync"), 0);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keda_no_patch_and_is_active_with_one_replica_of_demand_in_the_window() {
    let cluster = Cluster::start().await;
    cluster.add_deployment(
        NS,
        "order-sync",
        "order-sync",
        0,
        Duration::from_millis(100),
    );
    let (start_s, start_t) = utc_in(5);
    let (end_s, _) = utc_in(8);
    let r = start_reveille(
        &cluster,
        config(
            ", scaling: keda",
            "keda: { listen: 127.0.0.1:0, stream_interval: 1h }\n",
            &start_s,
            &end_s,
        ),
    )
    .await;
    let mut g = grpc(r.keda_addr.unwrap());
    assert!(!is_active(&mut g, "orders").await, "active before the lead");
    assert_eq!(metric_value(&mut g, "orders").await, 0.0);
    let mut active = false;
    while !active {
        assert!(
            jiff::Timestamp::now() < start_t,
            "not active by the window's start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        active = is_active(&mut g, "orders").await;
    }
    let at = jiff::Timestamp::now();
    assert!(
        at > start_t - jiff::SignedDuration::from_secs(3),
        "active at {at}: earlier than lead (2 s) before {start_t}"
    );
    // One replica's worth: the default concurrency target per replica (100).
    assert_eq!(metric_value(&mut g, "orders").await, 100.0);
    // After the window: inactive again, and Reveille never patched.
    wait_until("inactive after the window", LONG, || {
        let mut g = g.clone();
        async move { !is_active(&mut g, "orders").await }
    })
    .await;
    assert_eq!(metric_value(&mut g, "orders").await, 0.0);
    assert_eq!(cluster.api.knobs.scale_patches.load(Ordering::SeqCst), 0);
    assert_eq!(cluster.replicas(NS, "order-sync"), 0);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_chain_of_three_deployments_is_patched_in_order() {
    let cluster = Cluster::start().await;
    for name in ["orders", "worker", "db"] {
        cluster.add_deployment(NS, name, name, 0, Duration::from_millis(200));
    }
    let svc = |name: &str, deps: &str| {
        format!("  - name: {name}\n    hosts: [{name}.test]\n    backend:\n      kubernetes: {{ namespace: {NS}, deployment: {name}, service: {name}, port: http }}\n    depends_on: [{deps}]\n")
    };
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n{}{}{}",
        svc("orders", "worker"),
        svc("worker", "db"),
        svc("db", ""),
    );
    let cfg = reveille::Config::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let r = start_reveille(&cluster, cfg).await;
    let order = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let (o, c2) = (order.clone(), cluster.clone());
    let watcher = tokio::spawn(async move {
        loop {
            for name in ["orders", "worker", "db"] {
                let mut o = o.lock();
                if c2.replicas(NS, name) > 0 && !o.iter().any(|n| n == name) {
                    o.push(name.to_string());
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let c = client();
    let resp = get(&c, r.proxy_addr, "orders.test", "/order").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    wait_until("all patched", LONG, || {
        let o = order.clone();
        async move { o.lock().len() == 3 }
    })
    .await;
    assert_eq!(*order.lock(), vec!["db", "worker", "orders"]);
    assert_eq!(cluster.api.knobs.scale_patches.load(Ordering::SeqCst), 3);
    watcher.abort();
    stop(r).await;
}
