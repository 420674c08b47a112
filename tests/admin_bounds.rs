//! The admin listener is bounded (issue 12, item 4): a connection limit, header and idle
//! timeouts, a cap on `/api/local` long-polls; and a failing `accept` backs off. The fd tests
//! start the real binary under a low `ulimit -n`.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// `reveille serve` with `config`, under `ulimit -n fds`, in a directory of its own (removed
/// when the test passes).
fn serve_with_fd_limit(name: &str, config: &str, fds: u32) -> (tokio::process::Child, TempDir) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("admin-bounds-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("reveille.yaml");
    std::fs::write(&path, config).unwrap();
    let child = tokio::process::Command::new("sh")
        .args([
            "-c",
            &format!("ulimit -n {fds} && exec \"$0\" \"$@\""),
            BIN,
            "serve",
            "--config",
            path.to_str().unwrap(),
        ])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, TempDir(dir))
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Opens `n` connections that send nothing (as fast as the listener's queue takes them).
async fn idle_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(TcpStream::connect(addr).await.expect("connect"));
    }
    v
}

/// One raw `GET /healthz`: the status line's code, or `None` when the connection is closed
/// without an answer (or nothing comes within a second).
async fn healthz(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_cannot_starve_the_proxy_and_time_out() {
    let (proxy, admin, backend) = (free_port(), free_port(), free_port());
    let config = format!(
        "listen: 127.0.0.1:{proxy}\nadmin: 127.0.0.1:{admin}\nlimits: {{ admin_max_connections: 16 }}\ntimeouts: {{ client_header: 3s, client_idle: 3s }}\nstate_dir: state\nservices:\n  - name: hello\n    hosts: [hello.test]\n    backend:\n      process:\n        command: {}\n        address: 127.0.0.1:{backend}\n",
        demo_command(backend, "0s")
    );
    let (_reveille, _dir) = serve_with_fd_limit("starve", &config, 128);
    let (proxy, admin): (SocketAddr, SocketAddr) = (
        ([127, 0, 0, 1], proxy).into(),
        ([127, 0, 0, 1], admin).into(),
    );
    wait_until("admin answers", Duration::from_secs(20), || async {
        healthz(admin).await == Some(200)
    })
    .await;

    // More idle connections than the process has descriptors.
    let mut idle = idle_connections(admin, 200).await;
    let opened = Instant::now();
    // All 16 slots are taken: a new admin connection is closed without an answer...
    assert_eq!(healthz(admin).await, None, "admin answered over its limit");
    // ...and the proxy still accepts and serves.
    let c = client();
    let resp = tokio::time::timeout(Duration::from_secs(10), get(&c, proxy, "hello.test", "/"))
        .await
        .expect("the proxy answers while the admin port is flooded");
    assert_eq!(resp.status, 200, "{resp:?}");

    // The idle ones are closed after `client_header`; the admin port answers again.
    for s in &mut idle {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("an idle admin connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0, "no bytes on an idle connection");
    }
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_millis(2500),
        "closed before the header timeout: {waited:?}"
    );
    wait_until("healthz answers again", Duration::from_secs(5), || async {
        healthz(admin).await == Some(200)
    })
    .await;
    let metrics = get(&c, admin, "admin", "/metrics").await.body;
    let rejected = metric(
        &metrics,
        "reveille_rejected_total{reason=\"admin_max_connections\",service=\"\"}",
    )
    .unwrap_or_else(|| panic!("no admin_max_connections count in\n{metrics}"));
    assert!(
        rejected >= 184.0,
        "200 idle + 1 over a limit of 16, counted {rejected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_accepts_back_off_instead_of_spinning() {
    let (proxy, admin) = (free_port(), free_port());
    let config = format!(
        "listen: 127.0.0.1:{proxy}\nadmin: 127.0.0.1:{admin}\nlimits: {{ admin_max_connections: 1000 }}\ntimeouts: {{ client_header: 60s }}\nservices:\n  - name: hello\n    hosts: [hello.test]\n    backend: {{ static: {{ addresses: [\"127.0.0.1:1\"] }} }}\n"
    );
    let (_reveille, _dir) = serve_with_fd_limit("backoff", &config, 64);
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    wait_until("admin answers", Duration::from_secs(20), || async {
        healthz(admin).await == Some(200)
    })
    .await;
    // About 50 are accepted before descriptors run out; the rest wait in the kernel's queue
    // and every `accept` of them fails with EMFILE.
    let idle = idle_connections(admin, 100).await;
    let start = Instant::now();
    // The window measured: how often accept was tried while it could only fail.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(idle);
    let c = client();
    wait_until(
        "admin answers after the flood",
        Duration::from_secs(10),
        || async { healthz(admin).await == Some(200) },
    )
    .await;
    let window = start.elapsed().as_secs_f64();
    let metrics = get(&c, admin, "admin", "/metrics").await.body;
    let errors = metric(&metrics, "reveille_accept_errors_total{listener=\"admin\"}")
        .unwrap_or_else(|| panic!("no accept error count in\n{metrics}"));
    // 5 ms doubling to 1 s gives about 10 in 3 s; a fixed 20 ms pause gave about 150.
    assert!(errors >= 3.0, "EMFILE was hit: {errors} errors");
    assert!(
        errors / window < 15.0,
        "{errors} accept errors in {window:.1}s: not backing off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_over_the_cap_get_503_at_once_and_slots_come_back() {
    let r = start(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nlimits: { admin_max_long_polls: 2 }\nservices:\n  - name: hello\n    hosts: [hello.test]\n    backend: { static: { addresses: [\"127.0.0.1:1\"] } }\n",
    )
    .await;
    let c = client();
    let admin = r.admin_addr;
    let long = "/api/local?wait=hello&since=0&timeout_ms=3000";
    let polls: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { get(&c, admin, "admin", long).await })
        })
        .collect();
    let short = "/api/local?wait=hello&since=0&timeout_ms=1";
    // Looked at through the gauge: a probing poll would take a slot itself.
    let polling = |n: f64| {
        let c = c.clone();
        async move {
            let text = get(&c, admin, "admin", "/metrics").await.body;
            metric(&text, "reveille_admin_long_polls") == Some(n)
        }
    };
    wait_until("both slots taken", Duration::from_secs(5), || polling(2.0)).await;
    let t = Instant::now();
    let over = get(&c, admin, "admin", long).await;
    // At once, not after the poll's 3 s (generous for a loaded machine).
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "503 came after {:?}",
        t.elapsed()
    );
    assert_eq!(over.status, 503);
    assert_eq!(over.header("retry-after"), Some("1"));
    assert_eq!(over.body.lines().count(), 1, "{:?}", over.body);
    assert!(
        over.body.contains("admin_max_long_polls"),
        "{:?}",
        over.body
    );
    // A plain read of the counts is no long-poll: it is answered.
    assert_eq!(get(&c, admin, "admin", "/api/local").await.status, 200);
    for p in polls {
        assert_eq!(p.await.unwrap().status, 200);
    }
    // Their slots are free again.
    wait_until("slots free", Duration::from_secs(5), || polling(0.0)).await;
    assert_eq!(get(&c, admin, "admin", short).await.status, 200);

    // A client that goes away frees its slot at once, not when its poll would have ended.
    let mut gone = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(admin).await.unwrap();
        let req = "GET /api/local?wait=hello&since=0&timeout_ms=30000 HTTP/1.1\r\nHost: a\r\n\r\n";
        s.write_all(req.as_bytes()).await.unwrap();
        gone.push(s);
    }
    wait_until("both slots taken again", Duration::from_secs(5), || {
        polling(2.0)
    })
    .await;
    assert_eq!(get(&c, admin, "admin", short).await.status, 503);
    drop(gone);
    let t = Instant::now();
    wait_until(
        "freed by the clients leaving",
        Duration::from_secs(5),
        || polling(0.0),
    )
    .await;
    assert_eq!(get(&c, admin, "admin", short).await.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    stop(r).await;
}

/// Reads one response head and what follows of it (the admin answers are small).
async fn answer(s: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// How long until the server closes `s` (it sends nothing more).
async fn closed_after(s: &mut TcpStream) -> Duration {
    let t = Instant::now();
    let mut b = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "no bytes expected");
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_connection_is_closed_after_client_idle_and_a_begun_head_after_client_header() {
    let get_healthz = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n";
    // Idle after an answer: `client_idle` (short), not `client_header` (long).
    let r = start(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntimeouts: { client_header: 10s, client_idle: 400ms }\nservices:\n  - name: hello\n    hosts: [hello.test]\n    backend: { static: { addresses: [\"127.0.0.1:1\"] } }\n",
    )
    .await;
    let mut s = TcpStream::connect(r.admin_addr).await.unwrap();
    s.write_all(get_healthz).await.unwrap();
    assert!(answer(&mut s).await.starts_with("HTTP/1.1 200"));
    let idle = closed_after(&mut s).await;
    assert!(
        idle >= Duration::from_millis(300) && idle < Duration::from_secs(3),
        "idle connection closed after {idle:?}"
    );
    stop(r).await;

    // A head begun after an answer: `client_header` (short), not `client_idle` (long).
    let r = start(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntimeouts: { client_header: 400ms, client_idle: 10s }\nservices:\n  - name: hello\n    hosts: [hello.test]\n    backend: { static: { addresses: [\"127.0.0.1:1\"] } }\n",
    )
    .await;
    let mut s = TcpStream::connect(r.admin_addr).await.unwrap();
    s.write_all(get_healthz).await.unwrap();
    assert!(answer(&mut s).await.starts_with("HTTP/1.1 200"));
    // Idle longer than client_header: still open.
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.write_all(b"GET /healthz HTT").await.unwrap();
    let head = closed_after(&mut s).await;
    assert!(
        head >= Duration::from_millis(300) && head < Duration::from_secs(3),
        "a begun head closed after {head:?}"
    );
    stop(r).await;
}
