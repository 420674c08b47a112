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
    let gate = r.gates()[0].clone();
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
    let api = get(&c, r.admin_addr, "admin", "/api/services").await.body;
    let api: serde_json::Value = serde_json::from_str(&api).unwrap();
    let pw = &api["services"][0]["prewarm"];
    assert_eq!(pw["active"], true, "{pw}");
    assert_eq!(pw["kept_awake"], true, "{pw}");
    assert_eq!(pw["next"]["source"], "schedule", "{pw}");
    assert_eq!(pw["lead_seconds"], 2.0, "{pw}");
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

#[test]
fn prewarm_plan_lists_the_next_seven_days_with_their_source() {
    let dir = std::env::temp_dir().join(format!("reveille-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("plan.yaml");
    std::fs::write(
        &path,
        "services:\n  - name: sync\n    hosts: [sync]\n    backend: { process: { command: [x], address: \"127.0.0.1:9\" } }\n    depends_on: [db]\n    prewarm:\n      lead: 2m\n      schedule:\n        - { days: [mon, tue, wed, thu, fri], start: \"06:00\", end: \"06:30\" }\n        - { days: [mon], start: \"07:45\", end: \"11:00\", timezone: Europe/Amsterdam }\n  - name: db\n    hosts: [db]\n    backend: { process: { command: [x], address: \"127.0.0.1:10\" } }\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "prewarm",
            "plan",
            "--json",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = v["services"].as_array().unwrap();
    assert_eq!(services.len(), 1, "only pre-warmed services: {v}");
    let s = &services[0];
    assert_eq!(s["service"], "sync");
    assert_eq!(s["lead_seconds"], 120.0);
    assert_eq!(s["depends_on"][0], "db");
    let windows = s["windows"].as_array().unwrap();
    // Five weekday windows and one Monday window in any 7 days (one may be under way).
    assert!((6..=7).contains(&windows.len()), "{windows:?}");
    assert!(windows.iter().all(|w| w["source"] == "schedule"));
    // One Monday window starts in the next 7 days; another may be under way now (on a Monday
    // morning, the plan lists the running one and next week's).
    let now = jiff::Timestamp::now();
    let mondays = windows
        .iter()
        .filter(|w| {
            let start: jiff::Timestamp = w["start"].as_str().unwrap().parse().unwrap();
            let local = start.to_zoned(jiff::tz::TimeZone::get("Europe/Amsterdam").unwrap());
            start > now && local.strftime("%a %H:%M").to_string() == "Mon 07:45"
        })
        .count();
    assert_eq!(mondays, 1, "{windows:?}");
    for w in windows {
        let start: jiff::Timestamp = w["start"].as_str().unwrap().parse().unwrap();
        let wake: jiff::Timestamp = w["wake_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(start.duration_since(wake).as_secs(), 120, "{w}");
    }
    let text = std::process::Command::new(BIN)
        .args(["prewarm", "plan", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.starts_with("sync (lead 2m, depends on db)"), "{text}");
    assert!(text.contains("schedule"), "{text}");
}

/// Three past weeks of a job 2 hours from now (or 3 hours ago, near the end of a week) as
/// CSV, a header line first.
fn three_weeks_csv() -> (String, jiff::Timestamp) {
    let now = jiff::Timestamp::now();
    let week = |t: jiff::Timestamp| (t.as_second() - 4 * 86_400).div_euclid(7 * 86_400);
    let mut at = now + jiff::SignedDuration::from_hours(2);
    if week(at) != week(now) {
        at = now - jiff::SignedDuration::from_hours(3);
    }
    let mut csv = String::from("timestamp,path\n");
    for k in 1..=3 {
        let base = at - jiff::SignedDuration::from_hours(24 * 7 * k);
        for m in 0..10 {
            let t = base + jiff::SignedDuration::from_mins(m);
            csv.push_str(&format!("{t},/sync\n"));
        }
    }
    (csv, at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_history_is_planned_served_and_kept_across_a_restart() {
    let dir = std::env::temp_dir().join(format!("reveille-learn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state");
    let port = free_port();
    let yaml = process_config(
        port,
        "0s",
        &["idle_timeout: 5m", "prewarm: { learn: true }"],
    ) + &format!("state_dir: {}\n", state.display());
    let path = dir.join("learn.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let (csv, at) = three_weeks_csv();
    let csv_path = dir.join("requests.csv");
    std::fs::write(&csv_path, csv).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let cfg = path.to_str().unwrap();
    let said = run(&[
        "prewarm",
        "import",
        "--config",
        cfg,
        "--service",
        "hello",
        csv_path.to_str().unwrap(),
    ]);
    assert!(
        said.contains("30 requests imported (1 lines skipped)"),
        "{said}"
    );
    let plan: serde_json::Value =
        serde_json::from_str(&run(&["prewarm", "plan", "--json", "--config", cfg])).unwrap();
    let w = &plan["services"][0]["windows"][0];
    assert_eq!(w["source"], "learned", "{plan}");
    let evidence = w["evidence"].as_str().unwrap();
    assert!(
        evidence.starts_with("cold starts in 3 of the last 3 weeks"),
        "{evidence}"
    );
    let learned_at: jiff::Timestamp = w["start"].as_str().unwrap().parse().unwrap();
    let bucket = |t: jiff::Timestamp| t.as_second().div_euclid(900) % (7 * 96);
    assert_eq!(bucket(learned_at), bucket(at), "{w}");

    // Served from the same history, twice: a restart keeps it.
    for round in 0..2 {
        let r = start(&yaml).await;
        let c = client();
        let api = get(&c, r.admin_addr, "admin", "/api/services").await.body;
        let api: serde_json::Value = serde_json::from_str(&api).unwrap();
        let pw = &api["services"][0]["prewarm"];
        assert_eq!(pw["learn"], true, "{pw}");
        assert_eq!(pw["next"]["source"], "learned", "round {round}: {pw}");
        assert_eq!(pw["next"]["start"], w["start"], "round {round}: {pw}");
        // The running Reveille's whole plan: the same learned window, over the admin API and
        // through `prewarm plan --admin`.
        let live = get(&c, r.admin_addr, "admin", "/api/prewarm").await.body;
        let live: serde_json::Value = serde_json::from_str(&live).unwrap();
        let lw = &live["services"][0]["windows"][0];
        assert_eq!(live["services"][0]["service"], "hello", "{live}");
        assert_eq!(
            (&lw["source"], &lw["start"]),
            (&w["source"], &w["start"]),
            "{live}"
        );
        let admin = r.admin_addr.to_string();
        let out = tokio::process::Command::new(BIN)
            .args(["prewarm", "plan", "--admin", &admin])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("hello (lead auto"), "{text}");
        assert!(text.contains("  learned "), "{text}");
        assert!(
            text.contains("cold starts in 3 of the last 3 weeks"),
            "{text}"
        );
        stop(r).await;
    }
    assert!(state.join("prewarm-history.json").exists());
}

#[tokio::test]
async fn learning_with_an_unwritable_state_dir_is_an_error_naming_it() {
    let yaml = process_config(free_port(), "0s", &["prewarm: { learn: true }"])
        + "state_dir: /proc/reveille-cannot-write-here\n";
    let cfg = reveille::Config::parse(&yaml).unwrap();
    let e = reveille::start(cfg)
        .await
        .err()
        .expect("refused")
        .to_string();
    // (A process service needs it for its pid file too; either check names the field.)
    assert!(
        e.contains("state_dir /proc/reveille-cannot-write-here: "),
        "{e}"
    );
    // Without learning (and without process backends), the directory is not needed.
    let yaml = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nstate_dir: /proc/reveille-cannot-write-here\nservices:\n  - name: s\n    hosts: [s.test]\n    backend: { static: { addresses: [\"127.0.0.1:1\"] } }\n";
    let r = start(yaml).await;
    stop(r).await;
}

#[test]
fn prewarm_plan_needs_a_config_or_an_admin_address_and_names_an_unreachable_one() {
    let out = std::process::Command::new(BIN)
        .args(["prewarm", "plan"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--config"), "{err}");
    // Nothing listens there: a failure naming the address, not a hang or an empty plan.
    let admin = format!("127.0.0.1:{}", free_port());
    let out = std::process::Command::new(BIN)
        .args(["prewarm", "plan", "--admin", &admin])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&admin), "{err}");
    assert!(out.stdout.is_empty());
}
