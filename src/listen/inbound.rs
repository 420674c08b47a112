//! Inbound connections: where a client connection's way starts, for the plain listener
//! ([`crate::app`]) and the TLS one ([`crate::listen::tls`]). The protocol is chosen once per
//! connection: on plain TCP by peeking at the first bytes for the HTTP/2 prior-knowledge
//! preface (h2c), under TLS by ALPN. The connection is then served by hyper's own `http1`
//! (with upgrades, for WebSockets) or `http2` server, driven by [`drive`] until it ends or
//! the shutdown closes it.
//!
//! Why not hyper-util's `auto` builder: it reads the first 24 bytes itself and hands them to
//! hyper as a prefix, so hyper's first read returns only those bytes and its HTTP/1 read
//! buffer grows from 8 to 16 KiB on every connection. Peeking leaves the bytes in the socket.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::Timeouts;
use crate::forward::Proxy;
use crate::listen::ConnectionGuard;
use crate::route::checks::{MAX_HEADERS, MAX_HEADER_BYTES};

pub(crate) use super::activity::{Activity, Tracked, Watched};

/// HTTP/2 clients are pinged this often; one that does not answer within
/// [`H2_PING_TIMEOUT`] is disconnected (HTTP/1's idle keep-alive connections are closed by
/// `timeouts.client_header`, which also bounds the wait for the next request).
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
/// See [`H2_PING_INTERVAL`].
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// On shutdown, how long a connection may still send a request before it is closed once idle.
/// A client that connected just before the shutdown has its request on the way; closing the
/// connection at once would lose it.
pub(crate) const LAST_REQUEST_GRACE: Duration = Duration::from_millis(500);
/// The start of the HTTP/2 connection preface; no HTTP/1 method starts with it.
const H2_PREFACE_START: &[u8; 4] = b"PRI ";
/// While a client has sent only part of [`H2_PREFACE_START`], how long to wait before looking
/// again (a peek returns at once while any byte is unread, so it cannot simply be awaited).
const PEEK_RETRY: Duration = Duration::from_millis(5);

/// The HTTP/1 and HTTP/2 server settings for client connections.
#[derive(Clone)]
pub struct Inbound {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    client_header: Duration,
    client_idle: Duration,
    client_write: Duration,
}

impl Inbound {
    /// `timeouts.client_header`: the bound on a request head, from its first byte.
    pub(crate) fn client_header(&self) -> Duration {
        self.client_header
    }

    /// The settings for client connections under `timeouts`.
    pub fn new(timeouts: &Timeouts) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(timeouts.client_header)
            .keep_alive(true)
            .max_buf_size(MAX_HEADER_BYTES)
            // The buffer may take in more than `max_buf_size` in one read; this limit is exact.
            .max_header_size(MAX_HEADER_BYTES)
            .max_headers(MAX_HEADERS);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .keep_alive_interval(Some(H2_PING_INTERVAL))
            .keep_alive_timeout(H2_PING_TIMEOUT);
        Inbound {
            http1: h1,
            http2: h2,
            client_header: timeouts.client_header,
            client_idle: timeouts.client_idle,
            client_write: timeouts.client_write,
        }
    }

    /// The bounds [`drive`] keeps on a connection it serves.
    fn bounds(
        &self,
        activity: Arc<Activity>,
        metrics: &crate::telemetry::metrics::Metrics,
    ) -> Bounds {
        Bounds {
            activity,
            idle: self.client_idle,
            write: self.client_write,
            metrics: metrics.clone(),
        }
    }

    /// Serves `io` as HTTP/1.1 (upgrades allowed).
    pub fn http1<I>(&self, io: I, svc: Proxy) -> Conn<I>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let bounds = Box::new(self.bounds(activity.clone(), &svc.shared.metrics));
        let svc = Tracked::new(svc, activity.clone());
        Conn::Http1 {
            conn: self
                .http1
                .serve_connection(TokioIo::new(Watched::new(io, activity)), svc)
                .with_upgrades(),
            bounds,
        }
    }

    /// Serves `io` as HTTP/2.
    pub fn http2<I>(&self, io: I, svc: Proxy) -> Conn<I>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let bounds = Box::new(self.bounds(activity.clone(), &svc.shared.metrics));
        let svc = Tracked::new(svc, activity.clone());
        Conn::Http2 {
            // Boxed: an HTTP/1 connection, the common case, then does not carry HTTP/2's size.
            conn: Box::pin(
                self.http2
                    .serve_connection(TokioIo::new(Watched::new(io, activity)), svc),
            ),
            bounds,
        }
    }

    /// Serves a plain TCP connection: waits for its first bytes (bounded by
    /// `timeouts.client_header`; on shutdown by [`LAST_REQUEST_GRACE`]), serves it as h2c when
    /// they start the HTTP/2 preface and as HTTP/1 otherwise, until it ends or the shutdown
    /// closes it. A connection that sends nothing in time, or closes, is dropped.
    ///
    /// A plain `fn` returning an `async move` block, not an `async fn`: the block uses its
    /// captures in place, where an `async fn` would keep a second copy of moved arguments in
    /// the task (this future is most of a held request's connection task).
    #[allow(clippy::manual_async_fn)] // on purpose, see above
    pub(crate) fn serve_tcp(
        self: Arc<Self>,
        stream: TcpStream,
        svc: Proxy,
        mut close: crate::shutdown::Signal,
        guard: ConnectionGuard,
    ) -> impl Future<Output = ()> + Send {
        async move {
            let deadline = Instant::now() + self.client_header;
            let conn = match first_bytes(&stream, &mut close, deadline).await {
                Some(Protocol::Http2) => self.http2(stream, svc),
                Some(Protocol::Http1) => {
                    return crate::listen::fast::serve(self, stream, svc, close, guard, deadline)
                        .await
                }
                // Closed, failed or silent: nothing to answer.
                None => return,
            };
            drive(conn, close, guard).await;
        }
    }
}

/// What a plain connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// [`sniff`] bounded by `deadline`, and on shutdown by [`LAST_REQUEST_GRACE`]. One future
/// awaited once, so the task can reuse its space for the connection afterwards.
async fn first_bytes(
    stream: &TcpStream,
    close: &mut crate::shutdown::Signal,
    deadline: Instant,
) -> Option<Protocol> {
    let sniff = tokio::time::timeout_at(deadline, sniff(stream));
    tokio::pin!(sniff);
    tokio::select! {
        r = sniff.as_mut() => r.ok().flatten(),
        () = close.fired() => {
            tokio::time::timeout(LAST_REQUEST_GRACE, sniff).await.ok()?.ok().flatten()
        }
    }
}

/// Reads (without consuming) as many of the first bytes as needed to tell h2c prior knowledge
/// from HTTP/1: the first byte that differs from `PRI ` decides HTTP/1; all four decide
/// HTTP/2. `None` when the client closes first.
async fn sniff(stream: &TcpStream) -> Option<Protocol> {
    let mut buf = [0u8; 4];
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        match decide(&buf[..n]) {
            Decision::Closed => return None,
            Decision::Known(p) => return Some(p),
            Decision::NeedMore => tokio::time::sleep(PEEK_RETRY).await,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Closed,
    NeedMore,
    Known(Protocol),
}

fn decide(first: &[u8]) -> Decision {
    let n = first.len().min(H2_PREFACE_START.len());
    if first.is_empty() {
        Decision::Closed
    } else if first[..n] != H2_PREFACE_START[..n] {
        Decision::Known(Protocol::Http1)
    } else if n == H2_PREFACE_START.len() {
        Decision::Known(Protocol::Http2)
    } else {
        Decision::NeedMore
    }
}

/// What [`drive`] watches on a connection: its activity and the bounds on it.
pub struct Bounds {
    activity: Arc<Activity>,
    idle: Duration,
    write: Duration,
    metrics: crate::telemetry::metrics::Metrics,
}

impl Bounds {
    /// How often the bounds are looked at: a quarter of the shorter one, so either is kept
    /// within a quarter of itself.
    fn period(&self) -> Duration {
        (self.idle.min(self.write) / 4).max(Duration::from_millis(10))
    }
}

/// What a look at a connection's bounds found.
enum Verdict {
    Fine,
    /// No request in progress for `client_idle`: shut down gracefully.
    Idle,
    /// Writes made no progress for `client_write`: close now.
    Stalled,
}

type Io<I> = TokioIo<Watched<I>>;

pin_project! {
    /// One client connection served by hyper, HTTP/1 or HTTP/2, with a graceful shutdown.
    #[project = ConnProj]
    pub enum Conn<I> {
        /// HTTP/1.1, upgrades allowed.
        Http1 {
            #[pin] conn: http1::UpgradeableConnection<Io<I>, Tracked>,
            bounds: Box<Bounds>,
        },
        /// HTTP/2.
        Http2 {
            conn: Pin<Box<http2::Connection<Io<I>, Tracked, TokioExecutor>>>,
            bounds: Box<Bounds>,
        },
    }
}

impl<I> Conn<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Starts a graceful shutdown: HTTP/1 closes once the request in progress is answered,
    /// HTTP/2 sends GOAWAY and closes once its streams are done. Keep polling until it ends.
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        match self.project() {
            ConnProj::Http1 { conn, .. } => conn.graceful_shutdown(),
            ConnProj::Http2 { conn, .. } => conn.as_mut().graceful_shutdown(),
        }
    }

    fn bounds(&self) -> &Bounds {
        match self {
            Conn::Http1 { bounds, .. } | Conn::Http2 { bounds, .. } => bounds,
        }
    }

    /// Looks at the connection's bounds (and counts what they end).
    fn verdict(&self) -> Verdict {
        let b = self.bounds();
        if b.activity.write_blocked_for() >= b.write {
            b.metrics.reject_connection("client_write_timeout");
            Verdict::Stalled
        } else if b.activity.idle_for() >= b.idle {
            b.metrics.reject_connection("client_idle_timeout");
            Verdict::Idle
        } else {
            Verdict::Fine
        }
    }
}

impl<I> Future for Conn<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = hyper::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ConnProj::Http1 { conn, .. } => conn.poll(cx),
            ConnProj::Http2 { conn, .. } => conn.as_mut().poll(cx),
        }
    }
}

/// Serves one connection until it ends; on shutdown, lets it send a last request, then closes
/// it once its in-progress requests are answered.
///
/// Like [`Inbound::serve_tcp`], an `async move` block that polls `conn` where it was captured
/// (an `async fn` pinning its argument would store the connection twice).
#[allow(clippy::manual_async_fn)] // on purpose, see above
pub(crate) fn drive<I>(
    mut conn: Conn<I>,
    mut close: crate::shutdown::Signal,
    guard: ConnectionGuard,
) -> impl Future<Output = ()> + Send
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let period = conn.bounds().period();
        // Re-armed, not re-created: one timer for the connection's life.
        let tick = tokio::time::sleep(period);
        tokio::pin!(tick);
        let stop = OnlyWhenWoken::new(close.fired());
        tokio::pin!(stop);
        loop {
            tokio::select! {
                biased;
                _ = &mut conn => return,
                _ = stop.as_mut() => break,
                () = tick.as_mut() => match conn.verdict() {
                    Verdict::Fine => tick.as_mut().reset(Instant::now() + period),
                    // Dropping the connection drops its responses in progress: their endpoint
                    // slots and backend connections are freed with them.
                    Verdict::Stalled => return,
                    Verdict::Idle => {
                        Pin::new(&mut conn).graceful_shutdown();
                        // A client that does not read the GOAWAY or the close is cut after
                        // the write bound.
                        let _ = tokio::time::timeout(conn.bounds().write, &mut conn).await;
                        return;
                    }
                },
            }
        }
        tokio::select! {
            _ = &mut conn => return,
            _ = tokio::time::sleep(LAST_REQUEST_GRACE) => {}
        }
        Pin::new(&mut conn).graceful_shutdown();
        let _ = (&mut conn).await;
        drop(guard); // the connection slot is free only now
    }
}

pin_project! {
    /// Polls `inner` only once its own waker has fired. `select!` polls every branch each time
    /// the task wakes, so racing the rarely-firing shutdown signal against a busy connection
    /// would otherwise re-poll the signal on every request (a watch poll: a lock and a waker
    /// swap, ≈ 600 instructions per request in callgrind).
    pub(crate) struct OnlyWhenWoken<F> {
        #[pin]
        inner: F,
        flag: Arc<WokenFlag>,
        waker: std::task::Waker,
    }
}

struct WokenFlag {
    woken: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for WokenFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> OnlyWhenWoken<F> {
    pub(crate) fn new(inner: F) -> Self {
        let flag = Arc::new(WokenFlag {
            // The first poll must reach `inner`, so it can register its waker.
            woken: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        });
        let waker = std::task::Waker::from(flag.clone());
        OnlyWhenWoken { inner, flag, waker }
    }
}

impl<F: Future> Future for OnlyWhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read: a wake in between is not lost.
        this.flag.task.register(cx.waker());
        if !this
            .flag
            .woken
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_differing_byte_decides_http1() {
        for first in [
            &b"G"[..],
            b"GET / HTTP/1.1\r\n",
            b"POST",
            b"PUT ",
            b"PATCH",
            b"PROPFIND",
            b"PRO",
            b"PRIX",
        ] {
            assert_eq!(decide(first), Decision::Known(Protocol::Http1), "{first:?}");
        }
    }

    #[tokio::test]
    async fn only_when_woken_polls_its_future_after_its_wake_only() {
        let (tx, mut rx) = crate::shutdown::channel();
        let polls = std::cell::Cell::new(0u32);
        let mut changed = Box::pin(rx.fired());
        let counted = std::future::poll_fn(|cx| {
            polls.set(polls.get() + 1);
            changed.as_mut().poll(cx).map(|_| ())
        });
        let gated = OnlyWhenWoken::new(counted);
        tokio::pin!(gated);
        let noop = std::task::Waker::noop();
        let mut cx = Context::from_waker(noop);
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.get(), 1, "the first poll reaches the future");
        for _ in 0..5 {
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.get(), 1, "polls without its wake-up do not reach it");
        tx.fire();
        assert!(gated.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.get(), 2);
    }

    #[test]
    fn the_preface_start_decides_http2() {
        assert_eq!(decide(b"PRI "), Decision::Known(Protocol::Http2));
        assert_eq!(
            decide(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Decision::Known(Protocol::Http2)
        );
    }

    fn shared() -> (crate::Config, Arc<crate::forward::Shared>) {
        let cfg = crate::Config::parse(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: a\n    hosts: [a]\n    backend: { static: { addresses: [\"127.0.0.1:1\"] } }\n",
        )
        .unwrap();
        let metrics = crate::telemetry::metrics::Metrics::new();
        let services = crate::route::services::Services::new(
            metrics.clone(),
            crate::gate::HeldLimit::new(1),
            None,
            cfg.timeouts,
        );
        let shared = Arc::new(crate::forward::Shared::new(services, metrics, &cfg));
        (cfg, shared)
    }

    /// The connection task is most of what a held request costs: the connection must be stored
    /// once, not once per `async fn` layer (an `async fn` keeps moved arguments twice). An
    /// HTTP/1 connection's task is the fast path's ([`crate::listen::fast`]); hyper's connection, boxed
    /// when a connection is handed to it, must not be inline beside it. The bound is for debug
    /// builds (release futures are smaller) and well under the 16 KiB a held request may cost.
    #[tokio::test]
    async fn the_connection_task_stores_the_connection_once() {
        let (cfg, shared) = shared();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_client, (server, remote)) =
            tokio::join!(async { TcpStream::connect(addr).await.unwrap() }, async {
                listener.accept().await.unwrap()
            });
        let inbound = Arc::new(Inbound::new(&cfg.timeouts));
        let conns = crate::listen::Connections::new(1);
        let (_close, close) = crate::shutdown::channel();
        let svc = Proxy::new(shared, remote, "http");
        let conn_size = std::mem::size_of::<Conn<TcpStream>>();
        let task = inbound.serve_tcp(server, svc, close, conns.try_open().unwrap());
        let task_size = std::mem::size_of_val(&task);
        assert!(
            task_size < 3 * 1024,
            "connection task {task_size} bytes (hyper's connection: {conn_size} bytes)"
        );
    }

    /// A held request's future (the boxed `Proxy::call`) carries one copy of the request, not
    /// one per `async` layer.
    #[tokio::test]
    async fn a_request_future_stays_small() {
        use hyper::service::Service;
        use tokio::io::AsyncWriteExt;
        let (_, shared) = shared();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (s, remote) = listener.accept().await.unwrap();
            let svc = Proxy::new(shared, remote, "http");
            let serve = hyper::service::service_fn(move |req| {
                let fut = svc.call(req);
                let _ = tx.send(std::mem::size_of_val(&*fut));
                fut
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(s), serve)
                .await;
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
            .await
            .unwrap();
        let size = rx.recv().await.unwrap();
        assert!(size < 1024, "request future {size} bytes");
    }

    #[test]
    fn a_partial_preface_waits_and_nothing_means_closed() {
        for first in [&b"P"[..], b"PR", b"PRI"] {
            assert_eq!(decide(first), Decision::NeedMore, "{first:?}");
        }
        assert_eq!(decide(b""), Decision::Closed);
    }
}
