use std::time::Duration;

use super::*;

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn weeks(n: i64) -> SignedDuration {
    SignedDuration::from_hours(24 * 7 * n)
}

/// The learned windows of the week starting Monday `monday`.
fn learned(h: &ServiceHistory, monday: Timestamp, max_hours: f64) -> Vec<(String, String)> {
    h.windows(monday, monday + weeks(1), max_hours)
        .into_iter()
        .filter(|w| w.start >= monday)
        .map(|w| (w.start.to_string(), w.end.to_string()))
        .collect()
}

/// A batch job: requests Monday 08:05 to 08:40, after a quiet night.
fn job(h: &mut ServiceHistory, monday: Timestamp, at_minutes: i64) {
    let start = monday + SignedDuration::from_mins(at_minutes);
    let times = (0..36)
        .map(|m| start + SignedDuration::from_mins(m))
        .collect();
    import(h, times, Duration::from_secs(300));
}

#[test]
fn a_window_appears_after_three_weeks_and_fades_after_the_job_moved() {
    let w0 = ts("2026-11-02T00:00:00Z"); // a Monday
    let mut h = ServiceHistory::default();
    for week in 0..3 {
        job(&mut h, w0 + weeks(week), 8 * 60 + 5);
        h.roll(w0 + weeks(week + 1));
        let got = learned(&h, w0 + weeks(week + 1), 10.0);
        if week < 2 {
            assert!(
                got.is_empty(),
                "predicted after {} weeks: {got:?}",
                week + 1
            );
        } else {
            // Only the bucket of the start (08:00–08:15), not the buckets it ran on into.
            assert_eq!(
                got,
                vec![("2026-11-23T08:00:00Z".into(), "2026-11-23T08:15:00Z".into())]
            );
        }
    }
    let w = &h.windows(w0 + weeks(3), w0 + weeks(4), 10.0)[0];
    assert_eq!(
        w.evidence.as_deref(),
        Some("cold starts in 3 of the last 3 weeks, Mon 08:00–08:15 UTC")
    );
    // The job moves to Tuesday 14:30.
    let tuesday = 24 * 60 + 14 * 60 + 30;
    job(&mut h, w0 + weeks(3), tuesday);
    h.roll(w0 + weeks(4));
    let got = learned(&h, w0 + weeks(4), 10.0);
    assert!(
        got.is_empty(),
        "the old slot stays after the job moved: {got:?}"
    );
    for week in 4..6 {
        job(&mut h, w0 + weeks(week), tuesday);
        h.roll(w0 + weeks(week + 1));
    }
    let got = learned(&h, w0 + weeks(6), 10.0);
    assert_eq!(
        got,
        vec![("2026-12-15T14:30:00Z".into(), "2026-12-15T14:45:00Z".into())]
    );
}

#[test]
fn a_predicted_window_with_no_request_loses_weight() {
    let w0 = ts("2026-11-02T00:00:00Z");
    let mut h = ServiceHistory::default();
    for week in 0..4 {
        job(&mut h, w0 + weeks(week), 6 * 60);
    }
    h.roll(w0 + weeks(4));
    let before = h.buckets[&24].weight;
    assert!(before >= THRESHOLD);
    let w = h.windows(w0 + weeks(4), w0 + weeks(5), 10.0)[0].clone();
    h.missed(w.start, w.end);
    assert!((h.buckets[&24].weight - before * (1.0 - ALPHA)).abs() < 1e-9);
    assert!(
        h.predicted(10.0).is_empty(),
        "one miss after 4 weeks takes it away"
    );
}

#[test]
fn max_hours_per_week_keeps_only_the_heaviest_buckets() {
    let w0 = ts("2026-11-02T00:00:00Z");
    let mut h = ServiceHistory::default();
    // Starts every day at 20 different quarter hours (separated by more than the idle time),
    // for five weeks; the first ten of each day for two more weeks (heavier).
    for week in 0..5 {
        for day in 0..7 {
            for k in 0..20 {
                let t = w0 + weeks(week) + SignedDuration::from_hours(24 * day + k);
                h.start(t);
            }
        }
    }
    h.roll(w0 + weeks(5));
    let all = h.predicted(168.0).len();
    assert_eq!(all, 7 * 20);
    let capped = h.predicted(10.0);
    assert_eq!(capped.len(), 40, "10 hours = 40 buckets");
    let windows = h.windows(w0 + weeks(5), w0 + weeks(6), 10.0);
    let hours: f64 = windows
        .iter()
        .filter(|w| w.start >= w0 + weeks(5))
        .map(|w| w.end.duration_since(w.start).as_secs_f64() / 3600.0)
        .sum();
    assert!(hours <= 10.0, "{hours} warm hours planned");
}

#[test]
fn the_history_round_trips_through_its_json_format() {
    let w0 = ts("2026-11-02T00:00:00Z");
    let mut all = History::new();
    let h = all.service("sync");
    job(h, w0, 60);
    h.roll(w0 + weeks(1));
    let text = serde_json::to_string_pretty(&all).unwrap();
    assert!(text.contains("\"bucket_minutes\": 15"), "{text}");
    let back: History = serde_json::from_str(&text).unwrap();
    assert_eq!(back, all);
}

#[test]
fn week_and_bucket_of_a_time() {
    assert_eq!(week_bucket(ts("1970-01-05T00:00:00Z")), (0, 0));
    assert_eq!(week_bucket(ts("1970-01-05T00:14:59Z")), (0, 0));
    assert_eq!(week_bucket(ts("1970-01-11T23:59:59Z")), (0, BUCKETS - 1));
    assert_eq!(week_bucket(ts("1970-01-12T00:15:00Z")), (1, 1));
    assert_eq!(week_bucket(ts("1970-01-01T00:00:00Z")).0, -1);
}
