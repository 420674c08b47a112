//! Configuration: the YAML file a user writes, parsed into typed settings and validated as a
//! whole. Everything downstream (router, gates, scalers, listeners) is built from [`Config`].
//!
//! Parsing happens in two steps. First serde reads the file into the raw shapes below, with
//! unknown fields rejected and the failing field's path reported (`services[0].queue.capcity`).
//! Then [`validate`] checks the meaning of every field and reports *every* problem at once, each
//! with its path, so a user fixes a config in one round trip.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod keda;
pub use keda::*;
mod json_path;
mod kubernetes;
mod prewarm;
mod rollout;

pub use json_path::JsonPath;
pub use kubernetes::{
    Coordination, CrdWatch, KubernetesBackend, PortRef, Scaling, Workload, WorkloadKind,
    DEFAULT_LEASE_DURATION, DEFAULT_LEASE_NAME, DEFAULT_PEER_TIMEOUT, DEFAULT_REPLICAS,
};
pub use prewarm::{
    describe_lead, Lead, Prewarm, ScheduledWindow, DEFAULT_MAX_HOURS_PER_WEEK, MIN_AUTO_LEAD,
};
pub use rollout::{
    AtZero, BodyRegex, ExpectJson, OnFailure, Overlap, Promotion, Rollout, ValidationStep,
    DEFAULT_QUIESCE, DEFAULT_STEP_TIMEOUT,
};

/// Default proxy listener.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default admin listener.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9090";
/// Default hold-queue capacity per service.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1000;
/// Default time a request may be held before it gets 504.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time with nothing held or in flight before a service is stopped.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time a process backend gets to become ready.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time between SIGTERM and SIGKILL when a process backend is stopped.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// Default interval between readiness probes of a starting process.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(2);
/// Default number of start attempts when a process exits before it is ready.
pub const DEFAULT_START_ATTEMPTS: u32 = 3;
/// Default time to keep answering after SIGTERM before listeners close (`/readyz` is 503).
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::ZERO;
/// Default bound on how long held and in-flight requests may finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default bound on reading a client's request headers (slowloris protection).
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client connection may stay open with no request in progress (HTTP/1.1
/// keep-alive between requests, HTTP/2 with no open stream); then it is closed (HTTP/2: GOAWAY).
pub const DEFAULT_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time writing to a client may make no progress before the connection is closed.
pub const DEFAULT_CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a request body may send no bytes before the request is answered 408.
pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default directory for state that survives a restart (pid files, learned demand).
pub const DEFAULT_STATE_DIR: &str = "./.reveille-state";
/// Default upgrade protocols a service passes through (`services[].upgrades`).
pub const DEFAULT_UPGRADES: &[&str] = &["websocket"];
/// Default bound on open admin connections.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 256;
/// Default bound on concurrent `/api/local` long-polls on the admin listener.
pub const DEFAULT_ADMIN_MAX_LONG_POLLS: usize = 64;
/// Default bound on connecting to a backend.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time an idle pooled upstream connection is kept.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Default bound on waiting for a backend's response headers (Knative's revision timeout).
pub const DEFAULT_UPSTREAM_RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default bound on open client connections; more are closed at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Default bound on requests held across all services (a memory bound).
pub const DEFAULT_MAX_HELD: usize = 100_000;
/// Default listen backlog of the proxy and TLS listeners (Linux's default `net.core.somaxconn`).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;
/// Namespace of services that do not name one (used in `/queue` keys and Knative routing).
pub const DEFAULT_NAMESPACE: &str = "default";

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Proxy listener address.
    pub listen: SocketAddr,
    /// Admin listener address (health, metrics, state).
    pub admin: SocketAddr,
    /// File holding the bearer token the admin commands (`POST /api/rollouts/...`) require;
    /// re-read when it changes. `None` (default): those commands answer 403.
    pub admin_token_file: Option<PathBuf>,
    /// Shutdown behaviour.
    pub shutdown: Shutdown,
    /// Timeouts of the proxy's phases.
    pub timeouts: Timeouts,
    /// Global bounds.
    pub limits: Limits,
    /// The services, in file order.
    pub services: Vec<Service>,
    /// Inbound TLS listener; `None` when off.
    pub tls: Option<Tls>,
    /// KEDA external scaler and peer replicas (`keda:`; absent: no gRPC listener, no peers).
    pub keda: Keda,
    /// Scale-down coordination between Reveille replicas on Kubernetes (`coordination:`;
    /// absent: this replica decides its own scale-downs).
    pub coordination: Option<Coordination>,
    /// Services from `ReveilleService` objects (`crd:`; absent: only the file's services).
    pub crd: Option<CrdWatch>,
    /// Where state that must survive a restart is kept (`state_dir`, default
    /// [`DEFAULT_STATE_DIR`]): pid files of process backends, learned demand.
    pub state_dir: PathBuf,
    /// Knative routing for every service of the file (`knative: { enabled }`, default off);
    /// each service's own `knative:` overrides it.
    pub knative: bool,
    /// Request fields whose name holds `_` are dropped before forwarding (default on, as
    /// nginx's `underscores_in_headers off`): some backends fold `_` into `-`, so
    /// `X_Forwarded_For` could pass for a field Reveille sets.
    pub drop_underscore_headers: bool,
}

/// Inbound TLS: a second listener beside the plain one, same services.
#[derive(Debug, Clone)]
pub struct Tls {
    /// TLS listener address.
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first; reloaded when the file changes.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) matching the leaf certificate.
    pub key: PathBuf,
}

/// What happens on SIGTERM/SIGINT.
#[derive(Debug, Clone, Copy)]
pub struct Shutdown {
    /// Keep accepting with `/readyz` at 503 this long, so load balancers stop sending first.
    pub delay: Duration,
    /// Upper bound for held and in-flight requests to finish after the listeners close.
    pub grace: Duration,
}

/// Timeouts of each phase of a request.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Reading a client's request headers.
    pub client_header: Duration,
    /// A client connection with no request in progress (HTTP/1.1 keep-alive, HTTP/2 with no
    /// open stream) is closed after this long (default 60 s).
    pub client_idle: Duration,
    /// Writing to a client may make no progress this long; then the connection is closed and
    /// its slot freed (default 60 s).
    pub client_write: Duration,
    /// A request body may send no bytes this long; then it is answered 408, or the connection
    /// closed when the response has started (default 60 s).
    pub client_body: Duration,
    /// Connecting to a backend.
    pub upstream_connect: Duration,
    /// Keeping an idle pooled connection to a backend.
    pub upstream_idle: Duration,
    /// Waiting for a backend's response headers once the request is sent.
    pub upstream_response: Duration,
}

/// Bounds across all services.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open client connections at most (plain and TLS listeners together).
    pub max_connections: usize,
    /// Requests held at most, all services together.
    pub max_held: usize,
    /// Connections the kernel completes and keeps for the proxy and TLS listeners until
    /// Reveille accepts them (capped by the kernel at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Open admin connections at most (default 256); more are closed at once.
    pub admin_max_connections: usize,
    /// Concurrent `/api/local` long-polls on the admin listener at most (default 64); more
    /// are answered `503` with `Retry-After`.
    pub admin_max_long_polls: usize,
}

/// The protocol Reveille speaks to a service's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (default).
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (gRPC backends).
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`); needs `upstream_tls`.
    H2,
    /// HTTP/1.1 over TLS (ALPN `http/1.1`); needs `upstream_tls`.
    Https,
}

impl Protocol {
    /// Whether the backend is reached over TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::H2 | Protocol::Https)
    }
}

/// TLS to a service's backends (`upstream_tls`, with protocol `h2` or `https`).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    /// The CA bundle file; `None`: the system's roots.
    pub ca: Option<PathBuf>,
    /// The name checked in the backend's certificate and sent as SNI.
    pub server_name: rustls_pki_types::ServerName<'static>,
    /// The trusted roots as loaded (from `ca` or the system), so a changed file is a change.
    pub roots: Arc<Vec<rustls_pki_types::CertificateDer<'static>>>,
}

/// One service: where its requests come from and how its backend is woken.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// Unique name (used in metrics, logs and the admin API).
    pub name: String,
    /// Namespace (Kubernetes namespace; `/queue` keys and Knative routing).
    pub namespace: String,
    /// Protocol to the backend.
    pub protocol: Protocol,
    /// TLS to the backend; `Some` exactly when `protocol` is `h2` or `https`.
    pub upstream_tls: Option<UpstreamTls>,
    /// Hosts that select this service: exact names, or `*.suffix` wildcards.
    pub hosts: Vec<String>,
    /// Optional path prefix (segment-aware: `/api` matches `/api` and `/api/x`, not `/apix`).
    pub path_prefix: Option<String>,
    /// The backend and how it is woken.
    pub backend: Backend,
    /// Hold-queue bound and per-request hold deadline.
    pub queue: Queue,
    /// With nothing held or in flight this long, the backend is stopped.
    pub idle_timeout: Duration,
    /// In-flight limit per endpoint; `None` is unlimited.
    pub concurrency: Option<usize>,
    /// What KEDA scales this service on.
    pub keda: ServiceKeda,
    /// Reachable as a Knative revision (`Knative-Serving-*` fields, `<name>.<namespace>.svc.*`
    /// hosts) besides its own hosts; off unless `knative: true` here or at the top.
    pub knative: bool,
    /// Upgrade protocols passed to the backend (lowercase; default `[websocket]`). Any other
    /// `Upgrade` is removed and the request forwarded as a plain one; `h2c` is never allowed.
    pub upgrades: Vec<String>,
    /// Windows in which the service is woken before any request (`prewarm:`; absent: none).
    pub prewarm: Option<Prewarm>,
    /// Services woken (in this order, each ready before the next) before this one, and kept
    /// up while it is (`depends_on`, default none).
    pub depends_on: Vec<String>,
}

/// Hold-queue settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Queue {
    /// Maximum requests held at once; more get 503.
    pub capacity: usize,
    /// Maximum time one request is held; then it gets 504.
    pub timeout: Duration,
}

/// How a service's backend is reached and woken.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// A local command started on demand.
    Process(ProcessBackend),
    /// Fixed addresses, always ready.
    Static(StaticBackend),
    /// A Kubernetes Deployment or StatefulSet, scaled through its `scale` subresource.
    Kubernetes(KubernetesBackend),
}

impl Backend {
    /// The backend's kind, as the admin API shows it.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Process(_) => "process",
            Backend::Static(_) => "static",
            Backend::Kubernetes(_) => "kubernetes",
        }
    }
}

/// A local command started on demand and stopped when idle.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessBackend {
    /// Program and arguments (`${VAR}` expanded from the environment at load time).
    pub command: Vec<String>,
    /// Where the process listens once started.
    pub address: SocketAddr,
    /// Extra environment variables for the process.
    pub env: BTreeMap<String, String>,
    /// Working directory of the process.
    pub cwd: Option<PathBuf>,
    /// HTTP path that must answer 2xx before the backend counts as ready (else: TCP accept).
    pub readiness_path: Option<String>,
    /// Interval between readiness probes while starting.
    pub probe_interval: Duration,
    /// Time the process gets to become ready.
    pub start_timeout: Duration,
    /// Time between SIGTERM and SIGKILL on stop.
    pub stop_grace: Duration,
    /// Starts tried when the process exits before it is ready.
    pub start_attempts: u32,
}

/// Fixed upstream addresses, always ready.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticBackend {
    /// The addresses, balanced by least in-flight.
    pub addresses: Vec<SocketAddr>,
}

/// Every problem found in a config file, each with its field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `field.path: reason` lines.
    pub problems: Vec<Problem>,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Field path like `services[1].queue.capacity` (empty for the document itself).
    pub path: String,
    /// Why the value is wrong.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn one(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                path: path.into(),
                reason: reason.into(),
            }],
        }
    }
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

// ---------------------------------------------------------------------------------------------
// Raw shapes, as written in YAML.

/// `admin:` as an address, or `{ listen: ADDR, token_file: FILE }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAdmin {
    Addr(SocketAddr),
    Full {
        listen: Option<SocketAddr>,
        token_file: Option<PathBuf>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<SocketAddr>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    services: Vec<RawService>,
    tls: Option<RawTls>,
    #[serde(default)]
    keda: keda::RawKeda,
    coordination: Option<kubernetes::RawCoordination>,
    crd: Option<kubernetes::RawCrd>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    knative: RawKnative,
    drop_underscore_headers: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKnative {
    #[serde(default)]
    enabled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    delay: Option<HumanDuration>,
    grace: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    client_header: Option<HumanDuration>,
    client_idle: Option<HumanDuration>,
    client_write: Option<HumanDuration>,
    client_body: Option<HumanDuration>,
    upstream_connect: Option<HumanDuration>,
    upstream_idle: Option<HumanDuration>,
    upstream_response: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    max_held: Option<usize>,
    listen_backlog: Option<u32>,
    admin_max_connections: Option<usize>,
    admin_max_long_polls: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    protocol: Protocol,
    upstream_tls: Option<RawUpstreamTls>,
    #[serde(default)]
    hosts: Vec<String>,
    path_prefix: Option<String>,
    backend: RawBackend,
    #[serde(default)]
    queue: RawQueue,
    idle_timeout: Option<HumanDuration>,
    #[serde(default)]
    concurrency: usize,
    #[serde(default)]
    keda: keda::RawServiceKeda,
    rollout: Option<rollout::RawRollout>,
    knative: Option<bool>,
    upgrades: Option<Vec<String>>,
    prewarm: Option<prewarm::RawPrewarm>,
    #[serde(default)]
    depends_on: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca: Option<PathBuf>,
    server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    capacity: Option<i64>,
    timeout: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    process: Option<RawProcess>,
    #[serde(rename = "static")]
    fixed: Option<RawStatic>,
    kubernetes: Option<kubernetes::RawKubernetes>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcess {
    #[serde(default)]
    command: Vec<String>,
    address: SocketAddr,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    #[serde(default)]
    readiness: RawReadiness,
    start_timeout: Option<HumanDuration>,
    stop_grace: Option<HumanDuration>,
    start_attempts: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReadiness {
    path: Option<String>,
    interval: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatic {
    #[serde(default)]
    addresses: Vec<SocketAddr>,
}

// ---------------------------------------------------------------------------------------------

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one("", format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text)
    }

    /// Parses and validates config text. `${REVEILLE_EXE}` in a process command is the path of
    /// the running binary (handy for `demo-backend`); other `${VAR}`s come from the environment.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, &|k| {
            if k == "REVEILLE_EXE" {
                if let Some(exe) = reveille_exe() {
                    return Some(exe.to_string());
                }
            }
            std::env::var(k).ok()
        })
    }

    /// Parses and validates config text, expanding `${VAR}` in process commands through `env`.
    pub fn parse_with_env(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let mut msg = e.into_inner().to_string();
            // The YAML parser prefixes the parent's path itself; ours is the full one.
            if let Some((head, rest)) = msg.split_once(": ") {
                if !head.contains(' ') && path.starts_with(head) {
                    msg = rest.to_string();
                }
            }
            ConfigError::one(path, msg)
        })?;
        validate(raw, env)
    }
}

/// What `${REVEILLE_EXE}` stands for: the running binary's path, resolved once, the first time
/// it is asked for (`main` asks before anything else). Once the binary is replaced on disk (an
/// upgrade), the kernel names it `…/reveille (deleted)`; resolved again at a reload, every
/// process service using it would look changed and fail to start. Resolved once, an unchanged
/// config stays unchanged, and the path names the binary now installed there.
pub fn reveille_exe() -> Option<&'static str> {
    static EXE: OnceLock<Option<String>> = OnceLock::new();
    EXE.get_or_init(|| {
        let exe = std::env::current_exe().ok()?;
        let exe = exe.to_string_lossy();
        Some(exe.strip_suffix(" (deleted)").unwrap_or(&exe).to_string())
    })
    .as_deref()
}

pub(crate) struct Problems(Vec<Problem>);

impl Problems {
    pub(crate) fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            reason: reason.into(),
        });
    }
}

fn dur(d: Option<HumanDuration>, default: Duration) -> Duration {
    d.map(|d| d.0).unwrap_or(default)
}

fn positive(p: &mut Problems, path: String, d: Duration) {
    if d.is_zero() {
        p.add(path, "must be greater than 0");
    }
}

fn validate(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let mut p = Problems(Vec::new());
    let listen = raw
        .listen
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("constant"));
    let (admin, admin_token_file) = match raw.admin {
        None => (None, None),
        Some(RawAdmin::Addr(a)) => (Some(a), None),
        Some(RawAdmin::Full { listen, token_file }) => (listen, token_file),
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
    let shutdown = Shutdown {
        delay: dur(raw.shutdown.delay, DEFAULT_SHUTDOWN_DELAY),
        grace: dur(raw.shutdown.grace, DEFAULT_SHUTDOWN_GRACE),
    };
    let timeouts = Timeouts {
        client_header: dur(raw.timeouts.client_header, DEFAULT_CLIENT_HEADER_TIMEOUT),
        client_idle: dur(raw.timeouts.client_idle, DEFAULT_CLIENT_IDLE_TIMEOUT),
        client_write: dur(raw.timeouts.client_write, DEFAULT_CLIENT_WRITE_TIMEOUT),
        client_body: dur(raw.timeouts.client_body, DEFAULT_CLIENT_BODY_TIMEOUT),
        upstream_connect: dur(
            raw.timeouts.upstream_connect,
            DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
        ),
        upstream_idle: dur(raw.timeouts.upstream_idle, DEFAULT_UPSTREAM_IDLE_TIMEOUT),
        upstream_response: dur(
            raw.timeouts.upstream_response,
            DEFAULT_UPSTREAM_RESPONSE_TIMEOUT,
        ),
    };
    let mut own = vec![("listen", listen), ("admin", admin)];
    own.extend(raw.tls.as_ref().map(|t| ("tls.listen", t.listen)));
    let keda = keda::validate(&mut p, raw.keda, &own);
    let coordination = raw
        .coordination
        .map(|c| kubernetes::validate_coordination(&mut p, c, env));
    positive(
        &mut p,
        "timeouts.upstream_response".into(),
        timeouts.upstream_response,
    );
    let limits = Limits {
        max_connections: raw
            .limits
            .max_connections
            .unwrap_or(DEFAULT_MAX_CONNECTIONS),
        max_held: raw.limits.max_held.unwrap_or(DEFAULT_MAX_HELD),
        listen_backlog: raw.limits.listen_backlog.unwrap_or(DEFAULT_LISTEN_BACKLOG),
        admin_max_connections: raw
            .limits
            .admin_max_connections
            .unwrap_or(DEFAULT_ADMIN_MAX_CONNECTIONS),
        admin_max_long_polls: raw
            .limits
            .admin_max_long_polls
            .unwrap_or(DEFAULT_ADMIN_MAX_LONG_POLLS),
    };
    if limits.admin_max_connections == 0 {
        p.add("limits.admin_max_connections", "must be at least 1");
    }
    if limits.max_connections == 0 {
        p.add("limits.max_connections", "must be at least 1");
    }
    if limits.max_held == 0 {
        p.add("limits.max_held", "must be at least 1");
    }
    if limits.listen_backlog == 0 {
        p.add("limits.listen_backlog", "must be at least 1");
    } else if limits.listen_backlog > i32::MAX as u32 {
        p.add(
            "limits.listen_backlog",
            format!("must be at most {}", i32::MAX),
        );
    }
    positive(
        &mut p,
        "timeouts.client_header".into(),
        timeouts.client_header,
    );
    positive(
        &mut p,
        "timeouts.upstream_connect".into(),
        timeouts.upstream_connect,
    );
    for (name, d) in [
        ("client_idle", timeouts.client_idle),
        ("client_write", timeouts.client_write),
        ("client_body", timeouts.client_body),
    ] {
        positive(&mut p, format!("timeouts.{name}"), d);
    }
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
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut routes: HashMap<(String, String), usize> = HashMap::new();
    let mut process_addrs: HashMap<SocketAddr, usize> = HashMap::new();
    let mut services = Vec::with_capacity(raw.services.len());
    for (i, s) in raw.services.into_iter().enumerate() {
        let at = format!("services[{i}]");
        let namespace = s.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        if let Err(why) = check_name(&namespace) {
            p.add(format!("{at}.namespace"), why);
        }
        if let Err(why) = check_name(&s.name) {
            p.add(format!("{at}.name"), why);
        } else if let Some(j) = names.insert(s.name.clone(), i) {
            p.add(
                format!("{at}.name"),
                format!("duplicate name {:?} (also services[{j}])", s.name),
            );
        }
        if s.hosts.is_empty() {
            p.add(format!("{at}.hosts"), "at least one host is required");
        }
        let mut hosts = Vec::with_capacity(s.hosts.len());
        for (h, host) in s.hosts.iter().enumerate() {
            match normalize_host(host) {
                Ok(host) => hosts.push(host),
                Err(why) => p.add(format!("{at}.hosts[{h}]"), why),
            }
        }
        if let Some(prefix) = &s.path_prefix {
            if !prefix.starts_with('/') {
                p.add(format!("{at}.path_prefix"), "must start with '/'");
            }
        }
        let prefix = s
            .path_prefix
            .clone()
            .map(|x| x.trim_end_matches('/').to_string())
            .filter(|x| !x.is_empty());
        for (h, host) in hosts.iter().enumerate() {
            let key = (host.clone(), prefix.clone().unwrap_or_default());
            if let Some(j) = routes.insert(key, i) {
                if j != i {
                    p.add(
                        format!("{at}.hosts[{h}]"),
                        format!(
                            "host {host:?} with path_prefix {:?} is already routed to services[{j}]",
                            prefix.as_deref().unwrap_or("/")
                        ),
                    );
                }
            }
        }

        let capacity = match s.queue.capacity {
            None => DEFAULT_QUEUE_CAPACITY,
            Some(c) if c < 1 => {
                p.add(format!("{at}.queue.capacity"), "must be at least 1");
                1
            }
            Some(c) => c as usize,
        };
        let queue = Queue {
            capacity,
            timeout: dur(s.queue.timeout, DEFAULT_HOLD_TIMEOUT),
        };
        positive(&mut p, format!("{at}.queue.timeout"), queue.timeout);
        let idle_timeout = dur(s.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        positive(&mut p, format!("{at}.idle_timeout"), idle_timeout);

        let backend = match (s.backend.process, s.backend.fixed, s.backend.kubernetes) {
            (Some(proc_), None, None) => {
                let b = validate_process(&mut p, &format!("{at}.backend.process"), proc_, env);
                if let Some(j) = process_addrs.insert(b.address, i) {
                    p.add(
                        format!("{at}.backend.process.address"),
                        format!("{} is already used by services[{j}]", b.address),
                    );
                }
                if b.address == listen || b.address == admin {
                    p.add(
                        format!("{at}.backend.process.address"),
                        format!("{} is Reveille's own listener", b.address),
                    );
                }
                Backend::Process(b)
            }
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
                &mut p,
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
        let mut backend = backend;
        if let Some(raw) = s.rollout {
            let r = rollout::validate(&mut p, &format!("{at}.rollout"), raw);
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
        let keda = keda::validate_service(&mut p, &format!("{at}.keda"), s.keda);
        let upgrades = validate_upgrades(&mut p, &format!("{at}.upgrades"), s.upgrades);
        let upstream_tls = validate_upstream_tls(&mut p, &at, s.protocol, s.upstream_tls);
        let prewarm = s
            .prewarm
            .map(|w| prewarm::validate(&mut p, &format!("{at}.prewarm"), w));
        if prewarm.is_some() && matches!(backend, Backend::Static(_)) {
            p.add(
                format!("{at}.prewarm"),
                "a `static` backend is always up: nothing to pre-warm",
            );
        }
        services.push(Service {
            name: s.name,
            namespace,
            protocol: s.protocol,
            upstream_tls,
            hosts,
            path_prefix: prefix,
            backend,
            queue,
            idle_timeout,
            concurrency: (s.concurrency > 0).then_some(s.concurrency),
            keda,
            knative: s.knative.unwrap_or(raw.knative.enabled),
            upgrades,
            prewarm,
            depends_on: s.depends_on,
        });
    }
    rollout::check_references(&mut p, &services);
    let names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
    let deps: Vec<Vec<String>> = services.iter().map(|s| s.depends_on.clone()).collect();
    prewarm::validate_depends_on(&mut p, &names, &deps);
    let tls = raw.tls.map(|t| validate_tls(&mut p, t, listen, admin));
    if p.0.is_empty() {
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
            knative: raw.knative.enabled,
            drop_underscore_headers: raw.drop_underscore_headers.unwrap_or(true),
        })
    } else {
        Err(ConfigError { problems: p.0 })
    }
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

/// Checks the TLS listener and loads its certificate and key, so a bad pair is reported by
/// `reveille check` and before `serve` binds anything.
fn validate_tls(p: &mut Problems, raw: RawTls, listen: SocketAddr, admin: SocketAddr) -> Tls {
    if (raw.listen == listen || raw.listen == admin) && raw.listen.port() != 0 {
        p.add(
            "tls.listen",
            format!("{} is already used by listen or admin", raw.listen),
        );
    }
    if let Err(problems) = crate::listen::tls::load(&raw.cert, &raw.key) {
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
        Some(ca) => {
            crate::listen::tls::load_ca(ca).map_err(|why| (format!("{at}.upstream_tls.ca"), why))
        }
        None => crate::listen::tls::system_roots().map_err(|why| {
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
fn expand_env(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
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

fn check_name(name: &str) -> Result<(), String> {
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

#[cfg(test)]
mod tests;
