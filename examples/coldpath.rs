//! Cold-path measurements, run by `loadtests/run.sh` (each prints one JSON object):
//!
//! - `wake`: wake-up overhead with the process backend and its TCP readiness probe. Reveille
//!   runs in-process; its backend is the `origin` example started on demand with `--stamp`. One
//!   request wakes it; the origin reports when it started listening and when the request reached
//!   it (CLOCK_MONOTONIC, comparable across processes); the difference is Reveille's overhead.
//!   A tiny idle timeout stops the backend so the next run wakes it again.
//! - `watch`: the same overhead when readiness is pushed as an event (as a Kubernetes
//!   EndpointSlice watch does): a held request, an origin that starts listening, and
//!   `Gate::set_endpoints` called at once; timed from the listen to the request's arrival.
//! - `burst`: N concurrent connections, each one request, all held during one cold start of a
//!   separate `reveille serve` process; every answer is checked, and Reveille's RSS is read
//!   from /proc before the burst, while all are held, and at its peak (VmHWM). The kernel's
//!   listen-queue counters (overflows, SYN retries, resets; machine-wide) are reported as
//!   differences over the burst.
//! - `services`: memory of a `reveille serve` with N configured (idle) services against one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use reveille::gate::State;
use reveille::Config;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Wake-up overhead with the process backend (TCP probe).
    Wake {
        /// The origin example's binary.
        #[arg(long)]
        origin: PathBuf,
        /// Wake-ups to measure.
        #[arg(long, default_value_t = 60)]
        runs: usize,
    },
    /// Wake-up overhead when readiness arrives as an event (set_endpoints).
    Watch {
        /// Wake-ups to measure.
        #[arg(long, default_value_t = 200)]
        runs: usize,
    },
    /// N concurrent held requests during one cold start of a `reveille serve` process.
    Burst {
        /// The reveille binary.
        #[arg(long)]
        reveille: PathBuf,
        /// The origin example's binary.
        #[arg(long)]
        origin: PathBuf,
        /// Concurrent connections, one request each.
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// How long the backend takes to start.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        startup_delay: Duration,
        /// Reveille's worker threads.
        #[arg(long, default_value_t = 1)]
        workers: usize,
    },
    /// Memory of N configured idle services.
    Services {
        /// The reveille binary.
        #[arg(long)]
        reveille: PathBuf,
        /// Services to configure.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let out = rt.block_on(async {
        match args.cmd {
            Cmd::Wake { origin, runs } => wake(origin, runs).await,
            Cmd::Watch { runs } => watch(runs).await,
            Cmd::Burst {
                reveille,
                origin,
                conns,
                startup_delay,
                workers,
            } => burst(reveille, origin, conns, startup_delay, workers).await,
            Cmd::Services { reveille, count } => services(reveille, count).await,
        }
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}

/// p50, p90, p99, max (and mean) of samples in microseconds.
fn summary(mut us: Vec<f64>) -> serde_json::Value {
    us.sort_by(f64::total_cmp);
    let pick = |q: f64| us[((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1];
    json!({
        "n": us.len(),
        "p50_us": pick(0.50),
        "p90_us": pick(0.90),
        "p99_us": pick(0.99),
        "max_us": us[us.len() - 1],
        "mean_us": us.iter().sum::<f64>() / us.len() as f64,
    })
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn header_u64(resp: &Response<Incoming>, name: &str) -> u64 {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("origin answered without {name}"))
}

async fn wake(origin: PathBuf, runs: usize) -> serde_json::Value {
    let backend = free_port();
    let yaml = format!(
        r#"listen: 127.0.0.1:0
admin: 127.0.0.1:0
services:
  - name: wake
    hosts: [wake.local]
    idle_timeout: 20ms
    backend:
      process:
        command: ["{}", --listen, "{backend}", --stamp]
        address: "{backend}"
        stop_grace: 1s
"#,
        origin.display()
    );
    let running = reveille::start(Config::parse(&yaml).expect("config"))
        .await
        .expect("start");
    let gate = running.gates()[0].clone();
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Empty<Bytes>>();
    let (mut overhead, mut total, mut activation) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t0 = Instant::now();
        let req = Request::get(format!("http://{}/", running.proxy_addr))
            .header("host", "wake.local")
            .body(Empty::new())
            .expect("request");
        let resp = client.request(req).await.expect("answer");
        assert!(resp.status().is_success(), "{}", resp.status());
        let listen = header_u64(&resp, "x-origin-listen-ns");
        let recv = header_u64(&resp, "x-origin-recv-ns");
        let _ = resp.into_body().collect().await;
        total.push(t0.elapsed().as_secs_f64() * 1e6);
        overhead.push((recv - listen) as f64 / 1e3);
        if let Some(a) = gate.last_activation() {
            activation.push(a.as_secs_f64() * 1e6);
        }
        // Idle → the backend is stopped; wait until it is gone before the next wake-up.
        tokio::time::sleep(Duration::from_millis(30)).await;
        while gate.state() != State::Idle {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    running.shutdown();
    json!({
        "what": "wake-up overhead, process backend, TCP probe (default interval 2ms)",
        "overhead_listen_to_first_request": summary(overhead),
        "cold_request_total": summary(total),
        "activation_spawn_to_ready": summary(activation),
    })
}

/// A tiny in-process origin that records when its first request arrived.
async fn stamped_origin(listener: TcpListener, first: Arc<Mutex<Option<Instant>>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let first = first.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<Incoming>| {
                first.lock().get_or_insert_with(Instant::now);
                async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"ok\n",
                    ))))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn watch(runs: usize) -> serde_json::Value {
    let yaml = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: watch\n    hosts: [watch.local]\n    backend:\n      static:\n        addresses: [\"127.0.0.1:9\"]\n";
    let running = reveille::start(Config::parse(yaml).expect("config"))
        .await
        .expect("start");
    let gate = running.gates()[0].clone();
    while gate.state() != State::Ready {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gate.set_endpoints(&[]);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Empty<Bytes>>();
    let mut overhead = Vec::new();
    for _ in 0..runs {
        let req = Request::get(format!("http://{}/", running.proxy_addr))
            .header("host", "watch.local")
            .body(Empty::new())
            .expect("request");
        let pending = tokio::spawn(client.request(req));
        while gate.held() == 0 {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // A new backend on a new port: no pooled connection can be reused.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let ready = Instant::now();
        let first = Arc::new(Mutex::new(None));
        let server = tokio::spawn(stamped_origin(listener, first.clone()));
        gate.set_endpoints(&[addr]);
        let resp = pending.await.expect("task").expect("answer");
        assert!(resp.status().is_success());
        let arrived = first.lock().expect("the request reached the origin");
        overhead.push(arrived.duration_since(ready).as_secs_f64() * 1e6);
        gate.set_endpoints(&[]);
        server.abort();
    }
    running.shutdown();
    json!({
        "what": "wake-up overhead, readiness pushed as an event (set_endpoints), in-process",
        "overhead_listen_to_first_request": summary(overhead),
    })
}

/// A `reveille serve` child process; killed on drop.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        // SIGTERM, so that Reveille stops the backend it started; SIGKILL only as a fallback.
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_serve(reveille: &PathBuf, config: &str, workers: usize) -> (Serve, u32) {
    let path = std::env::temp_dir().join(format!("reveille-coldpath-{}.yaml", std::process::id()));
    std::fs::write(&path, config).expect("write config");
    let child = Command::new(reveille)
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--workers", &workers.to_string()])
        .env("REVEILLE_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("run reveille");
    let pid = child.id();
    (Serve(child), pid)
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A one-shot HTTP/1.1 GET; the whole answer.
async fn get(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn wait_ready(admin: SocketAddr) -> Duration {
    let t0 = Instant::now();
    loop {
        if let Ok(a) = get(admin, "admin", "/readyz").await {
            if a.starts_with("HTTP/1.1 200") {
                return t0.elapsed();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "reveille did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of an unlabelled-but-for-service metric line in the exposition.
async fn metric(admin: SocketAddr, prefix: &str) -> Option<f64> {
    let text = get(admin, "admin", "/metrics").await.ok()?;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Kernel TCP counters (`/proc/net/netstat`, `/proc/net/snmp`) that tell what a burst did to
/// the listen queues: overflows (a SYN or a handshake's last ACK dropped), SYN retries,
/// syncookies, resets of established connections. Machine-wide, so other traffic counts too.
const KERNEL_COUNTERS: [&str; 8] = [
    "TcpExt:ListenOverflows",
    "TcpExt:ListenDrops",
    "TcpExt:TCPSynRetrans",
    "TcpExt:TCPTimeouts",
    "TcpExt:SyncookiesSent",
    "TcpExt:SyncookiesFailed",
    "Tcp:EstabResets",
    "Tcp:AttemptFails",
];

/// The [`KERNEL_COUNTERS`] now (an empty map where /proc/net is not readable).
fn kernel_counters() -> std::collections::BTreeMap<&'static str, u64> {
    let mut out = std::collections::BTreeMap::new();
    for file in ["/proc/net/netstat", "/proc/net/snmp"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        // Pairs of lines: "Prefix: name name ..." then "Prefix: value value ...".
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let (Some((prefix, names)), Some((_, values))) =
                (names.split_once(' '), values.split_once(' '))
            else {
                continue;
            };
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                let key = format!("{prefix}{name}");
                if let Some(k) = KERNEL_COUNTERS.iter().find(|k| **k == key) {
                    if let Ok(v) = value.parse() {
                        out.insert(*k, v);
                    }
                }
            }
        }
    }
    out
}

async fn burst(
    reveille: PathBuf,
    origin: PathBuf,
    conns: usize,
    startup_delay: Duration,
    workers: usize,
) -> serde_json::Value {
    let (listen, admin, backend) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"listen: "{listen}"
admin: "{admin}"
services:
  - name: burst
    hosts: [burst.local]
    queue: {{ capacity: {cap}, timeout: 120s }}
    concurrency: 256
    backend:
      process:
        command: ["{origin}", --listen, "{backend}", --startup-delay, "{delay}ms"]
        address: "{backend}"
        stop_grace: 1s
"#,
        cap = conns * 2,
        origin = origin.display(),
        delay = startup_delay.as_millis(),
    );
    let (_serve, pid) = spawn_serve(&reveille, &config, workers);
    wait_ready(admin).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = proc_kib(pid, "VmRSS");
    let counters_before = kernel_counters();
    let t0 = Instant::now();
    // At most 512 connects in progress at once (the client's own sockets). This does not bound
    // the server's accept queue: a connect completes as soon as the kernel has queued the
    // connection, so the burst fills Reveille's listen backlog (`limits.listen_backlog`) as
    // fast as the client can connect, as a real burst would.
    let connecting = Arc::new(tokio::sync::Semaphore::new(512));
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let connecting = connecting.clone();
            tokio::spawn(async move {
                let permit = connecting.acquire_owned().await.expect("semaphore");
                let mut s = TcpStream::connect(listen).await?;
                s.write_all(b"GET / HTTP/1.1\r\nHost: burst.local\r\nConnection: close\r\n\r\n")
                    .await?;
                drop(permit);
                let mut out = Vec::new();
                s.read_to_end(&mut out).await?;
                if out.starts_with(b"HTTP/1.1 200") {
                    Ok(())
                } else {
                    // Not a 200: the status line (or "closed without a response").
                    let line = out.split(|b| *b == b'\r').next().unwrap_or_default();
                    Err(std::io::Error::other(if line.is_empty() {
                        "closed without a response".to_string()
                    } else {
                        String::from_utf8_lossy(line).into_owned()
                    }))
                }
            })
        })
        .collect();
    // Sample memory while requests are held; keep the sample with the most held.
    let (mut max_held, mut rss_at_max, mut all_held_after) = (0.0f64, rss_before, None);
    while t0.elapsed() < startup_delay + Duration::from_secs(60) {
        let held = metric(admin, "reveille_requests_held{")
            .await
            .unwrap_or(0.0);
        if held > max_held {
            max_held = held;
            rss_at_max = proc_kib(pid, "VmRSS");
        }
        if held as usize >= conns && all_held_after.is_none() {
            all_held_after = Some(t0.elapsed());
        }
        if held == 0.0 && max_held > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for t in tasks {
        match t.await {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                failed += 1;
                *reasons.entry(format!("{:?}: {e}", e.kind())).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                *reasons.entry(format!("task: {e}")).or_default() += 1;
            }
        }
    }
    let took = t0.elapsed();
    let kernel: std::collections::BTreeMap<_, _> = kernel_counters()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                v.saturating_sub(counters_before.get(k).copied().unwrap_or(v)),
            )
        })
        .collect();
    let hwm = proc_kib(pid, "VmHWM");
    let grew = rss_at_max.saturating_sub(rss_before);
    json!({
        "what": "burst of concurrent connections held during one cold start",
        "connections": conns,
        "answered_200": ok,
        "failed_or_lost": failed,
        "failure_reasons": reasons,
        "kernel_tcp_counters_during_burst": kernel,
        "max_held": max_held,
        "all_held_after_s": all_held_after.map(|d| d.as_secs_f64()),
        "backend_startup_delay_s": startup_delay.as_secs_f64(),
        "all_answered_after_s": took.as_secs_f64(),
        "rss_before_kib": rss_before,
        "rss_while_held_kib": rss_at_max,
        "peak_rss_vmhwm_kib": hwm,
        "rss_per_held_request_kib": if max_held > 0.0 { grew as f64 / max_held } else { 0.0 },
        "workers": workers,
    })
}

fn services_config(count: usize, listen: SocketAddr, admin: SocketAddr) -> String {
    let mut c = format!("listen: \"{listen}\"\nadmin: \"{admin}\"\nservices:\n");
    for i in 0..count {
        c.push_str(&format!(
            "  - name: svc-{i}\n    hosts: [svc-{i}.team-{}.example.com]\n    backend:\n      process:\n        command: [/bin/false]\n        address: \"127.{}.{}.{}:8080\"\n",
            i % 37,
            1 + i / 65536,
            (i / 256) % 256,
            i % 256,
        ));
    }
    c
}

async fn services(reveille: PathBuf, count: usize) -> serde_json::Value {
    let mut rows = Vec::new();
    for n in [1, count] {
        let (listen, admin) = (free_port(), free_port());
        let (serve, pid) = spawn_serve(&reveille, &services_config(n, listen, admin), 1);
        let started = wait_ready(admin).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        rows.push((n, proc_kib(pid, "VmRSS"), proc_kib(pid, "VmHWM"), started));
        drop(serve);
    }
    let (_, rss1, _, _) = rows[0];
    let (n, rss, hwm, started) = &rows[1];
    json!({
        "what": "memory of configured idle services (process backends)",
        "services": n,
        "rss_one_service_kib": rss1,
        "rss_kib": rss,
        "peak_rss_vmhwm_kib": hwm,
        "per_service_kib": (*rss as f64 - rss1 as f64) / (*n as f64 - 1.0),
        "start_to_ready_s": started.as_secs_f64(),
    })
}
