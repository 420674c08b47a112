//! Bad input on the wire: raw bytes over TCP to a Reveille on 127.0.0.1, checking what each
//! malformed or hostile request gets, that nothing of it reaches the backend, and that the proxy
//! keeps serving afterwards.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use reveille::route::checks::{MAX_HEADERS, MAX_HEADER_BYTES, MAX_URI_BYTES};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `bytes`, then reads until the server closes (or 10 s pass, or the connection is
/// reset). Returns what was read.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read everything; keep what it said.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "server kept the connection open; read so far: {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    out
}

fn status_line(resp: &[u8]) -> String {
    String::from_utf8_lossy(resp)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

fn has_header(resp: &[u8], line: &[u8]) -> bool {
    let lower = resp.to_ascii_lowercase();
    lower.windows(line.len()).any(|w| w == line)
}

/// Number of HTTP responses in a raw byte stream.
fn responses(resp: &[u8]) -> usize {
    resp.windows(9).filter(|w| w == b"HTTP/1.1 ").count()
}

async fn backend_log(addr: SocketAddr) -> String {
    get(&client(), addr, "hello.test", "/_demo/log").await.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_limits_answer_431_400_and_414() {
    let r = start(&process_config(free_port(), "0s", &[])).await;
    let addr = r.proxy_addr;

    // One header larger than the whole head may be.
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: hello.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(MAX_HEADER_BYTES + 1024)
    );
    let resp = exchange(addr, big.as_bytes()).await;
    assert_eq!(
        status_line(&resp),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );

    // More header fields than allowed.
    let mut many = String::from("GET /many HTTP/1.1\r\nHost: hello.test\r\n");
    for i in 0..MAX_HEADERS {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let resp = exchange(addr, many.as_bytes()).await;
    assert_eq!(
        status_line(&resp),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );

    // Malformed request lines.
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\nHost: hello.test\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: hello.test\r\n\r\n",
        b"G\x01T / HTTP/1.1\r\nHost: hello.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost hello.test\r\n\r\n",
    ] {
        let resp = exchange(addr, bad).await;
        assert_eq!(
            status_line(&resp),
            "HTTP/1.1 400 Bad Request",
            "for {:?}",
            String::from_utf8_lossy(bad)
        );
    }

    // A target over our limit (well inside hyper's own) gets 414 from Reveille.
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n",
        "u".repeat(MAX_URI_BYTES)
    );
    let resp = exchange(addr, long.as_bytes()).await;
    assert_eq!(status_line(&resp), "HTTP/1.1 414 URI Too Long");
    assert!(has_header(&resp, b"x-reveille-error: uri_too_long"));

    // None of it reached the backend, and the proxy still serves.
    let ok = get(&client(), addr, "hello.test", "/still-fine").await;
    assert_eq!(ok.status, 200);
    assert_eq!(backend_log(addr).await, "GET /still-fine\n");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_cannot_smuggle() {
    let r = start(&process_config(free_port(), "0s", &[])).await;
    let addr = r.proxy_addr;
    // Wake the backend first so the log below only has what these requests caused.
    assert_eq!(
        get(&client(), addr, "hello.test", "/warm").await.status,
        200
    );

    // CL.TE: a front end honouring Content-Length would see the smuggled GET as a second
    // request. hyper takes the chunked framing (body ends at `0`), drops Content-Length, and
    // closes the connection after the response, so the trailing bytes are never parsed.
    let cl_te = b"POST /first HTTP/1.1\r\nHost: hello.test\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: hello.test\r\n\r\n";
    let resp = exchange(addr, cl_te).await;
    assert_eq!(status_line(&resp), "HTTP/1.1 200 OK");
    assert_eq!(responses(&resp), 1, "{}", String::from_utf8_lossy(&resp));

    // TE.CL, the other order: the chunked body wins, whole, and the connection closes.
    let te_cl = b"POST /_demo/echo HTTP/1.1\r\nHost: hello.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled2 HTTP/1.1\r\nHost: hello.test\r\n\r\n";
    let resp = exchange(addr, te_cl).await;
    assert_eq!(status_line(&resp), "HTTP/1.1 200 OK");
    assert_eq!(responses(&resp), 1, "{}", String::from_utf8_lossy(&resp));
    let text = String::from_utf8_lossy(&resp);
    // The echo is exactly the five bytes `hello`, not the three of the CL. (A chunked body of
    // up to 64 KiB is read whole before it is sent, so it reaches the backend, and comes back,
    // with its length; a longer one streams, chunked.)
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        assert_eq!(body, "5\r\nhello\r\n0\r\n\r\n", "{text}");
    } else {
        assert!(
            head.to_ascii_lowercase().contains("content-length: 5"),
            "{text}"
        );
        assert_eq!(body, "hello", "{text}");
    }

    // Other framing hyper refuses itself: two different lengths, a length that is not a
    // number, chunked on HTTP/1.0, a coding whose last one is not chunked.
    for bad in [
        &b"POST /cl2 HTTP/1.1\r\nHost: hello.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"[..],
        b"POST /cl-nan HTTP/1.1\r\nHost: hello.test\r\nContent-Length: 5x\r\n\r\nhello",
        b"POST /te10 HTTP/1.0\r\nHost: hello.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /te-gzip HTTP/1.1\r\nHost: hello.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    ] {
        let resp = exchange(addr, bad).await;
        assert_eq!(
            status_line(&resp),
            "HTTP/1.1 400 Bad Request",
            "for {:?}",
            String::from_utf8_lossy(bad)
        );
    }

    // Codings Reveille cannot keep the framing of are refused before forwarding.
    for te in ["gzip, chunked", "chunked, chunked"] {
        let req = format!(
            "POST /coded HTTP/1.1\r\nHost: hello.test\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let resp = exchange(addr, req.as_bytes()).await;
        assert_eq!(status_line(&resp), "HTTP/1.1 400 Bad Request", "for {te}");
        assert!(has_header(
            &resp,
            b"x-reveille-error: bad_transfer_encoding"
        ));
        assert!(has_header(&resp, b"connection: close"));
    }

    let log = backend_log(addr).await;
    assert_eq!(
        log, "GET /warm\nPOST /first\nPOST /_demo/echo\n",
        "backend saw: {log}"
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_and_non_utf8_header_bytes() {
    let r = start(&process_config(free_port(), "0s", &[])).await;
    let addr = r.proxy_addr;

    // HTTP/1.1 without Host, and an unknown Host.
    let resp = exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(status_line(&resp), "HTTP/1.1 400 Bad Request");
    assert!(has_header(&resp, b"x-reveille-error: missing_host"));
    let resp = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: nope.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_line(&resp), "HTTP/1.1 404 Not Found");
    assert!(has_header(&resp, b"x-reveille-error: no_route"));
    // A Host that is not ASCII, and two Hosts.
    let resp = exchange(addr, b"GET / HTTP/1.1\r\nHost: h\xe9llo.test\r\n\r\n").await;
    assert_eq!(status_line(&resp), "HTTP/1.1 400 Bad Request");
    assert!(has_header(&resp, b"x-reveille-error: invalid_host"));
    let resp = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: hello.test\r\nHost: other.test\r\n\r\n",
    )
    .await;
    assert_eq!(status_line(&resp), "HTTP/1.1 400 Bad Request");
    assert!(has_header(&resp, b"x-reveille-error: invalid_host"));

    // Header values with bytes >= 0x80 are passed through untouched, both ways.
    let resp = exchange(
        addr,
        b"GET /latin1 HTTP/1.1\r\nHost: hello.test\r\nX-Demo-Echo: caf\xe9 \xff\xfe\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_line(&resp), "HTTP/1.1 200 OK");
    assert!(
        has_header(&resp, b"x-demo-echo: caf\xe9 \xff\xfe\r\n"),
        "{}",
        String::from_utf8_lossy(&resp)
    );

    let metrics = get(&client(), r.admin_addr, "admin", "/metrics").await.body;
    for (reason, n) in [
        ("missing_host", 1.0),
        ("no_route", 1.0),
        ("invalid_host", 2.0),
    ] {
        assert_eq!(
            metric(
                &metrics,
                &format!("reveille_rejected_total{{reason=\"{reason}\",service=\"\"}}")
            ),
            Some(n),
            "{reason}"
        );
    }
    assert_eq!(backend_log(addr).await, "GET /latin1\n");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_never_ends_is_cut_off() {
    let mut yaml = process_config(free_port(), "0s", &[]);
    yaml.push_str("timeouts:\n  client_header: 300ms\n");
    let r = start(&yaml).await;
    // Half a request head, then silence: closed without an answer (bounded by exchange's 10 s).
    let resp = exchange(r.proxy_addr, b"GET /slow HTTP/1.1\r\nHost: hel").await;
    assert_eq!(resp, b"", "{}", String::from_utf8_lossy(&resp));
    assert_eq!(
        get(&client(), r.proxy_addr, "hello.test", "/_demo/log")
            .await
            .status,
        200
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_or_a_preface_that_stops_is_cut_off() {
    let mut yaml = process_config(free_port(), "0s", &[]);
    yaml.push_str("timeouts:\n  client_header: 300ms\n");
    let r = start(&yaml).await;
    // Nothing at all, or the start of the HTTP/2 preface (which could still become
    // "PRI * HTTP/2.0" or "PROPFIND"), then silence: closed without an answer (bounded by
    // exchange's 10 s).
    for bytes in [&b""[..], b"P", b"PRI"] {
        let resp = exchange(r.proxy_addr, bytes).await;
        assert_eq!(
            resp,
            b"",
            "for {bytes:?}: {}",
            String::from_utf8_lossy(&resp)
        );
    }
    stop(r).await;
}

/// Writes `parts` with a pause between them, then reads until `want` bytes came or the
/// server closes.
async fn trickle(addr: SocketAddr, parts: &[&[u8]], want: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    for p in parts {
        s.write_all(p).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < want {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer in 10 s: {:?}", String::from_utf8_lossy(&out)),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_sent_one_by_one_still_pick_the_right_protocol() {
    let r = start(&process_config(free_port(), "0s", &[])).await;
    // HTTP/1 whose method starts like the HTTP/2 preface.
    let resp = trickle(
        r.proxy_addr,
        &[
            b"P",
            b"R",
            b"OPFIND /dav HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n",
        ],
        usize::MAX,
    )
    .await;
    assert_eq!(status_line(&resp), "HTTP/1.1 200 OK");
    // The HTTP/2 preface in pieces, then an empty SETTINGS frame: the answer is HTTP/2 frames,
    // the first one the server's SETTINGS (type 4 on stream 0).
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    let resp = trickle(
        r.proxy_addr,
        &[b"P", b"RI", b" * HTTP/2.0\r\n\r\nSM\r\n\r\n", &settings],
        9,
    )
    .await;
    assert!(resp.len() >= 9, "{resp:?}");
    assert_eq!(resp[3], 4, "a SETTINGS frame first: {resp:?}");
    assert_eq!(&resp[5..9], &[0, 0, 0, 0], "on stream 0: {resp:?}");
    assert_eq!(backend_log(r.proxy_addr).await, "PROPFIND /dav\n");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_limits_answer_431_and_414() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let r = start(&process_config(free_port(), "0s", &[])).await;
    let tcp = TcpStream::connect(r.proxy_addr).await.unwrap();
    // h2c with prior knowledge on the plain listener.
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut status = |path: String, extra: Option<String>| {
        let mut req = http::Request::get(format!("http://hello.test{path}"));
        if let Some(v) = extra {
            req = req.header("x-big", v);
        }
        let fut = send.send_request(req.body(Empty::<bytes::Bytes>::new()).unwrap());
        async move {
            let resp = tokio::time::timeout(Duration::from_secs(10), fut)
                .await
                .expect("answer within 10s")
                .expect("response");
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            status
        }
    };
    // The header list over MAX_HEADER_BYTES: h2 answers 431 and resets the stream.
    let big = status("/big".into(), Some("a".repeat(MAX_HEADER_BYTES + 1024))).await;
    assert_eq!(big, 431);
    // A target over MAX_URI_BYTES: Reveille's own 414.
    let long = status(format!("/{}", "u".repeat(MAX_URI_BYTES)), None).await;
    assert_eq!(long, 414);
    // Half the limit passes (above h2's 16 KiB default, so the limit set is the one in force).
    let half = status("/half".into(), Some("h".repeat(MAX_HEADER_BYTES / 2))).await;
    assert_eq!(half, 200);
    // The connection is still good; only the requests within the limits were forwarded.
    assert_eq!(status("/fine".into(), None).await, 200);
    assert_eq!(backend_log(r.proxy_addr).await, "GET /half\nGET /fine\n");
    stop(r).await;
}
