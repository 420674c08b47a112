//! A small demo backend, built into the binary (`reveille demo-backend`) so the example config
//! works with nothing else installed. It waits `--startup-delay` before it listens, which makes
//! a cold start visible, and has a few endpoints tests use to see what reached it:
//!
//! - `/_demo/log`: every other request it served so far, one `METHOD path` per line, in order;
//! - `/_demo/sleep?ms=N`: answers after N milliseconds;
//! - `/_demo/echo`: streams the request body back;
//! - `/_demo/headers`: the request's headers, one `name: value` per line;
//! - `/_demo/exit`: answers, then exits with status 3 (a crash);
//! - `/_demo/upgrade` with `Connection: upgrade`: switches protocols and echoes raw bytes;
//! - anything else: `hello from NAME (pid P): METHOD PATH`, with headers showing what arrived:
//!   `x-demo-host`, `x-demo-forwarded-for`, `x-demo-forwarded-proto`, and `x-demo-echo` (the
//!   request's `x-demo-echo` value, byte for byte).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use tokio::net::TcpListener;

/// Options of `reveille demo-backend`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Time to wait before listening (a slow start).
    pub startup_delay: Duration,
    /// Name shown in answers.
    pub name: String,
}

type DemoBody = BoxBody<Bytes, hyper::Error>;

/// Runs the demo backend until the process is stopped.
pub async fn run(opts: DemoOptions) -> std::io::Result<()> {
    tokio::time::sleep(opts.startup_delay).await;
    let listener = TcpListener::bind(opts.listen).await?;
    eprintln!(
        "demo backend {:?} (pid {}) listening on {}",
        opts.name,
        std::process::id(),
        listener.local_addr()?
    );
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let name: Arc<str> = opts.name.into();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let log = log.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(req, log.clone(), name.clone()));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Switches to the protocol asked for and echoes what comes on the upgraded connection.
fn upgrade_echo(mut req: Request<Incoming>) -> Response<DemoBody> {
    let proto = req.headers()[http::header::UPGRADE].clone();
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(io) = on.await {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    r.headers_mut().insert(http::header::UPGRADE, proto);
    r
}

/// The greeting, with what the backend saw of the proxy's fields echoed back as `x-demo-*`.
fn hello(
    req: &Request<Incoming>,
    name: &str,
    method: &http::Method,
    path: &str,
) -> Response<DemoBody> {
    let field = |n: &str| req.headers().get(n).cloned();
    let mut r = Response::new(full(format!(
        "hello from {name} (pid {}): {method} {path}\n",
        std::process::id()
    )));
    let h = r.headers_mut();
    h.insert("x-demo-pid", std::process::id().into());
    let copies = [
        ("host", "x-demo-host"),
        ("x-forwarded-for", "x-demo-forwarded-for"),
        ("x-forwarded-proto", "x-demo-forwarded-proto"),
        ("x-demo-echo", "x-demo-echo"),
    ];
    for (from, to) in copies {
        if let Some(v) = field(from) {
            h.insert(to, v);
        }
    }
    r
}

fn full(s: impl Into<Bytes>) -> DemoBody {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

async fn answer(
    req: Request<Incoming>,
    log: Arc<Mutex<Vec<String>>>,
    name: Arc<str>,
) -> Result<Response<DemoBody>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path != "/_demo/log" {
        log.lock().push(format!("{method} {}", req.uri()));
    }
    let resp = match path.as_str() {
        "/_demo/log" => {
            let mut text = log.lock().join("\n");
            text.push('\n');
            Response::new(full(text))
        }
        "/_demo/sleep" => {
            let ms = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("ms="))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full(format!("slept {ms}ms\n")))
        }
        "/_demo/echo" => Response::new(req.into_body().boxed()),
        "/_demo/headers" => {
            let mut text = String::new();
            for (k, v) in req.headers() {
                text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            Response::new(full(text))
        }
        "/_demo/upgrade" if req.headers().contains_key(http::header::UPGRADE) => {
            return Ok(upgrade_echo(req));
        }
        "/_demo/exit" => {
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                std::process::exit(3);
            });
            Response::new(full("exiting\n"))
        }
        _ => hello(&req, &name, &method, &path),
    };
    let mut resp = resp;
    if resp.status() == StatusCode::OK {
        resp.headers_mut().insert(
            "x-demo-name",
            name.as_ref()
                .parse()
                .unwrap_or(http::HeaderValue::from_static("demo")),
        );
    }
    Ok(resp)
}
