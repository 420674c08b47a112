//! The shapes a config file is read into, as written in YAML, before [`super::validate`]
//! checks what they mean. Fields the shapes do not know are collected (with their paths) rather
//! than stopping the read, so they are reported together with every other problem.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::expected::{fields_at, Step};

use super::{keda, kubernetes, prewarm, rollout, Problem, Protocol};

/// Reads `de` into the raw shape `T`, naming every field under `prefix` (empty for a whole
/// file, `spec` for a Kubernetes object). Fields `T` does not know do not stop the read: each
/// comes back as a problem with its path, so they are reported together with what validation
/// finds. A value of the wrong type does stop it (the shape needs the value); then the unknown
/// fields found so far come back with that problem, in the error.
pub(super) fn read<'de, T, D>(de: D, prefix: &str) -> Result<(T, Vec<Problem>), Vec<Problem>>
where
    T: DeserializeOwned,
    D: Deserializer<'de>,
{
    let mut unknown = Vec::new();
    let result = {
        let mut note = |path: serde_ignored::Path<'_>| {
            unknown.push(unknown_field(prefix, &path, fields_at::<T>));
        };
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(de, &mut note))
    };
    match result {
        Ok(raw) => Ok((raw, unknown)),
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let mut reason = e.into_inner().to_string();
            // The YAML parser prefixes the parent's path itself; ours is the full one.
            if let Some((head, rest)) = reason.split_once(": ") {
                if !head.contains(' ') && path.starts_with(head) {
                    reason = rest.to_string();
                }
            }
            let path = join(prefix, &path);
            unknown.push(Problem { path, reason });
            Err(unknown)
        }
    }
}

/// `prefix.path`, `prefix[0]`, or either alone when the other is empty.
fn join(prefix: &str, path: &str) -> String {
    if prefix.is_empty() || path.is_empty() || path.starts_with('[') {
        format!("{prefix}{path}")
    } else {
        format!("{prefix}.{path}")
    }
}

/// The problem for a field no shape knows, at `path` (`services[0].idle_timout`), with the
/// fields the shape there does know (`expected` finds them).
fn unknown_field(
    prefix: &str,
    path: &serde_ignored::Path<'_>,
    expected: fn(&[Step]) -> Option<&'static [&'static str]>,
) -> Problem {
    fn steps(path: &serde_ignored::Path<'_>, out: &mut Vec<Step>) {
        match path {
            serde_ignored::Path::Root => {}
            serde_ignored::Path::Seq { parent, index } => {
                steps(parent, out);
                out.push(Step::Index(*index));
            }
            serde_ignored::Path::Map { parent, key } => {
                steps(parent, out);
                out.push(Step::Key(key.clone()));
            }
            serde_ignored::Path::Some { parent }
            | serde_ignored::Path::NewtypeStruct { parent }
            | serde_ignored::Path::NewtypeVariant { parent } => steps(parent, out),
        }
    }
    let mut all = Vec::new();
    steps(path, &mut all);
    let mut at = prefix.to_string();
    for step in &all {
        match step {
            Step::Index(i) => at.push_str(&format!("[{i}]")),
            Step::Key(k) if at.is_empty() => at.push_str(k),
            Step::Key(k) => at.push_str(&format!(".{k}")),
        }
    }
    let reason = match all.split_last() {
        Some((Step::Key(key), parent)) => match expected(parent) {
            Some(fields) => {
                <serde::de::value::Error as serde::de::Error>::unknown_field(key, fields)
                    .to_string()
            }
            None => format!("unknown field `{key}`"),
        },
        _ => "unexpected value".to_string(),
    };
    Problem { path: at, reason }
}

/// A duration written like `500ms`, `30s`, `5m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?} ({e}); write durations like 500ms, 30s, 5m"
                ))
            })
    }
}

/// `admin:` as an address, or `{ listen: ADDR, token_file: FILE }`.
#[derive(Debug)]
pub(super) enum RawAdmin {
    Addr(SocketAddr),
    Full(RawAdminFull),
}

#[derive(Debug, Deserialize)]
pub(super) struct RawAdminFull {
    pub(super) listen: Option<SocketAddr>,
    pub(super) token_file: Option<PathBuf>,
}

/// By hand rather than `untagged`: the map form is read through the same map access, so its
/// unknown fields are noted like any other (an untagged enum buffers the value first, and
/// what it ignores goes unseen).
impl<'de> Deserialize<'de> for RawAdmin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Admin;
        impl<'de> serde::de::Visitor<'de> for Admin {
            type Value = RawAdmin;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address like 127.0.0.1:9090, or { listen, token_file }")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawAdmin, E> {
                s.parse().map(RawAdmin::Addr).map_err(E::custom)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawAdmin, A::Error> {
                let map = serde::de::value::MapAccessDeserializer::new(map);
                RawAdminFull::deserialize(map).map(RawAdmin::Full)
            }
        }
        d.deserialize_any(Admin)
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct RawConfig {
    pub(super) listen: Option<SocketAddr>,
    pub(super) admin: Option<RawAdmin>,
    #[serde(default)]
    pub(super) shutdown: RawShutdown,
    #[serde(default)]
    pub(super) timeouts: RawTimeouts,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) services: Vec<RawService>,
    pub(super) tls: Option<RawTls>,
    #[serde(default)]
    pub(super) keda: keda::RawKeda,
    pub(super) coordination: Option<kubernetes::RawCoordination>,
    pub(super) crd: Option<kubernetes::RawCrd>,
    pub(super) state_dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) knative: RawKnative,
    pub(super) drop_underscore_headers: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawKnative {
    #[serde(default)]
    pub(super) enabled: bool,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawTls {
    pub(super) listen: SocketAddr,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawShutdown {
    pub(super) delay: Option<HumanDuration>,
    pub(super) grace: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawTimeouts {
    pub(super) client_header: Option<HumanDuration>,
    pub(super) client_idle: Option<HumanDuration>,
    pub(super) client_write: Option<HumanDuration>,
    pub(super) client_body: Option<HumanDuration>,
    pub(super) upstream_connect: Option<HumanDuration>,
    pub(super) upstream_idle: Option<HumanDuration>,
    pub(super) upstream_response: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawLimits {
    pub(super) max_connections: Option<usize>,
    pub(super) max_held: Option<usize>,
    pub(super) listen_backlog: Option<u32>,
    pub(super) admin_max_connections: Option<usize>,
    pub(super) admin_max_long_polls: Option<usize>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawService {
    pub(super) name: String,
    pub(super) namespace: Option<String>,
    #[serde(default)]
    pub(super) protocol: Protocol,
    pub(super) upstream_tls: Option<RawUpstreamTls>,
    #[serde(default)]
    pub(super) hosts: Vec<String>,
    pub(super) path_prefix: Option<String>,
    pub(super) backend: RawBackend,
    #[serde(default)]
    pub(super) queue: RawQueue,
    pub(super) idle_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub(super) concurrency: usize,
    #[serde(default)]
    pub(super) keda: keda::RawServiceKeda,
    pub(super) rollout: Option<rollout::RawRollout>,
    pub(super) knative: Option<bool>,
    pub(super) upgrades: Option<Vec<String>>,
    pub(super) prewarm: Option<prewarm::RawPrewarm>,
    #[serde(default)]
    pub(super) depends_on: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawUpstreamTls {
    pub(super) ca: Option<PathBuf>,
    pub(super) server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawQueue {
    pub(super) capacity: Option<i64>,
    pub(super) timeout: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawBackend {
    pub(super) process: Option<RawProcess>,
    #[serde(rename = "static")]
    pub(super) fixed: Option<RawStatic>,
    pub(super) kubernetes: Option<kubernetes::RawKubernetes>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawProcess {
    #[serde(default)]
    pub(super) command: Vec<String>,
    pub(super) address: SocketAddr,
    #[serde(default)]
    pub(super) env: BTreeMap<String, String>,
    pub(super) cwd: Option<PathBuf>,
    #[serde(default)]
    pub(super) readiness: RawReadiness,
    pub(super) start_timeout: Option<HumanDuration>,
    pub(super) stop_grace: Option<HumanDuration>,
    pub(super) start_attempts: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawReadiness {
    pub(super) path: Option<String>,
    pub(super) interval: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawStatic {
    #[serde(default)]
    pub(super) addresses: Vec<SocketAddr>,
}
