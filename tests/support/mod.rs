//! Builders for integration tests: a Reveille started in-process on port 0, the built-in demo
//! backend as a real child process, and a small HTTP client.
#![allow(dead_code)]

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub mod load;

pub use reveille::Running;

/// The reveille binary built for this test run (for `loadtests/`, run as examples, the release
/// build: `cargo build --release --bins --examples`).
pub const BIN: &str = match option_env!("CARGO_BIN_EXE_reveille") {
    Some(p) => p,
    None => concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/reveille"),
};

/// A loopback port that was free a moment ago, for a backend process to listen on later.
///
/// Taken below Linux's ephemeral range (32768+), which every `bind(…:0)` and outgoing
/// connection draws from: a port picked there could be handed to another test's listener
/// before our backend binds it. Within one test binary a shared counter never repeats a port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        1 + (std::process::id() % SPAN as u32) as u16,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The YAML flow list of a demo backend command.
pub fn demo_command(port: u16, startup_delay: &str) -> String {
    format!(
        "[\"{BIN}\", demo-backend, --listen, \"127.0.0.1:{port}\", --startup-delay, \"{startup_delay}\"]"
    )
}

/// A one-service config with a demo process backend; `extra` is appended to the service
/// (indented under it, e.g. `"queue: { capacity: 5 }"` lines).
pub fn process_config(port: u16, startup_delay: &str, extra: &[&str]) -> String {
    let mut s = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: hello\n    hosts: [hello.test]\n    backend:\n      process:\n        command: {}\n        address: 127.0.0.1:{port}\n        stop_grace: 2s\n",
        demo_command(port, startup_delay)
    );
    for line in extra {
        s.push_str("    ");
        s.push_str(line);
        s.push('\n');
    }
    s
}

/// Starts Reveille in-process.
pub async fn start(yaml: &str) -> Running {
    let cfg =
        reveille::Config::parse(yaml).unwrap_or_else(|e| panic!("bad test config: {e}\n{yaml}"));
    reveille::start(cfg).await.expect("start reveille")
}

/// Shuts Reveille down and waits (stops its child processes).
pub async fn stop(r: Running) {
    r.shutdown();
    tokio::time::timeout(Duration::from_secs(30), r.wait())
        .await
        .expect("shutdown within 30s");
}

/// The first service's routed endpoint addresses, sorted.
pub fn routed(r: &Running) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = r.gates()[0].endpoints().iter().map(|e| e.addr).collect();
    v.sort();
    v
}

/// The admin `/metrics` text.
pub async fn metrics_text(c: &TestClient, r: &Running) -> String {
    get(c, r.admin_addr, "admin", "/metrics").await.body
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    pub raw: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled HTTP/1.1 client.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http()
}

/// Sends a request to `addr` with Host `host`.
pub async fn send(
    c: &TestClient,
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> Resp {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", host)
        .body(Full::new(body.into()))
        .unwrap();
    let resp = c.request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        raw: body,
    }
}

/// GET with Host `host`.
pub async fn get(c: &TestClient, addr: SocketAddr, host: &str, path: &str) -> Resp {
    send(c, addr, "GET", host, path, Bytes::new()).await
}

/// Polls `cond` every 5 ms until it holds, or panics after `within`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether a process with this pid is alive (signal 0).
pub fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// Processes whose command line contains `needle` (as one argument).
pub fn pids_with_arg(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            if cmd.split(|b| *b == 0).any(|a| a == needle.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

/// The value of a metric line (exact series) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}
pub mod keda;

/// The kernel's TCP states (`/proc/net/tcp`, e.g. `0x01` ESTABLISHED, `0x08` CLOSE_WAIT) of
/// this machine's IPv4 sockets connected to `peer`: for a backend address, the states of
/// Reveille's connections to it. CLOSE_WAIT means the backend's close (FIN) has arrived.
pub fn tcp_states_to(peer: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(v4) = peer else {
        panic!("IPv4 only: {peer}");
    };
    // Addresses are printed as the in-memory u32 in hex (little-endian here), ports as numbers.
    let [a, b, c, d] = v4.ip().octets();
    let want = format!("{d:02X}{c:02X}{b:02X}{a:02X}:{:04X}", v4.port());
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, _, remote, state) = (f.next()?, f.next()?, f.next()?, f.next()?);
            (remote == want).then(|| u8::from_str_radix(state, 16).ok())?
        })
        .collect()
}

/// TCP state ESTABLISHED in [`tcp_states_to`].
pub const TCP_ESTABLISHED: u8 = 0x01;

/// Whether every connection to `peer` that is still open on this side has received the peer's
/// close: none is ESTABLISHED any more (CLOSE_WAIT, or closed on this side too).
///
/// Tests waiting for a backend's close to reach Reveille's pooled connection wait on this:
/// once the FIN is in the kernel, the next request Reveille reads comes through the same
/// reactor after it, so the close is visible (readiness) by the time the pool is asked.
pub fn close_arrived_from(peer: SocketAddr) -> bool {
    !tcp_states_to(peer).contains(&TCP_ESTABLISHED)
}
