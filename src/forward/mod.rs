//! The proxy: one request's whole way. Router → gate (warm permit, or hold while the service
//! wakes) → upstream client → response streamed back. Errors from every step are turned into
//! responses here, in [`error_response`], and counted once.
//!
//! Retries never duplicate work: a failed connect (nothing was sent) is retried on another
//! endpoint, holding again if none is ready, within the request's hold deadline; a request whose
//! bytes may have reached a backend is retried only when its method is idempotent and its body
//! was never sent.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::debug;

use crate::config::Protocol;
use crate::error::ProxyError;
use crate::fields;
use crate::gate::{Acquired, Gate};
use crate::route::services::Services;
use crate::telemetry::metrics::Metrics;
use crate::upstream::{self, BodySlot, Outgoing, Upstreams};

pub(crate) mod answer;
mod body;
pub(crate) mod retry;

pub(crate) use answer::error_response;
pub(crate) use body::ProxyBody;
pub(crate) use retry::idempotent;
use retry::{Attempts, Failed};

/// Header on responses to requests that were held during a cold start.
pub(crate) const COLD_START_HEADER: &str = "x-reveille-cold-start";

static KNATIVE_REVISION: HeaderName = HeaderName::from_static(fields::KNATIVE_REVISION);
static KNATIVE_NAMESPACE: HeaderName = HeaderName::from_static(fields::KNATIVE_NAMESPACE);
static K_ORIGINAL_HOST: HeaderName = HeaderName::from_static(fields::K_ORIGINAL_HOST);
static K_PROXY_REQUEST: HeaderName = HeaderName::from_static(fields::K_PROXY_REQUEST);
static K_NETWORK_PROBE: HeaderName = HeaderName::from_static(fields::K_NETWORK_PROBE);
static K_NETWORK_HASH: HeaderName = HeaderName::from_static(fields::K_NETWORK_HASH);

/// State shared by every connection.
pub(crate) struct Shared {
    /// The live services and their routing table; swapped whole on reload.
    pub(crate) services: Arc<Services>,
    /// The pooled upstream clients (the services', [`Services::upstreams`]).
    pub(crate) upstreams: Arc<Upstreams>,
    /// Bound on waiting for a backend's response headers.
    pub(crate) response_timeout: Duration,
    /// All metrics.
    pub(crate) metrics: Metrics,
    /// The client-side timeouts (idle, write, body progress) and the upstream ones.
    pub(crate) timeouts: crate::config::Timeouts,
    /// Request fields with `_` in their name are dropped ([`crate::Config::drop_underscore_headers`]).
    pub(crate) drop_underscore_headers: bool,
    /// Turned true when `shutdown.grace` has run out: requests still waiting for a backend's
    /// answer are answered `503 shutting_down` instead of being cut when the process exits.
    in_flight_stop: crate::shutdown::Trigger,
}

impl Shared {
    /// The state every connection shares, for `config`'s settings.
    pub(crate) fn new(services: Arc<Services>, metrics: Metrics, config: &crate::Config) -> Self {
        Shared {
            upstreams: services.upstreams().clone(),
            services,
            response_timeout: config.timeouts.upstream_response,
            metrics,
            timeouts: config.timeouts,
            drop_underscore_headers: config.drop_underscore_headers,
            in_flight_stop: crate::shutdown::channel().0,
        }
    }

    /// The shutdown grace has run out: every request still waiting for a backend's response
    /// head gets `503 shutting_down` now.
    pub(crate) fn cut_in_flight(&self) {
        self.in_flight_stop.fire();
    }

    /// Resolves once [`Shared::cut_in_flight`] was called.
    pub(crate) async fn in_flight_cut(&self) {
        self.in_flight_stop.fired().await;
    }

    /// A handle on the in-flight cut for one connection's requests: one subscription per
    /// connection instead of one per request (the fast path's).
    pub(crate) fn in_flight_signal(&self) -> crate::shutdown::Signal {
        self.in_flight_stop.signal()
    }
}

/// The per-connection hyper service.
#[derive(Clone)]
pub(crate) struct Proxy {
    pub(crate) shared: Arc<Shared>,
    /// The client's address as an `X-Forwarded-For` value, made once per connection.
    pub(crate) client_ip: HeaderValue,
    pub(crate) proto: &'static str,
}

impl Proxy {
    /// A service for one client connection; `proto` is `http` or `https`.
    pub(crate) fn new(shared: Arc<Shared>, remote: SocketAddr, proto: &'static str) -> Self {
        Proxy {
            shared,
            client_ip: upstream::client_ip(remote),
            proto,
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // No `async` block around `handle`: it would keep its own copy of the request and the
        // service beside the ones in `handle`'s future, in every held request.
        Box::pin(self.clone().handle(req).map(Ok))
    }
}

/// How the service was chosen.
struct Routed {
    gate: Arc<Gate>,
    knative: bool,
}

impl Routed {
    fn to(gate: &Arc<Gate>, knative: bool) -> Self {
        Routed {
            gate: gate.clone(),
            knative,
        }
    }
}

impl Proxy {
    /// A plain `fn` returning an `async move` block, not an `async fn`: the block uses its
    /// captures in place, where an `async fn` keeps a second copy of its moved arguments.
    fn handle(self, req: Request<Incoming>) -> impl Future<Output = Response<ProxyBody>> + Send {
        let mut req = req;
        async move {
            let arrived = Instant::now();
            if let Err(e) = crate::route::checks::check_request(&req) {
                self.shared
                    .metrics
                    .reject_unrouted(e.kind(), e.status().as_u16());
                return error_response(&e);
            }
            // One snapshot for the probe and the route (dropped before any wait).
            let routed = {
                let snapshot = self.shared.services.load();
                if snapshot.router.has_revisions() {
                    if let Some(resp) = knative_probe(&req) {
                        return resp;
                    }
                }
                route(&snapshot.router, &req)
            };
            let routed = match routed {
                Ok(r) => r,
                Err(e) => {
                    self.shared
                        .metrics
                        .reject_unrouted(e.kind(), e.status().as_u16());
                    return error_response(&e);
                }
            };
            let Routed { gate, knative } = routed;
            self.strip_client_fields(req.headers_mut(), knative);
            if knative {
                let h = req.headers_mut();
                h.remove(&KNATIVE_REVISION);
                h.remove(&KNATIVE_NAMESPACE);
                if let Some(host) = h.get(header::HOST).cloned() {
                    h.insert(&K_ORIGINAL_HOST, host);
                }
                h.insert(&K_PROXY_REQUEST, HeaderValue::from_static("activator"));
            }
            let deadline = arrived + gate.settings().hold_timeout;
            let mut gate = gate;
            // A rollout candidate asked for on purpose (`candidate_header`), else the gate.
            let acquired = match gate.acquire_candidate(req.headers()) {
                Some(candidate) => Ok(candidate),
                None => acquire_following(&self.shared.services, &mut gate, deadline).await,
            };
            let resp = match acquired {
                // Boxed: a held request then carries only the hold state, not the forwarding one.
                Ok(acquired) => {
                    Box::pin(self.forward_until_cut(req, acquired, &gate, deadline)).await
                }
                Err(e) => Err(e),
            };
            match resp {
                Ok(resp) => {
                    gate.metrics()
                        .request(resp.status().as_u16(), arrived.elapsed().as_secs_f64());
                    resp
                }
                Err(e) => {
                    answer::rejected(&gate, &e, arrived);
                    error_response(&e)
                }
            }
        }
    }

    /// Removes what a client must not decide for the backend: the Knative fields unless the
    /// request was routed as a Knative one (Reveille sets its own then), and with
    /// `drop_underscore_headers` every field whose name holds `_`.
    fn strip_client_fields(&self, h: &mut http::HeaderMap, knative: bool) {
        let underscores = self.shared.drop_underscore_headers;
        let strip = |k: &HeaderName| {
            (!knative && fields::of(k).knative())
                || (underscores && fields::underscored(k.as_str().as_bytes()))
        };
        // Usually there is none: one pass over the names, a second only to collect.
        if h.keys().any(strip) {
            let names: Vec<HeaderName> = h.keys().filter(|k| strip(k)).cloned().collect();
            for name in names {
                h.remove(name);
            }
        }
    }

    /// [`Proxy::forward`], unless the shutdown grace runs out first: then `503`.
    async fn forward_until_cut(
        &self,
        req: Request<Incoming>,
        acquired: Acquired,
        gate: &Arc<Gate>,
        deadline: Instant,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        tokio::select! {
            biased;
            r = self.forward(req, acquired, gate, deadline) => r,
            () = self.shared.in_flight_cut() => Err(ProxyError::ShuttingDown {
                service: gate.name().clone(),
            }),
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        acquired: Acquired,
        gate: &Arc<Gate>,
        deadline: Instant,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let upgrade = upgrade_requested(&req, &gate.settings().upgrades);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let body_was_empty = http_body::Body::is_end_stream(&body);
        let stall = self.shared.timeouts.client_body;
        // A chunked body is read ahead (up to 64 KiB) so that broken framing is answered 400
        // before anything reaches the backend; HTTP/2 frames and Content-Length need no check.
        let slot = if !body_was_empty && parts.headers.contains_key(header::TRANSFER_ENCODING) {
            BodySlot::read_ahead(body, stall).await?
        } else {
            BodySlot::new(body, stall)
        };
        let mut out = Outgoing::with_client_ip(parts, &self.client_ip, self.proto, upgrade);
        if slot.unknown_length()
            && matches!(gate.settings().protocol, Protocol::Http1 | Protocol::Https)
        {
            // Said explicitly: hyper's client does not chunk a GET (or HEAD) body of unknown
            // length by itself, and would send it with no framing at all, as a second request.
            out.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let protocol = gate.settings().protocol;
        let Some(upstream) = self
            .shared
            .upstreams
            .pick(gate.settings().upstream.as_deref(), protocol)
        else {
            // A TLS service always has its own client; never fall back to cleartext.
            return Err(ProxyError::UpstreamConnect {
                service: gate.name().clone(),
            });
        };
        let cold = acquired.cold && acquired.held_for.is_some();
        let idempotent = idempotent(out.method().as_str());
        let mut attempts = HyperAttempts {
            upstream,
            out: &mut out,
            slot: &slot,
            body_was_empty,
            idempotent,
            timeout: self.shared.response_timeout,
            kept: false,
        };
        let ((mut resp, lease), permit) = retry::with_retries(
            gate,
            acquired.permit,
            deadline,
            self.shared.response_timeout,
            &mut attempts,
        )
        .await?;
        if cold {
            resp.headers_mut()
                .insert(COLD_START_HEADER, HeaderValue::from_static("true"));
        }
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            match client_upgrade {
                Some(client_upgrade) => return Ok(splice(resp, client_upgrade, permit, lease)),
                // A switch nobody asked for (or that was not let through) would hand the
                // client's connection to whatever the backend speaks next.
                None => {
                    return Err(ProxyError::Upstream {
                        service: gate.name().clone(),
                    })
                }
            }
        }
        one_length(resp.headers_mut());
        upstream::strip_hop_by_hop(resp.headers_mut());
        // A proxy answers in its own version (RFC 9110 §6.2), as the fast path does: with a
        // backend's HTTP/1.0 kept, hyper's server would answer an HTTP/1.1 client in HTTP/1.0
        // with a close-delimited body. (It still answers an HTTP/1.0 client in 1.0.)
        *resp.version_mut() = http::Version::HTTP_11;
        let (parts, body) = resp.into_parts();
        Ok(Response::from_parts(
            parts,
            ProxyBody::upstream(body, permit, lease),
        ))
    }
}

/// The response's `Content-Length` as the client gets it, the same from both engines: none
/// beside `Transfer-Encoding`, which overrides it and after which a proxy must remove it (RFC
/// 9112 §6.3; hyper's client keeps it, and its server would then frame the body by it); else
/// one line (repeats agree, or hyper's client refused the response; hyper's server collapses
/// them itself except for `HEAD`).
fn one_length(h: &mut http::HeaderMap) {
    if h.contains_key(header::TRANSFER_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
    } else if h.get_all(header::CONTENT_LENGTH).iter().nth(1).is_some() {
        if let Some(first) = h.get(header::CONTENT_LENGTH).cloned() {
            h.insert(header::CONTENT_LENGTH, first);
        }
    }
}

/// [`Gate::acquire`], following the service to its new gate when a reload replaced it while
/// the request was held: the request keeps its place in time (the deadline), not in the old
/// queue. Each hop goes to a newer gate, and the deadline bounds the whole wait. `gate` ends
/// as the gate that answered.
pub(crate) async fn acquire_following(
    services: &Services,
    gate: &mut Arc<Gate>,
    deadline: Instant,
) -> Result<Acquired, ProxyError> {
    let mut acquired = gate.acquire(deadline).await;
    while matches!(
        acquired,
        Err(ProxyError::ServiceRemoved { .. } | ProxyError::ShuttingDown { .. })
    ) {
        let Some(next) = services.load().gate(gate.name()).cloned() else {
            break;
        };
        if Arc::ptr_eq(&next, gate) {
            break;
        }
        *gate = next;
        acquired = gate.acquire(deadline).await;
    }
    acquired
}

/// Picks the service. Knative names (the `Knative-Serving-*` fields, `<name>.<ns>.svc.*`
/// hosts), like Knative probes, count only when some service opted in to Knative routing, and
/// then reach only those services; otherwise a request is routed by its host and path alone.
fn route(
    router: &crate::route::router::Router<Arc<Gate>>,
    req: &Request<Incoming>,
) -> Result<Routed, ProxyError> {
    let headers = req.headers();
    if router.has_revisions() {
        if let (Some(rev), Some(ns)) = (
            headers.get(&KNATIVE_REVISION),
            headers.get(&KNATIVE_NAMESPACE),
        ) {
            let (rev, ns) = (
                rev.to_str().unwrap_or_default(),
                ns.to_str().unwrap_or_default(),
            );
            return router
                .lookup_revision(ns, rev)
                .map(|g| Routed::to(g, true))
                .ok_or_else(|| ProxyError::NoRoute {
                    host: truncate(&format!("{rev}.{ns} (Knative revision)")),
                });
        }
    }
    let host = crate::route::checks::routing_host(req)?;
    if let Some(g) = router.lookup(host, req.uri().path()) {
        return Ok(Routed::to(g, false));
    }
    if let Some(g) = router.lookup_revision_host(host) {
        return Ok(Routed::to(g, true));
    }
    Err(ProxyError::NoRoute {
        host: truncate(host),
    })
}

/// Answers Knative's network probes as its activator does.
fn knative_probe(req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
    let probe = req.headers().get(&K_NETWORK_PROBE)?;
    let mut resp = Response::new(ProxyBody::local(""));
    match probe.as_bytes() {
        b"activator" => *resp.body_mut() = ProxyBody::local("activator"),
        b"probe" => {
            if let Some(hash) = req.headers().get(&K_NETWORK_HASH) {
                resp.headers_mut().insert(&K_NETWORK_HASH, hash.clone());
            }
        }
        _ => return None,
    }
    Some(resp)
}

/// The `Upgrade` value to pass on for an HTTP/1.1 upgrade request: the protocols it offers
/// that the service allows (`upgrades`, default `websocket`), in the client's order. `None`:
/// no upgrade is asked for, or none allowed; the request then goes on as a plain one without
/// `Upgrade` (a server may ignore it, RFC 9110 §7.8), so `h2c` can never be tunnelled past
/// routing and the fields Reveille sets.
fn upgrade_requested(req: &Request<Incoming>, allowed: &[Box<str>]) -> Option<HeaderValue> {
    let conn = req.headers().get(header::CONNECTION)?.to_str().ok()?;
    if !conn
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    {
        return None;
    }
    let offered = req.headers().get(header::UPGRADE)?.to_str().ok()?;
    let kept: Vec<&str> = offered
        .split(',')
        .map(str::trim)
        .filter(|p| {
            let name = p.split('/').next().unwrap_or_default();
            !name.eq_ignore_ascii_case("h2c")
                && allowed.iter().any(|a| {
                    a.eq_ignore_ascii_case(p) || (!a.contains('/') && a.eq_ignore_ascii_case(name))
                })
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// Returns the backend's 101 to the client and splices the two upgraded connections. The
/// endpoint slot is held for the whole session, so an open WebSocket keeps the service awake.
fn splice(
    mut resp: Response<Incoming>,
    client: hyper::upgrade::OnUpgrade,
    permit: crate::gate::Permit,
    lease: Option<upstream::Lease>,
) -> Response<ProxyBody> {
    let backend = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    upstream::strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(p) = protocol {
        parts.headers.insert(header::UPGRADE, p);
    }
    tokio::spawn(async move {
        let _permit = permit;
        if let Some(lease) = lease {
            // Our connection: driving it to its end hands it over to `backend`.
            lease.finish().await;
        }
        match tokio::try_join!(client, backend) {
            Ok((c, b)) => {
                let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
    Response::from_parts(parts, ProxyBody::local(""))
}

/// hyper's path's attempts: each one sends the rewritten head and the body slot through the
/// service's upstream (our HTTP/1.1 pool or a hyper-util client).
struct HyperAttempts<'a> {
    upstream: upstream::Upstream<'a>,
    out: &'a mut Outgoing,
    slot: &'a BodySlot,
    body_was_empty: bool,
    idempotent: bool,
    timeout: Duration,
    /// The last attempt kept the headers (it could be sent again).
    kept: bool,
}

impl Attempts for HyperAttempts<'_> {
    type Answer = (Response<Incoming>, Option<upstream::Lease>);

    async fn attempt(
        &mut self,
        endpoint: &crate::gate::Endpoint,
        more_allowed: bool,
    ) -> Result<Self::Answer, Failed> {
        // The headers are copied only when a sent request may be sent again.
        self.kept =
            self.idempotent && more_allowed && (self.body_was_empty || self.slot.untouched());
        let sent = self
            .upstream
            .send(
                endpoint.addr,
                &endpoint.authority,
                self.out,
                self.slot.body(),
                self.timeout,
                self.kept,
            )
            .await;
        sent.map_err(|e| match self.slot.fault() {
            // The client's body broke or stalled: its error, not the backend's (the backend's
            // request was cut with it).
            Some(fault) if !matches!(e, upstream::SendError::Timeout) => Failed::Answer(fault),
            _ => Failed::Transport(e),
        })
    }

    fn resendable(&self) -> bool {
        // The body must still be unsent after the attempt.
        self.kept && (self.body_was_empty || self.slot.untouched())
    }
}

fn truncate(host: &str) -> Box<str> {
    host.chars().take(256).collect::<String>().into()
}
