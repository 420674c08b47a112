//! Checks what a whole file means, section by section, and builds the [`Config`]. Every
//! problem is collected (see [`Problems`]), none stops the others.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::raw::{RawAdmin, RawConfig, RawLimits, RawService, RawTimeouts, RawTls};
use super::service::{self, check_name, ServicePaths};
use super::{
    dur, keda, kubernetes, positive, prewarm, rollout, Backend, Config, Limits, Problem, Problems,
    Service, Shutdown, Timeouts, Tls, DEFAULT_ADMIN, DEFAULT_ADMIN_MAX_CONNECTIONS,
    DEFAULT_ADMIN_MAX_LONG_POLLS, DEFAULT_CLIENT_BODY_TIMEOUT, DEFAULT_CLIENT_HEADER_TIMEOUT,
    DEFAULT_CLIENT_IDLE_TIMEOUT, DEFAULT_CLIENT_WRITE_TIMEOUT, DEFAULT_LISTEN,
    DEFAULT_LISTEN_BACKLOG, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HELD, DEFAULT_SHUTDOWN_DELAY,
    DEFAULT_SHUTDOWN_GRACE, DEFAULT_STATE_DIR, DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
    DEFAULT_UPSTREAM_IDLE_TIMEOUT, DEFAULT_UPSTREAM_RESPONSE_TIMEOUT,
};

/// Checks a whole file; `Err` holds every problem found.
pub(super) fn validate(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Vec<Problem>> {
    let mut p = Problems(Vec::new());
    let (listen, admin, admin_token_file) = validate_listeners(&mut p, raw.listen, raw.admin);
    let shutdown = Shutdown {
        delay: dur(raw.shutdown.delay, DEFAULT_SHUTDOWN_DELAY),
        grace: dur(raw.shutdown.grace, DEFAULT_SHUTDOWN_GRACE),
    };
    let mut own = vec![("listen", listen), ("admin", admin)];
    own.extend(raw.tls.as_ref().map(|t| ("tls.listen", t.listen)));
    let keda = keda::validate(&mut p, raw.keda, &own);
    let coordination = raw
        .coordination
        .map(|c| kubernetes::validate_coordination(&mut p, c, env));
    let timeouts = validate_timeouts(&mut p, &raw.timeouts);
    let limits = validate_limits(&mut p, &raw.limits);
    let state_dir = raw
        .state_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    if state_dir.as_os_str().is_empty() {
        p.add("state_dir", "must not be empty");
    }
    let crd = raw.crd.map(|c| kubernetes::validate_crd(&mut p, c));
    if raw.services.is_empty() && crd.is_none() {
        p.add("services", "at least one service is required");
    }
    let knative = raw.knative.enabled;
    let services = validate_services(&mut p, raw.services, env, knative, [listen, admin]);
    let tls = raw.tls.map(|t| validate_tls(&mut p, t, listen, admin));
    if !p.0.is_empty() {
        return Err(p.0);
    }
    Ok(Config {
        listen,
        admin,
        admin_token_file,
        shutdown,
        timeouts,
        limits,
        services,
        tls,
        keda,
        coordination,
        crd,
        state_dir,
        knative,
        drop_underscore_headers: raw.drop_underscore_headers.unwrap_or(true),
    })
}

/// `listen` and `admin` (an address, or `{ listen, token_file }`).
fn validate_listeners(
    p: &mut Problems,
    listen: Option<SocketAddr>,
    admin: Option<RawAdmin>,
) -> (SocketAddr, SocketAddr, Option<PathBuf>) {
    let listen = listen.unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("constant"));
    let (admin, admin_token_file) = match admin {
        None => (None, None),
        Some(RawAdmin::Addr(a)) => (Some(a), None),
        Some(RawAdmin::Full(full)) => (full.listen, full.token_file),
    };
    let admin = admin.unwrap_or_else(|| DEFAULT_ADMIN.parse().expect("constant"));
    if admin_token_file
        .as_ref()
        .is_some_and(|f| f.as_os_str().is_empty())
    {
        p.add("admin.token_file", "must not be empty");
    }
    if listen == admin && listen.port() != 0 {
        p.add("admin", format!("must differ from listen ({listen})"));
    }
    (listen, admin, admin_token_file)
}

/// `timeouts`: every one but `upstream_idle` must be greater than 0.
fn validate_timeouts(p: &mut Problems, raw: &RawTimeouts) -> Timeouts {
    let t = Timeouts {
        client_header: dur(raw.client_header, DEFAULT_CLIENT_HEADER_TIMEOUT),
        client_idle: dur(raw.client_idle, DEFAULT_CLIENT_IDLE_TIMEOUT),
        client_write: dur(raw.client_write, DEFAULT_CLIENT_WRITE_TIMEOUT),
        client_body: dur(raw.client_body, DEFAULT_CLIENT_BODY_TIMEOUT),
        upstream_connect: dur(raw.upstream_connect, DEFAULT_UPSTREAM_CONNECT_TIMEOUT),
        upstream_idle: dur(raw.upstream_idle, DEFAULT_UPSTREAM_IDLE_TIMEOUT),
        upstream_response: dur(raw.upstream_response, DEFAULT_UPSTREAM_RESPONSE_TIMEOUT),
    };
    for (name, d) in [
        ("upstream_response", t.upstream_response),
        ("client_header", t.client_header),
        ("upstream_connect", t.upstream_connect),
        ("client_idle", t.client_idle),
        ("client_write", t.client_write),
        ("client_body", t.client_body),
    ] {
        positive(p, format!("timeouts.{name}"), d);
    }
    t
}

/// `limits`: every bound at least 1; the backlog fits the kernel's `int`.
fn validate_limits(p: &mut Problems, raw: &RawLimits) -> Limits {
    let limits = Limits {
        max_connections: raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        max_held: raw.max_held.unwrap_or(DEFAULT_MAX_HELD),
        listen_backlog: raw.listen_backlog.unwrap_or(DEFAULT_LISTEN_BACKLOG),
        admin_max_connections: raw
            .admin_max_connections
            .unwrap_or(DEFAULT_ADMIN_MAX_CONNECTIONS),
        admin_max_long_polls: raw
            .admin_max_long_polls
            .unwrap_or(DEFAULT_ADMIN_MAX_LONG_POLLS),
    };
    for (name, n) in [
        ("admin_max_connections", limits.admin_max_connections),
        ("max_connections", limits.max_connections),
        ("max_held", limits.max_held),
        ("listen_backlog", limits.listen_backlog as usize),
    ] {
        if n == 0 {
            p.add(format!("limits.{name}"), "must be at least 1");
        }
    }
    if limits.listen_backlog > i32::MAX as u32 {
        p.add(
            "limits.listen_backlog",
            format!("must be at most {}", i32::MAX),
        );
    }
    limits
}

/// Every service alone, then what needs them all: unique names, routes and process
/// addresses (none of them one of `own` listeners), `rollout` and `depends_on` references.
fn validate_services(
    p: &mut Problems,
    raw: Vec<RawService>,
    env: &dyn Fn(&str) -> Option<String>,
    knative: bool,
    own: [SocketAddr; 2],
) -> Vec<Service> {
    let mut seen = Seen::default();
    let mut services = Vec::with_capacity(raw.len());
    for (i, s) in raw.into_iter().enumerate() {
        let svc = service::validate(p, &ServicePaths::in_file(i), s, env, knative);
        seen.check(p, i, &svc, own);
        services.push(svc);
    }
    rollout::check_references(p, &services);
    let names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
    let deps: Vec<Vec<String>> = services.iter().map(|s| s.depends_on.clone()).collect();
    prewarm::validate_depends_on(p, &names, &deps);
    services
}

/// What the services before this one took: names, routes (host and path prefix), process
/// addresses; each with the index of the service that took it.
#[derive(Default)]
struct Seen {
    names: HashMap<String, usize>,
    routes: HashMap<(String, String), usize>,
    process_addrs: HashMap<SocketAddr, usize>,
}

impl Seen {
    /// Checks the `i`th service against those before it, and records what it takes.
    fn check(&mut self, p: &mut Problems, i: usize, s: &Service, own: [SocketAddr; 2]) {
        let at = format!("services[{i}]");
        if check_name(&s.name).is_ok() {
            if let Some(j) = self.names.insert(s.name.clone(), i) {
                p.add(
                    format!("{at}.name"),
                    format!("duplicate name {:?} (also services[{j}])", s.name),
                );
            }
        }
        let prefix = s.path_prefix.clone().unwrap_or_default();
        for (h, host) in s.hosts.iter().enumerate() {
            if let Some(j) = self.routes.insert((host.clone(), prefix.clone()), i) {
                if j != i {
                    p.add(
                        format!("{at}.hosts[{h}]"),
                        format!(
                            "host {host:?} with path_prefix {:?} is already routed to services[{j}]",
                            s.path_prefix.as_deref().unwrap_or("/")
                        ),
                    );
                }
            }
        }
        if let Backend::Process(b) = &s.backend {
            let at = format!("{at}.backend.process.address");
            if let Some(j) = self.process_addrs.insert(b.address, i) {
                p.add(
                    &at,
                    format!("{} is already used by services[{j}]", b.address),
                );
            }
            if own.contains(&b.address) {
                p.add(at, format!("{} is Reveille's own listener", b.address));
            }
        }
    }
}

/// Checks the TLS listener and loads its certificate and key, so a bad pair is reported by
/// `reveille check` and before `serve` binds anything.
fn validate_tls(p: &mut Problems, raw: RawTls, listen: SocketAddr, admin: SocketAddr) -> Tls {
    if (raw.listen == listen || raw.listen == admin) && raw.listen.port() != 0 {
        p.add(
            "tls.listen",
            format!("{} is already used by listen or admin", raw.listen),
        );
    }
    if let Err(problems) = super::tls::load(&raw.cert, &raw.key) {
        for problem in problems {
            p.add(problem.file.field(), problem.reason);
        }
    }
    Tls {
        listen: raw.listen,
        cert: raw.cert,
        key: raw.key,
    }
}
