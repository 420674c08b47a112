//! Controlled rollouts end to end: Reveille in-process with the real `kube` client against the
//! fake API server, a Deployment whose pods carry the `reveille.dev/validated` readiness gate
//! (real loopback servers answering with their version), and the test playing the Deployment
//! controller (it starts a new version's pods and removes the old ones).

#[path = "support/fake_kube.rs"]
mod fake_kube;
#[path = "support/fake_rollout.rs"]
mod fake_rollout;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_rollout::Rollout;
use support::keda::{grpc, is_active, metric_value};
use support::*;

const NS: &str = "shop";
const LONG: Duration = Duration::from_secs(30);

const STEPS: &str = "validation: [ { method: GET, path: /healthz, expect_status: 200 }, { method: POST, path: /validate, body: '{\"dry_run\":true}', expect_status: 200, timeout: 5s } ]";

fn config(rollout_extra: &str, extra: &str) -> reveille::Config {
    let s = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{extra}services:\n  - name: web\n    hosts: [web.test]\n    backend:\n      kubernetes: {{ namespace: {NS}, deployment: web, service: web, port: http }}\n    queue: {{ capacity: 1000, timeout: 30s }}\n    idle_timeout: 5m\n    rollout: {{ {STEPS}, quiesce: 3s{rollout_extra} }}\n"
    );
    reveille::Config::parse(&s).unwrap_or_else(|e| panic!("bad test config: {e}\n{s}"))
}

async fn start_reveille(sim: &Rollout, cfg: reveille::Config) -> Running {
    let client = sim.api.client().await;
    reveille::app::start_with_kube(cfg, Some(client))
        .await
        .expect("start reveille")
}

async fn rollout_state(c: &TestClient, r: &Running) -> serde_json::Value {
    let body = get(c, r.admin_addr, "admin", "/api/services").await.body;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["services"][0]["rollout"].clone()
}

/// A v1 Deployment (2 validated, ready pods) and Reveille routing to it.
async fn serving_v1(cfg: reveille::Config) -> (Arc<Rollout>, Running) {
    let sim = Rollout::start(NS, "web").await;
    sim.roll_to("v1", 1, 2, true, true).await;
    let r = start_reveille(&sim, cfg).await;
    let want = sim.addrs("v1");
    wait_until("routing to v1", LONG, || async { routed(&r) == want }).await;
    (sim, r)
}

/// One answered request of the load: when its answer arrived, and which version answered.
struct Sample {
    end: Instant,
    status: u16,
    version: String,
}

/// Answers so far, by answering version (an error's body for an answer that is not a
/// version's): what the test waits on while the load runs.
#[derive(Default)]
struct Tally(parking_lot::Mutex<std::collections::HashMap<String, usize>>);

impl Tally {
    fn of(&self, version: &str) -> usize {
        self.0.lock().get(version).copied().unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.0.lock().values().sum()
    }
}

/// `workers` clients sending one request after another until `stop`, counting the answers in
/// `tally` as they come.
fn load(
    r: &Running,
    workers: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<Vec<Sample>>> {
    (0..workers)
        .map(|w| {
            let c = client();
            let addr = r.proxy_addr;
            let stop = stop.clone();
            let tally = tally.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    // One slow client, so a switch always finds old requests in flight.
                    let ms = if w == 0 { 150 } else { 5 + w * 7 };
                    let resp = get(&c, addr, "web.test", &format!("/work?ms={ms}")).await;
                    let version = resp.body.trim_start_matches("version=").to_string();
                    *tally.0.lock().entry(version.clone()).or_default() += 1;
                    out.push(Sample {
                        end: Instant::now(),
                        status: resp.status.as_u16(),
                        version,
                    });
                }
                out
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validated_version_takes_all_traffic_at_once_under_load() {
    let (sim, r) = serving_v1(config("", "")).await;
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers = load(&r, 4, stop.clone(), tally.clone());
    wait_until("the load answered by v1", LONG, || async {
        tally.of("v1") > 20
    })
    .await;

    let v2 = sim.roll_to("v2", 2, 2, false, true).await;
    let want = sim.addrs("v2");
    wait_until("routing to v2", LONG, || async { routed(&r) == want }).await;
    for cond in sim.validated_conditions("v2") {
        assert_eq!(cond["status"], "True", "{cond}");
        assert_eq!(cond["reason"], "Validated", "{cond}");
        assert!(cond["lastTransitionTime"].is_string(), "{cond}");
    }
    // Each new pod got both steps, in order, with the body.
    let reqs = v2.validation_requests.lock().clone();
    assert_eq!(
        reqs.iter()
            .filter(|r| r.starts_with("GET /healthz"))
            .count(),
        2,
        "{reqs:?}"
    );
    assert_eq!(
        reqs.iter()
            .filter(|r| *r == "POST /validate {\"dry_run\":true}")
            .count(),
        2,
        "{reqs:?}"
    );
    // The switch is over (the rollout no longer in progress) and v2 answers the load.
    wait_until("the rollout done and v2 answering", LONG, || async {
        rollout_state(&c, &r).await["in_progress"] == false && tally.of("v2") > 20
    })
    .await;
    // The Deployment controller removes the old pods once the new ones are ready; the load
    // goes on a while after.
    sim.remove_version("v1");
    let before = tally.total();
    wait_until(
        "the load answered after the old pods left",
        LONG,
        || async { tally.total() > before + 20 },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await.unwrap());
    }
    assert!(
        samples.iter().all(|s| s.status == 200),
        "every request answered"
    );
    let old: Vec<&Sample> = samples.iter().filter(|s| s.version == "v1").collect();
    let new: Vec<&Sample> = samples.iter().filter(|s| s.version == "v2").collect();
    assert_eq!(old.len() + new.len(), samples.len());
    assert!(
        old.len() > 10 && new.len() > 10,
        "{} old, {} new",
        old.len(),
        new.len()
    );
    // No mixed versions: every v1 answer arrived before the first v2 answer (the old version's
    // requests in flight at the switch finished before any request went to v2).
    let last_old_end = old.iter().map(|s| s.end).max().unwrap();
    let first_new_end = new.iter().map(|s| s.end).min().unwrap();
    assert!(
        last_old_end < first_new_end,
        "a v1 answer came {:?} after the first v2 answer",
        last_old_end - first_new_end
    );

    let m = metrics_text(&c, &r).await;
    assert_eq!(
        metric(
            &m,
            "reveille_rollout_validations_total{result=\"passed\",service=\"web\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            "reveille_rollout_switches_total{quiesce=\"drained\",service=\"web\"}"
        ),
        Some(1.0)
    );
    let state = rollout_state(&c, &r).await;
    assert_eq!(state["current_version"], "v2", "{state}");
    assert_eq!(state["current_revision"], 2, "{state}");
    assert_eq!(state["in_progress"], false, "{state}");
    assert_eq!(state["result"]["passed"], true, "{state}");
    assert!(!r.gates()[0].rolling_out());
    stop_running(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_keeps_the_old_version_and_says_why() {
    let (sim, r) = serving_v1(config("", "")).await;
    let c = client();
    let v1_addrs = sim.addrs("v1");
    let v2 = sim.roll_to("v2", 2, 2, false, false).await;
    v2.validate_status.store(500, Ordering::SeqCst);
    sim.containers_ready("v2");
    wait_until("both v2 pods failed", LONG, || async {
        sim.validated_conditions("v2")
            .iter()
            .all(|c| c["status"] == "False")
    })
    .await;
    let want = "step 2 (POST /validate): status 500, expected 200";
    for cond in sim.validated_conditions("v2") {
        assert_eq!(cond["reason"], "ValidationFailed", "{cond}");
        assert_eq!(cond["message"], want, "{cond}");
    }
    wait_until("an Event per failed pod", LONG, || async {
        sim.events().len() == 2
    })
    .await;
    let mut pods: Vec<String> = sim
        .events()
        .iter()
        .map(|e| {
            assert_eq!(e["reason"], "ValidationFailed", "{e}");
            assert_eq!(e["type"], "Warning", "{e}");
            assert_eq!(e["message"], want, "{e}");
            assert_eq!(e["involvedObject"]["kind"], "Pod", "{e}");
            e["involvedObject"]["name"].as_str().unwrap().to_string()
        })
        .collect();
    pods.sort();
    assert_eq!(pods, vec!["web-v2-0", "web-v2-1"]);
    // The old version keeps serving; the new pods never turned ready.
    assert_eq!(routed(&r), v1_addrs);
    for i in 0..20 {
        let resp = get(&c, r.proxy_addr, "web.test", &format!("/work?i={i}")).await;
        assert_eq!(
            (resp.status.as_u16(), resp.body.as_str()),
            (200, "version=v1")
        );
    }
    let m = metrics_text(&c, &r).await;
    assert_eq!(
        metric(
            &m,
            "reveille_rollout_validations_total{result=\"failed\",service=\"web\"}"
        ),
        Some(2.0)
    );
    let state = rollout_state(&c, &r).await;
    assert_eq!(state["current_version"], "v1", "{state}");
    assert_eq!(state["candidate"]["version"], "v2", "{state}");
    assert_eq!(state["candidate"]["failed_pods"], 2, "{state}");
    assert_eq!(state["result"]["passed"], false, "{state}");
    assert_eq!(state["result"]["message"], want, "{state}");
    assert_eq!(
        state["in_progress"], false,
        "a failed rollout is not in progress"
    );
    // on_failure: hold leaves the Deployment alone.
    let d = sim.api.get("deployments", NS, "web").unwrap();
    assert_eq!(
        d["spec"]["template"]["metadata"]["annotations"]["version"],
        "v2"
    );
    assert_eq!(
        metric(&m, "reveille_rollout_rollbacks_total{service=\"web\"}"),
        None
    );
    stop_running(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_version_is_rolled_back_once() {
    if std::env::var("ROLLOUT_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("reveille=debug")
            .try_init();
    }
    let (sim, r) = serving_v1(config(", on_failure: rollback", "")).await;
    let c = client();
    let v2 = sim.roll_to("v2", 2, 2, false, false).await;
    v2.validate_status.store(503, Ordering::SeqCst);
    sim.containers_ready("v2");
    wait_until("the Deployment is back on v1's template", LONG, || async {
        let d = sim.api.get("deployments", NS, "web").unwrap();
        d["spec"]["template"]["metadata"]["annotations"]["version"] == "v1"
    })
    .await;
    let d = sim.api.get("deployments", NS, "web").unwrap();
    let labels = &d["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels["app"], "web");
    assert!(
        labels.get("pod-template-hash").is_none(),
        "the ReplicaSet's hash label is not copied: {labels}"
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["readinessGates"][0]["conditionType"],
        "reveille.dev/validated"
    );
    wait_until("both v2 pods failed", LONG, || async {
        sim.validated_conditions("v2")
            .iter()
            .all(|c| c["status"] == "False")
    })
    .await;
    let m = metrics_text(&c, &r).await;
    assert_eq!(
        metric(&m, "reveille_rollout_rollbacks_total{service=\"web\"}"),
        Some(1.0),
        "one rollback for the version, not one per pod"
    );
    assert_eq!(routed(&r), sim.addrs("v1"));
    stop_running(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_scale_to_zero_and_keda_active_while_validating() {
    let sim = Rollout::start(NS, "web").await;
    sim.roll_to("v1", 1, 2, true, true).await;
    // A long stream interval: a `true` on the stream soon after the rollout starts is the push.
    let mut cfg = config("", "keda: { listen: 127.0.0.1:0, stream_interval: 60s }\n");
    cfg.services[0].idle_timeout = Duration::from_secs(1);
    let r = start_reveille(&sim, cfg).await;
    let c = client();
    let want = sim.addrs("v1");
    wait_until("routing to v1", LONG, || async { routed(&r) == want }).await;
    let mut g = grpc(r.keda_addr.unwrap());
    let mut stream = g
        .stream_is_active(support::keda::sor("web", &[]))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.result, "idle before the rollout");
    // A new version whose containers are not ready yet: validation is pending.
    sim.roll_to("v2", 2, 1, false, false).await;
    let pushed = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a push when the rollout starts")
        .unwrap()
        .unwrap();
    assert!(pushed.result, "StreamIsActive pushed active");
    wait_until("the rollout is in progress", LONG, || async {
        r.gates()[0].rolling_out()
    })
    .await;
    assert!(is_active(&mut g, "web").await, "KEDA: active mid-rollout");
    assert!(metric_value(&mut g, "web").await >= 1.0);
    wait_until("a scale-down was refused", LONG, || async {
        metric(
            &metrics_text(&c, &r).await,
            "reveille_scale_down_deferred_total{reason=\"rollout\",service=\"web\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    let replicas = |sim: &Rollout| {
        sim.api.get("deployments", NS, "web").unwrap()["spec"]["replicas"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(replicas(&sim), 2, "not scaled to zero mid-rollout");
    let state = rollout_state(&c, &r).await;
    assert_eq!(state["in_progress"], true, "{state}");
    // The new version turns out fine: it takes over, then the idle service goes to zero.
    sim.containers_ready("v2");
    let want = sim.addrs("v2");
    wait_until("routing to v2", LONG, || async { routed(&r) == want }).await;
    wait_until("KEDA: inactive once done", LONG, || async {
        !is_active(&mut grpc(r.keda_addr.unwrap()), "web").await
    })
    .await;
    wait_until("scaled to zero after the rollout", LONG, || async {
        replicas(&sim) == 0
    })
    .await;
    stop_running(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_at_zero_is_validated_at_once_with_at_zero_wake() {
    let sim = Rollout::start(NS, "web").await;
    sim.roll_to("v1", 1, 1, true, true).await;
    let mut cfg = config(", at_zero: wake", "");
    cfg.services[0].idle_timeout = Duration::from_secs(1);
    let r = start_reveille(&sim, cfg).await;
    let c = client();
    let want = sim.addrs("v1");
    wait_until("routing to v1", LONG, || async { routed(&r) == want }).await;
    wait_until("idle: scaled to zero", LONG, || async {
        sim.replicas() == 0
    })
    .await;
    sim.remove_version("v1");
    // A new version while at zero: its ReplicaSet has no replicas.
    sim.roll_to("v2", 2, 0, false, true).await;
    wait_until("woken to validate v2", LONG, || async {
        sim.replicas() == 1
    })
    .await;
    // The wake-up patch and the rollout's own bookkeeping are two steps: wait for the second
    // (its pod does not exist yet, so nothing can have been validated meanwhile).
    let gate = r.gates()[0].clone();
    wait_until("in progress until validated", LONG, || {
        let g = gate.clone();
        async move { g.rolling_out() }
    })
    .await;
    // The Deployment controller starts the pod; Reveille validates it.
    sim.add_pods("v2", 1, false, true).await;
    wait_until("v2 validated and routed", LONG, || async {
        rollout_state(&c, &r).await["current_version"] == "v2"
    })
    .await;
    assert_eq!(sim.validated_conditions("v2")[0]["status"], "True");
    // Then the idle service goes back to zero (at once: nothing came in for a while).
    wait_until("scaled to zero after validation", LONG, || async {
        sim.replicas() == 0
    })
    .await;
    let m = metrics_text(&c, &r).await;
    assert_eq!(
        metric(
            &m,
            "reveille_rollout_validations_total{result=\"passed\",service=\"web\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "reveille_scale_patches_total{direction=\"up\",service=\"web\"}"
        ),
        Some(1.0),
        "one wake-up, for validation"
    );
    stop_running(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_at_zero_waits_for_the_next_wake_up_by_default() {
    let sim = Rollout::start(NS, "web").await;
    sim.roll_to("v1", 1, 1, true, true).await;
    let mut cfg = config("", "");
    cfg.services[0].idle_timeout = Duration::from_secs(1);
    let r = start_reveille(&sim, cfg).await;
    let c = client();
    let want = sim.addrs("v1");
    wait_until("routing to v1", LONG, || async { routed(&r) == want }).await;
    wait_until("idle: scaled to zero", LONG, || async {
        sim.replicas() == 0
    })
    .await;
    sim.remove_version("v1");
    sim.roll_to("v2", 2, 0, false, true).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sim.replicas(), 0, "not woken without a request");
    assert!(!r.gates()[0].rolling_out());
    // A request wakes it; the new pod is validated before it gets the held request.
    let req = {
        let c = c.clone();
        let addr = r.proxy_addr;
        tokio::spawn(async move { get(&c, addr, "web.test", "/work").await })
    };
    wait_until("woken by the request", LONG, || async {
        sim.replicas() == 1
    })
    .await;
    sim.add_pods("v2", 1, false, true).await;
    let resp = req.await.unwrap();
    assert_eq!(
        (resp.status.as_u16(), resp.body.as_str()),
        (200, "version=v2")
    );
    assert_eq!(sim.validated_conditions("v2")[0]["status"], "True");
    stop_running(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_mode_at_zero_wake_asks_keda_and_never_patches() {
    let sim = Rollout::start(NS, "web").await;
    sim.roll_to("v1", 1, 1, true, true).await;
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nkeda: {{ listen: 127.0.0.1:0 }}\nservices:\n  - name: web\n    hosts: [web.test]\n    backend:\n      kubernetes: {{ namespace: {NS}, deployment: web, service: web, port: http, scaling: keda }}\n    rollout: {{ {STEPS}, at_zero: wake }}\n"
    );
    let r = start_reveille(&sim, reveille::Config::parse(&yaml).unwrap()).await;
    let want = sim.addrs("v1");
    wait_until("routing to v1", LONG, || async { routed(&r) == want }).await;
    let mut g = grpc(r.keda_addr.unwrap());
    assert!(!is_active(&mut g, "web").await, "idle");
    // KEDA scaled it to zero; then a new version is rolled out.
    sim.api.put("deployments", "Deployment", {
        let mut d = sim.api.get("deployments", NS, "web").unwrap();
        d["spec"]["replicas"] = serde_json::json!(0);
        d
    });
    sim.remove_version("v1");
    sim.roll_to("v2", 2, 0, false, true).await;
    wait_until("KEDA told to wake it for validation", LONG, || async {
        is_active(&mut grpc(r.keda_addr.unwrap()), "web").await
    })
    .await;
    assert_eq!(sim.replicas(), 0, "Reveille never patches in KEDA mode");
    assert_eq!(sim.api.knobs.scale_patches.load(Ordering::SeqCst), 0);
    // KEDA scales up; the pod is validated; the service is no longer active.
    sim.add_pods("v2", 1, false, true).await;
    wait_until("validated, then inactive", LONG, || async {
        sim.validated_conditions("v2")[0]["status"] == "True"
            && !is_active(&mut grpc(r.keda_addr.unwrap()), "web").await
    })
    .await;
    stop_running(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_step_is_reported_as_it_starts() {
    let (sim, r) = serving_v1(config("", "")).await;
    let c = client();
    let v2 = sim.roll_to("v2", 2, 1, false, false).await;
    // Step 2 takes 3 s (its timeout is 5 s): long enough to look while it runs, with no
    // watch event meanwhile.
    v2.validate_delay_ms.store(3_000, Ordering::SeqCst);
    sim.containers_ready("v2");
    wait_until("step 2 reached the pod", LONG, || async {
        v2.validation_requests
            .lock()
            .iter()
            .any(|r| r.starts_with("POST /validate"))
    })
    .await;
    let asked = Instant::now();
    // Shown within moments of the step starting, not after the validation ended.
    let mut state = rollout_state(&c, &r).await;
    while state["step"] != "step 2/2 (POST /validate)" && asked.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        state = rollout_state(&c, &r).await;
    }
    assert_eq!(state["step"], "step 2/2 (POST /validate)", "{state}");
    assert_eq!(
        state["validating"]["web-v2-0"], "step 2/2 (POST /validate)",
        "{state}"
    );
    assert_eq!(state["in_progress"], true, "{state}");
    assert!(
        sim.validated_conditions("v2")[0].is_null(),
        "still validating"
    );
    let want = sim.addrs("v2");
    wait_until("routing to v2", LONG, || async { routed(&r) == want }).await;
    // The new endpoints are routed during the switch; the report follows once it is over.
    wait_until("the rollout reported done", LONG, || async {
        rollout_state(&c, &r).await["in_progress"] == false
    })
    .await;
    let state = rollout_state(&c, &r).await;
    assert!(state["step"].is_null(), "{state}");
    assert_eq!(state["validating"], serde_json::json!({}), "{state}");
    stop_running(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_flow_step_polls_another_service_until_the_record_arrived() {
    // `erp` answers "not yet" twice, then `{"status":"ok"}`.
    let erp = fake_rollout::Scripted::start(&["not yet", "not yet", "{\"status\":\"ok\"}"]).await;
    let step = "{ path: /records/42, via: erp, expect_json: { path: $.status, equals: ok }, retry_every: 200ms, timeout: 5s, version_header: x-candidate-version }";
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: web\n    hosts: [web.test]\n    backend:\n      kubernetes: {{ namespace: {NS}, deployment: web, service: web, port: http }}\n    rollout: {{ validation: [ {{ path: /healthz }}, {step} ], quiesce: 1s }}\n  - name: erp\n    hosts: [erp.test]\n    backend:\n      static: {{ addresses: [{}] }}\n",
        erp.addr
    );
    let (sim, r) = serving_v1(reveille::Config::parse(&yaml).unwrap()).await;
    let c = client();
    let started = Instant::now();
    let v2 = sim.roll_to("v2", 2, 1, false, true).await;
    let want = sim.addrs("v2");
    wait_until("routing to v2", LONG, || async { routed(&r) == want }).await;
    let cond = &sim.validated_conditions("v2")[0];
    assert_eq!(cond["status"], "True", "{cond}");
    // The pod got its own step; the data-flow step went to erp, three times, with the version.
    let pod_reqs = v2.validation_requests.lock().clone();
    assert_eq!(pod_reqs, vec!["GET /healthz ".to_string()]);
    let seen = erp.seen.lock().clone();
    assert_eq!(
        seen,
        vec![("/records/42".to_string(), Some("v2".to_string())); 3],
        "polled until the record arrived"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "two pauses of retry_every between the attempts"
    );
    let state = rollout_state(&c, &r).await;
    assert_eq!(state["result"]["passed"], true, "{state}");
    stop_running(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_flow_step_that_never_passes_fails_with_the_last_reason() {
    let erp = fake_rollout::Scripted::start(&["not yet"]).await;
    let step =
        "{ path: /records/42, via: erp, expect_body: '^ok$', retry_every: 200ms, timeout: 1s }";
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: web\n    hosts: [web.test]\n    backend:\n      kubernetes: {{ namespace: {NS}, deployment: web, service: web, port: http }}\n    rollout: {{ validation: [ {step} ] }}\n  - name: erp\n    hosts: [erp.test]\n    backend:\n      static: {{ addresses: [{}] }}\n",
        erp.addr
    );
    let (sim, r) = serving_v1(reveille::Config::parse(&yaml).unwrap()).await;
    sim.roll_to("v2", 2, 1, false, true).await;
    wait_until("v2 failed", LONG, || async {
        sim.validated_conditions("v2")[0]["status"] == "False"
    })
    .await;
    let msg = sim.validated_conditions("v2")[0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.starts_with("step 1 (GET /records/42 via erp): body \"not yet\" does not match \"^ok$\" (still after "),
        "{msg}"
    );
    let n = erp.seen.lock().len();
    assert!((4..=6).contains(&n), "one attempt every 200ms for 1s: {n}");
    assert_eq!(routed(&r), sim.addrs("v1"));
    stop_running(r).await;
}

async fn stop_running(r: Running) {
    stop(r).await;
}
