//! Protocols and faults on the request path: upgrades (held during a cold start, then spliced),
//! WebSocket, h2c in and out with trailers and streaming, Knative headers and probes, upstream
//! timeouts, connect retries, global limits.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Runs the demo backend in-process (for static backends) and waits until it accepts.
async fn demo_in_process() -> SocketAddr {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    tokio::spawn(reveille::demo::run(reveille::demo::DemoOptions {
        listen: addr,
        startup_delay: Duration::ZERO,
        name: "static".into(),
    }));
    wait_until("demo backend", Duration::from_secs(5), || async move {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;
    addr
}

fn static_config(addrs: &[SocketAddr], extra_top: &str, extra_service: &str) -> String {
    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{extra_top}\nservices:\n  - name: hello\n    hosts: [hello.test]\n    backend: {{ static: {{ addresses: [{}] }} }}\n    {extra_service}\n",
        list.join(", ")
    )
}

async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).await.unwrap(),
            1,
            "connection closed in the head"
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_is_held_during_a_cold_start_then_spliced_both_ways() {
    let port = free_port();
    // Upgrades are allow-listed per service (default: websocket only).
    let r = start(&process_config(
        port,
        "400ms",
        &["upgrades: [websocket, echo]"],
    ))
    .await;
    let gate = r.gates()[0].clone();
    let mut s = TcpStream::connect(r.proxy_addr).await.unwrap();
    s.write_all(b"GET /_demo/upgrade HTTP/1.1\r\nHost: hello.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: echo"), "{head}");
    assert!(lower.contains("x-reveille-cold-start: true"), "{head}");
    for msg in [&b"ping"[..], b"a longer second message"] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    // The open session counts as in flight (it keeps the service awake).
    assert_eq!(gate.in_flight(), 1);
    drop(s);
    wait_until("session released", Duration::from_secs(5), || {
        let g = gate.clone();
        async move { g.in_flight() == 0 }
    })
    .await;
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_round_trip_through_reveille() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    let r = start(&static_config(&[backend], "", "")).await;
    let stream = TcpStream::connect(r.proxy_addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://hello.test/socket", stream)
        .await
        .expect("websocket handshake through reveille");
    assert_eq!(resp.status(), 101);
    for text in ["hello", "world"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
        let got = ws.next().await.unwrap().unwrap();
        assert_eq!(got.into_text().unwrap(), text);
    }
    stop(r).await;
}

/// An h2c backend: checks `te: trailers`, echoes the body frame by frame, ends with trailers.
async fn h2c_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let te = req
                        .headers()
                        .get("te")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    let version = format!("{:?}", req.version());
                    let (tx, rx) =
                        tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
                    let mut body = req.into_body();
                    tokio::spawn(async move {
                        while let Some(Ok(frame)) = body.frame().await {
                            if let Ok(data) = frame.into_data() {
                                let _ = tx.send(Ok(Frame::data(data))).await;
                            }
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        trailers.insert("grpc-message", "done".parse().unwrap());
                        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                    });
                    let stream = tokio_stream_from(rx);
                    let mut resp = Response::new(StreamBody::new(stream));
                    resp.headers_mut().insert("x-te", te.parse().unwrap());
                    resp.headers_mut()
                        .insert("x-version", version.parse().unwrap());
                    resp.headers_mut()
                        .insert("content-type", "application/grpc".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_streams_and_trailers_pass_end_to_end() {
    let backend = h2c_backend().await;
    let r = start(&static_config(&[backend], "", "protocol: h2c")).await;
    let stream = TcpStream::connect(r.proxy_addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c prior knowledge accepted");
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
    let req = Request::builder()
        .method("POST")
        .uri("http://hello.test/echo.Echo/Stream")
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(StreamBody::new(tokio_stream_from(rx)))
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
        .await
        .unwrap();
    let resp = sender.send_request(req).await.expect("response headers");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-te"],
        "trailers",
        "te: trailers reached the backend"
    );
    assert_eq!(
        resp.headers()["x-version"],
        "HTTP/2.0",
        "h2c to the backend"
    );
    let mut body = resp.into_body();
    // Streaming: the first message comes back before the second is sent.
    let f = body.frame().await.unwrap().unwrap();
    assert_eq!(f.into_data().unwrap(), "first");
    tx.send(Ok(Frame::data(Bytes::from_static(b"second"))))
        .await
        .unwrap();
    let f = body.frame().await.unwrap().unwrap();
    assert_eq!(f.into_data().unwrap(), "second");
    drop(tx);
    let trailers = loop {
        let f = body.frame().await.expect("trailers frame").unwrap();
        if f.is_trailers() {
            break f.into_trailers().unwrap();
        }
    };
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "done");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knative_headers_select_the_revision_and_probes_are_answered() {
    let backend = demo_in_process().await;
    // Knative routing is opt-in (tests/hardening.rs checks it is off by default).
    let yaml = static_config(
        &[backend],
        "knative: { enabled: true }",
        "namespace: integrations",
    );
    let r = start(&yaml).await;
    let c = client();
    let req = Request::builder()
        .uri(format!("http://{}/_demo/headers", r.proxy_addr))
        .header("host", "order.example.com")
        .header("knative-serving-revision", "hello")
        .header("knative-serving-namespace", "integrations")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        seen.contains("k-original-host: order.example.com"),
        "{seen}"
    );
    assert!(seen.contains("k-proxy-request: activator"), "{seen}");
    assert!(!seen.contains("knative-serving-revision"), "{seen}");
    // The host form of a revision.
    let resp = get(
        &c,
        r.proxy_addr,
        "hello.integrations.svc.cluster.local",
        "/x",
    )
    .await;
    assert_eq!(resp.status, 200);
    // Unknown revision.
    let req = Request::builder()
        .uri(format!("http://{}/", r.proxy_addr))
        .header("knative-serving-revision", "nope")
        .header("knative-serving-namespace", "integrations")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(c.request(req).await.unwrap().status(), 404);
    // Probes.
    let req = Request::builder()
        .uri(format!("http://{}/healthz", r.proxy_addr))
        .header("k-network-probe", "activator")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "activator"
    );
    let req = Request::builder()
        .uri(format!("http://{}/healthz", r.proxy_addr))
        .header("k-network-probe", "probe")
        .header("k-network-hash", "abc123")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["k-network-hash"], "abc123");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_set_and_hop_by_hop_removed() {
    let backend = demo_in_process().await;
    let r = start(&static_config(&[backend], "", "")).await;
    let mut s = TcpStream::connect(r.proxy_addr).await.unwrap();
    s.write_all(b"GET /_demo/headers HTTP/1.1\r\nHost: hello.test\r\nX-Forwarded-For: 10.1.2.3\r\nX-Forwarded-For: 10.4.5.6\r\nConnection: close, x-secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nProxy-Authorization: Basic x\r\nX-Keep: yes\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let body = out.split("\r\n\r\n").nth(1).unwrap();
    assert!(body.contains("host: hello.test\n"), "{body}");
    assert!(
        body.contains("x-forwarded-for: 10.1.2.3, 10.4.5.6, 127.0.0.1\n"),
        "{body}"
    );
    assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
    assert!(body.contains("x-forwarded-host: hello.test\n"), "{body}");
    assert!(body.contains("x-keep: yes\n"), "{body}");
    for gone in [
        "x-secret",
        "keep-alive",
        "proxy-authorization",
        "connection",
    ] {
        assert!(
            !body.contains(&format!("{gone}:")),
            "{gone} passed on: {body}"
        );
    }
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_slower_than_the_response_timeout_gets_504() {
    let backend = demo_in_process().await;
    let r = start(&static_config(
        &[backend],
        "timeouts: { upstream_response: 300ms }",
        "",
    ))
    .await;
    let c = client();
    let resp = get(&c, r.proxy_addr, "hello.test", "/_demo/sleep?ms=3000").await;
    assert_eq!(resp.status, 504);
    assert_eq!(resp.header("x-reveille-error"), Some("upstream_timeout"));
    assert!(
        resp.body.contains("did not answer within 300ms"),
        "{}",
        resp.body
    );
    assert_eq!(r.gates()[0].in_flight(), 0, "the slot was released");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_retried_on_another_endpoint_body_intact() {
    let live = demo_in_process().await;
    let dead: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let r = start(&static_config(&[dead, live], "", "")).await;
    let c = client();
    for i in 0..20 {
        let resp = get(&c, r.proxy_addr, "hello.test", &format!("/r/{i}")).await;
        assert_eq!(resp.status, 200, "{resp:?}");
    }
    for i in 0..10 {
        let body = format!("payload number {i}").repeat(1000);
        let resp = send(
            &c,
            r.proxy_addr,
            "POST",
            "hello.test",
            "/_demo/echo",
            body.clone(),
        )
        .await;
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.body, body,
            "the body went once, whole, to the live endpoint"
        );
    }
    // Every request reached the live backend exactly once.
    let log = get(&c, r.proxy_addr, "hello.test", "/_demo/log").await.body;
    assert_eq!(log.lines().filter(|l| l.starts_with("GET /r/")).count(), 20);
    assert_eq!(
        log.lines()
            .filter(|l| l.starts_with("POST /_demo/echo"))
            .count(),
        10
    );
    stop(r).await;
}

/// A loopback address whose connects hang: a listener that never accepts, its accept queue
/// filled, so the kernel drops further SYNs (as a firewalled or vanished pod IP does).
async fn blackhole() -> (SocketAddr, tokio::net::TcpListener, Vec<TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], free_port()).into()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut filling = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => filling.push(s),
            Ok(Err(e)) => panic!("connect to the blackhole failed at once: {e}"),
            Err(_) => return (addr, listener, filling),
        }
    }
    panic!("the accept queue never filled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_connect_times_out_and_is_retried_on_another_endpoint() {
    let live = demo_in_process().await;
    let (dead, _listener, _filling) = blackhole().await;
    let r = start(&static_config(
        &[dead, live],
        "timeouts: { upstream_connect: 200ms }",
        "",
    ))
    .await;
    let c = client();
    for i in 0..10 {
        let resp = send(
            &c,
            r.proxy_addr,
            "POST",
            "hello.test",
            "/_demo/echo",
            format!("body {i}"),
        )
        .await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.body, format!("body {i}"));
    }
    // Each body reached the live backend exactly once.
    let log = get(&c, r.proxy_addr, "hello.test", "/_demo/log").await.body;
    assert_eq!(
        log.lines()
            .filter(|l| l.starts_with("POST /_demo/echo"))
            .count(),
        10
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_connect_to_the_only_endpoint_ends_in_502_within_the_hold_deadline() {
    let (dead, _listener, _filling) = blackhole().await;
    let r = start(&static_config(
        &[dead],
        "timeouts: { upstream_connect: 200ms }",
        "queue: { timeout: 2s }",
    ))
    .await;
    let c = client();
    let resp = get(&c, r.proxy_addr, "hello.test", "/").await;
    assert!(resp.status == 502 || resp.status == 504, "{resp:?}");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_and_counted() {
    let backend = demo_in_process().await;
    let r = start(&static_config(
        &[backend],
        "limits: { max_connections: 2 }",
        "",
    ))
    .await;
    let mut a = TcpStream::connect(r.proxy_addr).await.unwrap();
    let mut b = TcpStream::connect(r.proxy_addr).await.unwrap();
    for s in [&mut a, &mut b] {
        s.write_all(b"GET / HTTP/1.1\r\nHost: hello.test\r\n\r\n")
            .await
            .unwrap();
        assert!(read_head(s).await.starts_with("HTTP/1.1 200"));
    }
    let mut third = TcpStream::connect(r.proxy_addr).await.unwrap();
    let _ = third
        .write_all(b"GET / HTTP/1.1\r\nHost: hello.test\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection is closed without an answer");
    drop(a);
    // A slot frees up when a connection ends.
    wait_until(
        "a new connection is served",
        Duration::from_secs(5),
        || async {
            let mut s = TcpStream::connect(r.proxy_addr).await.unwrap();
            let _ = s
                .write_all(b"GET / HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n")
                .await;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            out.starts_with(b"HTTP/1.1 200")
        },
    )
    .await;
    let m = get(&client(), r.admin_addr, "a", "/metrics").await.body;
    assert!(
        metric(
            &m,
            "reveille_rejected_total{reason=\"max_connections\",service=\"\"}"
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_held_limit_spans_services() {
    let (p1, p2) = (free_port(), free_port());
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nlimits: {{ max_held: 2 }}\nservices:\n  - name: a\n    hosts: [a.test]\n    backend: {{ process: {{ command: {}, address: 127.0.0.1:{p1} }} }}\n  - name: b\n    hosts: [b.test]\n    backend: {{ process: {{ command: {}, address: 127.0.0.1:{p2} }} }}\n",
        demo_command(p1, "1s"),
        demo_command(p2, "1s")
    );
    let r = start(&yaml).await;
    let c = client();
    let addr = r.proxy_addr;
    let (c1, c2) = (c.clone(), c.clone());
    let a = tokio::spawn(async move { get(&c1, addr, "a.test", "/").await });
    let b = tokio::spawn(async move { get(&c2, addr, "b.test", "/").await });
    let (ga, gb) = (r.gates()[0].clone(), r.gates()[1].clone());
    wait_until("two held", Duration::from_secs(5), || {
        let (ga, gb) = (ga.clone(), gb.clone());
        async move { ga.held() + gb.held() == 2 }
    })
    .await;
    let third = get(&c, addr, "a.test", "/").await;
    assert_eq!(third.status, 503);
    assert_eq!(third.header("x-reveille-error"), Some("held_limit"));
    assert_eq!(a.await.unwrap().status, 200);
    assert_eq!(b.await.unwrap().status, 200);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_client_idle_timeout() {
    let backend = demo_in_process().await;
    let r = start(&static_config(
        &[backend],
        "timeouts: { client_idle: 500ms }",
        "",
    ))
    .await;
    let mut s = TcpStream::connect(r.proxy_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: hello.test\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    let mut rest = [0u8; 256];
    // Drain the body, then wait: the idle connection is closed by Reveille.
    let t0 = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut rest).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle connection still open after 10 s");
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "closed early: {:?}",
        t0.elapsed()
    );
    stop(r).await;
}
