//! The per-service pre-warm task: follows the service's plan on the [`Clock`] and keeps its
//! gate awake from `lead` before each window until the window ends. It counts each window
//! (`reveille_prewarm_total{source}`), whether a request came in it (hits and misses), and the
//! seconds spent warm for it.
//!
//! [`Clock`]: super::Clock

use std::sync::Arc;

use jiff::Timestamp;
use tokio::time::Instant;
use tracing::info;

use super::plan::{awake_spans, plan, Awake};
use super::{lead, Context, HORIZON, MAX_SLEEP};
use crate::config::Prewarm;
use crate::gate::Gate;
use crate::metrics::Metrics;

/// One service's pre-warm task.
pub struct Runner {
    gate: Arc<Gate>,
    cfg: Prewarm,
    ctx: Context,
    metrics: Metrics,
}

impl Runner {
    /// A runner for `gate`'s service with settings `cfg`.
    pub fn new(gate: Arc<Gate>, cfg: Prewarm, ctx: Context, metrics: Metrics) -> Self {
        Runner {
            gate,
            cfg,
            ctx,
            metrics,
        }
    }

    /// Starts the task; it ends when the handle is dropped.
    pub fn spawn(self) -> RunnerHandle {
        RunnerHandle(tokio::spawn(self.run()))
    }

    /// The next span to keep the service up for, current or to come.
    fn next_span(&self, now: Timestamp) -> Option<Awake> {
        let lead = lead(&self.cfg, Some(&self.gate));
        // From one lead plus a day back: a window under way (or its lead) is included.
        let back = super::schedule::minus(now, lead + std::time::Duration::from_secs(86_400));
        let windows = plan(&self.cfg, &[], back, HORIZON + lead + HORIZON_SLACK);
        awake_spans(&windows, lead)
            .into_iter()
            .find(|a| a.until > now)
    }

    async fn run(self) {
        loop {
            let now = self.ctx.clock.now();
            let Some(span) = self.next_span(now) else {
                sleep_until(&*self.ctx.clock, far(now)).await;
                continue;
            };
            if span.from > now {
                sleep_until(&*self.ctx.clock, span.from).await;
                continue;
            }
            self.keep_up(span).await;
        }
    }

    /// Keeps the service up until the span ends; counts its windows.
    async fn keep_up(&self, span: Awake) {
        let name = self.gate.name().clone();
        for w in &span.windows {
            self.metrics.prewarm_window(&name, w.source.as_str());
        }
        info!(service = %name, until = %span.until, windows = span.windows.len(), "pre-warming");
        let before = self.gate.requests_total();
        let since = Instant::now();
        let guard = self.gate.keep_awake();
        sleep_until(&*self.ctx.clock, span.until).await;
        drop(guard);
        let hit = self.gate.requests_total() > before;
        self.metrics
            .prewarm_done(&name, hit, since.elapsed().as_secs_f64());
        info!(service = %name, hit, "pre-warm window over");
    }
}

/// Extra look-ahead so a window starting just past the horizon is still seen.
const HORIZON_SLACK: std::time::Duration = std::time::Duration::from_secs(3600);

fn far(now: Timestamp) -> Timestamp {
    now.checked_add(jiff::SignedDuration::from_secs(MAX_SLEEP.as_secs() as i64))
        .unwrap_or(Timestamp::MAX)
}

/// Sleeps (tokio time) until the clock reads `t`, reading it again at least every
/// [`MAX_SLEEP`].
pub async fn sleep_until(clock: &dyn super::Clock, t: Timestamp) {
    loop {
        let now = clock.now();
        if now >= t {
            return;
        }
        let left = t.duration_since(now).unsigned_abs();
        tokio::time::sleep(left.min(MAX_SLEEP)).await;
    }
}

/// Owns a runner's task: dropping it ends the task (and releases what it kept awake).
#[derive(Debug)]
pub struct RunnerHandle(tokio::task::JoinHandle<()>);

impl Drop for RunnerHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests;
