//! Hardening (issue 12), probed as an attacker would: raw bytes over TCP to a Reveille on
//! 127.0.0.1 with two services, `public` (`public.test`) and `internal` (`internal.test`,
//! `/private`), each in front of its own recording backend. Every test checks what the client
//! got and what (if anything) each backend received.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as a backend received it.
#[derive(Debug, Clone)]
struct Seen {
    /// The head, lowercased.
    head: String,
    body: Vec<u8>,
    /// The body ended where its framing said.
    complete: bool,
    /// The connection ended before the body did.
    cut: bool,
}

/// A backend that records every request and answers `ok` (or, for `/big`, 64 MiB; for an
/// `Upgrade: h2c` request, `101` as an h2c server would).
#[derive(Clone)]
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rec = Recorder { addr, seen };
        let r = rec.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(r.clone().serve(s));
            }
        });
        rec
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    async fn serve(self, mut s: TcpStream) {
        let mut buf = Vec::new();
        loop {
            let head_end = loop {
                if let Some(i) = find(&buf, b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 65536];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            buf.drain(..head_end);
            let idx = {
                let mut seen = self.seen.lock();
                seen.push(Seen {
                    head: head.clone(),
                    body: Vec::new(),
                    complete: false,
                    cut: false,
                });
                seen.len() - 1
            };
            let framing = if head.contains("transfer-encoding: chunked") {
                Some(None)
            } else {
                field(&head, "content-length").map(|v| Some(v.parse::<usize>().unwrap()))
            };
            let body = match framing {
                None | Some(Some(0)) => Some(Vec::new()),
                Some(Some(n)) => read_exact(&mut s, &mut buf, n).await,
                Some(None) => read_chunked(&mut s, &mut buf).await,
            };
            let Some(body) = body else {
                self.seen.lock()[idx].cut = true;
                return;
            };
            {
                let mut seen = self.seen.lock();
                seen[idx].body = body;
                seen[idx].complete = true;
            }
            if head.contains("upgrade: h2c") {
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n")
                    .await;
                return;
            }
            if head
                .split_whitespace()
                .nth(1)
                .is_some_and(|t| t.ends_with("/hang"))
            {
                // Never answers (the connection stays open until the test ends).
                std::future::pending::<()>().await;
            }
            if head.starts_with("get /big") {
                let size = 64 << 20;
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n").as_bytes(),
                    )
                    .await;
                let block = vec![b'x'; 1 << 20];
                for _ in 0..64 {
                    if s.write_all(&block).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A field's value in a lowercased head.
fn field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        (n.trim() == name).then(|| v.trim())
    })
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 65536];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

async fn read_exact(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Option<Vec<u8>> {
    while buf.len() < n {
        if !fill(s, buf).await {
            return None;
        }
    }
    Some(buf.drain(..n).collect())
}

/// A strict chunked decoder (the backend side): `None` when the body breaks or ends early.
async fn read_chunked(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = find(buf, b"\r\n") {
                break i;
            }
            if !fill(s, buf).await {
                return None;
            }
        };
        let line = String::from_utf8(buf[..line_end].to_vec()).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers (none expected), then the empty line.
            while find(buf, b"\r\n").is_none() {
                if !fill(s, buf).await {
                    return None;
                }
            }
            let end = find(buf, b"\r\n")?;
            buf.drain(..end + 2);
            return Some(body);
        }
        let data = read_exact(s, buf, size + 2).await?;
        if &data[size..] != b"\r\n" {
            return None;
        }
        body.extend_from_slice(&data[..size]);
    }
}

/// Two services, each on its own recording backend; `extra` goes at the top of the config,
/// `internal` lines under the internal service.
async fn setup(extra: &str, internal: &[&str]) -> (Running, Recorder, Recorder) {
    let public = Recorder::start().await;
    let private = Recorder::start().await;
    let mut yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{extra}\nservices:\n  - name: public\n    hosts: [public.test]\n    concurrency: 1\n    backend: {{ static: {{ addresses: [\"{}\"] }} }}\n  - name: internal\n    hosts: [internal.test]\n    path_prefix: /private\n    backend: {{ static: {{ addresses: [\"{}\"] }} }}\n",
        public.addr, private.addr
    );
    for l in internal {
        yaml.push_str("    ");
        yaml.push_str(l);
        yaml.push('\n');
    }
    (start(&yaml).await, public, private)
}

/// Writes `bytes`, then reads one response (head and a `content-length` body, or until the
/// server closes), within 10 s.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    read_response(&mut s).await
}

async fn read_response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = find(&out, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            if let Some(n) = field(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
                if out.len() >= end + 4 + n {
                    return String::from_utf8_lossy(&out).into_owned();
                }
            }
        }
        let mut buf = [0u8; 8192];
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "no whole response in 10 s: {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

fn status(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knative_names_reach_nothing_unless_enabled() {
    let (r, public, private) = setup("", &[]).await;
    let resp = exchange(
        r.proxy_addr,
        b"GET /admin HTTP/1.1\r\nHost: public.test\r\nKnative-Serving-Revision: internal\r\nKnative-Serving-Namespace: default\r\nK-Original-Host: forged\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "HTTP/1.1 200 OK", "{resp}");
    assert!(
        private.seen().is_empty(),
        "internal reached: {:?}",
        private.seen()
    );
    let seen = public.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].head.contains("knative-serving"),
        "{}",
        seen[0].head
    );
    assert!(
        !seen[0].head.contains("k-original-host"),
        "{}",
        seen[0].head
    );

    let resp = exchange(
        r.proxy_addr,
        b"GET /admin HTTP/1.1\r\nHost: internal.default.svc.cluster.local\r\n\r\n",
    )
    .await;
    assert!(status(&resp).starts_with("HTTP/1.1 404"), "{resp}");
    // Probes are a Knative thing too: off, they are plain requests.
    let resp = exchange(
        r.proxy_addr,
        b"GET / HTTP/1.1\r\nHost: nowhere.test\r\nK-Network-Probe: activator\r\n\r\n",
    )
    .await;
    assert!(status(&resp).starts_with("HTTP/1.1 404"), "{resp}");
    assert!(private.seen().is_empty());
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knative_opt_in_reaches_only_the_services_that_allow_it() {
    let (r, public, private) = setup("", &["knative: true"]).await;
    let resp = exchange(
        r.proxy_addr,
        b"GET /x HTTP/1.1\r\nHost: public.test\r\nKnative-Serving-Revision: internal\r\nKnative-Serving-Namespace: default\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "HTTP/1.1 200 OK", "{resp}");
    let seen = private.seen();
    assert_eq!(seen.len(), 1, "internal opted in");
    assert!(
        seen[0].head.contains("k-proxy-request: activator"),
        "{}",
        seen[0].head
    );
    assert!(
        seen[0].head.contains("k-original-host: public.test"),
        "{}",
        seen[0].head
    );
    assert!(
        !seen[0].head.contains("knative-serving"),
        "{}",
        seen[0].head
    );
    // `public` did not opt in: its name is no Knative revision.
    let resp = exchange(
        r.proxy_addr,
        b"GET / HTTP/1.1\r\nHost: public.default.svc.cluster.local\r\n\r\n",
    )
    .await;
    assert!(status(&resp).starts_with("HTTP/1.1 404"), "{resp}");
    assert!(public.seen().is_empty());
    let resp = exchange(
        r.proxy_addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nK-Network-Probe: probe\r\nK-Network-Hash: abc\r\n\r\n",
    )
    .await;
    assert!(status(&resp).starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("k-network-hash: abc"),
        "{resp}"
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_remove_host() {
    let (r, public, _) = setup("", &[]).await;
    let resp = exchange(
        r.proxy_addr,
        b"GET / HTTP/1.1\r\nHost: public.test\r\nConnection: host, x-forwarded-host, x-drop\r\nX-Drop: 1\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "HTTP/1.1 200 OK", "{resp}");
    let seen = public.seen();
    assert_eq!(
        field(&seen[0].head, "host"),
        Some("public.test"),
        "{}",
        seen[0].head
    );
    assert_eq!(
        field(&seen[0].head, "x-forwarded-host"),
        Some("public.test")
    );
    assert_eq!(
        field(&seen[0].head, "x-drop"),
        None,
        "a listed field still goes"
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_are_not_tunnelled() {
    let (r, public, _) = setup("", &[]).await;
    let resp = exchange(
        r.proxy_addr,
        b"GET / HTTP/1.1\r\nHost: public.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "HTTP/1.1 200 OK", "{resp}");
    let seen = public.seen();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].head.contains("upgrade"), "{}", seen[0].head);
    assert!(!seen[0].head.contains("http2-settings"), "{}", seen[0].head);
    assert!(seen[0].head.contains("x-forwarded-for: 127.0.0.1"));
    // An upgrade the service does not allow goes on as a plain request, too.
    let resp = exchange(
        r.proxy_addr,
        b"GET / HTTP/1.1\r\nHost: public.test\r\nConnection: upgrade\r\nUpgrade: h2c, custom/1\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "HTTP/1.1 200 OK", "{resp}");
    assert!(!public.seen()[1].head.contains("upgrade"));
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_405_and_reaches_nothing() {
    let (r, public, private) = setup("", &[]).await;
    let resp = exchange(
        r.proxy_addr,
        b"CONNECT public.test:80 HTTP/1.1\r\nHost: public.test:80\r\n\r\n",
    )
    .await;
    assert!(status(&resp).starts_with("HTTP/1.1 405"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("allow: "), "{resp}");
    assert!(public.seen().is_empty() && private.seen().is_empty());
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_bodies_are_400_and_reach_no_backend() {
    let (r, public, _) = setup("", &[]).await;
    let cases: [&[u8]; 4] = [
        // chunk-size overflow
        b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        // bare LF after the size
        b"5\nhello\r\n0\r\n\r\n",
        // bare LF in an extension
        b"5;a=b\nhello\r\n0\r\n\r\n",
        // no CRLF after the data
        b"5\r\nhelloXX0\r\n\r\n",
    ];
    for body in cases {
        let mut req =
            b"POST /in HTTP/1.1\r\nHost: public.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        req.extend_from_slice(body);
        let resp = exchange(r.proxy_addr, &req).await;
        assert!(
            status(&resp).starts_with("HTTP/1.1 400"),
            "{:?}: {resp}",
            String::from_utf8_lossy(body)
        );
        assert!(resp.contains("bad_body"), "{resp}");
    }
    assert!(public.seen().is_empty(), "{:?}", public.seen());
    let text = metrics_text(&client(), &r).await;
    assert_eq!(
        metric(
            &text,
            r#"reveille_rejected_total{reason="bad_body",service="public"}"#
        ),
        Some(4.0),
        "{text}"
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_that_breaks_while_streaming_is_400_and_cut_at_the_backend() {
    let (r, public, _) = setup("", &[]).await;
    let mut s = TcpStream::connect(r.proxy_addr).await.unwrap();
    let mut req =
        b"POST /in HTTP/1.1\r\nHost: public.test\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let data = vec![b'a'; 70_000];
    req.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    req.extend_from_slice(&data);
    req.extend_from_slice(b"\r\n");
    s.write_all(&req).await.unwrap();
    // The backend gets the head and the first part, then the break.
    wait_until(
        "the backend sees the request",
        Duration::from_secs(10),
        || {
            let n = public.seen().len();
            async move { n == 1 }
        },
    )
    .await;
    s.write_all(b"zz\r\n").await.unwrap();
    let resp = read_response(&mut s).await;
    assert!(status(&resp).starts_with("HTTP/1.1 400"), "{resp}");
    // The backend's connection ends before the body does (after that, the request can no
    // longer be completed).
    wait_until(
        "the backend's request is cut",
        Duration::from_secs(10),
        || {
            let seen = public.seen();
            async move { seen[0].cut || seen[0].complete }
        },
    )
    .await;
    assert!(
        !public.seen()[0].complete,
        "the backend got a whole request"
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_are_408_on_both_paths() {
    let (r, public, _) = setup("timeouts: { client_body: 300ms }", &[]).await;
    // Small (the fast path reads it whole) and large (hyper's path streams it).
    for len in [1000usize, 200_000] {
        let mut s = TcpStream::connect(r.proxy_addr).await.unwrap();
        let head = format!(
            "POST /up HTTP/1.1\r\nHost: public.test\r\nContent-Length: {len}\r\n\r\n0123456789"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        let resp = read_response(&mut s).await;
        assert!(status(&resp).starts_with("HTTP/1.1 408"), "{len}: {resp}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{len}: {:?}",
            started.elapsed()
        );
    }
    assert!(
        public.seen().iter().all(|s| !s.complete),
        "{:?}",
        public.seen().len()
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_closed_and_frees_its_slot() {
    // `public` has concurrency 1: a stuck reader would keep every other request waiting.
    let (r, public, _) = setup("timeouts: { client_write: 500ms }", &[]).await;
    let mut stuck = TcpStream::connect(r.proxy_addr).await.unwrap();
    stuck
        .write_all(b"GET /big HTTP/1.1\r\nHost: public.test\r\n\r\n")
        .await
        .unwrap();
    // The stuck request takes the only slot first (its response then fills the socket
    // buffers).
    wait_until(
        "the stuck request at the backend",
        Duration::from_secs(10),
        || {
            let n = public.seen().len();
            async move { n == 1 }
        },
    )
    .await;
    let c = client();
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        get(&c, r.proxy_addr, "public.test", "/after"),
    )
    .await
    .expect("the second request was served");
    assert_eq!(resp.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let text = metrics_text(&c, &r).await;
    assert!(
        metric(
            &text,
            r#"reveille_rejected_total{reason="client_write_timeout",service=""}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    drop(stuck);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_and_http1_connections_are_closed() {
    let (r, _public, _) = setup("timeouts: { client_idle: 300ms }", &[]).await;
    // HTTP/2 with prior knowledge: one request, then idle (hyper's client answers PINGs).
    let tcp = TcpStream::connect(r.proxy_addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let ended = tokio::spawn(conn);
    let req = http::Request::get("http://public.test/")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the idle HTTP/2 connection was closed")
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    // HTTP/1.1 keep-alive (the fast path): one request, then idle until closed.
    let mut s = TcpStream::connect(r.proxy_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: public.test\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut s).await;
    assert_eq!(status(&resp), "HTTP/1.1 200 OK");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the idle HTTP/1.1 connection was closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_targets_and_dot_segments_are_400() {
    let (r, public, private) = setup("", &[]).await;
    let resp = exchange(
        r.proxy_addr,
        b"GET http://internal.test/private/x HTTP/1.1\r\nHost: public.test\r\n\r\n",
    )
    .await;
    assert!(status(&resp).starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("ambiguous_host"), "{resp}");
    // The same host in both: routed by it, sent in origin form.
    let resp = exchange(
        r.proxy_addr,
        b"GET http://internal.test/private/x HTTP/1.1\r\nHost: internal.test\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "HTTP/1.1 200 OK", "{resp}");
    assert!(private.seen()[0]
        .head
        .starts_with("get /private/x http/1.1"));
    for target in [
        "/public/../private/x",
        "/x/%2e%2e/private/x",
        "/x/..%2fprivate",
    ] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: internal.test\r\n\r\n");
        let resp = exchange(r.proxy_addr, req.as_bytes()).await;
        assert!(
            status(&resp).starts_with("HTTP/1.1 400"),
            "{target}: {resp}"
        );
        assert!(resp.contains("dot_segments"), "{resp}");
    }
    assert_eq!(private.seen().len(), 1);
    assert!(public.seen().is_empty());
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_fields_are_dropped_unless_allowed() {
    let req = b"GET / HTTP/1.1\r\nHost: public.test\r\nX_Forwarded_For: 6.6.6.6\r\nX-Ok: 1\r\n\r\n";
    let (r, public, _) = setup("", &[]).await;
    let resp = exchange(r.proxy_addr, req).await;
    assert_eq!(status(&resp), "HTTP/1.1 200 OK");
    let head = &public.seen()[0].head;
    assert!(!head.contains("x_forwarded_for"), "{head}");
    assert!(!head.contains("6.6.6.6"), "{head}");
    assert!(head.contains("x-ok: 1"));
    stop(r).await;
    let (r, public, _) = setup("drop_underscore_headers: false", &[]).await;
    exchange(r.proxy_addr, req).await;
    assert!(public.seen()[0].head.contains("x_forwarded_for: 6.6.6.6"));
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_past_the_grace_get_503() {
    let (r, public, private) = setup("shutdown: { grace: 500ms }", &[]).await;
    // One on the fast path, one on hyper's (a `Connection` list hands it over).
    let mut fast = TcpStream::connect(r.proxy_addr).await.unwrap();
    fast.write_all(b"GET /hang HTTP/1.1\r\nHost: public.test\r\n\r\n")
        .await
        .unwrap();
    let mut slow = TcpStream::connect(r.proxy_addr).await.unwrap();
    slow.write_all(
        b"GET /private/hang HTTP/1.1\r\nHost: internal.test\r\nConnection: x-hop\r\n\r\n",
    )
    .await
    .unwrap();
    wait_until(
        "both requests are at their backends",
        Duration::from_secs(10),
        || {
            let n = public.seen().len() + private.seen().len();
            async move { n == 2 }
        },
    )
    .await;
    let _ = private;
    r.shutdown();
    for s in [&mut fast, &mut slow] {
        let resp = read_response(s).await;
        assert!(status(&resp).starts_with("HTTP/1.1 503"), "{resp}");
        assert!(resp.contains("shutting_down"), "{resp}");
    }
    tokio::time::timeout(Duration::from_secs(30), r.wait())
        .await
        .expect("shutdown within 30s");
}
