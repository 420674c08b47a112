//! Start-up: the services and what replicas share, the listeners, the tasks serving them, and
//! the shutdown task that stops them in order (see the module above).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{on_kubernetes, process_state, targets, Running, FINAL_FLUSH};
use crate::activate;
use crate::admin::{self, AdminState};
use crate::cluster::peers::PeerSource;
use crate::config::Config;
use crate::error::ProxyError;
use crate::forward::Shared;
use crate::gate::HeldLimit;
use crate::keda::{self, Cluster, Local, Scaler};
use crate::listen::inbound::Inbound;
use crate::listen::tls::TlsListener;
use crate::listen::{bind_listener, Connections};
use crate::route::services::Services;
use crate::shutdown::{Signal, Trigger};
use crate::telemetry::metrics::Metrics;

/// Like [`super::start`], with the peer source and the Kubernetes API client given.
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
    let core = Core::build(&config, peers, kube, metrics.clone()).await?;
    let listeners = Listeners::bind(&config).await?;
    let (proxy_addr, admin_addr, tls_addr, keda_addr) = listeners.addrs()?;
    info!(%proxy_addr, %admin_addr, ?tls_addr, ?keda_addr, services = config.services.len(), "reveille listening");
    let (shutdown, shutdown_rx) = crate::shutdown::channel();
    let services = core.services.clone();
    let local = core.local.clone();
    let keda_scaler = core.keda_scaler.clone();
    let tasks = serve(&config, core, listeners, metrics);
    let task = tokio::spawn(tasks.shut_down(shutdown_rx, config.shutdown));
    Ok(Running {
        services,
        local,
        keda_scaler,
        proxy_addr,
        admin_addr,
        tls_addr,
        keda_addr,
        shutdown,
        task,
    })
}

/// The services and what is shared about them, before any listener.
struct Core {
    services: Arc<Services>,
    shared: Arc<Shared>,
    local: Arc<Local>,
    keda_scaler: Scaler,
    admin: Arc<AdminState>,
    /// Stops the Kubernetes tasks (watches, Lease, coordination, CRD).
    stop_kube: Trigger,
    kube_tasks: Vec<JoinHandle<()>>,
    /// The CRD source, when `crd` is set.
    crd: Option<(kube::Client, crate::config::CrdWatch)>,
}

impl Core {
    async fn build(
        config: &Config,
        peers: Arc<dyn PeerSource>,
        kube: Option<kube::Client>,
        metrics: Metrics,
    ) -> io::Result<Core> {
        let (stop_kube, stop_kube_rx) = crate::shutdown::channel();
        let mut kube_tasks = Vec::new();
        let crd = kube.clone().zip(config.crd.clone());
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
        let prewarm = prewarm_context(config, kube.as_ref()).await?;
        let services = Services::with_prewarm(
            metrics.clone(),
            HeldLimit::new(config.limits.max_held),
            kube,
            config.timeouts,
            prewarm,
        );
        process_state(config).await?;
        services.keep_pid_files_in(config.state_dir.clone());
        services.apply(&config.services).await;
        let gates = services.load().gates();
        let shared = Arc::new(Shared::new(services.clone(), metrics.clone(), config));
        let local = Arc::new(Local::new(&gates, config.keda.rate_window));
        let cluster = Arc::new(Cluster::new(
            local.clone(),
            peers,
            &config.keda,
            metrics.clone(),
        ));
        let keda_scaler = Scaler::new(
            cluster.clone(),
            targets(config),
            config.keda.stream_interval,
            metrics.clone(),
        );
        let admin = Arc::new(AdminState {
            services: services.clone(),
            metrics,
            ready: true.into(),
            cluster,
            long_polls: Arc::new(tokio::sync::Semaphore::new(
                config.limits.admin_max_long_polls,
            )),
            control: admin::control::Control::new(config.admin_token_file.clone()),
        });
        Ok(Core {
            services,
            shared,
            local,
            keda_scaler,
            admin,
            stop_kube,
            kube_tasks,
            crd,
        })
    }
}

/// Every listener, bound (so a taken address fails the start, naming its setting).
struct Listeners {
    proxy: TcpListener,
    admin: TcpListener,
    tls: Option<TlsListener>,
    keda: Option<TcpListener>,
}

fn cannot_listen(what: &str, addr: std::net::SocketAddr, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}"))
}

impl Listeners {
    async fn bind(config: &Config) -> io::Result<Listeners> {
        let proxy = bind_listener(config.listen, config.limits.listen_backlog)
            .map_err(|e| cannot_listen("listen", config.listen, e))?;
        let admin = TcpListener::bind(config.admin)
            .await
            .map_err(|e| cannot_listen("admin", config.admin, e))?;
        let tls = match &config.tls {
            Some(t) => Some(TlsListener::bind(t, config.limits.listen_backlog).await?),
            None => None,
        };
        let keda = match config.keda.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| cannot_listen("keda.listen", addr, e))?,
            ),
            None => None,
        };
        Ok(Listeners {
            proxy,
            admin,
            tls,
            keda,
        })
    }

    #[allow(clippy::type_complexity)]
    fn addrs(
        &self,
    ) -> io::Result<(
        std::net::SocketAddr,
        std::net::SocketAddr,
        Option<std::net::SocketAddr>,
        Option<std::net::SocketAddr>,
    )> {
        Ok((
            self.proxy.local_addr()?,
            self.admin.local_addr()?,
            self.tls.as_ref().map(|t| t.local_addr()).transpose()?,
            self.keda.as_ref().map(|l| l.local_addr()).transpose()?,
        ))
    }
}

/// The running tasks, and what stops each of them.
struct Tasks {
    core: Core,
    /// Closes the client-facing listeners.
    close_listeners: Trigger,
    proxy: JoinHandle<()>,
    tls: Option<JoinHandle<()>>,
    conns: Arc<Connections>,
    /// Stops the admin side (admin listener, KEDA listener, the rate sampler).
    admin_stop: Trigger,
    admin: JoinHandle<()>,
    keda: Option<JoinHandle<()>>,
    sampler: JoinHandle<()>,
}

/// Starts serving every listener.
fn serve(config: &Config, mut core: Core, listeners: Listeners, metrics: Metrics) -> Tasks {
    let (close_listeners, close_rx) = crate::shutdown::channel();
    let conns = Connections::new(config.limits.max_connections);
    let inbound = Arc::new(Inbound::new(&config.timeouts));
    let tls = listeners.tls.map(|t| {
        t.serve(
            core.shared.clone(),
            inbound.clone(),
            config.timeouts.client_header,
            close_rx.clone(),
            conns.clone(),
        )
    });
    let proxy = tokio::spawn(crate::listen::serve_plain(
        listeners.proxy,
        core.shared.clone(),
        inbound,
        close_rx,
        conns.clone(),
    ));
    let (admin_stop, admin_stop_rx) = crate::shutdown::channel();
    let sampler = tokio::spawn(core.local.clone().run_sampler(admin_stop_rx.clone()));
    if let Some((client, cfg)) = core.crd.take() {
        let (svcs, loc) = (core.services.clone(), core.local.clone());
        let changed: Arc<dyn Fn() + Send + Sync> = Arc::new(move || loc.sync(&svcs.load().gates()));
        core.kube_tasks.push(tokio::spawn(crate::app::crd::run(
            client,
            cfg,
            core.services.clone(),
            changed,
            core.stop_kube.signal(),
        )));
    }
    let keda = listeners.keda.map(|l| {
        tokio::spawn(keda::serve(
            l,
            core.keda_scaler.clone(),
            metrics,
            admin_stop_rx.clone(),
        ))
    });
    let bounds = admin::AdminBounds {
        max_connections: config.limits.admin_max_connections,
        header: config.timeouts.client_header,
        idle: config.timeouts.client_idle,
    };
    let admin = tokio::spawn(admin::serve(
        listeners.admin,
        core.admin.clone(),
        bounds,
        admin_stop_rx,
    ));
    Tasks {
        core,
        close_listeners,
        proxy,
        tls,
        conns,
        admin_stop,
        admin,
        keda,
        sampler,
    }
}

impl Tasks {
    /// The graceful shutdown, once `shutdown` fires (steps in the module docs).
    async fn shut_down(self, mut shutdown: Signal, cfg: crate::config::Shutdown) {
        shutdown.fired().await;
        info!(delay = ?cfg.delay, grace = ?cfg.grace, "shutting down");
        self.core.admin.ready.store(false, Ordering::SeqCst);
        tokio::time::sleep(cfg.delay).await;
        self.close_listeners.fire();
        let _ = self.proxy.await;
        if let Some(t) = self.tls {
            let _ = t.await;
        }
        let drained = self.conns.drained();
        tokio::pin!(drained);
        if tokio::time::timeout(cfg.grace, &mut drained).await.is_err() {
            let gates = self.core.services.load().gates();
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
            self.core.shared.cut_in_flight();
            let _ = tokio::time::timeout(FINAL_FLUSH, &mut drained).await;
        }
        self.core.services.stop_all().await;
        self.core.services.prewarm_context().finish().await;
        self.core.stop_kube.fire();
        for t in self.core.kube_tasks {
            let _ = t.await;
        }
        self.admin_stop.fire();
        let _ = self.admin.await;
        let _ = self.sampler.await;
        if let Some(t) = self.keda {
            let _ = t.await;
        }
        info!("shutdown complete");
    }
}

/// The pre-warm context: on Kubernetes with `coordination:` the learned history is shared
/// through a ConfigMap; otherwise it is the file in `state_dir`.
async fn prewarm_context(
    config: &Config,
    kube: Option<&activate::kubernetes::KubeContext>,
) -> io::Result<crate::prewarm::Context> {
    match (kube, &config.coordination) {
        (Some(k), Some(c)) if k.coordinator.is_some() => {
            let coordinator = k.coordinator.clone().expect("checked");
            let leader = Arc::new(move || coordinator.is_leader());
            Ok(crate::prewarm::Context::open_shared(config, k.client.clone(), c, leader).await)
        }
        _ => crate::prewarm::Context::open(config).map_err(io::Error::other),
    }
}
