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
/// Event-driven: it looks again when the dependency's state or endpoints change or a wake-up of
/// it ends early, so the dependent's wake-up goes on the moment the dependency is ready.
async fn ready(dep: &Gate, deadline: Instant, failures: u64) -> Result<(), &'static str> {
    loop {
        let changed = dep.readiness_changed();
        let ended = dep.wake().ended_early();
        tokio::pin!(changed, ended);
        changed.as_mut().enable();
        ended.as_mut().enable();
        if dep.state() == State::Ready && !dep.endpoints().is_empty() {
            return Ok(());
        }
        if dep.wake().failures() != failures {
            return Err("failed to start");
        }
        if Instant::now() >= deadline {
            return Err("was not ready within the hold timeout");
        }
        tokio::select! {
            () = changed => {}
            () = ended => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::config::Protocol;
    use crate::gate::{GateSettings, HeldLimit};
    use crate::telemetry::metrics::Metrics;

    fn gate(name: &str) -> Arc<Gate> {
        Gate::new(
            name,
            GateSettings {
                capacity: 10,
                hold_timeout: Duration::from_secs(60),
                concurrency: None,
                protocol: Protocol::Http1,
                upstream: None,
                held_limit: HeldLimit::new(1000),
                upgrades: GateSettings::default_upgrades(),
            },
            Metrics::new().service(name),
        )
    }

    /// On the paused clock time only moves when every task waits on a timer: a wait that
    /// polled would let it move; one woken by the dependency's change does not.
    #[tokio::test(start_paused = true)]
    async fn a_dependency_is_seen_ready_the_moment_it_is_without_time_passing() {
        let dep = gate("db");
        let start = Instant::now();
        let waiting = tokio::spawn({
            let dep = dep.clone();
            async move { ready(&dep, start + Duration::from_secs(60), 0).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "not ready yet");
        dep.set_endpoints(&[SocketAddr::from(([127, 0, 0, 1], 1))]);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "endpoints alone are not ready");
        dep.set_state(State::Ready);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(start.elapsed(), Duration::ZERO, "no poll interval went by");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_wake_up_of_the_dependency_ends_the_wait_at_once() {
        let dep = gate("db");
        let start = Instant::now();
        let failures = dep.wake().failures();
        let waiting = tokio::spawn({
            let dep = dep.clone();
            async move { ready(&dep, start + Duration::from_secs(60), failures).await }
        });
        tokio::task::yield_now().await;
        dep.wake().abort("failed");
        assert_eq!(waiting.await.unwrap(), Err("failed to start"));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_at_the_deadline() {
        let dep = gate("db");
        let start = Instant::now();
        let r = ready(&dep, start + Duration::from_secs(3), 0).await;
        assert_eq!(r, Err("was not ready within the hold timeout"));
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }
}
