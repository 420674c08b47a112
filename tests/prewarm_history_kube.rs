//! The learned pre-warm history on Kubernetes with `coordination:`, against the fake API
//! server: the Lease holder keeps it in the ConfigMap `<lease>-prewarm-history`, a new holder
//! continues it, other replicas' counts are summed in exactly once (across restarts and a
//! change of leader), and a write that meets someone else's (`409`) is merged, not lost.

#[path = "support/fake_cluster.rs"]
mod fake_cluster;
#[path = "support/fake_kube.rs"]
mod fake_kube;
mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use fake_cluster::Cluster;
use serde_json::{json, Value};
use support::*;

const NS: &str = "integrations";
const OWN_NS: &str = "reveille";
const CM: &str = "reveille-scale-down-prewarm-history";
const LONG: Duration = Duration::from_secs(40);

/// A replica (no scale-down within a test: its peers are not listed, as they need not be for
/// the history).
fn config(identity: &str) -> reveille::Config {
    let s = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ncoordination: {{ namespace: {OWN_NS}, identity: {identity}, lease_duration: 1s }}\nservices:\n  - name: orders\n    hosts: [orders.test]\n    backend:\n      kubernetes: {{ namespace: {NS}, deployment: order-sync, service: order-sync, port: http }}\n    idle_timeout: 1h\n    prewarm: {{ learn: true }}\n"
    );
    reveille::Config::parse(&s).unwrap_or_else(|e| panic!("bad test config: {e}\n{s}"))
}

async fn start_replica(cluster: &Cluster, identity: &str) -> Running {
    let client = cluster.api.client().await;
    reveille::app::start_with_kube(config(identity), Some(client))
        .await
        .expect("start reveille")
}

async fn setup() -> std::sync::Arc<Cluster> {
    let cluster = Cluster::start().await;
    cluster.add_deployment(NS, "order-sync", "order-sync", 0, Duration::ZERO);
    cluster
}

fn holder(cluster: &Cluster) -> Option<String> {
    cluster.api.get("leases", OWN_NS, "reveille-scale-down")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

async fn wait_holder(cluster: &Cluster, identity: &str) {
    wait_until(&format!("{identity} holds the Lease"), LONG, || async {
        holder(cluster).as_deref() == Some(identity)
    })
    .await;
}

/// The ConfigMap's data, each value parsed.
fn data(cluster: &Cluster) -> Option<serde_json::Map<String, Value>> {
    let cm = cluster.api.get("configmaps", OWN_NS, CM)?;
    let data = cm["data"].as_object()?;
    Some(
        data.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    serde_json::from_str(v.as_str().unwrap()).unwrap(),
                )
            })
            .collect(),
    )
}

/// Requests of `orders` this week in `history.json`.
fn history_requests(cluster: &Cluster) -> u64 {
    data(cluster).map_or(0, |d| {
        d.get("history.json").unwrap_or(&Value::Null)["services"]["orders"]["requests_this_week"]
            .as_object()
            .map_or(0, |m| m.values().map(|v| v.as_u64().unwrap()).sum())
    })
}

/// `pending-*` keys not folded in yet.
fn pending_keys(cluster: &Cluster) -> Vec<String> {
    data(cluster).map_or_else(Vec::new, |d| {
        d.keys()
            .filter(|k| k.starts_with("pending-"))
            .cloned()
            .collect()
    })
}

/// `history.json` counts `n` requests and nothing is pending.
async fn wait_folded(cluster: &Cluster, n: u64) {
    let deadline = tokio::time::Instant::now() + LONG;
    while !(history_requests(cluster) == n && pending_keys(cluster).is_empty()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {LONG:?} waiting for {n} requests folded in: {:#?}",
            data(cluster)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn requests(r: &Running, n: usize) {
    let c = client();
    for i in 0..n {
        let resp = get(&c, r.proxy_addr, "orders.test", &format!("/{i}")).await;
        assert_eq!(resp.status, 200, "{resp:?}");
    }
}

/// This week and bucket (as `learn` numbers them), and a bucket two days later.
fn now_week_bucket() -> (i64, u64) {
    let s = jiff::Timestamp::now().as_second() - 4 * 86_400;
    (
        s.div_euclid(7 * 86_400),
        (s.rem_euclid(7 * 86_400) / 900) as u64,
    )
}

/// A pending batch of another replica: `n` requests (one start) in the current bucket.
fn batch(seq: u64, n: u64) -> String {
    let (week, bucket) = now_week_bucket();
    json!({"seq": seq, "services": {"orders": {week.to_string(): {"starts": [bucket], "requests": {bucket.to_string(): n}}}}}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_persists_and_a_new_leader_continues_the_same_history() {
    let cluster = setup().await;
    // A history seeded by hand (as a user would from their logs): a learned window two days on.
    let (week, bucket) = now_week_bucket();
    let seeded = (bucket + 192) % 672;
    let history = json!({"version": 1, "bucket_minutes": 15, "services": {"orders": {"week": week, "weeks_seen": 3,
        "buckets": {seeded.to_string(): {"weight": 0.9, "recent": 7, "requests": 5.0}}, "this_week": [], "requests_this_week": {}}}});
    cluster.api.put(
        "configmaps",
        "ConfigMap",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CM, "namespace": OWN_NS},
            "data": {"history.json": history.to_string()}}),
    );
    let a = start_replica(&cluster, "a").await;
    wait_holder(&cluster, "a").await;
    // Planned from the shared history at once.
    let c = client();
    let api = get(&c, a.admin_addr, "admin", "/api/services").await.body;
    let api: Value = serde_json::from_str(&api).unwrap();
    assert_eq!(
        api["services"][0]["prewarm"]["next"]["source"], "learned",
        "{api}"
    );
    requests(&a, 3).await;
    wait_folded(&cluster, 3).await;
    let d = data(&cluster).unwrap();
    let orders = &d["history.json"]["services"]["orders"];
    assert!(
        !orders["this_week"].as_array().unwrap().is_empty(),
        "{orders}"
    );
    assert_eq!(
        orders["buckets"][seeded.to_string()]["weight"],
        0.9,
        "the seeded history was kept: {orders}"
    );
    let cm = cluster.api.get("configmaps", OWN_NS, CM).unwrap();
    assert_eq!(
        cm["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "reveille"
    );
    stop(a).await;

    // A second Reveille takes the Lease over and goes on from the same history.
    let b = start_replica(&cluster, "b").await;
    wait_holder(&cluster, "b").await;
    requests(&b, 2).await;
    wait_folded(&cluster, 5).await;
    stop(b).await;
    assert_eq!(history_requests(&cluster), 5);
    let d = data(&cluster).unwrap();
    assert_eq!(
        d["history.json"]["services"]["orders"]["buckets"][seeded.to_string()]["weight"],
        0.9
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_leader_replicas_counts_are_summed_in_exactly_once() {
    let cluster = setup().await;
    let a = start_replica(&cluster, "a").await;
    wait_holder(&cluster, "a").await;
    let b = start_replica(&cluster, "b").await;
    requests(&a, 3).await;
    requests(&b, 2).await;
    wait_folded(&cluster, 5).await;
    assert_eq!(holder(&cluster).as_deref(), Some("a"));
    let folded = &data(&cluster).unwrap()["folded.json"];
    assert!(folded["b"].as_u64().is_some(), "b's batch folded: {folded}");

    // `b` restarts under the same identity (a StatefulSet pod): nothing is counted twice.
    stop(b).await;
    let b = start_replica(&cluster, "b").await;
    requests(&b, 1).await;
    wait_folded(&cluster, 6).await;

    // The leader goes; `b` takes over and folds on from the same history.
    stop(a).await;
    wait_holder(&cluster, "b").await;
    requests(&b, 1).await;
    wait_folded(&cluster, 7).await;
    stop(b).await;
    assert_eq!(history_requests(&cluster), 7);
    assert!(pending_keys(&cluster).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_write_is_merged_not_lost() {
    let cluster = setup().await;
    // Another replica creates the ConfigMap between the leader's read and its create (`409
    // AlreadyExists`), then adds counts between the leader's next read and its update (`409
    // Conflict`).
    let seq = jiff::Timestamp::now().as_millisecond() as u64;
    let other = move |key: &'static str, n: u64| {
        move |api: &fake_kube::FakeApi| {
            let mut cm = api.get("configmaps", OWN_NS, CM).unwrap_or_else(|| {
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CM, "namespace": OWN_NS}, "data": {}})
            });
            cm["data"][key] = json!(batch(seq, n));
            api.put("configmaps", "ConfigMap", cm);
        }
    };
    {
        let mut queue = cluster.api.knobs.interlopers.lock();
        queue.push(Box::new(other("pending-other.json", 4)));
        queue.push(Box::new(other("pending-third.json", 2)));
    }
    let a = start_replica(&cluster, "a").await;
    wait_holder(&cluster, "a").await;
    wait_folded(&cluster, 6).await;
    assert!(cluster.api.knobs.interlopers.lock().is_empty());
    assert_eq!(
        cluster.api.knobs.configmap_conflicts.load(Ordering::SeqCst),
        2
    );
    requests(&a, 3).await;
    wait_folded(&cluster, 9).await;
    let folded = &data(&cluster).unwrap()["folded.json"];
    assert_eq!(folded["other"], seq, "{folded}");
    assert_eq!(folded["third"], seq, "{folded}");
    stop(a).await;
    assert_eq!(history_requests(&cluster), 9);
}
