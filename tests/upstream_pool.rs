//! The HTTP/1.1 upstream pool, seen from a backend that counts its connections: keep-alive
//! reuse (also after empty bodies), connections the backend closed while idle are not used,
//! idle connections are closed after `timeouts.upstream_idle`, and a connection whose
//! response was abandoned half-read is never reused.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    closed: AtomicUsize,
    requests: AtomicUsize,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(req: Request<Incoming>, counts: Arc<Counts>) -> Result<Response<Body>, Infallible> {
    counts.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let head = req.method() == http::Method::HEAD;
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let resp = match path.as_str() {
        "/204" => {
            let mut r = Response::new(Full::new(Bytes::new()).boxed());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        "/endless" => {
            // An endless body, a chunk every 10 ms: only a client that stops reading ends it.
            let chunks = futures_util::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 1024]))),
                    (),
                ))
            });
            Response::new(BodyExt::boxed(StreamBody::new(chunks)))
        }
        _ if head => Response::new(Full::new(Bytes::new()).boxed()),
        _ => Response::new(Full::new(Bytes::from(format!("ok {}", body.len()))).boxed()),
    };
    Ok(resp)
}

/// An HTTP/1.1 backend counting connections; with `lifetime`, it closes every connection
/// that long after accepting it (a backend with a short keep-alive timeout).
async fn backend(lifetime: Option<Duration>) -> (SocketAddr, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            c.accepted.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let c2 = c.clone();
                let svc = hyper::service::service_fn(move |req| answer(req, c2.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                match lifetime {
                    Some(t) => {
                        let _ = tokio::time::timeout(t, conn).await;
                    }
                    None => {
                        let _ = conn.await;
                    }
                }
                c.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

fn config(backend: SocketAddr, timeouts: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{timeouts}\nservices:\n  - name: pool\n    hosts: [pool.test]\n    backend: {{ static: {{ addresses: [\"{backend}\"] }} }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_backend_connection() {
    let (addr, counts) = backend(None).await;
    let r = start(&config(addr, "")).await;
    let c = client();
    for i in 0..20 {
        let resp = get(&c, r.proxy_addr, "pool.test", &format!("/get/{i}")).await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.body, "ok 0");
    }
    for _ in 0..5 {
        let resp = send(&c, r.proxy_addr, "HEAD", "pool.test", "/", "").await;
        assert_eq!(resp.status, 200);
        let resp = get(&c, r.proxy_addr, "pool.test", "/204").await;
        assert_eq!(resp.status, 204);
        let resp = send(
            &c,
            r.proxy_addr,
            "POST",
            "pool.test",
            "/post",
            "x".repeat(5000),
        )
        .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, "ok 5000");
    }
    assert_eq!(counts.requests.load(Ordering::SeqCst), 35);
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        1,
        "one request at a time: one backend connection, reused"
    );
    assert_eq!(r.gates()[0].in_flight(), 0, "every slot released");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_backend_closed_while_idle_are_not_used() {
    let (addr, counts) = backend(Some(Duration::from_millis(100))).await;
    let r = start(&config(addr, "")).await;
    let c = client();
    for i in 0..6 {
        // POST too: a request that may not be retried once sent must not meet a dead connection.
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let resp = send(&c, r.proxy_addr, method, "pool.test", "/", "body").await;
        assert_eq!(resp.status, 200, "{method} #{i}: {resp:?}");
        // The backend closes the connection (100 ms after accepting it), and the close reaches
        // Reveille's idle connection before the next request is sent.
        wait_until(
            "the backend's close reached Reveille's idle connection",
            Duration::from_secs(10),
            || {
                let counts = counts.clone();
                async move { counts.closed.load(Ordering::SeqCst) == i + 1 && close_arrived_from(addr) }
            },
        )
        .await;
    }
    assert_eq!(
        counts.requests.load(Ordering::SeqCst),
        6,
        "each request once"
    );
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        6,
        "a new connection each"
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let (addr, counts) = backend(None).await;
    let r = start(&config(addr, "timeouts: { upstream_idle: 200ms }")).await;
    let c = client();
    let resp = get(&c, r.proxy_addr, "pool.test", "/").await;
    assert_eq!(resp.status, 200);
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 1);
    let counts2 = counts.clone();
    wait_until(
        "the idle backend connection closed",
        Duration::from_secs(5),
        || {
            let c = counts2.clone();
            async move { c.closed.load(Ordering::SeqCst) == 1 }
        },
    )
    .await;
    // And the next request connects anew.
    let resp = get(&c, r.proxy_addr, "pool.test", "/").await;
    assert_eq!(resp.status, 200);
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_abandoned_half_read_closes_its_backend_connection() {
    let (addr, counts) = backend(None).await;
    let r = start(&config(addr, "")).await;
    let mut s = TcpStream::connect(r.proxy_addr).await.unwrap();
    s.write_all(b"GET /endless HTTP/1.1\r\nHost: pool.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    drop(s);
    let counts2 = counts.clone();
    wait_until(
        "the backend connection of the abandoned response closed",
        Duration::from_secs(5),
        || {
            let c = counts2.clone();
            async move { c.closed.load(Ordering::SeqCst) == 1 }
        },
    )
    .await;
    let resp = get(&client(), r.proxy_addr, "pool.test", "/").await;
    assert_eq!(resp.status, 200);
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 2, "not reused");
    wait_until("the slot released", Duration::from_secs(5), || {
        let g = r.gates()[0].clone();
        async move { g.in_flight() == 0 }
    })
    .await;
    stop(r).await;
}
