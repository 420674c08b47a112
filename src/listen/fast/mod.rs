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

mod attempt;
mod chunked;
mod plan;
mod prefixed;
mod relay;

use attempt::*;
use plan::*;
use prefixed::Prefixed;
use relay::*;

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
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

/// What the fast path serves: a client's connection, plain TCP or TLS.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether a write may stay in the stream until it is flushed (TLS keeps records it could
    /// not write yet). A plain socket's write is in the kernel once it returns, so its flush
    /// is skipped: one poll less per response.
    const BUFFERED: bool = true;

    /// Writes what the stream takes now, without registering for readiness or spending the
    /// task's budget (`None`: this stream has no such write; the caller polls).
    fn try_write_now(&mut self, _buf: &[u8]) -> Option<std::io::Result<usize>> {
        None
    }
}

impl ClientIo for tokio::net::TcpStream {
    const BUFFERED: bool = false;

    fn try_write_now(&mut self, buf: &[u8]) -> Option<std::io::Result<usize>> {
        Some(tokio::net::TcpStream::try_write(self, buf))
    }
}

impl ClientIo for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {}

/// Serves an HTTP/1 connection (plain, or TLS without `h2`): the fast path while its requests are common ones,
/// then hyper for the rest of the connection. `deadline` bounds the wait for the first head.
///
/// A plain `fn` returning an `async move` block (see [`Inbound::serve_tcp`]).
#[allow(clippy::manual_async_fn)] // on purpose, see above
pub(crate) fn serve<S: ClientIo>(
    inbound: Arc<Inbound>,
    stream: S,
    proxy: Proxy,
    close: crate::shutdown::Signal,
    guard: ConnectionGuard,
    deadline: Instant,
) -> impl Future<Output = ()> + Send {
    async move {
        let mut stop_rx = close.clone();
        let stop = OnlyWhenWoken::new(stop_rx.fired());
        tokio::pin!(stop);
        // A connection whose first bytes came after shutdown began shuts down from its first
        // request.
        let mut close = close;
        let shutting = close.is_fired();
        // The in-flight cut, waited on across the connection's requests: registered once and
        // polled only when it fires, not per request (as `stop` above); `cut` itself answers
        // whether it has fired (a request after the cut is cut at once).
        let cut = proxy.shared.in_flight_signal();
        let mut cut_rx = cut.clone();
        let cut_wait = OnlyWhenWoken::new(cut_rx.fired());
        tokio::pin!(cut_wait);
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
            cut,
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
            match c.request(fwd, cut_wait.as_mut()).await {
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
    close: crate::shutdown::Signal,
    /// The shutdown grace ran out: requests in flight are answered `503` (this tells whether it
    /// has; `serve` waits on it).
    cut: crate::shutdown::Signal,
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
        self.shutting || self.close.is_fired()
    }

    /// Holds and forwards one request (its head first in `buf`) and writes its response.
    async fn request<F: Future<Output = ()>>(
        &mut self,
        fwd: Forward,
        cut: Pin<&mut OnlyWhenWoken<F>>,
    ) -> Next {
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
                self.forward(
                    &gate,
                    a,
                    deadline,
                    idempotent,
                    head_method,
                    close,
                    arrived,
                    cut,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let keep = match result {
            Ok(keep) => keep,
            Err(e) => self.refuse(&gate, &e, arrived, close, body > 0).await,
        };
        self.trim();
        if keep {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }

    /// Writes Reveille's answer for `e` (counted and logged); whether the connection stays open.
    /// `body_unread`: the request's body is still coming.
    async fn refuse(
        &mut self,
        gate: &Gate,
        e: &ProxyError,
        arrived: Instant,
        close: bool,
        body_unread: bool,
    ) -> bool {
        answer::rejected(gate, e, arrived);
        let close = close || e.closes_connection() || self.shutting_down();
        answer::error_head(&mut self.out, e, close);
        let written = Writer::of(&self.proxy.shared)
            .put(&mut self.stream, &self.out)
            .await
            .is_ok();
        if written && close && body_unread {
            // The body is still coming: closing with it unread would reset the connection,
            // and the client could lose the answer. Linger briefly.
            linger(&mut self.stream).await;
        }
        written && !close
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
    async fn forward<F: Future<Output = ()>>(
        &mut self,
        gate: &Arc<Gate>,
        acquired: Acquired,
        deadline: Instant,
        idempotent: bool,
        head_method: bool,
        close: bool,
        arrived: Instant,
        cut: Pin<&mut OnlyWhenWoken<F>>,
    ) -> Result<bool, ProxyError> {
        if self.cut.is_fired() {
            return Err(ProxyError::ShuttingDown {
                service: gate.name().clone(),
            });
        }
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
            () = cut => {
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
            &mut self.buf,
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
    // A small read on the stack: a held request's read buffer stays released (it is reserved
    // only when pipelined bytes do come), and the held connection costs no 4 KiB buffer.
    let mut piece = [0u8; 64];
    loop {
        if buf.len() >= MAX_HEADER_BYTES {
            // Enough queued; the rest waits in the socket.
            return std::future::pending().await;
        }
        // Cancel-safe: a read that did not complete took nothing.
        match stream.read(&mut piece).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&piece[..n]),
        }
    }
}

#[cfg(test)]
mod tests;
