//! Keeping a service up without a request (pre-warm windows, awake dependents) and the hook
//! that wakes a service's dependencies first: the gate's side of [`crate::prewarm`] and
//! [`crate::activate::group`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Gate;
use crate::error::ProxyError;

/// What must happen before a service is woken and after it stopped: its dependencies are
/// woken first and let go after (see [`crate::activate::group`]).
pub trait WakeHook: Send + Sync {
    /// Resolves once the service may be woken; `Err(reason)` when it may not.
    fn before_wake(&self) -> futures_util::future::BoxFuture<'_, Result<(), String>>;
    /// The service's backend has stopped.
    fn stopped(&self);
    /// What a waking service waits for now (a dependency's name).
    fn waiting_for(&self) -> Option<Arc<str>>;
    /// Whether the hook is for exactly these dependencies (a reload keeps it then).
    fn same(&self, deps: &[Arc<Gate>]) -> bool;
}

impl Gate {
    /// Keeps the service up until the guard is dropped, as if a request were waiting: an idle
    /// service is woken now (its driver sees demand), a running one is not stopped for
    /// idleness. When the last guard goes, the idle period starts from then. Used by pre-warm
    /// windows and by dependents keeping their dependencies up.
    pub fn keep_awake(self: &Arc<Self>) -> AwakeGuard {
        if self.activity.awake.fetch_add(1, Ordering::SeqCst) == 0 {
            self.demanded();
            self.activity.nudge();
        }
        AwakeGuard(self.clone())
    }

    /// Sets (or clears) what runs before a wake-up and after a stop.
    pub fn set_wake_hook(&self, hook: Option<Arc<dyn WakeHook>>) {
        *self.activity.wake_hook.lock() = hook;
    }

    /// The wake hook, if any.
    pub fn wake_hook(&self) -> Option<Arc<dyn WakeHook>> {
        self.activity.wake_hook.lock().clone()
    }

    /// Called by a driver before it wakes the backend: waits for the service's dependencies.
    pub async fn before_wake(&self) -> Result<(), ProxyError> {
        let Some(hook) = self.wake_hook() else {
            return Ok(());
        };
        hook.before_wake()
            .await
            .map_err(|reason| ProxyError::ActivationFailed {
                service: self.name.clone(),
                reason: reason.into(),
            })
    }

    /// Called by a driver once the backend has stopped (its dependencies may stop now).
    pub fn after_stop(&self) {
        if let Some(hook) = self.wake_hook() {
            hook.stopped();
        }
    }

    /// The dependency a waking service waits for now.
    pub fn waiting_for(&self) -> Option<Arc<str>> {
        self.wake_hook().and_then(|h| h.waiting_for())
    }

    /// Whether something keeps the service up (see [`Gate::keep_awake`]).
    pub fn kept_awake(&self) -> bool {
        self.activity.awake.load(Ordering::SeqCst) > 0
    }
}

/// Keeps a gate's service up while it lives (see [`Gate::keep_awake`]).
pub struct AwakeGuard(Arc<Gate>);

impl Drop for AwakeGuard {
    fn drop(&mut self) {
        let gate = &self.0;
        if gate.activity.awake.fetch_sub(1, Ordering::SeqCst) == 1 {
            gate.activity.touch();
            gate.activity.quieted();
            gate.activity.nudge();
        }
    }
}

impl std::fmt::Debug for AwakeGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AwakeGuard").field(&self.0.name).finish()
    }
}
