//! One attempt at the backend: the request head (and its small body) written on a pooled or
//! new connection of our own, the response head read and rewritten for the client.

use super::*;

/// The fast path's attempts: the request head (and its small body) whole in `out`, written on
/// a pooled or new connection of our own; the response head read into `resp` and rewritten
/// into `out`.
pub(super) struct FastAttempts<'a> {
    pub(super) pool: &'a crate::upstream::raw::RawPool,
    pub(super) last_host: &'a mut Option<(SocketAddr, Arc<crate::upstream::raw::Host>)>,
    pub(super) timer: &'a mut Option<Pin<Box<Sleep>>>,
    pub(super) out: &'a mut Vec<u8>,
    pub(super) resp: &'a mut Vec<u8>,
    pub(super) idempotent: bool,
    pub(super) timeout: std::time::Duration,
    pub(super) ctx: ResponseCtx,
}

impl FastAttempts<'_> {
    /// The pooled connections of `addr` (most requests go to the endpoint used last).
    pub(super) fn host(&mut self, addr: SocketAddr) -> Arc<crate::upstream::raw::Host> {
        match &*self.last_host {
            Some((a, h)) if *a == addr => h.clone(),
            _ => {
                let h = self.pool.host(addr);
                *self.last_host = Some((addr, h.clone()));
                h
            }
        }
    }
}

impl Attempts for FastAttempts<'_> {
    type Answer = (TcpStream, Head, Arc<crate::upstream::raw::Host>);

    async fn attempt(&mut self, endpoint: &Endpoint, _more: bool) -> Result<Self::Answer, Failed> {
        let addr = endpoint.addr;
        let host = self.host(addr);
        let timeout = self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        let exchange = Exchange {
            pool: self.pool,
            host: &host,
            addr,
            idempotent: self.idempotent,
            timeout,
            ctx: self.ctx,
        };
        match exchange.run(self.out, self.resp, timer).await {
            Ok((up, head)) => Ok((up, head, host)),
            Err(e) => Err(Failed::Transport(e)),
        }
    }

    fn resendable(&self) -> bool {
        // The body is kept whole in `out`.
        self.idempotent
    }
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body (`HEAD`, 204, 304).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked, passed on as is.
    Chunked,
    /// Until the backend closes; chunked for the client.
    UntilClose,
}

/// A response head, already rewritten for the client into `out`.
pub(super) struct Head {
    /// Its length in the response buffer (the body starts after it).
    pub(super) len: usize,
    pub(super) status: u16,
    pub(super) framing: Framing,
    /// The backend connection can take another request after this response.
    pub(super) reuse: bool,
}

/// What the client's response head needs besides the backend's.
#[derive(Clone, Copy)]
pub(super) struct ResponseCtx {
    pub(super) cold: bool,
    pub(super) close: bool,
    pub(super) head_method: bool,
}

/// One attempt: a request head to one endpoint, until its response head.
pub(super) struct Exchange<'a> {
    pub(super) pool: &'a crate::upstream::raw::RawPool,
    pub(super) host: &'a crate::upstream::raw::Host,
    pub(super) addr: SocketAddr,
    pub(super) idempotent: bool,
    pub(super) timeout: std::time::Duration,
    pub(super) ctx: ResponseCtx,
}

impl Exchange<'_> {
    /// Writes `out` (the request head) on a pooled or new connection and reads the response
    /// head into `resp`; then `out` holds the client's response head. A pooled connection
    /// that turns out closed before answering anything is replaced (idempotent requests).
    pub(super) async fn run(
        &self,
        out: &mut Vec<u8>,
        resp: &mut Vec<u8>,
        timer: &mut Pin<Box<Sleep>>,
    ) -> Result<(TcpStream, Head), SendError> {
        let mut stale = 0;
        'conn: loop {
            let pooled = if stale < STALE_TRIES {
                self.host.checkout()
            } else {
                None
            };
            let reused = pooled.is_some();
            let mut up = match pooled {
                Some(s) => s,
                // Boxed: connecting is rare, and its future would grow every connection's task.
                None => Box::pin(self.pool.connect(self.addr))
                    .await
                    .map_err(|e| SendError::Connect(e.into()))?,
            };
            // The response timeout covers writing the request too (a backend that does not
            // read would otherwise stall it).
            timer.as_mut().reset(Instant::now() + self.timeout);
            let written = tokio::select! {
                biased;
                r = up.write_all(out) => r,
                () = timer.as_mut() => return Err(SendError::Timeout),
            };
            if let Err(e) = written {
                if reused && self.idempotent {
                    stale += 1;
                    continue;
                }
                return Err(SendError::Failed(
                    format!("writing the request: {e}").into(),
                ));
            }
            resp.clear();
            if resp.capacity() < RESPONSE_BUF {
                resp.reserve(RESPONSE_BUF);
            }
            loop {
                if resp.capacity() - resp.len() < 1024 {
                    resp.reserve(resp.capacity());
                }
                let read = tokio::select! {
                    biased;
                    r = up.read_buf(resp) => r,
                    () = timer.as_mut() => return Err(SendError::Timeout),
                };
                match read {
                    Ok(0) | Err(_) if resp.is_empty() && reused && self.idempotent => {
                        stale += 1;
                        continue 'conn;
                    }
                    Ok(0) => {
                        return Err(SendError::failed(
                            "the backend closed the connection before its response head",
                        ))
                    }
                    Err(e) => {
                        return Err(SendError::Failed(
                            format!("reading the response: {e}").into(),
                        ))
                    }
                    Ok(_) => {}
                }
                loop {
                    match response_head(resp, out, self.ctx) {
                        Parsed::Partial if resp.len() > MAX_RESPONSE_HEAD => {
                            return Err(SendError::failed("the response head is too large"))
                        }
                        Parsed::Partial => break,
                        Parsed::Interim(n) => {
                            // 1xx (not 101): informational, not passed on (as hyper's client).
                            resp.drain(..n);
                        }
                        Parsed::Invalid(why) => return Err(SendError::failed(why)),
                        Parsed::Complete(head) => return Ok((up, head)),
                    }
                }
            }
        }
    }
}

pub(super) enum Parsed {
    Partial,
    Interim(usize),
    Invalid(&'static str),
    Complete(Head),
}

/// What a response's fields say about its body and connection.
struct BodyFields {
    /// `Transfer-Encoding` present: whether its final coding is `chunked`.
    chunked: Option<bool>,
    length: Option<u64>,
    /// `Connection` lists other fields (hop-by-hop too).
    listed: bool,
    /// `Connection: close`.
    close: bool,
}

/// Reads the framing and connection fields of a response head, noting each field's kind in
/// `kinds`. `Err`: why the head cannot be passed on.
fn body_fields(
    headers: &[httparse::Header<'_>],
    kinds: &mut [Field],
) -> Result<BodyFields, &'static str> {
    let mut b = BodyFields {
        chunked: None,
        length: None,
        listed: false,
        close: false,
    };
    for (h, kind) in headers.iter().zip(kinds.iter_mut()) {
        *kind = fields::field(h.name.as_bytes());
        if *kind == Field::TransferEncoding {
            // The final coding decides (RFC 9112 §6.3).
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            b.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if *kind == Field::ContentLength {
            for v in h.value.split(|b| *b == b',') {
                let Some(n) = parse_length(v.trim_ascii()) else {
                    return Err("the backend sent an invalid Content-Length");
                };
                if b.length.is_some_and(|l| l != n) {
                    return Err("the backend sent conflicting Content-Lengths");
                }
                b.length = Some(n);
            }
        } else if *kind == Field::Connection {
            b.listed |= !fields::plain_connection(h.value, &mut b.close);
        }
    }
    Ok(b)
}

/// Copies the response fields the client gets: not the hop-by-hop ones (nor those the
/// backend's `Connection` lists, when `listed`), `Content-Length` once and only when
/// `length_allowed` and not beside `Transfer-Encoding`, not a cold-start field of the
/// backend's when Reveille sets its own.
/// `true` when a `date` field was among them.
fn put_kept_fields(
    out: &mut Vec<u8>,
    headers: &[httparse::Header<'_>],
    kinds: &[Field],
    encoded: bool,
    length_allowed: bool,
    listed: bool,
    cold: bool,
) -> bool {
    // Fields the backend's `Connection` lists are hop-by-hop too (rare: collected only then).
    let listed: Vec<&[u8]> = if listed {
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| h.value.split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
            .collect()
    } else {
        Vec::new()
    };
    let mut dated = false;
    let mut one_length = false;
    for (h, &kind) in headers.iter().zip(kinds) {
        let name = h.name.as_bytes();
        dated |= name.len() == 4 && name.eq_ignore_ascii_case(b"date");
        let keep = match kind {
            k if k.hop_by_hop() => false,
            // Once (a repeat agrees, checked before), and not beside `Transfer-Encoding`.
            Field::ContentLength => {
                !std::mem::replace(&mut one_length, true) && !encoded && length_allowed
            }
            // Reveille's own cold-start field replaces one the backend sent.
            _ if cold && name.eq_ignore_ascii_case(COLD_START_HEADER.as_bytes()) => false,
            k => k.protected() || !listed.iter().any(|l| l.eq_ignore_ascii_case(name)),
        };
        if keep {
            put_field(out, name, h.value);
        }
    }
    dated
}

/// `HTTP/1.1 <status> <reason>`: the backend's reason phrase as sent.
fn put_status_line(out: &mut Vec<u8>, status: u16, reason: Option<&str>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    // The reason phrase as the backend sent it, empty too (as hyper's path passes it on).
    out.extend_from_slice(reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Parses a response head in `resp` and writes the client's head into `out`.
pub(super) fn response_head(resp: &[u8], out: &mut Vec<u8>, ctx: ResponseCtx) -> Parsed {
    if resp.is_empty() {
        return Parsed::Partial;
    }
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; RESPONSE_HEADERS];
    let mut r = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut r,
        resp,
        &mut headers,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Invalid("the backend's response head does not parse"),
    };
    let (Some(status), Some(version)) = (r.code, r.version) else {
        return Parsed::Invalid("the backend's response head does not parse");
    };
    if status < 100 {
        return Parsed::Invalid("the backend sent a status code below 100");
    }
    if status == 101 {
        return Parsed::Invalid("the backend switched protocols unasked");
    }
    if (100..200).contains(&status) {
        return Parsed::Interim(len);
    }
    // Each field's kind, found once for both passes.
    let mut kinds = [Field::Other; RESPONSE_HEADERS];
    let body = match body_fields(r.headers, &mut kinds) {
        Ok(b) => b,
        Err(why) => return Parsed::Invalid(why),
    };
    let BodyFields {
        chunked,
        length,
        listed,
        close,
    } = body;
    let mut reuse = version == 1 && !close;
    let framing = if ctx.head_method || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    if framing == Framing::UntilClose {
        reuse = false;
    }
    out.clear();
    out.reserve(len + 64);
    put_status_line(out, status, r.reason);
    // No `Content-Length` on a 204 (RFC 9110 §8.6) or a 304, unless to `HEAD` (as hyper's
    // server).
    let length_allowed = ctx.head_method || !matches!(status, 204 | 304);
    let dated = put_kept_fields(
        out,
        r.headers,
        &kinds,
        chunked.is_some(),
        length_allowed,
        listed,
        ctx.cold,
    );
    if !dated {
        // A proxy adds the date a response lacks (RFC 9110 §6.6.1), as hyper's server does.
        put_date(out);
    }
    if ctx.cold {
        put_field(out, COLD_START_HEADER.as_bytes(), b"true");
    }
    if matches!(framing, Framing::Chunked | Framing::UntilClose) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if ctx.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Parsed::Complete(Head {
        len,
        status,
        framing,
        reuse,
    })
}

pub(super) fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

pub(super) fn itoa3(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}
