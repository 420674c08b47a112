//! Ten thousand configured services in one Reveille: every host routes to its own service, a
//! request to a few of them wakes each one's own backend and is answered by it, the others stay
//! idle, and the admin endpoints and metrics cover them all. (Memory is measured by
//! `coldpath services`, not asserted here.)

mod support;

use std::time::Duration;

use support::*;

const COUNT: usize = 10_000;

fn host(i: usize) -> String {
    format!("svc-{i}.team-{}.example.com", i % 37)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_services_route_and_a_few_of_them_wake_and_answer() {
    let woken: Vec<(usize, u16)> = [0, 4_321, COUNT - 1]
        .into_iter()
        .map(|i| (i, free_port()))
        .collect();
    let mut yaml = String::from("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n");
    for i in 0..COUNT {
        let backend = match woken.iter().find(|(w, _)| *w == i) {
            Some((_, port)) => format!(
                "command: [\"{BIN}\", demo-backend, --listen, \"127.0.0.1:{port}\", --name, svc-{i}]\n        address: 127.0.0.1:{port}\n        stop_grace: 2s"
            ),
            // Never started: no request goes to these.
            None => format!(
                "command: [/bin/false]\n        address: \"127.1.{}.{}:8080\"",
                i / 256,
                i % 256
            ),
        };
        yaml.push_str(&format!(
            "  - name: svc-{i}\n    hosts: [{}]\n    backend:\n      process:\n        {backend}\n",
            host(i)
        ));
    }
    let r = start(&yaml).await;
    assert_eq!(r.gates().len(), COUNT);

    // Every host routes to its own service.
    let snapshot = r.services().load();
    for i in 0..COUNT {
        let gate = snapshot
            .router
            .lookup(&host(i), "/")
            .unwrap_or_else(|| panic!("{} does not route", host(i)));
        assert_eq!(gate.name().as_ref(), format!("svc-{i}"));
    }
    assert!(snapshot
        .router
        .lookup("svc-10000.team-10.example.com", "/")
        .is_none());

    // A request to a few: each wakes its own backend and is answered by it.
    let c = client();
    for (i, _) in &woken {
        let resp = tokio::time::timeout(
            Duration::from_secs(30),
            get(&c, r.proxy_addr, &host(*i), "/hello"),
        )
        .await
        .expect("answered within 30 s");
        assert_eq!(resp.status, 200, "svc-{i}: {}", resp.body);
        assert_eq!(
            resp.header("x-demo-name"),
            Some(format!("svc-{i}").as_str())
        );
    }
    assert_eq!(
        get(&c, r.proxy_addr, "nobody.example.com", "/")
            .await
            .status,
        404
    );

    // Only those woke; the rest are idle and were never asked for anything.
    let ready: Vec<String> = r
        .gates()
        .iter()
        .filter(|g| g.state() != reveille::gate::State::Idle)
        .map(|g| g.name().to_string())
        .collect();
    let want: Vec<String> = woken.iter().map(|(i, _)| format!("svc-{i}")).collect();
    assert_eq!(ready, want);
    assert_eq!(
        r.gates().iter().map(|g| g.requests_total()).sum::<u64>(),
        woken.len() as u64
    );

    // The admin endpoints and metrics cover every service.
    let services: serde_json::Value =
        serde_json::from_str(&get(&c, r.admin_addr, "a", "/api/services").await.body).unwrap();
    let list = services["services"].as_array().unwrap();
    assert_eq!(list.len(), COUNT);
    assert_eq!(list[4_321]["name"], "svc-4321");
    assert_eq!(list[4_321]["state"], "ready");
    assert_eq!(list[17]["state"], "idle");
    let queue: serde_json::Value =
        serde_json::from_str(&get(&c, r.admin_addr, "a", "/queue").await.body).unwrap();
    assert_eq!(queue.as_object().unwrap().len(), COUNT);
    assert_eq!(queue["default/svc-4321"]["RequestCount"], 1);
    assert_eq!(queue["default/svc-17"]["RequestCount"], 0);
    let m = get(&c, r.admin_addr, "a", "/metrics").await.body;
    assert_eq!(
        m.lines()
            .filter(|l| l.starts_with("reveille_requests_held{"))
            .count(),
        COUNT
    );
    assert_eq!(
        metric(
            &m,
            "reveille_service_state{service=\"svc-17\",state=\"idle\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "reveille_requests_total{code=\"200\",service=\"svc-4321\"}"
        ),
        Some(1.0)
    );
    // Histogram series exist for the services that had requests, not for the idle ones.
    assert!(m.contains("reveille_request_duration_seconds_count{service=\"svc-4321\"} 1"));
    assert!(!m.contains("reveille_request_duration_seconds_count{service=\"svc-17\"}"));
    drop(snapshot);
    stop(r).await;
}
