//! The HTTP/1.1 fast path on the wire: raw bytes from a client socket through Reveille to a
//! scripted backend socket and back, checking framing (pipelining, chunked bodies passed as
//! sent but for their trailer fields, close-delimited bodies chunked for the client), pooled backend connections the
//! backend closed, broken backend heads, and a connection that moves from the fast path to
//! hyper's (a chunked upload) and keeps working.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted backend does with one request: the bytes to answer, and whether to close
/// the connection afterwards.
type Script = Arc<dyn Fn(&str, &[u8]) -> (Vec<u8>, bool) + Send + Sync>;

/// Requests a scripted backend received: (connection number, head, body).
type Seen = Arc<Mutex<Vec<(usize, String, Vec<u8>)>>>;

/// A backend answering each request (head and `Content-Length` or chunked body read whole) as
/// `script` says.
async fn scripted(script: Script) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((s, _)) = listener.accept().await {
            n += 1;
            tokio::spawn(serve_scripted(s, n, script.clone(), log.clone()));
        }
    });
    (addr, seen)
}

async fn serve_scripted(mut s: TcpStream, conn: usize, script: Script, seen: Seen) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = read_until(&mut s, &mut buf, b"\r\n\r\n").await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        let lower = head.to_ascii_lowercase();
        let body = if let Some(len) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            while buf.len() < len {
                if !read_more(&mut s, &mut buf).await {
                    return;
                }
            }
            buf.drain(..len).collect()
        } else if lower.contains("transfer-encoding: chunked") {
            // Kept raw: the test only looks for the data inside.
            let Some(end) = read_until(&mut s, &mut buf, b"0\r\n\r\n").await else {
                return;
            };
            buf.drain(..end).collect()
        } else {
            Vec::new()
        };
        let (answer, close) = script(&head, &body);
        seen.lock().push((conn, head, body));
        if s.write_all(&answer).await.is_err() || close {
            return;
        }
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// Reads until `buf` contains `pat`; the index after it.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, pat: &[u8]) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(pat.len()).position(|w| w == pat) {
            return Some(i + pat.len());
        }
        if !read_more(s, buf).await {
            return None;
        }
    }
}

/// Reads exactly `len` bytes (or fails the test after 10 s).
async fn read_exact_text(s: &mut TcpStream, len: usize) -> String {
    let mut buf = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("response in time")
        .expect("response bytes");
    String::from_utf8(buf).unwrap()
}

/// Reads one response whose body has `Content-Length` (head and body); `buf` keeps what
/// came after it (a pipelined response).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    let end = tokio::time::timeout(Duration::from_secs(10), read_until(s, buf, b"\r\n\r\n"))
        .await
        .expect("head in time")
        .expect("a head");
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let len: usize = head
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < end + len {
        assert!(read_more(s, buf).await, "body cut short: {head}");
    }
    let body = String::from_utf8_lossy(&buf[end..end + len]).to_string();
    buf.drain(..end + len);
    (head, body)
}

fn config(backend: SocketAddr) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: wire\n    hosts: [wire.test]\n    backend: {{ static: {{ addresses: [\"{backend}\"] }} }}\n"
    )
}

/// A backend's `Date` (passed on as sent; a response without one gets Reveille's).
const DATE: &str = "Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n";

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\n{DATE}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn path(head: &str) -> String {
    head.split(' ').nth(1).unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_one_backend_connection() {
    let (backend, seen) = scripted(Arc::new(|head, _| (ok(&path(head)), false))).await;
    let r = start(&config(backend)).await;
    let mut c = TcpStream::connect(r.proxy_addr).await.unwrap();
    let mut burst = String::new();
    for i in 1..=3 {
        burst.push_str(&format!("GET /{i} HTTP/1.1\r\nHost: wire.test\r\n\r\n"));
    }
    c.write_all(burst.as_bytes()).await.unwrap();
    let want: String = (1..=3)
        .map(|i| String::from_utf8(ok(&format!("/{i}"))).unwrap())
        .collect();
    assert_eq!(read_exact_text(&mut c, want.len()).await, want);
    let seen = seen.lock();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter().all(|(conn, _, _)| *conn == 1),
        "one backend connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_pass_as_sent_and_close_delimited_ones_are_chunked() {
    let (backend, seen) = scripted(Arc::new(|head, _| match path(head).as_str() {
        "/chunked" => (
            format!("HTTP/1.1 200 OK\r\n{DATE}Transfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n")
                .into_bytes(),
            false,
        ),
        "/old" => (format!("HTTP/1.0 200 OK\r\n{DATE}Server: old\r\n\r\nuntil close").into_bytes(), true),
        p => (ok(p), false),
    }))
    .await;
    let r = start(&config(backend)).await;
    let mut c = TcpStream::connect(r.proxy_addr).await.unwrap();
    let mut rb: Vec<u8> = Vec::new();

    c.write_all(b"GET /chunked HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    // Chunks as sent; the trailer fields are dropped (as hyper's path does).
    let want = format!(
        "HTTP/1.1 200 OK\r\n{DATE}transfer-encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\n\r\n"
    );
    assert_eq!(read_exact_text(&mut c, want.len()).await, want);

    c.write_all(b"GET /old HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    let want = format!("HTTP/1.1 200 OK\r\n{DATE}Server: old\r\ntransfer-encoding: chunked\r\n\r\nb\r\nuntil close\r\n0\r\n\r\n");
    assert_eq!(read_exact_text(&mut c, want.len()).await, want);

    // The client's connection stays open; the backend's, closed after /old, is not reused.
    c.write_all(b"GET /after HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_response(&mut c, &mut rb).await;
    assert_eq!(body, "/after");
    let conns: Vec<usize> = seen.lock().iter().map(|(c, _, _)| *c).collect();
    assert_eq!(conns, [1, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_backend_closed_is_not_used_even_for_a_post() {
    // Every connection answers once, claims keep-alive, and closes.
    let (backend, seen) = scripted(Arc::new(|head, body| {
        let text = format!("{} {}", path(head), String::from_utf8_lossy(body));
        (ok(&text), true)
    }))
    .await;
    let r = start(&config(backend)).await;
    let mut c = TcpStream::connect(r.proxy_addr).await.unwrap();
    let mut rb: Vec<u8> = Vec::new();
    c.write_all(b"GET /first HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut c, &mut rb).await.1, "/first ");
    // The backend's close has reached Reveille's idle connection (CLOSE_WAIT on its side).
    wait_until(
        "the backend's close reached Reveille's pooled connection",
        Duration::from_secs(10),
        || async { close_arrived_from(backend) },
    )
    .await;
    c.write_all(b"POST /post HTTP/1.1\r\nHost: wire.test\r\nContent-Length: 3\r\n\r\nabc")
        .await
        .unwrap();
    let (head, body) = read_response(&mut c, &mut rb).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, "/post abc");
    let conns: Vec<usize> = seen.lock().iter().map(|(c, _, _)| *c).collect();
    assert_eq!(conns, [1, 2], "the POST went on a new connection, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_backend_head_is_502_and_the_client_connection_goes_on() {
    let (backend, _) = scripted(Arc::new(|head, _| match path(head).as_str() {
        "/broken" => (b"SMTP ready\r\n\r\n".to_vec(), true),
        p => (ok(p), false),
    }))
    .await;
    let r = start(&config(backend)).await;
    let mut c = TcpStream::connect(r.proxy_addr).await.unwrap();
    let mut rb: Vec<u8> = Vec::new();
    // Not idempotent: not retried.
    c.write_all(b"POST /broken HTTP/1.1\r\nHost: wire.test\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut c, &mut rb).await;
    assert!(head.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{head}");
    assert!(
        head.contains("x-reveille-error: upstream_error\r\n"),
        "{head}"
    );
    assert!(body.contains("\"wire\""), "{body}");
    c.write_all(b"GET /fine HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut c, &mut rb).await.1, "/fine");
    let metrics = metrics_text(&client(), &r).await;
    assert_eq!(
        metric(
            &metrics,
            "reveille_rejected_total{reason=\"upstream_error\",service=\"wire\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_moves_to_hyper_for_a_chunked_upload_and_keeps_working() {
    let (backend, seen) = scripted(Arc::new(|head, body| {
        let text = format!("{} {}", path(head), body.len());
        (ok(&text), false)
    }))
    .await;
    let r = start(&config(backend)).await;
    let mut c = TcpStream::connect(r.proxy_addr).await.unwrap();
    let mut rb: Vec<u8> = Vec::new();
    c.write_all(b"GET /fast HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut c, &mut rb).await.1, "/fast 0");
    // A chunked upload, pipelined with a GET after it: hyper serves both, in order.
    c.write_all(
        b"POST /up HTTP/1.1\r\nHost: wire.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /then HTTP/1.1\r\nHost: wire.test\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, body) = read_response(&mut c, &mut rb).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(body.starts_with("/up "), "{body}");
    assert_eq!(read_response(&mut c, &mut rb).await.1, "/then 0");
    let seen = seen.lock();
    let upload = &seen[1].2;
    assert!(
        upload.windows(3).any(|w| w == b"abc"),
        "{:?}",
        String::from_utf8_lossy(upload)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_arrives_is_not_lost_to_a_reset() {
    // The backend takes 30 s to start; the hold deadline is 300 ms.
    let r = start(&process_config(
        free_port(),
        "30s",
        &["queue: { capacity: 5, timeout: 300ms }"],
    ))
    .await;
    let mut c = TcpStream::connect(r.proxy_addr).await.unwrap();
    // Most of the announced body is never sent before the answer.
    c.write_all(
        b"PUT /slow HTTP/1.1\r\nHost: hello.test\r\nContent-Length: 60000\r\n\r\nfirst bytes",
    )
    .await
    .unwrap();
    // The body keeps trickling in while the request is held and after the answer.
    let (mut rd, mut wr) = c.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..200 {
            if wr.write_all(&[b'x'; 100]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut got = Vec::new();
    let read_all = async {
        let mut chunk = [0u8; 4096];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e),
            }
        }
    };
    let end = tokio::time::timeout(Duration::from_secs(10), read_all)
        .await
        .expect("closed in time");
    let text = String::from_utf8_lossy(&got);
    assert!(end.is_ok(), "a clean close, not {end:?}; read: {text}");
    assert!(
        text.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"),
        "{text}"
    );
    assert!(
        text.contains("x-reveille-error: hold_timeout\r\n"),
        "{text}"
    );
    assert!(text.contains("connection: close\r\n"), "{text}");
    trickle.abort();
    stop(r).await;
}

/// A backend that never answers `/slow` and stops midway through the body of `/slow-body` (a
/// head announcing 100 bytes, 10 of them): it counts the request, then waits for the connection
/// to close and counts that. It answers anything else at once.
async fn stalling() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stalled = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (s2, c2) = (stalled.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (stalled, closed) = (s2.clone(), c2.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(end) = read_until(&mut s, &mut buf, b"\r\n\r\n").await {
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    if path(&head) == "/slow-body" {
                        let part = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789";
                        if s.write_all(part).await.is_err() {
                            return;
                        }
                    }
                    if path(&head).starts_with("/slow") {
                        stalled.fetch_add(1, Ordering::SeqCst);
                        while read_more(&mut s, &mut buf).await {}
                        closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    if s.write_all(&ok(&path(&head))).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, stalled, closed)
}

fn config_with(backend: SocketAddr, extra: &[&str]) -> String {
    let mut yaml = config(backend);
    for line in extra {
        yaml.push_str("    ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_its_request_is_forwarded_frees_the_slot() {
    let (backend, stalled, closed) = stalling().await;
    let r = start(&config_with(backend, &["concurrency: 1"])).await;
    let gate = r.gates()[0].clone();
    let mut c = TcpStream::connect(r.proxy_addr).await.unwrap();
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    wait_until(
        "the backend to get the request",
        Duration::from_secs(5),
        || {
            let n = stalled.load(Ordering::SeqCst);
            async move { n == 1 }
        },
    )
    .await;
    assert_eq!(gate.in_flight(), 1);
    // The client gives up; hyper's path notices at once (its read sees the end), so must this.
    drop(c);
    wait_until("the slot to be freed", Duration::from_secs(3), || {
        let g = gate.clone();
        async move { g.in_flight() == 0 }
    })
    .await;
    wait_until(
        "the backend connection to be closed",
        Duration::from_secs(3),
        || {
            let n = closed.load(Ordering::SeqCst);
            async move { n == 1 }
        },
    )
    .await;
    let resp = get(&client(), r.proxy_addr, "wire.test", "/next").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, "/next");
}

/// The same when the backend goes quiet midway through the body: the client has the head and
/// part of the body, then leaves; the slot and the backend connection are freed at once, not
/// when (if ever) the backend sends again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_midway_through_a_stalled_body_frees_the_slot() {
    let (backend, stalled, closed) = stalling().await;
    let r = start(&config_with(backend, &["concurrency: 1"])).await;
    let gate = r.gates()[0].clone();
    let mut c = TcpStream::connect(r.proxy_addr).await.unwrap();
    c.write_all(b"GET /slow-body HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let end = tokio::time::timeout(
        Duration::from_secs(5),
        read_until(&mut c, &mut buf, b"0123456789"),
    )
    .await
    .expect("head and part of the body within 5 s");
    assert!(end.is_some(), "{}", String::from_utf8_lossy(&buf));
    assert_eq!(stalled.load(Ordering::SeqCst), 1);
    assert_eq!(gate.in_flight(), 1);
    drop(c);
    wait_until("the slot to be freed", Duration::from_secs(3), || {
        let g = gate.clone();
        async move { g.in_flight() == 0 }
    })
    .await;
    wait_until(
        "the backend connection to be closed",
        Duration::from_secs(3),
        || {
            let n = closed.load(Ordering::SeqCst);
            async move { n == 1 }
        },
    )
    .await;
    let resp = get(&client(), r.proxy_addr, "wire.test", "/next").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_across_a_reload_to_h2c_is_forwarded_over_h2c() {
    let (a, stalled, _) = stalling().await;
    // The new backend speaks h2c only, and says which version and path it got.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let text = format!("{:?} {}", req.version(), req.uri().path());
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(text)),
                        ))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    let hold = ["concurrency: 1", "queue: { capacity: 10, timeout: 30s }"];
    let first_yaml = config_with(a, &hold);
    let first = reveille::Config::parse(&first_yaml).unwrap();
    let r = start(&first_yaml).await;
    let gate = r.gates()[0].clone();
    // The one slot is taken by a request the backend never answers...
    let mut busy = TcpStream::connect(r.proxy_addr).await.unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    wait_until("the slot to be taken", Duration::from_secs(5), || {
        let n = stalled.load(Ordering::SeqCst);
        async move { n == 1 }
    })
    .await;
    // ... so this one is held, on the fast path.
    let mut c = TcpStream::connect(r.proxy_addr).await.unwrap();
    c.write_all(b"GET /held HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    wait_until("the request to be held", Duration::from_secs(5), || {
        let g = gate.clone();
        async move { g.held() == 1 }
    })
    .await;
    // The service now speaks h2c: the held request follows it to its new gate, and goes on
    // with the new protocol (never as HTTP/1.1 to an h2c backend, never a false 503).
    let mut with_h2c = hold.to_vec();
    with_h2c.push("protocol: h2c");
    let second = reveille::Config::parse(&config_with(b, &with_h2c)).unwrap();
    let out = r.reload(&second, &first).await;
    assert_eq!(out.changes.replaced, vec!["wire".to_string()]);
    let mut rb = Vec::new();
    let (head, body) = read_response(&mut c, &mut rb).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, "HTTP/2.0 /held");
    // The connection stays usable, now on hyper's path.
    c.write_all(b"GET /next HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut c, &mut rb).await.1, "HTTP/2.0 /next");
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_opened_before_shutdown_hears_connection_close_on_its_last_request() {
    let (backend, _) = scripted(Arc::new(|head, _| (ok(&path(head)), false))).await;
    let yaml = config(backend).replacen(
        "services:",
        "shutdown: { delay: 0s, grace: 5s }\nservices:",
        1,
    );
    let r = start(&yaml).await;
    // Connected, nothing sent yet: waiting for its first bytes when shutdown begins.
    let mut c = TcpStream::connect(r.proxy_addr).await.unwrap();
    r.shutdown();
    let addr = r.proxy_addr;
    wait_until(
        "the listener to close",
        Duration::from_secs(5),
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await;
    // Within the last-request grace, the request is served...
    c.write_all(b"GET /last HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    let mut rb = Vec::new();
    let (head, body) = read_response(&mut c, &mut rb).await;
    assert_eq!(body, "/last");
    // ... and its answer says the connection closes, so nothing more is sent on it.
    assert!(
        head.to_ascii_lowercase().contains("connection: close\r\n"),
        "{head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_its_retry_is_held_leaves_the_queue() {
    // `/fail` is closed unanswered once the test says so; `/slow` is never answered.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let seen: Seen = Arc::default();
    let (rel, log) = (release.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (rel, log) = (rel.clone(), log.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Some(end) = read_until(&mut s, &mut buf, b"\r\n\r\n").await else {
                    return;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                log.lock().push((0, head.clone(), Vec::new()));
                if path(&head) == "/fail" {
                    rel.notified().await;
                    return;
                }
                while read_more(&mut s, &mut buf).await {}
            });
        }
    });
    let r = start(&config_with(
        backend,
        &["concurrency: 1", "queue: { capacity: 10, timeout: 30s }"],
    ))
    .await;
    let gate = r.gates()[0].clone();
    let reached = |p: &'static str| {
        let seen = seen.clone();
        move || {
            let n = seen.lock().iter().filter(|(_, h, _)| path(h) == p).count();
            async move { n == 1 }
        }
    };
    let mut a = TcpStream::connect(r.proxy_addr).await.unwrap();
    a.write_all(b"GET /fail HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    wait_until(
        "/fail at the backend",
        Duration::from_secs(5),
        reached("/fail"),
    )
    .await;
    let mut q = TcpStream::connect(r.proxy_addr).await.unwrap();
    q.write_all(b"GET /slow HTTP/1.1\r\nHost: wire.test\r\n\r\n")
        .await
        .unwrap();
    wait_until("/slow held", Duration::from_secs(5), || {
        let g = gate.clone();
        async move { g.held() == 1 }
    })
    .await;
    // /fail fails with no answer: its retry waits behind /slow, which takes the one slot.
    release.notify_one();
    wait_until(
        "/slow at the backend",
        Duration::from_secs(5),
        reached("/slow"),
    )
    .await;
    wait_until("the retry held", Duration::from_secs(5), || {
        let g = gate.clone();
        async move { g.held() == 1 }
    })
    .await;
    drop(a);
    wait_until("the queue to be empty", Duration::from_secs(3), || {
        let g = gate.clone();
        async move { g.held() == 0 }
    })
    .await;
    drop(q);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_or_badly_chunked_closes_the_client_and_is_counted_by_kind() {
    let (backend, _) = scripted(Arc::new(|head, _| match path(head).as_str() {
        // Promises 100 bytes, sends 5, closes.
        "/short" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello".to_vec(),
            true,
        ),
        // A chunk size that is not hex.
        "/chunks" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            true,
        ),
        p => (ok(p), false),
    }))
    .await;
    let r = start(&config(backend)).await;
    for (path, kind) in [("/short", "backend_gone"), ("/chunks", "bad_chunked")] {
        let mut c = TcpStream::connect(r.proxy_addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: wire.test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        // The client gets what came (for the broken framing found in the first read: nothing),
        // then the connection closes: it cannot be told otherwise.
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
            .await
            .expect("the connection is closed")
            .ok();
        let text = String::from_utf8_lossy(&got);
        if path == "/short" {
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {text}");
            assert!(text.ends_with("hello"), "{path}: {text}");
        } else {
            assert!(!text.contains("hello"), "{path}: {text}");
        }
        let metrics = metrics_text(&client(), &r).await;
        assert_eq!(
            metric(
                &metrics,
                &format!("reveille_relay_errors_total{{kind=\"{kind}\"}}")
            ),
            Some(1.0),
            "{path}: {metrics}"
        );
    }
}
