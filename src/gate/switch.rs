//! Version switch and pause: a switch holds new requests while the old version's requests in
//! flight finish, installs the new endpoints, then lets the held requests go to them. Also the
//! rest of a controlled rollout's state on the gate: whether one is under way (the service
//! counts as active), its report for the admin API, and the candidate reachable on purpose
//! (see [`super::candidate`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use super::candidate::Candidate;
use super::{Gate, RolloutReport};

/// A gate's switch and rollout state.
pub(super) struct Switch {
    /// While set, new requests are held and no permit is handed out (a version switch waits
    /// for the old version's requests in flight); see [`Gate::switch_endpoints`].
    paused: AtomicBool,
    /// A controlled rollout is validating or switching: the service counts as active.
    rolling_out: AtomicBool,
    /// The rollout's state for the admin API (`None`: no `rollout:` configured).
    report: ArcSwapOption<RolloutReport>,
    /// A candidate awaiting promotion, reachable on purpose with a header.
    pub(super) candidate: ArcSwapOption<Candidate>,
}

impl Switch {
    pub(super) fn new() -> Self {
        Switch {
            paused: AtomicBool::new(false),
            rolling_out: AtomicBool::new(false),
            report: ArcSwapOption::empty(),
            candidate: ArcSwapOption::empty(),
        }
    }

    /// Whether a switch holds every request now.
    pub(super) fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
}

impl Gate {
    /// Switches to a new set of endpoints so that no request starts on the old set after one
    /// has started on the new: new requests are held, requests in flight (all on the old set)
    /// get up to `quiesce` to finish, then the new set is installed and the held requests go
    /// to it in arrival order. True when the old requests finished within `quiesce`.
    pub async fn switch_endpoints(
        self: &Arc<Self>,
        addrs: &[std::net::SocketAddr],
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
                self.0.switch.paused.store(false, Ordering::SeqCst);
                self.0.dispatch();
            }
        }
        self.switch.paused.store(true, Ordering::SeqCst);
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
        if self.switch.rolling_out.swap(on, Ordering::SeqCst) != on {
            self.activity.nudge();
        }
    }

    /// Whether a controlled rollout is validating or switching.
    pub fn rolling_out(&self) -> bool {
        self.switch.rolling_out.load(Ordering::SeqCst)
    }

    /// Publishes the rollout's state for the admin API.
    pub fn set_rollout_report(&self, report: RolloutReport) {
        self.switch.report.store(Some(Arc::new(report)));
    }

    /// The rollout's state (`None`: no `rollout:` configured); shared, not copied.
    pub fn rollout_report(&self) -> Option<Arc<RolloutReport>> {
        self.switch.report.load_full()
    }
}
