//! What validation reports: every problem found, each with its field path.

use std::fmt;
use std::time::Duration;

use super::HumanDuration;

/// Every problem found in a config file, each with its field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `field.path: reason` lines.
    pub problems: Vec<Problem>,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Field path like `services[1].queue.capacity` (empty for the document itself).
    pub path: String,
    /// Why the value is wrong.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub(super) fn one(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                path: path.into(),
                reason: reason.into(),
            }],
        }
    }
}

pub(crate) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(crate) fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            reason: reason.into(),
        });
    }
}

pub(super) fn dur(d: Option<HumanDuration>, default: Duration) -> Duration {
    d.map(|d| d.0).unwrap_or(default)
}

pub(super) fn positive(p: &mut Problems, path: String, d: Duration) {
    if d.is_zero() {
        p.add(path, "must be greater than 0");
    }
}
