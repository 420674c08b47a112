//! Three Reveille replicas (real processes of the built binary) on loopback, each knowing only
//! its own counts: whichever one KEDA asks answers with the sum, a request held on one pushes
//! `true` on the stream held by another, and killing a replica never fails an answer (its
//! last counts are used for `peer_stale_after`, then dropped).

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::keda::*;
use support::*;

struct Replica {
    proxy: SocketAddr,
    admin: SocketAddr,
    grpc: SocketAddr,
    child: ChildGuard,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn spawn_replicas(n: usize) -> Vec<Replica> {
    let dir = tempdir("cluster");
    let admins: Vec<SocketAddr> = (0..n).map(|_| addr(free_port())).collect();
    let mut out = Vec::new();
    for (i, &admin) in admins.iter().enumerate() {
        let proxy = addr(free_port());
        let grpc = addr(free_port());
        let peers: Vec<String> = admins
            .iter()
            .filter(|a| **a != admin)
            .map(|a| a.to_string())
            .collect();
        // The backend never becomes ready (`sleep`), so requests stay held; it exits by itself
        // even if its replica is killed.
        let yaml = format!(
            "listen: {proxy}\nadmin: {admin}\nkeda:\n  listen: {grpc}\n  peers: [{}]\n  peer_timeout: 300ms\n  peer_stale_after: 3s\n  stream_interval: 1h\nservices:\n  - name: hello\n    hosts: [hello.test]\n    backend:\n      process:\n        command: [sleep, \"20\"]\n        address: 127.0.0.1:{}\n        start_timeout: 60s\n        start_attempts: 1\n        stop_grace: 1s\n    queue: {{ capacity: 100, timeout: 60s }}\n",
            peers.join(", "),
            free_port()
        );
        let cfg = dir.join(format!("r{i}.yaml"));
        std::fs::write(&cfg, yaml).unwrap();
        let log = std::fs::File::create(dir.join(format!("r{i}.log"))).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        out.push(Replica {
            proxy,
            admin,
            grpc,
            child: ChildGuard(child),
        });
    }
    out
}

async fn scaling(c: &TestClient, admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&get(c, admin, "a", "/api/scaling").await.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sum_push_across_and_survive_a_killed_peer() {
    let mut rs = spawn_replicas(3);
    let c = client();
    for r in &rs {
        let admin = r.admin;
        let c = c.clone();
        wait_until("replica up", Duration::from_secs(30), move || {
            let c = c.clone();
            async move {
                let req = http::Request::get(format!("http://{admin}/healthz"))
                    .body(Default::default())
                    .unwrap();
                c.request(req).await.is_ok_and(|r| r.status() == 200)
            }
        })
        .await;
    }
    let (a, b, cc) = (&rs[0], &rs[1], &rs[2]);
    let mut ga = grpc(a.grpc);
    let mut gb = grpc(b.grpc);
    let mut gc = grpc(cc.grpc);

    // KEDA's stream is on A; a request is held on C: A pushes `true`.
    let mut stream = ga
        .stream_is_active(sor("hello", &[]))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!first.result);
    let mut held = Vec::new();
    let hold = |proxy: SocketAddr| {
        let c = c.clone();
        tokio::spawn(async move {
            let req = http::Request::get(format!("http://{proxy}/held"))
                .header("host", "hello.test")
                .body(Default::default())
                .unwrap();
            let _ = c.request(req).await;
        })
    };
    let sent = Instant::now();
    held.push(hold(cc.proxy));
    let pushed = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a push from a peer's held request")
        .unwrap()
        .unwrap();
    let latency = sent.elapsed();
    assert!(pushed.result);
    eprintln!("cross-replica push latency (held on C, pushed by A): {latency:?}");
    assert!(latency < Duration::from_secs(1), "{latency:?}");

    // Two more on B: every replica answers 3.
    held.push(hold(b.proxy));
    held.push(hold(b.proxy));
    wait_until("A sums 3", Duration::from_secs(10), || {
        let mut ga = ga.clone();
        async move { metric_value(&mut ga, "hello").await == 3.0 }
    })
    .await;
    assert_eq!(metric_value(&mut gb, "hello").await, 3.0);
    assert_eq!(metric_value(&mut gc, "hello").await, 3.0);
    assert!(is_active(&mut gb, "hello").await);
    let s = scaling(&c, a.admin).await;
    assert_eq!(s["services"]["hello"]["concurrency"], 3);
    assert_eq!(s["services"]["hello"]["replicas"], 3);
    assert_eq!(s["services"]["hello"]["stale"], 0);

    // C dies: A keeps answering at once, first with C's last count (stale), then without it.
    let last_ok = Instant::now(); // A read C's counts just above
    rs[2].child.kill();
    let t = Instant::now();
    let v = metric_value(&mut ga, "hello").await;
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "answer took {took:?}");
    let s = scaling(&c, rs[0].admin).await;
    // (Only a machine stalled for the whole 3 s stale window would see C dropped already.)
    if last_ok.elapsed() < Duration::from_millis(2500) {
        assert_eq!(v, 3.0, "C's last count is still used");
        assert_eq!(s["services"]["hello"]["replicas"], 3, "{s}");
        assert_eq!(s["services"]["hello"]["stale"], 1, "{s}");
    }
    wait_until("C left out", Duration::from_secs(15), || {
        let mut ga = ga.clone();
        async move { metric_value(&mut ga, "hello").await == 2.0 }
    })
    .await;
    let s = scaling(&c, rs[0].admin).await;
    assert_eq!(s["services"]["hello"]["replicas"], 2);
    assert_eq!(s["services"]["hello"]["concurrency"], 2);
    assert!(is_active(&mut gb, "hello").await);
    let m = get(&c, rs[0].admin, "a", "/metrics").await.body;
    let dropped = metric(&m, "reveille_peer_fetches_total{outcome=\"dropped\"}");
    assert!(dropped.is_some_and(|n| n >= 1.0), "{m}");
    assert!(metric(&m, "reveille_peer_fetches_total{outcome=\"ok\"}").is_some_and(|n| n >= 2.0));

    for h in held {
        h.abort();
    }
    drop(stream);
    rs[0].child.terminate();
    rs[1].child.terminate();
}
