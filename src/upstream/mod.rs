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

mod connect;
mod http1;
mod outgoing;

pub use connect::*;
pub use http1::*;
pub use outgoing::*;

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
