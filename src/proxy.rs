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

use crate::error::ProxyError;
use crate::gate::{Acquired, Gate};
use crate::metrics::Metrics;
use crate::services::Services;
use crate::upstream::{self, BodySlot, Outgoing, ProxyBody, Upstreams};

/// Header on responses to requests that were held during a cold start.
pub const COLD_START_HEADER: &str = "x-reveille-cold-start";
/// Attempts at most for one request (connect failures, safe retries).
const MAX_ATTEMPTS: u32 = 5;
/// First pause before a retry; doubles each time.
const RETRY_BACKOFF: Duration = Duration::from_millis(10);
/// How long an endpoint that refused a connection is skipped by the balancer.
const PASSIVE_EJECTION: Duration = Duration::from_secs(1);

static KNATIVE_REVISION: HeaderName = HeaderName::from_static("knative-serving-revision");
static KNATIVE_NAMESPACE: HeaderName = HeaderName::from_static("knative-serving-namespace");
static K_ORIGINAL_HOST: HeaderName = HeaderName::from_static("k-original-host");
static K_PROXY_REQUEST: HeaderName = HeaderName::from_static("k-proxy-request");
static K_NETWORK_PROBE: HeaderName = HeaderName::from_static("k-network-probe");
static K_NETWORK_HASH: HeaderName = HeaderName::from_static("k-network-hash");

/// State shared by every connection.
pub struct Shared {
    /// The live services and their routing table; swapped whole on reload.
    pub services: Arc<Services>,
    /// The pooled upstream clients.
    pub upstreams: Upstreams,
    /// Bound on waiting for a backend's response headers.
    pub response_timeout: Duration,
    /// All metrics.
    pub metrics: Metrics,
}

/// The per-connection hyper service.
#[derive(Clone)]
pub struct Proxy {
    pub(crate) shared: Arc<Shared>,
    /// The client's address as an `X-Forwarded-For` value, made once per connection.
    pub(crate) client_ip: HeaderValue,
    pub(crate) proto: &'static str,
}

impl Proxy {
    /// A service for one client connection; `proto` is `http` or `https`.
    pub fn new(shared: Arc<Shared>, remote: SocketAddr, proto: &'static str) -> Self {
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

impl Proxy {
    /// A plain `fn` returning an `async move` block, not an `async fn`: the block uses its
    /// captures in place, where an `async fn` keeps a second copy of its moved arguments.
    fn handle(self, req: Request<Incoming>) -> impl Future<Output = Response<ProxyBody>> + Send {
        let mut req = req;
        async move {
            let arrived = Instant::now();
            if let Err(e) = crate::limits::check_request(&req) {
                self.shared
                    .metrics
                    .reject_unrouted(e.kind(), e.status().as_u16());
                return error_response(&e);
            }
            if let Some(resp) = knative_probe(&req) {
                return resp;
            }
            let routed = match self.route(&req) {
                Ok(r) => r,
                Err(e) => {
                    self.shared
                        .metrics
                        .reject_unrouted(e.kind(), e.status().as_u16());
                    return error_response(&e);
                }
            };
            let gate = routed.gate;
            if routed.knative {
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
                Ok(acquired) => Box::pin(self.forward(req, acquired, &gate, deadline)).await,
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
    }

    fn route(&self, req: &Request<Incoming>) -> Result<Routed, ProxyError> {
        let snapshot = self.shared.services.load();
        let router = &snapshot.router;
        let headers = req.headers();
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
                .map(|g| Routed {
                    gate: g.clone(),
                    knative: true,
                })
                .ok_or_else(|| ProxyError::NoRoute {
                    host: truncate(&format!("{rev}.{ns} (Knative revision)")),
                });
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .ok_or(ProxyError::MissingHost)?;
        if let Some(g) = router.lookup(host, req.uri().path()) {
            return Ok(Routed {
                gate: g.clone(),
                knative: false,
            });
        }
        if let Some(g) = router.lookup_revision_host(host) {
            return Ok(Routed {
                gate: g.clone(),
                knative: true,
            });
        }
        Err(ProxyError::NoRoute {
            host: truncate(host),
        })
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        acquired: Acquired,
        gate: &Arc<Gate>,
        deadline: Instant,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let upgrade = upgrade_requested(&req);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let body_was_empty = http_body::Body::is_end_stream(&body);
        let mut out = Outgoing::with_client_ip(parts, &self.client_ip, self.proto, upgrade);
        let slot = BodySlot::new(body);
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
        let timeout = self.shared.response_timeout;
        let cold = acquired.cold && acquired.held_for.is_some();
        let mut permit = acquired.permit;
        let mut attempt = 1;
        let idempotent = idempotent(out.method().as_str());
        let (mut resp, lease) = loop {
            // The headers are copied only when a sent request may be sent again.
            let keep_headers =
                idempotent && attempt < MAX_ATTEMPTS && (body_was_empty || slot.untouched());
            let err = match upstream
                .send(
                    permit.endpoint(),
                    &mut out,
                    slot.body(),
                    timeout,
                    keep_headers,
                )
                .await
            {
                Ok(answer) => break answer,
                Err(upstream::SendError::Timeout) => {
                    return Err(ProxyError::UpstreamTimeout {
                        service: gate.name().clone(),
                        after: timeout,
                    })
                }
                Err(e) => e,
            };
            // `keep_headers` already says idempotent, body unsent before, attempts left; the
            // body must still be unsent after this attempt.
            let resendable = keep_headers && (body_was_empty || slot.untouched());
            debug!(service = %gate.name(), endpoint = %permit.endpoint().addr, attempt, error = %err, "upstream failed");
            retry_after(
                gate,
                &permit,
                attempt,
                err.is_connect(),
                resendable,
                deadline,
            )?;
            drop(permit);
            permit = next_attempt(gate, attempt, deadline).await?;
            attempt += 1;
        };
        if cold {
            resp.headers_mut()
                .insert(COLD_START_HEADER, HeaderValue::from_static("true"));
        }
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                return Ok(splice(resp, client_upgrade, permit, lease));
            }
        }
        upstream::strip_hop_by_hop(resp.headers_mut());
        let (parts, body) = resp.into_parts();
        Ok(Response::from_parts(
            parts,
            ProxyBody::upstream(body, permit, lease),
        ))
    }
}

/// The retry rule of both request paths, after attempt number `attempt` on `permit`'s endpoint
/// failed: `Ok` when another attempt may follow — the connect failed (nothing was sent), or
/// the request is `resendable` (idempotent, and its body can be sent again) — with attempts
/// and time left; a refused endpoint is then skipped for [`PASSIVE_EJECTION`]. `Err`: the
/// request's answer.
pub(crate) fn retry_after(
    gate: &Gate,
    permit: &crate::gate::Permit,
    attempt: u32,
    connect: bool,
    resendable: bool,
    deadline: Instant,
) -> Result<(), ProxyError> {
    if !(connect || resendable) || attempt >= MAX_ATTEMPTS || Instant::now() >= deadline {
        let service = gate.name().clone();
        return Err(if connect {
            ProxyError::UpstreamConnect { service }
        } else {
            ProxyError::Upstream { service }
        });
    }
    if connect {
        gate.eject(permit.endpoint(), PASSIVE_EJECTION);
    }
    Ok(())
}

/// The endpoint slot for the attempt after `attempt`: after the back-off (10 ms, doubling),
/// holding again if no endpoint is ready, within the request's deadline.
pub(crate) async fn next_attempt(
    gate: &Arc<Gate>,
    attempt: u32,
    deadline: Instant,
) -> Result<crate::gate::Permit, ProxyError> {
    tokio::time::sleep(RETRY_BACKOFF * 2u32.pow(attempt - 1)).await;
    Ok(gate.acquire_again(deadline).await?.permit)
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

/// The `Upgrade` value of an HTTP/1.1 upgrade request (WebSocket and others).
fn upgrade_requested(req: &Request<Incoming>) -> Option<HeaderValue> {
    let conn = req.headers().get(header::CONNECTION)?.to_str().ok()?;
    if !conn
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    {
        return None;
    }
    req.headers().get(header::UPGRADE).cloned()
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

/// Whether a method may be sent twice without changing the outcome (RFC 9110 §9.2.2); for
/// both request paths.
pub(crate) fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
    )
}

fn truncate(host: &str) -> Box<str> {
    host.chars().take(256).collect::<String>().into()
}

/// The one place an error becomes a response: status, one-line body naming the service and the
/// reason, and `Retry-After` where a retry makes sense.
pub fn error_response(e: &ProxyError) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::local(e.body()));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    for (name, value) in e.answer_fields() {
        let value = HeaderValue::from_str(&value).expect("Reveille's own fields are plain ASCII");
        h.insert(name, value);
    }
    if e.closes_connection() {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
