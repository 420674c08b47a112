//! Connecting to backends: the TCP connector with its timeout, and for TLS services the
//! rustls handshake with the configured server name and roots, offering ALPN `h2` or
//! `http/1.1`; the pooled hyper-util clients built on them.

use super::*;

/// A pooled client to backends (one per cleartext protocol, one per TLS service).
pub type UpstreamClient = Client<Connector, RequestBody>;

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects to a backend: TCP to the URI's address, then TLS when the service has it.
#[derive(Clone)]
pub struct Connector {
    pub(super) http: HttpConnector,
    pub(super) tls: Option<TlsConnect>,
}

#[derive(Clone)]
pub(super) struct TlsConnect {
    pub(super) connector: tokio_rustls::TlsConnector,
    pub(super) server_name: ServerName<'static>,
    pub(super) handshake_timeout: Duration,
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

pub(super) fn tcp_connector(timeouts: &Timeouts, enforce_http: bool) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeouts.upstream_connect));
    http.enforce_http(enforce_http);
    http
}

pub(super) fn pooled(connector: Connector, h2: bool, timeouts: &Timeouts) -> UpstreamClient {
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
    let mut config = ClientConfig::builder_with_provider(crate::config::tls::provider())
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
