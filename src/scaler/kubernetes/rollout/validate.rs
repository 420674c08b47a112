//! One pod's validation and what follows it on the API server: the steps run in order against
//! the pod's own address (it is not ready yet, so no Service routes to it), then the pod's
//! `reveille.dev/validated` condition is set, and a failure is also recorded as a Kubernetes
//! Event on the pod. The rollback patch lives here too.

use std::net::SocketAddr;
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

use crate::config::ValidationStep;

/// The pod condition type (and readiness gate) Reveille owns.
pub const CONDITION: &str = "reveille.dev/validated";
/// The condition's reason after a failed validation; such a pod is not validated again.
pub const REASON_FAILED: &str = "ValidationFailed";
/// The condition's reason after every step passed.
pub const REASON_PASSED: &str = "Validated";
/// Largest response body read from a step (the rest is not waited for).
const MAX_STEP_RESPONSE: usize = 64 * 1024;

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

/// Runs `steps` in order against `addr`; `on_step(i)` is called as step `i` starts. The error
/// names the failed step: `step 2 (POST /validate): status 500, expected 200`.
pub async fn run_steps(
    client: &StepClient,
    addr: SocketAddr,
    steps: &[ValidationStep],
    mut on_step: impl FnMut(usize),
) -> Result<(), String> {
    for (i, step) in steps.iter().enumerate() {
        on_step(i);
        let name = format!("step {} ({} {})", i + 1, step.method, step.path);
        match tokio::time::timeout(step.timeout, one_step(client, addr, step)).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(format!("{name}: {why}")),
            Err(_) => {
                return Err(format!(
                    "{name}: no answer within {}",
                    humantime::format_duration(step.timeout)
                ))
            }
        }
    }
    Ok(())
}

async fn one_step(
    client: &StepClient,
    addr: SocketAddr,
    step: &ValidationStep,
) -> Result<(), String> {
    let body = step.body.clone().unwrap_or_default();
    let mut req = Request::builder()
        .method(step.method.clone())
        .uri(format!("http://{addr}{}", step.path))
        .header(header::HOST, addr.to_string())
        .header(header::USER_AGENT, "reveille-rollout-validation");
    if body.starts_with('{') || body.starts_with('[') {
        req = req.header(header::CONTENT_TYPE, "application/json");
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
    let mut read = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the response: {e}"))?;
        if let Some(d) = frame.data_ref() {
            read += d.len();
            if read > MAX_STEP_RESPONSE {
                break;
            }
        }
    }
    if got != step.expect_status {
        return Err(format!("status {got}, expected {}", step.expect_status));
    }
    Ok(())
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
        };
        let client = step_client();
        let mut seen = Vec::new();
        let r = run_steps(
            &client,
            addr,
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
            addr,
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
        let r = run_steps(&client, closed, &[step("GET", "/healthz", None)], |_| {}).await;
        let e = r.unwrap_err();
        assert!(e.starts_with("step 1 (GET /healthz): "), "{e}");
    }
}
