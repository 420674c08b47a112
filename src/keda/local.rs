//! This replica's own counts per service: held, in flight, the monotonic request total, and the
//! request rate over a sliding window. Peers read these (admin `/api/local`); the [`Cluster`]
//! adds them up.
//!
//! [`Cluster`]: super::Cluster

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use tokio::time::Instant;

use crate::cluster::peers::{LocalCounts, ServiceCounts};
use crate::gate::Gate;

/// How often the request totals are sampled for the rate.
pub const RATE_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Request totals sampled over a window; the rate is the growth across it. Equal samples in a
/// row are kept as one run (first and last time seen), so an idle service, the common case
/// among thousands, keeps one run rather than a sample per second of the window.
#[derive(Debug)]
pub struct RateTracker {
    window: Duration,
    /// `(first seen, last seen, total)`, oldest first.
    samples: VecDeque<(Instant, Instant, u64)>,
}

impl RateTracker {
    /// An empty tracker over `window`.
    pub fn new(window: Duration) -> Self {
        RateTracker {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Adds a sample of the monotonic total, dropping samples the window no longer needs (one
    /// at or before the window's start is kept as the baseline).
    pub fn sample(&mut self, now: Instant, total: u64) {
        match self.samples.back_mut() {
            Some((_, last, t)) if *t == total => *last = now,
            _ => self.samples.push_back((now, now, total)),
        }
        let start = now.checked_sub(self.window).unwrap_or(now);
        while self.samples.len() > 1 && self.samples[1].0 <= start {
            self.samples.pop_front();
        }
        if self.samples.len() < self.samples.capacity() / 4 {
            self.samples.shrink_to(self.samples.len() * 2);
        }
    }

    /// Requests per second from the window's start (or the oldest sample, when younger) to
    /// `total` now.
    pub fn rate(&self, now: Instant, total: u64) -> f64 {
        let Some(&(first, last, c0)) = self.samples.front() else {
            return 0.0;
        };
        // The total was `c0` from `first` through `last`: the baseline is the latest moment
        // known to have it, no later than the window's start.
        let start = now.checked_sub(self.window).unwrap_or(now);
        let t0 = start.clamp(first, last.max(first));
        let secs = now.saturating_duration_since(t0).as_secs_f64();
        if secs < 1e-3 {
            return 0.0;
        }
        total.saturating_sub(c0) as f64 / secs
    }
}

struct Entry {
    gate: Arc<Gate>,
    rate: Mutex<RateTracker>,
}

/// The local services and their rate trackers; replaced whole when services are reloaded.
pub struct Local {
    services: ArcSwap<BTreeMap<Arc<str>, Arc<Entry>>>,
    window: Duration,
    /// Bumped by every [`Local::sync`], so a long-lived KEDA stream can follow a service whose
    /// gate a reload replaced.
    generation: tokio::sync::watch::Sender<u64>,
}

impl Local {
    /// Tracks `gates` with a rate over `window`.
    pub fn new(gates: &[Arc<Gate>], window: Duration) -> Self {
        let local = Local {
            services: ArcSwap::from_pointee(BTreeMap::new()),
            window,
            generation: tokio::sync::watch::channel(0).0,
        };
        local.sync(gates);
        local
    }

    /// Tracks exactly `gates` from now on, keeping the rate history of gates it already had.
    pub fn sync(&self, gates: &[Arc<Gate>]) {
        let now = Instant::now();
        let old = self.services.load();
        let services = gates
            .iter()
            .map(|g| {
                let entry = match old.get(g.name().as_ref()) {
                    Some(e) if Arc::ptr_eq(&e.gate, g) => e.clone(),
                    _ => {
                        let mut rate = RateTracker::new(self.window);
                        rate.sample(now, g.requests_total());
                        Arc::new(Entry {
                            gate: g.clone(),
                            rate: Mutex::new(rate),
                        })
                    }
                };
                (g.name().clone(), entry)
            })
            .collect();
        self.services.store(Arc::new(services));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes whenever the set of services (or one's gate) may have changed.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The gate of a local service.
    pub fn gate(&self, service: &str) -> Option<Arc<Gate>> {
        self.services.load().get(service).map(|e| e.gate.clone())
    }

    /// The names of every local service.
    pub fn names(&self) -> Vec<String> {
        self.services.load().keys().map(|k| k.to_string()).collect()
    }

    /// One service's counts now.
    pub fn counts(&self, service: &str) -> Option<ServiceCounts> {
        self.services.load().get(service).map(|e| entry_counts(e))
    }

    /// Every service's counts now.
    pub fn all(&self) -> LocalCounts {
        LocalCounts {
            services: self
                .services
                .load()
                .iter()
                .map(|(k, e)| (k.to_string(), entry_counts(e)))
                .collect(),
        }
    }

    /// Takes one rate sample of every service.
    pub fn sample(&self) {
        let now = Instant::now();
        for e in self.services.load().values() {
            e.rate.lock().sample(now, e.gate.requests_total());
        }
    }

    /// Samples every [`RATE_SAMPLE_INTERVAL`] until `stop` turns true.
    pub async fn run_sampler(self: Arc<Self>, mut stop: crate::shutdown::Signal) {
        let mut tick = tokio::time::interval(RATE_SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sample(),
                _ = stop.fired() => return,
            }
        }
    }
}

fn entry_counts(e: &Entry) -> ServiceCounts {
    let total = e.gate.requests_total();
    ServiceCounts {
        held: e.gate.held() as u64,
        in_flight: e.gate.in_flight() as u64,
        requests_total: total,
        rate: e.rate.lock().rate(Instant::now(), total),
        holds_total: e.gate.holds_total(),
        idle_for_ms: Some(e.gate.idle_for().as_millis() as u64),
        rolling_out: e.gate.rolling_out(),
        kept_awake: e.gate.kept_awake(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_is_growth_over_the_window() {
        let mut r = RateTracker::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.rate(t0, 0), 0.0);
        r.sample(t0, 0);
        // 5 requests per second for 20 s, sampled every second.
        for s in 1..=20u64 {
            r.sample(t0 + Duration::from_secs(s), s * 5);
        }
        let now = t0 + Duration::from_secs(20);
        assert!((r.rate(now, 100) - 5.0).abs() < 1e-9);
        // Only the window's samples (plus the baseline) are kept.
        assert!(r.samples.len() <= 12, "{}", r.samples.len());
        // Traffic stops: the rate decays to 0 once the window has passed.
        for s in 21..=31u64 {
            r.sample(t0 + Duration::from_secs(s), 100);
        }
        assert_eq!(r.rate(t0 + Duration::from_secs(31), 100), 0.0);
        // Idle for long: one run is kept, however long.
        for s in 32..=200u64 {
            r.sample(t0 + Duration::from_secs(s), 100);
        }
        assert_eq!(r.samples.len(), 1);
        assert!(r.samples.capacity() <= 8, "{}", r.samples.capacity());
        // Traffic again: 3 requests per second over the last 10 s.
        for s in 201..=210u64 {
            r.sample(t0 + Duration::from_secs(s), 100 + (s - 200) * 3);
        }
        let rate = r.rate(t0 + Duration::from_secs(210), 130);
        assert!((rate - 3.0).abs() < 1e-9, "{rate}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_of_equal_samples_gives_the_same_rate_as_every_sample() {
        // A burst, then idle: the run-length tracker must agree with the growth over the
        // window's span as sampled every second.
        let mut r = RateTracker::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let totals = [
            0u64, 0, 0, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 55, 55, 55,
        ];
        for (s, t) in totals.iter().enumerate() {
            r.sample(t0 + Duration::from_secs(s as u64), *t);
        }
        // At 16 s the window starts at 6 s, where the total was 40: 15 requests over 10 s.
        let rate = r.rate(t0 + Duration::from_secs(16), 55);
        assert!((rate - 1.5).abs() < 1e-9, "{rate}");
    }
}
