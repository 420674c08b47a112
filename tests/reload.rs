//! Reloading services live: unchanged services are not disturbed, replaced ones keep their held
//! requests, removed ones answer 503.

mod support;

use std::time::Duration;

use support::*;

fn two_services(pa: u16, pb: u16, b_hosts: &str, a_capacity: usize) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: a\n    hosts: [a.test]\n    queue: {{ capacity: {a_capacity}, timeout: 30s }}\n    backend: {{ process: {{ command: {}, address: 127.0.0.1:{pa}, stop_grace: 2s }} }}\n  - name: b\n    hosts: [{b_hosts}]\n    backend: {{ process: {{ command: {}, address: 127.0.0.1:{pb}, stop_grace: 2s }} }}\n",
        demo_command(pa, "1s"),
        demo_command(pb, "0s")
    )
}

fn parse(yaml: &str) -> reveille::Config {
    reveille::Config::parse(yaml).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_leaves_unchanged_services_and_their_held_requests_alone() {
    let (pa, pb) = (free_port(), free_port());
    let first = parse(&two_services(pa, pb, "b.test", 100));
    let r = reveille::start(first.clone()).await.unwrap();
    let gate_a = r.gates()[0].clone();
    let c = client();
    let addr = r.proxy_addr;
    let mut held = Vec::new();
    for i in 0..10 {
        let c = c.clone();
        held.push(tokio::spawn(async move {
            get(&c, addr, "a.test", &format!("/{i}")).await
        }));
    }
    wait_until("10 held on a", Duration::from_secs(5), || {
        let g = gate_a.clone();
        async move { g.held() == 10 }
    })
    .await;
    // b gets a new host; a is unchanged.
    let second = parse(&two_services(pa, pb, "b2.test", 100));
    let out = r.reload(&second, &first).await;
    assert_eq!(out.changes.rerouted, vec!["b".to_string()]);
    assert!(out.changes.replaced.is_empty() && out.changes.removed.is_empty());
    assert!(out.needs_restart.is_empty());
    assert!(std::sync::Arc::ptr_eq(
        r.services().load().gate("a").unwrap(),
        &gate_a
    ));
    for t in held {
        let resp = t.await.unwrap();
        assert_eq!(resp.status, 200, "{resp:?}");
    }
    assert_eq!(get(&c, addr, "b2.test", "/").await.status, 200);
    assert_eq!(get(&c, addr, "b.test", "/").await.status, 404);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_service_keeps_its_held_requests_and_a_removed_one_answers_503() {
    let (pa, pb) = (free_port(), free_port());
    let first = parse(&two_services(pa, pb, "b.test", 100));
    let r = reveille::start(first.clone()).await.unwrap();
    let gate_a = r.gates()[0].clone();
    let c = client();
    let addr = r.proxy_addr;
    // b is warm and will be removed; a holds requests and will be replaced.
    let b_pid: u32 = get(&c, addr, "b.test", "/")
        .await
        .header("x-demo-pid")
        .unwrap()
        .parse()
        .unwrap();
    let mut held = Vec::new();
    for i in 0..10 {
        let c = c.clone();
        held.push(tokio::spawn(async move {
            get(&c, addr, "a.test", &format!("/{i}")).await
        }));
    }
    wait_until("10 held on a", Duration::from_secs(5), || {
        let g = gate_a.clone();
        async move { g.held() == 10 }
    })
    .await;
    let mut second = parse(&two_services(pa, pb, "b.test", 50));
    second.services.truncate(1);
    let out = r.reload(&second, &first).await;
    assert_eq!(out.changes.replaced, vec!["a".to_string()]);
    assert_eq!(out.changes.removed, vec!["b".to_string()]);
    for t in held {
        let resp = t.await.unwrap();
        assert_eq!(
            resp.status, 200,
            "held request moved to the new gate: {resp:?}"
        );
    }
    let new_a = r.services().load().gate("a").unwrap().clone();
    assert!(!std::sync::Arc::ptr_eq(&new_a, &gate_a));
    assert_eq!(new_a.settings().capacity, 50);
    let gone = get(&c, addr, "b.test", "/").await;
    assert_eq!(gone.status, 404);
    wait_until(
        "removed backend stopped",
        Duration::from_secs(10),
        || async move { !alive(b_pid) },
    )
    .await;
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_reloads_during_a_burst_lose_nothing() {
    let t = support::load::reload_during_burst(300).await;
    println!("reload during burst: {t}");
    assert_eq!(t.lost, 0, "{t}");
    assert_eq!(t.count(200), 300, "{t}");
}
