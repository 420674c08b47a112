//! The activating proxy end to end: real sockets on 127.0.0.1, real child processes (the demo
//! backend), Reveille in-process.

mod support;

use std::time::Duration;

use reveille::gate::State;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_burst_is_held_and_all_answered_by_one_start() {
    let port = free_port();
    let r = start(&process_config(
        port,
        "2s",
        &["queue: { capacity: 1000, timeout: 30s }"],
    ))
    .await;
    let c = client();
    let n = 250;
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = c.clone();
        let addr = r.proxy_addr;
        tasks.push(tokio::spawn(async move {
            get(&c, addr, "hello.test", &format!("/burst/{i}")).await
        }));
    }
    let mut pids = std::collections::HashSet::new();
    for t in tasks {
        let resp = t.await.unwrap();
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.header("x-reveille-cold-start"), Some("true"));
        pids.insert(resp.header("x-demo-pid").unwrap().to_string());
    }
    assert_eq!(
        pids.len(),
        1,
        "one backend process served the burst: {pids:?}"
    );
    let log = get(&c, r.proxy_addr, "hello.test", "/_demo/log").await.body;
    assert_eq!(
        log.lines().count(),
        n,
        "each request reached the backend exactly once"
    );
    let metrics = get(&c, r.admin_addr, "admin", "/metrics").await.body;
    assert_eq!(
        metric(
            &metrics,
            "reveille_activations_total{outcome=\"ready\",service=\"hello\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "reveille_requests_total{code=\"200\",service=\"hello\"}"
        ),
        Some((n + 1) as f64)
    );
    // Warm now: no cold-start header.
    let warm = get(&c, r.proxy_addr, "hello.test", "/warm").await;
    assert_eq!(warm.status, 200);
    assert_eq!(warm.header("x-reveille-cold-start"), None);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_overflow_rejects_exactly_the_excess() {
    let port = free_port();
    let r = start(&process_config(
        port,
        "1500ms",
        &["queue: { capacity: 10, timeout: 30s }"],
    ))
    .await;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..30 {
        let c = c.clone();
        let addr = r.proxy_addr;
        tasks.push(tokio::spawn(async move {
            get(&c, addr, "hello.test", &format!("/o/{i}")).await
        }));
    }
    let (mut ok, mut full) = (0, 0);
    for t in tasks {
        let resp = t.await.unwrap();
        match resp.status.as_u16() {
            200 => ok += 1,
            503 => {
                full += 1;
                assert_eq!(resp.header("retry-after"), Some("1"));
                assert!(resp.body.contains("\"hello\""), "{}", resp.body);
                assert!(resp.body.contains("queue is full"), "{}", resp.body);
            }
            s => panic!("unexpected {s}: {resp:?}"),
        }
    }
    assert_eq!((ok, full), (10, 20));
    let metrics = get(&c, r.admin_addr, "admin", "/metrics").await.body;
    assert_eq!(
        metric(
            &metrics,
            "reveille_rejected_total{reason=\"queue_full\",service=\"hello\"}"
        ),
        Some(20.0)
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_deadline_answers_504_naming_the_service() {
    let port = free_port();
    let r = start(&process_config(
        port,
        "5s",
        &["queue: { capacity: 10, timeout: 300ms }"],
    ))
    .await;
    let c = client();
    let t0 = std::time::Instant::now();
    let resp = get(&c, r.proxy_addr, "hello.test", "/slow").await;
    assert_eq!(resp.status, 504);
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "answered at the deadline, not at start"
    );
    assert_eq!(
        resp.body,
        "reveille: service \"hello\": no ready backend within the hold timeout of 300ms\n"
    );
    assert_eq!(resp.header("x-reveille-error"), Some("hold_timeout"));
    assert_eq!(r.gates()[0].held(), 0);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_frees_its_slot_and_never_reaches_the_backend() {
    let port = free_port();
    let r = start(&process_config(
        port,
        "1500ms",
        &["queue: { capacity: 1, timeout: 30s }"],
    ))
    .await;
    let gate = r.gates()[0].clone();
    let mut raw = tokio::net::TcpStream::connect(r.proxy_addr).await.unwrap();
    raw.write_all(b"GET /gone HTTP/1.1\r\nHost: hello.test\r\n\r\n")
        .await
        .unwrap();
    wait_until("the request to be held", Duration::from_secs(5), || {
        let g = gate.clone();
        async move { g.held() == 1 }
    })
    .await;
    drop(raw);
    wait_until("the slot to be freed", Duration::from_secs(2), || {
        let g = gate.clone();
        async move { g.held() == 0 }
    })
    .await;
    // The single slot is free for the next request.
    let c = client();
    let resp = get(&c, r.proxy_addr, "hello.test", "/stays").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let log = get(&c, r.proxy_addr, "hello.test", "/_demo/log").await.body;
    assert_eq!(log, "GET /stays\n");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_are_forwarded_in_arrival_order() {
    let port = free_port();
    let r = start(&process_config(
        port,
        "800ms",
        &["concurrency: 1", "queue: { capacity: 100, timeout: 30s }"],
    ))
    .await;
    let gate = r.gates()[0].clone();
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        let addr = r.proxy_addr;
        tasks.push(tokio::spawn(async move {
            get(&c, addr, "hello.test", &format!("/seq/{i}")).await
        }));
        // The next one arrives only once this one is held.
        wait_until("request held", Duration::from_secs(5), || {
            let g = gate.clone();
            async move { g.held() == i + 1 || g.state() == State::Ready }
        })
        .await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    let log = get(&c, r.proxy_addr, "hello.test", "/_demo/log").await.body;
    let want: String = (0..20).map(|i| format!("GET /seq/{i}\n")).collect();
    assert_eq!(log, want);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_backend_is_stopped_and_woken_again() {
    let port = free_port();
    let r = start(&process_config(port, "0s", &["idle_timeout: 300ms"])).await;
    let gate = r.gates()[0].clone();
    let c = client();
    let first = get(&c, r.proxy_addr, "hello.test", "/one").await;
    assert_eq!(first.status, 200);
    let pid1: u32 = first.header("x-demo-pid").unwrap().parse().unwrap();
    assert!(alive(pid1));
    wait_until("idle stop", Duration::from_secs(10), || {
        let g = gate.clone();
        async move { g.state() == State::Idle && !alive(pid1) }
    })
    .await;
    assert!(gate.endpoints().is_empty());
    let second = get(&c, r.proxy_addr, "hello.test", "/two").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-reveille-cold-start"), Some("true"));
    let pid2: u32 = second.header("x-demo-pid").unwrap().parse().unwrap();
    assert_ne!(pid1, pid2, "a new process was started");
    let metrics = get(&c, r.admin_addr, "admin", "/metrics").await.body;
    assert_eq!(
        metric(
            &metrics,
            "reveille_activations_total{outcome=\"ready\",service=\"hello\"}"
        ),
        Some(2.0)
    );
    stop(r).await;
    assert!(!alive(pid2), "shutdown stops the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_crashes_while_warm_is_noticed_and_restarted() {
    let port = free_port();
    let r = start(&process_config(port, "0s", &[])).await;
    let gate = r.gates()[0].clone();
    let c = client();
    let first = get(&c, r.proxy_addr, "hello.test", "/a").await;
    let pid1 = first.header("x-demo-pid").unwrap().to_string();
    let bye = get(&c, r.proxy_addr, "hello.test", "/_demo/exit").await;
    assert_eq!(bye.status, 200);
    wait_until("crash noticed", Duration::from_secs(5), || {
        let g = gate.clone();
        async move { g.endpoints().is_empty() }
    })
    .await;
    let again = get(&c, r.proxy_addr, "hello.test", "/b").await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_ne!(again.header("x-demo-pid").unwrap(), pid1);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_crashes_while_waking_is_started_again() {
    let port = free_port();
    let dir = tempdir();
    let mark = dir.join("started-once");
    let script = format!(
        "if [ -e {m} ]; then exec {BIN} demo-backend --listen 127.0.0.1:{port}; else touch {m}; exit 1; fi",
        m = mark.display()
    );
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: hello\n    hosts: [hello.test]\n    backend:\n      process:\n        command: [sh, -c, {script:?}]\n        address: 127.0.0.1:{port}\n        start_attempts: 3\n"
    );
    let r = start(&yaml).await;
    let c = client();
    let resp = get(&c, r.proxy_addr, "hello.test", "/x").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(mark.exists());
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_cannot_start_answers_502_with_the_reason() {
    let port = free_port();
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: crashy\n    hosts: [crashy.test]\n    backend:\n      process: {{ command: [sh, -c, 'exit 7'], address: 127.0.0.1:{port}, start_attempts: 2 }}\n  - name: missing\n    hosts: [missing.test]\n    backend:\n      process: {{ command: [/nonexistent/program], address: 127.0.0.1:{} }}\n  - name: never\n    hosts: [never.test]\n    backend:\n      process: {{ command: [sleep, '30'], address: 127.0.0.1:{}, start_timeout: 400ms, stop_grace: 1s }}\n",
        free_port(),
        free_port()
    );
    let r = start(&yaml).await;
    let c = client();
    let crashy = get(&c, r.proxy_addr, "crashy.test", "/").await;
    assert_eq!(crashy.status, 502);
    assert!(crashy.body.contains("\"crashy\""), "{}", crashy.body);
    assert!(crashy.body.contains("exit status: 7"), "{}", crashy.body);
    let missing = get(&c, r.proxy_addr, "missing.test", "/").await;
    assert_eq!(missing.status, 502);
    assert!(
        missing.body.contains("cannot run \"/nonexistent/program\""),
        "{}",
        missing.body
    );
    let never = get(&c, r.proxy_addr, "never.test", "/").await;
    assert_eq!(never.status, 504);
    assert!(
        never.body.contains("did not become ready"),
        "{}",
        never.body
    );
    assert!(never.body.contains("within 400ms"), "{}", never.body);
    let metrics = get(&c, r.admin_addr, "admin", "/metrics").await.body;
    assert_eq!(
        metric(
            &metrics,
            "reveille_activations_total{outcome=\"failed\",service=\"crashy\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "reveille_activations_total{outcome=\"timeout\",service=\"never\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "reveille_rejected_total{reason=\"activation_failed\",service=\"missing\"}"
        ),
        Some(1.0)
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_path_rewrites_headers_and_streams_bodies() {
    let port = free_port();
    let r = start(&process_config(port, "0s", &[])).await;
    let c = client();
    let resp = get(&c, r.proxy_addr, "Hello.Test:8080", "/h").await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("x-demo-host"),
        Some("Hello.Test:8080"),
        "Host preserved"
    );
    assert_eq!(resp.header("x-demo-forwarded-for"), Some("127.0.0.1"));
    // A body larger than any buffer, echoed back intact.
    let body: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let echoed = send(
        &c,
        r.proxy_addr,
        "POST",
        "hello.test",
        "/_demo/echo",
        body.clone(),
    )
    .await;
    assert_eq!(echoed.status, 200);
    assert_eq!(echoed.raw.len(), body.len());
    assert!(echoed.raw == body.as_slice());
    // Hop-by-hop headers are not passed on: a raw request with Connection-listed header.
    let mut raw = tokio::net::TcpStream::connect(r.proxy_addr).await.unwrap();
    raw.write_all(
        b"GET /raw HTTP/1.1\r\nHost: hello.test\r\nConnection: close, x-drop\r\nX-Drop: 1\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    raw.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_is_404_and_missing_host_is_400() {
    let port = free_port();
    let r = start(&process_config(port, "0s", &[])).await;
    let c = client();
    let resp = get(&c, r.proxy_addr, "nope.test", "/").await;
    assert_eq!(resp.status, 404);
    assert_eq!(resp.body, "reveille: no service for host \"nope.test\"\n");
    let mut raw = tokio::net::TcpStream::connect(r.proxy_addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    raw.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.0 400"), "{out}");
    assert!(out.contains("no Host header"), "{out}");
    // Neither woke the service.
    assert_eq!(r.gates()[0].state(), State::Idle);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_state() {
    let port = free_port();
    let r = start(&process_config(port, "0s", &[])).await;
    let c = client();
    assert_eq!(get(&c, r.admin_addr, "a", "/healthz").await.status, 200);
    assert_eq!(get(&c, r.admin_addr, "a", "/readyz").await.status, 200);
    assert_eq!(get(&c, r.admin_addr, "a", "/nope").await.status, 404);
    assert_eq!(get(&c, r.proxy_addr, "hello.test", "/").await.status, 200);
    let q: serde_json::Value =
        serde_json::from_str(&get(&c, r.admin_addr, "a", "/queue").await.body).unwrap();
    assert_eq!(q["default/hello"]["RequestCount"], 1);
    assert_eq!(q["default/hello"]["Concurrency"], 0);
    let s: serde_json::Value =
        serde_json::from_str(&get(&c, r.admin_addr, "a", "/api/services").await.body).unwrap();
    let svc = &s["services"][0];
    assert_eq!(svc["name"], "hello");
    assert_eq!(svc["state"], "ready");
    assert_eq!(svc["held"], 0);
    assert_eq!(
        svc["ready_endpoints"][0]["address"],
        format!("127.0.0.1:{port}")
    );
    assert!(svc["last_activation_seconds"].as_f64().unwrap() > 0.0);
    let m = get(&c, r.admin_addr, "a", "/metrics").await.body;
    for name in [
        "reveille_requests_held",
        "reveille_requests_in_flight",
        "reveille_requests_total",
        "reveille_request_duration_seconds",
        "reveille_hold_duration_seconds",
        "reveille_activations_total",
        "reveille_activation_duration_seconds",
    ] {
        assert!(m.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    stop(r).await;
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "reveille-test-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_past_the_shutdown_grace_get_503_and_the_backend_is_stopped() {
    let port = free_port();
    let yaml = process_config(port, "30s", &[]).replace(
        "services:",
        "shutdown: { delay: 0s, grace: 500ms }\nservices:",
    );
    let r = start(&yaml).await;
    let gate = r.gates()[0].clone();
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..5 {
        let c = c.clone();
        let addr = r.proxy_addr;
        tasks.push(tokio::spawn(async move {
            get(&c, addr, "hello.test", &format!("/late/{i}")).await
        }));
    }
    wait_until("5 held", Duration::from_secs(5), || {
        let g = gate.clone();
        async move { g.held() == 5 }
    })
    .await;
    let listen = format!("127.0.0.1:{port}");
    wait_until(
        "the backend to be starting",
        Duration::from_secs(10),
        || {
            let n = pids_with_arg(&listen).len();
            async move { n == 1 }
        },
    )
    .await;
    let t0 = std::time::Instant::now();
    r.shutdown();
    for t in tasks {
        let resp = t.await.unwrap();
        assert_eq!(resp.status, 503, "{resp:?}");
        assert_eq!(resp.header("x-reveille-error"), Some("shutting_down"));
        assert_eq!(resp.header("retry-after"), Some("1"));
    }
    tokio::time::timeout(Duration::from_secs(20), r.wait())
        .await
        .expect("shutdown completes");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "bounded by the grace, not the start-up"
    );
    assert_eq!(gate.state(), State::Idle);
    assert!(
        pids_with_arg(&listen).is_empty(),
        "the starting backend was stopped"
    );
}
