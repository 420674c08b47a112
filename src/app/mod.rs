//! Server: builds everything from a [`Config`], binds the proxy and admin listeners, serves
//! connections, and runs the graceful shutdown:
//!
//! 1. `/readyz` turns 503; connections are still accepted for `shutdown.delay`.
//! 2. The listeners close; open connections finish their requests (keep-alive ends, HTTP/2
//!    gets GOAWAY). Held requests keep waiting for their backend, bounded by `shutdown.grace`.
//! 3. Whatever is still held then is answered 503; backends are stopped; `run` returns.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub mod crd;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::activate;
use crate::admin::{self, AdminState};
use crate::config::{Backend, Config};
use crate::error::ProxyError;
use crate::forward::Shared;
use crate::gate::{Gate, HeldLimit};
use crate::keda::{self, Cluster, Local, PeerSource, Scaler, ServiceTargets, StaticPeers};
use crate::listen::inbound::Inbound;
use crate::listen::tls::TlsListener;
use crate::listen::{bind_listener, Connections};
use crate::route::services::{Changes, Services};
use crate::telemetry::metrics::Metrics;

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
    /// Every service's gate at start, in config order.
    pub gates: Vec<Arc<Gate>>,
    services: Arc<Services>,
    local: Arc<Local>,
    keda_scaler: Scaler,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Begins a graceful shutdown.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
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

/// Like [`start`], with the peer source and the Kubernetes API client given.
pub async fn start_with(
    config: Config,
    peers: Arc<dyn PeerSource>,
    kube: Option<kube::Client>,
) -> io::Result<Running> {
    if kube.is_none() && on_kubernetes(&config) {
        return Err(io::Error::other(
            "a service runs on Kubernetes but no Kubernetes client was given",
        ));
    }
    let metrics = Metrics::new();
    let (stop_kube, stop_kube_rx) = watch::channel(false);
    let mut kube_tasks = Vec::new();
    let kube_client = kube.clone();
    let kube = kube.map(|client| {
        activate::kubernetes::context(
            client,
            config.coordination.as_ref(),
            peers.clone(),
            config.admin.port(),
            &stop_kube_rx,
            &mut kube_tasks,
        )
    });
    // With `coordination.peers_service`, KEDA's sums cover the replicas found there too.
    let peers = kube
        .as_ref()
        .and_then(|k| k.coordinator.as_ref())
        .map(|c| c.peers())
        .unwrap_or(peers);
    let prewarm = crate::prewarm::Context::open(&config).map_err(io::Error::other)?;
    let services = Services::with_prewarm(
        metrics.clone(),
        HeldLimit::new(config.limits.max_held),
        kube,
        config.timeouts,
        prewarm,
    );
    process_state(&config).await?;
    services.keep_pid_files_in(config.state_dir.clone());
    services.apply(&config.services).await;
    let gates = services.load().gates();
    let crd_client = kube_client.filter(|_| config.crd.is_some());
    let shared = Arc::new(Shared::new(services.clone(), metrics.clone(), &config));
    let local = Arc::new(Local::new(&gates, config.keda.rate_window));
    let cluster = Arc::new(Cluster::new(
        local.clone(),
        peers,
        &config.keda,
        metrics.clone(),
    ));
    let keda_scaler = Scaler::new(
        cluster.clone(),
        targets(&config),
        config.keda.stream_interval,
        metrics.clone(),
    );
    let admin_state = Arc::new(AdminState {
        services: services.clone(),
        metrics,
        ready: true.into(),
        cluster,
        long_polls: Arc::new(tokio::sync::Semaphore::new(
            config.limits.admin_max_long_polls,
        )),
        control: crate::admin::control::Control::new(config.admin_token_file.clone()),
    });

    let proxy_listener =
        bind_listener(config.listen, config.limits.listen_backlog).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {} (listen): {e}", config.listen),
            )
        })?;
    let admin_listener = TcpListener::bind(config.admin).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {} (admin): {e}", config.admin),
        )
    })?;
    let tls_listener = match &config.tls {
        Some(t) => Some(TlsListener::bind(t, config.limits.listen_backlog).await?),
        None => None,
    };
    let keda_listener = match config.keda.listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {addr} (keda.listen): {e}"),
            )
        })?),
        None => None,
    };
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let tls_addr = tls_listener.as_ref().map(|t| t.local_addr()).transpose()?;
    let keda_addr = match &keda_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    info!(%proxy_addr, %admin_addr, ?tls_addr, ?keda_addr, services = config.services.len(), "reveille listening");

    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let (close_listeners, close_rx) = watch::channel(false);
    let conns = Connections::new(config.limits.max_connections);
    let inbound = Arc::new(Inbound::new(&config.timeouts));

    let tls_task = tls_listener.map(|t| {
        t.serve(
            shared.clone(),
            inbound.clone(),
            config.timeouts.client_header,
            close_rx.clone(),
            conns.clone(),
        )
    });

    let proxy_task = tokio::spawn(crate::listen::serve_plain(
        proxy_listener,
        shared.clone(),
        inbound,
        close_rx,
        conns.clone(),
    ));
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    let sampler = tokio::spawn(local.clone().run_sampler(admin_stop_rx.clone()));
    if let (Some(client), Some(cfg)) = (crd_client, config.crd.clone()) {
        let (svcs, loc) = (services.clone(), local.clone());
        let changed: Arc<dyn Fn() + Send + Sync> = Arc::new(move || loc.sync(&svcs.load().gates()));
        kube_tasks.push(tokio::spawn(crate::app::crd::run(
            client,
            cfg,
            services.clone(),
            changed,
            stop_kube_rx.clone(),
        )));
    }
    let keda_task = keda_listener.map(|l| {
        tokio::spawn(keda::serve(
            l,
            keda_scaler.clone(),
            admin_state.metrics.clone(),
            admin_stop_rx.clone(),
        ))
    });
    let admin_bounds = admin::AdminBounds {
        max_connections: config.limits.admin_max_connections,
        header: config.timeouts.client_header,
        idle: config.timeouts.client_idle,
    };
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin_state.clone(),
        admin_bounds,
        admin_stop_rx,
    ));

    let shutdown_cfg = config.shutdown;
    let task_services = services.clone();
    let task_shared = shared.clone();
    let task = tokio::spawn(async move {
        crate::shutdown::stopped(&mut shutdown_rx).await;
        info!(delay = ?shutdown_cfg.delay, grace = ?shutdown_cfg.grace, "shutting down");
        admin_state.ready.store(false, Ordering::SeqCst);
        tokio::time::sleep(shutdown_cfg.delay).await;
        let _ = close_listeners.send(true);
        let _ = proxy_task.await;
        if let Some(t) = tls_task {
            let _ = t.await;
        }
        let drained = conns.drained();
        tokio::pin!(drained);
        if tokio::time::timeout(shutdown_cfg.grace, &mut drained)
            .await
            .is_err()
        {
            let gates = task_services.load().gates();
            let held: usize = gates.iter().map(|g| g.held()).sum();
            warn!(
                held,
                "shutdown grace passed; answering held requests with 503"
            );
            for g in &gates {
                g.fail_held(ProxyError::ShuttingDown {
                    service: g.name().clone(),
                });
            }
            // Requests already forwarded and still waiting for their answer get the same 503.
            task_shared.cut_in_flight();
            let _ = tokio::time::timeout(FINAL_FLUSH, &mut drained).await;
        }
        task_services.stop_all().await;
        task_services.prewarm_context().save();
        let _ = stop_kube.send(true);
        for t in kube_tasks {
            let _ = t.await;
        }
        let _ = admin_stop.send(true);
        let _ = admin_task.await;
        let _ = sampler.await;
        if let Some(t) = keda_task {
            let _ = t.await;
        }
        info!("shutdown complete");
    });
    Ok(Running {
        services,
        local,
        keda_scaler,
        proxy_addr,
        admin_addr,
        tls_addr,
        keda_addr,
        gates,
        shutdown,
        task,
    })
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
