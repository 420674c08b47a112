//! Server: builds everything from a [`Config`], binds the proxy and admin listeners, serves
//! connections, and runs the graceful shutdown:
//!
//! 1. `/readyz` turns 503; connections are still accepted for `shutdown.delay`.
//! 2. The listeners close; open connections finish their requests (keep-alive ends, HTTP/2
//!    gets GOAWAY). Held requests keep waiting for their backend, bounded by `shutdown.grace`.
//! 3. Whatever is still held then is answered 503; backends are stopped; `run` returns.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub mod crd;
mod start;
#[cfg(test)]
pub(crate) mod testing;

pub use start::start_with;

use tokio::task::JoinHandle;
use tracing::info;

use crate::activate;
use crate::cluster::peers::{PeerSource, StaticPeers};
use crate::config::{Backend, Config};
use crate::gate::Gate;
use crate::keda::{Local, Scaler, ServiceTargets};
use crate::route::services::{Changes, Services};

/// Extra time after the grace for the 503s of still-held requests to be written.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// A running Reveille.
pub struct Running {
    /// Where the proxy listens.
    pub proxy_addr: SocketAddr,
    /// Where the admin endpoints listen.
    pub admin_addr: SocketAddr,
    /// Where the TLS listener listens, when `tls` is configured.
    pub tls_addr: Option<SocketAddr>,
    /// Where the KEDA external scaler listens, if enabled (`keda.listen`).
    pub keda_addr: Option<SocketAddr>,
    services: Arc<Services>,
    local: Arc<Local>,
    keda_scaler: Scaler,
    shutdown: crate::shutdown::Trigger,
    task: JoinHandle<()>,
}

impl Running {
    /// Begins a graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.fire();
    }

    /// Applies a new configuration's services (see [`Services::apply`]): unchanged services
    /// are not touched. Listeners, limits and timeouts are not reloaded: the changes that would
    /// need a restart are returned in [`Reloaded::needs_restart`].
    pub async fn reload(&self, config: &Config, running: &Config) -> Reloaded {
        let changes = self.services.apply(&config.services).await;
        self.local.sync(&self.services.load().gates());
        self.keda_scaler.set_targets(targets(config));
        let mut needs_restart = Vec::new();
        if config.listen != running.listen {
            needs_restart.push("listen");
        }
        if config.admin != running.admin {
            needs_restart.push("admin");
        }
        if config.tls != running.tls {
            needs_restart.push("tls");
        }
        if config.keda != running.keda {
            needs_restart.push("keda");
        }
        if (config.limits, config.timeouts, config.shutdown)
            != (running.limits, running.timeouts, running.shutdown)
        {
            needs_restart.push("limits/timeouts/shutdown");
        }
        Reloaded {
            changes,
            needs_restart,
        }
    }

    /// Every service's live gate, in config order (after a reload: the reloaded ones).
    pub fn gates(&self) -> Vec<Arc<Gate>> {
        self.services.load().gates()
    }

    /// The live services.
    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// Waits until the shutdown has completed.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// What a reload did.
#[derive(Debug)]
pub struct Reloaded {
    /// Services added, replaced, re-routed, removed.
    pub changes: Changes,
    /// Top-level sections that changed but take effect only after a restart.
    pub needs_restart: Vec<&'static str>,
}

fn targets(config: &Config) -> std::collections::HashMap<String, ServiceTargets> {
    config
        .services
        .iter()
        .map(|s| (s.name.clone(), ServiceTargets::from(s)))
        .collect()
}

/// Builds the services, binds the listeners, and starts serving. Peers come from
/// `keda.peers`; when a service runs on Kubernetes, the API client comes from the in-cluster
/// config or `KUBECONFIG`.
pub async fn start(config: Config) -> io::Result<Running> {
    let peers = Arc::new(StaticPeers(config.keda.peers.clone()));
    start_with_peers(config, peers).await
}

/// Like [`start`], with the peer replicas found by `peers` (e.g. a Kubernetes discovery).
pub async fn start_with_peers(config: Config, peers: Arc<dyn PeerSource>) -> io::Result<Running> {
    let kube = if on_kubernetes(&config) {
        let client = kube::Client::try_default().await.map_err(|e| {
            io::Error::other(format!(
                "cannot create a Kubernetes client (in-cluster config or KUBECONFIG): {e}"
            ))
        })?;
        Some(client)
    } else {
        None
    };
    start_with(config, peers, kube).await
}

/// Like [`start`], with the Kubernetes API client given (tests, custom kubeconfigs).
pub async fn start_with_kube(config: Config, kube: Option<kube::Client>) -> io::Result<Running> {
    let peers = Arc::new(StaticPeers(config.keda.peers.clone()));
    start_with(config, peers, kube).await
}

fn on_kubernetes(config: &Config) -> bool {
    config
        .services
        .iter()
        .any(|s| matches!(s.backend, Backend::Kubernetes(_)))
        || config.crd.is_some()
}

/// Before any process backend starts: `state_dir` must be usable when a process service
/// exists, and backends a previous Reveille left running (it was killed) are terminated, so
/// their addresses are free again.
async fn process_state(config: &Config) -> io::Result<()> {
    let grace_of = |name: &str| {
        config
            .services
            .iter()
            .find_map(|s| match &s.backend {
                Backend::Process(p) if s.name == name => Some(p.stop_grace),
                _ => None,
            })
            .unwrap_or(crate::config::DEFAULT_STOP_GRACE)
    };
    let any_process = config
        .services
        .iter()
        .any(|s| matches!(s.backend, Backend::Process(_)));
    if any_process {
        activate::pidfile::prepare(&config.state_dir)?;
    }
    let reaped = activate::pidfile::reap_leftovers(&config.state_dir, &grace_of).await;
    if reaped > 0 {
        info!(reaped, state_dir = %config.state_dir.display(), "terminated backends left running by a previous Reveille");
    }
    Ok(())
}
