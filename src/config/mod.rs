//! Configuration: the YAML file a user writes, parsed into typed settings and validated as a
//! whole. Everything downstream (router, gates, scalers, listeners) is built from [`Config`].
//!
//! Parsing happens in two steps. First serde reads the file into the raw shapes (`raw.rs`);
//! a field no shape knows is noted with its path (`services[0].queue.capcity`) and the read
//! goes on. Then `validate` checks the meaning of every field. Unknown fields and every
//! problem validation finds are reported at once, each with its path, so a user fixes a config
//! in one round trip. (A value of the wrong type, like `capacity: many`, stops the read: it is
//! reported with the unknown fields found before it.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Deserialize;

mod keda;
pub use keda::*;
mod expected;
mod json_path;
mod kubernetes;
mod limits;
mod prewarm;
mod problem;
mod raw;
mod rollout;
mod service;
pub mod tls;
mod validate;

pub use limits::{MAX_HEADERS, MAX_HEADER_BYTES, MAX_URI_BYTES};
pub(crate) use problem::Problems;
use problem::{dur, positive};
pub use problem::{ConfigError, Problem};
pub use raw::HumanDuration;
#[cfg(test)]
use service::expand_env;

pub use json_path::JsonPath;
pub use kubernetes::{
    Coordination, CrdWatch, KubernetesBackend, PortRef, Scaling, Workload, WorkloadKind,
    DEFAULT_LEASE_DURATION, DEFAULT_LEASE_NAME, DEFAULT_PEER_TIMEOUT, DEFAULT_REPLICAS,
};
pub use prewarm::{
    dependency_problems, describe_lead, DependencyProblem, Lead, Prewarm, ScheduledWindow,
    DEFAULT_MAX_HOURS_PER_WEEK, MIN_AUTO_LEAD,
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
#[derive(Debug, Clone, PartialEq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// TLS listener address.
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first; reloaded when the file changes.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) matching the leaf certificate.
    pub key: PathBuf,
}

/// What happens on SIGTERM/SIGINT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown {
    /// Keep accepting with `/readyz` at 503 this long, so load balancers stop sending first.
    pub delay: Duration,
    /// Upper bound for held and in-flight requests to finish after the listeners close.
    pub grace: Duration,
}

/// Timeouts of each phase of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    /// Maximum requests held at once; more get 503.
    pub capacity: usize,
    /// Maximum time one request is held; then it gets 504.
    pub timeout: Duration,
}

/// How a service's backend is reached and woken.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticBackend {
    /// The addresses, balanced by least in-flight.
    pub addresses: Vec<SocketAddr>,
}

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
        let (raw, mut problems) =
            raw::read::<raw::RawConfig, _>(de, "").map_err(|problems| ConfigError { problems })?;
        match validate::validate(raw, env) {
            Ok(config) if problems.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError { problems }),
            Err(more) => {
                problems.extend(more);
                Err(ConfigError { problems })
            }
        }
    }

    /// One service from a Kubernetes object: `spec` holds its fields as a service in a file
    /// has them (without `name` and `namespace`, which come from the object's metadata).
    /// Every problem names the object's own field (`spec.hosts[0]`, `metadata.name`), unknown
    /// fields of `spec` included. Cross-service checks (unique names and routes) are the
    /// caller's.
    pub fn object_service(
        name: &str,
        namespace: &str,
        spec: serde_json::Value,
    ) -> Result<Service, ConfigError> {
        let serde_json::Value::Object(mut fields) = spec else {
            return Err(ConfigError::one("spec", "must be an object"));
        };
        fields.insert("name".into(), name.into());
        fields.insert("namespace".into(), namespace.into());
        let (raw, mut problems) =
            raw::read::<raw::RawService, _>(serde_json::Value::Object(fields), "spec")
                .map_err(|problems| ConfigError { problems })?;
        let mut p = Problems(Vec::new());
        let service = service::validate(
            &mut p,
            &service::ServicePaths::object(),
            raw,
            &|_| None,
            false,
        );
        problems.extend(p.0);
        if problems.is_empty() {
            Ok(service)
        } else {
            Err(ConfigError { problems })
        }
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

#[cfg(test)]
mod tests;
