//! Upstream: the pooled HTTP client to backends and the header rewriting around it. Bodies are
//! streamed both ways, never buffered; the endpoint slot ([`Permit`]) rides along with the
//! response body and is released when the body ends, so in-flight counts cover streaming.
//!
//! Cleartext backends (`http1`, `h2c`) share one pooled client per protocol ([`Upstreams`]).
//! A TLS service (`h2`, `https`) gets its own pooled client ([`tls_client`], kept on its gate's
//! settings): its [`Connector`] connects TCP to the endpoint's address, then does the rustls
//! handshake with the configured server name (SNI and certificate check) and roots, offering
//! ALPN `h2` or `http/1.1`. A failed handshake is a connect error, so it is retried on another
//! endpoint like a refused connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::{Protocol, Timeouts, UpstreamTls};
use crate::gate::Permit;

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
    let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
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

/// One pooled client per backend protocol.
pub struct Upstreams {
    /// HTTP/1.1 backends.
    pub http1: UpstreamClient,
    /// HTTP/2 cleartext (prior knowledge) backends, e.g. gRPC.
    pub h2c: UpstreamClient,
}

impl Upstreams {
    /// Builds the shared clients.
    pub fn new(timeouts: &Timeouts) -> Self {
        let connector = Connector {
            http: tcp_connector(timeouts, true),
            tls: None,
        };
        Upstreams {
            http1: pooled(connector.clone(), false, timeouts),
            h2c: pooled(connector, true, timeouts),
        }
    }

    /// The shared client for a cleartext protocol; `None` for the TLS ones, whose client is
    /// the service's own (on its gate's settings).
    pub fn for_protocol(&self, p: Protocol) -> Option<&UpstreamClient> {
        match p {
            Protocol::Http1 => Some(&self.http1),
            Protocol::H2c => Some(&self.h2c),
            Protocol::H2 | Protocol::Https => None,
        }
    }
}

/// The client's request body, shared across attempts: the first attempt that actually sends
/// the body takes it. A connect failure happens before the body is polled, so the body is still
/// there for a retry on another endpoint.
pub struct RequestBody {
    slot: Arc<Mutex<Option<Incoming>>>,
    taken: Option<Incoming>,
}

/// Where a request's body waits until an attempt sends it.
#[derive(Clone)]
pub struct BodySlot(Arc<Mutex<Option<Incoming>>>);

impl BodySlot {
    /// Holds `body` for the attempts.
    pub fn new(body: Incoming) -> Self {
        BodySlot(Arc::new(Mutex::new(Some(body))))
    }

    /// Whether no attempt has started sending the body.
    pub fn untouched(&self) -> bool {
        self.0.lock().is_some()
    }

    /// A body for one attempt.
    pub fn body(&self) -> RequestBody {
        RequestBody {
            slot: self.0.clone(),
            taken: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if this.taken.is_none() {
            this.taken = this.slot.lock().take();
        }
        match this.taken.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.taken {
            Some(b) => b.is_end_stream(),
            None => self.slot.lock().as_ref().is_none_or(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.taken {
            Some(b) => b.size_hint(),
            None => self
                .slot
                .lock()
                .as_ref()
                .map(|b| b.size_hint())
                .unwrap_or_else(|| SizeHint::with_exact(0)),
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Every `Connection` line counts, and a name counts even beside non-UTF-8 junk.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
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
        if !headers.contains_key(header::HOST) {
            // HTTP/2 clients send :authority instead of Host.
            if let Some(a) = uri.authority() {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    headers.insert(header::HOST, v);
                }
            }
        }
        if let Some(host) = headers.get(header::HOST).cloned() {
            headers.insert(&X_FORWARDED_HOST, host);
        }
        let ip = client.ip().to_string();
        // Every earlier hop, however many lines they came on (RFC 9110 §5.3), then the client.
        let mut xff = String::new();
        for prev in headers.get_all(&X_FORWARDED_FOR) {
            if let Ok(prev) = prev.to_str() {
                xff.push_str(prev);
                xff.push_str(", ");
            }
        }
        xff.push_str(&ip);
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert(&X_FORWARDED_FOR, v);
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

    /// The request for one attempt at `authority`.
    pub fn request(
        &self,
        authority: &http::uri::Authority,
        protocol: Protocol,
        body: RequestBody,
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
        *req.headers_mut() = self.headers.clone();
        req
    }
}

pin_project_lite::pin_project! {
    /// A response body: either the backend's stream (holding its endpoint slot until the end)
    /// or a small body Reveille wrote itself.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        /// Streamed from the backend.
        Upstream { #[pin] body: Incoming, permit: Option<Permit> },
        /// Written by Reveille.
        Local { #[pin] body: Full<Bytes> },
    }
}

impl ProxyBody {
    /// A body Reveille writes itself.
    pub fn local(b: impl Into<Bytes>) -> Self {
        ProxyBody::Local {
            body: Full::new(b.into()),
        }
    }

    /// The backend's body, keeping `permit` until it ends.
    pub fn upstream(body: Incoming, permit: Permit) -> Self {
        ProxyBody::Upstream {
            body,
            permit: Some(permit),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            ProxyBodyProj::Upstream { body, permit } => {
                let r = body.poll_frame(cx);
                if let Poll::Ready(None | Some(Err(_))) = r {
                    // Done: the endpoint slot is free for the next request now, not when the
                    // connection gets around to dropping the body.
                    permit.take();
                }
                r
            }
            ProxyBodyProj::Local { body } => body.poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Local { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Local { body } => body.size_hint(),
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
}
