//! Services: the live set of services, each a gate with its scaler driver, and the routing
//! table built from them. A reload (a new config file on SIGHUP, later Kubernetes objects)
//! goes through [`Services::apply`]:
//!
//! - an unchanged service keeps its gate, driver and held requests untouched;
//! - a service whose routing changed (hosts, path prefix, namespace) keeps its gate too;
//! - a service whose backend or queue changed gets a new gate; its held requests move to the
//!   new gate (the proxy re-routes them by name, deadline kept), in-flight ones finish, and the
//!   new driver starts only after the old one has stopped its backend (same port, no clash);
//! - a removed service's held requests get `503` with `Retry-After`, its backend is stopped.
//!
//! Readers take a [`Snapshot`] without a lock; it is swapped whole.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::info;

use crate::activate::{self, Driver};
use crate::config::{Service, Timeouts};
use crate::error::ProxyError;
use crate::gate::{Gate, GateSettings, HeldLimit};
use crate::prewarm;
use crate::route::router::Router;
use crate::telemetry::metrics::Metrics;
use crate::upstream;

/// One service as routing and reporting see it.
pub struct ServiceEntry {
    /// Its gate (live counts).
    pub gate: Arc<Gate>,
    /// Its configuration (shared with its driver).
    pub spec: Arc<Service>,
}

impl ServiceEntry {
    /// `process`, `static` or `kubernetes` (the backend kind).
    pub fn backend_kind(&self) -> &'static str {
        self.spec.backend.kind()
    }
}

/// The services at one moment, and the routing table over them.
pub struct Snapshot {
    /// Host and path routing, Knative revisions.
    pub router: Router<Arc<Gate>>,
    /// Every service, in config order.
    pub services: Vec<Arc<ServiceEntry>>,
    by_name: HashMap<Arc<str>, Arc<Gate>>,
}

impl Snapshot {
    /// The gate of the service named `name`.
    pub fn gate(&self, name: &str) -> Option<&Arc<Gate>> {
        self.by_name.get(name)
    }

    /// Every gate, in config order.
    pub fn gates(&self) -> Vec<Arc<Gate>> {
        self.services.iter().map(|e| e.gate.clone()).collect()
    }

    fn build(services: Vec<Arc<ServiceEntry>>) -> Snapshot {
        let mut router = Router::new();
        let mut by_name = HashMap::with_capacity(services.len());
        for e in &services {
            let s = &e.spec;
            for host in &s.hosts {
                router.insert(host, s.path_prefix.as_deref(), e.gate.clone());
            }
            // Opt-in: a revision name or `*.svc.*` host reaches only services that allow it.
            if s.knative {
                router.insert_revision(&s.namespace, &s.name, e.gate.clone());
            }
            by_name.insert(e.gate.name().clone(), e.gate.clone());
        }
        Snapshot {
            router,
            services,
            by_name,
        }
    }
}

/// A running service: its entry, its driver, and its pre-warm task (with `prewarm:`).
struct Live {
    entry: Arc<ServiceEntry>,
    driver: Arc<Driver>,
    prewarm: Option<prewarm::runner::RunnerHandle>,
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// New services.
    pub added: Vec<String>,
    /// Services with a new gate and driver.
    pub replaced: Vec<String>,
    /// Services whose routing changed only.
    pub rerouted: Vec<String>,
    /// Removed services.
    pub removed: Vec<String>,
}

/// The config file's services and those from Kubernetes objects.
type Sources = (Vec<Arc<Service>>, Vec<Arc<Service>>);

/// The live set of services.
pub struct Services {
    current: ArcSwap<Snapshot>,
    live: tokio::sync::Mutex<HashMap<Arc<str>, Live>>,
    metrics: Metrics,
    held_limit: Arc<HeldLimit>,
    kube: Option<Arc<activate::kubernetes::KubeContext>>,
    /// The two sources of services: the config file, and Kubernetes objects (CRD). A spec
    /// equal to a live service's is that service's (shared, not a copy).
    sources: tokio::sync::Mutex<Sources>,
    /// The pooled upstream clients; TLS services' gates get theirs from here, so a replaced
    /// gate's connections go on with the new gate.
    upstreams: Arc<upstream::Upstreams>,
    /// Where process backends' pid files go (see [`Services::keep_pid_files_in`]).
    pid_dir: std::sync::OnceLock<std::path::PathBuf>,
    prewarm: prewarm::Context,
}

impl Services {
    /// An empty set; fill it with [`Services::apply`].
    /// `kube` is the API client (and scale-down coordination) for services on Kubernetes;
    /// `timeouts` shape the pooled upstream clients ([`Services::upstreams`]).
    pub fn new(
        metrics: Metrics,
        held_limit: Arc<HeldLimit>,
        kube: Option<activate::kubernetes::KubeContext>,
        timeouts: Timeouts,
    ) -> Arc<Self> {
        Self::with_prewarm(
            metrics,
            held_limit,
            kube,
            timeouts,
            prewarm::Context::default(),
        )
    }

    /// Like [`Services::new`], with the pre-warm context given (its clock, for tests).
    pub fn with_prewarm(
        metrics: Metrics,
        held_limit: Arc<HeldLimit>,
        kube: Option<activate::kubernetes::KubeContext>,
        timeouts: Timeouts,
        prewarm: prewarm::Context,
    ) -> Arc<Self> {
        let services = Arc::new(Services {
            current: ArcSwap::from_pointee(Snapshot::build(Vec::new())),
            live: tokio::sync::Mutex::new(HashMap::new()),
            metrics,
            held_limit,
            kube: kube.map(Arc::new),
            sources: tokio::sync::Mutex::new((Vec::new(), Vec::new())),
            upstreams: Arc::new(upstream::Upstreams::new(&timeouts)),
            pid_dir: std::sync::OnceLock::new(),
            prewarm,
        });
        if let Some(k) = &services.kube {
            let weak = Arc::downgrade(&services);
            k.rollouts.set_directory(weak);
        }
        services
    }

    /// What the rollout controllers share (`None`: no Kubernetes client).
    pub fn rollouts(&self) -> Option<&Arc<activate::kubernetes::rollout::board::Board>> {
        self.kube.as_ref().map(|k| &k.rollouts)
    }

    /// The pooled upstream clients (the proxy's, see [`crate::forward::Shared::upstreams`]).
    pub fn upstreams(&self) -> &Arc<upstream::Upstreams> {
        &self.upstreams
    }

    /// Process backends started from now on get a pid file in `dir` (`state_dir`); without
    /// this call, none do. Only the first call counts.
    pub fn keep_pid_files_in(&self, dir: std::path::PathBuf) {
        let _ = self.pid_dir.set(dir);
    }

    /// The current services and routing table.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// Makes `specs` the config file's services (see the module docs for what each kind of
    /// change does); services from Kubernetes objects stay.
    pub async fn apply(&self, specs: &[Service]) -> Changes {
        let mut sources = self.sources.lock().await;
        sources.0 = self.share(specs);
        let all: Vec<Arc<Service>> = sources.0.iter().chain(&sources.1).cloned().collect();
        self.apply_all(&all).await
    }

    /// Makes `specs` the services from Kubernetes objects; the file's services stay (a name
    /// defined in both is the file's).
    pub async fn apply_objects(&self, specs: &[Service]) -> Changes {
        let mut sources = self.sources.lock().await;
        sources.1 = self.share(specs);
        let mut all = sources.0.clone();
        all.extend(
            sources
                .1
                .iter()
                .filter(|s| !sources.0.iter().any(|f| f.name == s.name))
                .cloned(),
        );
        self.apply_all(&all).await
    }

    /// `specs` as shared specs: a spec equal to a live service's is that service's.
    fn share(&self, specs: &[Service]) -> Vec<Arc<Service>> {
        let current = self.current.load();
        let live: HashMap<&str, &Arc<Service>> = current
            .services
            .iter()
            .map(|e| (e.spec.name.as_str(), &e.spec))
            .collect();
        specs
            .iter()
            .map(|s| match live.get(s.name.as_str()) {
                Some(l) if ***l == *s => Arc::clone(l),
                _ => Arc::new(s.clone()),
            })
            .collect()
    }

    async fn apply_all(&self, specs: &[Arc<Service>]) -> Changes {
        let mut live = self.live.lock().await;
        let mut next: HashMap<Arc<str>, Live> = HashMap::with_capacity(specs.len());
        let mut order = Vec::with_capacity(specs.len());
        let mut retired = Vec::new();
        let mut changes = Changes::default();
        for spec in specs {
            let entry = match live.remove(spec.name.as_str()) {
                Some(old) if old.entry.spec == *spec => old,
                Some(old) if same_gate(&old.entry.spec, spec) => {
                    changes.rerouted.push(spec.name.clone());
                    let prewarm = if old.entry.spec.prewarm == spec.prewarm {
                        old.prewarm
                    } else {
                        drop(old.prewarm);
                        self.prewarm_runner(&old.entry.gate, spec)
                    };
                    Live {
                        entry: Arc::new(ServiceEntry {
                            gate: old.entry.gate.clone(),
                            spec: spec.clone(),
                        }),
                        driver: old.driver,
                        prewarm,
                    }
                }
                Some(old) => {
                    changes.replaced.push(spec.name.clone());
                    let new = self.launch(spec, Some(old.driver.clone()));
                    retired.push((old, true));
                    new
                }
                None => {
                    changes.added.push(spec.name.clone());
                    self.launch(spec, None)
                }
            };
            order.push(entry.entry.clone());
            next.insert(entry.entry.gate.name().clone(), entry);
        }
        for (name, old) in live.drain() {
            changes.removed.push(name.to_string());
            retired.push((old, false));
        }
        install_dependencies(&order);
        self.current.store(Arc::new(Snapshot::build(order)));
        // TLS clients no service uses now go (requests still on them keep theirs).
        let tls = specs
            .iter()
            .filter_map(|s| Some((s.upstream_tls.as_ref()?, s.protocol)));
        self.upstreams.tls.retain(tls);
        // Only now: held requests of a replaced service find its new gate when re-routed.
        for (old, replaced) in retired {
            let gate = &old.entry.gate;
            gate.fail_held(ProxyError::ServiceRemoved {
                service: gate.name().clone(),
            });
            old.driver.stop();
            if !replaced {
                let metrics = self.metrics.clone();
                let name = gate.name().to_string();
                let driver = old.driver;
                tokio::spawn(async move {
                    driver.stopped().await;
                    metrics.forget_service(&name);
                });
            }
        }
        *live = next;
        if changes != Changes::default() {
            info!(?changes, "services changed");
        }
        changes
    }

    /// Stops every driver (and backend) and waits for them.
    pub async fn stop_all(&self) {
        let mut live = self.live.lock().await;
        for l in live.values() {
            l.driver.stop();
        }
        for (_, l) in live.drain() {
            l.driver.stopped().await;
        }
    }

    fn launch(&self, spec: &Arc<Service>, after: Option<Arc<Driver>>) -> Live {
        let gate = Gate::new(
            &spec.name,
            GateSettings {
                capacity: spec.queue.capacity,
                hold_timeout: spec.queue.timeout,
                concurrency: spec.concurrency,
                protocol: spec.protocol,
                upstream: spec
                    .upstream_tls
                    .as_ref()
                    .map(|tls| self.upstreams.tls.client(tls, spec.protocol)),
                held_limit: self.held_limit.clone(),
                upgrades: GateSettings::upgrades_of(&spec.upgrades),
            },
            self.metrics.service(&spec.name),
        );
        // The old backend must be gone first: a process would clash on its port.
        let pid_dir = self.pid_dir.get().cloned();
        let driver = Driver::launch(&gate, spec.clone(), self.kube.clone(), after, pid_dir);
        let prewarm = self.prewarm_runner(&gate, spec);
        Live {
            entry: Arc::new(ServiceEntry {
                gate,
                spec: spec.clone(),
            }),
            driver,
            prewarm,
        }
    }

    /// The pre-warm task of a service with `prewarm:`.
    fn prewarm_runner(
        &self,
        gate: &Arc<Gate>,
        spec: &Service,
    ) -> Option<prewarm::runner::RunnerHandle> {
        let cfg = spec.prewarm.clone()?;
        let runner = prewarm::Runner::new(
            gate.clone(),
            cfg,
            self.prewarm.clone(),
            self.metrics.clone(),
            spec.idle_timeout,
        );
        Some(runner.spawn())
    }

    /// The pre-warm context (clock) services are planned on.
    pub fn prewarm_context(&self) -> &prewarm::Context {
        &self.prewarm
    }
}

/// Gives each service with `depends_on` its dependencies' gates (kept when unchanged, so the
/// dependencies it keeps up stay up across a reload).
fn install_dependencies(services: &[Arc<ServiceEntry>]) {
    let by_name: HashMap<&str, &Arc<Gate>> = services
        .iter()
        .map(|e| (e.spec.name.as_str(), &e.gate))
        .collect();
    for e in services {
        let deps: Vec<Arc<Gate>> = e
            .spec
            .depends_on
            .iter()
            .filter_map(|d| by_name.get(d.as_str()).map(|g| Arc::clone(g)))
            .collect();
        match e.gate.wake_hook() {
            Some(h) if h.same(&deps) => {}
            _ if deps.is_empty() => e.gate.set_wake_hook(None),
            _ => e
                .gate
                .set_wake_hook(Some(crate::activate::group::Dependencies::new(
                    deps,
                    e.spec.queue.timeout,
                ))),
        }
    }
}

/// Whether a change leaves the gate and driver as they are (only routing differs).
fn same_gate(a: &Service, b: &Service) -> bool {
    a.backend == b.backend
        && a.queue == b.queue
        && a.idle_timeout == b.idle_timeout
        && a.concurrency == b.concurrency
        && a.protocol == b.protocol
        && a.upstream_tls == b.upstream_tls
        && a.upgrades == b.upgrades
}

impl activate::kubernetes::rollout::board::GateDirectory for Services {
    fn gate(&self, name: &str) -> Option<Arc<Gate>> {
        self.load().gate(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Config;

    fn config(command: &str) -> Config {
        Config::parse(&format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: a\n    hosts: [a.test]\n    backend:\n      process:\n        command: [{command}]\n        address: 127.0.0.1:9\n        start_attempts: 1\n        start_timeout: 30s\n        stop_grace: 1s\n"
        ))
        .unwrap()
    }

    fn services(cfg: &Config) -> Arc<Services> {
        crate::app::testing::TestState::of(cfg.clone()).services()
    }

    async fn running(s: &Services, name: &str) -> bool {
        s.live.lock().await[name].driver.running()
    }

    fn deadline() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(20)
    }

    #[tokio::test]
    async fn a_process_driver_runs_only_while_a_request_needs_it() {
        let cfg = config("/bin/false");
        let s = services(&cfg);
        s.apply(&cfg.services).await;
        let gate = s.load().gate("a").unwrap().clone();
        assert!(!running(&s, "a").await, "no task for an idle service");
        for _ in 0..2 {
            // The held request starts the driver; the backend exits at once, so it fails.
            let e = gate.acquire(deadline()).await.err().unwrap();
            assert_eq!(e.kind(), "activation_failed");
            let t0 = tokio::time::Instant::now();
            while running(&s, "a").await {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "driver still running"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(gate.state(), crate::gate::State::Idle);
        }
        tokio::time::timeout(Duration::from_secs(5), s.stop_all())
            .await
            .expect("an idle service stops at once");
    }

    #[tokio::test]
    async fn stopping_a_waking_service_answers_its_held_requests_and_ends_the_driver() {
        let cfg = config("sleep, \"30\"");
        let s = services(&cfg);
        s.apply(&cfg.services).await;
        let gate = s.load().gate("a").unwrap().clone();
        let g = gate.clone();
        let held = tokio::spawn(async move { g.acquire(deadline()).await.err().unwrap() });
        let t0 = tokio::time::Instant::now();
        while !(running(&s, "a").await && gate.state() == crate::gate::State::Waking) {
            assert!(t0.elapsed() < Duration::from_secs(10), "driver not started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::timeout(Duration::from_secs(10), s.stop_all())
            .await
            .expect("stopped");
        assert_eq!(held.await.unwrap().kind(), "shutting_down");
    }

    #[tokio::test]
    async fn a_reload_shares_unchanged_specs_and_a_removed_idle_service_is_forgotten() {
        let cfg = config("/bin/false");
        let s = services(&cfg);
        s.apply(&cfg.services).await;
        let before = s.load().services[0].spec.clone();
        let changes = s.apply(&cfg.services).await;
        assert_eq!(changes, Changes::default());
        assert!(Arc::ptr_eq(&before, &s.load().services[0].spec));
        assert!(Arc::ptr_eq(&before, &s.sources.lock().await.0[0]));
        let changes = s.apply(&[]).await;
        assert_eq!(changes.removed, vec!["a".to_string()]);
        let t0 = tokio::time::Instant::now();
        while s.metrics.render().contains("service=\"a\"") {
            assert!(t0.elapsed() < Duration::from_secs(10), "series kept");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
