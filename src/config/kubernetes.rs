//! The `backend.kubernetes` section of a service: which workload to scale, which Service's
//! EndpointSlices give the pod addresses, and whether Reveille or KEDA owns the replica count.
//! Raw YAML shape here, checked into [`KubernetesBackend`] with every problem's field path.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{HumanDuration, Problems};

/// Default number of replicas a wake-up asks for.
pub const DEFAULT_REPLICAS: i32 = 1;

/// Default name of the Lease that elects the replica deciding scale-downs.
pub const DEFAULT_LEASE_NAME: &str = "reveille-scale-down";
/// Default lease duration: a dead leader's successor decides after this long.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// Default bound on asking a peer replica for its counts before a scale-down.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// Scale-down coordination between Reveille replicas (top-level `coordination:`): the holder of
/// a Lease decides, and only when every peer replica is idle too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordination {
    /// Lease name (default `reveille-scale-down`).
    pub lease: String,
    /// Reveille's own namespace, where the Lease and its admin Service live (default: the
    /// `POD_NAMESPACE` environment variable).
    pub namespace: String,
    /// This replica's name in the Lease (default: `POD_NAME`, else `HOSTNAME`).
    pub identity: String,
    /// How long a lease holds without renewal (default 15s).
    pub lease_duration: Duration,
    /// The Service whose EndpointSlices list every replica's admin port (port named `admin`);
    /// `None`: the peers are `keda.peers`.
    pub peers_service: Option<String>,
    /// This replica's pod IP, to leave itself out of the peers (default: `POD_IP`).
    pub pod_ip: Option<IpAddr>,
    /// Bound on one peer's answer (default 2s); no answer puts the scale-down off.
    pub peer_timeout: Duration,
}

/// `coordination:` as written.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawCoordination {
    lease: Option<String>,
    namespace: Option<String>,
    identity: Option<String>,
    lease_duration: Option<HumanDuration>,
    peers_service: Option<String>,
    pod_ip: Option<IpAddr>,
    peer_timeout: Option<HumanDuration>,
}

pub(crate) fn validate_coordination(
    p: &mut Problems,
    raw: RawCoordination,
    env: &dyn Fn(&str) -> Option<String>,
) -> Coordination {
    let at = "coordination";
    let lease = raw.lease.unwrap_or_else(|| DEFAULT_LEASE_NAME.to_string());
    if let Err(why) = dns_subdomain(&lease) {
        p.add(format!("{at}.lease"), why);
    }
    let namespace = raw
        .namespace
        .or_else(|| env("POD_NAMESPACE"))
        .unwrap_or_default();
    if let Err(why) = dns_label(&namespace) {
        p.add(
            format!("{at}.namespace"),
            format!("{why} (or set POD_NAMESPACE)"),
        );
    }
    let identity = raw
        .identity
        .or_else(|| env("POD_NAME"))
        .or_else(|| env("HOSTNAME"))
        .unwrap_or_default();
    if identity.is_empty() {
        p.add(
            format!("{at}.identity"),
            "is required (or set POD_NAME or HOSTNAME)",
        );
    }
    let lease_duration = raw
        .lease_duration
        .map(|d| d.0)
        .unwrap_or(DEFAULT_LEASE_DURATION);
    if lease_duration < Duration::from_secs(1) {
        p.add(format!("{at}.lease_duration"), "must be at least 1s");
    }
    if let Some(svc) = &raw.peers_service {
        if let Err(why) = dns_label(svc) {
            p.add(format!("{at}.peers_service"), why);
        }
    }
    let pod_ip = raw
        .pod_ip
        .or_else(|| env("POD_IP").and_then(|v| v.parse().ok()));
    let peer_timeout = raw
        .peer_timeout
        .map(|d| d.0)
        .unwrap_or(DEFAULT_PEER_TIMEOUT);
    if peer_timeout.is_zero() {
        p.add(format!("{at}.peer_timeout"), "must be greater than 0");
    }
    Coordination {
        lease,
        namespace,
        identity,
        lease_duration,
        peers_service: raw.peers_service,
        pod_ip,
        peer_timeout,
    }
}

/// Services from `ReveilleService` objects (top-level `crd:`), watched live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdWatch {
    /// Only this namespace's objects; `None`: every namespace.
    pub namespace: Option<String>,
}

/// `crd:` as written.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct RawCrd {
    namespace: Option<String>,
}

pub(crate) fn validate_crd(p: &mut Problems, raw: RawCrd) -> CrdWatch {
    if let Some(ns) = &raw.namespace {
        if let Err(why) = dns_label(ns) {
            p.add("crd.namespace", why);
        }
    }
    CrdWatch {
        namespace: raw.namespace,
    }
}

/// A Kubernetes workload scaled to zero, reached through its pods' addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesBackend {
    /// Namespace of the workload and its Service.
    pub namespace: String,
    /// The Deployment or StatefulSet whose `scale` subresource is patched.
    pub workload: Workload,
    /// The Service whose EndpointSlices (label `kubernetes.io/service-name`) list the pods.
    pub service: String,
    /// The pod port requests go to.
    pub port: PortRef,
    /// Replicas asked for when waking from zero (default 1).
    pub replicas: i32,
    /// Who changes the replica count.
    pub scaling: Scaling,
    /// Whether Reveille scales the workload to zero after `idle_timeout` (direct mode only;
    /// default true). Turn off when an HPA or KEDA also manages the workload.
    pub scale_down: bool,
    /// Controlled rollouts (the service's `rollout:`; Deployments only); `None`: off.
    pub rollout: Option<super::Rollout>,
}

/// A scalable workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Deployment or StatefulSet.
    pub kind: WorkloadKind,
    /// Its name.
    pub name: String,
}

/// The kinds of workload Reveille scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// `apps/v1` Deployment.
    Deployment,
    /// `apps/v1` StatefulSet.
    StatefulSet,
}

impl WorkloadKind {
    /// The kind's name as Kubernetes writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
        }
    }
}

/// A pod port: its number, or its name in the EndpointSlice's `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    /// A port number (1–65535).
    Number(u16),
    /// A port name, resolved per EndpointSlice.
    Name(String),
}

/// Who changes the workload's replica count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scaling {
    /// Reveille patches the `scale` subresource (up on demand, to zero when idle).
    Direct,
    /// KEDA owns the count; Reveille never patches and a held request only waits for endpoints.
    Keda,
}

/// `backend.kubernetes` as written.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawKubernetes {
    #[serde(default)]
    namespace: String,
    deployment: Option<String>,
    statefulset: Option<String>,
    #[serde(default)]
    service: String,
    port: Option<RawPort>,
    replicas: Option<i64>,
    scaling: Option<String>,
    scale_down: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Name(String),
}

pub(crate) fn validate(p: &mut Problems, at: &str, raw: RawKubernetes) -> KubernetesBackend {
    if let Err(why) = dns_label(&raw.namespace) {
        p.add(format!("{at}.namespace"), why);
    }
    let workload = match (raw.deployment, raw.statefulset) {
        (Some(name), None) => {
            if let Err(why) = dns_subdomain(&name) {
                p.add(format!("{at}.deployment"), why);
            }
            Workload {
                kind: WorkloadKind::Deployment,
                name,
            }
        }
        (None, Some(name)) => {
            if let Err(why) = dns_subdomain(&name) {
                p.add(format!("{at}.statefulset"), why);
            }
            Workload {
                kind: WorkloadKind::StatefulSet,
                name,
            }
        }
        _ => {
            p.add(
                at.to_string(),
                "exactly one of `deployment` or `statefulset` is required",
            );
            Workload {
                kind: WorkloadKind::Deployment,
                name: String::new(),
            }
        }
    };
    if let Err(why) = dns_label(&raw.service) {
        p.add(format!("{at}.service"), why);
    }
    let port = match raw.port {
        None => {
            p.add(
                format!("{at}.port"),
                "is required (a number, or the port's name)",
            );
            PortRef::Number(0)
        }
        Some(RawPort::Number(n)) => match u16::try_from(n) {
            Ok(n) if n > 0 => PortRef::Number(n),
            _ => {
                p.add(format!("{at}.port"), format!("{n} is not a port (1-65535)"));
                PortRef::Number(0)
            }
        },
        Some(RawPort::Name(name)) => {
            if let Err(why) = port_name(&name) {
                p.add(format!("{at}.port"), why);
            }
            PortRef::Name(name)
        }
    };
    let replicas = match raw.replicas {
        None => DEFAULT_REPLICAS,
        Some(n) if (1..=i64::from(i32::MAX)).contains(&n) => n as i32,
        Some(n) => {
            p.add(format!("{at}.replicas"), format!("{n}: must be at least 1"));
            DEFAULT_REPLICAS
        }
    };
    let scaling = match raw.scaling.as_deref() {
        None | Some("direct") => Scaling::Direct,
        Some("keda") => Scaling::Keda,
        Some(other) => {
            p.add(
                format!("{at}.scaling"),
                format!("{other:?}: must be `direct` or `keda`"),
            );
            Scaling::Direct
        }
    };
    if scaling == Scaling::Keda && raw.scale_down == Some(true) {
        p.add(
            format!("{at}.scale_down"),
            "with `scaling: keda` KEDA scales to zero; Reveille never patches",
        );
    }
    KubernetesBackend {
        namespace: raw.namespace,
        workload,
        service: raw.service,
        port,
        replicas,
        scaling,
        scale_down: scaling == Scaling::Direct && raw.scale_down.unwrap_or(true),
        rollout: None,
    }
}

/// An RFC 1123 label: namespaces and Service names.
fn dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("is required".into());
    }
    if s.len() > 63 {
        return Err(format!("{s:?}: must be at most 63 characters"));
    }
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok_chars || s.starts_with('-') || s.ends_with('-') {
        return Err(format!(
            "{s:?}: must be lowercase letters, digits and '-', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// An RFC 1123 subdomain: Deployment and StatefulSet names.
fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 253 {
        return Err(format!("{s:?}: must be at most 253 characters"));
    }
    for label in s.split('.') {
        dns_label(label).map_err(|_| {
            format!("{s:?}: must be lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit")
        })?;
    }
    Ok(())
}

/// An IANA service name, as Kubernetes port names are.
fn port_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is neither a port number nor a port name (at most 15 lowercase letters, digits and '-')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Backend, Config};

    use super::*;

    fn service(backend: &str) -> String {
        format!("services:\n  - name: a\n    hosts: [a.test]\n    backend:\n      kubernetes: {backend}\n")
    }

    fn parse(backend: &str) -> Result<KubernetesBackend, Vec<String>> {
        match Config::parse_with_env(&service(backend), &|_| None) {
            Ok(c) => match &c.services[0].backend {
                Backend::Kubernetes(k) => Ok(k.clone()),
                other => panic!("{other:?}"),
            },
            Err(e) => Err(e.problems.iter().map(|p| p.to_string()).collect()),
        }
    }

    #[test]
    fn parses_with_defaults() {
        let k = parse(
            "{ namespace: integrations, deployment: order-sync, service: order-sync, port: 8080 }",
        )
        .unwrap();
        assert_eq!(k.namespace, "integrations");
        assert_eq!(
            k.workload,
            Workload {
                kind: WorkloadKind::Deployment,
                name: "order-sync".into()
            }
        );
        assert_eq!(k.port, PortRef::Number(8080));
        assert_eq!(k.replicas, DEFAULT_REPLICAS);
        assert_eq!(k.scaling, Scaling::Direct);
        assert!(k.scale_down);
    }

    #[test]
    fn parses_statefulset_named_port_and_keda() {
        let k = parse("{ namespace: ns, statefulset: db.v2, service: db, port: http, replicas: 3, scaling: keda }").unwrap();
        assert_eq!(k.workload.kind, WorkloadKind::StatefulSet);
        assert_eq!(k.workload.name, "db.v2");
        assert_eq!(k.port, PortRef::Name("http".into()));
        assert_eq!(k.replicas, 3);
        assert_eq!(k.scaling, Scaling::Keda);
        assert!(!k.scale_down);
        let k = parse("{ namespace: ns, deployment: d, service: s, port: 80, scale_down: false }")
            .unwrap();
        assert!(!k.scale_down);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let e = parse(
            "{ namespace: Bad_NS, deployment: d, statefulset: s, service: '-x', port: 70000, replicas: 0, scaling: hpa }",
        )
        .unwrap_err();
        let at = "services[0].backend.kubernetes";
        let want = [
            format!("{at}.namespace: \"Bad_NS\": must be lowercase letters, digits and '-', starting and ending with a letter or digit"),
            format!("{at}: exactly one of `deployment` or `statefulset` is required"),
            format!("{at}.service: \"-x\": must be lowercase letters, digits and '-', starting and ending with a letter or digit"),
            format!("{at}.port: 70000 is not a port (1-65535)"),
            format!("{at}.replicas: 0: must be at least 1"),
            format!("{at}.scaling: \"hpa\": must be `direct` or `keda`"),
        ];
        for w in &want {
            assert!(e.contains(w), "missing {w:?} in {e:#?}");
        }
        assert_eq!(e.len(), want.len(), "{e:#?}");
    }

    #[test]
    fn coordination_defaults_come_from_the_pod_environment() {
        let text = format!(
            "{}coordination: {{ peers_service: reveille-admin }}\n",
            service("{ namespace: n, deployment: d, service: s, port: 1 }")
        );
        let env = |k: &str| match k {
            "POD_NAMESPACE" => Some("reveille".to_string()),
            "POD_NAME" => Some("reveille-7d9f-abc".to_string()),
            "POD_IP" => Some("10.1.2.3".to_string()),
            _ => None,
        };
        let c = Config::parse_with_env(&text, &env)
            .unwrap()
            .coordination
            .unwrap();
        assert_eq!(c.lease, DEFAULT_LEASE_NAME);
        assert_eq!(c.namespace, "reveille");
        assert_eq!(c.identity, "reveille-7d9f-abc");
        assert_eq!(c.pod_ip, Some("10.1.2.3".parse().unwrap()));
        assert_eq!(c.peers_service.as_deref(), Some("reveille-admin"));
        assert_eq!(c.lease_duration, DEFAULT_LEASE_DURATION);
        let text = format!(
            "{}coordination: {{ lease: Bad, lease_duration: 10ms, peer_timeout: 0s }}\n",
            service("{ namespace: n, deployment: d, service: s, port: 1 }")
        );
        let e: Vec<String> = Config::parse_with_env(&text, &|_| None)
            .unwrap_err()
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect();
        let want = [
            "coordination.lease: \"Bad\": must be lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit",
            "coordination.namespace: is required (or set POD_NAMESPACE)",
            "coordination.identity: is required (or set POD_NAME or HOSTNAME)",
            "coordination.lease_duration: must be at least 1s",
            "coordination.peer_timeout: must be greater than 0",
        ];
        assert_eq!(e, want);
    }

    #[test]
    fn missing_fields_and_contradictions() {
        let e = parse("{ scaling: keda, scale_down: true, port: http_port }").unwrap_err();
        let at = "services[0].backend.kubernetes";
        let want = [
            format!("{at}.namespace: is required"),
            format!("{at}: exactly one of `deployment` or `statefulset` is required"),
            format!("{at}.service: is required"),
            format!("{at}.port: \"http_port\" is neither a port number nor a port name (at most 15 lowercase letters, digits and '-')"),
            format!("{at}.scale_down: with `scaling: keda` KEDA scales to zero; Reveille never patches"),
        ];
        for w in &want {
            assert!(e.contains(w), "missing {w:?} in {e:#?}");
        }
        assert_eq!(e.len(), want.len(), "{e:#?}");
        let e =
            parse("{ namespace: n, deployment: d, service: s, port: 1, colour: red }").unwrap_err();
        assert!(
            e[0].starts_with("services[0].backend.kubernetes.colour: unknown field `colour`"),
            "{e:?}"
        );
    }
}
