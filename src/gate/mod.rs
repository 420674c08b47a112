//! Gate: one per service, between the router and the upstream client. It owns the service's
//! ready endpoints, the per-endpoint in-flight limits, and the bounded FIFO hold queue.
//!
//! A request asks the gate for a [`Permit`] (an endpoint slot). When the service is ready and no
//! request is held, the permit is taken without a lock: two random endpoints are compared and
//! the one with fewer requests in flight is used (power of two choices). Otherwise the request
//! joins the hold queue and waits for a permit, its hold deadline, or an activation failure.
//! A permit released by a finished request, or endpoints becoming ready, drains the queue in
//! arrival order, no faster than the endpoints' limits allow.
//!
//! The gate does not start or stop anything: a driver (see [`crate::activate`]) watches demand
//! ([`Gate::wait_for_demand`]) and idleness ([`Gate::wait_idle`]), and publishes endpoints and
//! the activation state.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

use crate::config::Protocol;
use crate::error::ProxyError;
use crate::telemetry::metrics::ServiceMetrics;
use crate::telemetry::wake::WakeTracker;
use crate::upstream::UpstreamClient;

pub use crate::telemetry::State;

/// A bound on held requests shared by every gate (a memory bound).
#[derive(Debug)]
pub struct HeldLimit {
    max: usize,
    held: AtomicUsize,
}

impl HeldLimit {
    /// At most `max` requests held across the gates sharing it.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(HeldLimit {
            max,
            held: AtomicUsize::new(0),
        })
    }

    /// Requests held now, all gates together.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// The settings a gate needs.
#[derive(Debug, Clone)]
pub struct GateSettings {
    /// Hold-queue capacity.
    pub capacity: usize,
    /// Per-request hold deadline.
    pub hold_timeout: Duration,
    /// In-flight limit per endpoint.
    pub concurrency: Option<usize>,
    /// Protocol to the backend.
    pub protocol: Protocol,
    /// The service's own pooled client, for TLS backends (`h2`, `https`); `None`: the shared
    /// cleartext client of `protocol`.
    pub upstream: Option<Box<UpstreamClient>>,
    /// The global bound on held requests.
    pub held_limit: Arc<HeldLimit>,
    /// Upgrade protocols passed to the backend (`services[].upgrades`), lowercase.
    pub upgrades: Arc<[Box<str>]>,
}

impl GateSettings {
    /// `upgrades` as the gate keeps them.
    pub fn upgrades_of(list: &[String]) -> Arc<[Box<str>]> {
        list.iter().map(|u| Box::from(u.as_str())).collect()
    }

    /// The default upgrade list (`websocket`).
    pub fn default_upgrades() -> Arc<[Box<str>]> {
        crate::config::DEFAULT_UPGRADES
            .iter()
            .map(|u| Box::from(*u))
            .collect()
    }
}

/// The shared empty endpoint list (a gate without endpoints allocates none of its own).
fn no_endpoints() -> Arc<Vec<Arc<Endpoint>>> {
    static EMPTY: OnceLock<Arc<Vec<Arc<Endpoint>>>> = OnceLock::new();
    EMPTY.get_or_init(|| Arc::new(Vec::new())).clone()
}

/// A backend address with its in-flight count.
#[derive(Debug)]
pub struct Endpoint {
    /// Where requests go.
    pub addr: SocketAddr,
    /// `host:port` for the upstream request URI.
    pub authority: http::uri::Authority,
    in_flight: AtomicUsize,
    /// Gate-epoch milliseconds until which the endpoint is skipped (0: never ejected).
    ejected_until: AtomicU64,
}

impl Endpoint {
    fn new(addr: SocketAddr) -> Self {
        let authority = addr
            .to_string()
            .parse()
            .expect("a socket address is a valid authority");
        Endpoint {
            addr,
            authority,
            in_flight: AtomicUsize::new(0),
            ejected_until: AtomicU64::new(0),
        }
    }

    /// Requests in flight to this endpoint.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn try_take(&self, limit: Option<usize>) -> bool {
        match limit {
            None => {
                self.in_flight.fetch_add(1, Ordering::SeqCst);
                true
            }
            Some(limit) => self
                .in_flight
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok(),
        }
    }
}

type Grant = Result<Permit, ProxyError>;

/// Told when a request is held while the service has no endpoint: the service must be woken
/// (a scaler driver started on demand, see [`crate::activate::Driver`]).
pub trait OnDemand: Send + Sync {
    /// A request is held on `gate`, which has no endpoint.
    fn demand(self: Arc<Self>, gate: &Arc<Gate>);
}

struct Queue {
    next_id: u64,
    /// Ordered by arrival; removal by id is O(log n) when a client leaves.
    waiters: BTreeMap<u64, Waiter>,
}

struct Waiter {
    tx: oneshot::Sender<Grant>,
    since: Instant,
}

/// One service's gate.
pub struct Gate {
    name: Arc<str>,
    settings: GateSettings,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    queue: Mutex<Queue>,
    held: AtomicUsize,
    /// Fires on every change of the held count (only the slow path holds, so the warm path
    /// never touches it): KEDA streams push on it. Created by the first subscriber (under the
    /// queue lock, like every change of the count).
    held_events: OnceLock<watch::Sender<usize>>,
    /// Times the queue went from empty to non-empty: a watcher that sees this move knows a
    /// request was held even if the queue emptied again before it looked.
    holds_total: AtomicU64,
    in_flight: AtomicUsize,
    state: AtomicU8,
    demand: Notify,
    quiet: Notify,
    epoch: Instant,
    last_active_ms: AtomicU64,
    /// The latest ejection deadline of any endpoint (0: none), so `pick` reads no clock
    /// while nothing is ejected.
    ejections_until: AtomicU64,
    requests_total: AtomicU64,
    last_activation_us: AtomicU64,
    wake: WakeTracker,
    metrics: ServiceMetrics,
    /// While set, new requests are held and no permit is handed out (a version switch waits
    /// for the old version's requests in flight); see [`Gate::switch_endpoints`].
    paused: AtomicBool,
    /// A controlled rollout is validating or switching: the service counts as active.
    rolling_out: AtomicBool,
    /// The rollout's state for the admin API (`None`: no `rollout:` configured).
    rollout_report: arc_swap::ArcSwapOption<serde_json::Value>,
    /// A candidate awaiting promotion, reachable on purpose with a header (see [`candidate`]).
    candidate: arc_swap::ArcSwapOption<candidate::Candidate>,
    on_demand: OnceLock<Arc<dyn OnDemand>>,
    /// Reasons keeping the service up with no request (pre-warm windows, awake dependents);
    /// see [`Gate::keep_awake`].
    awake: AtomicUsize,
    /// Run before a wake-up and after a stop (dependencies); see [`WakeHook`].
    wake_hook: Mutex<Option<Arc<dyn WakeHook>>>,
}

/// What a request got from [`Gate::acquire`].
pub struct Acquired {
    /// The endpoint slot; release by dropping.
    pub permit: Permit,
    /// How long the request was held, if it was.
    pub held_for: Option<Duration>,
    /// Whether it was held while the service had no ready endpoint (a cold start).
    pub cold: bool,
}

impl Gate {
    /// A new gate in state `Idle`, with no endpoints.
    pub fn new(name: &str, settings: GateSettings, metrics: ServiceMetrics) -> Arc<Gate> {
        metrics.state(State::Idle);
        let now = Instant::now();
        Arc::new(Gate {
            name: name.into(),
            settings,
            endpoints: ArcSwap::new(no_endpoints()),
            queue: Mutex::new(Queue {
                next_id: 0,
                waiters: BTreeMap::new(),
            }),
            held: AtomicUsize::new(0),
            held_events: OnceLock::new(),
            holds_total: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            state: AtomicU8::new(State::Idle as u8),
            demand: Notify::new(),
            quiet: Notify::new(),
            epoch: now,
            last_active_ms: AtomicU64::new(0),
            ejections_until: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            last_activation_us: AtomicU64::new(u64::MAX),
            wake: WakeTracker::new(),
            metrics,
            paused: AtomicBool::new(false),
            rolling_out: AtomicBool::new(false),
            rollout_report: arc_swap::ArcSwapOption::empty(),
            candidate: arc_swap::ArcSwapOption::empty(),
            on_demand: OnceLock::new(),
            awake: AtomicUsize::new(0),
            wake_hook: Mutex::new(None),
        })
    }

    /// Sets what is told when a request is held while the service has no endpoint (once; a
    /// later call is ignored).
    pub fn set_on_demand(&self, hook: Arc<dyn OnDemand>) {
        let _ = self.on_demand.set(hook);
    }

    /// The service's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The gate's settings.
    pub fn settings(&self) -> &GateSettings {
        &self.settings
    }

    /// The service's metric handles.
    pub fn metrics(&self) -> &ServiceMetrics {
        &self.metrics
    }

    /// Requests held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// A receiver that sees every change of the held count, at once (no ticker).
    pub fn subscribe_held(&self) -> watch::Receiver<usize> {
        let _q = self.queue.lock();
        self.held_events
            .get_or_init(|| watch::Sender::new(self.held()))
            .subscribe()
    }

    /// Times the hold queue went from empty to non-empty (monotonic).
    pub fn holds_total(&self) -> u64 {
        self.holds_total.load(Ordering::SeqCst)
    }

    /// The cold-start timer of the current wake-up (driven by the scaler and the gate).
    pub fn wake(&self) -> &WakeTracker {
        &self.wake
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Requests that arrived since start (monotonic).
    pub fn requests_total(&self) -> u64 {
        self.requests_total.load(Ordering::Relaxed)
    }

    /// The activation state.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// The ready endpoints now.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Duration of the last successful activation, if any.
    pub fn last_activation(&self) -> Option<Duration> {
        match self.last_activation_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(Duration::from_micros(ms)),
        }
    }

    /// Time since the last request arrived or finished.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    /// Gets an endpoint slot: at once when one is free and nobody is held, else after holding
    /// in the queue until `deadline`.
    pub async fn acquire(self: &Arc<Self>, deadline: Instant) -> Result<Acquired, ProxyError> {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        self.acquire_again(deadline).await
    }

    /// Like [`Gate::acquire`], for a retry of a request already counted.
    pub async fn acquire_again(
        self: &Arc<Self>,
        deadline: Instant,
    ) -> Result<Acquired, ProxyError> {
        self.touch();
        if self.held.load(Ordering::SeqCst) == 0 && !self.paused.load(Ordering::SeqCst) {
            if let Some(ep) = self.pick() {
                let permit = self.permit(ep);
                // A switch that paused meanwhile either sees this request in flight (and waits
                // for it) or this check sees the pause (and the request is held instead).
                if !self.paused.load(Ordering::SeqCst) {
                    return Ok(Acquired {
                        permit,
                        held_for: None,
                        cold: false,
                    });
                }
                drop(permit);
            }
        }
        let since = Instant::now();
        let cold = self.endpoints.load().is_empty();
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut q = self.queue.lock();
            if q.waiters.len() >= self.settings.capacity {
                return Err(ProxyError::QueueFull {
                    service: self.name.clone(),
                    capacity: self.settings.capacity,
                });
            }
            let limit = &self.settings.held_limit;
            if limit.held() >= limit.max {
                return Err(ProxyError::HeldLimit {
                    service: self.name.clone(),
                    limit: limit.max,
                });
            }
            let id = q.next_id;
            q.next_id += 1;
            q.waiters.insert(id, Waiter { tx, since });
            self.set_held(q.waiters.len());
            self.dispatch_locked(&mut q);
            id
        };
        if cold {
            self.demand.notify_one();
            if let Some(hook) = self.on_demand.get() {
                hook.clone().demand(self);
            }
        }
        let mut held = Held {
            gate: self,
            id,
            rx: Some(rx),
        };
        let rx = held.rx.as_mut().expect("set above");
        let grant = match tokio::time::timeout_at(deadline, &mut *rx).await {
            Ok(Ok(grant)) => grant,
            Ok(Err(_)) => Err(ProxyError::ServiceRemoved {
                service: self.name.clone(),
            }),
            // A permit sent at the last instant is still used.
            Err(_) => rx.try_recv().unwrap_or_else(|_| {
                Err(ProxyError::HoldTimeout {
                    service: self.name.clone(),
                    waited: self.settings.hold_timeout,
                })
            }),
        };
        drop(held);
        let held_for = since.elapsed();
        self.metrics.held_for(held_for.as_secs_f64());
        if cold && grant.is_ok() {
            self.wake.first_forwarded(&self.metrics);
        }
        grant.map(|permit| Acquired {
            permit,
            held_for: Some(held_for),
            cold,
        })
    }

    /// Picks an endpoint with a free slot and takes the slot: power of two choices on in-flight
    /// count, then (with a limit) a scan so a free slot is never missed.
    fn pick(&self) -> Option<Arc<Endpoint>> {
        let eps = self.endpoints.load();
        let limit = self.settings.concurrency;
        let n = eps.len();
        if n <= 1 {
            return eps.first().filter(|e| e.try_take(limit)).cloned();
        }
        let now = self.ejection_clock();
        let usable =
            |e: &Endpoint| now.is_none_or(|t| e.ejected_until.load(Ordering::Relaxed) <= t);
        let r = fast_rand();
        let a = (r % n as u64) as usize;
        let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
        if b >= a {
            b += 1;
        }
        let (first, second) = if eps[a].in_flight() <= eps[b].in_flight() {
            (a, b)
        } else {
            (b, a)
        };
        for i in [first, second] {
            if usable(&eps[i]) && eps[i].try_take(limit) {
                return Some(eps[i].clone());
            }
        }
        if limit.is_none() && now.is_none() {
            return None;
        }
        // A free, healthy slot anywhere; failing that, a recently failed endpoint rather than
        // nothing (it may be back, and a held request is better tried than starved).
        let ring = (0..n).map(|k| &eps[(a + k) % n]);
        ring.clone()
            .find(|e| usable(e) && e.try_take(limit))
            .or_else(|| ring.clone().find(|e| e.try_take(limit)))
            .cloned()
    }

    /// Milliseconds since the gate's epoch while some endpoint is ejected; `None` (and no clock
    /// read) otherwise.
    fn ejection_clock(&self) -> Option<u64> {
        let until = self.ejections_until.load(Ordering::Relaxed);
        if until == 0 {
            return None;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        if now >= until {
            let _ = self.ejections_until.compare_exchange(
                until,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return None;
        }
        Some(now)
    }

    /// Keeps `endpoint` out of the balancer for a moment after a failed connect, so retries and
    /// the next requests go elsewhere (unless nothing else is left).
    pub fn eject(&self, endpoint: &Endpoint, for_: Duration) {
        let until = (self.epoch.elapsed() + for_).as_millis() as u64;
        endpoint.ejected_until.store(until, Ordering::Relaxed);
        self.ejections_until.fetch_max(until, Ordering::Relaxed);
    }

    fn permit(self: &Arc<Self>, endpoint: Arc<Endpoint>) -> Permit {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.metrics.in_flight.inc();
        Permit {
            gate: self.clone(),
            endpoint: Some(endpoint),
        }
    }

    fn set_held(&self, n: usize) {
        let old = self.held.swap(n, Ordering::SeqCst);
        if old == n {
            return;
        }
        let global = &self.settings.held_limit.held;
        if n > old {
            global.fetch_add(n - old, Ordering::Relaxed);
        } else {
            global.fetch_sub(old - n, Ordering::Relaxed);
        }
        self.metrics.held.set(n as i64);
        if old == 0 {
            self.holds_total.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(events) = self.held_events.get() {
            events.send_replace(n);
        }
    }

    /// Hands free slots to held requests, oldest first. Runs under the queue lock.
    fn dispatch_locked(self: &Arc<Self>, q: &mut Queue) {
        if self.paused.load(Ordering::SeqCst) {
            self.set_held(q.waiters.len());
            return;
        }
        while let Some(entry) = q.waiters.first_entry() {
            if entry.get().tx.is_closed() {
                entry.remove();
                continue;
            }
            let Some(ep) = self.pick() else { break };
            let waiter = entry.remove();
            if let Err(Ok(permit)) = waiter.tx.send(Ok(self.permit(ep))) {
                // The client left between the check and the send: give the slot back without
                // re-entering dispatch (we hold the queue lock).
                permit.release_quietly();
            }
        }
        self.set_held(q.waiters.len());
        if q.waiters.is_empty() {
            self.quiet.notify_waiters();
        }
    }

    fn release(self: &Arc<Self>, ep: &Endpoint) {
        ep.in_flight.fetch_sub(1, Ordering::SeqCst);
        let left = self.in_flight.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.in_flight.dec();
        self.touch();
        if self.held.load(Ordering::SeqCst) > 0 {
            let mut q = self.queue.lock();
            self.dispatch_locked(&mut q);
        }
        if left == 0 {
            self.quiet.notify_waiters();
        }
    }

    // ---- driver side -----------------------------------------------------------------------

    /// Publishes the activation state.
    pub fn set_state(&self, state: State) {
        self.state.store(state as u8, Ordering::SeqCst);
        self.metrics.state(state);
    }

    /// Replaces the ready endpoints (keeping in-flight counts of addresses that stay) and
    /// drains held requests onto them.
    pub fn set_endpoints(self: &Arc<Self>, addrs: &[SocketAddr]) {
        let old = self.endpoints.load();
        let new: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|a| {
                old.iter()
                    .find(|e| e.addr == *a)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(*a)))
            })
            .collect();
        self.metrics.ready_endpoints.set(new.len() as i64);
        self.endpoints.store(if new.is_empty() {
            no_endpoints()
        } else {
            Arc::new(new)
        });
        let mut q = self.queue.lock();
        self.dispatch_locked(&mut q);
    }

    /// Switches to a new set of endpoints so that no request starts on the old set after one
    /// has started on the new: new requests are held, requests in flight (all on the old set)
    /// get up to `quiesce` to finish, then the new set is installed and the held requests go
    /// to it in arrival order. True when the old requests finished within `quiesce`.
    pub async fn switch_endpoints(
        self: &Arc<Self>,
        addrs: &[SocketAddr],
        quiesce: Duration,
    ) -> bool {
        self.switch_with(quiesce, || self.set_endpoints(addrs))
            .await
    }

    /// [`Gate::switch_endpoints`] where `install` sets the new endpoints, called once the old
    /// requests are done (or `quiesce` ran out) and before the held requests go: the caller
    /// decides then what the new set is (a scale-down meanwhile may have withdrawn it).
    pub async fn switch_with(self: &Arc<Self>, quiesce: Duration, install: impl FnOnce()) -> bool {
        /// Ends the pause even if the switch is dropped half-way (its task aborted).
        struct Resume<'a>(&'a Arc<Gate>);
        impl Drop for Resume<'_> {
            fn drop(&mut self) {
                self.0.paused.store(false, Ordering::SeqCst);
                let mut q = self.0.queue.lock();
                self.0.dispatch_locked(&mut q);
            }
        }
        self.paused.store(true, Ordering::SeqCst);
        let resume = Resume(self);
        let drained = tokio::time::timeout(quiesce, self.wait_drained())
            .await
            .is_ok();
        // Installed while still paused; the held requests go when the pause ends.
        install();
        drop(resume);
        drained
    }

    /// Marks a controlled rollout as validating or switching (the service counts as active
    /// for KEDA and is not scaled to zero); wakes KEDA streams on a change.
    pub fn set_rolling_out(&self, on: bool) {
        if self.rolling_out.swap(on, Ordering::SeqCst) != on {
            if let Some(events) = self.held_events.get() {
                events.send_modify(|_| {});
            }
        }
    }

    /// Publishes the rollout's state for the admin API.
    pub fn set_rollout_report(&self, report: serde_json::Value) {
        self.rollout_report.store(Some(Arc::new(report)));
    }

    /// The rollout's state (`None`: no `rollout:` configured); shared, not copied.
    pub fn rollout_report(&self) -> Option<Arc<serde_json::Value>> {
        self.rollout_report.load_full()
    }

    /// Whether a controlled rollout is validating or switching.
    pub fn rolling_out(&self) -> bool {
        self.rolling_out.load(Ordering::SeqCst)
    }

    /// Answers every held request with `err` (activation failed, shutting down).
    pub fn fail_held(&self, err: ProxyError) {
        let mut q = self.queue.lock();
        let waiters = std::mem::take(&mut q.waiters);
        self.set_held(0);
        drop(q);
        for (_, w) in waiters {
            let _ = w.tx.send(Err(err.clone()));
        }
        self.quiet.notify_waiters();
    }

    /// The arrival time of the oldest held request.
    pub fn oldest_held_since(&self) -> Option<Instant> {
        self.queue.lock().waiters.values().next().map(|w| w.since)
    }

    /// Resolves when at least one request is held (the service should be woken).
    pub async fn wait_for_demand(&self) {
        loop {
            let notified = self.demand.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.held() > 0 || self.kept_awake() {
                return;
            }
            notified.await;
        }
    }

    /// Resolves once nothing has been held or in flight for `idle`.
    pub async fn wait_idle(&self, idle: Duration) {
        loop {
            let quiet = self.quiet.notified();
            tokio::pin!(quiet);
            quiet.as_mut().enable();
            if self.held() == 0 && self.in_flight() == 0 && !self.kept_awake() {
                let idle_for = self.idle_for();
                if idle_for >= idle {
                    return;
                }
                tokio::time::sleep(idle - idle_for).await;
            } else {
                quiet.await;
            }
        }
    }

    /// Resolves when no request is in flight.
    pub async fn wait_drained(&self) {
        loop {
            let quiet = self.quiet.notified();
            tokio::pin!(quiet);
            quiet.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            quiet.await;
        }
    }

    /// Records a successful activation's duration.
    pub fn activated(&self, took: Duration) {
        self.last_activation_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        self.wake.record(took);
    }
}

/// A held request's place in the queue; leaving (client gone, deadline) removes it at once.
struct Held<'a> {
    gate: &'a Arc<Gate>,
    id: u64,
    rx: Option<oneshot::Receiver<Grant>>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Drop the receiver first: a permit sent into it is released (and may go to the next
        // held request) before we take the queue lock.
        drop(self.rx.take());
        let mut q = self.gate.queue.lock();
        if q.waiters.remove(&self.id).is_some() {
            self.gate.set_held(q.waiters.len());
            if q.waiters.is_empty() {
                self.gate.quiet.notify_waiters();
            }
        }
    }
}

/// One request's slot on an endpoint. Dropping it frees the slot and lets the next held
/// request go.
pub struct Permit {
    gate: Arc<Gate>,
    endpoint: Option<Arc<Endpoint>>,
}

impl Permit {
    /// The endpoint this request goes to.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        self.endpoint.as_ref().expect("present until drop")
    }

    /// The gate that granted it.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    fn release_quietly(mut self) {
        if let Some(ep) = self.endpoint.take() {
            ep.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.gate.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.gate.metrics.in_flight.dec();
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(ep) = self.endpoint.take() {
            self.gate.release(&ep);
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("service", &self.gate.name)
            .field("endpoint", &self.endpoint.as_ref().map(|e| e.addr))
            .finish()
    }
}

/// A cheap per-thread xorshift; balancing needs spread, not cryptographic randomness.
fn fast_rand() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(&h as *const _ as usize);
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

mod awake;
pub mod candidate;
pub use awake::{AwakeGuard, WakeHook};

#[cfg(test)]
mod tests;
