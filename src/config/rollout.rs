//! A service's `rollout:` section (Kubernetes Deployments only): the validation steps run
//! against each new version's pods before they get traffic, how long the old version's
//! in-flight requests may finish at the switch, and what a failed validation does.
//! Raw YAML shape here, checked into [`Rollout`] with every problem's field path.
//!
//! A step may check data flow, not just a status: the body (`expect_body`, `expect_json`),
//! another service's answer (`via`), repeated until it passes within its `timeout`
//! (`retry_every`), carrying the candidate's version in a header (`version_header`).

use std::time::Duration;

use serde::Deserialize;

use super::json_path::JsonPath;
use super::{HumanDuration, Problems};

/// Default bound on one validation step (connect, send, response headers).
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on waiting for the old version's in-flight requests at the switch.
pub const DEFAULT_QUIESCE: Duration = Duration::from_secs(5);
/// Most validation steps a service may list.
pub const MAX_STEPS: usize = 32;
/// Largest request body a step may send, in bytes.
pub const MAX_STEP_BODY: usize = 64 * 1024;
/// Shortest `retry_every` (a step must not hammer what it polls).
pub const MIN_RETRY_EVERY: Duration = Duration::from_millis(100);
/// Largest compiled `expect_body` regex, in bytes (bounds memory and matching time).
const MAX_REGEX_SIZE: usize = 256 * 1024;

/// Controlled rollouts of a Deployment: new versions are validated, then switched to at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// Steps run in order against each new pod (its IP, before it is ready); all must pass.
    pub validation: Vec<ValidationStep>,
    /// Bound on waiting for the old version's in-flight requests at the switch (default 5s).
    pub quiesce: Duration,
    /// What a failed validation does besides reporting (default `hold`).
    pub on_failure: OnFailure,
    /// A rollout that starts while the service is at zero (default `wait`).
    pub at_zero: AtZero,
    /// Services (with `rollout:`) whose rollout must have completed before this service's
    /// new pods are validated (default none).
    pub after: Vec<String>,
    /// Whether two versions may run at once (default `allowed`); `none` expects the
    /// Deployment's `strategy: Recreate` and says so when it sees another strategy.
    pub overlap: Overlap,
    /// After the steps pass: switch at once (`auto`, default) or wait for
    /// `reveille rollout promote|abort` (`manual`).
    pub promotion: Promotion,
    /// With `promotion: manual`: requests with `<this header>: candidate` reach the candidate
    /// awaiting promotion (default: none, the candidate is unreachable).
    pub candidate_header: Option<http::HeaderName>,
}

/// `promotion:`: who decides the switch once the steps passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    /// Reveille, at once.
    Auto,
    /// Someone, through the admin API (`reveille rollout promote|abort SERVICE`).
    Manual,
}

/// `overlap:`: whether the Deployment may run two versions at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// A rolling update: old and new pods run side by side (traffic still goes to one).
    Allowed,
    /// Never two versions at once (`strategy: Recreate`): the old pods are gone before the new
    /// ones start; requests are held in between.
    None,
}

impl Overlap {
    /// The name in the config and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Allowed => "allowed",
            Overlap::None => "none",
        }
    }
}

/// What a rollout that starts while the service is scaled to zero does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtZero {
    /// Validate the new version when the service is next woken by a request.
    Wait,
    /// Wake the service now to validate it (it scales to zero again after `idle_timeout`).
    Wake,
}

/// One validation request and the status it must get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationStep {
    /// HTTP method (default `GET`).
    pub method: http::Method,
    /// Request path (and query), starting with `/`.
    pub path: String,
    /// Request body (default empty); sent with `content-type: application/json` when it
    /// starts with `{` or `[`.
    pub body: Option<String>,
    /// The status the response must have (default 200).
    pub expect_status: u16,
    /// Bound on the step, from connect to the response's end (default 10s); with
    /// `retry_every`, on all its attempts together.
    pub timeout: Duration,
    /// The response body must match this regex (somewhere; anchor it with `^…$` for all).
    pub expect_body: Option<BodyRegex>,
    /// The response body must be JSON with this value at this path.
    pub expect_json: Option<ExpectJson>,
    /// Send the step to this configured service (a ready endpoint of it, woken if need be)
    /// instead of the new pod: "did the record the new version wrote arrive?".
    pub via: Option<String>,
    /// Repeat a failing attempt this often until one passes or `timeout` runs out.
    pub retry_every: Option<Duration>,
    /// Send the candidate's version (its `pod-template-hash`) in this request header.
    pub version_header: Option<http::HeaderName>,
}

/// `expect_body`: a compiled regex, compared by its source (configs are compared on reload).
#[derive(Debug, Clone)]
pub struct BodyRegex(pub regex::Regex);

impl PartialEq for BodyRegex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}
impl Eq for BodyRegex {}

/// `expect_json`: the value at `path` must equal `equals`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectJson {
    /// Where to look (see [`JsonPath`] for the subset of JSONPath supported).
    pub path: JsonPath,
    /// The value wanted there (any JSON value; `"ok"`, `3`, `true`, `{...}`).
    pub equals: serde_json::Value,
}

/// What a failed validation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Keep the old version serving; the new pods stay unready (the Deployment's rollout stalls).
    Hold,
    /// Also patch the Deployment back to the previous revision's pod template.
    Rollback,
}

impl OnFailure {
    /// The name in the config and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Hold => "hold",
            OnFailure::Rollback => "rollback",
        }
    }
}

/// `rollout:` as written.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawRollout {
    #[serde(default)]
    validation: Vec<RawStep>,
    quiesce: Option<HumanDuration>,
    on_failure: Option<String>,
    at_zero: Option<String>,
    #[serde(default)]
    after: Vec<String>,
    overlap: Option<String>,
    promotion: Option<String>,
    candidate_header: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawStep {
    method: Option<String>,
    path: Option<String>,
    body: Option<String>,
    expect_status: Option<i64>,
    timeout: Option<HumanDuration>,
    expect_body: Option<String>,
    expect_json: Option<RawExpectJson>,
    via: Option<String>,
    retry_every: Option<HumanDuration>,
    version_header: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawExpectJson {
    path: String,
    equals: serde_json::Value,
}

pub(crate) fn validate(p: &mut Problems, at: &str, raw: RawRollout) -> Rollout {
    if raw.validation.len() > MAX_STEPS {
        p.add(
            format!("{at}.validation"),
            format!("at most {MAX_STEPS} steps"),
        );
    }
    let validation = raw
        .validation
        .into_iter()
        .enumerate()
        .map(|(i, s)| step(p, &format!("{at}.validation[{i}]"), s))
        .collect();
    let quiesce = raw.quiesce.map(|d| d.0).unwrap_or(DEFAULT_QUIESCE);
    if quiesce > Duration::from_secs(300) {
        p.add(format!("{at}.quiesce"), "must be at most 5m");
    }
    let on_failure = match raw.on_failure.as_deref() {
        None | Some("hold") => OnFailure::Hold,
        Some("rollback") => OnFailure::Rollback,
        Some(other) => {
            p.add(
                format!("{at}.on_failure"),
                format!("{other:?}: must be `hold` or `rollback`"),
            );
            OnFailure::Hold
        }
    };
    let at_zero = match raw.at_zero.as_deref() {
        None | Some("wait") => AtZero::Wait,
        Some("wake") => AtZero::Wake,
        Some(other) => {
            p.add(
                format!("{at}.at_zero"),
                format!("{other:?}: must be `wait` or `wake`"),
            );
            AtZero::Wait
        }
    };
    let overlap = match raw.overlap.as_deref() {
        None | Some("allowed") => Overlap::Allowed,
        Some("none") => Overlap::None,
        Some(other) => {
            p.add(
                format!("{at}.overlap"),
                format!("{other:?}: must be `allowed` or `none`"),
            );
            Overlap::Allowed
        }
    };
    let promotion = match raw.promotion.as_deref() {
        None | Some("auto") => Promotion::Auto,
        Some("manual") => Promotion::Manual,
        Some(other) => {
            p.add(
                format!("{at}.promotion"),
                format!("{other:?}: must be `auto` or `manual`"),
            );
            Promotion::Auto
        }
    };
    let candidate_header = raw.candidate_header.as_ref().and_then(|h| {
        let at = format!("{at}.candidate_header");
        if promotion != Promotion::Manual {
            p.add(&at, "only with `promotion: manual`");
        }
        http::HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| p.add(&at, format!("{h:?} is not a header name")))
            .ok()
    });
    Rollout {
        validation,
        quiesce,
        on_failure,
        at_zero,
        after: raw.after,
        overlap,
        promotion,
        candidate_header,
    }
}

fn step(p: &mut Problems, at: &str, mut s: RawStep) -> ValidationStep {
    let method = match s.method.as_deref() {
        None => http::Method::GET,
        Some(m) => match http::Method::from_bytes(m.as_bytes()) {
            Ok(method) if m.bytes().all(|b| b.is_ascii_uppercase()) => method,
            _ => {
                p.add(
                    format!("{at}.method"),
                    format!("{m:?}: must be an upper-case HTTP method like GET or POST"),
                );
                http::Method::GET
            }
        },
    };
    let path = s.path.take().unwrap_or_default();
    if !path.starts_with('/') {
        p.add(format!("{at}.path"), "is required and must start with `/`");
    } else if path.parse::<http::uri::PathAndQuery>().is_err() {
        p.add(
            format!("{at}.path"),
            format!("{path:?} is not a valid path"),
        );
    }
    if s.body.as_ref().is_some_and(|b| b.len() > MAX_STEP_BODY) {
        p.add(
            format!("{at}.body"),
            format!("at most {MAX_STEP_BODY} bytes"),
        );
    }
    let expect_status = match s.expect_status {
        None => 200,
        Some(n) if (100..=599).contains(&n) => n as u16,
        Some(n) => {
            p.add(
                format!("{at}.expect_status"),
                format!("{n} is not an HTTP status (100-599)"),
            );
            200
        }
    };
    let timeout = s.timeout.map(|d| d.0).unwrap_or(DEFAULT_STEP_TIMEOUT);
    if timeout.is_zero() {
        p.add(format!("{at}.timeout"), "must be greater than 0");
    }
    let data = data_flow(p, at, &s, timeout);
    ValidationStep {
        method,
        path,
        body: s.body.take(),
        expect_status,
        timeout,
        expect_body: data.0,
        expect_json: data.1,
        via: s.via.take(),
        retry_every: data.2,
        version_header: data.3,
    }
}

/// The `rollout:` of a service, if it has one.
fn rollout_of(s: &super::Service) -> Option<&Rollout> {
    match &s.backend {
        super::Backend::Kubernetes(k) => k.rollout.as_ref(),
        _ => None,
    }
}

/// What can only be checked with every service known: a step's `via` names another service
/// that speaks plain HTTP/1.1 (the step client's protocol); `after` names other services with
/// `rollout:`, and the order has no cycle.
pub(crate) fn check_references(p: &mut Problems, services: &[super::Service]) {
    for (i, s) in services.iter().enumerate() {
        let Some(r) = rollout_of(s) else { continue };
        for (j, name) in r.after.iter().enumerate() {
            let at = format!("services[{i}].rollout.after[{j}]");
            match services.iter().find(|o| &o.name == name) {
                None => p.add(at, format!("{name:?}: no such service")),
                Some(o) if o.name == s.name => p.add(at, "names this service"),
                Some(o) if rollout_of(o).is_none() => {
                    p.add(at, format!("{name:?} has no `rollout:` to wait for"))
                }
                Some(_) => {}
            }
        }
        if let Some(cycle) = cycle_from(services, &s.name) {
            p.add(
                format!("services[{i}].rollout.after"),
                format!("a cycle: {}", cycle.join(" → ")),
            );
        }
        for (j, step) in r.validation.iter().enumerate() {
            let Some(via) = &step.via else { continue };
            let at = format!("services[{i}].rollout.validation[{j}].via");
            match services.iter().find(|o| &o.name == via) {
                None => p.add(at, format!("{via:?}: no such service")),
                Some(o) if o.name == s.name => p.add(
                    at,
                    "names this service (leave `via` out to check the new pod)",
                ),
                Some(o) if o.protocol != super::Protocol::Http1 => p.add(
                    at,
                    format!("{via:?} must speak plain HTTP/1.1 (`protocol: http1`, the default)"),
                ),
                Some(_) => {}
            }
        }
    }
}

/// A path of `after` edges from `start` back to `start`, if there is one.
fn cycle_from(services: &[super::Service], start: &str) -> Option<Vec<String>> {
    let after = |name: &str| -> Vec<String> {
        services
            .iter()
            .find(|s| s.name == name)
            .and_then(rollout_of)
            .map(|r| r.after.clone())
            .unwrap_or_default()
    };
    // Depth-first, each service visited once (the graph is at most the services).
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    while let Some((name, path)) = stack.pop() {
        for next in after(&name) {
            if next == start && next != name {
                let mut cycle = path.clone();
                cycle.push(next);
                return Some(cycle);
            }
            if next != name && seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next, p));
            }
        }
    }
    None
}

type DataFlow = (
    Option<BodyRegex>,
    Option<ExpectJson>,
    Option<Duration>,
    Option<http::HeaderName>,
);

/// The data-flow fields of a step (`via` is checked against the other services later).
fn data_flow(p: &mut Problems, at: &str, s: &RawStep, timeout: Duration) -> DataFlow {
    let expect_body = s.expect_body.as_ref().and_then(|re| {
        regex::RegexBuilder::new(re)
            .size_limit(MAX_REGEX_SIZE)
            .build()
            .map_err(|e| p.add(format!("{at}.expect_body"), format!("not a regex: {e}")))
            .ok()
            .map(BodyRegex)
    });
    let expect_json = s.expect_json.as_ref().and_then(|j| {
        JsonPath::parse(&j.path)
            .map_err(|e| p.add(format!("{at}.expect_json.path"), e))
            .ok()
            .map(|path| ExpectJson {
                path,
                equals: j.equals.clone(),
            })
    });
    let retry_every = s.retry_every.as_ref().map(|d| d.0);
    if let Some(every) = retry_every {
        if every < MIN_RETRY_EVERY {
            p.add(format!("{at}.retry_every"), "must be at least 100ms");
        } else if every >= timeout {
            p.add(
                format!("{at}.retry_every"),
                "must be shorter than the step's timeout (the attempts share it)",
            );
        }
    }
    let version_header = s.version_header.as_ref().and_then(|h| {
        http::HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| {
                p.add(
                    format!("{at}.version_header"),
                    format!("{h:?} is not a header name"),
                )
            })
            .ok()
    });
    (expect_body, expect_json, retry_every, version_header)
}

#[cfg(test)]
mod tests {
    use crate::config::{Backend, Config};

    use super::*;

    fn parse(backend: &str, rollout: &str) -> Result<Option<Rollout>, Vec<String>> {
        let doc = format!(
            "services:\n  - name: a\n    hosts: [a.test]\n    backend:\n      {backend}\n    rollout: {rollout}\n"
        );
        match Config::parse_with_env(&doc, &|_| None) {
            Ok(c) => match &c.services[0].backend {
                Backend::Kubernetes(k) => Ok(k.rollout.clone()),
                other => panic!("{other:?}"),
            },
            Err(e) => Err(e.problems.iter().map(|p| p.to_string()).collect()),
        }
    }

    const DEPLOY: &str = "kubernetes: { namespace: ns, deployment: web, service: web, port: http }";

    #[test]
    fn parses_steps_with_defaults() {
        let r = parse(
            DEPLOY,
            "{ validation: [ { path: /healthz }, { method: POST, path: /validate, body: '{\"dry_run\":true}', expect_status: 204, timeout: 2s } ], quiesce: 1s, on_failure: rollback, at_zero: wake }",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.validation.len(), 2);
        assert_eq!(r.validation[0].method, http::Method::GET);
        assert_eq!(r.validation[0].expect_status, 200);
        assert_eq!(r.validation[0].timeout, DEFAULT_STEP_TIMEOUT);
        assert_eq!(r.validation[1].method, http::Method::POST);
        assert_eq!(r.validation[1].body.as_deref(), Some("{\"dry_run\":true}"));
        assert_eq!(r.validation[1].expect_status, 204);
        assert_eq!(r.validation[1].timeout, Duration::from_secs(2));
        assert_eq!(r.quiesce, Duration::from_secs(1));
        assert_eq!(r.on_failure, OnFailure::Rollback);
        assert_eq!(r.at_zero, AtZero::Wake);
        let none = parse(DEPLOY, "{ overlap: none }").unwrap().unwrap();
        assert_eq!(none.overlap, Overlap::None);
        let r = parse(DEPLOY, "{}").unwrap().unwrap();
        assert_eq!(r.quiesce, DEFAULT_QUIESCE);
        assert_eq!(r.on_failure, OnFailure::Hold);
        assert_eq!(r.at_zero, AtZero::Wait);
        assert_eq!(r.overlap, Overlap::Allowed);
    }

    #[test]
    fn every_problem_is_named() {
        let errs = parse(
            DEPLOY,
            "{ validation: [ { method: get, path: healthz, expect_status: 99, timeout: 0s } ], on_failure: retry, at_zero: now, overlap: never, promotion: later, candidate_header: x-v }",
        )
        .unwrap_err();
        for want in [
            "services[0].rollout.validation[0].method",
            "services[0].rollout.validation[0].path",
            "services[0].rollout.validation[0].expect_status",
            "services[0].rollout.validation[0].timeout",
            "services[0].rollout.on_failure",
            "services[0].rollout.at_zero",
            "services[0].rollout.overlap",
            "services[0].rollout.promotion",
            "services[0].rollout.candidate_header",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(want)), "{want}: {errs:?}");
        }
        let errs = parse(DEPLOY, "{ validation: [ { path: /x, nope: 1 } ] }").unwrap_err();
        assert!(errs.iter().any(|e| e.contains("nope")), "{errs:?}");
    }

    #[test]
    fn only_for_a_kubernetes_deployment() {
        let errs = parse("static: { addresses: [127.0.0.1:1] }", "{}").unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("services[0].rollout") && e.contains("Deployment")),
            "{errs:?}"
        );
        let errs = parse(
            "kubernetes: { namespace: ns, statefulset: web, service: web, port: http }",
            "{}",
        )
        .unwrap_err();
        assert!(
            errs.iter().any(|e| e.starts_with("services[0].rollout")),
            "{errs:?}"
        );
        assert_eq!(
            parse(DEPLOY, "null").unwrap(),
            None,
            "no rollout unless asked"
        );
    }

    #[test]
    fn data_flow_steps_parse_and_every_problem_is_named() {
        let r = parse(
            DEPLOY,
            "{ validation: [ { path: /r, expect_body: '^ok', expect_json: { path: '$.a[0]', equals: { b: 1 } }, retry_every: 2s, version_header: X-Candidate-Version } ] }",
        )
        .unwrap()
        .unwrap();
        let s = &r.validation[0];
        assert_eq!(s.expect_body.as_ref().unwrap().0.as_str(), "^ok");
        let j = s.expect_json.as_ref().unwrap();
        assert_eq!(j.path.as_str(), "$.a[0]");
        assert_eq!(j.equals, serde_json::json!({"b": 1}));
        assert_eq!(s.retry_every, Some(Duration::from_secs(2)));
        assert_eq!(s.version_header.as_ref().unwrap(), "x-candidate-version");
        assert_eq!(s.via, None);
        let errs = parse(
            DEPLOY,
            "{ validation: [ { path: /r, expect_body: '(', expect_json: { path: status, equals: ok }, retry_every: 10s, timeout: 5s, version_header: 'a b', via: nowhere } ] }",
        )
        .unwrap_err();
        for want in [
            "services[0].rollout.validation[0].expect_body: not a regex",
            "services[0].rollout.validation[0].expect_json.path",
            "services[0].rollout.validation[0].retry_every: must be shorter",
            "services[0].rollout.validation[0].version_header",
            "services[0].rollout.validation[0].via: \"nowhere\": no such service",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(want)), "{want}: {errs:?}");
        }
        let errs = parse(DEPLOY, "{ validation: [ { path: /r, via: a } ] }").unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("services[0].rollout.validation[0].via")
                    && e.contains("this service")),
            "{errs:?}"
        );
    }

    #[test]
    fn after_names_other_rollouts_without_a_cycle() {
        let doc = |api_after: &str, worker_after: &str| {
            format!(
                "services:\n  - name: api\n    hosts: [api.test]\n    backend:\n      {DEPLOY}\n    rollout: {{ after: {api_after} }}\n  - name: worker\n    hosts: [w.test]\n    backend:\n      kubernetes: {{ namespace: ns, deployment: w, service: w, port: http }}\n    rollout: {{ after: {worker_after} }}\n  - name: plain\n    hosts: [p.test]\n    backend:\n      static: {{ addresses: [127.0.0.1:1] }}\n"
            )
        };
        let errs = |a: &str, w: &str| -> Vec<String> {
            match Config::parse_with_env(&doc(a, w), &|_| None) {
                Ok(_) => vec![],
                Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
            }
        };
        assert_eq!(errs("[]", "[api]"), Vec::<String>::new());
        let c = Config::parse_with_env(&doc("[]", "[api]"), &|_| None).unwrap();
        match &c.services[1].backend {
            Backend::Kubernetes(k) => assert_eq!(k.rollout.as_ref().unwrap().after, ["api"]),
            other => panic!("{other:?}"),
        }
        let e = errs("[worker]", "[api]");
        assert!(
            e.iter()
                .any(|e| e.starts_with("services[0].rollout.after: a cycle: api → worker → api")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e.starts_with("services[1].rollout.after: a cycle")),
            "{e:?}"
        );
        let e = errs("[nope]", "[plain, worker]");
        for want in [
            "services[0].rollout.after[0]: \"nope\": no such service",
            "services[1].rollout.after[0]: \"plain\" has no `rollout:`",
            "services[1].rollout.after[1]: names this service",
        ] {
            assert!(e.iter().any(|e| e.starts_with(want)), "{want}: {e:?}");
        }
    }
}
