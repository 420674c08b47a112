//! Pre-warming end to end: a real Reveille, a real demo backend process, the system clock.

mod support;

use std::time::Duration;

use reveille::gate::State;
use support::*;

/// `HH:MM:SS` in UTC, `secs` from now.
fn utc_in(secs: i64) -> (String, jiff::Timestamp) {
    let t = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(secs);
    let z = t.to_zoned(jiff::tz::TimeZone::UTC);
    (z.strftime("%H:%M:%S").to_string(), t)
}

const ALL_DAYS: &str = "[mon, tue, wed, thu, fri, sat, sun]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_window_starts_the_backend_before_any_request_and_keeps_it_through() {
    let port = free_port();
    let (start_s, start_t) = utc_in(5);
    let (end_s, end_t) = utc_in(10);
    let window = format!("    - {{ days: {ALL_DAYS}, start: \"{start_s}\", end: \"{end_s}\" }}");
    let r = start(&process_config(
        port,
        "200ms",
        &[
            "idle_timeout: 1s",
            "prewarm:",
            "  lead: 2s",
            "  schedule:",
            &window,
        ],
    ))
    .await;
    let gate = r.gates[0].clone();
    assert_eq!(gate.state(), State::Idle);
    wait_until("pre-warmed", Duration::from_secs(15), || {
        let g = gate.clone();
        async move { g.state() == State::Ready }
    })
    .await;
    let ready_at = jiff::Timestamp::now();
    assert!(
        ready_at < start_t,
        "ready at {ready_at}, after the window opened ({start_t})"
    );
    assert!(
        ready_at > start_t - jiff::SignedDuration::from_secs(4),
        "woken at {ready_at}, long before the lead ({start_t} - 2s)"
    );
    assert_eq!(gate.requests_total(), 0, "woken without any request");
    let c = client();
    let first = get(&c, r.proxy_addr, "hello.test", "/first").await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("x-reveille-cold-start"),
        None,
        "the first request was cold"
    );
    // Past the idle timeout (1 s) but inside the window: still up.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        jiff::Timestamp::now() < end_t,
        "test too slow to check inside the window"
    );
    assert_eq!(gate.state(), State::Ready, "stopped inside the window");
    // After the window, the idle timeout applies and the backend stops.
    wait_until("stopped after the window", Duration::from_secs(20), || {
        let g = gate.clone();
        async move { g.state() == State::Idle }
    })
    .await;
    assert!(
        jiff::Timestamp::now() >= end_t,
        "stopped before the window ended"
    );
    let m = metrics_text(&c, &r).await;
    assert_eq!(
        metric(
            &m,
            "reveille_prewarm_total{service=\"hello\",source=\"schedule\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "reveille_prewarm_hits_total{service=\"hello\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "reveille_activations_total{outcome=\"ready\",service=\"hello\"}"
        ),
        Some(1.0)
    );
    stop(r).await;
}
