//! What pre-warming will do, for people: `reveille prewarm plan` (text or JSON) and the
//! `prewarm` object of each service in the admin `/api/services`.

use std::fmt::Write as _;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::learn::History;
use super::plan::{plan, Planned};
use super::{lead, HORIZON};
use crate::config::{describe_lead, Config, Prewarm, Service};
use crate::gate::Gate;

/// One service's plan.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServicePlan {
    /// The service.
    pub service: String,
    /// `auto` or a duration, as configured.
    pub lead: String,
    /// The lead in force, in seconds.
    pub lead_seconds: f64,
    /// What it depends on (woken before it, also for its windows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// The windows of the next 7 days.
    pub windows: Vec<PlannedWindow>,
}

/// A planned window with its wake-up time.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlannedWindow {
    /// The window.
    #[serde(flatten)]
    pub window: Planned,
    /// When the service is woken for it (`start` minus the lead).
    pub wake_at: Timestamp,
}

/// Every pre-warmed service's windows over the next 7 days from `now`, learned ones from
/// `history`. The lead is the configured one (`auto`: the least, 30 s; the observed cold
/// starts are only known to a running Reveille).
pub fn plan_config(cfg: &Config, now: Timestamp, history: &History) -> Vec<ServicePlan> {
    plans(cfg.services.iter().map(|s| (s, None)), now, |s, p| {
        super::learned_in(history, &s.name, p, now, now, HORIZON)
    })
}

/// Each pre-warmed service's plan over the next 7 days from `now`: `services` with their gate
/// when running (for the lead in force), `learned` giving a service's learned windows.
pub fn plans<'a>(
    services: impl IntoIterator<Item = (&'a Service, Option<&'a Gate>)>,
    now: Timestamp,
    learned: impl Fn(&Service, &Prewarm) -> Vec<Planned>,
) -> Vec<ServicePlan> {
    services
        .into_iter()
        .filter_map(|(s, gate)| {
            let p = s.prewarm.as_ref()?;
            let windows = learned(s, p);
            Some(service_plan(&s.name, p, &s.depends_on, gate, now, &windows))
        })
        .collect()
}

/// One service's windows over the next 7 days from `now`, woken `lead` before each: the
/// configured lead, or with `gate` (a running Reveille) the lead in force (`auto`: the observed
/// p90 cold start).
fn service_plan(
    name: &str,
    p: &Prewarm,
    depends_on: &[String],
    gate: Option<&Gate>,
    now: Timestamp,
    learned: &[Planned],
) -> ServicePlan {
    let lead = lead(p, gate);
    let windows = plan(p, learned, now, HORIZON)
        .into_iter()
        .map(|w| PlannedWindow {
            wake_at: w.wake_at(lead),
            window: w,
        })
        .collect();
    ServicePlan {
        service: name.to_string(),
        lead: describe_lead(p.lead),
        lead_seconds: lead.as_secs_f64(),
        depends_on: depends_on.to_vec(),
        windows,
    }
}

/// The plan of a running Reveille, as `/api/prewarm` and `prewarm plan --admin` show it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Plans {
    /// Each pre-warmed service's plan.
    pub services: Vec<ServicePlan>,
}

/// The plan as text, one block per service.
pub fn plan_text(plans: &[ServicePlan]) -> String {
    let mut out = String::new();
    if plans.is_empty() {
        out.push_str("no service has `prewarm:`\n");
    }
    for p in plans {
        let deps = if p.depends_on.is_empty() {
            String::new()
        } else {
            format!(", depends on {}", p.depends_on.join(", "))
        };
        let _ = writeln!(
            out,
            "{} (lead {}{}{})",
            p.service,
            p.lead,
            if p.lead == "auto" {
                format!(": {}", humantime::format_duration(secs(p.lead_seconds)))
            } else {
                String::new()
            },
            deps
        );
        if p.windows.is_empty() {
            out.push_str("  no window in the next 7 days\n");
        }
        for w in &p.windows {
            let utc = |t: Timestamp| {
                t.to_zoned(jiff::tz::TimeZone::UTC)
                    .strftime("%a %Y-%m-%d %H:%M")
                    .to_string()
            };
            let _ = write!(
                out,
                "  {:<8}  {} -> {} UTC  (woken {})",
                w.window.source.as_str(),
                utc(w.window.start),
                w.window
                    .end
                    .to_zoned(jiff::tz::TimeZone::UTC)
                    .strftime("%H:%M"),
                w.wake_at
                    .to_zoned(jiff::tz::TimeZone::UTC)
                    .strftime("%H:%M:%S"),
            );
            if let Some(e) = &w.window.evidence {
                let _ = write!(out, "  {e}");
            }
            out.push('\n');
        }
    }
    out
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// The `prewarm` object of a service in `/api/services`: the next (or current) window, its
/// source, whether the service is being kept up for one now, and the lead in force.
pub fn status(p: &Prewarm, gate: &Gate, now: Timestamp, learned: &[Planned]) -> Value {
    let lead = lead(p, Some(gate));
    let windows = plan(p, learned, now, HORIZON);
    let next = windows.iter().find(|w| w.end > now);
    let active = windows
        .iter()
        .any(|w| w.wake_at(lead) <= now && now < w.end);
    json!({
        "lead": describe_lead(p.lead),
        "lead_seconds": lead.as_secs_f64(),
        "learn": p.learn,
        "active": active,
        "kept_awake": gate.kept_awake(),
        "next": next.map(|w| json!({
            "start": w.start,
            "end": w.end,
            "source": w.source,
            "wake_at": w.wake_at(lead),
            "evidence": w.evidence,
        })),
    })
}
