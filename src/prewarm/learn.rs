//! Learned windows: a service's demand in 15-minute buckets of the week (UTC), weighted
//! across weeks so old weeks fade. Pure: every function takes the time it is about.
//!
//! What is recorded is the start of activity: a request after the service saw none for its
//! idle timeout (what would be a cold start without pre-warming), plus the requests per bucket.
//! At each week's end every bucket's weight moves toward whether it had a start that week
//! (`weight = (1 - ALPHA) * weight + ALPHA * seen`), and a bit per week is kept for the
//! evidence. A bucket whose weight reaches [`THRESHOLD`] is a predicted window: with
//! [`ALPHA`] = 0.3 that takes three weeks in a row (0.30, 0.51, 0.66), and one week without
//! takes it away again (0.46), so a moved job is learned at its new time within three weeks.
//! A predicted window that ends with no request costs its buckets one more decay step.
//! `max_hours_per_week` keeps only the heaviest buckets.

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::{Planned, Source};

/// Minutes per bucket.
pub const BUCKET_MINUTES: i64 = 15;
/// Buckets per week.
pub const BUCKETS: u16 = (7 * 24 * 60 / BUCKET_MINUTES) as u16;
/// How much one week moves a bucket's weight.
pub const ALPHA: f64 = 0.3;
/// Weight from which a bucket is a predicted window.
pub const THRESHOLD: f64 = 0.6;
/// A bucket lighter than this, with no recent week, is forgotten.
const FORGET_BELOW: f64 = 0.01;
/// Seconds from the Unix epoch (a Thursday) to the first Monday 00:00 UTC.
const FIRST_MONDAY: i64 = 4 * 86_400;
const WEEK: i64 = 7 * 86_400;

/// One bucket's history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Weighted share of weeks with a start of activity in this bucket.
    pub weight: f64,
    /// One bit per past week, newest lowest: a start in this bucket that week.
    pub recent: u8,
    /// Weighted requests per week in this bucket.
    #[serde(default)]
    pub requests: f64,
}

/// One service's history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceHistory {
    /// The week being recorded (weeks since Monday 1970-01-05 UTC).
    pub week: i64,
    /// Completed weeks folded in so far (for the evidence).
    pub weeks_seen: u32,
    /// Buckets with any weight, by index (0 = Monday 00:00–00:15 UTC).
    pub buckets: BTreeMap<u16, Bucket>,
    /// Buckets of the current week that had a start of activity.
    pub this_week: BTreeSet<u16>,
    /// Requests per bucket in the current week.
    #[serde(default)]
    pub requests_this_week: BTreeMap<u16, u64>,
}

/// The week and bucket of `t`.
pub fn week_bucket(t: Timestamp) -> (i64, u16) {
    let s = t.as_second() - FIRST_MONDAY;
    let week = s.div_euclid(WEEK);
    let bucket = (s.rem_euclid(WEEK) / (BUCKET_MINUTES * 60)) as u16;
    (week, bucket)
}

/// The start of `week` (Monday 00:00 UTC).
pub(crate) fn week_start(week: i64) -> Timestamp {
    Timestamp::from_second(FIRST_MONDAY + week * WEEK).unwrap_or(Timestamp::UNIX_EPOCH)
}

impl ServiceHistory {
    /// Folds finished weeks in, up to the week of `t`.
    pub fn roll(&mut self, t: Timestamp) {
        let (week, _) = week_bucket(t);
        if self.weeks_seen == 0 && self.week == 0 && self.buckets.is_empty() {
            // A new history starts at the current week.
            if self.this_week.is_empty() && self.requests_this_week.is_empty() {
                self.week = week;
                return;
            }
        }
        // Bounded: after 16 weeks without data every weight is below FORGET_BELOW anyway.
        let mut steps = 0;
        while self.week < week && steps < 16 {
            let seen = std::mem::take(&mut self.this_week);
            let counts = std::mem::take(&mut self.requests_this_week);
            for b in seen.iter().chain(counts.keys()) {
                self.buckets.entry(*b).or_default();
            }
            for (b, v) in self.buckets.iter_mut() {
                let hit = seen.contains(b);
                v.weight = (1.0 - ALPHA) * v.weight + ALPHA * f64::from(u8::from(hit));
                v.recent = (v.recent << 1) | u8::from(hit);
                let n = counts.get(b).copied().unwrap_or(0) as f64;
                v.requests = (1.0 - ALPHA) * v.requests + ALPHA * n;
            }
            self.buckets
                .retain(|_, v| v.weight >= FORGET_BELOW || v.recent != 0);
            self.weeks_seen += 1;
            self.week += 1;
            steps += 1;
        }
        self.week = self.week.max(week);
    }

    /// A start of activity (a request after the idle timeout) at `t`.
    pub fn start(&mut self, t: Timestamp) {
        self.roll(t);
        self.this_week.insert(week_bucket(t).1);
    }

    /// `n` requests at `t`.
    pub fn requests(&mut self, t: Timestamp, n: u64) {
        self.roll(t);
        *self.requests_this_week.entry(week_bucket(t).1).or_default() += n;
    }

    /// A predicted window over `[start, end)` saw no request: its buckets lose weight.
    pub fn missed(&mut self, start: Timestamp, end: Timestamp) {
        let mut t = start;
        while t < end {
            if let Some(b) = self.buckets.get_mut(&week_bucket(t).1) {
                b.weight *= 1.0 - ALPHA;
            }
            t += SignedDuration::from_mins(BUCKET_MINUTES);
        }
    }

    /// The predicted buckets, in week order: a bucket whose weight, alone or with a
    /// neighbour's (a job whose start wanders across a bucket edge), is at least
    /// [`THRESHOLD`]; the heaviest first within `max_hours` per week.
    pub fn predicted(&self, max_hours: f64) -> Vec<u16> {
        let cap = (max_hours * 60.0 / BUCKET_MINUTES as f64).floor() as usize;
        let w = |b: u16| self.buckets.get(&b).map_or(0.0, |x| x.weight);
        let mut hot: Vec<(f64, u16)> = self
            .buckets
            .iter()
            .filter(|(_, v)| v.weight > 0.0)
            .map(|(&b, v)| {
                let before = b.checked_sub(1).map_or(0.0, w);
                (v.weight.max(v.weight + before).max(v.weight + w(b + 1)), b)
            })
            .filter(|(score, _)| *score >= THRESHOLD)
            .collect();
        hot.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut out: Vec<u16> = hot.into_iter().take(cap).map(|(_, b)| b).collect();
        out.sort_unstable();
        out
    }

    /// The learned windows overlapping `[from, to)`: runs of adjacent predicted buckets, each
    /// with its evidence.
    pub fn windows(&self, from: Timestamp, to: Timestamp, max_hours: f64) -> Vec<Planned> {
        let predicted = self.predicted(max_hours);
        let mut runs: Vec<(u16, u16)> = Vec::new(); // (first, last)
        for b in predicted {
            match runs.last_mut() {
                Some((_, last)) if *last + 1 == b => *last = b,
                _ => runs.push((b, b)),
            }
        }
        let bucket = SignedDuration::from_mins(BUCKET_MINUTES);
        let mut out = Vec::new();
        let (w0, _) = week_bucket(from);
        let (w1, _) = week_bucket(to);
        for week in w0 - 1..=w1 {
            for &(first, last) in &runs {
                let start = week_start(week) + bucket * i32::from(first);
                let end = week_start(week) + bucket * (i32::from(last) + 1);
                if end > from && start < to {
                    out.push(Planned {
                        start,
                        end,
                        source: Source::Learned,
                        evidence: Some(self.evidence(first, last)),
                    });
                }
            }
        }
        out
    }

    /// [`ServiceHistory::windows`] as of `now`: weeks finished by then are folded in first
    /// (on a copy; the stored history is rolled when it is next written).
    pub fn windows_at(
        &self,
        now: Timestamp,
        from: Timestamp,
        to: Timestamp,
        max_hours: f64,
    ) -> Vec<Planned> {
        if week_bucket(now).0 > self.week {
            let mut rolled = self.clone();
            rolled.roll(now);
            rolled.windows(from, to, max_hours)
        } else {
            self.windows(from, to, max_hours)
        }
    }

    fn evidence(&self, first: u16, last: u16) -> String {
        let weeks = self.weeks_seen.min(8);
        let mask = if weeks >= 8 { 0xff } else { (1u8 << weeks) - 1 };
        let recent = (first..=last)
            .filter_map(|b| self.buckets.get(&b))
            .fold(0u8, |acc, b| acc | b.recent);
        let label = |b: u16| {
            let m = i64::from(b) * BUCKET_MINUTES;
            let day = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][(m / 1440) as usize % 7];
            (day, format!("{:02}:{:02}", (m % 1440) / 60, m % 60))
        };
        let (day, from) = label(first);
        let end = (i64::from(last) + 1) * BUCKET_MINUTES;
        let to = format!("{:02}:{:02}", (end % 1440) / 60, end % 60);
        format!(
            "cold starts in {} of the last {weeks} weeks, {day} {from}–{to} UTC",
            (recent & mask).count_ones()
        )
    }
}

/// Every learning service's history (the persisted document).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Format version (1).
    pub version: u32,
    /// Minutes per bucket (15).
    pub bucket_minutes: i64,
    /// By service name.
    pub services: BTreeMap<String, ServiceHistory>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        History {
            version: 1,
            bucket_minutes: BUCKET_MINUTES,
            services: BTreeMap::new(),
        }
    }

    /// The history of `service`, created empty.
    pub fn service(&mut self, service: &str) -> &mut ServiceHistory {
        self.services.entry(service.to_string()).or_default()
    }
}

/// Feeds request timestamps (any order) into `h` as a live Reveille would have seen them: a
/// start of activity for each request after `idle` without one, and the counts.
pub fn import(h: &mut ServiceHistory, mut times: Vec<Timestamp>, idle: std::time::Duration) {
    times.sort_unstable();
    let idle = SignedDuration::try_from(idle).unwrap_or(SignedDuration::MAX);
    let mut last: Option<Timestamp> = None;
    for t in times {
        if last.is_none_or(|l| t.duration_since(l) >= idle) {
            h.start(t);
        }
        h.requests(t, 1);
        last = Some(t);
    }
}

#[cfg(test)]
mod tests;
