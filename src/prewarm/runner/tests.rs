use std::time::Duration;

use super::*;
use crate::config::Config;
use crate::gate::{GateSettings, HeldLimit};
use crate::prewarm::TokioClock;

fn setup(prewarm: &str) -> (Arc<Gate>, Prewarm, Metrics) {
    let cfg = Config::parse(&format!(
        "services:\n  - name: a\n    hosts: [a]\n    backend: {{ process: {{ command: [x], address: \"127.0.0.1:9\" }} }}\n    prewarm:\n{prewarm}"
    ))
    .unwrap();
    let metrics = Metrics::new();
    let gate = Gate::new(
        "a",
        GateSettings {
            capacity: 1,
            hold_timeout: Duration::from_secs(1),
            concurrency: None,
            protocol: crate::config::Protocol::Http1,
            upstream: None,
            held_limit: HeldLimit::new(1),
            upgrades: GateSettings::default_upgrades(),
        },
        metrics.service("a"),
    );
    (gate, cfg.services[0].prewarm.clone().unwrap(), metrics)
}

/// Advances paused time by `s` seconds and lets the runner act.
async fn advance(s: u64) {
    tokio::time::sleep(Duration::from_secs(s)).await;
    tokio::task::yield_now().await;
}

#[tokio::test(start_paused = true)]
async fn keeps_the_gate_awake_from_lead_before_the_window_to_its_end() {
    let (gate, cfg, metrics) = setup(
        "      lead: 90s\n      schedule:\n        - { days: [mon], start: \"06:00\", end: \"06:30\" }\n",
    );
    // Monday 2026-12-07, 05:55 UTC.
    let clock = TokioClock::starting_at("2026-12-07T05:55:00Z".parse().unwrap());
    let ctx = Context {
        clock: Arc::new(clock),
        store: None,
        shared: None,
    };
    let _h = Runner::new(
        gate.clone(),
        cfg,
        ctx,
        metrics.clone(),
        Duration::from_secs(60),
    )
    .spawn();
    advance(1).await;
    assert!(!gate.kept_awake(), "woken too early");
    // 05:58:20: 100 s before the window, still asleep.
    advance(199).await;
    assert!(!gate.kept_awake(), "woken before the lead");
    // 05:58:40: within the lead.
    advance(20).await;
    assert!(gate.kept_awake(), "not woken lead before the window");
    // 06:29:50: still in the window.
    advance(31 * 60 + 10).await;
    assert!(gate.kept_awake(), "let go inside the window");
    // 06:30:01: over.
    advance(11).await;
    assert!(!gate.kept_awake(), "kept past the window");
    let text = metrics.render();
    assert!(text.contains("reveille_prewarm_total{service=\"a\",source=\"schedule\"} 1"));
    assert!(text.contains("reveille_prewarm_misses_total{service=\"a\"} 1"));
    assert!(!text.contains("reveille_prewarm_hits_total{service=\"a\"}"));
    // 31.5 minutes warm (lead included), measured on tokio's clock.
    let line = text
        .lines()
        .find(|l| l.starts_with("reveille_prewarm_seconds_total{service=\"a\"}"))
        .unwrap();
    let secs: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((secs - 1890.0).abs() < 2.0, "{line}");
}

#[tokio::test(start_paused = true)]
async fn a_window_under_way_at_start_is_kept_and_auto_lead_is_at_least_30s() {
    let (gate, cfg, metrics) =
        setup("      schedule:\n        - { days: [sun], start: \"23:00\", end: \"01:00\" }\n");
    // Monday 00:30: the Sunday window crossing midnight is open.
    let clock = TokioClock::starting_at("2026-12-07T00:30:00Z".parse().unwrap());
    let ctx = Context {
        clock: Arc::new(clock),
        store: None,
        shared: None,
    };
    assert_eq!(lead(&cfg, Some(&gate)), Duration::from_secs(30));
    gate.activated(Duration::from_secs(45));
    assert_eq!(lead(&cfg, Some(&gate)), Duration::from_secs(45));
    let _h = Runner::new(
        gate.clone(),
        cfg,
        ctx,
        metrics.clone(),
        Duration::from_secs(60),
    )
    .spawn();
    advance(1).await;
    assert!(gate.kept_awake());
    // A request in the window makes it a hit.
    let _ = gate.acquire(tokio::time::Instant::now()).await;
    advance(30 * 60).await;
    assert!(!gate.kept_awake());
    assert!(metrics
        .render()
        .contains("reveille_prewarm_hits_total{service=\"a\"} 1"));
}

#[tokio::test(start_paused = true)]
async fn a_learning_runner_records_starts_of_activity_in_the_store() {
    let (gate, cfg, metrics) = setup("      learn: true\n");
    let dir = std::env::temp_dir().join(format!("reveille-runner-{}", std::process::id()));
    let store = crate::prewarm::store::Store::open(&dir).unwrap();
    // Monday 2026-12-07 08:05 UTC: bucket 32.
    let clock = TokioClock::starting_at("2026-12-07T08:05:00Z".parse().unwrap());
    let ctx = Context {
        clock: Arc::new(clock),
        store: Some(store.clone()),
        shared: None,
    };
    let _h = Runner::new(gate.clone(), cfg, ctx, metrics, Duration::from_secs(60)).spawn();
    advance(1).await;
    let _ = gate.acquire(tokio::time::Instant::now()).await;
    advance(10).await;
    // Within the idle time: more requests, but no new start.
    let _ = gate.acquire(tokio::time::Instant::now()).await;
    advance(10).await;
    // Ten minutes later (bucket 33): a new start.
    advance(600).await;
    let _ = gate.acquire(tokio::time::Instant::now()).await;
    advance(10).await;
    let h = store.read(|h| h.services["a"].clone());
    assert_eq!(
        h.this_week.iter().copied().collect::<Vec<_>>(),
        vec![32, 33]
    );
    assert_eq!(h.requests_this_week[&32], 2);
    store.save().unwrap();
    let again = crate::prewarm::store::Store::open(&dir).unwrap();
    assert_eq!(
        again.read(|h| h.services["a"].clone()),
        h,
        "history kept on disk"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
