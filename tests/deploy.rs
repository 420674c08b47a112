//! The manifests in `deploy/`: every YAML document parses, has the fields its kind requires,
//! deserializes into the Kubernetes API types, and the Reveille config it ships validates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// Every document of every YAML file under `deploy/`, with its file.
fn documents() -> Vec<(PathBuf, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    files.sort();
    assert!(files.len() >= 8, "manifests missing: {files:?}");
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for de in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(de).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                docs.push((f.clone(), v));
            }
        }
    }
    docs
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value, what: &str) -> T {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The problems of one document, by the rules of its kind.
fn check(file: &Path, v: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let kind = s(v, &["kind"]).unwrap_or_default().to_string();
    let name = s(v, &["metadata", "name"]).unwrap_or_default().to_string();
    let what = format!("{} {kind}/{name}", file.display());
    if s(v, &["apiVersion"]).is_none() {
        p.push(format!("{what}: apiVersion is required"));
    }
    if kind == "Kustomization" {
        let dir = file.parent().unwrap();
        for r in v["resources"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap_or_default();
            if !dir.join(r).exists() {
                p.push(format!("{what}: resource {r:?} does not exist"));
            }
        }
        return p;
    }
    if name.is_empty() {
        p.push(format!("{what}: metadata.name is required"));
    }
    let cluster_scoped = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
    ];
    if !cluster_scoped.contains(&kind.as_str()) && s(v, &["metadata", "namespace"]).is_none() {
        p.push(format!("{what}: metadata.namespace is required"));
    }
    match kind.as_str() {
        "Deployment" => {
            let d: k8s_openapi::api::apps::v1::Deployment = typed(v, &what);
            let spec = d.spec.unwrap_or_default();
            let labels = spec
                .template
                .metadata
                .and_then(|m| m.labels)
                .unwrap_or_default();
            let want = spec.selector.match_labels.unwrap_or_default();
            if want.is_empty() || want.iter().any(|(k, v)| labels.get(k) != Some(v)) {
                p.push(format!(
                    "{what}: spec.selector must match the template's labels"
                ));
            }
            let pod = spec.template.spec.unwrap_or_default();
            if pod.containers.is_empty() {
                p.push(format!("{what}: at least one container is required"));
            }
            for c in &pod.containers {
                if c.image.as_deref().unwrap_or_default().is_empty() {
                    p.push(format!("{what}: container {} needs an image", c.name));
                }
            }
        }
        "Service" => {
            let svc: k8s_openapi::api::core::v1::Service = typed(v, &what);
            let spec = svc.spec.unwrap_or_default();
            if spec.ports.unwrap_or_default().is_empty() {
                p.push(format!("{what}: spec.ports is required"));
            }
            if spec.selector.unwrap_or_default().is_empty() {
                p.push(format!("{what}: spec.selector is required"));
            }
        }
        "Role" | "ClusterRole" => {
            let rules = v["rules"].as_array().cloned().unwrap_or_default();
            if rules.is_empty() {
                p.push(format!("{what}: rules are required"));
            }
            if kind == "Role" {
                let _: k8s_openapi::api::rbac::v1::Role = typed(v, &what);
            } else {
                let _: k8s_openapi::api::rbac::v1::ClusterRole = typed(v, &what);
            }
            for r in rules {
                if r["verbs"].as_array().is_none_or(|v| v.is_empty()) {
                    p.push(format!("{what}: every rule needs verbs"));
                }
                let verbs: Vec<&str> = r["verbs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str())
                    .collect();
                if verbs.contains(&"*") {
                    p.push(format!("{what}: no wildcard verbs (least privilege)"));
                }
            }
        }
        "ClusterRoleBinding" => {
            let b: k8s_openapi::api::rbac::v1::ClusterRoleBinding = typed(v, &what);
            if b.subjects.unwrap_or_default().is_empty() || b.role_ref.name.is_empty() {
                p.push(format!("{what}: roleRef and subjects are required"));
            }
        }
        "CustomResourceDefinition" => {
            let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition = typed(v, &what);
            if crd.spec.versions.iter().any(|v| v.schema.is_none()) {
                p.push(format!("{what}: every version needs a schema"));
            }
        }
        "RoleBinding" => {
            let b: k8s_openapi::api::rbac::v1::RoleBinding = typed(v, &what);
            if b.subjects.unwrap_or_default().is_empty() || b.role_ref.name.is_empty() {
                p.push(format!("{what}: roleRef and subjects are required"));
            }
        }
        "PodDisruptionBudget" => {
            let pdb: k8s_openapi::api::policy::v1::PodDisruptionBudget = typed(v, &what);
            let spec = pdb.spec.unwrap_or_default();
            if spec.selector.is_none()
                || (spec.min_available.is_none() && spec.max_unavailable.is_none())
            {
                p.push(format!(
                    "{what}: selector and minAvailable or maxUnavailable are required"
                ));
            }
        }
        "Ingress" => {
            let ing: k8s_openapi::api::networking::v1::Ingress = typed(v, &what);
            if ing
                .spec
                .and_then(|s| s.rules)
                .unwrap_or_default()
                .is_empty()
            {
                p.push(format!("{what}: spec.rules are required"));
            }
        }
        "ConfigMap" => {
            let _: k8s_openapi::api::core::v1::ConfigMap = typed(v, &what);
        }
        "ServiceAccount" => {
            let _: k8s_openapi::api::core::v1::ServiceAccount = typed(v, &what);
        }
        "Namespace" => {
            let _: k8s_openapi::api::core::v1::Namespace = typed(v, &what);
        }
        "ScaledObject" => {
            if s(v, &["spec", "scaleTargetRef", "name"]).is_none() {
                p.push(format!("{what}: spec.scaleTargetRef.name is required"));
            }
            let triggers = v["spec"]["triggers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if triggers.is_empty() {
                p.push(format!("{what}: spec.triggers are required"));
            }
            for t in triggers {
                if t["type"].as_str().is_none() || !t["metadata"].is_object() {
                    p.push(format!("{what}: every trigger needs a type and metadata"));
                }
            }
        }
        other => p.push(format!(
            "{what}: kind {other:?} is not checked; add its rules"
        )),
    }
    p
}

#[test]
fn every_manifest_has_the_fields_its_kind_requires() {
    let mut problems = Vec::new();
    let mut kinds = BTreeMap::new();
    for (file, doc) in documents() {
        *kinds
            .entry(s(&doc, &["kind"]).unwrap_or_default().to_string())
            .or_insert(0) += 1;
        problems.extend(check(&file, &doc));
    }
    assert!(problems.is_empty(), "{problems:#?}");
    for k in [
        "Deployment",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "Role",
        "RoleBinding",
        "PodDisruptionBudget",
        "ConfigMap",
        "Ingress",
        "Kustomization",
    ] {
        assert!(kinds.contains_key(k), "no {k} in deploy/: {kinds:?}");
    }
}

#[test]
fn the_committed_crd_matches_the_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/crd.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        committed == reveille::app::crd::crd_yaml(),
        "deploy/base/crd.yaml is out of date: run `cargo run -- crd > deploy/base/crd.yaml`"
    );
}

#[test]
fn the_checker_catches_missing_fields() {
    let bad: Value = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "c"}}, "spec": {"containers": []}}},
    });
    let p = check(Path::new("bad.yaml"), &bad);
    assert_eq!(p.len(), 3, "{p:#?}");
    assert!(p[0].ends_with("metadata.namespace is required"));
    assert!(p[1].ends_with("spec.selector must match the template's labels"));
    assert!(p[2].ends_with("at least one container is required"));
}

#[test]
fn reveille_deployment_is_hardened_and_probed() {
    let docs = documents();
    let (_, d) = docs
        .iter()
        .find(|(f, d)| {
            f.ends_with("base/deployment.yaml") && s(d, &["metadata", "name"]) == Some("reveille")
        })
        .expect("deploy/base/deployment.yaml");
    assert!(d["spec"]["replicas"].as_i64().unwrap() >= 2);
    let pod = &d["spec"]["template"]["spec"];
    assert!(!pod["affinity"]["podAntiAffinity"].is_null());
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(!c["resources"]["requests"].is_null() && !c["resources"]["limits"].is_null());
    assert_eq!(
        d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
}

#[test]
fn the_shipped_config_validates() {
    let docs = documents();
    let (_, cm) = docs
        .iter()
        .find(|(_, d)| s(d, &["metadata", "name"]) == Some("reveille-config"))
        .expect("reveille-config ConfigMap");
    let text = s(cm, &["data", "config.yaml"]).unwrap();
    // As in the pod: the Deployment sets these from the downward API.
    let env = |k: &str| match k {
        "POD_NAMESPACE" => Some("reveille".to_string()),
        "POD_NAME" => Some("reveille-5d8c-x2x9q".to_string()),
        "POD_IP" => Some("10.244.1.7".to_string()),
        _ => None,
    };
    let cfg = reveille::Config::parse_with_env(text, &env).unwrap_or_else(|e| panic!("{e}"));
    let coord = cfg
        .coordination
        .as_ref()
        .expect("coordination in the shipped config");
    assert_eq!(coord.identity, "reveille-5d8c-x2x9q");
    assert_eq!(coord.peers_service.as_deref(), Some("reveille-admin"));
    assert!(cfg
        .services
        .iter()
        .any(|s| matches!(s.backend, reveille::config::Backend::Kubernetes(_))));
}

#[test]
fn rollout_rbac_grants_exactly_what_rollouts_use() {
    let docs = documents();
    let (_, role) = docs
        .iter()
        .find(|(_, d)| {
            s(d, &["kind"]) == Some("ClusterRole")
                && s(d, &["metadata", "name"]) == Some("reveille-rollout")
        })
        .expect("ClusterRole reveille-rollout");
    let mut granted: Vec<String> = Vec::new();
    for r in role["rules"].as_array().unwrap() {
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                for v in r["verbs"].as_array().unwrap() {
                    granted.push(format!(
                        "{}/{} {}",
                        g.as_str().unwrap(),
                        res.as_str().unwrap(),
                        v.as_str().unwrap()
                    ));
                }
            }
        }
    }
    granted.sort();
    let mut want = vec![
        "/pods get",
        "/pods list",
        "/pods watch",
        "/pods/status patch",
        "/events create",
        "apps/replicasets list",
        "apps/replicasets watch",
        "apps/deployments patch",
    ];
    want.sort();
    assert_eq!(granted, want);
    // Granted per namespace only: no ClusterRoleBinding uses it.
    assert!(!docs.iter().any(|(_, d)| {
        s(d, &["kind"]) == Some("ClusterRoleBinding")
            && s(d, &["roleRef", "name"]) == Some("reveille-rollout")
    }));
}

#[test]
fn the_prewarm_history_configmap_is_granted_in_reveilles_namespace() {
    let docs = documents();
    let (_, role) = docs
        .iter()
        .find(|(_, d)| {
            s(d, &["kind"]) == Some("Role") && s(d, &["metadata", "name"]) == Some("reveille-self")
        })
        .expect("Role reveille-self");
    let (_, cm) = docs
        .iter()
        .find(|(_, d)| {
            s(d, &["kind"]) == Some("ConfigMap")
                && s(d, &["metadata", "name"]) == Some("reveille-config")
        })
        .expect("ConfigMap reveille-config");
    let cfg: Value = serde_norway::from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let lease = cfg["coordination"]["lease"].as_str().unwrap();
    let history = format!("{lease}-prewarm-history");
    let mut granted: Vec<String> = Vec::new();
    for r in role["rules"].as_array().unwrap() {
        let names: Vec<&str> = r["resourceNames"]
            .as_array()
            .map(|a| a.iter().map(|n| n.as_str().unwrap()).collect())
            .unwrap_or_default();
        for res in r["resources"].as_array().unwrap() {
            for v in r["verbs"].as_array().unwrap() {
                granted.push(format!(
                    "{} {} {}",
                    res.as_str().unwrap(),
                    v.as_str().unwrap(),
                    names.join(",")
                ));
            }
        }
    }
    for want in [
        "configmaps create ".to_string(),
        format!("configmaps get {history}"),
        format!("configmaps update {history}"),
        format!("configmaps patch {history}"),
    ] {
        assert!(granted.contains(&want), "{want:?} not in {granted:#?}");
    }
    assert_eq!(
        granted
            .iter()
            .filter(|g| g.starts_with("configmaps "))
            .count(),
        4,
        "{granted:#?}"
    );
}
