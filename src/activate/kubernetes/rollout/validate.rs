//! One pod's validation and what follows it on the API server: the steps run in order against
//! the pod's own address (it is not ready yet, so no Service routes to it), then the pod's
//! `reveille.dev/validated` condition is set, and a failure is also recorded as a Kubernetes
//! Event on the pod. The rollback patch lives here too.
//!
//! A step may go `via` another service (one of its ready endpoints, through its gate: woken
//! and held like any request), check the body (`expect_body`, `expect_json`), carry the
//! candidate's version in a header, and repeat every `retry_every` until it passes or its
//! `timeout` runs out (the last attempt's reason is reported).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};

use super::board::Board;
use crate::config::ValidationStep;

/// The pod condition type (and readiness gate) Reveille owns.
pub const CONDITION: &str = "reveille.dev/validated";
/// The condition's reason after a failed validation; such a pod is not validated again.
pub const REASON_FAILED: &str = "ValidationFailed";
/// The condition's reason after every step passed.
pub const REASON_PASSED: &str = "Validated";
/// Largest response body read from a step (the rest is not waited for).
const MAX_STEP_RESPONSE: usize = 64 * 1024;
/// Longest excerpt of a response body quoted in a failure message.
const EXCERPT: usize = 80;

/// The client validation steps use: plain HTTP/1.1, a fresh connection per pod is fine.
pub type StepClient = Client<HttpConnector, Full<Bytes>>;

/// A client for validation steps.
pub fn step_client() -> StepClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(c)
}

/// What a pod's steps run against: the pod's own address, its version (for
/// `version_header`), and the other services (for `via`).
#[derive(Clone)]
pub struct Target {
    /// The new pod.
    pub pod: SocketAddr,
    /// The pod's version (`pod-template-hash`).
    pub version: String,
    /// Where `via` services are found.
    pub board: Arc<Board>,
}

/// Runs `steps` in order against `target`; `on_step(i)` is called as step `i` starts. The
/// error names the failed step: `step 2 (POST /validate): status 500, expected 200`.
pub async fn run_steps(
    client: &StepClient,
    target: &Target,
    steps: &[ValidationStep],
    mut on_step: impl FnMut(usize),
) -> Result<(), String> {
    for (i, step) in steps.iter().enumerate() {
        on_step(i);
        let name = match &step.via {
            Some(via) => format!("step {} ({} {} via {via})", i + 1, step.method, step.path),
            None => format!("step {} ({} {})", i + 1, step.method, step.path),
        };
        run_step(client, target, step)
            .await
            .map_err(|why| format!("{name}: {why}"))?;
    }
    Ok(())
}

/// One step: attempts until one passes, every `retry_every`, all within `timeout`.
async fn run_step(
    client: &StepClient,
    target: &Target,
    step: &ValidationStep,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + step.timeout;
    let within = humantime::format_duration(step.timeout);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let why = match tokio::time::timeout_at(deadline, attempt(client, target, step, deadline))
            .await
        {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(why)) => why,
            Err(_) if attempts == 1 => return Err(format!("no answer within {within}")),
            Err(_) => return Err(format!("no answer within {within} ({attempts} attempts)")),
        };
        let Some(every) = step.retry_every else {
            return Err(why);
        };
        if tokio::time::Instant::now() + every >= deadline {
            return Err(format!(
                "{why} (still after {attempts} attempts in {within})"
            ));
        }
        tokio::time::sleep(every).await;
    }
}

/// One attempt of a step: where it goes, the request, and the checks of the answer.
async fn attempt(
    client: &StepClient,
    target: &Target,
    step: &ValidationStep,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    // Through the other service's gate: woken if need be, counted in flight while it runs.
    let (addr, _permit) = match &step.via {
        None => (target.pod, None),
        Some(via) => {
            let gate = target
                .board
                .gate(via)
                .ok_or_else(|| format!("service {via:?} is not running"))?;
            let acquired = gate
                .acquire(deadline)
                .await
                .map_err(|e| format!("service {via:?}: {e}"))?;
            (acquired.permit.endpoint().addr, Some(acquired.permit))
        }
    };
    let body = step.body.clone().unwrap_or_default();
    let mut req = Request::builder()
        .method(step.method.clone())
        .uri(format!("http://{addr}{}", step.path))
        .header(header::HOST, addr.to_string())
        .header(header::USER_AGENT, "reveille-rollout-validation");
    if body.starts_with('{') || body.starts_with('[') {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(h) = &step.version_header {
        req = req.header(h, target.version.as_str());
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = client.request(req).await.map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        msg
    })?;
    let got = resp.status().as_u16();
    // Read (a bounded part of) the body so the exchange completes within the step's timeout.
    let mut body = resp.into_body();
    let mut read = Vec::new();
    let mut whole = true;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the response: {e}"))?;
        if let Some(d) = frame.data_ref() {
            if read.len() + d.len() > MAX_STEP_RESPONSE {
                whole = false;
                break;
            }
            read.extend_from_slice(d);
        }
    }
    if got != step.expect_status {
        return Err(format!("status {got}, expected {}", step.expect_status));
    }
    check_body(step, &read, whole)
}

/// `expect_body` and `expect_json` on a response body (`whole`: it was read to its end).
fn check_body(step: &ValidationStep, body: &[u8], whole: bool) -> Result<(), String> {
    if step.expect_body.is_none() && step.expect_json.is_none() {
        return Ok(());
    }
    if !whole {
        return Err(format!("body over {MAX_STEP_RESPONSE} bytes, not checked"));
    }
    let text = String::from_utf8_lossy(body);
    if let Some(re) = &step.expect_body {
        if !re.0.is_match(&text) {
            return Err(format!(
                "body {:?} does not match {:?}",
                excerpt(&text),
                re.0.as_str()
            ));
        }
    }
    if let Some(want) = &step.expect_json {
        let doc: serde_json::Value = serde_json::from_slice(body)
            .map_err(|_| format!("body {:?} is not JSON", excerpt(&text)))?;
        let path = want.path.as_str();
        match want.path.lookup(&doc) {
            Some(v) if *v == want.equals => {}
            Some(v) => return Err(format!("{path} is {v}, expected {}", want.equals)),
            None => return Err(format!("{path} is missing, expected {}", want.equals)),
        }
    }
    Ok(())
}

/// The start of `text`, for a failure message.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// Where a pod is validated: its address in the EndpointSlice (which names the port), else
/// its IP and the configured port.
pub fn pod_addr(
    pod: &Pod,
    endpoints: &[super::super::endpoints::SliceEndpoint],
    port: &crate::config::PortRef,
) -> Result<SocketAddr, String> {
    let name = pod.metadata.name.as_deref();
    if let Some(ep) = endpoints.iter().find(|e| e.pod.as_deref() == name) {
        return Ok(ep.addr);
    }
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| "the pod has no IP".to_string())?;
    let port = match port {
        crate::config::PortRef::Number(n) => *n,
        crate::config::PortRef::Name(p) => {
            container_port(pod, p).ok_or_else(|| format!("no container port named {p:?}"))?
        }
    };
    Ok(SocketAddr::new(ip, port))
}

/// With `overlap: none`, what is wrong with the Deployment's strategy, if anything: only
/// `Recreate` removes the old pods before starting new ones (absent means `RollingUpdate`).
pub fn overlap_warning(overlap: crate::config::Overlap, d: &Deployment) -> Option<String> {
    if overlap != crate::config::Overlap::None {
        return None;
    }
    let strategy = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("RollingUpdate");
    (strategy != "Recreate").then(|| {
        format!(
            "overlap: none, but the Deployment's strategy is {strategy}: old and new pods run \
             together; set `strategy: {{ type: Recreate }}`"
        )
    })
}

/// Now in RFC 3339, seconds precision (Kubernetes' `metav1.Time`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Sets the pod's `reveille.dev/validated` condition (a strategic merge patch of `status`,
/// merged by condition type, as kubelet and controllers do).
pub async fn set_condition(
    pods: &Api<Pod>,
    pod: &str,
    passed: bool,
    message: &str,
) -> Result<(), kube::Error> {
    let patch = json!({
        "status": {"conditions": [{
            "type": CONDITION,
            "status": if passed { "True" } else { "False" },
            "reason": if passed { REASON_PASSED } else { REASON_FAILED },
            "message": message,
            "lastTransitionTime": now_rfc3339(),
        }]}
    });
    pods.patch_status(pod, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map(|_| ())
}

/// Records a failed validation as a Warning Event on the pod (core/v1, what `kubectl describe
/// pod` shows).
pub async fn failure_event(
    events: &Api<Event>,
    pod: &Pod,
    message: &str,
) -> Result<(), kube::Error> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let now = now_rfc3339();
    let ev: Event = serde_json::from_value(json!({
        "metadata": {"generateName": format!("{name}.reveille-"), "namespace": pod.metadata.namespace},
        "involvedObject": {
            "apiVersion": "v1", "kind": "Pod", "name": name,
            "namespace": pod.metadata.namespace, "uid": pod.metadata.uid,
        },
        "reason": REASON_FAILED,
        "message": message,
        "type": "Warning",
        "source": {"component": "reveille"},
        "reportingComponent": "reveille.dev/rollout",
        "reportingInstance": "reveille",
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }))
    .expect("an Event from known fields");
    events.create(&PostParams::default(), &ev).await.map(|_| ())
}

/// The revision of a ReplicaSet (`deployment.kubernetes.io/revision`), 0 when absent.
pub fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("deployment.kubernetes.io/revision"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What a rollback did.
#[derive(Debug, PartialEq, Eq)]
pub enum Rollback {
    /// The Deployment's template was replaced with the one of this revision.
    Done(i64),
    /// Nothing to do: the Deployment no longer runs the failed version, or no older revision.
    Skipped(&'static str),
}

/// Patches the Deployment back to the pod template of the newest revision older than the
/// failed version (`failed`: its `pod-template-hash`), as `kubectl rollout undo` does: a JSON
/// patch replacing `spec.template`, the hash label removed. Only while the failed version is
/// still the Deployment's newest revision (a newer rollout since then wins).
pub async fn rollback(
    deployments: &Api<Deployment>,
    name: &str,
    replicasets: &[std::sync::Arc<ReplicaSet>],
    failed: &str,
) -> Result<Rollback, kube::Error> {
    let deploy = deployments.get(name).await?;
    let uid = deploy.metadata.uid.clone().unwrap_or_default();
    let mut owned: Vec<&ReplicaSet> = replicasets
        .iter()
        .map(|rs| &**rs)
        .filter(|rs| {
            rs.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == uid)
        })
        .collect();
    owned.sort_by_key(|rs| std::cmp::Reverse(revision(rs)));
    fn hash(rs: &ReplicaSet) -> &str {
        template_hash(&rs.metadata).map_or("", String::as_str)
    }
    match owned.first() {
        Some(newest) if hash(newest) == failed => {}
        _ => {
            return Ok(Rollback::Skipped(
                "the failed version is no longer the newest",
            ))
        }
    }
    let Some(previous) = owned.get(1) else {
        return Ok(Rollback::Skipped("no previous revision"));
    };
    let Some(template) = previous.spec.as_ref().and_then(|s| s.template.as_ref()) else {
        return Ok(Rollback::Skipped("the previous revision has no template"));
    };
    let mut template: Value = serde_json::to_value(template).expect("a template serializes");
    if let Some(labels) = template["metadata"]["labels"].as_object_mut() {
        labels.remove("pod-template-hash");
    }
    let patch = json!([
        {"op": "replace", "path": "/spec/template", "value": template}
    ]);
    deployments
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(patch).expect("a JSON patch")),
        )
        .await?;
    Ok(Rollback::Done(revision(previous)))
}

/// Whether `pod` carries the `reveille.dev/validated` readiness gate.
pub fn gated(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.condition_type == CONDITION))
}

/// The pod's condition of `type_`: (status, reason).
pub fn condition<'a>(pod: &'a Pod, type_: &str) -> Option<(&'a str, Option<&'a str>)> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_deref()))
}

/// A port named `name` in the pod's containers.
pub fn container_port(pod: &Pod, name: &str) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// How long ago the pod was created, if it says.
pub fn age(pod: &Pod) -> Option<Duration> {
    let created = SystemTime::from(pod.metadata.creation_timestamp.as_ref()?.0);
    SystemTime::now().duration_since(created).ok()
}

/// A pod's or ReplicaSet's version: its `pod-template-hash` label.
pub fn template_hash(meta: &ObjectMeta) -> Option<&String> {
    meta.labels.as_ref()?.get("pod-template-hash")
}

/// Bound on one API call of the rollout controller.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_comes_from_the_creation_timestamp() {
        let pod = |ts: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p", "creationTimestamp": ts}}))
                .unwrap()
        };
        let an_hour_ago =
            humantime::format_rfc3339_seconds(SystemTime::now() - Duration::from_secs(3600))
                .to_string();
        let a = age(&pod(&an_hour_ago)).unwrap();
        assert!(
            a >= Duration::from_secs(3600) && a < Duration::from_secs(3700),
            "{a:?}"
        );
        assert_eq!(age(&Pod::default()), None);
    }

    #[tokio::test]
    async fn steps_run_in_order_and_the_failure_names_the_step() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Answers /ok with 200 and anything else with 503; records the request lines.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap();
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    let line = text.lines().next().unwrap_or("").to_string();
                    let code = if line.contains(" /ok ") {
                        "200 OK"
                    } else {
                        "503 Busy"
                    };
                    tx.send(text).unwrap();
                    let _ = s
                        .write_all(format!("HTTP/1.1 {code}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi").as_bytes())
                        .await;
                });
            }
        });
        let step = |m: &str, p: &str, body: Option<&str>| ValidationStep {
            method: m.parse().unwrap(),
            path: p.into(),
            body: body.map(str::to_string),
            expect_status: 200,
            timeout: Duration::from_secs(5),
            expect_body: None,
            expect_json: None,
            via: None,
            retry_every: None,
            version_header: None,
        };
        let client = step_client();
        let target = |addr| Target {
            pod: addr,
            version: "v2".into(),
            board: Arc::default(),
        };
        let mut seen = Vec::new();
        let r = run_steps(
            &client,
            &target(addr),
            &[
                step("GET", "/ok", None),
                step("POST", "/ok", Some("{\"dry_run\":true}")),
            ],
            |i| seen.push(i),
        )
        .await;
        assert_eq!(r, Ok(()));
        assert_eq!(seen, vec![0, 1]);
        assert!(rx.recv().await.unwrap().starts_with("GET /ok "));
        let post = rx.recv().await.unwrap();
        assert!(post.starts_with("POST /ok "), "{post}");
        assert!(
            post.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{post}"
        );
        assert!(post.ends_with("{\"dry_run\":true}"), "{post}");
        let r = run_steps(
            &client,
            &target(addr),
            &[
                step("GET", "/ok", None),
                step("POST", "/validate", None),
                step("GET", "/ok", None),
            ],
            |_| {},
        )
        .await;
        assert_eq!(
            r,
            Err("step 2 (POST /validate): status 503, expected 200".into())
        );
        // A closed port: the step fails with the connect error, not a hang.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let r = run_steps(
            &client,
            &target(closed),
            &[step("GET", "/healthz", None)],
            |_| {},
        )
        .await;
        let e = r.unwrap_err();
        assert!(e.starts_with("step 1 (GET /healthz): "), "{e}");
    }

    fn checked(yaml_step: &str, body: &str) -> Result<(), String> {
        let doc = format!(
            "services:\n  - name: a\n    hosts: [a.test]\n    backend:\n      kubernetes: {{ namespace: ns, deployment: web, service: web, port: http }}\n    rollout: {{ validation: [ {yaml_step} ] }}\n"
        );
        let c = crate::Config::parse_with_env(&doc, &|_| None).unwrap();
        let crate::config::Backend::Kubernetes(k) = &c.services[0].backend else {
            unreachable!()
        };
        check_body(
            &k.rollout.as_ref().unwrap().validation[0],
            body.as_bytes(),
            true,
        )
    }

    #[test]
    fn the_body_is_checked_by_regex_and_json_path() {
        let re = "{ path: /x, expect_body: '^ok' }";
        assert_eq!(checked(re, "ok, arrived"), Ok(()));
        assert_eq!(
            checked(re, "not yet"),
            Err("body \"not yet\" does not match \"^ok\"".into())
        );
        let js = "{ path: /x, expect_json: { path: '$.records[0].status', equals: ok } }";
        assert_eq!(checked(js, r#"{"records":[{"status":"ok"}]}"#), Ok(()));
        assert_eq!(
            checked(js, r#"{"records":[{"status":"pending"}]}"#),
            Err("$.records[0].status is \"pending\", expected \"ok\"".into())
        );
        assert_eq!(
            checked(js, r#"{"records":[]}"#),
            Err("$.records[0].status is missing, expected \"ok\"".into())
        );
        assert_eq!(
            checked(js, "<html>"),
            Err("body \"<html>\" is not JSON".into())
        );
        let num = "{ path: /x, expect_json: { path: $.count, equals: 3 } }";
        assert_eq!(checked(num, r#"{"count":3}"#), Ok(()));
        assert!(checked(num, r#"{"count":"3"}"#).is_err(), "types differ");
        // No body check: any body passes.
        assert_eq!(checked("{ path: /x }", "anything"), Ok(()));
        let long = "x".repeat(200);
        let e = checked(re, &long).unwrap_err();
        assert!(e.len() < 150 && e.contains('…'), "{e}");
    }

    #[test]
    fn overlap_none_warns_unless_the_strategy_is_recreate() {
        use crate::config::Overlap;
        let d = |strategy: Option<&str>| -> Deployment {
            let spec = match strategy {
                Some(t) => json!({"selector": {}, "strategy": {"type": t}}),
                None => json!({"selector": {}}),
            };
            serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": spec})).unwrap()
        };
        assert_eq!(overlap_warning(Overlap::None, &d(Some("Recreate"))), None);
        let w = overlap_warning(Overlap::None, &d(None)).unwrap();
        assert!(w.contains("strategy is RollingUpdate"), "{w}");
        assert!(overlap_warning(Overlap::None, &d(Some("RollingUpdate"))).is_some());
        assert_eq!(overlap_warning(Overlap::Allowed, &d(None)), None);
    }
}
