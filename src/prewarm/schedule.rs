//! Scheduled windows as instants: pure functions of the configured windows and a time span,
//! so every daylight-saving and calendar case is tested without a clock.
//!
//! A window is written in local time (`start`, `end`, `timezone`). Where the local time does
//! not exist (a spring-forward gap) the window starts, or ends, at the first valid minute after
//! it; where it exists twice (a fall-back overlap) the window starts at the first of the two
//! and ends at the second, so the service is up for the whole local period either way. An
//! `end` at or before `start` is on the next day (a window crossing midnight), which also
//! carries a Sunday window into Monday (the end of the week).

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{Span, Timestamp, ToSpan};

use crate::config::ScheduledWindow;

/// One occurrence of a window: from `start` (inclusive) to `end` (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Occurrence {
    /// When the window opens.
    pub start: Timestamp,
    /// When it closes.
    pub end: Timestamp,
}

/// Bound on the minutes stepped over to leave a gap (the longest known is a skipped day).
const MAX_GAP_MINUTES: i64 = 26 * 60;

/// The occurrences of `w` that overlap `[from, to)`, in order.
pub fn occurrences(w: &ScheduledWindow, from: Timestamp, to: Timestamp) -> Vec<Occurrence> {
    let tz = &w.timezone;
    // A window that started on the day before `from` may still be open (crossing midnight).
    let first = tz.to_datetime(from).date().yesterday().unwrap_or(Date::MIN);
    let last = tz.to_datetime(to).date();
    let mut out = Vec::new();
    let mut day = first;
    while day <= last {
        if w.days.contains(&day.weekday()) {
            let end_day = if w.end > w.start {
                day
            } else {
                day.tomorrow().unwrap_or(day)
            };
            let start = resolve(tz, day.to_datetime(w.start), Edge::Start);
            let end = resolve(tz, end_day.to_datetime(w.end), Edge::End);
            if let (Some(start), Some(end)) = (start, end) {
                if start < end && end > from && start < to {
                    out.push(Occurrence { start, end });
                }
            }
        }
        match day.tomorrow() {
            Ok(next) => day = next,
            Err(_) => break,
        }
    }
    out
}

/// The occurrences of every window in `ws` that overlap `[from, to)`, sorted by start.
pub fn all_occurrences(ws: &[ScheduledWindow], from: Timestamp, to: Timestamp) -> Vec<Occurrence> {
    let mut out: Vec<Occurrence> = ws.iter().flat_map(|w| occurrences(w, from, to)).collect();
    out.sort();
    out
}

#[derive(Clone, Copy)]
enum Edge {
    Start,
    End,
}

/// The instant of a local time: in a gap, the first valid minute after it; in an overlap, the
/// first occurrence for a start and the second for an end.
fn resolve(tz: &TimeZone, dt: DateTime, edge: Edge) -> Option<Timestamp> {
    let amb = tz.to_ambiguous_timestamp(dt);
    match amb.offset() {
        AmbiguousOffset::Unambiguous { .. } => amb.compatible().ok(),
        AmbiguousOffset::Fold { .. } => match edge {
            Edge::Start => amb.earlier().ok(),
            Edge::End => amb.later().ok(),
        },
        AmbiguousOffset::Gap { .. } => first_valid_minute(tz, dt),
    }
}

fn first_valid_minute(tz: &TimeZone, dt: DateTime) -> Option<Timestamp> {
    // The next whole minute after `dt` (a time in a gap is never valid itself).
    let minute = dt.with().second(0).subsec_nanosecond(0).build().ok()?;
    let mut t = minute;
    for _ in 0..MAX_GAP_MINUTES {
        t = t.checked_add(1.minute()).ok()?;
        let amb = tz.to_ambiguous_timestamp(t);
        if !matches!(amb.offset(), AmbiguousOffset::Gap { .. }) {
            return amb.earlier().ok();
        }
    }
    None
}

/// `t` shifted back by `by` (saturating at the earliest timestamp).
pub fn minus(t: Timestamp, by: std::time::Duration) -> Timestamp {
    let span = Span::new().seconds(by.as_secs() as i64);
    t.checked_sub(span).unwrap_or(Timestamp::MIN)
}

/// A civil time for tests and plans: `HH:MM`.
pub fn hm(t: Time) -> String {
    format!("{:02}:{:02}", t.hour(), t.minute())
}

#[cfg(test)]
mod tests;
