//! Observations not yet in the shared history (Kubernetes with `coordination:`): each replica
//! records its starts of activity and request counts here as well as in its own view, and
//! hands them to the ConfigMap ([`super::configmap`]) in batches, each with a sequence number so
//! a batch is counted once even when a write's outcome was unknown.
//!
//! A batch is folded into a [`History`] with [`fold`]: a week still being recorded takes the
//! starts (a set: two replicas seeing a start in the same bucket is one start) and adds the
//! counts; a week already folded in is corrected as if the batch had come in time.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::learn::{week_bucket, week_start, History, ServiceHistory, ALPHA};

/// One week's observations of one service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct WeekDelta {
    /// Buckets with a start of activity.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub starts: BTreeSet<u16>,
    /// Requests per bucket.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<u16, u64>,
}

/// A batch of observations: by service, then by week (weeks since Monday 1970-01-05 UTC).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Delta {
    /// The batch's sequence number (Unix milliseconds when it was taken, increasing).
    #[serde(default)]
    pub seq: u64,
    /// The observations.
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<i64, WeekDelta>>,
}

impl Delta {
    /// Whether there is nothing in it.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    fn week(&mut self, service: &str, t: Timestamp) -> (&mut WeekDelta, u16) {
        let (week, bucket) = week_bucket(t);
        let w = self
            .services
            .entry(service.to_string())
            .or_default()
            .entry(week)
            .or_default();
        (w, bucket)
    }

    /// A start of activity at `t`.
    pub fn start(&mut self, service: &str, t: Timestamp) {
        let (w, b) = self.week(service, t);
        w.starts.insert(b);
    }

    /// `n` requests at `t`.
    pub fn requests(&mut self, service: &str, t: Timestamp, n: u64) {
        let (w, b) = self.week(service, t);
        *w.requests.entry(b).or_default() += n;
    }

    /// Adds `other`'s observations (the sequence number becomes the larger one).
    pub fn absorb(&mut self, other: &Delta) {
        self.seq = self.seq.max(other.seq);
        for (service, weeks) in &other.services {
            let mine = self.services.entry(service.clone()).or_default();
            for (week, w) in weeks {
                let m = mine.entry(*week).or_default();
                m.starts.extend(w.starts.iter().copied());
                for (b, n) in &w.requests {
                    *m.requests.entry(*b).or_default() += n;
                }
            }
        }
    }
}

/// A learned window (service, start, end) that saw no request on this replica.
pub(crate) type Miss = (String, Timestamp, Timestamp);

/// What a replica observed that the shared history may not have yet.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    /// Observations since the last batch was taken.
    pub delta: Delta,
    /// The batch being written (kept until the ConfigMap is seen to have it).
    pub inflight: Option<Delta>,
    /// Missed learned windows (the holder applies them once every replica's counts are in).
    pub misses: Vec<Miss>,
}

impl Journal {
    /// The batch to write: the one in flight, or the observations so far under a new sequence
    /// number above `last` (and above every earlier one).
    pub fn batch(&mut self, now_ms: u64, last: u64) -> Option<Delta> {
        if self.inflight.is_none() && !self.delta.is_empty() {
            let mut d = std::mem::take(&mut self.delta);
            d.seq = now_ms.max(last + 1);
            self.inflight = Some(d);
        }
        self.inflight.clone()
    }
}

/// Folds `delta` into `history`.
pub(crate) fn fold(history: &mut History, delta: &Delta) {
    for (service, weeks) in &delta.services {
        let h = history.service(service);
        for (week, w) in weeks {
            fold_week(h, *week, w);
        }
    }
}

/// Folds one week's observations into `h`: into the current week (rolling forward first when
/// the week is newer), or, for a week already folded in, as that fold would have counted them.
fn fold_week(h: &mut ServiceHistory, week: i64, w: &WeekDelta) {
    let fresh = h.weeks_seen == 0 && h.buckets.is_empty() && h.week == 0;
    if fresh || week > h.week {
        h.roll(week_start(week));
    }
    if week >= h.week {
        h.this_week.extend(w.starts.iter().copied());
        for (b, n) in &w.requests {
            *h.requests_this_week.entry(*b).or_default() += n;
        }
        return;
    }
    // Folded `k` weeks before the newest fold: its share of a weight is ALPHA * (1-ALPHA)^k.
    let k = h.week - 1 - week;
    if k >= 16 {
        return;
    }
    let share = ALPHA * (1.0 - ALPHA).powi(k as i32);
    let bit = if k < 8 { 1u8 << k } else { 0 };
    for b in &w.starts {
        let bucket = h.buckets.entry(*b).or_default();
        if bucket.recent & bit == 0 {
            bucket.weight += share;
            bucket.recent |= bit;
        }
    }
    for (b, n) in &w.requests {
        h.buckets.entry(*b).or_default().requests += share * *n as f64;
    }
}

/// Whether `history` has any request counted for `service` in `[start, end)` of its current
/// week (a pre-warmed window somebody used).
pub(crate) fn requests_in(
    history: &History,
    service: &str,
    start: Timestamp,
    end: Timestamp,
) -> bool {
    let Some(h) = history.services.get(service) else {
        return false;
    };
    let mut t = start;
    while t < end {
        let (week, b) = week_bucket(t);
        if week == h.week && h.requests_this_week.get(&b).is_some_and(|n| *n > 0) {
            return true;
        }
        t += jiff::SignedDuration::from_mins(super::learn::BUCKET_MINUTES);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// The history a single replica would have recorded from `events` (start?, time, n).
    fn direct(events: &[(bool, &str, u64)], until: &str) -> History {
        let mut h = History::new();
        for (start, t, n) in events {
            let s = h.service("a");
            if *start {
                s.start(ts(t));
            }
            s.requests(ts(t), *n);
        }
        h.service("a").roll(ts(until));
        h
    }

    fn delta(events: &[(bool, &str, u64)]) -> Delta {
        let mut d = Delta::default();
        for (start, t, n) in events {
            if *start {
                d.start("a", ts(t));
            }
            d.requests("a", ts(t), *n);
        }
        d
    }

    #[test]
    fn a_delta_folded_in_time_or_late_counts_as_if_recorded_directly() {
        let events = [
            (true, "2026-11-02T08:05:00Z", 3),
            (true, "2026-11-09T08:07:00Z", 2),
            (false, "2026-11-09T08:20:00Z", 1),
            (true, "2026-11-16T08:01:00Z", 4),
        ];
        let want = direct(&events, "2026-11-30T00:00:00Z");
        // In time: folded week by week.
        let mut h = History::new();
        for e in &events {
            fold(&mut h, &delta(&[*e]));
        }
        h.service("a").roll(ts("2026-11-30T00:00:00Z"));
        assert_eq!(h, want);
        // Late: the second week arrives after the history rolled past it.
        let mut h = History::new();
        fold(&mut h, &delta(&events[..1]));
        fold(&mut h, &delta(&events[3..]));
        fold(&mut h, &delta(&events[1..3]));
        h.service("a").roll(ts("2026-11-30T00:00:00Z"));
        let (got, want) = (&h.services["a"], &want.services["a"]);
        assert_eq!(
            got.buckets.keys().collect::<Vec<_>>(),
            want.buckets.keys().collect::<Vec<_>>()
        );
        for (b, w) in &want.buckets {
            let g = &got.buckets[b];
            assert!(
                (g.weight - w.weight).abs() < 1e-9,
                "bucket {b}: {g:?} vs {w:?}"
            );
            assert!(
                (g.requests - w.requests).abs() < 1e-9,
                "bucket {b}: {g:?} vs {w:?}"
            );
            assert_eq!(g.recent, w.recent, "bucket {b}");
        }
    }

    #[test]
    fn starts_are_a_set_and_counts_add_up() {
        let t = "2026-11-02T08:05:00Z";
        let mut a = delta(&[(true, t, 2)]);
        a.seq = 5;
        let mut b = delta(&[(true, t, 3)]);
        b.seq = 9;
        a.absorb(&b);
        assert_eq!(a.seq, 9);
        let mut h = History::new();
        fold(&mut h, &a);
        let s = &h.services["a"];
        assert_eq!(s.this_week.len(), 1);
        assert_eq!(s.requests_this_week.values().sum::<u64>(), 5);
        assert!(requests_in(
            &h,
            "a",
            ts(t),
            ts(t) + SignedDuration::from_mins(15)
        ));
        assert!(!requests_in(
            &h,
            "a",
            ts("2026-11-02T09:00:00Z"),
            ts("2026-11-02T10:00:00Z")
        ));
        let text = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Delta>(&text).unwrap(), a);
    }
}
