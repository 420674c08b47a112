//! Controlled rollouts of a Deployment (a service's `rollout:`). Only started for services that
//! ask for it: the plain path keeps its single EndpointSlice watch.
//!
//! - **Versions**: a pod's version is its `pod-template-hash` label; versions are ordered by
//!   their ReplicaSet's `deployment.kubernetes.io/revision`. Pods and ReplicaSets are watched
//!   (reflectors, label selector from the Deployment's `spec.selector.matchLabels`).
//! - **Validation**: a pod with the `reveille.dev/validated` readiness gate whose containers are
//!   ready gets the configured steps, in order, at its own address. Kubernetes does not count it
//!   ready (and so keeps the old pods) until the condition is True. Every pod is validated on
//!   its own: readiness gates are per pod, and one broken pod of a good version must not pass.
//!   A failure sets the condition False with the step and the reason, counts a metric, records
//!   an Event and, with `on_failure: rollback`, patches the Deployment back.
//! - **Routing**: the gate only gets ready endpoints of one version: the newest validated one
//!   with ready endpoints (a pod without the readiness gate counts as validated: Kubernetes
//!   does not wait for Reveille there). A change of version is a switch ([`Routing::switch`]):
//!   new requests wait, the old version's in-flight ones finish (bounded by `quiesce`), then
//!   everything goes to the new version.
//! - **Activity**: while a pod awaits validation or a switch runs, the gate is marked rolling
//!   out: no scale-down, and KEDA is told the service is active.
//! - **Order**: with `after: [api]`, new pods are validated only once `api`'s rollout has
//!   completed ([`order`]); meanwhile their condition says what they wait for.
//! - **At zero**: a new revision whose ReplicaSet has no replicas waits for the next wake-up,
//!   unless `at_zero: wake`: then the controller wakes the workload itself (direct mode: raises
//!   the scale; KEDA mode: reports active) and the idle scale-down follows once it is done.

pub mod board;
mod order;
mod promote;
mod report;
mod setup;
pub mod validate;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, info_span, warn, Instrument, Span};

use self::board::Board;
use self::validate::{StepClient, API_TIMEOUT, CONDITION, REASON_FAILED};
use super::endpoints::{Routing, SliceEndpoint};
use super::scale::{Change, WorkloadApi};
use crate::config::{
    AtZero, KubernetesBackend, OnFailure, PortRef, Promotion, Rollout, Scaling, ValidationStep,
};
use crate::gate::{Gate, ValidationResult};

/// First pause after a failed Deployment read; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest pause between Deployment reads while the API server is unreachable.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// With `at_zero: wake`: how long a wake-up for validation counts as a rollout in progress
/// while the new version has no pod to validate yet.
const WAKE_FOR_VALIDATION: Duration = Duration::from_secs(300);
/// A gated pod waiting this long for its containers no longer counts as a rollout in progress
/// (Kubernetes' default `progressDeadlineSeconds`): a new version that never starts must not
/// keep the service up forever.
const PENDING_BOUND: Duration = Duration::from_secs(600);

/// One pod's validation result.
struct Outcome {
    pod: Arc<Pod>,
    version: String,
    result: Result<(), String>,
}

/// The rollout controller of one service.
struct Controller {
    gate: Arc<Gate>,
    routing: Arc<Routing>,
    cfg: Rollout,
    port: PortRef,
    deployment: String,
    pods: Api<Pod>,
    events: Api<Event>,
    deployments: Api<Deployment>,
    client: StepClient,
    /// What the controllers of all services share (`via` gates).
    board: Arc<Board>,
    /// The version the gate routes to.
    active: Option<String>,
    /// Pods (uid) being validated now.
    validating: HashSet<String>,
    /// Pods (uid) validated by this controller whose condition may not be in the store yet.
    done: HashSet<String>,
    /// The validation steps, shared by every pod's validation (not copied per pod).
    steps: Arc<[ValidationStep]>,
    /// Versions already rolled back (one rollback per failed version; forgotten with their
    /// ReplicaSet).
    rolled_back: HashSet<String>,
    /// One tracing span per version seen rolling out.
    spans: HashMap<String, Span>,
    /// The step each validating pod is at (pod name → `step 2/3 (POST /validate)`).
    progress: Arc<Mutex<BTreeMap<String, String>>>,
    /// Told by a validation task as each step starts, so the report shows it at once.
    progressed: Arc<tokio::sync::Notify>,
    /// The versions as the last reconcile saw them (for the report between reconciles).
    versions: BTreeMap<String, Version>,
    /// The last finished validation, for the admin API.
    last_result: Option<ValidationResult>,
    /// With `after:`: why new pods are not validated now (`None`: they may be).
    waiting_for: Option<String>,
    /// `overlap: none` on a Deployment whose strategy allows overlap.
    warning: Option<String>,
    switching: bool,
    /// The validations running now; dropped with the controller, which aborts them (a reload
    /// or a removed service does not leave requests going to pods).
    tasks: JoinSet<Outcome>,
    /// The workload's scale, for `at_zero: wake` in direct mode.
    workload: WorkloadApi,
    replicas: i32,
    scaling: Scaling,
    /// Versions woken for validation (`at_zero: wake`), once each (forgotten with their
    /// ReplicaSet).
    woken: HashSet<String>,
    /// The version being woken for validation, and until when that counts as in progress.
    waking_for: Option<(String, tokio::time::Instant)>,
}

/// Runs the rollout controller of a service until its task is aborted. `slices` carries every
/// endpoint of the service's EndpointSlices.
pub async fn run(
    client: Client,
    cfg: KubernetesBackend,
    routing: Arc<Routing>,
    board: Arc<Board>,
    mut slices: watch::Receiver<Vec<SliceEndpoint>>,
) {
    let Some(rollout) = cfg.rollout.clone() else {
        return;
    };
    let gate = routing.gate().clone();
    let ns = cfg.namespace.clone();
    let mut c = Controller::new(&client, &cfg, rollout, routing, board);
    c.report(None);
    let selector = c.selector().await;
    info!(%selector, "rollout controller watching pods");
    let (pod_store, writer) = reflector::store();
    let pod_stream = watcher(c.pods.clone(), watcher::Config::default().labels(&selector))
        .default_backoff()
        .reflect(writer);
    let (rs_store, writer) = reflector::store();
    let rs_stream = watcher(
        Api::<ReplicaSet>::namespaced(client, &ns),
        watcher::Config::default().labels(&selector),
    )
    .default_backoff()
    .reflect(writer);
    let mut order = c.board.subscribe();
    let mut commands = c.board.listen(gate.name());
    let follows = !c.cfg.after.is_empty();
    let mut pod_stream = std::pin::pin!(pod_stream);
    let mut rs_stream = std::pin::pin!(rs_stream);
    let (mut pods_listed, mut rs_listed) = (false, false);
    loop {
        tokio::select! {
            ev = pod_stream.next() => match ev {
                Some(Ok(watcher::Event::InitDone)) => pods_listed = true,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    gate.metrics().kube_api_error("watch_pods");
                    warn!(error = %e, "pod watch failed; retrying");
                }
                None => return,
            },
            ev = rs_stream.next() => match ev {
                Some(Ok(watcher::Event::InitDone)) => rs_listed = true,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    gate.metrics().kube_api_error("watch_replicasets");
                    warn!(error = %e, "ReplicaSet watch failed; retrying");
                }
                None => return,
            },
            changed = slices.changed() => if changed.is_err() { return },
            _ = order.changed(), if follows => {}
            Some((cmd, reply)) = commands.recv() => {
                let _ = reply.send(c.command(cmd, &pod_store, &rs_store).await);
            }
            _ = c.progressed.notified() => {
                // A validation step started: only the report changes.
                c.report(None);
                continue;
            }
            Some(joined) = c.tasks.join_next(), if !c.tasks.is_empty() => {
                if let Ok(outcome) = joined {
                    c.finish(outcome, &rs_store).await;
                }
            }
        }
        if pods_listed && rs_listed {
            let eps = slices.borrow_and_update().clone();
            c.reconcile(&pod_store, &rs_store, &eps).await;
        }
    }
}

impl Drop for Controller {
    /// A stopped controller (service removed or replaced) says nothing about its rollout any
    /// more: its followers wait until a new controller reports.
    fn drop(&mut self) {
        self.board.forget(self.gate.name());
    }
}

/// Each version's (`pod-template-hash`) revision, from its ReplicaSets.
fn revisions(replicasets: &Store<ReplicaSet>) -> HashMap<String, i64> {
    let mut m = HashMap::new();
    for rs in replicasets.state() {
        if let Some(h) = rs_hash(&rs) {
            let r = validate::revision(&rs);
            let e = m.entry(h.to_string()).or_insert(r);
            *e = (*e).max(r);
        }
    }
    m
}

/// A ReplicaSet's `pod-template-hash`.
fn rs_hash(rs: &ReplicaSet) -> Option<&str> {
    validate::template_hash(&rs.metadata).map(String::as_str)
}

/// What the controller knows about one version.
#[derive(Default)]
struct Version {
    revision: i64,
    validated: bool,
    ready: Vec<SocketAddr>,
    /// Pods of this version waiting for (or in) validation.
    pending: usize,
    /// Pods of this version whose validation failed.
    failed: usize,
    /// Pods of this version validated and awaiting promotion (`promotion: manual`).
    awaiting: usize,
    /// Their addresses (for `candidate_header`), sorted.
    awaiting_addrs: Vec<SocketAddr>,
}

impl Controller {
    /// The Deployment's pod selector (`a=b,c=d`), read until it can be.
    async fn selector(&mut self) -> String {
        let mut pause = BACKOFF_MIN;
        loop {
            match tokio::time::timeout(API_TIMEOUT, self.deployments.get(&self.deployment)).await {
                Ok(Ok(d)) => {
                    self.warning = validate::overlap_warning(self.cfg.overlap, &d);
                    if let Some(w) = &self.warning {
                        warn!("{w}");
                    }
                    let labels = d
                        .spec
                        .and_then(|s| s.selector.match_labels)
                        .unwrap_or_default();
                    if !labels.is_empty() {
                        return labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",");
                    }
                    warn!("the Deployment has no spec.selector.matchLabels; rollouts need them");
                }
                Ok(Err(e)) => {
                    self.gate.metrics().kube_api_error("get_deployment");
                    warn!(error = %e, "reading the Deployment failed; retrying");
                }
                Err(_) => self.gate.metrics().kube_api_error("get_deployment"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(BACKOFF_MAX);
        }
    }

    fn span(&mut self, version: &str, revision: i64) -> Span {
        self.spans
            .entry(version.to_string())
            .or_insert_with(|| {
                info_span!(parent: None, "rollout", service = %self.gate.name(), version = %version, revision)
            })
            .clone()
    }

    async fn reconcile(
        &mut self,
        pods: &Store<Pod>,
        replicasets: &Store<ReplicaSet>,
        endpoints: &[SliceEndpoint],
    ) {
        let revisions = revisions(replicasets);
        let mut versions: BTreeMap<String, Version> = BTreeMap::new();
        let mut version_of: HashMap<String, String> = HashMap::new();
        let mut present = HashSet::new();
        self.waiting_for = self.board.waiting_for(&self.cfg.after);
        let mut held_back = Vec::new();
        let all_pods = pods.state();
        for pod in &all_pods {
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let (Some(name), Some(uid)) = (&pod.metadata.name, &pod.metadata.uid) else {
                continue;
            };
            let Some(hash) = validate::template_hash(&pod.metadata) else {
                continue;
            };
            present.insert(uid.clone());
            version_of.insert(name.clone(), hash.clone());
            let v = versions.entry(hash.clone()).or_default();
            v.revision = revisions.get(hash).copied().unwrap_or(0);
            let gated = validate::gated(pod);
            let cond = validate::condition(pod, CONDITION);
            let passed = !gated || cond.is_some_and(|(s, _)| s == "True");
            let failed = gated && cond == Some(("False", Some(REASON_FAILED)));
            let awaiting = gated && cond == Some(("False", Some(promote::REASON_AWAITING)));
            v.validated |= passed;
            if failed {
                v.failed += 1;
            } else if awaiting {
                v.awaiting += 1;
                v.awaiting_addrs
                    .extend(validate::pod_addr(pod, endpoints, &self.port).ok());
                v.awaiting_addrs.sort();
                v.pending += 1; // a candidate awaiting promotion keeps the rollout in progress
            } else if !passed {
                let containers_ready =
                    validate::condition(pod, "ContainersReady").is_some_and(|(s, _)| s == "True");
                if containers_ready || validate::age(pod).is_none_or(|a| a < PENDING_BOUND) {
                    v.pending += 1;
                }
                // Wait for the pod's ReplicaSet (its revision orders the version, and a rollback
                // needs it): the two watches may deliver in either order.
                if containers_ready
                    && revisions.contains_key(hash)
                    && !self.validating.contains(uid)
                    && !self.done.contains(uid)
                {
                    if self.waiting_for.is_some() {
                        held_back.push(pod.clone());
                    } else {
                        self.start_validation(pod.clone(), hash.clone(), v.revision, endpoints);
                    }
                }
            }
        }
        if let Some(why) = &self.waiting_for {
            if !order::hold(&self.pods, &held_back, why).await {
                self.gate.metrics().kube_api_error("patch_pod_status");
            }
        }
        self.validating.retain(|u| present.contains(u));
        self.done.retain(|u| present.contains(u));
        for ep in endpoints.iter().filter(|e| e.ready) {
            if let Some(v) = ep
                .pod
                .as_ref()
                .and_then(|p| version_of.get(p))
                .and_then(|h| versions.get_mut(h))
            {
                v.ready.push(ep.addr);
            }
        }
        let target = versions
            .iter()
            .filter(|(_, v)| v.validated && !v.ready.is_empty())
            .max_by_key(|(h, v)| (v.revision, h.as_str()))
            .map(|(h, v)| (h.clone(), v.ready.clone()));
        if self.cfg.at_zero == AtZero::Wake {
            self.wake_to_validate(&replicasets.state(), &versions).await;
        }
        let waking = self.waking_for.is_some();
        let pending = versions.values().any(|v| v.pending > 0) || waking;
        let target_revision = target.as_ref().map_or(0, |(h, _)| versions[h].revision);
        self.versions = versions;
        self.gate
            .set_rolling_out(pending || !self.validating.is_empty());
        self.route(target, target_revision, pending).await;
        self.settle(&revisions);
    }

    /// After a reconcile: forgets what is gone, tells followers the phase, reports.
    fn settle(&mut self, revisions: &HashMap<String, i64>) {
        self.spans.retain(|v, _| self.versions.contains_key(v));
        // Versions whose ReplicaSet is gone (past the revision history) cannot come back.
        self.rolled_back.retain(|v| revisions.contains_key(v));
        self.woken.retain(|v| revisions.contains_key(v));
        let busy = self.switching || !self.validating.is_empty();
        let phase = order::phase(
            &self.versions,
            self.active.as_deref(),
            busy,
            self.last_result.as_ref(),
        );
        self.board.publish(self.gate.name(), phase);
        if let Some(header) = &self.cfg.candidate_header {
            let candidate = self.versions.values().filter(|v| v.awaiting > 0);
            let newest = candidate.max_by_key(|v| v.revision);
            let addrs = newest.map_or(&[][..], |v| &v.awaiting_addrs[..]);
            self.gate.set_candidate(header, addrs);
        }
        self.report(None);
    }

    /// Routes to `target` (version, ready addresses): at once when nothing or the same version
    /// is routed, else through the switch (`pending`: a rollout is still in progress after it).
    async fn route(
        &mut self,
        target: Option<(String, Vec<SocketAddr>)>,
        target_revision: i64,
        pending: bool,
    ) {
        match target {
            None => self.routing.publish(Vec::new()),
            Some((version, addrs)) if self.active.is_none() => {
                info!(%version, "routing to version");
                self.active = Some(version);
                self.routing.publish(addrs);
            }
            Some((version, addrs)) if self.active.as_deref() == Some(version.as_str()) => {
                self.routing.publish(addrs);
            }
            Some((version, addrs)) => {
                let span = self.span(&version, target_revision);
                let from = self.active.clone().unwrap_or_default();
                self.switching = true;
                self.gate.set_rolling_out(true);
                self.report(Some("switching"));
                let quiesce = self.cfg.quiesce;
                let started = tokio::time::Instant::now();
                let drained = self
                    .routing
                    .switch(addrs, quiesce)
                    .instrument(span.clone())
                    .await;
                self.gate
                    .metrics()
                    .rollout_switch(if drained { "drained" } else { "timeout" });
                span.in_scope(|| {
                    info!(%from, to = %version, drained, took_ms = started.elapsed().as_secs_f64() * 1e3, "switched traffic to the new version")
                });
                self.active = Some(version);
                self.switching = false;
                self.gate
                    .set_rolling_out(pending || !self.validating.is_empty());
            }
        }
    }

    /// `at_zero: wake`: when the newest revision (newer than the routed one) has no replicas —
    /// the Deployment is at zero — wakes the workload once so the new version is validated now.
    async fn wake_to_validate(
        &mut self,
        replicasets: &[Arc<ReplicaSet>],
        versions: &BTreeMap<String, Version>,
    ) {
        if let Some((hash, until)) = &self.waking_for {
            let settled = versions
                .get(hash)
                .is_some_and(|v| v.pending == 0 && (v.validated || v.failed > 0));
            if settled || tokio::time::Instant::now() >= *until {
                self.waking_for = None;
            }
        }
        let Some(active_rev) = self
            .active
            .as_ref()
            .and_then(|a| versions.get(a))
            .map(|v| v.revision)
            .or_else(|| {
                // The routed version's pods are gone (at zero): its ReplicaSet still says.
                let a = self.active.as_ref()?;
                replicasets
                    .iter()
                    .filter(|rs| rs_hash(rs) == Some(a.as_str()))
                    .map(|rs| validate::revision(rs))
                    .max()
            })
        else {
            return; // nothing routed yet: no version to compare with
        };
        let Some(newest) = replicasets.iter().max_by_key(|rs| validate::revision(rs)) else {
            return;
        };
        let Some(hash) = rs_hash(newest) else { return };
        let at_zero = newest.spec.as_ref().and_then(|s| s.replicas) == Some(0);
        if validate::revision(newest) <= active_rev
            || !at_zero
            || versions.contains_key(hash)
            || !self.woken.insert(hash.to_string())
        {
            return;
        }
        let revision = validate::revision(newest);
        let span = self.span(hash, revision);
        let _g = span.enter();
        self.waking_for = Some((
            hash.to_string(),
            tokio::time::Instant::now() + WAKE_FOR_VALIDATION,
        ));
        if self.scaling == Scaling::Keda {
            info!("new version while at zero: reporting active so KEDA wakes it for validation");
            return;
        }
        match self.workload.raise_to(self.replicas).await {
            Ok(Change::Patched { from, to }) => {
                self.gate.metrics().scale_patch("up");
                info!(from, to, "new version while at zero: woken for validation");
            }
            Ok(Change::Unchanged(n)) => info!(replicas = n, "new version: already scaled up"),
            Err(e) => {
                self.gate.metrics().kube_api_error(e.operation);
                warn!(error = %e, "waking for validation failed; validating at the next wake-up");
                self.waking_for = None;
            }
        }
    }

    fn start_validation(
        &mut self,
        pod: Arc<Pod>,
        version: String,
        revision: i64,
        endpoints: &[SliceEndpoint],
    ) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let addr = validate::pod_addr(&pod, endpoints, &self.port);
        self.validating
            .insert(pod.metadata.uid.clone().unwrap_or_default());
        let span = self.span(&version, revision);
        let steps = self.steps.clone();
        let client = self.client.clone();
        let board = self.board.clone();
        let progress = self.progress.clone();
        let progressed = self.progressed.clone();
        let total = steps.len();
        self.tasks.spawn(
            async move {
                info!(pod = %name, "validating");
                let result = match addr {
                    Ok(pod) => {
                        let target = validate::Target {
                            pod,
                            version: version.clone(),
                            board,
                        };
                        validate::run_steps(&client, &target, &steps, |i| {
                            progress.lock().insert(
                                name.clone(),
                                format!(
                                    "step {}/{total} ({} {})",
                                    i + 1,
                                    steps[i].method,
                                    steps[i].path
                                ),
                            );
                            progressed.notify_one();
                        })
                        .await
                    }
                    Err(why) => Err(why),
                };
                progress.lock().remove(&name);
                progressed.notify_one();
                Outcome {
                    pod,
                    version,
                    result,
                }
            }
            .instrument(span),
        );
    }

    async fn finish(&mut self, o: Outcome, replicasets: &Store<ReplicaSet>) {
        let uid = o.pod.metadata.uid.clone().unwrap_or_default();
        let name = o.pod.metadata.name.clone().unwrap_or_default();
        self.validating.remove(&uid);
        self.done.insert(uid.clone());
        let span = self
            .spans
            .get(&o.version)
            .cloned()
            .unwrap_or_else(Span::none);
        let message = match &o.result {
            Ok(()) => format!("{} validation steps passed", self.cfg.validation.len()),
            Err(why) => why.clone(),
        };
        let passed = o.result.is_ok();
        self.gate
            .metrics()
            .rollout_validation(if passed { "passed" } else { "failed" });
        self.last_result = Some(ValidationResult {
            pod: name.clone(),
            version: o.version.clone(),
            passed,
            message: message.clone(),
        });
        let manual = passed && self.cfg.promotion == Promotion::Manual;
        let patched = if manual {
            let call = promote::await_promotion(&self.pods, &name, self.gate.name());
            tokio::time::timeout(API_TIMEOUT, call).await
        } else {
            let call = validate::set_condition(&self.pods, &name, passed, &message);
            tokio::time::timeout(API_TIMEOUT, call).await
        };
        if !matches!(patched, Ok(Ok(()))) {
            self.gate.metrics().kube_api_error("patch_pod_status");
            let _g = span.enter();
            warn!(pod = %name, "setting the pod's condition failed; validating it again later");
            self.done.remove(&uid);
            return;
        }
        let _g = span.enter();
        if passed {
            info!(pod = %name, "validation passed");
            return;
        }
        warn!(pod = %name, reason = %message, "validation failed");
        if !matches!(
            tokio::time::timeout(
                API_TIMEOUT,
                validate::failure_event(&self.events, &o.pod, &message)
            )
            .await,
            Ok(Ok(()))
        ) {
            self.gate.metrics().kube_api_error("create_event");
        }
        if self.cfg.on_failure == OnFailure::Rollback && self.rolled_back.insert(o.version.clone())
        {
            let rss = replicasets.state();
            let r = tokio::time::timeout(
                API_TIMEOUT,
                validate::rollback(&self.deployments, &self.deployment, &rss, &o.version),
            )
            .await;
            match r {
                Ok(Ok(validate::Rollback::Done(rev))) => {
                    self.gate.metrics().rollout_rollback();
                    warn!(to_revision = rev, "rolled the Deployment back");
                }
                Ok(Ok(validate::Rollback::Skipped(why))) => info!(%why, "no rollback"),
                _ => {
                    self.gate.metrics().kube_api_error("rollback");
                    warn!("rollback failed; will try again on the next failure");
                    self.rolled_back.remove(&o.version);
                }
            }
        }
    }
}
