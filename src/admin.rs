//! Admin listener: health, readiness, Prometheus metrics, the KEDA HTTP add-on `/queue`
//! format, the JSON state of every service, the cluster-wide counts for KEDA's `metrics-api`
//! trigger (`/api/scaling`), and this replica's own counts for its peers (`/api/local`, which
//! also long-polls). Never served on the proxy port.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;

pub mod control;

use crate::keda::Cluster;
use crate::route::services::Services;
use crate::telemetry::metrics::Metrics;

mod listener;

pub use listener::{serve, AdminBounds};

/// Upper bound on one `/api/local?wait=` long-poll.
pub const MAX_LONG_POLL: Duration = Duration::from_secs(60);

/// What the admin endpoints report on.
pub struct AdminState {
    /// The live services.
    pub services: Arc<Services>,
    /// All metrics.
    pub metrics: Metrics,
    /// False once shutdown began: `/readyz` answers 503.
    pub ready: AtomicBool,
    /// This replica's counts and its peers'.
    pub cluster: Arc<Cluster>,
    /// One permit per `/api/local` long-poll that may wait now (`limits.admin_max_long_polls`).
    pub long_polls: Arc<Semaphore>,
    /// The commands that change something (rollout promote/abort) and their token.
    pub control: control::Control,
}

/// Answers one admin request.
pub async fn handle<B>(
    state: Arc<AdminState>,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path().starts_with("/api/rollouts/") {
        return Ok(control::handle(&state.control, &state.services, req).await);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
    }
    let resp = match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.ready.load(Ordering::SeqCst) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            }
        }
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/queue" => json_bytes(queue(&state)),
        "/api/services" => json_bytes(services(&state)),
        "/api/prewarm" => json_bytes(prewarm_plans(&state)),
        "/api/scaling" => json_response(&scaling(&state).await),
        "/api/local" => local(&state, req.uri().query().unwrap_or("")).await,
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz /readyz /metrics /queue /api/services /api/prewarm /api/scaling /api/local\n",
        ),
    };
    Ok(resp)
}

/// The KEDA HTTP add-on queue format: `{"ns/name": {"Concurrency": n, "RequestCount": n}}`
/// (JSON text, written service by service: no document tree for thousands of services).
pub fn queue(state: &AdminState) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Counts {
        concurrency: usize,
        request_count: u64,
    }
    let snapshot = state.services.load();
    let mut out = Vec::with_capacity(64 + snapshot.services.len() * 64);
    out.push(b'{');
    for (i, s) in snapshot.services.iter().enumerate() {
        let g = &s.gate;
        if i > 0 {
            out.push(b',');
        }
        write_json(&mut out, &format!("{}/{}", s.spec.namespace, g.name()));
        out.push(b':');
        write_json(
            &mut out,
            &Counts {
                concurrency: g.held() + g.in_flight(),
                request_count: g.requests_total(),
            },
        );
    }
    out.push(b'}');
    out
}

/// Every service's counts summed over all replicas, for KEDA's `metrics-api` trigger:
/// `{"services": {"<name>": {"concurrency": n, "held": n, "in_flight": n, "rate": x,
/// "replicas": n, "stale": n}}}` (GJSON path `services.<name>.concurrency`).
pub async fn scaling(state: &AdminState) -> Value {
    let mut m = Map::new();
    for (name, totals) in state.cluster.all_totals().await {
        m.insert(name, json!(totals));
    }
    json!({ "services": Value::Object(m) })
}

/// This replica's own counts (what peers read). With `wait=<service>&since=<n>` it answers
/// once the service's `holds_total` differs from `n` (a request was held since the caller's
/// last look), or after `timeout_ms` (at most [`MAX_LONG_POLL`]); without `since`, at once.
async fn local(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let param = |key: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    };
    let local = state.cluster.local();
    if let Some(service) = param("wait") {
        let Some(gate) = local.gate(service) else {
            return text(StatusCode::NOT_FOUND, "unknown service\n");
        };
        if let Some(since) = param("since").and_then(|v| v.parse::<u64>().ok()) {
            // Each waiting poll holds a connection and its buffers: bounded, and the permit
            // goes back when the poll ends (or its client goes away).
            let Ok(_permit) = state.long_polls.clone().try_acquire_owned() else {
                state.metrics.reject_connection("admin_max_long_polls");
                let mut r = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many concurrent long-polls (limits.admin_max_long_polls); retry\n",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return r;
            };
            let _polling = Polling::start(&state.metrics);
            let wait = param("timeout_ms")
                .and_then(|v| v.parse().ok())
                .map_or(MAX_LONG_POLL, Duration::from_millis)
                .min(MAX_LONG_POLL);
            // Subscribe before looking, so a hold between the look and the wait is not missed.
            let mut rx = gate.subscribe_held();
            let changed = async {
                while gate.holds_total() == since {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(wait, changed).await;
        }
    }
    json_response(&json!(local.all()))
}

/// One long-poll counted in `reveille_admin_long_polls` while it waits.
struct Polling(prometheus::IntGauge);

impl Polling {
    fn start(metrics: &Metrics) -> Self {
        metrics.admin_long_polls.inc();
        Polling(metrics.admin_long_polls.clone())
    }
}

impl Drop for Polling {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every service's live state (JSON text, written service by service).
pub fn services(state: &AdminState) -> Vec<u8> {
    #[derive(Serialize)]
    struct Endpoint {
        address: String,
        in_flight: usize,
    }
    #[derive(Serialize)]
    struct Service<'a> {
        name: &'a str,
        namespace: &'a str,
        state: &'static str,
        held: usize,
        in_flight: usize,
        requests_total: u64,
        ready_endpoints: Vec<Endpoint>,
        last_activation_seconds: Option<f64>,
        idle_for_seconds: f64,
        hosts: &'a [String],
        path_prefix: Option<&'a str>,
        backend: &'static str,
        queue_capacity: usize,
        concurrency: Option<usize>,
        rollout: Option<&'a crate::gate::RolloutReport>,
        #[serde(skip_serializing_if = "Option::is_none")]
        prewarm: Option<Value>,
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        depends_on: &'a [String],
        #[serde(skip_serializing_if = "Option::is_none")]
        waiting_for: Option<String>,
    }
    let now = state.services.prewarm_context().clock.now();
    let snapshot = state.services.load();
    let mut out = Vec::with_capacity(64 + snapshot.services.len() * 320);
    out.extend_from_slice(b"{\"services\":[");
    for (i, s) in snapshot.services.iter().enumerate() {
        let g = &s.gate;
        if i > 0 {
            out.push(b',');
        }
        let ready_endpoints = g
            .endpoints()
            .iter()
            .map(|e| Endpoint {
                address: e.addr.to_string(),
                in_flight: e.in_flight(),
            })
            .collect();
        let rollout = g.rollout_report();
        write_json(
            &mut out,
            &Service {
                name: g.name(),
                namespace: &s.spec.namespace,
                state: g.state().as_str(),
                held: g.held(),
                in_flight: g.in_flight(),
                requests_total: g.requests_total(),
                ready_endpoints,
                last_activation_seconds: g.last_activation().map(|d| d.as_secs_f64()),
                idle_for_seconds: g.idle_for().as_secs_f64(),
                hosts: &s.spec.hosts,
                path_prefix: s.spec.path_prefix.as_deref(),
                backend: s.backend_kind(),
                queue_capacity: g.settings().capacity,
                concurrency: g.settings().concurrency,
                rollout: rollout.as_deref(),
                prewarm: s.spec.prewarm.as_ref().map(|p| {
                    let ctx = state.services.prewarm_context();
                    let learned = ctx.learned(g.name(), p, now, now, crate::prewarm::HORIZON);
                    crate::prewarm::report::status(p, g, now, &learned)
                }),
                depends_on: &s.spec.depends_on,
                waiting_for: g.waiting_for().map(|d| d.to_string()),
            },
        );
    }
    out.extend_from_slice(b"]}");
    out
}

/// Appends `v` as JSON (the types written here always serialize).
fn write_json(out: &mut Vec<u8>, v: &impl Serialize) {
    let _ = serde_json::to_writer(out, v);
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `/api/prewarm`: every pre-warmed service's windows of the next 7 days, from the live
/// history, woken by the lead in force (`prewarm plan --admin` prints it).
fn prewarm_plans(state: &AdminState) -> Vec<u8> {
    let ctx = state.services.prewarm_context();
    let now = ctx.clock.now();
    let snapshot = state.services.load();
    let services = crate::prewarm::report::plans(
        snapshot.services.iter().map(|e| (&*e.spec, Some(&*e.gate))),
        now,
        |s, p| ctx.learned(&s.name, p, now, now, crate::prewarm::HORIZON),
    );
    serde_json::to_vec(&crate::prewarm::report::Plans { services }).unwrap_or_default()
}

fn json_response(v: &Value) -> Response<Full<Bytes>> {
    json_bytes(v.to_string().into_bytes())
}

fn json_bytes(body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
