//! Metrics: one struct owns every Prometheus metric. It is created at start and passed down;
//! each service gets a [`ServiceMetrics`] with its label values bound once, so the request path
//! never formats labels or looks up a metric family.
//!
//! Memory per service is kept small, since a replica may front thousands of mostly idle
//! services: the per-service gauges (held, in flight, ready endpoints, state) are plain atomics
//! written into the exposition at scrape time rather than one Prometheus child per series, and
//! a service's histograms and labelled counters are created on first use, so an idle service
//! that never saw a request exports its gauges only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Deref;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::telemetry::wake::Phase;

mod prewarm;

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const ACTIVATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// A per-service gauge family, rendered from [`ServiceGauges`] at scrape time: name, help,
/// and which gauge.
type GaugeFamily = (&'static str, &'static str, fn(&ServiceGauges) -> i64);

const SERVICE_GAUGES: [GaugeFamily; 3] = [
    (
        "reveille_requests_held",
        "Requests held in the service's queue, waiting for a ready endpoint.",
        |g| g.held.get(),
    ),
    (
        "reveille_requests_in_flight",
        "Requests forwarded to the service's backend and not yet finished.",
        |g| g.in_flight.get(),
    ),
    (
        "reveille_ready_endpoints",
        "Ready backend endpoints of the service.",
        |g| g.ready_endpoints.get(),
    ),
];
const SERVICE_STATE: (&str, &str) = (
    "reveille_service_state",
    "1 for the service's current activation state, 0 for the others.",
);

/// Every metric Reveille exports. Cloning is cheap (one shared set of families).
#[derive(Clone)]
pub struct Metrics {
    families: Arc<Families>,
}

impl Deref for Metrics {
    type Target = Families;

    fn deref(&self) -> &Families {
        &self.families
    }
}

/// The metric families (see [`Metrics`]).
pub struct Families {
    registry: Registry,
    /// Every service's gauges, by name (sorted, as the exposition lists them).
    services: Mutex<BTreeMap<Arc<str>, Arc<ServiceGauges>>>,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    hold_duration: HistogramVec,
    activations: IntCounterVec,
    activation_duration: HistogramVec,
    rejected: IntCounterVec,
    wakeup: HistogramVec,
    /// KEDA `StreamIsActive` streams open now.
    pub keda_streams: IntGauge,
    /// Admin `/api/local` long-polls waiting now.
    pub admin_long_polls: IntGauge,
    keda_pushes: IntCounterVec,
    peer_fetches: IntCounterVec,
    kube_api_errors: IntCounterVec,
    scale_patches: IntCounterVec,
    scale_down_deferred: IntCounterVec,
    rollout_validations: IntCounterVec,
    rollout_switches: IntCounterVec,
    rollout_rollbacks: IntCounterVec,
    accept_errors: IntCounterVec,
    relay_errors: IntCounterVec,
    prewarm: prewarm::PrewarmMetrics,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric names and label sets are constants; a failure is a programming error.
    r.expect("metric definition")
}

/// Creates metrics and registers them in one registry.
struct Register<'a>(&'a Registry);

impl Register<'_> {
    fn add<M: prometheus::core::Collector + Clone + 'static>(&self, m: prometheus::Result<M>) -> M {
        let m = must(m);
        must(self.0.register(Box::new(m.clone())));
        m
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels))
    }

    fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(HistogramVec::new(opts, labels))
    }

    /// Sets `reveille_build_info` for this version, and creates the families that are neither
    /// per-service counters nor latency histograms: the wake-up milestones, the KEDA streams
    /// and the admin long-polls open now.
    fn build_info_and_gauges(&self) -> (HistogramVec, IntGauge, IntGauge) {
        self.gauge_vec(
            "reveille_build_info",
            "Reveille's version; always 1.",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        let wakeup = self.histogram(
            "reveille_wakeup_seconds",
            "Time from a wake-up's start to each milestone: scale_accepted, endpoint_ready, first_forwarded.",
            ACTIVATION_BUCKETS,
            &["service", "phase"],
        );
        let keda_streams = self.gauge(
            "reveille_keda_streams",
            "KEDA StreamIsActive streams open on this replica.",
        );
        let admin_long_polls = self.gauge(
            "reveille_admin_long_polls",
            "Admin /api/local long-polls waiting now (at most limits.admin_max_long_polls).",
        );
        (wakeup, keda_streams, admin_long_polls)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = Register(&registry);
        let (wakeup, keda_streams, admin_long_polls) = r.build_info_and_gauges();
        let counter = |name, help, labels| r.counter(name, help, labels);
        let histogram = |name, help, buckets| r.histogram(name, help, buckets, &["service"]);
        let families = Families {
            services: Mutex::new(BTreeMap::new()),
            requests: counter(
                "reveille_requests_total",
                "Requests answered, by HTTP status code.",
                &["service", "code"],
            ),
            request_duration: histogram(
                "reveille_request_duration_seconds",
                "Time from a request's arrival to its response headers, holding included.",
                LATENCY_BUCKETS,
            ),
            hold_duration: histogram(
                "reveille_hold_duration_seconds",
                "Time requests spent held in the queue (only requests that were held).",
                LATENCY_BUCKETS,
            ),
            activations: counter(
                "reveille_activations_total",
                "Wake-ups of a service, by outcome (ready, failed, timeout).",
                &["service", "outcome"],
            ),
            activation_duration: histogram(
                "reveille_activation_duration_seconds",
                "Time from the wake call to the first ready endpoint.",
                ACTIVATION_BUCKETS,
            ),
            rejected: counter(
                "reveille_rejected_total",
                "Requests answered with an error by Reveille itself, by reason.",
                &["service", "reason"],
            ),
            wakeup,
            keda_streams,
            admin_long_polls,
            keda_pushes: counter(
                "reveille_keda_pushes_total",
                "Messages sent on KEDA StreamIsActive streams, by cause (event, interval) and value.",
                &["service", "cause", "active"],
            ),
            peer_fetches: counter(
                "reveille_peer_fetches_total",
                "Reads of peer replicas' counts, by outcome (ok, stale: last value used, dropped: too old).",
                &["outcome"],
            ),
            kube_api_errors: counter(
                "reveille_kubernetes_api_errors_total",
                "Failed Kubernetes API calls, by operation (get_scale, patch_scale, get_workload, watch_endpoints, ...).",
                &["service", "operation"],
            ),
            scale_patches: counter(
                "reveille_scale_patches_total",
                "Replica count changes Reveille made, by direction (up, down).",
                &["service", "direction"],
            ),
            scale_down_deferred: counter(
                "reveille_scale_down_deferred_total",
                "Scale-downs put off, by reason (rollout, peer_active, not_leader, peer_unknown, demand).",
                &["service", "reason"],
            ),
            rollout_validations: counter(
                "reveille_rollout_validations_total",
                "Validations of a new pod in a controlled rollout, by result (passed, failed).",
                &["service", "result"],
            ),
            rollout_switches: counter(
                "reveille_rollout_switches_total",
                "Switches of a service's traffic to a newly validated version, by whether the old version's in-flight requests finished within quiesce (drained, timeout).",
                &["service", "quiesce"],
            ),
            rollout_rollbacks: counter(
                "reveille_rollout_rollbacks_total",
                "Deployments patched back to the previous revision after a failed validation.",
                &["service"],
            ),
            accept_errors: counter(
                "reveille_accept_errors_total",
                "Failed accepts (EMFILE, ENFILE, ENOBUFS, ...) by listener (proxy, tls, admin, keda); each is followed by a pause.",
                &["listener"],
            ),
            relay_errors: counter(
                "reveille_relay_errors_total",
                "Responses whose body relay on the HTTP/1.1 fast path broke midway, by kind (client_gone, client_failed, backend_gone, backend_failed, bad_chunked); the client's connection is closed.",
                &["kind"],
            ),
            prewarm: prewarm::PrewarmMetrics::new(&registry),
            registry,
        };
        Metrics {
            families: Arc::new(families),
        }
    }

    /// Binds the per-service label values once. A service of the same name (a replaced one)
    /// shares its gauges, as it shares its series.
    pub fn service(&self, name: &str) -> ServiceMetrics {
        let gauges = {
            let mut services = self.services.lock();
            match services.get(name) {
                Some(g) => g.clone(),
                None => {
                    let g = Arc::new(ServiceGauges {
                        name: name.into(),
                        label: escape(name).into(),
                        ..ServiceGauges::default()
                    });
                    services.insert(g.name.clone(), g.clone());
                    g
                }
            }
        };
        ServiceMetrics {
            shared: gauges,
            parent: self.clone(),
        }
    }

    /// Removes every series of a service (after it was removed from the config).
    pub fn forget_service(&self, name: &str) {
        self.services.lock().remove(name);
        let _ = self.request_duration.remove_label_values(&[name]);
        let _ = self.hold_duration.remove_label_values(&[name]);
        let _ = self.activation_duration.remove_label_values(&[name]);
        for p in Phase::ALL {
            let _ = self.wakeup.remove_label_values(&[name, p.as_str()]);
        }
        self.prewarm.forget(name);
    }

    /// Counts a rejection that happened before any service was chosen (e.g. unknown host).
    pub fn reject_unrouted(&self, reason: &str, code: u16) {
        self.rejected.with_label_values(&["", reason]).inc();
        self.requests
            .with_label_values(&["", code.to_string().as_str()])
            .inc();
    }

    /// Counts a connection closed at once by Reveille (e.g. over `limits.max_connections`).
    pub fn reject_connection(&self, reason: &str) {
        self.rejected.with_label_values(&["", reason]).inc();
    }

    /// Counts a response body relay that broke midway on the fast path, by `kind`.
    pub fn relay_error(&self, kind: &'static str) {
        self.relay_errors.with_label_values(&[kind]).inc();
    }

    /// Counts a failed `accept` on `listener` (`proxy`, `tls`, `admin`, `keda`).
    pub fn accept_error(&self, listener: &'static str) {
        self.accept_errors.with_label_values(&[listener]).inc();
    }

    /// Counts a message sent on a KEDA stream.
    pub fn keda_push(&self, service: &str, cause: &'static str, active: bool) {
        self.keda_pushes
            .with_label_values(&[service, cause, if active { "true" } else { "false" }])
            .inc();
    }

    /// Counts a read of a peer replica's counts by outcome (`ok`, `stale`, `dropped`).
    pub fn peer_fetch(&self, outcome: &'static str) {
        self.peer_fetches.with_label_values(&[outcome]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a failure would be a malformed metric.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        let mut text = String::from_utf8(buf).unwrap_or_default();
        self.render_service_gauges(&mut text);
        text
    }

    /// Appends the per-service gauge families (like the registry, a family without a series
    /// is left out).
    fn render_service_gauges(&self, out: &mut String) {
        // A snapshot of the gauge handles: the lock is not held while formatting.
        let services: Vec<Arc<ServiceGauges>> = self.services.lock().values().cloned().collect();
        if services.is_empty() {
            return;
        }
        out.reserve(services.len() * 320);
        for (family, help, value) in SERVICE_GAUGES {
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} gauge");
            for g in &services {
                let _ = writeln!(out, "{family}{{service=\"{}\"}} {}", g.label, value(g));
            }
        }
        let (family, help) = SERVICE_STATE;
        let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} gauge");
        for g in &services {
            let (name, now) = (&g.label, g.state.load(Ordering::Relaxed));
            for s in crate::telemetry::State::ALL {
                let _ = writeln!(
                    out,
                    "{family}{{service=\"{name}\",state=\"{}\"}} {}",
                    s.as_str(),
                    u8::from(s as u8 == now)
                );
            }
        }
    }
}

/// A label value escaped for the text format (backslash, double quote, newline).
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A gauge of one service: a plain atomic, read at scrape time.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One service's gauges and its lazily created series (shared by gates of the same name).
#[derive(Default)]
pub struct ServiceGauges {
    name: Arc<str>,
    /// `name` escaped as a label value, once (a scrape writes it for every gauge family).
    label: Box<str>,
    /// Held requests.
    pub held: Gauge,
    /// In-flight requests.
    pub in_flight: Gauge,
    /// Ready endpoints.
    pub ready_endpoints: Gauge,
    state: AtomicU8,
    request_duration: OnceLock<prometheus::Histogram>,
    hold_duration: OnceLock<prometheus::Histogram>,
    activation_duration: OnceLock<prometheus::Histogram>,
    wakeup: [OnceLock<prometheus::Histogram>; 3],
    codes: RwLock<Vec<(u16, IntCounter)>>,
}

/// One service's metric handles, label values bound (series created on first use).
pub struct ServiceMetrics {
    shared: Arc<ServiceGauges>,
    parent: Metrics,
}

impl Deref for ServiceMetrics {
    type Target = ServiceGauges;

    fn deref(&self) -> &ServiceGauges {
        &self.shared
    }
}

impl ServiceMetrics {
    /// The service's series of a histogram family, created on first use.
    fn histogram<'a>(
        &self,
        cell: &'a OnceLock<prometheus::Histogram>,
        family: &HistogramVec,
        extra: Option<&str>,
    ) -> &'a prometheus::Histogram {
        cell.get_or_init(|| match extra {
            None => family.with_label_values(&[self.name.as_ref()]),
            Some(v) => family.with_label_values(&[self.name.as_ref(), v]),
        })
    }

    /// Counts a finished request and its duration up to the response headers.
    pub fn request(&self, code: u16, seconds: f64) {
        let s = &self.shared;
        self.histogram(&s.request_duration, &self.parent.request_duration, None)
            .observe(seconds);
        if let Some((_, c)) = s.codes.read().iter().find(|(k, _)| *k == code) {
            c.inc();
            return;
        }
        let mut codes = s.codes.write();
        if let Some((_, c)) = codes.iter().find(|(k, _)| *k == code) {
            c.inc();
            return;
        }
        let c = self
            .parent
            .requests
            .with_label_values(&[self.name.as_ref(), code.to_string().as_str()]);
        c.inc();
        codes.push((code, c));
    }

    /// Records how long a request was held.
    pub fn held_for(&self, seconds: f64) {
        let s = &self.shared;
        self.histogram(&s.hold_duration, &self.parent.hold_duration, None)
            .observe(seconds);
    }

    /// Counts a rejection by Reveille (queue full, hold timeout, ...).
    pub fn rejected(&self, reason: &str) {
        self.parent
            .rejected
            .with_label_values(&[self.name.as_ref(), reason])
            .inc();
    }

    /// Records a wake-up's outcome and, when it became ready, its duration.
    pub fn activation(&self, outcome: &str, seconds: Option<f64>) {
        self.parent
            .activations
            .with_label_values(&[self.name.as_ref(), outcome])
            .inc();
        if let Some(s) = seconds {
            let sh = &self.shared;
            self.histogram(
                &sh.activation_duration,
                &self.parent.activation_duration,
                None,
            )
            .observe(s);
        }
    }

    /// Records the time from a wake-up's start to one of its milestones.
    pub fn wake_phase(&self, phase: Phase, seconds: f64) {
        let cell = &self.shared.wakeup[phase as usize];
        self.histogram(cell, &self.parent.wakeup, Some(phase.as_str()))
            .observe(seconds);
    }

    /// Counts a failed Kubernetes API call.
    pub fn kube_api_error(&self, operation: &'static str) {
        self.parent
            .kube_api_errors
            .with_label_values(&[self.name.as_ref(), operation])
            .inc();
    }

    /// Counts a replica count change Reveille made (`up` or `down`).
    pub fn scale_patch(&self, direction: &'static str) {
        self.parent
            .scale_patches
            .with_label_values(&[self.name.as_ref(), direction])
            .inc();
    }

    /// Counts a scale-down that was put off, and why.
    pub fn scale_down_deferred(&self, reason: &'static str) {
        self.parent
            .scale_down_deferred
            .with_label_values(&[self.name.as_ref(), reason])
            .inc();
    }

    /// Counts a pod validation (`passed` or `failed`).
    pub fn rollout_validation(&self, result: &'static str) {
        self.parent
            .rollout_validations
            .with_label_values(&[self.name.as_ref(), result])
            .inc();
    }

    /// Counts a switch to a new version (`drained` or `timeout`).
    pub fn rollout_switch(&self, quiesce: &'static str) {
        self.parent
            .rollout_switches
            .with_label_values(&[self.name.as_ref(), quiesce])
            .inc();
    }

    /// Counts a rollback patch.
    pub fn rollout_rollback(&self) {
        self.parent
            .rollout_rollbacks
            .with_label_values(&[self.name.as_ref()])
            .inc();
    }

    /// Publishes the service's activation state.
    pub fn state(&self, state: crate::telemetry::State) {
        self.shared.state.store(state as u8, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bound_series() {
        let m = Metrics::new();
        let s = m.service("hello");
        s.held.set(3);
        s.request(200, 0.01);
        s.request(200, 0.02);
        s.request(503, 0.0);
        s.rejected("queue_full");
        s.activation("ready", Some(1.5));
        s.kube_api_error("patch_scale");
        s.scale_patch("up");
        s.scale_down_deferred("rollout");
        let text = m.render();
        assert!(
            text.contains("reveille_requests_held{service=\"hello\"} 3"),
            "{text}"
        );
        assert!(text.contains("reveille_requests_total{code=\"200\",service=\"hello\"} 2"));
        assert!(text.contains("reveille_requests_total{code=\"503\",service=\"hello\"} 1"));
        assert!(text.contains("reveille_rejected_total{reason=\"queue_full\",service=\"hello\"} 1"));
        assert!(text.contains("reveille_activation_duration_seconds_count{service=\"hello\"} 1"));
        assert!(text.contains(
            "reveille_kubernetes_api_errors_total{operation=\"patch_scale\",service=\"hello\"} 1"
        ));
        assert!(text.contains("reveille_scale_patches_total{direction=\"up\",service=\"hello\"} 1"));
        assert!(text.contains(
            "reveille_scale_down_deferred_total{reason=\"rollout\",service=\"hello\"} 1"
        ));
        m.forget_service("hello");
        assert!(!m
            .render()
            .contains("reveille_requests_held{service=\"hello\"}"));
    }

    #[test]
    fn an_idle_service_exports_its_gauges_and_no_histogram_series() {
        let m = Metrics::new();
        let s = m.service("idle");
        s.state(crate::telemetry::State::Idle);
        let text = m.render();
        for line in [
            "reveille_requests_held{service=\"idle\"} 0",
            "reveille_requests_in_flight{service=\"idle\"} 0",
            "reveille_ready_endpoints{service=\"idle\"} 0",
            "reveille_service_state{service=\"idle\",state=\"idle\"} 1",
            "reveille_service_state{service=\"idle\",state=\"ready\"} 0",
            "# TYPE reveille_service_state gauge",
        ] {
            assert!(text.contains(line), "missing {line} in {text}");
        }
        assert!(!text.contains("_bucket{"), "{text}");
        s.state(crate::telemetry::State::Ready);
        s.held_for(0.2);
        let text = m.render();
        assert!(text.contains("reveille_service_state{service=\"idle\",state=\"ready\"} 1"));
        assert!(text.contains("reveille_service_state{service=\"idle\",state=\"idle\"} 0"));
        assert!(text.contains("reveille_hold_duration_seconds_count{service=\"idle\"} 1"));
        assert!(
            !text.contains("reveille_request_duration_seconds"),
            "{text}"
        );
    }

    #[test]
    fn a_service_of_the_same_name_shares_its_series_and_names_are_escaped() {
        let m = Metrics::new();
        let a = m.service("a\"b");
        let b = m.service("a\"b");
        a.held.set(2);
        assert_eq!(b.held.get(), 2);
        a.request(200, 0.1);
        b.request(200, 0.1);
        let text = m.render();
        assert!(
            text.contains("reveille_requests_held{service=\"a\\\"b\"} 2"),
            "{text}"
        );
        assert!(text.contains("reveille_requests_total{code=\"200\",service=\"a\\\"b\"} 2"));
        assert!(
            m.render()
                .matches("# TYPE reveille_requests_held gauge")
                .count()
                == 1
        );
    }
}
