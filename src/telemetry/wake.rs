//! Cold-start timing: for every wake-up of a service, the time from the wake call to three
//! milestones, as histograms (`reveille_wakeup_seconds{phase}`) and as events of one tracing
//! span (`wakeup`), so a slow cold start can be taken apart:
//!
//! 1. `scale_accepted`: the platform took the scale call (process backend: the child spawned).
//! 2. `endpoint_ready`: the first endpoint passed its readiness check.
//! 3. `first_forwarded`: the first held request got its endpoint slot and goes upstream.
//!
//! The scaler driver calls [`WakeTracker::begin`] and the first two milestones; the gate records
//! the third when a request held through the cold start is let go. Each milestone counts once
//! per wake-up; a failed wake-up ([`WakeTracker::abort`]) records nothing more.

use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::{info, Span};

use crate::telemetry::metrics::ServiceMetrics;

/// A milestone of a wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The scale call was accepted (process backend: the child was spawned).
    ScaleAccepted = 0,
    /// The first endpoint became ready.
    EndpointReady = 1,
    /// The first held request was forwarded.
    FirstForwarded = 2,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 3] = [
        Phase::ScaleAccepted,
        Phase::EndpointReady,
        Phase::FirstForwarded,
    ];

    /// The phase's name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::ScaleAccepted => "scale_accepted",
            Phase::EndpointReady => "endpoint_ready",
            Phase::FirstForwarded => "first_forwarded",
        }
    }
}

struct Wake {
    started: Instant,
    span: Span,
    done: [bool; 3],
}

/// Successful wake-ups whose durations are kept for [`WakeTracker::p90`].
pub const COLD_STARTS_KEPT: usize = 32;

/// The timer of a service's current wake-up, if one is under way, and the durations of the
/// last [`COLD_STARTS_KEPT`] successful ones.
#[derive(Default)]
pub struct WakeTracker {
    current: Mutex<Option<Box<Wake>>>,
    recent: Mutex<std::collections::VecDeque<std::time::Duration>>,
    failed: std::sync::atomic::AtomicU64,
    /// Told when a wake-up ends early (waiters such as a dependent's wake-up look again).
    ended: tokio::sync::Notify,
}

impl WakeTracker {
    /// No wake-up under way.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts timing a wake-up now; its milestones are events of the returned `wakeup` span.
    pub fn begin(&self, service: &str, held: usize) -> Span {
        let span = tracing::info_span!("wakeup", service, held);
        span.in_scope(|| info!("wake-up started"));
        *self.current.lock() = Some(Box::new(Wake {
            started: Instant::now(),
            span: span.clone(),
            done: [false; 3],
        }));
        span
    }

    /// Records a milestone of the current wake-up (once; later calls are ignored).
    pub fn mark(&self, phase: Phase, metrics: &ServiceMetrics) {
        let mut cur = self.current.lock();
        let Some(w) = cur.as_mut() else { return };
        if w.done[phase as usize] {
            return;
        }
        let seconds = w.started.elapsed().as_secs_f64();
        // A request can only be forwarded to a ready endpoint. When the endpoint watch fed the
        // gate before the driver noticed, the forward comes first here: record both at once
        // rather than lose the ready milestone (the forward ends the wake-up).
        let mut phases = vec![phase];
        if phase == Phase::FirstForwarded && !w.done[Phase::EndpointReady as usize] {
            phases.insert(0, Phase::EndpointReady);
        }
        for phase in phases {
            w.done[phase as usize] = true;
            metrics.wake_phase(phase, seconds);
            w.span.in_scope(|| {
                info!(
                    phase = phase.as_str(),
                    ms = (seconds * 1e6).round() / 1e3,
                    "wake-up milestone"
                )
            });
        }
        if phase == Phase::FirstForwarded {
            // The last milestone: the span closes when its last clone is dropped.
            *cur = None;
        }
    }

    /// Called by the gate when a request held through a cold start is let go.
    pub fn first_forwarded(&self, metrics: &ServiceMetrics) {
        // Cheap check first: this runs for every held request of a cold start.
        if self.current.lock().is_some() {
            self.mark(Phase::FirstForwarded, metrics);
        }
    }

    /// Resolves at the next early end of a wake-up ([`WakeTracker::abort`]); enable it before
    /// looking at [`WakeTracker::failures`] so no end falls between.
    pub fn ended_early(&self) -> tokio::sync::futures::Notified<'_> {
        self.ended.notified()
    }

    /// Wake-ups that ended early for another reason than a shutdown (monotonic).
    pub fn failures(&self) -> u64 {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ends the current wake-up without further milestones (it failed or was cancelled).
    pub fn abort(&self, reason: &str) {
        if reason != "shutdown" {
            self.failed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.ended.notify_waiters();
        if let Some(w) = self.current.lock().take() {
            w.span.in_scope(|| info!(reason, "wake-up ended early"));
        }
    }

    /// Keeps a successful wake-up's duration (the oldest of [`COLD_STARTS_KEPT`] goes).
    pub fn record(&self, took: std::time::Duration) {
        let mut r = self.recent.lock();
        if r.len() == COLD_STARTS_KEPT {
            r.pop_front();
        }
        r.push_back(took);
    }

    /// The 90th percentile of the kept wake-up durations (nearest rank); `None` before any.
    pub fn p90(&self) -> Option<std::time::Duration> {
        let mut v: Vec<_> = self.recent.lock().iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let rank = (v.len() * 9).div_ceil(10).max(1);
        Some(v[rank - 1])
    }

    /// Whether a wake-up is being timed.
    pub fn in_progress(&self) -> bool {
        self.current.lock().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn records_each_phase_once_then_closes() {
        let m = Metrics::new();
        let s = m.service("svc");
        let t = WakeTracker::new();
        t.mark(Phase::ScaleAccepted, &s); // no wake-up: ignored
        t.begin("svc", 1);
        tokio::time::advance(Duration::from_millis(10)).await;
        t.mark(Phase::ScaleAccepted, &s);
        t.mark(Phase::ScaleAccepted, &s); // second time: ignored
        tokio::time::advance(Duration::from_millis(990)).await;
        t.mark(Phase::EndpointReady, &s);
        tokio::time::advance(Duration::from_millis(1)).await;
        t.first_forwarded(&s);
        t.first_forwarded(&s); // later held requests: ignored
        assert!(!t.in_progress());
        let text = m.render();
        for phase in ["scale_accepted", "endpoint_ready", "first_forwarded"] {
            let line =
                format!("reveille_wakeup_seconds_count{{phase=\"{phase}\",service=\"svc\"}} 1");
            assert!(text.contains(&line), "missing {line} in {text}");
        }
        // 10 ms lands in the 0.01 bucket; the ready time (1 s) does not.
        assert!(text.contains(
            "reveille_wakeup_seconds_bucket{phase=\"scale_accepted\",service=\"svc\",le=\"0.01\"} 1"
        ));
        assert!(text.contains(
            "reveille_wakeup_seconds_bucket{phase=\"endpoint_ready\",service=\"svc\",le=\"0.5\"} 0"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn abort_records_nothing_more() {
        let m = Metrics::new();
        let s = m.service("svc");
        let t = WakeTracker::new();
        t.begin("svc", 1);
        t.mark(Phase::ScaleAccepted, &s);
        t.abort("failed");
        t.mark(Phase::EndpointReady, &s);
        let text = m.render();
        assert!(text
            .contains("reveille_wakeup_seconds_count{phase=\"scale_accepted\",service=\"svc\"} 1"));
        assert!(!text.contains("phase=\"endpoint_ready\",service=\"svc\"} 1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_forward_seen_before_ready_records_ready_too() {
        let m = Metrics::new();
        let s = m.service("svc");
        let t = WakeTracker::new();
        t.begin("svc", 1);
        tokio::time::advance(Duration::from_millis(7)).await;
        t.first_forwarded(&s);
        t.mark(Phase::EndpointReady, &s); // the driver noticing late: ignored
        let text = m.render();
        for phase in ["endpoint_ready", "first_forwarded"] {
            let line =
                format!("reveille_wakeup_seconds_count{{phase=\"{phase}\",service=\"svc\"}} 1");
            assert!(text.contains(&line), "missing {line} in {text}");
        }
        assert!(!t.in_progress());
    }
}
