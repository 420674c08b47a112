//! A service's plan: its windows over a span, each with its source (and, for learned ones,
//! the evidence), merged where they overlap once the lead is counted. Shown by
//! `reveille prewarm plan` and in `/api/services`, and followed by the [`super::runner`].

use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::schedule::{all_occurrences, minus};
use super::Source;
use crate::config::Prewarm;

/// One planned window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Planned {
    /// When the window opens (requests are expected from then on).
    pub start: Timestamp,
    /// When it closes (the normal idle timeout applies from then on).
    pub end: Timestamp,
    /// Where it comes from.
    pub source: Source,
    /// Why a learned window was predicted ("cold starts in 4 of the last 5 weeks, ...").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
}

impl Planned {
    /// When the service is woken for this window.
    pub fn wake_at(&self, lead: Duration) -> Timestamp {
        minus(self.start, lead)
    }
}

/// The windows of `cfg` (scheduled) and `learned` overlapping `[from, from + span)`, sorted by
/// start.
pub fn plan(cfg: &Prewarm, learned: &[Planned], from: Timestamp, span: Duration) -> Vec<Planned> {
    let to = from
        .checked_add(jiff::SignedDuration::try_from(span).unwrap_or_default())
        .unwrap_or(Timestamp::MAX);
    let mut out: Vec<Planned> = all_occurrences(&cfg.schedule, from, to)
        .into_iter()
        .map(|o| Planned {
            start: o.start,
            end: o.end,
            source: Source::Schedule,
            evidence: None,
        })
        .collect();
    out.extend(
        learned
            .iter()
            .filter(|l| l.end > from && l.start < to)
            .cloned(),
    );
    out.sort_by_key(|w| (w.start, w.end, w.source));
    out
}

/// A span the service is kept up for: from the first window's wake-up to the last one's end,
/// for windows whose wake-up falls inside the span before (`windows` are the plan's indexes).
#[derive(Debug, Clone, PartialEq)]
pub struct Awake {
    /// When to wake.
    pub from: Timestamp,
    /// When the last window of the span ends.
    pub until: Timestamp,
    /// The windows it covers, in order.
    pub windows: Vec<Planned>,
}

/// The spans to keep the service up for, given the plan (sorted by start) and the lead.
pub fn awake_spans(plan: &[Planned], lead: Duration) -> Vec<Awake> {
    let mut out: Vec<Awake> = Vec::new();
    for w in plan {
        let from = w.wake_at(lead);
        match out.last_mut() {
            Some(a) if from <= a.until => {
                a.until = a.until.max(w.end);
                a.windows.push(w.clone());
            }
            _ => out.push(Awake {
                from,
                until: w.end,
                windows: vec![w.clone()],
            }),
        }
    }
    out
}
