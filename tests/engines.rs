//! The two HTTP/1.1 engines, differentially: the same generated requests go through the fast
//! path (`listen::fast`) and through hyper's path (`forward::Proxy` + `upstream::Outgoing`) to
//! one recording backend, which answers each with a generated response; the backend must see
//! the same request from both, and the client the same response.
//!
//! Each case is a request the fast path takes (no `Transfer-Encoding`, `TE`, `Upgrade`,
//! `Expect`, Knative fields or `Connection` list other than `close`/`keep-alive`; a small
//! `Content-Length` body; a plain target), with random fields (mixed case, underscores,
//! duplicates), `X-Forwarded-*` lines from the client, hop-by-hop fields, and a response to
//! give back (1xx responses first, HTTP/1.1 or 1.0, status and reason (canonical, custom,
//! empty), fields including hop-by-hop ones and ones a `Connection` list names, a body framed
//! by `Content-Length` (sometimes twice), chunked (with extensions, trailer fields, a
//! `Content-Length` beside it) or the backend's close). It is sent twice:
//! (a) on a fresh connection, where the fast path serves it; (b) on a connection whose first
//! request was a chunked upload, which hyper serves from then on. Which engine served each is
//! checked, not assumed: the fast path writes field names as the client sent them, hyper's
//! path lowercases them.
//!
//! What counts as the same (the normalisation, and why it is legitimate):
//! - field names compare lowercased (they are case-insensitive, RFC 9110 §5.1; hyper writes
//!   them lowercase, the fast path as sent);
//! - fields compare grouped by name: the values of one name in their order, but the order of
//!   fields with different names is free (it carries no meaning, RFC 9110 §5.3; a `HeaderMap`
//!   groups by name, the fast path keeps the client's order);
//! - the client's `Date` is ignored (each engine stamps its own second);
//! - a body compares decoded: a chunked one by its data and trailer fields, not its chunk
//!   sizes or extensions (a proxy may re-chunk; the fast path passes chunks as the backend
//!   sent them, hyper's path re-chunks).
//!
//! Everything else must be equal byte for byte: method, target, request body, response
//! version, status code, reason phrase, field values, response body. Beyond equality a few
//! rules are checked on both: no hop-by-hop field reaches the backend or the client, one
//! `X-Forwarded-For` ending with the client, the backend's status, HTTP/1.1 to the client.
//!
//! `PROPTEST_CASES` raises the case count (64 by default). A failure prints the shrunk case.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Cases unless `PROPTEST_CASES` says otherwise: each is four round trips over loopback.
const DEFAULT_CASES: u32 = 64;
/// Bound on each exchange (request written, response read whole).
const EXCHANGE: Duration = Duration::from_secs(10);
/// The request that moves a connection to hyper's path (and that the backend answers itself).
const WARMUP: &[u8] =
    b"POST /warmup-chunked HTTP/1.1\r\nHost: diff.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
const WARMUP_TARGET: &str = "/warmup-chunked";

/// Request field names a generated random name must not be: each has a rule of its own (and
/// is generated on purpose below, or would leave the fast path).
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "knative-serving-revision",
    "knative-serving-namespace",
    "k-original-host",
    "k-proxy-request",
    "k-network-probe",
    "date",
    "x-reveille-cold-start",
];

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];
const HOSTS: &[&str] = &["diff.test", "Diff.Test", "DIFF.TEST:8080", "diff.test."];
/// Names picked from a few, so that cases have duplicates (in one case or in several).
const COMMON_NAMES: &[&str] = &[
    "X-Dup",
    "x-dup",
    "X-DUP",
    "Accept",
    "accept",
    "Cookie",
    "X_Under",
    "x_under",
    "User-Agent",
    "K-Network-Hash",
    "Set-Cookie",
    "Vary",
];
const XFF: &[&str] = &[
    "1.2.3.4",
    "10.0.0.1, 10.0.0.2",
    "unknown",
    "2001:db8::1",
    "",
    "  5.6.7.8 ",
];
const XFH: &[&str] = &["evil.test", "a.test, b.test", ""];
const XFP: &[&str] = &["https", "http", "gopher", ""];
const CONNECTION: &[&str] = &[
    "keep-alive",
    "close",
    "Keep-Alive",
    "close, keep-alive",
    "CLOSE",
    "",
];
/// Response fields with a rule: hop-by-hop ones, ones a `Connection` list names (protected
/// or not), and ones Reveille also sets on requests.
const RESPONSE_FIELDS: &[(&str, &str)] = &[
    ("Connection", "x-foo"),
    ("X-Foo", "bar"),
    ("Connection", "close"),
    ("Connection", "keep-alive"),
    ("Connection", "X-Forwarded-For, set-cookie"),
    ("Keep-Alive", "timeout=5, max=100"),
    ("Proxy-Authenticate", "Basic realm=\"x\""),
    ("Proxy-Connection", "keep-alive"),
    ("X-Forwarded-For", "9.9.9.9"),
    ("X-Forwarded-Host", "backend.test"),
    ("X-Forwarded-Proto", "https"),
    ("Set-Cookie", "a=1"),
    ("Set-Cookie", "b=2; Path=/"),
    ("Trailer", "x-t"),
    ("Upgrade", "foo/1"),
    ("Server", "recorder"),
    ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
    ("Content-Type", "text/plain"),
    ("X-Reveille-Cold-Start", "maybe"),
];
const INTERIM: &[&str] = &[
    "HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
];
const STATUSES: &[u16] = &[
    200, 201, 202, 203, 204, 206, 299, 301, 302, 304, 400, 404, 410, 418, 500, 502, 503, 599,
];

/// How the backend frames its response body.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length,
    Chunked {
        pieces: usize,
        ext: bool,
        /// Trailer fields after the last chunk.
        trailers: bool,
    },
    /// Delimited by the backend closing the connection.
    Close,
}

#[derive(Debug, Clone, Copy)]
enum Reason {
    Canonical,
    Custom,
    Empty,
}

/// The response the backend gives to a case's request.
#[derive(Debug, Clone)]
struct Answer {
    /// Informational responses sent first (a proxy passes on none of them but `101`).
    interim: Vec<&'static str>,
    /// Answered as HTTP/1.0 (then the backend closes unless it said `keep-alive`).
    http10: bool,
    /// A second length: `Content-Length` twice (same value), or beside `chunked` (which wins).
    second_length: bool,
    status: u16,
    reason: Reason,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
    framing: Framing,
}

/// One case: a fast-path request and the backend's answer to it.
#[derive(Clone)]
struct Case {
    method: &'static str,
    target: String,
    /// In the order sent (`Host` and `Content-Length` among them).
    fields: Vec<(String, String)>,
    body: Vec<u8>,
    answer: Answer,
}

/// Shown as the bytes sent and answered (a failure prints it).
impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (answer, close) = response_bytes(&self.answer, self.method == "HEAD");
        f.debug_struct("Case")
            .field("request", &text(&self.wire()))
            .field("answer", &text(&answer))
            .field("framing", &self.answer.framing)
            .field("backend_closes", &close)
            .finish()
    }
}

impl Case {
    fn wire(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target).into_bytes();
        for (n, v) in &self.fields {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => "[A-Za-z][A-Za-z0-9_-]{0,12}"
            .prop_filter("a name with a rule", |n| !RESERVED.contains(&n.to_ascii_lowercase().as_str())),
        1 => select(COMMON_NAMES).prop_map(String::from),
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[!-~]{0,16}",
        "[!-~][ !-~]{0,30}[!-~]",
        // Spaces around (not part of the value).
        " [a-z]{1,5}  ",
        // obs-text and a tab inside.
        "[a-z]{0,3}[\u{a0}-\u{ff}][a-z]{0,3}",
        "[a-z]{1,3}\t[a-z]{1,3}",
    ]
}

fn target() -> impl Strategy<Value = String> {
    let segment = "[A-Za-z0-9_~!$&'()*+,;=:@%-]{0,8}";
    (
        vec(segment, 1..4),
        proptest::option::of("[A-Za-z0-9=&%+,;:@/?!$'()*._~-]{0,24}"),
    )
        .prop_map(|(segments, query)| {
            let mut t = String::new();
            for s in segments {
                t.push('/');
                t.push_str(&s);
            }
            if let Some(q) = query {
                t.push('?');
                t.push_str(&q);
            }
            t
        })
        .prop_filter("the warm-up target", |t| !t.starts_with(WARMUP_TARGET))
}

fn answer() -> impl Strategy<Value = Answer> {
    let field = prop_oneof![
        2 => (name(), value()),
        1 => select(RESPONSE_FIELDS).prop_map(|(n, v)| (n.to_string(), v.to_string())),
    ];
    let framing = prop_oneof![
        Just(Framing::Length),
        (1usize..4, any::<bool>(), any::<bool>()).prop_map(|(pieces, ext, trailers)| {
            Framing::Chunked {
                pieces,
                ext,
                trailers,
            }
        }),
        Just(Framing::Close),
    ];
    let reason = prop_oneof![
        2 => Just(Reason::Canonical),
        1 => Just(Reason::Custom),
        1 => Just(Reason::Empty),
    ];
    (
        (
            vec(select(INTERIM), 0..2),
            prop::bool::weighted(0.15),
            prop::bool::weighted(0.15),
        ),
        select(STATUSES),
        reason,
        vec(field, 0..8),
        vec(any::<u8>(), 0..300),
        framing,
    )
        .prop_map(
            |((interim, http10, second_length), status, reason, fields, body, framing)| Answer {
                interim,
                // Chunked is HTTP/1.1's.
                http10: http10 && !matches!(framing, Framing::Chunked { .. }),
                second_length,
                status,
                reason,
                fields,
                body,
                framing,
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    let hop = (
        vec(select(CONNECTION), 0..3),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    );
    let forwarded = (
        vec(select(XFF), 0..4),
        vec(select(XFH), 0..2),
        vec(select(XFP), 0..2),
    );
    (
        select(METHODS),
        target(),
        select(HOSTS),
        vec((name(), value()), 0..12),
        forwarded,
        hop,
        // The body, and whether its length is written with leading zeros.
        proptest::option::of((vec(any::<u8>(), 0..200), prop::bool::weighted(0.2))),
        answer(),
    )
        .prop_flat_map(|(method, target, host, other, fwd, hop, body, answer)| {
            let mut fields: Vec<(String, String)> = other;
            fields.push(("Host".into(), host.into()));
            let (xff, xfh, xfp) = fwd;
            fields.extend(
                xff.iter()
                    .map(|v| ("X-Forwarded-For".into(), v.to_string())),
            );
            fields.extend(
                xfh.iter()
                    .map(|v| ("X-Forwarded-Host".into(), v.to_string())),
            );
            fields.extend(
                xfp.iter()
                    .map(|v| ("x-forwarded-proto".into(), v.to_string())),
            );
            let (connection, keep_alive, proxy_connection, proxy_authorization) = hop;
            fields.extend(
                connection
                    .iter()
                    .map(|v| ("Connection".into(), v.to_string())),
            );
            if keep_alive {
                fields.push(("Keep-Alive".into(), "timeout=5, max=100".into()));
            }
            if proxy_connection {
                fields.push(("Proxy-Connection".into(), "keep-alive".into()));
            }
            if proxy_authorization {
                fields.push(("Proxy-Authorization".into(), "Basic dXNlcjpwYXNz".into()));
            }
            if let Some((b, zeros)) = &body {
                let n = b.len();
                let n = if *zeros {
                    format!("00{n}")
                } else {
                    n.to_string()
                };
                fields.push(("Content-Length".into(), n));
            }
            let body = body.map(|(b, _)| b).unwrap_or_default();
            Just(fields).prop_shuffle().prop_map(move |fields| Case {
                method,
                target: target.clone(),
                fields,
                body: body.clone(),
                answer: answer.clone(),
            })
        })
}

/// A request as the backend received it.
#[derive(Debug, Clone, PartialEq)]
struct Received {
    method: String,
    target: String,
    version: u8,
    /// Names as written on the wire, in order (tells the engines apart).
    raw_names: Vec<String>,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
}

/// A response as the client received it.
#[derive(Debug, Clone, PartialEq)]
struct Answered {
    version: u8,
    status: u16,
    reason: String,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

/// A socket with what was read from it and not used yet.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn more(&mut self) -> bool {
        let mut b = [0u8; 16 * 1024];
        match self.s.read(&mut b).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
        }
    }

    /// Takes bytes up to and including `end`.
    async fn until(&mut self, end: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(end.len()).position(|w| w == end) {
                return Some(self.buf.drain(..i + end.len()).collect());
            }
            if !self.more().await {
                return None;
            }
        }
    }

    async fn exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.more().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    async fn rest(&mut self) -> Vec<u8> {
        while self.more().await {}
        std::mem::take(&mut self.buf)
    }

    /// A chunked body, decoded: its data and its trailer section (raw).
    async fn chunked(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut data = Vec::new();
        loop {
            let line = self.until(b"\r\n").await?;
            let line = std::str::from_utf8(&line[..line.len() - 2]).ok()?;
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                let mut trailers = Vec::new();
                loop {
                    let l = self.until(b"\r\n").await?;
                    if l == b"\r\n" {
                        return Some((data, trailers));
                    }
                    trailers.extend_from_slice(&l);
                }
            }
            data.extend(self.exact(size).await?);
            if self.exact(2).await? != b"\r\n" {
                return None;
            }
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pairs(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), text(h.value)))
        .collect()
}

fn trailer_pairs(raw: &[u8]) -> Vec<(String, String)> {
    text(raw)
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

/// Whether a field list says `chunked` last in `Transfer-Encoding`.
fn says_chunked(fields: &[(String, String)]) -> bool {
    fields
        .iter()
        .rfind(|(n, _)| n == "transfer-encoding")
        .is_some_and(|(_, v)| {
            v.rsplit(',')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("chunked")
        })
}

fn content_length(fields: &[(String, String)]) -> Option<usize> {
    fields
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// What the backend knows: the answer to give, and what it received.
#[derive(Default)]
struct Backend {
    answer: Mutex<Option<Answer>>,
    received: Mutex<Vec<Received>>,
}

async fn backend() -> (SocketAddr, Arc<Backend>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let state = Arc::new(Backend::default());
    let st = state.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(Conn { s, buf: Vec::new() }, st.clone()));
        }
    });
    (addr, state)
}

async fn serve(mut c: Conn, state: Arc<Backend>) {
    loop {
        let Some(head) = c.until(b"\r\n\r\n").await else {
            return;
        };
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&head), Ok(httparse::Status::Complete(_))) {
            return;
        }
        let fields = pairs(req.headers);
        let body = if says_chunked(&fields) {
            match c.chunked().await {
                Some((data, _)) => data,
                None => return,
            }
        } else {
            match c.exact(content_length(&fields).unwrap_or(0)).await {
                Some(b) => b,
                None => return,
            }
        };
        let got = Received {
            method: req.method.unwrap_or_default().to_string(),
            target: req.path.unwrap_or_default().to_string(),
            version: req.version.unwrap_or_default(),
            raw_names: req.headers.iter().map(|h| h.name.to_string()).collect(),
            fields,
            body,
        };
        if got.target == WARMUP_TARGET {
            if c.s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .is_err()
            {
                return;
            }
            continue;
        }
        let answer = state.answer.lock().clone();
        let head_request = got.method == "HEAD";
        state.received.lock().push(got);
        let Some(answer) = answer else { return };
        let (bytes, close) = response_bytes(&answer, head_request);
        if c.s.write_all(&bytes).await.is_err() || close {
            return;
        }
    }
}

/// The backend's response for `a` (to a `HEAD` request: without its body), and whether the
/// backend closes the connection after it.
fn response_bytes(a: &Answer, head_request: bool) -> (Vec<u8>, bool) {
    let bodiless = head_request || a.status == 204 || a.status == 304;
    let reason = match a.reason {
        Reason::Canonical => http::StatusCode::from_u16(a.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Whatever"),
        Reason::Custom => "Custom Reason",
        Reason::Empty => "",
    };
    let mut out: Vec<u8> = a.interim.concat().into_bytes();
    let version = if a.http10 { "1.0" } else { "1.1" };
    out.extend_from_slice(format!("HTTP/{version} {} {reason}\r\n", a.status).as_bytes());
    let connection = |token: &str| {
        a.fields.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("connection")
                && v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    };
    let mut close = connection("close") || (a.http10 && !connection("keep-alive"));
    for (n, v) in &a.fields {
        out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    match a.framing {
        // A 204 has no framing fields; a 304 or a HEAD response announces the GET's.
        Framing::Length if a.status != 204 => {
            let length = format!("Content-Length: {}\r\n", a.body.len());
            out.extend_from_slice(length.as_bytes());
            if a.second_length {
                out.extend_from_slice(length.as_bytes());
            }
        }
        Framing::Chunked { .. } if a.status != 204 && a.status != 304 => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            if a.second_length {
                out.extend_from_slice(
                    format!("Content-Length: {}\r\n", a.body.len() + 3).as_bytes(),
                );
            }
        }
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
    if bodiless {
        // Nothing to delimit: a close would only be a surprise to the pool.
        return (out, close);
    }
    match a.framing {
        Framing::Length => out.extend_from_slice(&a.body),
        Framing::Chunked {
            pieces,
            ext,
            trailers,
        } => {
            let step = a.body.len().div_ceil(pieces).max(1);
            for c in a.body.chunks(step) {
                let ext = if ext { ";x=y" } else { "" };
                out.extend_from_slice(format!("{:x}{ext}\r\n", c.len()).as_bytes());
                out.extend_from_slice(c);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n");
            if trailers {
                out.extend_from_slice(b"X-Trailer: one\r\nX-Other: two\r\n");
            }
            out.extend_from_slice(b"\r\n");
        }
        Framing::Close => {
            out.extend_from_slice(&a.body);
            close = true;
        }
    }
    (out, close)
}

/// Writes `request` and reads its response whole.
async fn exchange(c: &mut Conn, request: &[u8], head_request: bool) -> Result<Answered, String> {
    c.s.write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let head = c.until(b"\r\n\r\n").await.ok_or("no response head")?;
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        other => return Err(format!("response head {other:?}: {}", text(&head))),
    }
    let status = resp.code.unwrap_or_default();
    let fields = pairs(resp.headers);
    let mut trailers = Vec::new();
    let body = if head_request || status == 204 || status == 304 {
        Vec::new()
    } else if says_chunked(&fields) {
        let (data, t) = c.chunked().await.ok_or("chunked body cut short")?;
        trailers = trailer_pairs(&t);
        data
    } else if let Some(n) = content_length(&fields) {
        c.exact(n).await.ok_or("body cut short")?
    } else {
        c.rest().await
    };
    Ok(Answered {
        version: resp.version.unwrap_or_default(),
        status,
        reason: resp.reason.unwrap_or_default().to_string(),
        fields,
        body,
        trailers,
    })
}

async fn connect(proxy: SocketAddr) -> Result<Conn, String> {
    let s = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    Ok(Conn { s, buf: Vec::new() })
}

/// The one request the backend received since it was last emptied.
fn received_one(b: &Backend, engine: &str) -> Result<Received, String> {
    let mut got = std::mem::take(&mut *b.received.lock());
    match got.len() {
        1 => Ok(got.remove(0)),
        n => Err(format!(
            "{engine}: the backend received {n} requests: {got:#?}"
        )),
    }
}

/// Sends `case` through both engines: what each backend request and client response was.
async fn both(
    proxy: SocketAddr,
    b: &Backend,
    case: &Case,
) -> Result<((Received, Answered), (Received, Answered)), String> {
    let wire = case.wire();
    let head_request = case.method == "HEAD";
    *b.answer.lock() = Some(case.answer.clone());
    b.received.lock().clear();
    let mut fresh = connect(proxy).await?;
    let fast = exchange(&mut fresh, &wire, head_request)
        .await
        .map_err(|e| format!("fast path: {e}"))?;
    let fast_got = received_one(b, "fast path")?;
    let mut moved = connect(proxy).await?;
    let warm = exchange(&mut moved, WARMUP, false).await?;
    if warm.status != 200 || warm.body != b"ok" {
        return Err(format!("warm-up answered {warm:?}"));
    }
    b.received.lock().clear();
    let hyper = exchange(&mut moved, &wire, head_request)
        .await
        .map_err(|e| format!("hyper's path: {e}"))?;
    let hyper_got = received_one(b, "hyper's path")?;
    Ok(((fast_got, fast), (hyper_got, hyper)))
}

/// Fields grouped by (lowercased) name: each name's values in order.
fn grouped(fields: &[(String, String)], skip: &[&str]) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (n, v) in fields {
        let n = n.to_ascii_lowercase();
        if !skip.contains(&n.as_str()) {
            m.entry(n).or_default().push(v.clone());
        }
    }
    m
}

fn check(
    case: &Case,
    fast: &(Received, Answered),
    hyper: &(Received, Answered),
) -> Result<(), TestCaseError> {
    let ((fb, fc), (hb, hc)) = (fast, hyper);
    // Each engine served the request it was meant to.
    prop_assert!(
        fb.raw_names.iter().any(|n| n == "Host"),
        "not the fast path: {:?}",
        fb.raw_names
    );
    prop_assert!(
        hb.raw_names.iter().all(|n| *n == n.to_ascii_lowercase()),
        "not hyper's path: {:?}",
        hb.raw_names
    );
    // The backend saw the same request.
    prop_assert_eq!(&fb.method, &hb.method);
    prop_assert_eq!(&fb.target, &hb.target);
    prop_assert_eq!(&fb.target, &case.target);
    prop_assert_eq!(fb.version, hb.version);
    prop_assert_eq!(&fb.body, &hb.body);
    prop_assert_eq!(&fb.body, &case.body);
    prop_assert_eq!(
        grouped(&fb.fields, &[]),
        grouped(&hb.fields, &[]),
        "backend fields"
    );
    // The client saw the same response.
    prop_assert_eq!(fc.version, hc.version, "response version");
    prop_assert_eq!(fc.status, hc.status);
    prop_assert_eq!(&fc.reason, &hc.reason, "reason phrase");
    prop_assert_eq!(
        grouped(&fc.fields, &["date"]),
        grouped(&hc.fields, &["date"]),
        "response fields"
    );
    prop_assert_eq!(&fc.body, &hc.body, "response body");
    prop_assert_eq!(
        grouped(&fc.trailers, &[]),
        grouped(&hc.trailers, &[]),
        "trailers"
    );
    // And what both did is right, not merely equal.
    prop_assert_eq!(fc.status, case.answer.status);
    prop_assert_eq!(fc.version, 1, "HTTP/1.1 answered");
    for hop in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "upgrade",
        "trailer",
        "transfer-encoding",
    ] {
        prop_assert!(
            !fb.fields.iter().any(|(n, _)| n == hop),
            "{} sent to the backend",
            hop
        );
    }
    let listed = case
        .answer
        .fields
        .iter()
        .any(|(n, v)| n == "Connection" && v == "x-foo");
    for hop in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "upgrade",
        "trailer",
        "x-foo",
    ] {
        if hop != "x-foo" || listed {
            prop_assert!(
                !fc.fields.iter().any(|(n, _)| n == hop),
                "{} sent to the client",
                hop
            );
        }
    }
    let xff = grouped(&fb.fields, &[])
        .remove("x-forwarded-for")
        .unwrap_or_default();
    prop_assert!(
        xff.len() == 1 && xff[0].ends_with("127.0.0.1"),
        "x-forwarded-for {:?}",
        xff
    );
    Ok(())
}

#[test]
fn both_engines_send_and_answer_the_same() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (addr, state) = rt.block_on(backend());
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: diff\n    hosts: [diff.test]\n    backend: {{ static: {{ addresses: [\"{addr}\"] }} }}\n"
    );
    let running = rt.block_on(support::start(&yaml));
    let proxy = running.proxy_addr;
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        // Failures are reported in the output; no files written into the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&case(), |case| {
        let sent = rt.block_on(async {
            tokio::time::timeout(2 * EXCHANGE, both(proxy, &state, &case)).await
        });
        let (fast, hyper) = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(TestCaseError::fail(e)),
            Err(_) => return Err(TestCaseError::fail("no answer within 20 s")),
        };
        check(&case, &fast, &hyper)
    });
    rt.block_on(support::stop(running));
    if let Err(e) = result {
        panic!("{e}");
    }
}
