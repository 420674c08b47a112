use super::*;
use crate::forward::answer::error_head as write_error;

const CONFIG: &str = "listen: 127.0.0.1:0
admin: 127.0.0.1:0
services:
  - name: web
    hosts: [web.test]
    backend: { static: { addresses: [\"127.0.0.1:1\"] } }
  - name: grpc
    hosts: [grpc.test]
    protocol: h2c
    backend: { static: { addresses: [\"127.0.0.1:2\"] } }
";

/// The state every connection shares, for the services of `yaml`.
async fn shared(yaml: &str) -> Arc<crate::forward::Shared> {
    crate::app::testing::TestState::new(yaml)
        .max_held(10)
        .shared()
        .await
}

async fn proxy() -> Proxy {
    Proxy::new(shared(CONFIG).await, ([192, 0, 2, 7], 5000).into(), "http")
}

fn forward(p: &Proxy, head: &str) -> (Forward, String) {
    let mut out = Vec::new();
    match plan(head.as_bytes(), &mut out, p) {
        Plan::Forward(f) => (f, String::from_utf8(out).unwrap()),
        Plan::Partial => panic!("partial: {head:?}"),
        Plan::Handoff => panic!("handed off: {head:?}"),
    }
}

fn handed_off(p: &Proxy, head: &str) -> bool {
    matches!(plan(head.as_bytes(), &mut Vec::new(), p), Plan::Handoff)
}

#[tokio::test]
async fn a_common_request_is_rewritten_for_the_backend() {
    let p = proxy().await;
    let head = "GET /a/b?c=1&d=%20 HTTP/1.1\r\nHost: WEB.test:8080\r\nConnection: keep-alive\r\n\
        Keep-Alive: timeout=5\r\nProxy-Authorization: secret\r\nX-Forwarded-For: 10.0.0.1\r\n\
        X-Forwarded-Host: evil\r\nX-Forwarded-For: caf\u{e9}\r\nx-forwarded-for: 10.0.0.2\r\n\
        X-Forwarded-Proto: https\r\nAccept: */*\r\nContent-Length: 0\r\n\r\nGET /next";
    let (f, out) = forward(&p, head);
    assert_eq!(f.gate.name().as_ref(), "web");
    assert_eq!(f.head_len, head.len() - "GET /next".len());
    assert!(!f.close && f.idempotent && !f.head);
    assert_eq!(
        out,
        "GET /a/b?c=1&d=%20 HTTP/1.1\r\nHost: WEB.test:8080\r\nAccept: */*\r\n\
         Content-Length: 0\r\nx-forwarded-host: WEB.test:8080\r\n\
         x-forwarded-for: 10.0.0.1, 10.0.0.2, 192.0.2.7\r\nx-forwarded-proto: http\r\n\r\n"
    );
}

#[tokio::test]
async fn close_head_and_methods_are_noted() {
    let p = proxy().await;
    let (f, out) = forward(
        &p,
        "HEAD / HTTP/1.1\r\nhost: web.test\r\nconnection: Close\r\n\r\n",
    );
    assert!(f.close && f.head && f.idempotent);
    assert!(!out.to_ascii_lowercase().contains("connection"), "{out}");
    let (f, _) = forward(&p, "POST /x HTTP/1.1\r\nhost: web.test\r\n\r\n");
    assert!(!f.idempotent && !f.head && !f.close);
    assert_eq!(f.body, 0);
    let (f, out) = forward(
        &p,
        "POST /x HTTP/1.1\r\nhost: web.test\r\ncontent-length: 65536\r\n\r\nab",
    );
    assert_eq!(f.body, 65536);
    assert!(out.contains("content-length: 65536\r\n"), "{out}");
    assert!(
        !out.ends_with("ab"),
        "the body is not part of the head: {out}"
    );
}

#[tokio::test]
async fn incomplete_heads_wait_for_more() {
    let p = proxy().await;
    for head in [
        "G",
        "GET / HTTP/1.1\r\n",
        "GET / HTTP/1.1\r\nHost: web.test\r\n",
    ] {
        assert!(
            matches!(plan(head.as_bytes(), &mut Vec::new(), &p), Plan::Partial),
            "{head:?}"
        );
    }
}

#[tokio::test]
async fn uncommon_requests_go_to_hyper() {
    let p = proxy().await;
    for head in [
        // Bodies, expectations, upgrades, hop-by-hop lists, trailers.
        "POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 65537\r\n\r\nhello",
        "POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: +5\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n",
        "PUT / HTTP/1.1\r\nHost: web.test\r\nExpect: 100-continue\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: web.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: web.test\r\nConnection: x-secret\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: web.test\r\nTE: trailers\r\n\r\n",
        // Other versions and target forms.
        "GET / HTTP/1.0\r\nHost: web.test\r\n\r\n",
        "GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: web.test\r\n\r\n",
        "CONNECT web.test:443 HTTP/1.1\r\nHost: web.test:443\r\n\r\n",
        "GET /a\"b HTTP/1.1\r\nHost: web.test\r\n\r\n",
        "GET /a<b> HTTP/1.1\r\nHost: web.test\r\n\r\n",
        // Hosts hyper's path must judge (400) or route (404, Knative).
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: web.test\r\nHost: web.test\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: caf\u{e9}.test\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: web.test\r\nKnative-Serving-Revision: r\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: web.test\r\nK-Network-Probe: probe\r\n\r\n",
        // A backend that is not cleartext HTTP/1.1.
        "GET / HTTP/1.1\r\nHost: grpc.test\r\n\r\n",
        // Broken heads: hyper answers them.
        "GET / HTTP/1.1\r\nHost : web.test\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: web.test\r\n folded\r\n\r\n",
    ] {
        assert!(handed_off(&p, head), "{head:?}");
    }
    let many: String = (0..FAST_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
    assert!(handed_off(
        &p,
        &format!("GET / HTTP/1.1\r\nHost: web.test\r\n{many}\r\n")
    ));
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: web.test\r\n\r\n",
        "a".repeat(MAX_URI_BYTES)
    );
    assert!(handed_off(&p, &long));
}

/// `head` without the `date` field Reveille adds (which must be there, once, and valid).
fn without_date(head: &str) -> String {
    let dates: Vec<&str> = head
        .split("\r\n")
        .filter(|l| l.to_ascii_lowercase().starts_with("date: "))
        .collect();
    assert_eq!(dates.len(), 1, "one date: {head}");
    let value = &dates[0]["date: ".len()..];
    assert!(httpdate::parse_http_date(value).is_ok(), "{value:?}");
    head.replacen(&format!("date: {value}\r\n"), "", 1)
}

fn respond(resp: &str, ctx: ResponseCtx) -> (Head, String) {
    let mut out = Vec::new();
    match response_head(resp.as_bytes(), &mut out, ctx) {
        Parsed::Complete(h) => (h, without_date(&String::from_utf8(out).unwrap())),
        Parsed::Partial => panic!("partial"),
        Parsed::Interim(_) => panic!("interim"),
        Parsed::Invalid(why) => panic!("invalid: {why}"),
    }
}

const PLAIN: ResponseCtx = ResponseCtx {
    cold: false,
    close: false,
    head_method: false,
};

#[test]
fn response_heads_lose_hop_by_hop_fields_and_keep_their_framing() {
    let resp = "HTTP/1.1 201 Made It\r\nContent-Length: 5\r\nConnection: keep-alive, x-hop\r\n\
         X-Hop: 1\r\nKeep-Alive: timeout=5\r\nServer: s\r\n\r\nhello";
    let (h, out) = respond(
        resp,
        ResponseCtx {
            cold: true,
            close: true,
            head_method: false,
        },
    );
    assert_eq!(
        (h.status, h.framing, h.reuse),
        (201, Framing::Length(5), true)
    );
    assert_eq!(h.len, resp.len() - "hello".len());
    assert_eq!(
        out,
        "HTTP/1.1 201 Made It\r\nContent-Length: 5\r\nServer: s\r\n\
         x-reveille-cold-start: true\r\nconnection: close\r\n\r\n"
    );

    let (_, out) = respond(
        "HTTP/1.1 200 OK\r\nX-Reveille-Cold-Start: false\r\nContent-Length: 0\r\n\r\n",
        ResponseCtx {
            cold: true,
            ..PLAIN
        },
    );
    assert_eq!(
        out.to_ascii_lowercase()
            .matches("x-reveille-cold-start")
            .count(),
        1,
        "{out}"
    );
    assert!(out.contains("x-reveille-cold-start: true\r\n"), "{out}");

    let (h, out) = respond(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
        PLAIN,
    );
    assert_eq!((h.framing, h.reuse), (Framing::Chunked, true));
    assert_eq!(out, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");

    // Until the backend closes: chunked for the client, the backend connection not reused.
    let (h, out) = respond("HTTP/1.0 200 OK\r\nServer: old\r\n\r\n", PLAIN);
    assert_eq!((h.framing, h.reuse), (Framing::UntilClose, false));
    assert!(out.ends_with("transfer-encoding: chunked\r\n\r\n"), "{out}");

    let (h, _) = respond(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
        PLAIN,
    );
    assert!(!h.reuse);

    // No body after HEAD, 204, 304: Content-Length is kept as the backend sent it to HEAD,
    // dropped on a 204 or 304 otherwise (as hyper's server does).
    let (h, out) = respond(
        "HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n",
        ResponseCtx {
            head_method: true,
            ..PLAIN
        },
    );
    assert_eq!(h.framing, Framing::Empty);
    assert!(out.contains("Content-Length: 42\r\n"));
    let (h, out) = respond(
        "HTTP/1.1 304 \r\nETag: x\r\nContent-Length: 42\r\n\r\n",
        PLAIN,
    );
    assert_eq!(h.framing, Framing::Empty);
    // The reason phrase as sent, empty too (as hyper's path).
    assert!(out.starts_with("HTTP/1.1 304 \r\n"), "{out}");
    assert!(!out.contains("Content-Length"), "{out}");
}

#[test]
fn broken_or_interim_responses_are_told_apart() {
    let mut out = Vec::new();
    assert!(matches!(
        response_head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n",
            &mut out,
            PLAIN
        ),
        Parsed::Interim(25)
    ));
    for bad in [
        &b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"SMTP ready\r\n\r\n",
        // Not a status code (hyper's client refuses it: 100..=999 only).
        b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 000 \r\nContent-Length: 0\r\n\r\n",
    ] {
        assert!(
            matches!(response_head(bad, &mut out, PLAIN), Parsed::Invalid(_)),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(matches!(
        response_head(b"HTTP/1.1 200 OK\r\n", &mut out, PLAIN),
        Parsed::Partial
    ));
    let (h, _) = respond("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n", PLAIN);
    assert_eq!(h.framing, Framing::Length(3));
}

#[test]
fn error_answers_carry_the_kind_and_close_when_asked() {
    let mut out = Vec::new();
    let e = ProxyError::QueueFull {
        service: "web".into(),
        capacity: 3,
    };
    write_error(&mut out, &e, true);
    let text = without_date(&String::from_utf8(out).unwrap());
    let body = e.body();
    assert_eq!(
        text,
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
             x-reveille-error: queue_full\r\nretry-after: 1\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
    );
}

#[test]
fn a_head_is_parsed_again_only_when_a_piece_may_end_it() {
    let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    // Fed byte by byte: only the last byte can end it.
    let ends: Vec<usize> = (1..=head.len())
        .filter(|&n| may_end_head(&head[..n], n - 1))
        .collect();
    assert_eq!(ends, [head.len()]);
    assert!(may_end_head(b"GET / HTTP/1.1\nHost: a\n\n", 20));
    assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: a\r\n", 0));
    assert!(may_end_head(
        &vec![b'a'; MAX_HEADER_BYTES + 1],
        MAX_HEADER_BYTES
    ));
}

/// A backend answering every request with a `len`-byte body (request bodies are read whole).
async fn answering(len: usize) -> SocketAddr {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 8192];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let body: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < end + body {
                        let mut chunk = [0u8; 8192];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + body);
                    let mut resp =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").into_bytes();
                    resp.resize(resp.len() + len, b'x');
                    if s.write_all(&resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A fast-path connection (its Reveille end) to `web.test` at `backend`, and its client end.
async fn connected(backend: SocketAddr) -> (Client<TcpStream>, TcpStream, Proxy) {
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: web\n    hosts: [web.test]\n    backend: {{ static: {{ addresses: [\"{backend}\"] }} }}\n"
    );
    let shared = shared(&yaml).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (peer, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (stream, remote) = accepted.unwrap();
    let proxy = Proxy::new(shared, remote, "http");
    // Never shut down.
    let (tx, close) = crate::shutdown::channel();
    std::mem::forget(tx);
    let c = Client {
        stream,
        buf: Vec::with_capacity(READ_BUF),
        out: Vec::new(),
        resp: Vec::new(),
        head_timer: Box::pin(tokio::time::sleep(std::time::Duration::from_secs(60))),
        resp_timer: None,
        last_host: None,
        cut: proxy.shared.in_flight_signal(),
        proxy: proxy.clone(),
        close,
        shutting: false,
    };
    (c, peer.unwrap(), proxy)
}

/// Reads `len` bytes of a response's body (after its head) on the client's end.
async fn drain_response(peer: &mut TcpStream, body: usize) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if got.len() == i + 4 + body {
                return;
            }
        }
        let n = peer.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the response ended early");
        got.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_keeps_no_large_buffers_after_large_transfers() {
    use tokio::io::AsyncWriteExt;
    let len = 512 * 1024;
    let (mut c, mut peer, p) = connected(answering(len).await).await;
    // A large download, then a large upload (a body of the most the fast path takes).
    let body = MAX_FAST_BODY as usize;
    let heads = [
        "GET /big HTTP/1.1\r\nHost: web.test\r\n\r\n".to_string(),
        format!("POST /up HTTP/1.1\r\nHost: web.test\r\nContent-Length: {body}\r\n\r\n"),
    ];
    for (i, head) in heads.iter().enumerate() {
        let Plan::Forward(f) = plan(head.as_bytes(), &mut c.out, &p) else {
            panic!("not forwarded: {head}");
        };
        if i == 1 {
            peer.write_all(&vec![b'u'; body]).await.unwrap();
        }
        c.buf.splice(0..0, head.bytes());
        let mut cut = c.cut.clone();
        let cut = std::pin::pin!(OnlyWhenWoken::new(cut.fired()));
        let (kept, ()) = tokio::join!(c.request(f, cut), drain_response(&mut peer, len));
        assert!(matches!(kept, Next::KeepAlive));
        let (buf, out, resp) = (c.buf.capacity(), c.out.capacity(), c.resp.capacity());
        assert!(
            buf <= KEEP_BUF && out <= KEEP_BUF && resp <= KEEP_BUF,
            "after {head:?}: read buffer {buf}, head buffer {out}, response buffer {resp} bytes"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_handed_to_hyper_keeps_nothing_of_the_fast_path() {
    use tokio::io::AsyncWriteExt;
    let (mut c, mut peer, p) = connected(answering(5).await).await;
    let head = "GET /fast HTTP/1.1\r\nHost: web.test\r\n\r\n";
    let Plan::Forward(f) = plan(head.as_bytes(), &mut c.out, &p) else {
        panic!("not forwarded");
    };
    c.buf.extend_from_slice(head.as_bytes());
    let mut cut = c.cut.clone();
    let cut = std::pin::pin!(OnlyWhenWoken::new(cut.fired()));
    let (kept, ()) = tokio::join!(c.request(f, cut), drain_response(&mut peer, 5));
    assert!(matches!(kept, Next::KeepAlive));
    let host = c.last_host.as_ref().expect("a backend was used").1.clone();
    let timeouts = crate::Config::parse(CONFIG).unwrap().timeouts;
    let inbound = Arc::new(Inbound::new(&timeouts));
    let guard = crate::listen::Connections::new(1).try_open().unwrap();
    tokio::spawn(handoff(inbound, c, guard));
    // hyper serves the connection now.
    peer.write_all(b"GET /hyper HTTP/1.1\r\nHost: web.test\r\n\r\n")
        .await
        .unwrap();
    drain_response(&mut peer, 5).await;
    // The pool's map and this test hold the endpoint's idle list; the connection, served by
    // hyper for as long as the client keeps it (a WebSocket: hours), no longer does, nor its
    // buffers and timers.
    assert_eq!(Arc::strong_count(&host), 2);
}

#[test]
fn response_fields_that_are_special_only_in_requests_are_passed_on() {
    let (_, out) = respond(
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nKnative-Serving-Revision: r1\r\n\
         K-Network-Probe: queue\r\nExpect: x\r\nTrailer: x\r\nUpgrade: y\r\nTE: t\r\n\r\n",
        PLAIN,
    );
    assert_eq!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nKnative-Serving-Revision: r1\r\n\
         K-Network-Probe: queue\r\nExpect: x\r\n\r\n"
    );
}

#[test]
fn a_response_without_date_gets_one_and_one_with_date_keeps_it() {
    let mut out = Vec::new();
    let Parsed::Complete(_) = response_head(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        &mut out,
        PLAIN,
    ) else {
        panic!("not complete");
    };
    // Added, as hyper's server does (RFC 9110 §6.6.1: a proxy adds the one it lacks).
    without_date(&String::from_utf8(out.clone()).unwrap());
    let backend =
        "HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 0\r\n\r\n";
    let Parsed::Complete(_) = response_head(backend.as_bytes(), &mut out, PLAIN) else {
        panic!("not complete");
    };
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 0\r\n\r\n"
    );
}

mod properties;

/// The fast path's field table (bytes, any case) and the hyper path's hop-by-hop list
/// (`HeaderName`s) are two spellings of one rule: they must not drift apart.
#[test]
fn the_fast_path_and_hyper_path_agree_on_hop_by_hop_fields() {
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "x-forwarded-for",
        "accept",
        "expect",
        "cookie",
    ] {
        let header = http::HeaderName::from_static(name);
        let dropped_or_handed_off = !matches!(
            crate::fields::field(name.to_ascii_uppercase().as_bytes()),
            crate::fields::Field::Host
                | crate::fields::Field::ContentLength
                | crate::fields::Field::Other
                | crate::fields::Field::XForwardedFor
        ) && name != "expect";
        assert_eq!(
            dropped_or_handed_off,
            crate::upstream::is_hop_by_hop(&header),
            "{name}"
        );
    }
}
