//! The Kubernetes scaler: one driver task per service whose backend is a Deployment or
//! StatefulSet. It runs the activation state machine against the API server:
//!
//! - **Wake**: the first held request raises the workload's `scale` subresource to `replicas`
//!   (never lowering a higher count, re-reading on conflict), retried with backoff while any
//!   request is still held. With `scaling: keda` nothing is patched; the driver only waits.
//! - **Ready**: pod addresses come from the EndpointSlice watch ([`endpoints`]); the gate
//!   spreads held requests over pods as they turn ready.
//! - **Scale-down** (direct mode, `scale_down: true`): after `idle_timeout` with nothing held or
//!   in flight, and no rollout in progress, new requests stop going to the pods, in-flight ones
//!   finish, and the count is patched to zero. A request held meanwhile cancels it.
//!
//! On Reveille's own shutdown the workload is left as it is: other replicas may be serving it.

pub mod coordinate;
pub mod endpoints;

pub mod rollout;
pub mod scale;

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument};

use self::coordinate::Coordinator;
use self::endpoints::Routing;
use self::scale::{Change, WorkloadApi};
use crate::config::{KubernetesBackend, Scaling};
use crate::gate::{Gate, State};
use crate::telemetry::wake::Phase;

/// First pause after a failed wake-up patch; doubles up to [`WAKE_BACKOFF_MAX`].
const WAKE_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause between wake-up attempts.
const WAKE_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest pause before a put-off scale-down is tried again (shorter idle timeouts use theirs).
const SCALE_DOWN_RECHECK: Duration = Duration::from_secs(10);
/// Bound on waiting for in-flight requests before the count is patched to zero.
const DRAIN_GRACE: Duration = Duration::from_secs(30);
/// Bound on waiting for the watch to show the pods gone after a scale-down.
const PODS_GONE_WAIT: Duration = Duration::from_secs(30);

/// Margin past a held request's deadline before the driver looks at the queue again.
const DEADLINE_SLACK: Duration = Duration::from_millis(10);

/// Aborts the endpoint watch when the driver ends.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What every Kubernetes driver shares: the API client and, with several Reveille replicas,
/// the cluster-wide scale-down decision.
#[derive(Clone)]
pub struct KubeContext {
    /// The API client.
    pub client: Client,
    /// Decides scale-downs across replicas (`coordination:`); `None`: this replica alone.
    pub coordinator: Option<Arc<Coordinator>>,
    /// What the rollout controllers of all services share.
    pub rollouts: Arc<rollout::board::Board>,
}

/// Builds the shared context: with `coordination`, starts the lease elector (its task is
/// pushed onto `tasks`) and the peer discovery.
pub fn context(
    client: Client,
    coordination: Option<&crate::config::Coordination>,
    static_peers: Arc<dyn crate::cluster::peers::PeerSource>,
    admin_port: u16,
    stop: &crate::shutdown::Signal,
    tasks: &mut Vec<JoinHandle<()>>,
) -> KubeContext {
    let coordinator = coordination.map(|c| {
        let leadership = Arc::new(crate::cluster::lease::Leadership::default());
        tasks.push(tokio::spawn(crate::cluster::lease::run(
            client.clone(),
            c.clone(),
            leadership.clone(),
            stop.clone(),
        )));
        let (peers, synced): (Arc<dyn crate::cluster::peers::PeerSource>, _) =
            match &c.peers_service {
                Some(svc) => {
                    let kp = coordinate::KubePeers::start(
                        client.clone(),
                        &c.namespace,
                        svc,
                        c.pod_ip,
                        admin_port,
                    );
                    let synced = kp.synced.clone();
                    (Arc::new(kp), synced)
                }
                None => (
                    static_peers,
                    Arc::new(std::sync::atomic::AtomicBool::new(true)),
                ),
            };
        Arc::new(Coordinator::new(leadership, peers, synced, c.peer_timeout))
    });
    KubeContext {
        client,
        coordinator,
        rollouts: Arc::default(),
    }
}

/// One service's Kubernetes driver.
struct Driver {
    gate: Arc<Gate>,
    cfg: KubernetesBackend,
    idle_timeout: Duration,
    workload: WorkloadApi,
    routing: Arc<Routing>,
    seen: watch::Receiver<usize>,
    coordinator: Option<Arc<Coordinator>>,
}

/// The driver of a Kubernetes service added by a reload to a Reveille started without a
/// Kubernetes client: every held request gets 502 with the reason, until `stop`.
pub async fn unavailable(gate: Arc<Gate>, mut stop: crate::shutdown::Signal) {
    warn!(service = %gate.name(), "no Kubernetes client (Reveille started without Kubernetes services); restart to use it");
    loop {
        tokio::select! {
            _ = gate.wait_for_demand() => gate.fail_held(crate::error::ProxyError::ActivationFailed {
                service: gate.name().clone(),
                reason: "no Kubernetes client; restart Reveille to add Kubernetes services".into(),
            }),
            _ = stop.fired() => return,
        }
    }
}

/// Runs the driver until `stop`.
pub async fn run(
    gate: Arc<Gate>,
    cfg: KubernetesBackend,
    idle_timeout: Duration,
    ctx: KubeContext,
    mut stop: crate::shutdown::Signal,
) {
    let client = ctx.client;
    let routing = Routing::new(gate.clone());
    // With `rollout:` the endpoints go through the rollout controller, which routes one version.
    let (rollout_tx, _rollout) = match cfg.rollout {
        Some(_) => {
            let (tx, rx) = watch::channel(Vec::new());
            let task = tokio::spawn(rollout::run(
                client.clone(),
                cfg.clone(),
                routing.clone(),
                ctx.rollouts.clone(),
                rx,
            ));
            (Some(tx), Some(AbortOnDrop(task)))
        }
        None => (None, None),
    };
    let _watch = AbortOnDrop(tokio::spawn(endpoints::watch_endpoints(
        client.clone(),
        cfg.namespace.clone(),
        cfg.service.clone(),
        cfg.port.clone(),
        routing.clone(),
        rollout_tx,
    )));
    let mut d = Driver {
        workload: WorkloadApi::new(client, &cfg.namespace, &cfg.workload),
        seen: routing.subscribe(),
        coordinator: ctx.coordinator,
        gate,
        cfg,
        idle_timeout,
        routing,
    };
    let span = info_span!("kubernetes", service = %d.gate.name(), namespace = %d.cfg.namespace, workload = %d.cfg.workload.name);
    d.drive(&mut stop).instrument(span).await;
}

impl Driver {
    async fn drive(&mut self, stop: &mut crate::shutdown::Signal) {
        loop {
            if self.routing.seen() == 0 {
                self.gate.set_state(State::Idle);
                tokio::select! {
                    _ = self.gate.wait_for_demand() => {}
                    _ = self.seen.wait_for(|n| *n > 0) => {}
                    _ = stop.fired() => return,
                }
                if self.routing.seen() == 0 {
                    if !self.activate(stop).await {
                        return;
                    }
                    continue;
                }
            }
            self.gate.set_state(State::Ready);
            let scale_down = self.cfg.scaling == Scaling::Direct && self.cfg.scale_down;
            let gate = self.gate.clone();
            let idle_timeout = self.idle_timeout;
            let idle = async move {
                if scale_down {
                    gate.wait_idle(idle_timeout).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = idle => {}
                _ = self.seen.wait_for(|n| *n == 0) => continue,
                _ = stop.fired() => return,
            }
            if !self.scale_down(stop).await {
                return;
            }
        }
    }

    /// The deadline of the oldest held request; while the service is only kept awake (a
    /// pre-warm), one hold timeout from now. `None` when nobody waits.
    fn hold_deadline(&self) -> Option<Instant> {
        let hold = self.gate.settings().hold_timeout;
        self.gate
            .oldest_held_since()
            .map(|t| t + hold)
            .or_else(|| self.gate.kept_awake().then(|| Instant::now() + hold))
    }

    /// Wakes the workload and waits for a ready pod while anything is held. False on `stop`.
    async fn activate(&mut self, stop: &mut crate::shutdown::Signal) -> bool {
        self.gate.set_state(State::Waking);
        // One span per wake-up: its events are the milestones (scale accepted, pod ready,
        // first request forwarded).
        let span = self.gate.wake().begin(self.gate.name(), self.gate.held());
        self.activate_in(stop).instrument(span).await
    }

    async fn activate_in(&mut self, stop: &mut crate::shutdown::Signal) -> bool {
        let started = Instant::now();
        // Dependencies first, each ready before the next (`depends_on`).
        let deps = tokio::select! {
            r = self.gate.before_wake() => r,
            _ = stop.fired() => {
                self.gate.wake().abort("shutdown");
                return false;
            }
        };
        if let Err(e) = deps {
            warn!(error = %e, "dependencies not ready");
            self.gate.wake().abort("dependency");
            self.gate.fail_held(e);
            self.gate.after_stop();
            return true;
        }
        info!(held = self.gate.held(), "waking");
        if self.cfg.scaling == Scaling::Direct {
            match self.wake(stop).await {
                None => {
                    self.gate.wake().abort("shutdown");
                    return false;
                }
                Some(true) => self
                    .gate
                    .wake()
                    .mark(Phase::ScaleAccepted, self.gate.metrics()),
                Some(false) => {
                    self.gate.wake().abort("failed");
                    self.gate.metrics().activation("failed", None);
                    return true;
                }
            }
        }
        loop {
            let Some(deadline) = self.hold_deadline() else {
                self.gate.wake().abort("timeout");
                self.gate.metrics().activation("timeout", None);
                warn!("no ready pod while requests were held");
                return true;
            };
            tokio::select! {
                _ = self.seen.wait_for(|n| *n > 0) => break,
                // Just past the deadline, so the timed-out request has left the queue.
                _ = tokio::time::sleep_until(deadline + DEADLINE_SLACK) => {}
                _ = stop.fired() => {
                    self.gate.wake().abort("shutdown");
                    return false;
                }
            }
        }
        self.gate
            .wake()
            .mark(Phase::EndpointReady, self.gate.metrics());
        let took = started.elapsed();
        self.gate.activated(took);
        self.gate
            .metrics()
            .activation("ready", Some(took.as_secs_f64()));
        info!(took_ms = took.as_secs_f64() * 1e3, "ready");
        true
    }

    /// Raises the replica count, retrying with backoff while anything is held. `Some(true)`
    /// once the count is up (or pods showed up), `Some(false)` when nobody waits any more,
    /// `None` on `stop`.
    async fn wake(&mut self, stop: &mut crate::shutdown::Signal) -> Option<bool> {
        let mut pause = WAKE_BACKOFF_MIN;
        loop {
            match self.workload.raise_to(self.cfg.replicas).await {
                Ok(Change::Patched { from, to }) => {
                    self.gate.metrics().scale_patch("up");
                    info!(from, to, "scaled up");
                    return Some(true);
                }
                Ok(Change::Unchanged(n)) => {
                    info!(replicas = n, "already scaled up; waiting for ready pods");
                    return Some(true);
                }
                Err(e) => {
                    self.gate.metrics().kube_api_error(e.operation);
                    warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "wake-up failed");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.seen.wait_for(|n| *n > 0) => return Some(true),
                _ = stop.fired() => return None,
            }
            if self.gate.held() == 0 && !self.gate.kept_awake() {
                return Some(false);
            }
            pause = (pause * 2).min(WAKE_BACKOFF_MAX);
        }
    }

    /// Whether the service has been quiet for the whole idle timeout.
    fn still_idle(&self) -> bool {
        self.gate.held() == 0
            && !self.gate.kept_awake()
            && self.gate.in_flight() == 0
            && self.gate.idle_for() >= self.idle_timeout
    }

    /// With several replicas: whether this one may scale down now (it holds the lease and
    /// every peer is idle too).
    async fn cluster_verdict(&self) -> Result<(), coordinate::Deferral> {
        match &self.coordinator {
            Some(c) => c.may_scale_down(self.gate.name(), self.idle_timeout).await,
            None => Ok(()),
        }
    }

    /// Scales the workload to zero unless a rollout, a held request or an API error says
    /// not now (then it is tried again later). False on `stop`.
    async fn scale_down(&mut self, stop: &mut crate::shutdown::Signal) -> bool {
        let recheck = self.idle_timeout.min(SCALE_DOWN_RECHECK);
        loop {
            let reason = match self.cluster_verdict().await {
                // A controlled rollout is validating or switching (`rollout:`).
                Ok(()) if self.gate.rolling_out() => {
                    self.gate.metrics().scale_down_deferred("rollout");
                    "validating a new version".to_string()
                }
                Ok(()) => match self.workload.rollout_in_progress().await {
                    Ok(None) => break,
                    Ok(Some(reason)) => {
                        self.gate.metrics().scale_down_deferred("rollout");
                        reason
                    }
                    Err(e) => {
                        self.gate.metrics().kube_api_error(e.operation);
                        e.to_string()
                    }
                },
                Err(reason) => {
                    self.gate.metrics().scale_down_deferred(reason);
                    reason.to_string()
                }
            };
            if reason == "not_leader" {
                tracing::debug!("scale-down left to the lease holder");
            } else {
                info!(%reason, "scale-down put off");
            }
            tokio::select! {
                _ = tokio::time::sleep(recheck) => {}
                _ = stop.fired() => return false,
            }
            if !self.still_idle() {
                return true;
            }
        }
        self.gate.set_state(State::Stopping);
        self.routing.withdraw();
        let _ = tokio::time::timeout(DRAIN_GRACE, self.gate.wait_drained()).await;
        if self.gate.held() > 0 || self.gate.kept_awake() {
            self.gate.metrics().scale_down_deferred("demand");
            self.routing.restore();
            return true;
        }
        if self.gate.rolling_out() {
            self.gate.metrics().scale_down_deferred("rollout");
            info!("scale-down put off: a rollout began while draining");
            self.routing.restore();
            self.gate.set_state(State::Ready);
            return true;
        }
        // Peers may have had traffic while this replica drained.
        if let Err(reason) = self.cluster_verdict().await {
            self.gate.metrics().scale_down_deferred(reason);
            info!(%reason, "scale-down put off");
            self.routing.restore();
            self.gate.set_state(State::Ready);
            return true;
        }
        match self.workload.lower_to_zero().await {
            Ok(Change::Patched { from, .. }) => {
                self.gate.metrics().scale_patch("down");
                info!(from, "scaled to zero after idle");
            }
            Ok(Change::Unchanged(_)) => info!("already at zero"),
            Err(e) => {
                self.gate.metrics().kube_api_error(e.operation);
                warn!(error = %e, "scale-down failed; will retry");
                self.routing.restore();
                self.gate.set_state(State::Ready);
                tokio::select! {
                    _ = tokio::time::sleep(recheck) => {}
                    _ = stop.fired() => return false,
                }
                return true;
            }
        }
        self.gate.set_state(State::Idle);
        self.gate.after_stop();
        // Keep new requests off the stopping pods until the watch shows them gone (or demand
        // comes back, in which case the pods still listed are the ones to use).
        tokio::select! {
            _ = self.seen.wait_for(|n| *n == 0) => {}
            _ = self.gate.wait_for_demand() => {}
            _ = tokio::time::sleep(PODS_GONE_WAIT) => {}
            _ = stop.fired() => return false,
        }
        self.routing.restore();
        true
    }
}
