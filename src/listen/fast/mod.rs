//! The HTTP/1.1 fast path: plain-TCP HTTP/1.1 client connections to cleartext HTTP/1.1
//! backends, proxied byte for byte instead of through hyper's server and client.
//!
//! A request head is parsed in place (httparse) from the connection's read buffer and, when it
//! is a common one, rewritten straight into the backend's request head: hop-by-hop fields
//! dropped, `X-Forwarded-*` set, everything else copied as sent. The response head is rewritten
//! the same way, and the body is passed on as the backend framed it (a chunked body is scanned
//! for its end, not decoded, and only its trailer fields are dropped, as hyper's server does;
//! a body delimited by the backend's close is chunked for the
//! client, whose connection stays open). No header map, no request or response value, no body
//! frames, no task crossing: the connection's own task reads, holds, forwards and streams.
//!
//! Anything uncommon is handed to hyper with the bytes read so far, and hyper serves the rest
//! of the connection exactly as before (see [`Plan::Handoff`]): a request with a body,
//! `Expect`, upgrades (WebSockets), HTTP/1.0, Knative-routed requests, a target or Host that
//! is not plain, a head that does not parse or is too large (hyper answers 400/431), no route
//! (hyper's path answers 404), a service whose backend speaks h2c or TLS. So every rule the
//! hyper path enforces still holds; the fast path only ever takes requests that pass them.
//!
//! The fast path keeps the rest of the proxy's behaviour: holding in the gate (a client that
//! closes while held leaves the queue; one that closes while its request is forwarded frees
//! the slot and the backend connection), following a reload to the new gate (a request held
//! across a reload that makes its service h2c or TLS is answered `503`, never sent as
//! cleartext HTTP/1.1), retries (a connect failure on another endpoint, an idempotent request
//! when no response came), passive ejection, the response timeout, the cold-start header, a
//! `Date` on responses that lack one, metrics, the client header timeout for idle keep-alive
//! connections, and graceful shutdown (a last request within [`LAST_REQUEST_GRACE`],
//! `Connection: close` on responses once shutting down).

mod chunked;

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::config::Protocol;
use crate::error::ProxyError;
use crate::fields::{self, Field};
use crate::forward::answer::{self, put_date, put_field};
use crate::forward::retry::{with_retries, Attempts, Failed};
use crate::forward::{acquire_following, Proxy, COLD_START_HEADER};
use crate::gate::Endpoint;
use crate::gate::{Acquired, Gate};
use crate::listen::inbound::{drive, Inbound, OnlyWhenWoken, LAST_REQUEST_GRACE};
use crate::listen::ConnectionGuard;
use crate::route::checks::{MAX_HEADER_BYTES, MAX_URI_BYTES};
use crate::upstream::{SendError, STALE_TRIES};
use tracing::debug;

/// First size of a connection's read buffer.
const READ_BUF: usize = 4096;
/// First size of the buffer for a backend's response.
const RESPONSE_BUF: usize = 8 * 1024;
/// Capacity a connection's buffers keep between requests; one grown past it by a large head,
/// body or response is given back.
const KEEP_BUF: usize = 32 * 1024;
/// Largest read of a response body at once.
const MAX_BODY_READ: usize = 64 * 1024;
/// Largest response head accepted from a backend.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Header fields in a request the fast path takes; more go to hyper (which allows up to
/// [`crate::route::checks::MAX_HEADERS`] and answers `431` beyond).
const FAST_HEADERS: usize = 48;
/// Header fields in a backend's response at most.
const RESPONSE_HEADERS: usize = 128;
/// Largest request body the fast path takes (read whole once the request may go, then sent
/// with its head); a larger one, or a chunked one, is streamed by hyper's path.
const MAX_FAST_BODY: u64 = 64 * 1024;
/// Pooled connections tried per attempt before connecting anew.

/// What the fast path serves: a client's connection, plain TCP or TLS.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientIo for S {}

/// Serves an HTTP/1 connection (plain, or TLS without `h2`): the fast path while its requests are common ones,
/// then hyper for the rest of the connection. `deadline` bounds the wait for the first head.
///
/// A plain `fn` returning an `async move` block (see [`Inbound::serve_tcp`]).
#[allow(clippy::manual_async_fn)] // on purpose, see above
pub(crate) fn serve<S: ClientIo>(
    inbound: Arc<Inbound>,
    stream: S,
    proxy: Proxy,
    close: watch::Receiver<bool>,
    guard: ConnectionGuard,
    deadline: Instant,
) -> impl Future<Output = ()> + Send {
    async move {
        let mut stop_rx = close.clone();
        let stop = OnlyWhenWoken::new(crate::shutdown::stopped(&mut stop_rx));
        tokio::pin!(stop);
        // A connection whose first bytes came after shutdown began has seen the signal already
        // (`has_changed` would not tell): it shuts down from its first request.
        let shutting = *close.borrow();
        let mut c = Client {
            stream,
            buf: Vec::with_capacity(READ_BUF),
            out: Vec::new(),
            resp: Vec::new(),
            head_timer: Box::pin(tokio::time::sleep_until(deadline)),
            resp_timer: None,
            last_host: None,
            proxy,
            close,
            shutting,
        };
        let mut deadline = deadline;
        loop {
            let mut armed = false;
            // Bytes already looked at: a head sent in many small pieces is parsed again only
            // when a piece may end it, not once per piece (the first look may also find it
            // broken, for hyper to answer at once).
            let mut scanned = 0;
            let fwd = loop {
                if !c.buf.is_empty() && (scanned == 0 || may_end_head(&c.buf, scanned)) {
                    scanned = c.buf.len();
                    match plan(&c.buf, &mut c.out, &c.proxy) {
                        Plan::Partial if c.buf.len() <= MAX_HEADER_BYTES => {}
                        Plan::Partial | Plan::Handoff => {
                            return handoff(inbound, c, guard).await;
                        }
                        Plan::Forward(f) => break f,
                    }
                }
                let idle = c.buf.is_empty();
                if !c.read_more(&mut deadline, &mut armed, stop.as_mut()).await {
                    if idle && !c.shutting && Instant::now() >= deadline {
                        c.proxy
                            .shared
                            .metrics
                            .reject_connection("client_idle_timeout");
                    }
                    return;
                }
                if idle {
                    // The first bytes of a head: the rest must come within `client_header`.
                    let head = Instant::now() + c.proxy.shared.timeouts.client_header;
                    if head < deadline {
                        deadline = head;
                        armed = false;
                    }
                }
            };
            // A response sent while shutting down said `Connection: close`; otherwise the
            // client may still send a last request (the next wait is shortened to the grace).
            match c.request(fwd).await {
                Next::KeepAlive => {}
                Next::Close => return,
                Next::Handoff(head) => {
                    // Held across a reload that made the service one hyper's path serves:
                    // the request goes there as it came, and the connection with it.
                    c.buf.splice(0..0, head);
                    return handoff(inbound, c, guard).await;
                }
            }
            // Between requests the connection may idle for `timeouts.client_idle`; pipelined
            // bytes already start the next head, bounded by `client_header`.
            deadline = Instant::now()
                + if c.buf.is_empty() {
                    c.proxy.shared.timeouts.client_idle
                } else {
                    c.proxy.shared.timeouts.client_header
                };
        }
    }
}

/// Whether `buf` may hold a complete head: an empty line (`\n\n` or `\n\r\n`) ends at or
/// after `from`, or more than a head may be is there (then hyper answers it).
fn may_end_head(buf: &[u8], from: usize) -> bool {
    if buf.len() > MAX_HEADER_BYTES {
        return true;
    }
    let tail = &buf[from.saturating_sub(2)..];
    (1..tail.len()).any(|i| {
        tail[i] == b'\n'
            && (tail[i - 1] == b'\n' || (i > 1 && tail[i - 1] == b'\r' && tail[i - 2] == b'\n'))
    })
}

/// Hands the connection to hyper, replaying the bytes read so far.
async fn handoff<S: ClientIo>(inbound: Arc<Inbound>, c: Client<S>, guard: ConnectionGuard) {
    let Client {
        stream,
        buf,
        proxy,
        close,
        out,
        resp,
        head_timer,
        resp_timer,
        last_host,
        ..
    } = c;
    // Freed now, not when hyper is done with the connection (a WebSocket may last hours).
    drop((out, resp, head_timer, resp_timer, last_host));
    let io = Prefixed {
        prefix: buf,
        pos: 0,
        inner: stream,
    };
    // Boxed: the fast path's state does not carry hyper's connection.
    Box::pin(drive(inbound.http1(io, proxy), close, guard)).await;
}

/// One client connection on the fast path.
struct Client<S> {
    stream: S,
    /// Bytes read from the client and not yet used (a partial head, or pipelined requests).
    buf: Vec<u8>,
    /// The head being written: the backend's request head, then the client's response head.
    out: Vec<u8>,
    /// What the backend sent.
    resp: Vec<u8>,
    /// Bounds the wait for a request head (re-armed per request: extending a pending timer
    /// is one atomic operation).
    head_timer: Pin<Box<Sleep>>,
    /// Bounds the wait for a response head.
    resp_timer: Option<Pin<Box<Sleep>>>,
    /// The pooled connections of the endpoint used last (most requests go to the same one).
    last_host: Option<(SocketAddr, Arc<crate::upstream::raw::Host>)>,
    proxy: Proxy,
    close: watch::Receiver<bool>,
    /// Shutting down: answer the request in progress with `Connection: close`.
    shutting: bool,
}

impl<S: ClientIo> Client<S> {
    /// Reads more of a request head; `false` when the client closed, failed, or sent nothing
    /// in time (the deadline, shortened to [`LAST_REQUEST_GRACE`] when shutdown starts).
    async fn read_more<F: Future<Output = ()>>(
        &mut self,
        deadline: &mut Instant,
        armed: &mut bool,
        mut stop: Pin<&mut OnlyWhenWoken<F>>,
    ) -> bool {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(self.buf.capacity().max(READ_BUF));
        }
        // A read as `poll_read` does it: a short read tells tokio the socket is drained, so
        // waiting on it later (for the next head, or for the client leaving while its request
        // is forwarded) costs no system call.
        let read = self.stream.read_buf(&mut self.buf);
        tokio::pin!(read);
        if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await
        {
            return matches!(r, Ok(n) if n > 0);
        }
        if !*armed {
            self.head_timer.as_mut().reset(*deadline);
            *armed = true;
        }
        loop {
            tokio::select! {
                biased;
                r = read.as_mut() => return matches!(r, Ok(n) if n > 0),
                () = self.head_timer.as_mut() => return false,
                () = stop.as_mut(), if !self.shutting => {
                    self.shutting = true;
                    let grace = Instant::now() + LAST_REQUEST_GRACE;
                    if grace < *deadline {
                        *deadline = grace;
                        self.head_timer.as_mut().reset(grace);
                    }
                }
            }
        }
    }

    /// Whether shutdown has started (read without registering anything).
    fn shutting_down(&mut self) -> bool {
        self.shutting
            || match self.close.has_changed() {
                Err(_) => true,
                Ok(false) => false,
                Ok(true) => *self.close.borrow(),
            }
    }

    /// Holds and forwards one request (its head first in `buf`) and writes its response.
    async fn request(&mut self, fwd: Forward) -> Next {
        let arrived = Instant::now();
        let Forward {
            gate,
            head_len,
            body,
            close,
            idempotent,
            head: head_method,
        } = fwd;
        let mut gate = gate;
        let deadline = arrived + gate.settings().hold_timeout;
        let mut held_head = None;
        let acquired = {
            let services = &self.proxy.shared.services;
            let acquiring = acquire_following(services, &mut gate, deadline);
            tokio::pin!(acquiring);
            let first = std::future::poll_fn(|cx| Poll::Ready(acquiring.as_mut().poll(cx))).await;
            match first {
                Poll::Ready(r) => {
                    self.buf.drain(..head_len);
                    r
                }
                Poll::Pending => {
                    // Held: the head is kept aside (a reload may send the request to hyper's
                    // path as it came); the read buffer is not needed while waiting unless
                    // pipelined bytes are in it, the response buffer (kept from an earlier
                    // request on this connection) not at all.
                    let head: Vec<u8> = self.buf.drain(..head_len).collect();
                    if self.buf.is_empty() {
                        self.buf = Vec::new();
                    }
                    self.resp = Vec::new();
                    let r = tokio::select! {
                        biased;
                        r = &mut acquiring => r,
                        () = client_gone(&mut self.stream, &mut self.buf) => return Next::Close,
                    };
                    held_head = Some(head);
                    r
                }
            }
        };
        // A reload while held may have made the service one the fast path does not serve (h2c,
        // TLS): hyper's path forwards it with the new protocol.
        if let Some(head) = held_head {
            if acquired.is_ok() && !serves(gate.settings()) {
                return Next::Handoff(head);
            }
        }
        let mut acquired = acquired;
        if acquired.is_ok() && body > 0 {
            // The body goes with the head, whole: read the rest of it now.
            match self.read_body(body).await {
                BodyRead::Whole => {
                    self.out.extend_from_slice(&self.buf[..body]);
                    self.buf.drain(..body);
                }
                BodyRead::Gone => return Next::Close,
                BodyRead::Stalled => {
                    acquired = Err(ProxyError::BodyTimeout {
                        after: self.proxy.shared.timeouts.client_body,
                    });
                }
            }
        }
        // An error answer with the body unread must close (the body would be read as a head).
        let close = close || (acquired.is_err() && body > 0);
        let result = match acquired {
            Ok(a) => {
                self.forward(&gate, a, deadline, idempotent, head_method, close, arrived)
                    .await
            }
            Err(e) => Err(e),
        };
        let keep = match result {
            Ok(keep) => keep,
            Err(e) => {
                answer::rejected(&gate, &e, arrived);
                let close = close || e.closes_connection() || self.shutting_down();
                answer::error_head(&mut self.out, &e, close);
                let written = Writer::of(&self.proxy.shared)
                    .put(&mut self.stream, &self.out)
                    .await
                    .is_ok();
                if written && close && body > 0 {
                    // The body is still coming: closing with it unread would reset the
                    // connection, and the client could lose the answer. Linger briefly.
                    linger(&mut self.stream).await;
                }
                written && !close
            }
        };
        self.trim();
        if keep {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }

    /// Gives back what a large head, body or response grew the buffers to, so an idle
    /// keep-alive connection (or a held request on it) does not keep it.
    fn trim(&mut self) {
        if self.resp.capacity() > KEEP_BUF {
            self.resp = Vec::new();
        }
        if self.out.capacity() > KEEP_BUF {
            self.out = Vec::new();
        }
        if self.buf.capacity() > KEEP_BUF && self.buf.len() <= READ_BUF {
            self.buf.shrink_to(READ_BUF);
        }
    }

    /// Reads until `buf` holds `len` body bytes, each read within `timeouts.client_body`.
    async fn read_body(&mut self, len: usize) -> BodyRead {
        let stall = self.proxy.shared.timeouts.client_body;
        while self.buf.len() < len {
            self.buf.reserve(len - self.buf.len());
            let read = tokio::time::timeout(stall, self.stream.read_buf(&mut self.buf));
            match read.await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return BodyRead::Gone,
                Err(_) => {
                    self.proxy
                        .shared
                        .metrics
                        .reject_connection("client_body_timeout");
                    return BodyRead::Stalled;
                }
            }
        }
        BodyRead::Whole
    }

    /// Sends the request (by the one retry rule, [`crate::forward::retry`]) and relays the
    /// response. `Ok(keep_alive)` once a response was written (or writing it failed midway:
    /// `false`).
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &mut self,
        gate: &Arc<Gate>,
        acquired: Acquired,
        deadline: Instant,
        idempotent: bool,
        head_method: bool,
        close: bool,
        arrived: Instant,
    ) -> Result<bool, ProxyError> {
        let cold = acquired.cold && acquired.held_for.is_some();
        let timeout = self.proxy.shared.response_timeout;
        let close = close || self.shutting_down();
        let mut attempts = FastAttempts {
            pool: &self.proxy.shared.upstreams.raw,
            last_host: &mut self.last_host,
            timer: &mut self.resp_timer,
            out: &mut self.out,
            resp: &mut self.resp,
            idempotent,
            timeout,
            ctx: ResponseCtx {
                cold,
                close,
                head_method,
            },
        };
        let answer = tokio::select! {
            biased;
            r = with_retries(gate, acquired.permit, deadline, timeout, &mut attempts) => r?,
            // The client left (while an attempt waited, or while held again for a retry):
            // nobody waits for the answer, the slot and the backend connection are freed now
            // (as hyper's path does when its read sees the end).
            () = client_gone(&mut self.stream, &mut self.buf) => return Ok(false),
            // The shutdown grace ran out: an answer rather than a cut connection.
            () = self.proxy.shared.in_flight_cut() => {
                return Err(ProxyError::ShuttingDown {
                    service: gate.name().clone(),
                })
            }
        };
        let ((upstream, head, host), permit) = answer;
        gate.metrics()
            .request(head.status, arrived.elapsed().as_secs_f64());
        let release = Release {
            up: Some(upstream),
            host: head.reuse.then_some(&*host),
            permit: Some(permit),
        };
        let writer = Writer::of(&self.proxy.shared);
        let relayed = relay_body(
            &mut self.stream,
            writer,
            release,
            &mut self.resp,
            &mut self.out,
            head.len,
            head.framing,
        )
        .await;
        match relayed {
            Ok(()) => Ok(!close),
            // Midway: the client has part of a response; only closing tells it so.
            Err(e) => {
                debug!(service = %gate.name(), kind = e.kind(), "response relay broke off: {e}");
                self.proxy.shared.metrics.relay_error(e.kind());
                Ok(false)
            }
        }
    }
}

/// The fast path's attempts: the request head (and its small body) whole in `out`, written on
/// a pooled or new connection of our own; the response head read into `resp` and rewritten
/// into `out`.
struct FastAttempts<'a> {
    pool: &'a crate::upstream::raw::RawPool,
    last_host: &'a mut Option<(SocketAddr, Arc<crate::upstream::raw::Host>)>,
    timer: &'a mut Option<Pin<Box<Sleep>>>,
    out: &'a mut Vec<u8>,
    resp: &'a mut Vec<u8>,
    idempotent: bool,
    timeout: std::time::Duration,
    ctx: ResponseCtx,
}

impl FastAttempts<'_> {
    /// The pooled connections of `addr` (most requests go to the endpoint used last).
    fn host(&mut self, addr: SocketAddr) -> Arc<crate::upstream::raw::Host> {
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

/// What the connection does after a request.
enum Next {
    /// Reads the next request.
    KeepAlive,
    /// Closes.
    Close,
    /// Goes to hyper with this request head (then what is in the read buffer) first.
    Handoff(Vec<u8>),
}

/// How reading a request body ended.
enum BodyRead {
    Whole,
    /// The client closed or failed.
    Gone,
    /// No bytes within `timeouts.client_body`: answered `408`.
    Stalled,
}

/// Writes to a client, each wait for the socket to take more bounded by
/// `timeouts.client_write`: a client that stops reading is closed (and counted) instead of
/// keeping its endpoint slot and backend connection. A write the socket takes at once costs no
/// timer.
#[derive(Clone, Copy)]
struct Writer<'a> {
    limit: std::time::Duration,
    metrics: &'a crate::telemetry::metrics::Metrics,
}

impl<'a> Writer<'a> {
    fn of(shared: &'a crate::forward::Shared) -> Self {
        Writer {
            limit: shared.timeouts.client_write,
            metrics: &shared.metrics,
        }
    }

    /// Writes all of `buf`, then flushes (a TLS stream may keep records it could not write
    /// yet). A write the socket takes at once costs no timer.
    async fn put<S: ClientIo>(self, client: &mut S, mut buf: &[u8]) -> Result<(), RelayError> {
        while !buf.is_empty() {
            let n = self
                .bounded(client, |c, cx| Pin::new(c).poll_write(cx, buf))
                .await?;
            if n == 0 {
                return Err(RelayError::ClientGone);
            }
            buf = &buf[n..];
        }
        self.bounded(client, |c, cx| Pin::new(c).poll_flush(cx))
            .await
    }

    /// One write step: tried at once, and only when the socket cannot take it, waited for
    /// within `timeouts.client_write`.
    async fn bounded<S: ClientIo, T>(
        self,
        client: &mut S,
        mut step: impl FnMut(&mut S, &mut Context<'_>) -> Poll<std::io::Result<T>>,
    ) -> Result<T, RelayError> {
        let first = std::future::poll_fn(|cx| Poll::Ready(step(client, cx))).await;
        let done = match first {
            Poll::Ready(r) => r,
            Poll::Pending => {
                let wait = std::future::poll_fn(|cx| step(client, cx));
                match tokio::time::timeout(self.limit, wait).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.metrics.reject_connection("client_write_timeout");
                        return Err(RelayError::ClientFailed(ErrorKind::TimedOut));
                    }
                }
            }
        };
        done.map_err(RelayError::client)
    }
}

/// Why relaying a response body broke off midway (the client's connection is then closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelayError {
    /// The client closed its connection.
    ClientGone,
    /// Writing to the client failed, or stalled past `timeouts.client_write`.
    ClientFailed(ErrorKind),
    /// The backend closed before the body ended.
    BackendGone,
    /// Reading from the backend failed.
    BackendFailed(ErrorKind),
    /// The backend's chunked framing is broken.
    BadChunked,
}

impl RelayError {
    fn client(e: std::io::Error) -> Self {
        match e.kind() {
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => RelayError::ClientGone,
            k => RelayError::ClientFailed(k),
        }
    }

    /// The metric label.
    fn kind(self) -> &'static str {
        match self {
            RelayError::ClientGone => "client_gone",
            RelayError::ClientFailed(_) => "client_failed",
            RelayError::BackendGone => "backend_gone",
            RelayError::BackendFailed(_) => "backend_failed",
            RelayError::BadChunked => "bad_chunked",
        }
    }
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::ClientFailed(k) => write!(f, "writing to the client: {k}"),
            RelayError::BackendFailed(k) => write!(f, "reading from the backend: {k}"),
            e => f.write_str(e.kind()),
        }
    }
}

/// The backend side of a response being relayed: freed as soon as its last byte is read —
/// the endpoint slot, and the connection back to the pool when the body ended exactly —
/// before the last bytes go to the client, so the client's next request (perhaps on another
/// connection, on another worker) finds both free.
struct Release<'a> {
    up: Option<TcpStream>,
    /// The pool to return the connection to (`None`: it cannot take another request).
    host: Option<&'a crate::upstream::raw::Host>,
    permit: Option<crate::gate::Permit>,
}

impl Release<'_> {
    fn up(&mut self) -> &mut TcpStream {
        self.up.as_mut().expect("present until done")
    }

    /// The body has been read; `clean`: it ended exactly where its framing said.
    fn done(&mut self, clean: bool) {
        self.permit.take();
        if let (Some(up), Some(host), true) = (self.up.take(), self.host, clean) {
            host.put(up);
        }
    }
}

/// Ends our side of the connection and reads what the client still sends (a body nobody will
/// use) until it closes, for at most a second and 256 KiB, so the close is not a reset that
/// could destroy the answer just written.
async fn linger<S: ClientIo>(stream: &mut S) {
    let _ = stream.shutdown().await;
    // On the heap: this future is part of every connection's task.
    let mut sink = vec![0u8; 4096];
    let mut left = 256 * 1024;
    let drain = async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n.min(left),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}

/// Resolves when the client closes (or fails) while its request is held; pipelined bytes
/// that arrive meanwhile are kept for later.
async fn client_gone<S: ClientIo>(stream: &mut S, buf: &mut Vec<u8>) {
    loop {
        if buf.len() >= MAX_HEADER_BYTES {
            // Enough queued; the rest waits in the socket.
            return std::future::pending().await;
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_BUF);
        }
        // Cancel-safe: a read that did not complete took nothing.
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// What to do with the bytes read so far.
enum Plan {
    /// The head is not complete yet.
    Partial,
    /// Not for the fast path: hyper serves the connection from here.
    Handoff,
    /// A common request, its backend head written.
    Forward(Forward),
}

struct Forward {
    gate: Arc<Gate>,
    head_len: usize,
    /// Request body bytes (`Content-Length`), after the head.
    body: usize,
    /// The client asked to close after this request.
    close: bool,
    idempotent: bool,
    /// A `HEAD` request: the response has no body.
    head: bool,
}

/// Whether a request field leaves the request to hyper's path: framing or protocol meaning
/// (`Transfer-Encoding`, `TE`, `Trailer`, `Upgrade`, `Expect`) or Knative's fields, which hyper's
/// path strips or acts on.
fn needs_hyper(f: Field) -> bool {
    matches!(
        f,
        Field::TransferEncoding
            | Field::Te
            | Field::Trailer
            | Field::Upgrade
            | Field::Expect
            | Field::KnativeRoute
            | Field::KnativeSet
            | Field::KnativeProbe
    )
}

/// A header value `HeaderValue::to_str` accepts: visible ASCII, spaces and tabs.
fn visible_ascii(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// A byte the fast path passes in a request target: RFC 3986 unreserved, sub-delims, `:`, `@`,
/// `/`, `?`, `%`. Anything else goes to hyper, whose URI parser decides.
fn plain_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// Parses the head in `buf` and, for a common request, writes the backend's head into `out`.
fn plan(buf: &[u8], out: &mut Vec<u8>, proxy: &Proxy) -> Plan {
    // Uninitialised: httparse writes the fields it finds (initialising the array would cost
    // more than parsing a typical head).
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; FAST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Plan::Partial,
        Err(_) => return Plan::Handoff,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Plan::Handoff;
    };
    if method == "CONNECT"
        || !target.starts_with('/')
        || target.len() > MAX_URI_BYTES
        || !target.bytes().all(plain_target_byte)
    {
        return Plan::Handoff;
    }
    if head_len > MAX_HEADER_BYTES {
        // hyper answers 431.
        return Plan::Handoff;
    }
    let mut host = None;
    let mut close = false;
    let mut body: Option<u64> = None;
    let mut xff = false;
    // Each field's kind, found once for the checks and the rewrite.
    let mut kinds = [Field::Other; FAST_HEADERS];
    for (h, kind) in req.headers.iter().zip(kinds.iter_mut()) {
        *kind = fields::field(h.name.as_bytes());
        match *kind {
            Field::Host => {
                if host.is_some() || !visible_ascii(h.value) {
                    return Plan::Handoff;
                }
                host = Some(h.value);
            }
            Field::ContentLength => match (body, parse_length(h.value)) {
                (None, Some(n)) if n <= MAX_FAST_BODY => body = Some(n),
                // Several, invalid or large: hyper's path judges or streams it.
                _ => return Plan::Handoff,
            },
            Field::Connection => {
                if !fields::plain_connection(h.value, &mut close) {
                    // Lists other fields as hop-by-hop (or asks for an upgrade).
                    return Plan::Handoff;
                }
            }
            Field::XForwardedFor => xff = true,
            f if needs_hyper(f) => return Plan::Handoff,
            _ => {}
        }
    }
    let Some(host) = host.and_then(|h| std::str::from_utf8(h).ok()) else {
        return Plan::Handoff;
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if crate::route::checks::has_dot_segments(path.as_bytes()) {
        // hyper's path answers 400.
        return Plan::Handoff;
    }
    let gate = {
        let snapshot = proxy.shared.services.load();
        match snapshot.router.lookup(host, path) {
            Some(g) => g.clone(),
            None => return Plan::Handoff,
        }
    };
    // A request that may ask for a rollout candidate is decided on hyper's path.
    if !serves(gate.settings())
        || gate.may_want_candidate(req.headers.iter().map(|h| h.name.as_bytes()))
    {
        return Plan::Handoff;
    }
    out.clear();
    out.reserve(head_len + 128);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let underscores = !proxy.shared.drop_underscore_headers;
    for (h, kind) in req.headers.iter().zip(kinds) {
        let name = h.name.as_bytes();
        let keep = match kind {
            Field::Host | Field::ContentLength => true,
            Field::Other => underscores || !fields::underscored(name),
            // Hop-by-hop, or set by this hop below.
            _ => false,
        };
        if keep {
            put_field(out, name, h.value);
        }
    }
    put_field(out, b"x-forwarded-host", host.as_bytes());
    // Every earlier hop, however many lines they came on (RFC 9110 §5.3), then the client.
    out.extend_from_slice(b"x-forwarded-for: ");
    if xff {
        for (h, kind) in req.headers.iter().zip(kinds) {
            if kind == Field::XForwardedFor && visible_ascii(h.value) {
                out.extend_from_slice(h.value);
                out.extend_from_slice(b", ");
            }
        }
    }
    out.extend_from_slice(proxy.client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    put_field(out, b"x-forwarded-proto", proxy.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    Plan::Forward(Forward {
        gate,
        head_len,
        body: body.unwrap_or(0) as usize,
        close,
        idempotent: crate::forward::idempotent(method),
        head: method == "HEAD",
    })
}

/// Whether the fast path serves a service: cleartext HTTP/1.1 backends only.
fn serves(settings: &crate::gate::GateSettings) -> bool {
    settings.protocol == Protocol::Http1 && settings.upstream.is_none()
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
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
struct Head {
    /// Its length in the response buffer (the body starts after it).
    len: usize,
    status: u16,
    framing: Framing,
    /// The backend connection can take another request after this response.
    reuse: bool,
}

/// What the client's response head needs besides the backend's.
#[derive(Clone, Copy)]
struct ResponseCtx {
    cold: bool,
    close: bool,
    head_method: bool,
}

/// One attempt: a request head to one endpoint, until its response head.
struct Exchange<'a> {
    pool: &'a crate::upstream::raw::RawPool,
    host: &'a crate::upstream::raw::Host,
    addr: SocketAddr,
    idempotent: bool,
    timeout: std::time::Duration,
    ctx: ResponseCtx,
}

impl Exchange<'_> {
    /// Writes `out` (the request head) on a pooled or new connection and reads the response
    /// head into `resp`; then `out` holds the client's response head. A pooled connection
    /// that turns out closed before answering anything is replaced (idempotent requests).
    async fn run(
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

enum Parsed {
    Partial,
    Interim(usize),
    Invalid(&'static str),
    Complete(Head),
}

/// Parses a response head in `resp` and writes the client's head into `out`.
fn response_head(resp: &[u8], out: &mut Vec<u8>, ctx: ResponseCtx) -> Parsed {
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
    let mut reuse = version == 1;
    let mut chunked = None;
    let mut length: Option<u64> = None;
    let mut listed = false;
    // Each field's kind, found once for both passes.
    let mut kinds = [Field::Other; RESPONSE_HEADERS];
    for (h, kind) in r.headers.iter().zip(kinds.iter_mut()) {
        *kind = fields::field(h.name.as_bytes());
        if *kind == Field::TransferEncoding {
            // The final coding decides (RFC 9112 §6.3).
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if *kind == Field::ContentLength {
            for v in h.value.split(|b| *b == b',') {
                let Some(n) = parse_length(v.trim_ascii()) else {
                    return Parsed::Invalid("the backend sent an invalid Content-Length");
                };
                if length.is_some_and(|l| l != n) {
                    return Parsed::Invalid("the backend sent conflicting Content-Lengths");
                }
                length = Some(n);
            }
        } else if *kind == Field::Connection {
            let mut close = false;
            listed |= !fields::plain_connection(h.value, &mut close);
            reuse &= !close;
        }
    }
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
    // Fields the backend's `Connection` lists are hop-by-hop too (rare: collected only then).
    let listed: Vec<&[u8]> = if listed {
        r.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| h.value.split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
            .collect()
    } else {
        Vec::new()
    };
    out.clear();
    out.reserve(len + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    // The reason phrase as the backend sent it, empty too (as hyper's path passes it on).
    out.extend_from_slice(r.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    let mut one_length = false;
    for (h, kind) in r.headers.iter().zip(kinds) {
        let name = h.name.as_bytes();
        dated |= name.len() == 4 && name.eq_ignore_ascii_case(b"date");
        let keep = match kind {
            k if k.hop_by_hop() => false,
            // Once (a repeat agrees, checked above); not on a 204 (RFC 9110 §8.6) or a 304,
            // unless to `HEAD` (as hyper's server).
            Field::ContentLength => {
                !std::mem::replace(&mut one_length, true)
                    && chunked.is_none()
                    && (ctx.head_method || !matches!(status, 204 | 304))
            }
            // Reveille's own cold-start field replaces one the backend sent.
            _ if ctx.cold && name.eq_ignore_ascii_case(COLD_START_HEADER.as_bytes()) => false,
            k => k.protected() || !listed.iter().any(|l| l.eq_ignore_ascii_case(name)),
        };
        if keep {
            put_field(out, name, h.value);
        }
    }
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

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn itoa3(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}

/// Writes the client's response head (in `out`) and passes the body on. `Ok(true)` when the
/// body ended exactly where its framing says (the backend connection may be reused);
/// `Err` when either side failed midway.
async fn relay_body<S: ClientIo>(
    client: &mut S,
    w: Writer<'_>,
    mut backend: Release<'_>,
    resp: &mut Vec<u8>,
    out: &mut Vec<u8>,
    start: usize,
    framing: Framing,
) -> Result<(), RelayError> {
    let first = &resp[start..];
    match framing {
        Framing::Empty => {
            backend.done(first.is_empty());
            w.put(client, out).await
        }
        Framing::Length(n) => {
            let take = first.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            let mut clean = first.len() == take;
            out.extend_from_slice(&first[..take]);
            let mut left = n - take as u64;
            if left == 0 {
                backend.done(clean);
            }
            w.put(client, out).await?;
            while left > 0 {
                let got = read_some(backend.up(), resp).await?;
                let take = got.min(usize::try_from(left).unwrap_or(usize::MAX));
                clean &= got == take;
                left -= take as u64;
                if left == 0 {
                    backend.done(clean);
                }
                w.put(client, &resp[..take]).await?;
            }
            Ok(())
        }
        Framing::Chunked => {
            // Passed on as framed, but for trailer fields (see `chunked::Scanner::passed`).
            let mut scanner = chunked::Scanner::default();
            let end = scanner.feed(first).map_err(|_| RelayError::BadChunked)?;
            let upto = end.unwrap_or(first.len());
            out.extend_from_slice(&first[..scanner.passed(upto)]);
            if let Some(end) = end {
                backend.done(end == first.len());
                if scanner.trailing() {
                    out.extend_from_slice(b"\r\n");
                }
                return w.put(client, out).await;
            }
            w.put(client, out).await?;
            loop {
                let got = read_some(backend.up(), resp).await?;
                match scanner
                    .feed(&resp[..got])
                    .map_err(|_| RelayError::BadChunked)?
                {
                    Some(end) => {
                        backend.done(end == got);
                        let n = scanner.passed(end);
                        if scanner.trailing() {
                            resp.truncate(n);
                            resp.extend_from_slice(b"\r\n");
                            return w.put(client, resp).await;
                        }
                        return w.put(client, &resp[..n]).await;
                    }
                    None => {
                        let n = scanner.passed(got);
                        w.put(client, &resp[..n]).await?;
                    }
                }
            }
        }
        Framing::UntilClose => {
            put_chunk(out, first);
            w.put(client, out).await?;
            loop {
                resp.clear();
                if resp.capacity() < RESPONSE_BUF {
                    resp.reserve(RESPONSE_BUF);
                }
                let got = backend
                    .up()
                    .read_buf(resp)
                    .await
                    .map_err(|e| RelayError::BackendFailed(e.kind()))?;
                out.clear();
                if got == 0 {
                    backend.done(false);
                    return w.put(client, b"0\r\n\r\n").await;
                }
                put_chunk(out, &resp[..got]);
                w.put(client, out).await?;
            }
        }
    }
}

/// Appends `data` as one chunk (nothing for no data: an empty chunk would end the body).
fn put_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Reads the next piece of a body into `resp` (replacing what was there); the buffer grows
/// while reads fill it, up to [`MAX_BODY_READ`]. An early end is an error.
async fn read_some(up: &mut TcpStream, resp: &mut Vec<u8>) -> Result<usize, RelayError> {
    let full = resp.len() == resp.capacity();
    resp.clear();
    if full && resp.capacity() < MAX_BODY_READ {
        resp.reserve(resp.capacity() * 2);
    } else if resp.capacity() < RESPONSE_BUF {
        resp.reserve(RESPONSE_BUF);
    }
    match up.read_buf(resp).await {
        Ok(0) => Err(RelayError::BackendGone),
        Err(e) => Err(RelayError::BackendFailed(e.kind())),
        Ok(n) => Ok(n),
    }
}

/// A connection handed to hyper: the bytes already read come first.
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: ClientIo> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: ClientIo> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;
