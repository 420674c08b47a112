//! `reveille prewarm import`: seeds a service's learned history from a CSV of request
//! timestamps (one a line, in the first column: RFC 3339 like `2026-11-02T08:05:00Z`, or Unix
//! seconds), read as a live Reveille would have seen those requests.

use jiff::Timestamp;

use super::learn::{self, History};
use crate::config::Config;

/// Bound on the rows read from one CSV.
pub const MAX_ROWS: usize = 10_000_000;

/// What an import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// Timestamps read.
    pub rows: usize,
    /// Lines that were not a timestamp (a header, comments).
    pub skipped: usize,
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The service is not in the config, or does not learn.
    #[error("service {0:?} is not configured with `prewarm: {{ learn: true }}`")]
    NotLearning(String),
    /// More than [`MAX_ROWS`] rows.
    #[error("more than {MAX_ROWS} rows")]
    TooLarge,
}

/// Parses `csv` and folds its requests into `service`'s history in `history`.
pub fn import_csv(
    cfg: &Config,
    service: &str,
    csv: &str,
    history: &mut History,
) -> Result<Imported, ImportError> {
    let spec = cfg
        .services
        .iter()
        .find(|s| s.name == service && s.prewarm.as_ref().is_some_and(|p| p.learn))
        .ok_or_else(|| ImportError::NotLearning(service.to_string()))?;
    let mut times = Vec::new();
    let mut skipped = 0;
    for line in csv.lines() {
        let field = line
            .split(',')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"');
        if field.is_empty() || field.starts_with('#') {
            continue;
        }
        match parse(field) {
            Some(t) => times.push(t),
            None => skipped += 1,
        }
        if times.len() > MAX_ROWS {
            return Err(ImportError::TooLarge);
        }
    }
    let rows = times.len();
    learn::import(history.service(service), times, spec.idle_timeout);
    Ok(Imported { rows, skipped })
}

fn parse(field: &str) -> Option<Timestamp> {
    if let Ok(t) = field.parse::<Timestamp>() {
        return Some(t);
    }
    let secs: f64 = field.parse().ok()?;
    Timestamp::from_second(secs.floor() as i64).ok()
}
