//! A service's `prewarm:` (scheduled and learned windows in which it is kept up before any
//! request) and `depends_on:` (services woken before it): raw shapes and validation. What the
//! settings do lives in [`crate::prewarm`].

use std::collections::HashMap;
use std::time::Duration;

use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use serde::Deserialize;

use super::Problems;

/// Default cap on the hours per week learning may keep a service warm.
pub const DEFAULT_MAX_HOURS_PER_WEEK: f64 = 10.0;
/// The least lead `lead: auto` uses (the observed p90 cold start, when longer).
pub const MIN_AUTO_LEAD: Duration = Duration::from_secs(30);
/// Bound on scheduled windows per service.
pub const MAX_SCHEDULE_WINDOWS: usize = 64;

#[derive(Debug, Deserialize)]
pub(super) struct RawPrewarm {
    #[serde(default)]
    schedule: Vec<RawWindow>,
    lead: Option<String>,
    #[serde(default)]
    learn: bool,
    max_hours_per_week: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RawWindow {
    #[serde(default)]
    days: Vec<String>,
    start: String,
    end: String,
    timezone: Option<String>,
}

/// A service's pre-warming.
#[derive(Debug, Clone, PartialEq)]
pub struct Prewarm {
    /// Fixed windows (`schedule`).
    pub schedule: Vec<ScheduledWindow>,
    /// How long before a window the service is woken (`lead`, default `auto`).
    pub lead: Lead,
    /// Learn windows from the demand seen (`learn`, default off).
    pub learn: bool,
    /// Hours per week learned windows may keep the service warm at most
    /// (`max_hours_per_week`, default [`DEFAULT_MAX_HOURS_PER_WEEK`]).
    pub max_hours_per_week: f64,
}

/// How long before a window the service is woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lead {
    /// The service's observed p90 cold-start time, at least [`MIN_AUTO_LEAD`].
    Auto,
    /// A fixed time.
    Fixed(Duration),
}

/// One `schedule` entry: on each of `days`, from `start` to `end` local time in `timezone`
/// (an `end` at or before `start` is on the next day).
#[derive(Debug, Clone)]
pub struct ScheduledWindow {
    /// The days the window starts on.
    pub days: Vec<Weekday>,
    /// Local start time.
    pub start: Time,
    /// Local end time (on the next day when not after `start`).
    pub end: Time,
    /// The zone `start` and `end` are in (default UTC).
    pub timezone: TimeZone,
    /// The zone's IANA name, as written.
    pub timezone_name: String,
}

impl PartialEq for ScheduledWindow {
    fn eq(&self, o: &Self) -> bool {
        self.days == o.days
            && self.start == o.start
            && self.end == o.end
            && self.timezone_name == o.timezone_name
    }
}

impl Eq for ScheduledWindow {}

pub(super) fn validate(p: &mut Problems, at: &str, raw: RawPrewarm) -> Prewarm {
    let lead = match raw.lead.as_deref().map(str::trim) {
        None | Some("auto") => Lead::Auto,
        Some(s) => match humantime::parse_duration(s) {
            Ok(d) => Lead::Fixed(d),
            Err(e) => {
                p.add(
                    format!("{at}.lead"),
                    format!("{s:?} is neither `auto` nor a duration like 90s or 5m ({e})"),
                );
                Lead::Auto
            }
        },
    };
    let max_hours_per_week = raw.max_hours_per_week.unwrap_or(DEFAULT_MAX_HOURS_PER_WEEK);
    if !(max_hours_per_week > 0.0 && max_hours_per_week <= 168.0) {
        p.add(
            format!("{at}.max_hours_per_week"),
            "must be more than 0 and at most 168",
        );
    }
    if raw.schedule.is_empty() && !raw.learn {
        p.add(at, "set `schedule`, `learn: true`, or both");
    }
    if raw.schedule.len() > MAX_SCHEDULE_WINDOWS {
        p.add(
            format!("{at}.schedule"),
            format!("at most {MAX_SCHEDULE_WINDOWS} windows"),
        );
    }
    let schedule = raw
        .schedule
        .into_iter()
        .enumerate()
        .filter_map(|(i, w)| window(p, &format!("{at}.schedule[{i}]"), w))
        .collect();
    Prewarm {
        schedule,
        lead,
        learn: raw.learn,
        max_hours_per_week,
    }
}

fn window(p: &mut Problems, at: &str, raw: RawWindow) -> Option<ScheduledWindow> {
    let before = p.0.len();
    if raw.days.is_empty() {
        p.add(format!("{at}.days"), "at least one day is required");
    }
    let mut days = Vec::with_capacity(raw.days.len());
    for (k, d) in raw.days.iter().enumerate() {
        match weekday(d) {
            Some(w) if !days.contains(&w) => days.push(w),
            Some(_) => p.add(format!("{at}.days[{k}]"), format!("{d:?} is listed twice")),
            None => p.add(
                format!("{at}.days[{k}]"),
                format!("{d:?} is not a day (mon, tue, wed, thu, fri, sat, sun)"),
            ),
        }
    }
    let start = time(p, &format!("{at}.start"), &raw.start);
    let end = time(p, &format!("{at}.end"), &raw.end);
    if let (Some(s), Some(e)) = (start, end) {
        if s == e {
            p.add(
                format!("{at}.end"),
                "must differ from start (an end before start is on the next day)",
            );
        }
    }
    let timezone_name = raw.timezone.unwrap_or_else(|| "UTC".to_string());
    let timezone = match TimeZone::get(&timezone_name) {
        Ok(tz) => Some(tz),
        Err(e) => {
            p.add(
                format!("{at}.timezone"),
                format!("{timezone_name:?} is not a known IANA time zone ({e})"),
            );
            None
        }
    };
    if p.0.len() != before {
        return None;
    }
    Some(ScheduledWindow {
        days,
        start: start?,
        end: end?,
        timezone: timezone?,
        timezone_name,
    })
}

fn weekday(d: &str) -> Option<Weekday> {
    Some(match d.trim().to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Monday,
        "tue" | "tuesday" => Weekday::Tuesday,
        "wed" | "wednesday" => Weekday::Wednesday,
        "thu" | "thursday" => Weekday::Thursday,
        "fri" | "friday" => Weekday::Friday,
        "sat" | "saturday" => Weekday::Saturday,
        "sun" | "sunday" => Weekday::Sunday,
        _ => return None,
    })
}

/// `HH:MM` or `HH:MM:SS`, 24-hour clock.
fn time(p: &mut Problems, at: &str, s: &str) -> Option<Time> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    let num = |x: &str| (x.len() == 2).then(|| x.parse::<i8>().ok()).flatten();
    let parsed = match parts.as_slice() {
        [h, m] => num(h).zip(num(m)).map(|(h, m)| (h, m, 0)),
        [h, m, sec] => match (num(h), num(m), num(sec)) {
            (Some(h), Some(m), Some(sec)) => Some((h, m, sec)),
            _ => None,
        },
        _ => None,
    };
    match parsed.and_then(|(h, m, sec)| Time::new(h, m, sec, 0).ok()) {
        Some(t) => Some(t),
        None => {
            p.add(
                at,
                format!("{s:?} is not a time like \"07:45\" (24-hour HH:MM)"),
            );
            None
        }
    }
}

/// What is wrong with one `depends_on` list, found by [`dependency_problems`]; the caller
/// names the field (`services[1].depends_on[0]` in a file, `spec.depends_on[0]` on an object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DependencyProblem {
    /// Entry `at` names no service.
    Unknown { service: usize, at: usize },
    /// Entry `at` names the service itself.
    ItSelf { service: usize, at: usize },
    /// Entry `at` repeats an earlier one.
    Twice { service: usize, at: usize },
    /// The services of `cycle` depend on each other in that order (reported once, at its first).
    Cycle { cycle: Vec<usize> },
}

/// `depends_on` of every service: known names, not itself, not twice, no cycle. `deps[i]` are
/// the names service `i` depends on, `names[i]` its name.
pub fn dependency_problems(names: &[String], deps: &[Vec<String>]) -> Vec<DependencyProblem> {
    let index: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut found = Vec::new();
    for (service, list) in deps.iter().enumerate() {
        for (at, d) in list.iter().enumerate() {
            match index.get(d.as_str()) {
                None => found.push(DependencyProblem::Unknown { service, at }),
                Some(&j) if j == service => found.push(DependencyProblem::ItSelf { service, at }),
                Some(_) if list[..at].contains(d) => {
                    found.push(DependencyProblem::Twice { service, at })
                }
                Some(_) => {}
            }
        }
    }
    // A cycle: depth-first search over known edges, reported once at its first service.
    let edges: Vec<Vec<usize>> = deps
        .iter()
        .enumerate()
        .map(|(i, l)| {
            l.iter()
                .filter_map(|d| index.get(d.as_str()).copied())
                .filter(|&j| j != i)
                .collect()
        })
        .collect();
    let mut state = vec![0u8; names.len()]; // 0 new, 1 on the path, 2 done
    for i in 0..names.len() {
        let mut path = Vec::new();
        if let Some(cycle) = find_cycle(i, &edges, &mut state, &mut path) {
            found.push(DependencyProblem::Cycle { cycle });
        }
    }
    found
}

impl DependencyProblem {
    /// The service whose `depends_on` is at fault.
    pub fn service(&self) -> usize {
        match self {
            DependencyProblem::Unknown { service, .. }
            | DependencyProblem::ItSelf { service, .. }
            | DependencyProblem::Twice { service, .. } => *service,
            DependencyProblem::Cycle { cycle } => cycle[0],
        }
    }

    /// The entry at fault (`None`: the list as a whole, for a cycle).
    pub fn entry(&self) -> Option<usize> {
        match self {
            DependencyProblem::Unknown { at, .. }
            | DependencyProblem::ItSelf { at, .. }
            | DependencyProblem::Twice { at, .. } => Some(*at),
            DependencyProblem::Cycle { .. } => None,
        }
    }

    /// Why, naming services by `name(i)` and entries as written in `deps`.
    pub fn reason(&self, deps: &[Vec<String>], name: &dyn Fn(usize) -> String) -> String {
        match self {
            DependencyProblem::Unknown { service, at } => {
                format!("unknown service {:?}", deps[*service][*at])
            }
            DependencyProblem::ItSelf { .. } => "a service cannot depend on itself".into(),
            DependencyProblem::Twice { service, at } => {
                format!("{:?} is listed twice", deps[*service][*at])
            }
            DependencyProblem::Cycle { cycle } => {
                let shown: Vec<String> = cycle.iter().map(|&j| name(j)).collect();
                format!(
                    "dependency cycle: {} -> {}",
                    shown.join(" -> "),
                    name(cycle[0])
                )
            }
        }
    }
}

/// [`dependency_problems`] of a file's services, each at `services[i].depends_on…`.
pub(super) fn validate_depends_on(p: &mut Problems, names: &[String], deps: &[Vec<String>]) {
    for problem in dependency_problems(names, deps) {
        let i = problem.service();
        let at = match problem.entry() {
            Some(k) => format!("services[{i}].depends_on[{k}]"),
            None => format!("services[{i}].depends_on"),
        };
        p.add(at, problem.reason(deps, &|j| names[j].clone()));
    }
}

fn find_cycle(
    i: usize,
    edges: &[Vec<usize>],
    state: &mut [u8],
    path: &mut Vec<usize>,
) -> Option<Vec<usize>> {
    match state[i] {
        2 => return None,
        1 => {
            let from = path.iter().position(|&j| j == i).unwrap_or(0);
            return Some(path[from..].to_vec());
        }
        _ => {}
    }
    state[i] = 1;
    path.push(i);
    for &j in &edges[i] {
        if let Some(c) = find_cycle(j, edges, state, path) {
            // Leave the members marked done so the cycle is reported once.
            for &k in path.iter() {
                state[k] = 2;
            }
            return Some(c);
        }
    }
    path.pop();
    state[i] = 2;
    None
}

/// A fixed lead's duration written back as YAML would read it (for `prewarm plan`).
pub fn describe_lead(lead: Lead) -> String {
    match lead {
        Lead::Auto => "auto".into(),
        Lead::Fixed(d) => humantime::format_duration(d).to_string(),
    }
}
