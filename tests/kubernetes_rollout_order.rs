//! Ordered rollouts (`after:`) end to end: two Deployments on one fake API server, `worker`
//! following `api`. The worker's new pods wait (condition False, reason `WaitingForRollout`,
//! the message naming `api`) while api validates, keep waiting when api's version fails, and
//! are validated once a version of api completed.

#[path = "support/fake_kube.rs"]
mod fake_kube;
#[path = "support/fake_rollout.rs"]
mod fake_rollout;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fake_rollout::Rollout;
use support::*;

const NS: &str = "shop";
const LONG: Duration = Duration::from_secs(30);

const STEPS: &str =
    "validation: [ { path: /healthz }, { method: POST, path: /validate, timeout: 5s } ]";

fn config() -> reveille::Config {
    let svc = |name: &str, after: &str| {
        format!("  - name: {name}\n    hosts: [{name}.test]\n    backend:\n      kubernetes: {{ namespace: {NS}, deployment: {name}, service: {name}, port: http }}\n    rollout: {{ {STEPS}, quiesce: 1s{after} }}\n")
    };
    let s = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n{}{}",
        svc("api", ""),
        svc("worker", ", after: [api]")
    );
    reveille::Config::parse(&s).unwrap_or_else(|e| panic!("bad test config: {e}\n{s}"))
}

fn routed_to(r: &Running, i: usize) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = r.gates()[i].endpoints().iter().map(|e| e.addr).collect();
    v.sort();
    v
}

fn waiting_message(sim: &Rollout, version: &str) -> Option<String> {
    let cond = sim.validated_conditions(version).pop()?;
    (cond["reason"] == "WaitingForRollout" && cond["status"] == "False")
        .then(|| cond["message"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_waits_for_its_leader_and_names_it() {
    let api = Rollout::start(NS, "api").await;
    let worker = Rollout::start_on(api.api.clone(), NS, "worker").await;
    api.roll_to("v1", 1, 1, true, true).await;
    worker.roll_to("v1", 1, 1, true, true).await;
    let client = api.api.client().await;
    let r = reveille::app::start_with_kube(config(), Some(client))
        .await
        .expect("start reveille");
    let (api_v1, worker_v1) = (api.addrs("v1"), worker.addrs("v1"));
    wait_until("both routed to v1", LONG, || async {
        routed_to(&r, 0) == api_v1 && routed_to(&r, 1) == worker_v1
    })
    .await;

    // A change spanning both: api's new pod is still starting, worker's is ready at once.
    let api_v2 = api.roll_to("v2", 2, 1, false, false).await;
    api_v2.validate_status.store(500, Ordering::SeqCst);
    api_v2.validate_delay_ms.store(500, Ordering::SeqCst);
    // The order is between versions Reveille has seen: api's new pods first (in a cluster,
    // worker's pods take longer to start than api's appear).
    wait_until("api's candidate seen", LONG, || async {
        client_admin(&r).await["services"][0]["rollout"]["candidate"]["version"] == "v2"
    })
    .await;
    let worker_v2 = worker.roll_to("v2", 2, 1, false, true).await;
    wait_until("worker's pod waits for api", LONG, || async {
        waiting_message(&worker, "v2").as_deref()
            == Some("waiting for api's rollout to complete (api: version v2 rolling out)")
    })
    .await;

    // api validates and fails: worker keeps waiting, and says why.
    api.containers_ready("v2");
    let want = "waiting for api: its rollout failed (version v2: step 2 (POST /validate): status 500, expected 200); a newer version of api must pass first";
    wait_until("worker's pod names api's failure", LONG, || async {
        waiting_message(&worker, "v2").as_deref() == Some(want)
    })
    .await;
    assert!(
        worker_v2.validation_requests.lock().is_empty(),
        "worker's new pod never validated while api is not done"
    );
    assert_eq!(routed_to(&r, 1), worker_v1, "worker stays on v1");
    // The report follows the pods' conditions at the end of the same reconcile.
    wait_until("worker's report names api's failure", LONG, || async {
        client_admin(&r).await["services"][1]["rollout"]["waiting_for"] == want
    })
    .await;
    let c = client_admin(&r).await;
    let worker_state = &c["services"][1]["rollout"];
    assert_eq!(worker_state["in_progress"], true, "{worker_state}");

    // A good api version completes: worker proceeds, is validated and switched.
    api.roll_to("v3", 3, 1, false, true).await;
    let (api_v3, worker_v2_addrs) = (api.addrs("v3"), worker.addrs("v2"));
    wait_until("api on v3", LONG, || async { routed_to(&r, 0) == api_v3 }).await;
    wait_until("worker on v2", LONG, || async {
        routed_to(&r, 1) == worker_v2_addrs
    })
    .await;
    assert_eq!(worker.validated_conditions("v2")[0]["status"], "True");
    assert_eq!(
        worker_v2.validation_requests.lock().len(),
        2,
        "both steps, once"
    );
    wait_until("worker no longer waits", LONG, || async {
        client_admin(&r).await["services"][1]["rollout"]["waiting_for"].is_null()
    })
    .await;
    stop(r).await;
}

async fn client_admin(r: &Running) -> serde_json::Value {
    let body = get(&client(), r.admin_addr, "admin", "/api/services")
        .await
        .body;
    serde_json::from_str(&body).unwrap()
}
