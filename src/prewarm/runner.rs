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
use super::schedule::minus;
use super::store::Store;
use super::{lead, Context, Source, HORIZON, MAX_SLEEP};
use crate::config::Prewarm;
use crate::gate::{AwakeGuard, Gate};
use crate::telemetry::metrics::Metrics;

/// How often a learning service's request count is sampled.
pub const SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// One service's pre-warm task.
pub struct Runner {
    gate: Arc<Gate>,
    cfg: Prewarm,
    ctx: Context,
    metrics: Metrics,
    idle_timeout: std::time::Duration,
}

/// A span being kept up.
struct Active {
    _guard: AwakeGuard,
    span: Awake,
    requests_before: u64,
    since: Instant,
}

/// What a learning runner saw of the requests.
#[derive(Default)]
struct Seen {
    total: u64,
    last_request: Option<Timestamp>,
}

impl Runner {
    /// A runner for `gate`'s service with settings `cfg`; `idle_timeout` is the service's
    /// (a request after that long without one is a start of activity, for learning).
    pub fn new(
        gate: Arc<Gate>,
        cfg: Prewarm,
        ctx: Context,
        metrics: Metrics,
        idle_timeout: std::time::Duration,
    ) -> Self {
        Runner {
            gate,
            cfg,
            ctx,
            metrics,
            idle_timeout,
        }
    }

    /// Starts the task; it ends when the handle is dropped.
    pub fn spawn(self) -> RunnerHandle {
        RunnerHandle(tokio::spawn(self.run()))
    }

    /// The store, when this service learns.
    fn store(&self) -> Option<&Arc<Store>> {
        self.ctx.store.as_ref().filter(|_| self.cfg.learn)
    }

    /// The next span to keep the service up for, current or to come.
    fn next_span(&self, now: Timestamp) -> Option<Awake> {
        let lead = lead(&self.cfg, Some(&self.gate));
        // From one lead plus a day back: a window under way (or its lead) is included.
        let back = minus(now, lead + std::time::Duration::from_secs(86_400));
        let span = HORIZON + lead + HORIZON_SLACK;
        let learned = self
            .ctx
            .learned(self.gate.name(), &self.cfg, now, back, span);
        let windows = plan(&self.cfg, &learned, back, span);
        awake_spans(&windows, lead)
            .into_iter()
            .find(|a| a.until > now)
    }

    async fn run(self) {
        let mut active: Option<Active> = None;
        let mut seen = Seen {
            total: self.gate.requests_total(),
            last_request: None,
        };
        loop {
            let now = self.ctx.clock.now();
            self.sample(now, &mut seen);
            if active.as_ref().is_some_and(|a| now >= a.span.until) {
                self.finish(active.take().expect("checked"));
            }
            let next = self.next_span(now);
            let wake_at = match (&active, next) {
                (Some(a), _) => a.span.until,
                (None, Some(span)) if span.from <= now => {
                    let until = span.until;
                    active = Some(self.begin(span));
                    until
                }
                (None, Some(span)) => span.from,
                (None, None) => far(now),
            };
            let left = wake_at.duration_since(now).unsigned_abs().min(MAX_SLEEP);
            let left = if self.store().is_some() {
                left.min(SAMPLE_INTERVAL)
            } else {
                left
            };
            tokio::time::sleep(left.max(std::time::Duration::from_millis(1))).await;
        }
    }

    /// Records the requests since the last sample (learning only).
    fn sample(&self, now: Timestamp, seen: &mut Seen) {
        let Some(store) = self.store() else { return };
        let total = self.gate.requests_total();
        let n = total.saturating_sub(seen.total);
        seen.total = total;
        if n == 0 {
            // A week ended with no request since: fold it in (and persist that).
            let week = super::learn::week_bucket(now).0;
            let stale = store.read(|h| {
                h.services
                    .get(self.gate.name().as_ref())
                    .is_some_and(|s| s.week < week)
            });
            if stale {
                store.update(|h| h.service(self.gate.name()).roll(now));
            }
            return;
        }
        let idle = jiff::SignedDuration::try_from(self.idle_timeout).unwrap_or_default();
        let start = seen
            .last_request
            .is_none_or(|l| now.duration_since(l) >= idle);
        seen.last_request = Some(now);
        store.record(self.gate.name(), now, start, n);
    }

    /// Starts keeping the service up for `span`; counts its windows.
    fn begin(&self, span: Awake) -> Active {
        let name = self.gate.name();
        for w in &span.windows {
            self.metrics.prewarm_window(name, w.source.as_str());
        }
        info!(service = %name, until = %span.until, windows = span.windows.len(), "pre-warming");
        Active {
            requests_before: self.gate.requests_total(),
            since: Instant::now(),
            _guard: self.gate.keep_awake(),
            span,
        }
    }

    /// Lets the service go after `a`'s span: hit or miss; a missed learned window loses weight.
    fn finish(&self, a: Active) {
        let name = self.gate.name().clone();
        let hit = self.gate.requests_total() > a.requests_before;
        self.metrics
            .prewarm_done(&name, hit, a.since.elapsed().as_secs_f64());
        info!(service = %name, hit, "pre-warm window over");
        if !hit {
            if let Some(store) = self.store() {
                let learned = a
                    .span
                    .windows
                    .iter()
                    .filter(|w| w.source == Source::Learned);
                for w in learned {
                    store.record_miss(&name, w.start, w.end);
                }
            }
        }
    }
}

/// Extra look-ahead so a window starting just past the horizon is still seen.
const HORIZON_SLACK: std::time::Duration = std::time::Duration::from_secs(3600);

fn far(now: Timestamp) -> Timestamp {
    now.checked_add(jiff::SignedDuration::from_secs(MAX_SLEEP.as_secs() as i64))
        .unwrap_or(Timestamp::MAX)
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
