//! Fault scenarios shared by the integration tests (small counts) and `loadtests/faults.rs`
//! (large counts). Each sends a bounded number of requests to loopback and tallies what came
//! back: answered by status, refused (never accepted), and lost (accepted, never answered).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// What a scenario's requests got.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub sent: usize,
    pub by_status: BTreeMap<u16, usize>,
    /// Reveille's own refusals by `x-reveille-error` kind (`queue_full`, ...).
    pub by_kind: BTreeMap<String, usize>,
    /// Connections refused before a request could be sent (listener closed).
    pub refused: usize,
    /// Requests sent that never got a response.
    pub lost: usize,
}

impl Tally {
    pub fn count(&self, status: u16) -> usize {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    pub fn answered(&self) -> usize {
        self.by_status.values().sum()
    }

    fn add(&mut self, r: Outcome) {
        self.sent += 1;
        match r {
            Outcome::Status(s, kind) => {
                *self.by_status.entry(s).or_default() += 1;
                if let Some(kind) = kind {
                    *self.by_kind.entry(kind).or_default() += 1;
                }
            }
            Outcome::Refused => self.refused += 1,
            Outcome::Lost => self.lost += 1,
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sent {}, answered {} (", self.sent, self.answered())?;
        for (i, (s, n)) in self.by_status.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{s}: {n}")?;
        }
        write!(f, ")")?;
        if !self.by_kind.is_empty() {
            let kinds: Vec<String> = self
                .by_kind
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            write!(f, " [Reveille's refusals: {}]", kinds.join(", "))?;
        }
        write!(f, ", refused {}, lost {}", self.refused, self.lost)
    }
}

enum Outcome {
    /// The status, and Reveille's `x-reveille-error` kind when Reveille itself answered.
    Status(u16, Option<String>),
    Refused,
    Lost,
}

/// One request on its own connection (so a refused connect is told apart from a lost answer).
async fn one(addr: SocketAddr, host: &str, method: &str, path: &str, body: Bytes) -> Outcome {
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(_) => return Outcome::Refused,
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(_) => return Outcome::Refused,
        };
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(body))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(60), sender.send_request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let kind = resp
                .headers()
                .get("x-reveille-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match resp.into_body().collect().await {
                Ok(_) => Outcome::Status(status, kind),
                Err(_) => Outcome::Lost,
            }
        }
        _ => Outcome::Lost,
    }
}

/// Sends `n` requests at once and tallies them.
pub async fn burst(
    addr: SocketAddr,
    host: &str,
    n: usize,
    path: impl Fn(usize) -> String,
) -> Tally {
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (host, path) = (host.to_string(), path(i));
        tasks.push(tokio::spawn(async move {
            one(addr, &host, "GET", &path, Bytes::new()).await
        }));
    }
    let mut t = Tally::default();
    for task in tasks {
        t.add(task.await.unwrap_or(Outcome::Lost));
    }
    t
}

/// The backend is killed (SIGKILL) while held requests drain into it. Idempotent requests that
/// were cut off are retried, held again, and answered by the restarted backend.
pub async fn backend_killed_during_drain(n: usize) -> Tally {
    let port = free_port();
    let r = start(&process_config(
        port,
        "300ms",
        &[
            "concurrency: 4",
            "queue: { capacity: 100000, timeout: 60s }",
        ],
    ))
    .await;
    let addr = r.proxy_addr;
    let gate = r.gates()[0].clone();
    let run = tokio::spawn(burst(addr, "hello.test", n, |i| {
        format!("/_demo/sleep?ms={}", 5 + i % 10)
    }));
    // Kill it once some requests went through.
    wait_until("draining", Duration::from_secs(30), || {
        let g = gate.clone();
        async move { g.requests_total() as usize >= n && g.in_flight() > 0 }
    })
    .await;
    let c = client();
    let resp = get(&c, addr, "hello.test", "/pid").await;
    let pid: i32 = resp.header("x-demo-pid").unwrap().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = run.await.unwrap();
    stop(r).await;
    t
}

/// A backend that resets a share of its connections before answering.
pub async fn flaky_backend(reset_one_in: u32) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut k: u32 = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            k = k.wrapping_mul(1103515245).wrapping_add(12345);
            let reset = (k >> 16).is_multiple_of(reset_one_in);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if reset {
                        // RST: linger 0, then drop. (Deprecated because a non-zero linger blocks
                        // on drop; zero does not.)
                        #[allow(deprecated)]
                        let _ = s.set_linger(Some(Duration::ZERO));
                        return;
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    addr
}

/// Requests through a static service whose backend resets connections at random.
pub async fn backend_resets_at_random(n: usize) -> Tally {
    let backends = [flaky_backend(3).await, flaky_backend(3).await];
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: hello\n    hosts: [hello.test]\n    backend: {{ static: {{ addresses: [{}, {}] }} }}\n",
        backends[0], backends[1]
    );
    let r = start(&yaml).await;
    let t = burst(r.proxy_addr, "hello.test", n, |i| format!("/flaky/{i}")).await;
    stop(r).await;
    t
}

/// `n` requests at once at a cold service whose queue holds `capacity` of them, while its
/// backend takes `startup` to come up: the queue bound refuses what it cannot hold (`503`,
/// `queue_full`, with `Retry-After`) and memory stays bounded; what it holds is answered.
pub async fn burst_beyond_the_queue(n: usize, capacity: usize, startup: &str) -> Tally {
    let port = free_port();
    let queue = format!("queue: {{ capacity: {capacity}, timeout: 60s }}");
    let r = start(&process_config(port, startup, &[&queue])).await;
    let t = burst(r.proxy_addr, "hello.test", n, |i| format!("/over/{i}")).await;
    stop(r).await;
    t
}

/// `slow` clients trickle their headers one byte at a time while `n` normal requests go through.
/// Returns the normal requests' tally and how many slow connections Reveille closed.
pub async fn slowloris(slow: usize, n: usize) -> (Tally, usize) {
    let port = free_port();
    // The queue holds the whole burst: this scenario is about slow clients, not the queue
    // bound (a burst of more than the default 1,000 at a cold service meets that bound; see
    // [`burst_beyond_the_queue`]).
    let yaml = process_config(port, "0s", &["queue: { capacity: 100000, timeout: 60s }"])
        .replace("services:", "timeouts: { client_header: 1s }\nservices:");
    let r = start(&yaml).await;
    let addr = r.proxy_addr;
    let stop_slow = Arc::new(AtomicBool::new(false));
    // Slow clients that tried to connect (and, connected, are trickling).
    let started = Arc::new(AtomicUsize::new(0));
    let mut slow_tasks = Vec::new();
    for _ in 0..slow {
        let (stop_slow, started) = (stop_slow.clone(), started.clone());
        slow_tasks.push(tokio::spawn(async move {
            let connected = TcpStream::connect(addr).await;
            started.fetch_add(1, Ordering::SeqCst);
            let Ok(mut s) = connected else {
                return false;
            };
            let head = b"GET / HTTP/1.1\r\nHost: hello.test\r\nX-Slow: ";
            for b in head.iter().chain(std::iter::repeat(&b'a')) {
                if stop_slow.load(Ordering::Relaxed) {
                    return false;
                }
                if s.write_all(&[*b]).await.is_err() {
                    return true; // closed by Reveille
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            false
        }));
    }
    // The normal requests go once every slow client is in (bounded: a machine that cannot
    // connect them all in 30 s sends the burst anyway).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while started.load(Ordering::SeqCst) < slow && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = burst(addr, "hello.test", n, |i| format!("/normal/{i}")).await;
    // The header timeout (1 s) closes the slow ones: wait until each has seen its close
    // (bounded), then stop any survivor (counted as not closed).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !slow_tasks.iter().all(|t| t.is_finished()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_slow.store(true, Ordering::Relaxed);
    let mut closed = 0;
    for task in slow_tasks {
        if task.await.unwrap_or(false) {
            closed += 1;
        }
    }
    stop(r).await;
    (t, closed)
}

/// Reveille (the binary) gets SIGTERM in the middle of a burst during a cold start. Requests
/// it accepted are all answered; later ones are refused at connect, never lost.
pub async fn sigterm_during_burst(n: usize) -> (Tally, Option<i32>) {
    let (proxy, admin, backend) = (free_port(), free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("reveille-faults-{}-{proxy}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sigterm.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:{proxy}\nadmin: 127.0.0.1:{admin}\nshutdown: {{ delay: 0s, grace: 30s }}\nservices:\n  - name: hello\n    hosts: [hello.test]\n    queue: {{ capacity: 100000, timeout: 60s }}\n    backend:\n      process:\n        command: {}\n        address: 127.0.0.1:{backend}\n",
            demo_command(backend, "500ms")
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], proxy).into();
    wait_until("reveille listening", Duration::from_secs(10), || async {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;
    let pid = child.id().unwrap() as i32;
    // Spread the requests over ~1 s; SIGTERM halfway.
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        if i == n / 2 {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
        }
        tasks.push(tokio::spawn(async move {
            one(addr, "hello.test", "GET", &format!("/t/{i}"), Bytes::new()).await
        }));
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(1000 * 10 / n.max(10) as u64)).await;
        }
    }
    let mut t = Tally::default();
    for task in tasks {
        t.add(task.await.unwrap_or(Outcome::Lost));
    }
    let code = tokio::time::timeout(Duration::from_secs(40), child.wait())
        .await
        .ok()
        .and_then(|s| s.ok())
        .and_then(|s| s.code());
    (t, code)
}

/// A burst during a cold start while the service's queue settings are changed again and again
/// (each reload replaces its gate and driver): held requests follow the service, none is lost.
pub async fn reload_during_burst(n: usize) -> Tally {
    let port = free_port();
    let yaml = |capacity: usize| {
        process_config(
            port,
            "300ms",
            &[&format!("queue: {{ capacity: {capacity}, timeout: 60s }}")],
        )
    };
    let first = reveille::Config::parse(&yaml(100_000)).unwrap();
    let r = reveille::start(first.clone()).await.unwrap();
    let addr = r.proxy_addr;
    let run = tokio::spawn(burst(addr, "hello.test", n, |i| format!("/reload/{i}")));
    for k in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let next = reveille::Config::parse(&yaml(100_000 - k - 1)).unwrap();
        r.reload(&next, &first).await;
    }
    let t = run.await.unwrap();
    stop(r).await;
    t
}
