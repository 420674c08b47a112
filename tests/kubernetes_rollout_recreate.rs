//! `overlap: none` with a Deployment's `strategy: Recreate`, under continuous load: the old
//! pods terminate (finishing what they serve) before the new ones start, requests arriving in
//! the gap are held, the new version is validated before it gets any, and no answer comes
//! from the old version after one came from the new.

#[path = "support/fake_kube.rs"]
mod fake_kube;
#[path = "support/fake_rollout.rs"]
mod fake_rollout;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_rollout::Rollout;
use support::*;

const NS: &str = "shop";
const LONG: Duration = Duration::from_secs(30);

/// One answered request: when it was sent and answered, its status, which version answered.
struct Sample {
    start: Instant,
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
}

/// Sends a request every 50 ms (20 per second), each on its own, until `stop`, counting the
/// answers in `tally` as they come.
fn paced_load(
    r: &Running,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    let (c, addr) = (client(), r.proxy_addr);
    tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut i = 0u32;
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            i += 1;
            let (c, tally) = (c.clone(), tally.clone());
            // Every fifth request is slow, so the old pods have work in flight when they go.
            let ms = if i.is_multiple_of(5) { 300 } else { 20 };
            sent.push(tokio::spawn(async move {
                let start = Instant::now();
                let resp = get(&c, addr, "web.test", &format!("/work?ms={ms}")).await;
                let version = resp.body.trim_start_matches("version=").to_string();
                *tally.0.lock().entry(version.clone()).or_default() += 1;
                Sample {
                    start,
                    end: Instant::now(),
                    status: resp.status.as_u16(),
                    version,
                }
            }));
        }
        let mut out = Vec::new();
        for s in sent {
            out.push(s.await.unwrap());
        }
        out
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreate_holds_requests_through_the_gap_and_never_mixes_versions() {
    let sim = Rollout::start(NS, "web").await;
    sim.set_strategy("Recreate");
    sim.roll_to("v1", 1, 2, true, true).await;
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: web\n    hosts: [web.test]\n    backend:\n      kubernetes: {{ namespace: {NS}, deployment: web, service: web, port: http }}\n    queue: {{ capacity: 1000, timeout: 30s }}\n    rollout: {{ validation: [ {{ path: /healthz }}, {{ method: POST, path: /validate }} ], quiesce: 5s, overlap: none }}\n"
    );
    let r = reveille::app::start_with_kube(
        reveille::Config::parse(&yaml).unwrap(),
        Some(sim.api.client().await),
    )
    .await
    .expect("start reveille");
    let c = client();
    let want = sim.addrs("v1");
    wait_until("routing to v1", LONG, || async { routed(&r) == want }).await;
    let halt = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let load = paced_load(&r, halt.clone(), tally.clone());
    wait_until("the load answered by v1", LONG, || async {
        tally.of("v1") > 15
    })
    .await;

    // Recreate: the old pods terminate, finishing what they were sent; only once they are
    // gone does the Deployment controller start the new version, 3 s later.
    sim.terminate_version("v1");
    wait_until("no endpoint routed in the gap", LONG, || async {
        routed(&r).is_empty()
    })
    .await;
    wait_until("the old pods' requests finished", LONG, || async {
        r.gates()[0].in_flight() == 0
    })
    .await;
    sim.remove_version("v1");
    let gap_began = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(r.gates()[0].held() > 0, "requests in the gap are held");
    let v2 = sim.roll_to("v2", 2, 1, false, true).await;
    let want = sim.addrs("v2");
    wait_until("routing to v2", LONG, || async { routed(&r) == want }).await;
    // The switch is counted (it ends after routing) and v2 answers the load.
    let switched = |m: &str| {
        ["drained", "timeout"].iter().any(|q| {
            let series =
                format!("reveille_rollout_switches_total{{quiesce=\"{q}\",service=\"web\"}}");
            metric(m, &series).is_some_and(|n| n >= 1.0)
        })
    };
    wait_until(
        "the switch over and the load answered by v2",
        LONG,
        || async { switched(&metrics_text(&c, &r).await) && tally.of("v2") > 15 },
    )
    .await;
    halt.store(true, Ordering::SeqCst);
    let samples = load.await.unwrap();

    let failed = samples.iter().filter(|s| s.status != 200).count();
    assert_eq!(failed, 0, "every request answered 200");
    let old: Vec<&Sample> = samples.iter().filter(|s| s.version == "v1").collect();
    let new: Vec<&Sample> = samples.iter().filter(|s| s.version == "v2").collect();
    assert_eq!(old.len() + new.len(), samples.len());
    assert!(
        old.len() > 10 && new.len() > 10,
        "{} old, {} new",
        old.len(),
        new.len()
    );
    let last_old = old.iter().map(|s| s.end).max().unwrap();
    let first_new = new.iter().map(|s| s.end).min().unwrap();
    assert!(last_old < first_new, "0 interleaved: v1 answered after v2");
    let held_through_gap = new
        .iter()
        .filter(|s| s.start < gap_began && s.end - s.start >= Duration::from_secs(3))
        .count();
    assert!(
        held_through_gap > 0,
        "requests sent before the gap waited through it"
    );
    // The new pod got both steps before any request (it only turns ready once validated).
    let steps = v2.validation_requests.lock().clone();
    assert_eq!(steps.len(), 2, "{steps:?}");
    let m = metrics_text(&c, &r).await;
    assert_eq!(
        metric(
            &m,
            "reveille_rollout_switches_total{quiesce=\"drained\",service=\"web\"}"
        ),
        Some(1.0),
        "the switch waited for the old version's in-flight requests"
    );
    let body = get(&c, r.admin_addr, "admin", "/api/services").await.body;
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    let state = &state["services"][0]["rollout"];
    assert_eq!(state["current_version"], "v2", "{state}");
    assert_eq!(state["overlap"], "none", "{state}");
    assert!(state["warning"].is_null(), "Recreate: no warning: {state}");
    println!(
        "recreate under 20 req/s: {} requests, {} v1, {} v2, {} held through the 3 s gap, 0 failed",
        samples.len(),
        old.len(),
        new.len(),
        held_through_gap
    );
    stop(r).await;
}
