//! The proxy: one request's whole way. Router → gate (warm permit, or hold while the service
//! wakes) → upstream client → response streamed back. Errors from every step are turned into
//! responses here, in [`error_response`], and counted once.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;

use crate::error::ProxyError;
use crate::gate::{Acquired, Gate};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::upstream::{self, ProxyBody, UpstreamClient};

/// Header on responses to requests that were held during a cold start.
pub const COLD_START_HEADER: &str = "x-reveille-cold-start";

/// State shared by every connection.
pub struct Shared {
    /// The current routing table; swapped whole on reload.
    pub router: ArcSwap<Router<Arc<Gate>>>,
    /// The pooled upstream client.
    pub client: UpstreamClient,
    /// All metrics.
    pub metrics: Metrics,
}

/// The per-connection hyper service.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    remote: SocketAddr,
    proto: &'static str,
}

impl Proxy {
    /// A service for one client connection.
    pub fn new(shared: Arc<Shared>, remote: SocketAddr, proto: &'static str) -> Self {
        Proxy {
            shared,
            remote,
            proto,
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

impl Proxy {
    async fn handle(self, req: Request<Incoming>) -> Response<ProxyBody> {
        let arrived = Instant::now();
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        let Some(host) = host else {
            return self.unrouted(ProxyError::MissingHost);
        };
        let router = self.shared.router.load();
        let Some(gate) = router.lookup(host, req.uri().path()) else {
            let mut shown: String = host.chars().take(256).collect();
            shown.shrink_to_fit();
            return self.unrouted(ProxyError::NoRoute { host: shown.into() });
        };
        let gate = gate.clone();
        drop(router);
        let deadline = arrived + gate.settings().hold_timeout;
        let resp = match gate.acquire(deadline).await {
            Ok(acquired) => self.forward(req, acquired, &gate).await,
            Err(e) => Err(e),
        };
        let resp = resp.unwrap_or_else(|e| {
            gate.metrics().rejected(e.kind());
            debug!(service = %gate.name(), kind = e.kind(), "rejected: {e}");
            error_response(&e)
        });
        gate.metrics()
            .request(resp.status().as_u16(), arrived.elapsed().as_secs_f64());
        resp
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        acquired: Acquired,
        gate: &Gate,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Acquired {
            permit,
            held_for,
            cold,
        } = acquired;
        upstream::prepare_request(
            &mut req,
            &permit.endpoint().authority,
            self.remote,
            self.proto,
        );
        let resp = match self.shared.client.request(req).await {
            Ok(resp) => resp,
            Err(e) => {
                let service = gate.name().clone();
                debug!(service = %service, endpoint = %permit.endpoint().addr, error = ?e, "upstream failed");
                return Err(if e.is_connect() {
                    ProxyError::UpstreamConnect { service }
                } else {
                    ProxyError::Upstream { service }
                });
            }
        };
        let (mut parts, body) = resp.into_parts();
        upstream::strip_hop_by_hop(&mut parts.headers);
        if held_for.is_some() && cold {
            parts
                .headers
                .insert(COLD_START_HEADER, HeaderValue::from_static("true"));
        }
        Ok(Response::from_parts(
            parts,
            ProxyBody::upstream(body, permit),
        ))
    }

    fn unrouted(&self, e: ProxyError) -> Response<ProxyBody> {
        self.shared
            .metrics
            .reject_unrouted(e.kind(), e.status().as_u16());
        error_response(&e)
    }
}

/// The one place an error becomes a response: status, one-line body naming the service and the
/// reason, and `Retry-After` where a retry makes sense.
pub fn error_response(e: &ProxyError) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::local(e.body()));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert("x-reveille-error", HeaderValue::from_static(e.kind()));
    if let Some(secs) = e.retry_after() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if e.status() == StatusCode::BAD_REQUEST {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
