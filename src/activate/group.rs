//! Dependency groups (`depends_on`), in the activation layer: before a service is woken, its
//! dependencies are woken in the listed order, each ready before the next and before the
//! service; they are kept up ([`Gate::keep_awake`]) until the service's backend has stopped,
//! so the idle stop goes dependents first. A dependency that does not come up fails the wake-up:
//! the held requests are answered `502` naming it. A pre-warmed service pre-warms its
//! dependencies the same way (its wake-up goes through here).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::gate::{AwakeGuard, Gate, State, WakeHook};

/// How often a dependency's state is looked at while waiting for it.
const POLL: Duration = Duration::from_millis(10);

/// A service's dependencies, as its gate's [`WakeHook`].
pub struct Dependencies {
    deps: Vec<Arc<Gate>>,
    /// How long one wake-up may wait for all of them (the service's hold timeout).
    bound: Duration,
    guards: Mutex<Vec<Option<AwakeGuard>>>,
    waiting: Mutex<Option<Arc<str>>>,
}

impl Dependencies {
    /// Dependencies `deps` (in order), waited for at most `bound` per wake-up.
    pub fn new(deps: Vec<Arc<Gate>>, bound: Duration) -> Arc<Self> {
        let n = deps.len();
        Arc::new(Dependencies {
            deps,
            bound,
            guards: Mutex::new((0..n).map(|_| None).collect()),
            waiting: Mutex::new(None),
        })
    }

    async fn wake_all(&self) -> Result<(), String> {
        let deadline = Instant::now() + self.bound;
        for (i, dep) in self.deps.iter().enumerate() {
            let failures = dep.wake().failures();
            {
                let mut g = self.guards.lock();
                if g[i].is_none() {
                    g[i] = Some(dep.keep_awake());
                }
            }
            *self.waiting.lock() = Some(dep.name().clone());
            if let Err(why) = ready(dep, deadline, failures).await {
                *self.waiting.lock() = None;
                self.stopped();
                return Err(format!("dependency {:?} {why}", dep.name()));
            }
        }
        *self.waiting.lock() = None;
        Ok(())
    }
}

/// Waits until `dep` has a ready endpoint; an error when a wake-up of it failed since its
/// failure count was `failures`, or `deadline` passed.
async fn ready(dep: &Gate, deadline: Instant, failures: u64) -> Result<(), &'static str> {
    loop {
        if dep.state() == State::Ready && !dep.endpoints().is_empty() {
            return Ok(());
        }
        if dep.wake().failures() != failures {
            return Err("failed to start");
        }
        if Instant::now() >= deadline {
            return Err("was not ready within the hold timeout");
        }
        tokio::time::sleep(POLL).await;
    }
}

impl WakeHook for Dependencies {
    fn before_wake(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(self.wake_all())
    }

    fn stopped(&self) {
        // Dropped outside the lock: a guard's drop notifies the dependency's gate.
        let released: Vec<Option<AwakeGuard>> =
            self.guards.lock().iter_mut().map(Option::take).collect();
        drop(released);
    }

    fn waiting_for(&self) -> Option<Arc<str>> {
        self.waiting.lock().clone()
    }

    fn same(&self, deps: &[Arc<Gate>]) -> bool {
        self.deps.len() == deps.len() && self.deps.iter().zip(deps).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}
