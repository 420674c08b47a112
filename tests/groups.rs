//! Dependency groups end to end: three real demo-backend processes, Reveille in-process.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use reveille::gate::{Gate, State};
use support::*;

fn service(name: &str, port: u16, command: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    hosts: [{name}.test]\n    idle_timeout: 1s\n    backend:\n      process:\n        command: {command}\n        address: 127.0.0.1:{port}\n        stop_grace: 2s\n        start_attempts: 1\n{extra}"
    )
}

/// What a watcher saw of each service: when it first waked, was ready, went idle after ready,
/// and which dependencies a service was seen waiting for.
#[derive(Default)]
struct Seen {
    waking: HashMap<String, tokio::time::Instant>,
    ready: HashMap<String, tokio::time::Instant>,
    idle: HashMap<String, tokio::time::Instant>,
    waiting_for: Vec<String>,
}

fn watch(gates: Vec<Arc<Gate>>) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let now = tokio::time::Instant::now();
            record(&mut s.lock(), &gates, now);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    (seen, task)
}

fn record(s: &mut Seen, gates: &[Arc<Gate>], now: tokio::time::Instant) {
    for g in gates {
        let name = g.name().to_string();
        match g.state() {
            State::Waking => {
                s.waking.entry(name.clone()).or_insert(now);
            }
            State::Ready => {
                s.ready.entry(name.clone()).or_insert(now);
            }
            State::Idle if s.ready.contains_key(&name) => {
                s.idle.entry(name.clone()).or_insert(now);
            }
            _ => {}
        }
        if let Some(d) = g.waiting_for() {
            if s.waiting_for.last() != Some(&d.to_string()) {
                s.waiting_for.push(d.to_string());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_starts_in_order_and_stops_dependents_first() {
    let (pa, pw, pd) = (free_port(), free_port(), free_port());
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n{}{}{}",
        service(
            "api",
            pa,
            &demo_command(pa, "300ms"),
            "    depends_on: [db, worker]\n"
        ),
        service("worker", pw, &demo_command(pw, "300ms"), ""),
        service("db", pd, &demo_command(pd, "300ms"), ""),
    );
    let r = start(&yaml).await;
    let (seen, watcher) = watch(r.gates());
    let c = client();
    let resp = get(&c, r.proxy_addr, "api.test", "/hello").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    wait_until("all seen ready", Duration::from_secs(5), || {
        let s = seen.clone();
        async move { s.lock().ready.len() == 3 }
    })
    .await;
    {
        let s = seen.lock();
        let (db, worker, api) = (&s.ready["db"], &s.ready["worker"], &s.ready["api"]);
        assert!(db < worker && worker < api, "ready order db, worker, api");
        assert!(
            s.waking["worker"] >= *db,
            "worker woken before db was ready"
        );
        assert_eq!(s.waiting_for, vec!["db".to_string(), "worker".to_string()]);
    }
    wait_until("all idle", Duration::from_secs(30), || {
        let s = seen.clone();
        async move { s.lock().idle.len() == 3 }
    })
    .await;
    {
        let s = seen.lock();
        assert!(
            s.idle["api"] < s.idle["worker"],
            "worker stopped before api"
        );
        assert!(s.idle["api"] < s.idle["db"], "db stopped before api");
    }
    watcher.abort();
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_that_fails_answers_the_held_requests_502_naming_it() {
    let (pa, pd) = (free_port(), free_port());
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n{}{}",
        service("api", pa, &demo_command(pa, "0s"), "    depends_on: [db]\n"),
        service("db", pd, "[/bin/false]", ""),
    );
    let r = start(&yaml).await;
    let c = client();
    let resp = get(&c, r.proxy_addr, "api.test", "/hello").await;
    assert_eq!(resp.status, 502, "{resp:?}");
    assert!(
        resp.body.contains("dependency \"db\" failed to start"),
        "{}",
        resp.body
    );
    assert_eq!(
        r.gates()[0].last_activation(),
        None,
        "api was started anyway"
    );
    stop(r).await;
}
