//! Pre-warm metrics (see [`crate::prewarm`]): windows kept warm by source, whether a request
//! came in them, and the seconds spent warm for them.

use prometheus::{CounterVec, IntCounterVec, Opts, Registry};

use super::must;

/// The pre-warm families.
pub struct PrewarmMetrics {
    total: IntCounterVec,
    hits: IntCounterVec,
    misses: IntCounterVec,
    seconds: CounterVec,
}

impl PrewarmMetrics {
    /// Creates and registers the families in `registry`.
    pub(super) fn new(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let seconds = must(CounterVec::new(
            Opts::new(
                "reveille_prewarm_seconds_total",
                "Seconds services were kept up for pre-warm windows (lead included).",
            ),
            &["service"],
        ));
        must(registry.register(Box::new(seconds.clone())));
        PrewarmMetrics {
            total: counter(
                "reveille_prewarm_total",
                "Pre-warm windows begun, by source (schedule, learned).",
                &["service", "source"],
            ),
            hits: counter(
                "reveille_prewarm_hits_total",
                "Pre-warm windows in which a request came before the window ended.",
                &["service"],
            ),
            misses: counter(
                "reveille_prewarm_misses_total",
                "Pre-warm windows that ended with no request.",
                &["service"],
            ),
            seconds,
        }
    }

    pub(super) fn forget(&self, service: &str) {
        for source in ["schedule", "learned"] {
            let _ = self.total.remove_label_values(&[service, source]);
        }
        let _ = self.hits.remove_label_values(&[service]);
        let _ = self.misses.remove_label_values(&[service]);
        let _ = self.seconds.remove_label_values(&[service]);
    }
}

impl super::Metrics {
    /// Counts a pre-warm window begun.
    pub fn prewarm_window(&self, service: &str, source: &'static str) {
        self.prewarm
            .total
            .with_label_values(&[service, source])
            .inc();
    }

    /// Counts a pre-warm span's end: whether a request came, and the seconds it was kept up.
    pub fn prewarm_done(&self, service: &str, hit: bool, seconds: f64) {
        let c = if hit {
            &self.prewarm.hits
        } else {
            &self.prewarm.misses
        };
        c.with_label_values(&[service]).inc();
        self.prewarm
            .seconds
            .with_label_values(&[service])
            .inc_by(seconds);
    }
}
