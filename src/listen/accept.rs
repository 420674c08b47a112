//! What every listener (proxy, TLS, admin, KEDA) does when `accept` fails: back off.
//!
//! A failed `accept` (EMFILE or ENFILE when file descriptors run out, ENOBUFS, ENOMEM) leaves
//! the pending connection in the kernel's queue, so the listener stays readable and an
//! immediate retry fails again: a loop that retries at once spins a core and floods the log.
//! The pause starts at [`FIRST_PAUSE`] and doubles up to [`MAX_PAUSE`]; the next success resets
//! it. Every failure is counted in `reveille_accept_errors_total{listener}`; the log says so at
//! most once per [`LOG_EVERY`], with how many it did not say.

use std::io;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::telemetry::metrics::Metrics;

/// The pause after a first failure.
pub const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause between two tries.
pub const MAX_PAUSE: Duration = Duration::from_secs(1);
/// At most one log line per listener this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One listener's backoff after accept failures.
pub(crate) struct AcceptBackoff {
    listener: &'static str,
    metrics: Metrics,
    pause: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl AcceptBackoff {
    /// For the listener named `listener` (a bounded label value: `proxy`, `tls`, `admin`,
    /// `keda`).
    pub(crate) fn new(listener: &'static str, metrics: Metrics) -> Self {
        AcceptBackoff {
            listener,
            metrics,
            pause: FIRST_PAUSE,
            last_log: None,
            unlogged: 0,
        }
    }

    /// A connection was accepted: the next failure pauses briefly again.
    pub(crate) fn accepted(&mut self) {
        self.pause = FIRST_PAUSE;
    }

    /// Counts the failure, logs it (rate-limited), and pauses before the next try.
    pub(crate) async fn failed(&mut self, error: &io::Error) {
        self.metrics.accept_error(self.listener);
        let now = Instant::now();
        if self.last_log.is_none_or(|at| now - at >= LOG_EVERY) {
            warn!(
                listener = self.listener,
                %error,
                pause_ms = self.pause.as_millis() as u64,
                not_logged = self.unlogged,
                "accept failed; backing off"
            );
            self.last_log = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(24)
    }

    #[tokio::test(start_paused = true)]
    async fn pauses_double_up_to_a_second_and_a_success_resets_them() {
        let metrics = Metrics::new();
        let mut b = AcceptBackoff::new("admin", metrics.clone());
        let mut pauses = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            b.failed(&emfile()).await;
            pauses.push(t.elapsed().as_millis());
        }
        assert_eq!(
            pauses,
            [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000],
            "pauses in ms"
        );
        b.accepted();
        let t = Instant::now();
        b.failed(&emfile()).await;
        assert_eq!(t.elapsed(), FIRST_PAUSE);
        let text = metrics.render();
        assert!(
            text.contains("reveille_accept_errors_total{listener=\"admin\"} 11"),
            "{text}"
        );
    }
}
