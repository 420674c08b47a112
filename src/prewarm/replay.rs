//! Replays a synthetic weekly trace through the learner, week by week, as a live Reveille
//! would see it: at each week's start the learned windows are planned, then the week's requests
//! come; a job whose first request falls inside a pre-warmed span (its window, lead included)
//! started warm. Gives the figure in docs/prewarm.md (`cargo run --example prewarm_replay`).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::learn::{import, week_bucket, ServiceHistory};
use super::plan::awake_spans;

/// A recurring job: on each of `days` (0 = Monday) at `minute` of the day (UTC), give or take
/// `jitter` minutes, one request a minute for `minutes`.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    /// Days of the week, 0 = Monday.
    pub days: &'static [i64],
    /// Minute of the day it starts.
    pub minute: i64,
    /// Random shift, up to this many minutes either way.
    pub jitter: i64,
    /// How long it runs, in minutes.
    pub minutes: i64,
}

/// The trace of the docs: a Monday reconciliation, a weekday order sync, a Wednesday report,
/// and a few ad-hoc requests a week at random times (which nothing can predict).
pub const TRACE: &[Job] = &[
    Job {
        days: &[0],
        minute: 7 * 60 + 50,
        jitter: 4,
        minutes: 90,
    },
    Job {
        days: &[0, 1, 2, 3, 4],
        minute: 6 * 60,
        jitter: 4,
        minutes: 20,
    },
    Job {
        days: &[2],
        minute: 14 * 60 + 10,
        jitter: 10,
        minutes: 30,
    },
];

/// Ad-hoc requests per week at random times.
pub const AD_HOC_PER_WEEK: usize = 3;

/// One replayed week.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Week {
    /// Starts of activity (a request after the idle timeout).
    pub starts: usize,
    /// Of those, inside a pre-warmed span.
    pub warm: usize,
    /// Hours the service was kept up for pre-warm spans.
    pub warm_hours: f64,
}

/// Replays `weeks` weeks of [`TRACE`] (seeded) from an empty history, with `lead` and
/// `max_hours` per week, for a service with `idle` as its idle timeout.
pub fn replay(
    weeks: usize,
    lead: Duration,
    max_hours: f64,
    idle: Duration,
    seed: u64,
) -> Vec<Week> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut h = ServiceHistory::default();
    // Monday 2026-11-02 00:00 UTC.
    let first = Timestamp::from_second(1_793_577_600).expect("constant");
    debug_assert_eq!(week_bucket(first).1, 0);
    let week_len = SignedDuration::from_hours(24 * 7);
    let idle_s = SignedDuration::try_from(idle).unwrap_or_default();
    let mut out = Vec::with_capacity(weeks);
    for w in 0..weeks {
        let from = first + week_len * w as i32;
        let to = from + week_len;
        h.roll(from);
        let windows = h.windows(from, to, max_hours);
        let spans = awake_spans(&windows, lead);
        let times = week_requests(&mut rng, from);
        let mut week = Week::default();
        let mut last: Option<Timestamp> = None;
        for &t in &times {
            if last.is_none_or(|l| t.duration_since(l) >= idle_s) {
                week.starts += 1;
                week.warm += usize::from(spans.iter().any(|s| s.from <= t && t < s.until));
            }
            last = Some(t);
        }
        for s in &spans {
            let (a, b) = (s.from.max(from), s.until.min(to));
            if b > a {
                week.warm_hours += b.duration_since(a).as_secs_f64() / 3600.0;
            }
            if !times.iter().any(|&t| s.from <= t && t < s.until) {
                for l in &s.windows {
                    h.missed(l.start, l.end);
                }
            }
        }
        import(&mut h, times, idle);
        out.push(week);
    }
    out
}

fn week_requests(rng: &mut SmallRng, monday: Timestamp) -> Vec<Timestamp> {
    let mut times = Vec::new();
    for job in TRACE {
        for &day in job.days {
            let shift = rng.gen_range(-job.jitter..=job.jitter);
            let start = monday + SignedDuration::from_mins(day * 1440 + job.minute + shift);
            times.extend((0..job.minutes).map(|m| start + SignedDuration::from_mins(m)));
        }
    }
    for _ in 0..AD_HOC_PER_WEEK {
        let minute = rng.gen_range(0..7 * 1440);
        times.push(monday + SignedDuration::from_mins(minute));
    }
    times.sort_unstable();
    times
}

/// Totals over `weeks`: (starts, warm starts, warm hours).
pub fn totals(weeks: &[Week]) -> (usize, usize, f64) {
    weeks.iter().fold((0, 0, 0.0), |(s, w, h), x| {
        (s + x.starts, w + x.warm, h + x.warm_hours)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_warms_the_recurring_jobs_after_three_weeks_within_the_cap() {
        let weeks = replay(
            8,
            Duration::from_secs(60),
            10.0,
            Duration::from_secs(300),
            7,
        );
        // The first weeks are cold: nothing learned yet.
        assert_eq!(weeks[0].warm, 0);
        assert_eq!(weeks[1].warm, 0);
        assert_eq!(weeks[2].warm, 0);
        // Learned after three weeks: most of the 7 recurring starts a week are warm from the
        // fourth week on, nearly all from the fifth (ad-hoc ones are not predictable).
        assert!(weeks[3].warm >= 4, "{:?}", weeks[3]);
        for w in &weeks[4..] {
            assert!(w.warm >= 6, "{w:?}");
        }
        for w in &weeks {
            assert!(w.warm_hours <= 10.0 + 0.5, "{w:?}");
        }
        let (starts, warm, _) = totals(&weeks[4..]);
        assert!(warm as f64 / starts as f64 > 0.6, "{warm}/{starts}");
    }
}
