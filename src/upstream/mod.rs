//! Upstream: the pooled HTTP clients to backends and the header rewriting around them. Bodies
//! are streamed both ways, never buffered; the endpoint slot ([`Permit`]) rides along with the
//! response body and is released when the body ends, so in-flight counts cover streaming.
//!
//! Cleartext HTTP/1.1 backends go through [`Http1Pool`], a pool of our own: per endpoint
//! address, idle `hyper::client::conn::http1` connections (LIFO, a bounded idle count, an idle
//! timeout). A connection is not given a task of its own: the request's task drives it while
//! waiting for the response head, and the response body drives it while the client reads the
//! body ([`ProxyBody`]), so a proxied request is written, answered and streamed back without
//! crossing tasks. When the body ends, the connection goes back to the pool; a connection that
//! closes, errs, or whose body is dropped early, is dropped. A reaper task drops idle
//! connections past the idle timeout and those the backend closed. The response timeout is a
//! timer per connection, re-armed per request (extending a pending tokio timer is one atomic
//! operation, not a timer-wheel registration).
//!
//! h2c backends share one pooled hyper-util client ([`Upstreams::h2c`]). A TLS service (`h2`,
//! `https`) gets a pooled client of its TLS settings ([`tls_client`], kept in
//! [`Upstreams::tls`] and handed to its gate, so it outlives a gate replaced by a reload): its
//! [`Connector`] connects TCP to the endpoint's address, then does the rustls handshake with
//! the configured server name (SNI and certificate check) and roots, offering ALPN `h2` or
//! `http/1.1`. A failed handshake is a connect error, so it is retried on another endpoint like
//! a refused connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

mod body;
pub mod raw;
mod tls;
pub use body::{BodySlot, RequestBody, READ_AHEAD};
pub use tls::TlsClients;

use crate::config::{Protocol, Timeouts, UpstreamTls};

/// A pooled client to backends (one per cleartext protocol, one per TLS service).
pub type UpstreamClient = Client<Connector, RequestBody>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects to a backend: TCP to the URI's address, then TLS when the service has it.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    tls: Option<TlsConnect>,
}

#[derive(Clone)]
struct TlsConnect {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    handshake_timeout: Duration,
    require_h2: bool,
}

impl tower::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.http.call(dst);
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = connecting.await?;
            let Some(tls) = tls else {
                return Ok(UpstreamIo::Plain(tcp));
            };
            let handshake = tls
                .connector
                .connect(tls.server_name.clone(), tcp.into_inner());
            let stream = tokio::time::timeout(tls.handshake_timeout, handshake)
                .await
                .map_err(|_| "TLS handshake with the backend timed out")??;
            if tls.require_h2 && stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err("the backend did not select h2 by ALPN".into());
            }
            Ok(UpstreamIo::Tls(Box::new(TokioIo::new(stream))))
        })
    }
}

/// A connection to a backend, cleartext or TLS.
pub enum UpstreamIo {
    /// Cleartext TCP.
    Plain(TokioIo<TcpStream>),
    /// TLS over TCP (boxed: a TLS session is large, a plain connection should stay small).
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            UpstreamIo::Plain(io) => io.connected(),
            UpstreamIo::Tls(io) => {
                let (tcp, tls) = io.inner().get_ref();
                let connected = tcp.connected();
                if tls.alpn_protocol() == Some(b"h2") {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_flush(cx),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(io) => io.is_write_vectored(),
            UpstreamIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }
}

fn tcp_connector(timeouts: &Timeouts, enforce_http: bool) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeouts.upstream_connect));
    http.enforce_http(enforce_http);
    http
}

fn pooled(connector: Connector, h2: bool, timeouts: &Timeouts) -> UpstreamClient {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_timer(TokioTimer::new())
        .pool_idle_timeout(timeouts.upstream_idle)
        .pool_max_idle_per_host(usize::MAX)
        .http2_only(h2);
    if h2 {
        b.timer(TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(false);
    }
    b.build(connector)
}

/// The pooled client of one TLS service (`protocol` `h2` or `https`). The handshake counts
/// towards `timeouts.upstream_connect` on its own (TCP connect and handshake each get it).
pub fn tls_client(tls: &UpstreamTls, protocol: Protocol, timeouts: &Timeouts) -> UpstreamClient {
    let h2 = protocol == Protocol::H2;
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(tls.roots.iter().cloned());
    let mut config = ClientConfig::builder_with_provider(crate::listen::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let connector = Connector {
        http: tcp_connector(timeouts, false),
        tls: Some(TlsConnect {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: tls.server_name.clone(),
            handshake_timeout: timeouts.upstream_connect,
            require_h2: h2,
        }),
    };
    pooled(connector, h2, timeouts)
}

/// The pooled upstream clients: shared ones of the cleartext protocols, one per TLS setting.
pub struct Upstreams {
    /// HTTP/1.1 backends.
    pub http1: Http1Pool,
    /// HTTP/2 cleartext (prior knowledge) backends, e.g. gRPC.
    pub h2c: UpstreamClient,
    /// HTTP/1.1 backends of the fast path ([`crate::listen::fast`]).
    pub raw: crate::upstream::raw::RawPool,
    /// TLS backends' clients, by TLS setting; each gate of a TLS service holds its own.
    pub tls: TlsClients,
}

impl Upstreams {
    /// Builds the shared clients.
    pub fn new(timeouts: &Timeouts) -> Self {
        let connector = Connector {
            http: tcp_connector(timeouts, true),
            tls: None,
        };
        Upstreams {
            http1: Http1Pool::new(timeouts),
            h2c: pooled(connector, true, timeouts),
            raw: crate::upstream::raw::RawPool::new(
                timeouts.upstream_connect,
                timeouts.upstream_idle,
            ),
            tls: TlsClients::new(timeouts),
        }
    }

    /// Where a service's requests go: its TLS client (`own`, TLS services) or the shared one
    /// of its cleartext protocol; `None` for a TLS protocol without its own client (never
    /// falls back to cleartext).
    pub fn pick<'a>(
        &'a self,
        own: Option<&'a UpstreamClient>,
        p: Protocol,
    ) -> Option<Upstream<'a>> {
        match (own, p) {
            (Some(own), p) => Some(Upstream::Client(own, p)),
            (None, Protocol::Http1) => Some(Upstream::Http1(&self.http1)),
            (None, Protocol::H2c) => Some(Upstream::Client(&self.h2c, p)),
            (None, Protocol::H2 | Protocol::Https) => None,
        }
    }
}

/// Idle connections kept per endpoint address at most.
pub(crate) const MAX_IDLE_PER_ENDPOINT: usize = 1024;
/// Pooled connections tried per attempt before connecting anew (each one found closed or not
/// ready hands the request back untouched).
pub(crate) const STALE_TRIES: u32 = 4;

/// Why sending a request to a backend failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection: nothing was sent, so a retry elsewhere is always safe.
    Connect(BoxError),
    /// No response head within the response timeout.
    Timeout,
    /// The request may have reached the backend.
    Failed(BoxError),
}

impl SendError {
    /// A failure after the request may have reached the backend, said in words.
    pub(crate) fn failed(why: &'static str) -> Self {
        SendError::Failed(why.into())
    }

    /// Whether the failure was connecting (nothing sent).
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Timeout => f.write_str("no response in time"),
            SendError::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// hyper's connection state machine (with upgrades; its type cannot be named).
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// What a pooled connection keeps between requests: one allocation each per connection, none
/// per request.
struct ConnIo {
    driver: Driver,
    /// The response timer, re-armed per request.
    timer: Pin<Box<tokio::time::Sleep>>,
}

/// One HTTP/1.1 connection to a backend, driven by whichever task uses it.
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<RequestBody>,
    /// `None` once the connection has finished (closed, failed, or upgraded): dropping hyper's
    /// state answers any request it still held.
    io: Option<ConnIo>,
}

impl Conn {
    /// Drives the connection; returns whether it has finished.
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(io) = self.io.as_mut() {
            if io.driver.as_mut().poll(cx).is_ready() {
                self.io = None;
            }
        }
        self.io.is_none()
    }

    /// Whether it can take a request now. Driving it first notices a close by the backend.
    fn ready(&mut self, cx: &mut Context<'_>) -> bool {
        !self.drive(cx) && self.sender.is_ready()
    }
}

struct Idle {
    conn: Conn,
    since: std::time::Instant,
}

/// The idle connections to one endpoint address.
struct Host {
    idle: Mutex<Vec<Idle>>,
}

impl Host {
    /// The most recently used idle connection. It is not driven here: one the backend closed
    /// since it was parked hands the request back untouched when driven (see
    /// [`Http1Pool::send`]), and driving it now would only register this task's waker where
    /// sending the request then wakes it for nothing.
    fn checkout(&self) -> Option<Conn> {
        loop {
            let conn = self.idle.lock().pop()?.conn;
            if conn.io.is_some() && conn.sender.is_ready() {
                return Some(conn);
            }
        }
    }

    fn put(&self, conn: Conn) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push(Idle {
                conn,
                since: std::time::Instant::now(),
            });
        }
    }
}

/// A connection lent to one request; goes back to its pool with [`Lease::release`] once the
/// response is complete, and is closed if dropped before.
pub struct Lease {
    conn: Conn,
    host: Arc<Host>,
}

impl Lease {
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        self.conn.drive(cx)
    }

    /// Returns the connection to the pool if it is ready for another request.
    pub(crate) fn release(mut self) {
        // Settle the connection to idle, leaving no waker of this task behind: an idle
        // connection must not wake the last task that used it.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if self.conn.ready(&mut cx) {
            self.host.put(self.conn);
        }
    }

    /// Drives the connection to its end (after a `101 Switching Protocols`, this hands the
    /// connection over to the response's upgrade).
    pub async fn finish(mut self) {
        std::future::poll_fn(|cx| {
            if self.drive(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// FNV-1a, for endpoint addresses (few, and not chosen by clients): cheaper than SipHash on the
/// per-request lookup.
#[derive(Default, Clone, Copy)]
struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// A pool's per-endpoint entries, by address, made on first use; the pool's reaper starts
/// with the first entry. Shared by [`Http1Pool`] and the fast path's pool.
pub(crate) struct Endpoints<H> {
    map: dashmap::DashMap<SocketAddr, Arc<H>, std::hash::BuildHasherDefault<AddrHasher>>,
    reaper: std::sync::Once,
}

impl<H> Default for Endpoints<H> {
    fn default() -> Self {
        Endpoints {
            map: dashmap::DashMap::default(),
            reaper: std::sync::Once::new(),
        }
    }
}

impl<H> Endpoints<H> {
    /// `addr`'s entry, made by `make` if there is none; `start_reaper` runs once, with the
    /// first entry.
    pub(crate) fn get(
        &self,
        addr: SocketAddr,
        make: impl FnOnce() -> H,
        start_reaper: impl FnOnce(),
    ) -> Arc<H> {
        if let Some(h) = self.map.get(&addr) {
            return h.clone();
        }
        self.reaper.call_once(start_reaper);
        self.map
            .entry(addr)
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    /// Runs `prune` on every entry; an entry it reports empty is forgotten unless someone
    /// still holds it (endpoints come and go).
    pub(crate) fn prune(&self, mut prune: impl FnMut(&H) -> bool) {
        self.map.retain(|_, h| prune(h) || Arc::strong_count(h) > 1);
    }

    /// `addr`'s entry, if it exists.
    #[cfg(test)]
    pub(crate) fn peek(&self, addr: SocketAddr) -> Option<Arc<H>> {
        self.map.get(&addr).map(|h| h.clone())
    }
}

/// How often a pool whose connections may idle `idle_timeout` is reaped.
pub(crate) fn reap_period(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// A new TCP connection to a backend within `timeout`, Nagle off.
pub(crate) async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connecting to the backend timed out",
            )
        })??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

struct PoolInner {
    hosts: Endpoints<Host>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    builder: hyper::client::conn::http1::Builder,
}

/// The pool of HTTP/1.1 cleartext connections to backends, by endpoint address.
#[derive(Clone)]
pub struct Http1Pool(Arc<PoolInner>);

impl Http1Pool {
    /// An empty pool.
    pub fn new(timeouts: &Timeouts) -> Self {
        let builder = hyper::client::conn::http1::Builder::new();
        Http1Pool(Arc::new(PoolInner {
            hosts: Endpoints::default(),
            connect_timeout: timeouts.upstream_connect,
            idle_timeout: timeouts.upstream_idle,
            builder,
        }))
    }

    fn host(&self, addr: SocketAddr) -> Arc<Host> {
        self.0.hosts.get(
            addr,
            || Host {
                idle: Mutex::new(Vec::new()),
            },
            || {
                let every = reap_period(self.0.idle_timeout);
                tokio::spawn(reap(Arc::downgrade(&self.0), every));
            },
        )
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Conn, SendError> {
        let tcp = connect_tcp(addr, self.0.connect_timeout)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        let (sender, driver) = self
            .0
            .builder
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        Ok(Conn {
            sender,
            io: Some(ConnIo {
                driver: Box::pin(driver.with_upgrades()),
                timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            }),
        })
    }

    /// Sends one attempt of `out` to `addr` on a pooled connection (or a new one), driving the
    /// connection in this task until the response head arrives or `timeout` passes. With
    /// `keep_headers`, `out` keeps its headers for another attempt; without, they move into the
    /// request (no copy) and come back only if the request was never written.
    pub async fn send(
        &self,
        addr: SocketAddr,
        out: &mut Outgoing,
        body: RequestBody,
        timeout: Duration,
        keep_headers: bool,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let host = self.host(addr);
        let mut req = None;
        let mut body = Some(body);
        let mut tries = 0;
        loop {
            tries += 1;
            let pooled = if tries <= STALE_TRIES {
                host.checkout()
            } else {
                None
            };
            let fresh = pooled.is_none();
            let mut conn = match pooled {
                Some(c) => c,
                None => match self.connect(addr).await {
                    Ok(c) => c,
                    Err(e) => {
                        if let Some(r) = req.take() {
                            out.restore(r);
                        }
                        return Err(e);
                    }
                },
            };
            let r = req.take().unwrap_or_else(|| {
                out.origin_request(body.take().expect("one body per send"), keep_headers)
            });
            if let Some(io) = conn.io.as_mut() {
                io.timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + timeout);
            }
            let mut answer = std::pin::pin!(conn.sender.try_send_request(r));
            let outcome = std::future::poll_fn(|cx| {
                conn.drive(cx);
                if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                    return Poll::Ready(Outcome::Answer(r));
                }
                match conn.io.as_mut() {
                    // Finished, and hyper's state (dropped) answered nothing: cannot happen,
                    // but a request must never hang on it.
                    None => Poll::Ready(Outcome::Ended),
                    Some(io) => match io.timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Outcome::TimedOut),
                        Poll::Pending => Poll::Pending,
                    },
                }
            })
            .await;
            match outcome {
                Outcome::Answer(Ok(resp)) => return Ok((resp, Lease { conn, host })),
                Outcome::Answer(Err(mut e)) => {
                    if let Some(r) = e.take_message() {
                        // Never written: the connection closed or was not ready after all.
                        if fresh {
                            out.restore(r);
                            return Err(SendError::Failed(e.into_error().into()));
                        }
                        req = Some(r);
                        continue;
                    }
                    return Err(SendError::Failed(e.into_error().into()));
                }
                Outcome::TimedOut => return Err(SendError::Timeout),
                Outcome::Ended => {
                    return Err(SendError::Failed(
                        "the backend connection ended without an answer".into(),
                    ))
                }
            }
        }
    }
}

/// How waiting for a response head ended (short-lived, on the stack: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Outcome {
    Answer(Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<RequestBody>>>),
    TimedOut,
    Ended,
}

/// Drops idle connections past the idle timeout and those their backend closed, every `every`,
/// until the pool is gone.
async fn reap(pool: std::sync::Weak<PoolInner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = std::time::Instant::now();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        pool.hosts.prune(|host| {
            let mut idle = host.idle.lock();
            idle.retain_mut(|i| {
                now.duration_since(i.since) < pool.idle_timeout && i.conn.ready(&mut cx)
            });
            !idle.is_empty()
        });
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether `name` is hop-by-hop by itself (not by being listed in `Connection`): the rule in
/// [`crate::fields`].
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    crate::fields::of(name).hop_by_hop()
}

/// Fields a `Connection` list cannot remove (the rule in [`crate::fields`]): `Host`, the
/// body's framing, and the fields Reveille sets itself.
pub fn is_protected(name: &HeaderName) -> bool {
    crate::fields::of(name).protected()
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`
/// (except the [`is_protected`] ones).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there is none: one pass over the few names present costs less than a hashed
    // lookup per hop-by-hop name. (Names listed in `Connection` need `Connection` itself.)
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Every `Connection` line counts, and a name counts even beside non-UTF-8 junk.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    for name in listed {
        if !is_protected(&name) {
            headers.remove(name);
        }
    }
    headers.remove(header::CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    // `TE: trailers` is the one TE value HTTP/2 allows; gRPC needs it end to end.
    if headers
        .get_all(header::TE)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::UPGRADE);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::PROXY_AUTHENTICATE);
}

/// A client request rewritten for the backends: hop-by-hop headers removed (the upgrade pair
/// kept for upgrades), Host kept, `X-Forwarded-*` set. Each attempt builds its request from it.
pub struct Outgoing {
    method: http::Method,
    path_and_query: http::uri::PathAndQuery,
    headers: HeaderMap,
}

impl Outgoing {
    /// Rewrites the head of a client request. `upgrade` is the `Upgrade` value to pass on.
    pub fn new(
        parts: http::request::Parts,
        client: SocketAddr,
        proto: &'static str,
        upgrade: Option<HeaderValue>,
    ) -> Self {
        Self::with_client_ip(parts, &client_ip(client), proto, upgrade)
    }

    /// [`Outgoing::new`] with the client's address already made a header value
    /// ([`client_ip`], once per connection rather than per request).
    pub fn with_client_ip(
        parts: http::request::Parts,
        client_ip: &HeaderValue,
        proto: &'static str,
        upgrade: Option<HeaderValue>,
    ) -> Self {
        let http::request::Parts {
            method,
            uri,
            mut headers,
            ..
        } = parts;
        strip_hop_by_hop(&mut headers);
        if let Some(u) = upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, u);
        }
        let host = match headers.get(header::HOST) {
            Some(host) => Some(host.clone()),
            // HTTP/2 clients send :authority instead of Host.
            None => uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .inspect(|v| {
                    headers.insert(header::HOST, v.clone());
                }),
        };
        if let Some(host) = host {
            headers.insert(&X_FORWARDED_HOST, host);
        }
        // Every earlier hop, however many lines they came on (RFC 9110 §5.3), then the client.
        match headers.entry(&X_FORWARDED_FOR) {
            header::Entry::Vacant(e) => {
                e.insert(client_ip.clone());
            }
            header::Entry::Occupied(mut e) => {
                let mut xff = Vec::new();
                for prev in e.iter() {
                    if prev.to_str().is_ok() {
                        xff.extend_from_slice(prev.as_bytes());
                        xff.extend_from_slice(b", ");
                    }
                }
                xff.extend_from_slice(client_ip.as_bytes());
                if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
                    // Replaces every earlier line.
                    e.insert(v);
                }
            }
        }
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        let path_and_query = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        Outgoing {
            method,
            path_and_query,
            headers,
        }
    }

    /// The method.
    pub fn method(&self) -> &http::Method {
        &self.method
    }

    /// The (rewritten) headers.
    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        &mut self.headers
    }

    /// The request for one attempt at `authority` (through a hyper-util client, which wants an
    /// absolute URI). With `keep_headers` the headers are copied for another attempt, else moved.
    pub fn request(
        &mut self,
        authority: &http::uri::Authority,
        protocol: Protocol,
        body: RequestBody,
        keep_headers: bool,
    ) -> Request<RequestBody> {
        let uri = Uri::builder()
            .scheme(if protocol.is_tls() { "https" } else { "http" })
            .authority(authority.clone())
            .path_and_query(self.path_and_query.clone())
            .build()
            .expect("valid parts make a valid URI");
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = match protocol {
            Protocol::Http1 | Protocol::Https => Version::HTTP_11,
            Protocol::H2c | Protocol::H2 => Version::HTTP_2,
        };
        *req.headers_mut() = self.take_headers(keep_headers);
        req
    }

    /// The HTTP/1.1 request for one attempt on a connection of our own (origin-form target).
    fn origin_request(&mut self, body: RequestBody, keep_headers: bool) -> Request<RequestBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = Uri::from(self.path_and_query.clone());
        *req.headers_mut() = self.take_headers(keep_headers);
        req
    }

    fn take_headers(&mut self, keep: bool) -> HeaderMap {
        if keep {
            self.headers.clone()
        } else {
            std::mem::take(&mut self.headers)
        }
    }

    /// Takes the headers back from a request that was never written.
    fn restore(&mut self, req: Request<RequestBody>) {
        let (parts, _) = req.into_parts();
        if self.headers.is_empty() {
            self.headers = parts.headers;
        }
    }
}

/// A client's address as the value this hop adds to `X-Forwarded-For`.
pub fn client_ip(client: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&client.ip().to_string()).expect("an IP address is a valid header value")
}

/// Where one attempt goes: the HTTP/1.1 pool of our own, or a hyper-util client (h2c, TLS).
#[derive(Clone, Copy)]
pub enum Upstream<'a> {
    /// Cleartext HTTP/1.1.
    Http1(&'a Http1Pool),
    /// A hyper-util client for the given protocol.
    Client(&'a UpstreamClient, Protocol),
}

impl Upstream<'_> {
    /// Sends one attempt to `addr` (`authority` in the request URI). See [`Http1Pool::send`] for `keep_headers` (a hyper-util
    /// client always keeps them).
    pub async fn send(
        self,
        addr: SocketAddr,
        authority: &http::uri::Authority,
        out: &mut Outgoing,
        body: RequestBody,
        timeout: Duration,
        keep_headers: bool,
    ) -> Result<(Response<Incoming>, Option<Lease>), SendError> {
        match self {
            Upstream::Http1(pool) => pool
                .send(addr, out, body, timeout, keep_headers)
                .await
                .map(|(resp, lease)| (resp, Some(lease))),
            Upstream::Client(client, protocol) => {
                // The client takes the request whatever happens, and a failed connect is always
                // retried: keep the headers.
                let req = out.request(authority, protocol, body, true);
                match tokio::time::timeout(timeout, client.request(req)).await {
                    Ok(Ok(resp)) => Ok((resp, None)),
                    Ok(Err(e)) if e.is_connect() => Err(SendError::Connect(e.into())),
                    Ok(Err(e)) => Err(SendError::Failed(e.into())),
                    Err(_) => Err(SendError::Timeout),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_line_and_every_te_value_counts() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"X-Secret, caf\xe9").unwrap(),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.append(header::TE, HeaderValue::from_static("trailers"));
        h.append(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"]);
    }

    #[test]
    fn forwarded_headers_join_earlier_hops_and_take_host_from_the_authority() {
        let mut req = Request::get("http://auth.test:81/p?q=1").body(()).unwrap();
        let h = req.headers_mut();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        );
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        let (parts, ()) = req.into_parts();
        let ip = client_ip(([192, 0, 2, 7], 4000).into());
        let out = Outgoing::with_client_ip(parts, &ip, "https", None);
        let xff: Vec<_> = out.headers.get_all(&X_FORWARDED_FOR).iter().collect();
        assert_eq!(xff, ["10.0.0.1, 10.0.0.2, 192.0.2.7"]);
        assert_eq!(out.headers[header::HOST], "auth.test:81");
        assert_eq!(out.headers[&X_FORWARDED_HOST], "auth.test:81");
        assert_eq!(out.headers[&X_FORWARDED_PROTO], "https");
        assert_eq!(out.path_and_query, "/p?q=1");

        // No earlier hop: the connection's value as it is.
        let (parts, ()) = Request::get("/").body(()).unwrap().into_parts();
        let out = Outgoing::with_client_ip(parts, &ip, "http", None);
        assert_eq!(out.headers[&X_FORWARDED_FOR], "192.0.2.7");
        assert!(!out.headers.contains_key(header::HOST));
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        h.insert(header::HOST, HeaderValue::from_static("a.b"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("x-keep"));
        assert!(h.contains_key(header::HOST));
    }

    #[test]
    fn connection_cannot_remove_host_framing_or_our_own_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static(
                "host, content-length, x-forwarded-for, X-Forwarded-Host, k-original-host, x-gone",
            ),
        );
        for name in [
            "host",
            "content-length",
            "x-forwarded-for",
            "x-forwarded-host",
            "k-original-host",
            "x-gone",
        ] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "content-length",
                "host",
                "k-original-host",
                "x-forwarded-for",
                "x-forwarded-host"
            ]
        );
    }
}
