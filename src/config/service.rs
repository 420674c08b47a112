//! One service: its routing, queue, backend and protocol settings, checked alone. What needs
//! every service (unique names and routes, references between services) is checked by the
//! caller, [`super::validate`] for a file.

use std::sync::Arc;

use super::raw::{RawBackend, RawProcess, RawService, RawUpstreamTls};
use super::rollout::RawRollout;
use super::{
    dur, keda, kubernetes, positive, prewarm, rollout, Backend, Problems, ProcessBackend, Protocol,
    Queue, Service, StaticBackend, UpstreamTls, WorkloadKind, DEFAULT_HOLD_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_NAMESPACE, DEFAULT_PROBE_INTERVAL, DEFAULT_QUEUE_CAPACITY,
    DEFAULT_START_ATTEMPTS, DEFAULT_START_TIMEOUT, DEFAULT_STOP_GRACE, DEFAULT_UPGRADES,
};

/// How one service's fields are named in problems: under `services[2]` in a file; under
/// `spec`, with the name and namespace from `metadata`, for a Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ServicePaths {
    /// Prefix of the service's own fields (`services[2]`, `spec`).
    pub(super) at: String,
    /// Where the name comes from (`services[2].name`, `metadata.name`).
    pub(super) name: String,
    /// Where the namespace comes from (`services[2].namespace`, `metadata.namespace`).
    pub(super) namespace: String,
}

impl ServicePaths {
    /// The `i`th service of a file.
    pub(super) fn in_file(i: usize) -> ServicePaths {
        let at = format!("services[{i}]");
        ServicePaths {
            name: format!("{at}.name"),
            namespace: format!("{at}.namespace"),
            at,
        }
    }

    /// A Kubernetes object: `spec.…` and `metadata.name`, `metadata.namespace`.
    pub(super) fn object() -> ServicePaths {
        ServicePaths {
            at: "spec".into(),
            name: "metadata.name".into(),
            namespace: "metadata.namespace".into(),
        }
    }
}

/// Checks one service alone; `knative` is the file's default for `knative:`.
pub(super) fn validate(
    p: &mut Problems,
    paths: &ServicePaths,
    s: RawService,
    env: &dyn Fn(&str) -> Option<String>,
    knative: bool,
) -> Service {
    let at = paths.at.as_str();
    let namespace = s.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    if let Err(why) = check_name(&namespace) {
        p.add(&paths.namespace, why);
    }
    if let Err(why) = check_name(&s.name) {
        p.add(&paths.name, why);
    }
    let (hosts, path_prefix) = validate_route(p, at, &s.hosts, s.path_prefix);
    let queue = validate_queue(p, at, s.queue);
    let idle_timeout = dur(s.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    positive(p, format!("{at}.idle_timeout"), idle_timeout);
    let backend = validate_backend(p, at, s.backend, s.rollout, env);
    let keda = keda::validate_service(p, &format!("{at}.keda"), s.keda);
    let upgrades = validate_upgrades(p, &format!("{at}.upgrades"), s.upgrades);
    let upstream_tls = validate_upstream_tls(p, at, s.protocol, s.upstream_tls);
    let prewarm = s
        .prewarm
        .map(|w| prewarm::validate(p, &format!("{at}.prewarm"), w));
    if prewarm.is_some() && matches!(backend, Backend::Static(_)) {
        p.add(
            format!("{at}.prewarm"),
            "a `static` backend is always up: nothing to pre-warm",
        );
    }
    Service {
        name: s.name,
        namespace,
        protocol: s.protocol,
        upstream_tls,
        hosts,
        path_prefix,
        backend,
        queue,
        idle_timeout,
        concurrency: (s.concurrency > 0).then_some(s.concurrency),
        keda,
        knative: s.knative.unwrap_or(knative),
        upgrades,
        prewarm,
        depends_on: s.depends_on,
    }
}

/// `hosts` (lowercased, each checked) and `path_prefix` (without its trailing `/`).
fn validate_route(
    p: &mut Problems,
    at: &str,
    raw_hosts: &[String],
    path_prefix: Option<String>,
) -> (Vec<String>, Option<String>) {
    if raw_hosts.is_empty() {
        p.add(format!("{at}.hosts"), "at least one host is required");
    }
    let mut hosts = Vec::with_capacity(raw_hosts.len());
    for (h, host) in raw_hosts.iter().enumerate() {
        match normalize_host(host) {
            Ok(host) => hosts.push(host),
            Err(why) => p.add(format!("{at}.hosts[{h}]"), why),
        }
    }
    if let Some(prefix) = &path_prefix {
        if !prefix.starts_with('/') {
            p.add(format!("{at}.path_prefix"), "must start with '/'");
        }
    }
    let prefix = path_prefix
        .map(|x| x.trim_end_matches('/').to_string())
        .filter(|x| !x.is_empty());
    (hosts, prefix)
}

fn validate_queue(p: &mut Problems, at: &str, raw: super::raw::RawQueue) -> Queue {
    let capacity = match raw.capacity {
        None => DEFAULT_QUEUE_CAPACITY,
        Some(c) if c < 1 => {
            p.add(format!("{at}.queue.capacity"), "must be at least 1");
            1
        }
        Some(c) => c as usize,
    };
    let queue = Queue {
        capacity,
        timeout: dur(raw.timeout, DEFAULT_HOLD_TIMEOUT),
    };
    positive(p, format!("{at}.queue.timeout"), queue.timeout);
    queue
}

/// `backend` (exactly one kind) and `rollout` (only with a Deployment).
fn validate_backend(
    p: &mut Problems,
    at: &str,
    raw: RawBackend,
    rollout: Option<RawRollout>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Backend {
    let mut backend = match (raw.process, raw.fixed, raw.kubernetes) {
        (Some(proc_), None, None) => Backend::Process(validate_process(
            p,
            &format!("{at}.backend.process"),
            proc_,
            env,
        )),
        (None, Some(st), None) => {
            if st.addresses.is_empty() {
                p.add(
                    format!("{at}.backend.static.addresses"),
                    "at least one address is required",
                );
            }
            Backend::Static(StaticBackend {
                addresses: st.addresses,
            })
        }
        (None, None, Some(k)) => Backend::Kubernetes(kubernetes::validate(
            p,
            &format!("{at}.backend.kubernetes"),
            k,
        )),
        _ => {
            p.add(
                format!("{at}.backend"),
                "exactly one of `process`, `static` or `kubernetes` is required",
            );
            Backend::Static(StaticBackend { addresses: vec![] })
        }
    };
    if let Some(raw) = rollout {
        let r = rollout::validate(p, &format!("{at}.rollout"), raw);
        match &mut backend {
            Backend::Kubernetes(k) if k.workload.kind == WorkloadKind::Deployment => {
                k.rollout = Some(r);
            }
            _ => p.add(
                format!("{at}.rollout"),
                "only for a `kubernetes` backend with a `deployment` (a rollout follows a Deployment's ReplicaSets)",
            ),
        }
    }
    backend
}

/// `upgrades`: lowercase protocol names (RFC 9110 §7.8 tokens); `h2c` is refused, since it
/// would tunnel HTTP/2 to the backend past routing and the fields Reveille sets.
fn validate_upgrades(p: &mut Problems, at: &str, raw: Option<Vec<String>>) -> Vec<String> {
    let Some(raw) = raw else {
        return DEFAULT_UPGRADES.iter().map(|s| s.to_string()).collect();
    };
    let mut out = Vec::with_capacity(raw.len());
    for (i, u) in raw.iter().enumerate() {
        let u = u.trim().to_ascii_lowercase();
        let name = u.split('/').next().unwrap_or_default();
        if u.is_empty()
            || !u
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b",;\"".contains(&b))
        {
            p.add(
                format!("{at}[{i}]"),
                "must be a protocol name like `websocket`",
            );
        } else if name == "h2c" {
            p.add(
                format!("{at}[{i}]"),
                "h2c cannot be allowed: it would tunnel HTTP/2 to the backend past routing \
                 (serve the service with `protocol: h2c` instead)",
            );
        } else {
            out.push(u);
        }
    }
    out
}

/// Checks `upstream_tls` against the protocol and loads its roots (the CA file, or the system's).
/// `server_name` is required: backends are addressed by IP, so there is no name to default to.
fn validate_upstream_tls(
    p: &mut Problems,
    at: &str,
    protocol: Protocol,
    raw: Option<RawUpstreamTls>,
) -> Option<UpstreamTls> {
    let raw = match (protocol.is_tls(), raw) {
        (true, Some(raw)) => raw,
        (true, None) => {
            p.add(
                format!("{at}.upstream_tls"),
                "required with protocol h2 or https (at least `server_name`)",
            );
            return None;
        }
        (false, Some(_)) => {
            p.add(
                format!("{at}.upstream_tls"),
                "only valid with protocol h2 or https",
            );
            return None;
        }
        (false, None) => return None,
    };
    let server_name = match raw.server_name {
        None => {
            p.add(
                format!("{at}.upstream_tls.server_name"),
                "required: backends are addressed by IP, so the name to check in their \
                 certificate (and send as SNI) must be given",
            );
            None
        }
        Some(name) => match rustls_pki_types::ServerName::try_from(name.as_str()) {
            Ok(n) => Some(n.to_owned()),
            Err(e) => {
                p.add(
                    format!("{at}.upstream_tls.server_name"),
                    format!("{name:?} is not a DNS name or IP address: {e}"),
                );
                None
            }
        },
    };
    let roots = match &raw.ca {
        Some(ca) => super::tls::load_ca(ca).map_err(|why| (format!("{at}.upstream_tls.ca"), why)),
        None => super::tls::system_roots().map_err(|why| {
            (
                format!("{at}.upstream_tls.ca"),
                format!("not set, and {why}; set `ca` to a PEM bundle"),
            )
        }),
    };
    let roots = match roots {
        Ok(r) => Some(r),
        Err((path, why)) => {
            p.add(path, why);
            None
        }
    };
    Some(UpstreamTls {
        ca: raw.ca,
        server_name: server_name?,
        roots: Arc::new(roots?),
    })
}

fn validate_process(
    p: &mut Problems,
    at: &str,
    raw: RawProcess,
    env: &dyn Fn(&str) -> Option<String>,
) -> ProcessBackend {
    if raw.command.is_empty() {
        p.add(
            format!("{at}.command"),
            "must name a program, like [prog, arg1]",
        );
    }
    let mut command = Vec::with_capacity(raw.command.len());
    for (k, arg) in raw.command.iter().enumerate() {
        match expand_env(arg, env) {
            Ok(a) => command.push(a),
            Err(why) => p.add(format!("{at}.command[{k}]"), why),
        }
    }
    if command.first().is_some_and(|c| c.is_empty()) {
        p.add(format!("{at}.command[0]"), "must not be empty");
    }
    if raw.address.port() == 0 {
        p.add(format!("{at}.address"), "port must not be 0");
    }
    if let Some(path) = &raw.readiness.path {
        if !path.starts_with('/') {
            p.add(format!("{at}.readiness.path"), "must start with '/'");
        }
    }
    let b = ProcessBackend {
        command,
        address: raw.address,
        env: raw.env,
        cwd: raw.cwd,
        readiness_path: raw.readiness.path,
        probe_interval: dur(raw.readiness.interval, DEFAULT_PROBE_INTERVAL),
        start_timeout: dur(raw.start_timeout, DEFAULT_START_TIMEOUT),
        stop_grace: dur(raw.stop_grace, DEFAULT_STOP_GRACE),
        start_attempts: raw.start_attempts.unwrap_or(DEFAULT_START_ATTEMPTS),
    };
    positive(p, format!("{at}.readiness.interval"), b.probe_interval);
    positive(p, format!("{at}.start_timeout"), b.start_timeout);
    if b.start_attempts == 0 {
        p.add(format!("{at}.start_attempts"), "must be at least 1");
    }
    b
}

/// Expands `${NAME}` from the environment; `$$` is a literal `$`.
pub(super) fn expand_env(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
            let name = &body[..end];
            let value = env(name)
                .ok_or_else(|| format!("environment variable {name} is not set (in {s:?})"))?;
            out.push_str(&value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

pub(super) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 63 {
        return Err("must be at most 63 characters".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "{name:?} may use only lowercase letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

/// Lowercases a configured host and checks its shape (`name`, or `*.suffix`).
fn normalize_host(host: &str) -> Result<String, String> {
    let h = host.trim().to_ascii_lowercase();
    if h.is_empty() {
        return Err("must not be empty".into());
    }
    let name = h.strip_prefix("*.").unwrap_or(&h);
    if name.is_empty() || name.contains('*') {
        return Err(format!(
            "{host:?}: a wildcard is only allowed as a leading \"*.\" label"
        ));
    }
    if name.contains(':') || name.contains('/') || name.contains(' ') {
        return Err(format!("{host:?}: write a host name without port or path"));
    }
    if name.split('.').any(|l| l.is_empty()) {
        return Err(format!("{host:?}: empty label"));
    }
    Ok(h)
}
