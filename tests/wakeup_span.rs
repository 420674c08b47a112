//! A wake-up is one `wakeup` tracing span with an event per milestone.

use std::time::Duration;

use reveille::telemetry::metrics::Metrics;
use reveille::telemetry::wake::{Phase, WakeTracker};

/// Log output captured in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn milestones_are_events_of_one_wakeup_span() {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The only test in this binary, so a global subscriber: with a scoped one, tests running
    // beside it could register the callsites first and cache "no interest".
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let m = Metrics::new();
    let s = m.service("svc");
    let t = WakeTracker::new();
    t.begin("svc", 2);
    for phase in Phase::ALL {
        tokio::time::advance(Duration::from_millis(5)).await;
        t.mark(phase, &s);
    }
    let text = String::from_utf8(out.0.lock().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    for line in &lines {
        assert!(line.contains("wakeup{service=\"svc\" held=2}"), "{line}");
    }
    assert!(
        lines[1].contains("phase=\"scale_accepted\" ms=5"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("phase=\"endpoint_ready\" ms=10"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].contains("phase=\"first_forwarded\" ms=15"),
        "{}",
        lines[3]
    );
}
