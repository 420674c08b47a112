//! Kubernetes-native configuration: `ReveilleService` objects (group `reveille.dev`, version
//! `v1alpha1`, namespaced), one per service, with the same fields as a service in the config
//! file. Reveille watches them (with `crd:` in its config) and adds, changes and removes services
//! live through [`Services::apply_objects`]: services whose object did not change keep their
//! gate, driver and held requests.
//!
//! An object is validated by the same code as the file (each object alone), and its problems are
//! reported on the object as a `Ready=False` condition with reason `Invalid`, each naming a
//! field of the object (`spec.hosts[0]`, `metadata.name`); a valid object gets `Ready=True`. An invalid object never stops anything else.
//! The service's name is `<namespace>-<name>`.

use std::sync::Arc;

use futures_util::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
#[cfg(test)]
use serde_json::Value;
use tracing::{info, warn};

use crate::config::{dependency_problems, Config, CrdWatch, DependencyProblem, Service};
use crate::route::services::Services;

/// One service, as a Kubernetes object. Field names and meanings are those of a service in the
/// config file (see the README); `name` and `namespace` come from the object's metadata.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "reveille.dev",
    version = "v1alpha1",
    kind = "ReveilleService",
    namespaced,
    status = "ReveilleServiceStatus",
    shortname = "rsvc",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#
)]
pub struct ReveilleServiceSpec {
    /// Hosts that select this service: exact names, or `*.suffix` wildcards.
    pub hosts: Vec<String>,
    /// Optional path prefix (segment-aware).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// To the backend: `http1` or `h2c` (default `http1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The backend: `kubernetes` or `static` (exactly one).
    pub backend: BackendSpec,
    /// Hold queue: `capacity` (requests) and `timeout` (like `30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueSpec>,
    /// Nothing held or in flight this long (like `5m`) → scale to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// In-flight limit per endpoint; 0 = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Controlled rollouts of the Deployment (see the README): validation steps, `quiesce`,
    /// `on_failure`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
    /// Windows in which the service is kept up before any request: `schedule`d and `learn`ed
    /// (as `prewarm` in the config file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewarm: Option<PrewarmSpec>,
    /// `ReveilleService` objects of the same namespace woken before this one, in order, each
    /// ready before the next, and kept up while it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
}

/// `spec.prewarm`: as `prewarm` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PrewarmSpec {
    /// Fixed windows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<WindowSpec>,
    /// How long before a window the service is woken: `auto` (default) or a duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lead: Option<String>,
    /// Learn windows from the demand seen (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learn: Option<bool>,
    /// Hours per week learned windows may keep the service up at most (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hours_per_week: Option<f64>,
}

/// One `spec.prewarm.schedule` window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WindowSpec {
    /// Days it starts on (`mon`…`sun` or `monday`…`sunday`; at least one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<String>,
    /// Local start time, `HH:MM`.
    pub start: String,
    /// Local end time, `HH:MM` (on the next day when not after `start`).
    pub end: String,
    /// IANA time zone of `start` and `end` (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// `spec.rollout`: as `rollout` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RolloutSpec {
    /// Steps run in order against each new pod before it gets traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation: Vec<ValidationStepSpec>,
    /// Bound on waiting for the old version's in-flight requests at the switch (like `5s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce: Option<String>,
    /// `hold` (default) or `rollback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
    /// A rollout while at zero: `wait` (default; validated at the next wake-up) or `wake`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_zero: Option<String>,
}

/// One validation step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ValidationStepSpec {
    /// HTTP method (default `GET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Request path, starting with `/`.
    pub path: String,
    /// Request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Expected response status (default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<i64>,
    /// Bound on the step (like `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// `spec.backend`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BackendSpec {
    /// A Deployment or StatefulSet scaled through its `scale` subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesSpec>,
    /// Fixed addresses, always ready.
    #[serde(default, rename = "static", skip_serializing_if = "Option::is_none")]
    pub fixed: Option<StaticSpec>,
}

/// `spec.backend.kubernetes`: as `backend.kubernetes` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KubernetesSpec {
    /// Namespace of the workload (default: the object's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Deployment name (or `statefulset`; exactly one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// StatefulSet name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statefulset: Option<String>,
    /// The Service whose EndpointSlices list the pods.
    pub service: String,
    /// Pod port: a number, or the port's name.
    #[schemars(schema_with = "int_or_string")]
    pub port: PortSpec,
    /// Replicas asked for when waking from zero (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i64>,
    /// `direct` (Reveille patches) or `keda` (never patches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<String>,
    /// Direct mode: scale to zero after `idle_timeout` (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<bool>,
}

/// A port number or name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum PortSpec {
    /// 1–65535.
    Number(i64),
    /// A port name.
    Name(String),
}

/// The Kubernetes way of saying "a number or a name" in a structural schema.
fn int_or_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Pod port: a number, or the port's name.",
        "x-kubernetes-int-or-string": true
    })
}

/// `spec.backend.static`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StaticSpec {
    /// `ip:port` addresses.
    pub addresses: Vec<String>,
}

/// `spec.queue`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QueueSpec {
    /// Held requests at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<i64>,
    /// Hold deadline per request (like `30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// What Reveille reports on an object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReveilleServiceStatus {
    /// `Ready`: `True` when the object is served, `False` with the problems when invalid.
    #[serde(default)]
    pub conditions: Vec<StatusCondition>,
}

/// One status condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusCondition {
    /// Always `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    /// `Valid` or `Invalid`.
    pub reason: String,
    /// The problems, one per line, each with the path of the field at fault (`spec.hosts`).
    pub message: String,
    /// The object's `metadata.generation` this was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The CRD manifest (`deploy/base/crd.yaml`), generated from the types.
pub fn crd_yaml() -> String {
    let crd = ReveilleService::crd();
    format!(
        "# Generated by `reveille crd` from src/crd.rs; do not edit (tests/deploy.rs checks it).\n{}",
        serde_norway::to_string(&crd).expect("a CRD serializes")
    )
}

/// The service an object describes, or its problems, each naming a field of the object
/// (`spec.hosts[0]`, `metadata.name`). The spec's fields are those of a service in the file and
/// are checked by the same code; the name is `<namespace>-<name>`, and the workload's namespace
/// defaults to the object's.
pub fn to_service(obj: &ReveilleService) -> Result<Service, Vec<String>> {
    let ns = obj.namespace().unwrap_or_default();
    let mut spec = serde_json::to_value(&obj.spec).map_err(|e| vec![e.to_string()])?;
    if let Some(k) = spec["backend"]["kubernetes"].as_object_mut() {
        k.entry("namespace").or_insert_with(|| json!(ns));
    }
    // A dependency is an object of the same namespace: the service `<namespace>-<name>`.
    if let Some(deps) = spec
        .get_mut("depends_on")
        .and_then(serde_json::Value::as_array_mut)
    {
        for d in deps.iter_mut().filter(|d| d.is_string()) {
            *d = json!(service_name(&ns, d.as_str().unwrap_or_default()));
        }
    }
    let name = service_name(&ns, &obj.name_any());
    Config::object_service(&name, &ns, spec)
        .map_err(|e| e.problems.iter().map(|p| p.to_string()).collect())
}

/// The service an object of `namespace` named `name` is served as.
fn service_name(namespace: &str, name: &str) -> String {
    format!("{namespace}-{name}")
}

/// What needs the objects together: no two valid objects served under one name (the service
/// name `<namespace>-<name>` of `c` in `a-b` is that of `b-c` in `a`: the later one in
/// namespace/name order is refused, so a name, and so a `depends_on` entry, means one object);
/// each `depends_on` entry names a valid object of the same namespace, and no cycle. Each object's result is `Err` with its problems (naming
/// `spec.depends_on…`) when not; one made invalid here can make another's entry unknown, so
/// this repeats until nothing changes.
fn check_dependencies<O: std::borrow::Borrow<ReveilleService>>(
    objects: &[O],
    results: &mut [Result<Service, Vec<String>>],
) {
    let objects: Vec<&ReveilleService> = objects.iter().map(|o| o.borrow()).collect();
    let mut first: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, result) in results.iter_mut().enumerate() {
        let Ok(s) = result else { continue };
        match first.get(&s.name) {
            Some(&j) => {
                let problem = format!(
                    "metadata.name: served as service {:?}, the name of ReveilleService {:?} in namespace {:?} too",
                    s.name,
                    objects[j].name_any(),
                    objects[j].namespace().unwrap_or_default()
                );
                *result = Err(vec![problem]);
            }
            None => {
                first.insert(s.name.clone(), i);
            }
        }
    }
    loop {
        let valid: Vec<usize> = (0..results.len()).filter(|&i| results[i].is_ok()).collect();
        let services: Vec<&Service> = valid
            .iter()
            .filter_map(|&i| results[i].as_ref().ok())
            .collect();
        let names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
        let deps: Vec<Vec<String>> = services.iter().map(|s| s.depends_on.clone()).collect();
        let found = dependency_problems(&names, &deps);
        if found.is_empty() {
            return;
        }
        // Entries as the object wrote them, services by their object's name.
        let written: Vec<Vec<String>> = valid
            .iter()
            .map(|&i| objects[i].spec.depends_on.clone())
            .collect();
        let object_name = |j: usize| objects[valid[j]].name_any();
        let mut problems: Vec<(usize, String)> = Vec::new();
        for problem in &found {
            let at = match problem.entry() {
                Some(k) => format!("spec.depends_on[{k}]"),
                None => "spec.depends_on".to_string(),
            };
            let reason = match problem {
                DependencyProblem::Unknown { service, at } => format!(
                    "no valid ReveilleService {:?} in namespace {:?}",
                    written[*service][*at],
                    objects[valid[*service]].namespace().unwrap_or_default()
                ),
                other => other.reason(&written, &object_name),
            };
            problems.push((valid[problem.service()], format!("{at}: {reason}")));
        }
        for (i, problem) in problems {
            match &mut results[i] {
                Err(list) => list.push(problem),
                r => *r = Err(vec![problem]),
            }
        }
    }
}

fn condition(obj: &ReveilleService, result: &Result<Service, Vec<String>>) -> StatusCondition {
    let (status, reason, message) = match result {
        Ok(s) => ("True", "Valid", format!("served as service {:?}", s.name)),
        Err(problems) => ("False", "Invalid", problems.join("\n")),
    };
    StatusCondition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: obj.metadata.generation,
    }
}

/// Watches `ReveilleService` objects and keeps `services` in step until `stop`. `changed` runs
/// after every change of the set (to resync what follows the gates).
pub async fn run(
    client: Client,
    cfg: CrdWatch,
    services: Arc<Services>,
    changed: Arc<dyn Fn() + Send + Sync>,
    mut stop: crate::shutdown::Signal,
) {
    let api: Api<ReveilleService> = match &cfg.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (reader, writer) = reflector::store();
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut synced = false;
    loop {
        let event = tokio::select! {
            e = stream.next() => match e { Some(e) => e, None => return },
            _ = stop.fired() => return,
        };
        match event {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(watcher::Event::InitDone) => synced = true,
            Ok(_) if !synced => continue,
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "ReveilleService watch failed; keeping the current services");
                continue;
            }
        }
        sync(&client, &reader, &services).await;
        changed();
    }
}

async fn sync(client: &Client, reader: &Store<ReveilleService>, services: &Services) {
    let mut objects = reader.state();
    objects.sort_by_key(|o| (o.namespace(), o.name_any()));
    let mut specs = Vec::new();
    let mut results: Vec<_> = objects.iter().map(|o| to_service(o)).collect();
    check_dependencies(&objects, &mut results);
    for (obj, result) in objects.iter().zip(results) {
        let cond = condition(obj, &result);
        let current = obj.status.as_ref().and_then(|s| s.conditions.first());
        if current != Some(&cond) {
            let api: Api<ReveilleService> =
                Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
            let patch = json!({ "status": { "conditions": [cond] } });
            if let Err(e) = api
                .patch_status(
                    &obj.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                warn!(object = %obj.name_any(), error = %e, "cannot write ReveilleService status");
            }
        }
        match result {
            Ok(s) => specs.push(s),
            Err(problems) => {
                info!(object = %obj.name_any(), problems = %problems.join("; "), "invalid ReveilleService ignored")
            }
        }
    }
    services.apply_objects(&specs).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Backend;

    fn object(spec: Value) -> ReveilleService {
        serde_json::from_value(json!({
            "apiVersion": "reveille.dev/v1alpha1", "kind": "ReveilleService",
            "metadata": {"name": "orders", "namespace": "integrations", "generation": 3},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_valid_object_is_the_same_service_as_in_a_file() {
        let obj = object(json!({
            "hosts": ["orders.test"],
            "backend": {"kubernetes": {"deployment": "order-sync", "service": "order-sync", "port": "http"}},
            "queue": {"capacity": 10, "timeout": "5s"},
            "idle_timeout": "1m",
        }));
        let s = to_service(&obj).unwrap();
        assert_eq!(s.name, "integrations-orders");
        assert_eq!(s.namespace, "integrations");
        assert_eq!(s.queue.capacity, 10);
        assert_eq!(s.idle_timeout, std::time::Duration::from_secs(60));
        match &s.backend {
            Backend::Kubernetes(k) => {
                assert_eq!(k.namespace, "integrations", "defaults to the object's");
                assert_eq!(k.port, crate::config::PortRef::Name("http".into()));
            }
            other => panic!("{other:?}"),
        }
        let c = condition(&obj, &Ok(s));
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Valid"));
        assert_eq!(c.observed_generation, Some(3));
    }

    #[test]
    fn an_invalid_object_reports_every_problem_under_spec() {
        let obj = object(json!({
            "hosts": [],
            "backend": {"kubernetes": {"deployment": "d", "service": "s", "port": 70000, "scaling": "hpa"}},
            "idle_timeout": "soon",
        }));
        let problems = to_service(&obj).unwrap_err();
        assert!(
            problems[0].starts_with("spec.idle_timeout: invalid duration"),
            "{problems:?}"
        );
        let obj = object(json!({
            "hosts": [],
            "backend": {"kubernetes": {"deployment": "d", "service": "s", "port": 70000, "scaling": "hpa"}},
        }));
        let problems = to_service(&obj).unwrap_err();
        assert_eq!(
            problems,
            vec![
                "spec.hosts: at least one host is required",
                "spec.backend.kubernetes.port: 70000 is not a port (1-65535)",
                "spec.backend.kubernetes.scaling: \"hpa\": must be `direct` or `keda`",
            ]
        );
        let c = condition(&obj, &Err(problems));
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Invalid"));
        assert!(c.message.contains("spec.backend.kubernetes.port"));
    }

    #[test]
    fn an_object_can_ask_for_controlled_rollouts() {
        let obj = object(json!({
            "hosts": ["orders.test"],
            "backend": {"kubernetes": {"deployment": "order-sync", "service": "order-sync", "port": 8080}},
            "rollout": {
                "validation": [{"path": "/healthz"}, {"method": "POST", "path": "/validate", "body": "{}", "expect_status": 204, "timeout": "2s"}],
                "quiesce": "1s",
                "on_failure": "rollback",
            },
        }));
        let s = to_service(&obj).unwrap();
        let Backend::Kubernetes(k) = &s.backend else {
            panic!("{:?}", s.backend)
        };
        let r = k.rollout.as_ref().expect("rollout");
        assert_eq!(r.validation.len(), 2);
        assert_eq!(r.validation[1].expect_status, 204);
        assert_eq!(r.quiesce, std::time::Duration::from_secs(1));
        assert_eq!(r.on_failure, crate::config::OnFailure::Rollback);
        let bad = object(json!({
            "hosts": ["orders.test"],
            "backend": {"kubernetes": {"deployment": "order-sync", "service": "order-sync", "port": 8080}},
            "rollout": {"validation": [{"path": "healthz"}]},
        }));
        assert_eq!(
            to_service(&bad).unwrap_err(),
            vec!["spec.rollout.validation[0].path: is required and must start with `/`"]
        );
        // The generated schema knows the field (the API server would prune it otherwise).
        let crd = serde_json::to_value(ReveilleService::crd()).unwrap();
        let props = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"];
        assert!(
            props["rollout"]["properties"]["validation"].is_object(),
            "{props}"
        );
    }

    #[test]
    fn problems_name_the_object_s_own_fields() {
        let mut obj = object(json!({
            "hosts": ["ok.test", "a.*.test"],
            "backend": {"static": {"addresses": []}},
            "queue": {"capacity": 0},
        }));
        obj.metadata.name = Some("o".repeat(60));
        assert_eq!(
            to_service(&obj).unwrap_err(),
            vec![
                "metadata.name: must be at most 63 characters",
                "spec.hosts[1]: \"a.*.test\": a wildcard is only allowed as a leading \"*.\" label",
                "spec.queue.capacity: must be at least 1",
                "spec.backend.static.addresses: at least one address is required",
            ]
        );
    }

    #[test]
    fn an_object_can_be_pre_warmed_and_depend_on_objects_of_its_namespace() {
        let obj = object(json!({
            "hosts": ["orders.test"],
            "backend": {"kubernetes": {"deployment": "order-sync", "service": "order-sync", "port": 8080}},
            "prewarm": {
                "schedule": [{"days": ["mon"], "start": "08:00", "end": "10:00", "timezone": "Europe/Amsterdam"}],
                "lead": "2m",
                "learn": true,
            },
            "depends_on": ["db", "cache"],
        }));
        let s = to_service(&obj).unwrap();
        assert_eq!(s.depends_on, vec!["integrations-db", "integrations-cache"]);
        let p = s.prewarm.as_ref().expect("prewarm");
        assert_eq!(p.schedule.len(), 1);
        assert_eq!(p.schedule[0].timezone_name, "Europe/Amsterdam");
        assert_eq!(
            p.lead,
            crate::config::Lead::Fixed(std::time::Duration::from_secs(120))
        );
        assert!(p.learn);
        let bad = object(json!({
            "hosts": ["orders.test"],
            "backend": {"kubernetes": {"deployment": "order-sync", "service": "order-sync", "port": 8080}},
            "prewarm": {"schedule": [{"days": ["tue"], "start": "8 am", "end": "10:00"}]},
        }));
        let problems = to_service(&bad).unwrap_err();
        assert!(
            problems[0].starts_with("spec.prewarm.schedule[0].start: "),
            "{problems:?}"
        );
        // The generated schema knows both fields (the API server would prune them otherwise).
        let crd = serde_json::to_value(ReveilleService::crd()).unwrap();
        let props = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"];
        assert!(
            props["prewarm"]["properties"]["schedule"].is_object(),
            "{props}"
        );
        assert_eq!(props["depends_on"]["type"], "array", "{props}");
    }

    fn named(name: &str, depends_on: &[&str]) -> ReveilleService {
        let mut obj = object(json!({
            "hosts": [format!("{name}.test")],
            "backend": {"static": {"addresses": ["127.0.0.1:9"]}},
            "depends_on": depends_on,
        }));
        obj.metadata.name = Some(name.into());
        obj
    }

    fn checked(objects: &[ReveilleService]) -> Vec<Result<Service, Vec<String>>> {
        let mut results: Vec<_> = objects.iter().map(to_service).collect();
        check_dependencies(objects, &mut results);
        results
    }

    #[test]
    fn dependencies_name_valid_objects_of_the_namespace_and_form_no_cycle() {
        // api -> db: fine; the chain is served.
        let ok = checked(&[named("api", &["db"]), named("db", &[])]);
        assert!(ok.iter().all(Result::is_ok), "{ok:?}");
        // An unknown object, and one made invalid by its own spec, are both unknown.
        let mut broken = named("db", &[]);
        broken.spec.hosts.clear();
        let r = checked(&[named("api", &["db"]), broken, named("web", &["nope"])]);
        assert_eq!(
            r[0].as_ref().unwrap_err(),
            &vec![
                "spec.depends_on[0]: no valid ReveilleService \"db\" in namespace \"integrations\""
            ]
        );
        assert_eq!(
            r[2].as_ref().unwrap_err(),
            &vec![
                "spec.depends_on[0]: no valid ReveilleService \"nope\" in namespace \"integrations\""
            ]
        );
        // A cycle is reported at its first object; what depends on it then fails in turn;
        // an object outside it is untouched.
        let r = checked(&[
            named("a", &["b"]),
            named("b", &["a"]),
            named("c", &["a"]),
            named("d", &[]),
        ]);
        assert_eq!(
            r[0].as_ref().unwrap_err(),
            &vec!["spec.depends_on: dependency cycle: a -> b -> a"]
        );
        assert!(r[1].is_err() && r[2].is_err(), "{r:?}");
        assert!(r[3].is_ok());
        // Two objects served under one name: the later one is refused, and a dependency on
        // the name means the first.
        let mut mine = named("c", &[]);
        mine.metadata.namespace = Some("integrations-b".into());
        let clash = named("b-c", &[]);
        let r = checked(&[clash, mine]);
        assert!(r[0].is_ok(), "{r:?}");
        assert_eq!(
            r[1].as_ref().unwrap_err(),
            &vec!["metadata.name: served as service \"integrations-b-c\", the name of ReveilleService \"b-c\" in namespace \"integrations\" too"]
        );
        // Itself and twice, named as written.
        let r = checked(&[named("a", &["a"]), named("b", &["d", "d"]), named("d", &[])]);
        assert_eq!(
            r[0].as_ref().unwrap_err(),
            &vec!["spec.depends_on[0]: a service cannot depend on itself"]
        );
        assert_eq!(
            r[1].as_ref().unwrap_err(),
            &vec!["spec.depends_on[1]: \"d\" is listed twice"]
        );
    }
}
