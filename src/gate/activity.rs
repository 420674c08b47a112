//! Activity: what drivers and KEDA watch. The activation state, demand (a request held, or
//! something keeping the service awake), quiet (nothing held or in flight), the idle clock,
//! the held-count events KEDA streams push on, and the cold-start timer. Keeping a service
//! awake and the wake hook are in [`super::awake`].

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::{Gate, State, WakeHook};
use crate::telemetry::wake::WakeTracker;

/// Told when a request is held while the service has no endpoint: the service must be woken
/// (a scaler driver started on demand, see [`crate::activate::Driver`]).
pub trait OnDemand: Send + Sync {
    /// A request is held on `gate`, which has no endpoint.
    fn demand(self: Arc<Self>, gate: &Arc<Gate>);
}

/// A gate's activity.
pub(super) struct Activity {
    state: AtomicU8,
    demand: Notify,
    quiet: Notify,
    /// Told when the state or the ready endpoints change (a dependent's wake-up waits on it).
    readiness: Notify,
    epoch: Instant,
    last_active_ms: AtomicU64,
    last_activation_us: AtomicU64,
    /// The cold-start timer of the current wake-up.
    pub(super) wake: WakeTracker,
    /// Fires on every change of the held count (only the slow path holds, so the warm path
    /// never touches it): KEDA streams push on it. Created by the first subscriber (under the
    /// queue lock, like every change of the count).
    held_events: OnceLock<watch::Sender<usize>>,
    /// Times the queue went from empty to non-empty: a watcher that sees this move knows a
    /// request was held even if the queue emptied again before it looked.
    holds_total: AtomicU64,
    on_demand: OnceLock<Arc<dyn OnDemand>>,
    /// Reasons keeping the service up with no request (pre-warm windows, awake dependents);
    /// see [`Gate::keep_awake`].
    pub(super) awake: AtomicUsize,
    /// Run before a wake-up and after a stop (dependencies); see [`WakeHook`].
    pub(super) wake_hook: Mutex<Option<Arc<dyn WakeHook>>>,
}

impl Activity {
    pub(super) fn new(epoch: Instant) -> Self {
        Activity {
            state: AtomicU8::new(State::Idle as u8),
            demand: Notify::new(),
            quiet: Notify::new(),
            readiness: Notify::new(),
            epoch,
            last_active_ms: AtomicU64::new(0),
            last_activation_us: AtomicU64::new(u64::MAX),
            wake: WakeTracker::new(),
            held_events: OnceLock::new(),
            holds_total: AtomicU64::new(0),
            on_demand: OnceLock::new(),
            awake: AtomicUsize::new(0),
            wake_hook: Mutex::new(None),
        }
    }

    /// A request arrived or finished now.
    pub(super) fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// Nothing may be held or in flight any more: wakes the idle and drain waiters to look.
    pub(super) fn quieted(&self) {
        self.quiet.notify_waiters();
    }

    /// The held count went from `old` to `n` (under the queue lock).
    pub(super) fn held_moved(&self, old: usize, n: usize) {
        if old == 0 {
            self.holds_total.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(events) = self.held_events.get() {
            events.send_replace(n);
        }
    }

    /// Wakes KEDA streams without a change of the held count (activity changed).
    pub(super) fn nudge(&self) {
        if let Some(events) = self.held_events.get() {
            events.send_modify(|_| {});
        }
    }
}

impl Gate {
    /// Sets what is told when a request is held while the service has no endpoint (once; a
    /// later call is ignored).
    pub fn set_on_demand(&self, hook: Arc<dyn OnDemand>) {
        let _ = self.activity.on_demand.set(hook);
    }

    /// The service must be woken: tells the driver waiting for demand, and the on-demand hook.
    pub(super) fn demanded(self: &Arc<Self>) {
        self.activity.demand.notify_one();
        if let Some(hook) = self.activity.on_demand.get() {
            hook.clone().demand(self);
        }
    }

    /// A receiver that sees every change of the held count, at once (no ticker).
    pub fn subscribe_held(&self) -> watch::Receiver<usize> {
        let _q = self.queue.lock();
        self.activity
            .held_events
            .get_or_init(|| watch::Sender::new(self.held()))
            .subscribe()
    }

    /// Times the hold queue went from empty to non-empty (monotonic).
    pub fn holds_total(&self) -> u64 {
        self.activity.holds_total.load(Ordering::SeqCst)
    }

    /// The cold-start timer of the current wake-up (driven by the scaler and the gate).
    pub fn wake(&self) -> &WakeTracker {
        &self.activity.wake
    }

    /// The activation state.
    pub fn state(&self) -> State {
        State::from_u8(self.activity.state.load(Ordering::SeqCst))
    }

    /// Publishes the activation state.
    pub fn set_state(&self, state: State) {
        self.activity.state.store(state as u8, Ordering::SeqCst);
        self.metrics.state(state);
        self.activity.readiness.notify_waiters();
    }

    /// Resolves at the next change of the state or of the ready endpoints; enable it before
    /// looking at them so no change falls between.
    pub fn readiness_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.activity.readiness.notified()
    }

    /// Tells [`Gate::readiness_changed`] waiters (the ready endpoints changed).
    pub(super) fn readiness_moved(&self) {
        self.activity.readiness.notify_waiters();
    }

    /// Duration of the last successful activation, if any.
    pub fn last_activation(&self) -> Option<Duration> {
        match self.activity.last_activation_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(Duration::from_micros(ms)),
        }
    }

    /// Records a successful activation's duration.
    pub fn activated(&self, took: Duration) {
        self.activity
            .last_activation_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        self.activity.wake.record(took);
    }

    /// Time since the last request arrived or finished.
    pub fn idle_for(&self) -> Duration {
        self.activity.idle_for()
    }

    /// Resolves when at least one request is held (the service should be woken).
    pub async fn wait_for_demand(&self) {
        loop {
            let notified = self.activity.demand.notified();
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
            let quiet = self.activity.quiet.notified();
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
            let quiet = self.activity.quiet.notified();
            tokio::pin!(quiet);
            quiet.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            quiet.await;
        }
    }
}
