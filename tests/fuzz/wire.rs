//! Heads and bodies on the wire, through both request paths: random requests — well formed or
//! broken in one of the ways attackers break them (framing that lies, chunked bodies with bad
//! sizes, bare LFs or missing CRLFs, hostile routing fields) — are sent as raw bytes to a
//! Reveille on 127.0.0.1 in front of a recording backend with a strict parser. Small
//! `Content-Length` bodies take the HTTP/1.1 fast path; chunked, large, or `Connection`-listing
//! requests take hyper's. The property: the backend never receives a request the client did not
//! send as one complete, well-formed request — every request the backend saw whole is one the
//! client sent whole and valid, with the same body and Host, and without the fields Reveille
//! strips.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cfg;

/// One request the backend received whole.
#[derive(Debug, Clone)]
struct Whole {
    head: String,
    body: Vec<u8>,
}

/// How a generated body is framed, and whether the framing is honest.
#[derive(Debug, Clone)]
enum Framing {
    None,
    Length,
    /// `Content-Length` larger than what is sent (then the client stops sending).
    ShortLength,
    Chunked {
        pieces: usize,
    },
    /// Chunked, broken in one of four ways.
    BadChunked {
        how: u8,
        pieces: usize,
    },
}

#[derive(Clone)]
struct Case {
    method: &'static str,
    body: Vec<u8>,
    framing: Framing,
    /// A `Connection` list naming another field (hands the request to hyper's path).
    listed: bool,
    hostile: Vec<&'static str>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} with {} body bytes, {:?}, listed {}, {:?}",
            self.method,
            self.body.len(),
            self.framing,
            self.listed,
            self.hostile
        )
    }
}

const HOSTILE: &[&str] = &[
    "Knative-Serving-Revision: other",
    "Knative-Serving-Namespace: default",
    "K-Original-Host: forged",
    "X_Forwarded_For: 6.6.6.6",
    "Connection: host",
    "Upgrade: h2c",
];

fn case() -> impl Strategy<Value = Case> {
    let framing = prop_oneof![
        Just(Framing::None),
        Just(Framing::Length),
        Just(Framing::ShortLength),
        (1usize..4).prop_map(|pieces| Framing::Chunked { pieces }),
        (0u8..4, 1usize..4).prop_map(|(how, pieces)| Framing::BadChunked { how, pieces }),
    ];
    let size = prop_oneof![3 => 0usize..200, 1 => 60_000usize..140_000];
    (
        proptest::sample::select(&["GET", "POST", "PUT"][..]),
        size,
        any::<u8>(),
        framing,
        any::<bool>(),
        proptest::sample::subsequence(HOSTILE, 0..3),
    )
        .prop_map(|(method, size, fill, framing, listed, hostile)| Case {
            method,
            body: (0..size).map(|i| fill.wrapping_add(i as u8) | 1).collect(),
            framing,
            listed,
            hostile,
        })
}

impl Case {
    /// The bytes sent, and whether they are one complete, valid request.
    fn wire(&self) -> (Vec<u8>, bool) {
        let mut head = format!("{} /in HTTP/1.1\r\nHost: fuzz.test\r\n", self.method);
        if self.listed {
            head.push_str("Connection: x-listed\r\nX-Listed: 1\r\n");
        }
        for h in &self.hostile {
            head.push_str(h);
            head.push_str("\r\n");
        }
        let body = &self.body;
        let mut out = Vec::new();
        let valid = match &self.framing {
            Framing::None => {
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(b"\r\n");
                true
            }
            Framing::Length => {
                head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(body);
                true
            }
            Framing::ShortLength => {
                head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len() + 10));
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(body);
                false
            }
            Framing::Chunked { pieces } | Framing::BadChunked { pieces, .. } => {
                head.push_str("Transfer-Encoding: chunked\r\n\r\n");
                out.extend_from_slice(head.as_bytes());
                let bad = match self.framing {
                    Framing::BadChunked { how, .. } => Some(how),
                    _ => None,
                };
                let step = body.len().div_ceil(*pieces).max(1);
                let chunks: Vec<&[u8]> = body.chunks(step).collect();
                // The break goes into the last data chunk (or the end if there is none).
                let last = chunks.len().saturating_sub(1);
                for (i, c) in chunks.iter().enumerate() {
                    match bad.filter(|_| i == last) {
                        Some(0) => out.extend_from_slice(b"fffffffffffffffffffff\r\n"),
                        Some(1) => out.extend_from_slice(format!("{:x}\n", c.len()).as_bytes()),
                        Some(2) => out.extend_from_slice(format!("{:x};x=y\n", c.len()).as_bytes()),
                        _ => out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes()),
                    }
                    out.extend_from_slice(c);
                    if bad == Some(3) && i == last {
                        out.extend_from_slice(b"XX");
                    } else {
                        out.extend_from_slice(b"\r\n");
                    }
                }
                if chunks.is_empty() && bad.is_some() {
                    out.extend_from_slice(b"5\nhello\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
                bad.is_none()
            }
        };
        (out, valid)
    }
}

/// A backend with a strict parser that records each request it received whole.
async fn recorder() -> (SocketAddr, Arc<Mutex<Vec<Whole>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s, s2.clone()));
        }
    });
    (addr, seen)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn more(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut b = [0u8; 65536];
    matches!(s.read(&mut b).await, Ok(n) if n > 0 && { buf.extend_from_slice(&b[..n]); true })
}

async fn serve(mut s: TcpStream, seen: Arc<Mutex<Vec<Whole>>>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !more(&mut s, &mut buf).await {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        let length = head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n.trim() == "content-length").then(|| v.trim().parse::<usize>().ok())?
        });
        let body = if head.contains("transfer-encoding: chunked") {
            match chunked(&mut s, &mut buf).await {
                Some(b) => b,
                None => return,
            }
        } else {
            let n = length.unwrap_or(0);
            while buf.len() < n {
                if !more(&mut s, &mut buf).await {
                    return;
                }
            }
            buf.drain(..n).collect()
        };
        seen.lock().push(Whole { head, body });
        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn chunked(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let i = loop {
            if let Some(i) = find(buf, b"\r\n") {
                break i;
            }
            if !more(s, buf).await {
                return None;
            }
        };
        let line = std::str::from_utf8(&buf[..i]).ok()?.to_string();
        if line.contains('\n') {
            return None;
        }
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        buf.drain(..i + 2);
        while buf.len() < size + 2 {
            if !more(s, buf).await {
                return None;
            }
        }
        if &buf[size..size + 2] != b"\r\n" {
            return None;
        }
        if size == 0 {
            buf.drain(..2);
            return Some(body);
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// Sends `bytes` on a fresh connection and reads until the backend's answer (`ok`) came or the
/// connection closes (at most 10 s). A request that is not whole has its sending side closed
/// after it (the end of a lying `Content-Length`).
async fn send(addr: SocketAddr, bytes: &[u8], whole: bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    if !whole {
        let _ = s.shutdown().await;
    }
    let mut b = [0u8; 8192];
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = s.read(&mut b).await {
            if n == 0 {
                return;
            }
            got.extend_from_slice(&b[..n]);
            if got.ends_with(b"\r\n\r\nok") {
                return;
            }
        }
    })
    .await;
}

#[test]
fn the_backend_only_ever_sees_whole_valid_requests() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (backend, seen) = rt.block_on(recorder());
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntimeouts: {{ client_body: 1s }}\nservices:\n  - name: fuzz\n    hosts: [fuzz.test]\n    backend: {{ static: {{ addresses: [\"{backend}\"] }} }}\n"
    );
    let running = rt.block_on(async {
        reveille::start(reveille::Config::parse(&yaml).unwrap())
            .await
            .unwrap()
    });
    let proxy = running.proxy_addr;
    // Fewer cases than the pure targets: each one is a round trip through real sockets.
    let mut config = cfg();
    config.cases = config.cases.div_ceil(4);
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |c| {
        seen.lock().clear();
        let (bytes, valid) = c.wire();
        rt.block_on(send(proxy, &bytes, valid));
        // A backend request cut midway is never recorded: give the proxy a moment to finish
        // what it forwards before looking.
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        let got = seen.lock().clone();
        if !valid {
            prop_assert!(
                got.is_empty(),
                "backend got {} requests for a broken request {c:?}",
                got.len()
            );
            return Ok(());
        }
        prop_assert_eq!(got.len(), 1, "{:?}", c);
        let w = &got[0];
        let expected: &[u8] = if matches!(c.framing, Framing::None) {
            &[]
        } else {
            &c.body
        };
        prop_assert!(
            w.body == expected,
            "backend got {} body bytes for {:?}: {}",
            w.body.len(),
            c,
            w.head
        );
        prop_assert!(w.head.contains("\r\nhost: fuzz.test\r\n"), "{}", w.head);
        for stripped in [
            "knative-serving",
            "k-original-host",
            "x_forwarded_for",
            "upgrade",
            "x-listed",
        ] {
            prop_assert!(!w.head.contains(stripped), "{} in {}", stripped, w.head);
        }
        Ok(())
    });
    rt.block_on(async {
        running.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(30), running.wait()).await;
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
