//! Inbound TLS: the second listener beside the plain one. A connection's way starts here when
//! `tls` is configured: TLS handshake (bounded by `timeouts.client_header`), ALPN picks HTTP/2
//! (`h2`) or HTTP/1.1, and the request goes on to the same [`Proxy`] as plain traffic, with
//! `X-Forwarded-Proto: https`.
//!
//! The certificate and key are read from PEM files and reloaded when the files change: a
//! filesystem watch (inotify through `notify`) on their directories wakes a reload after a short
//! debounce; if no watch can be set up, the files are compared on an interval instead. A
//! reloaded pair is swapped in atomically ([`CertStore`]) and used by new handshakes only;
//! existing connections are untouched. A pair that does not load is logged and the previous one
//! kept.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::accept::{accept_loop, Connections};
use crate::config::Tls;
use crate::forward::{Proxy, Shared};
use crate::listen::inbound::{drive, Inbound};

/// ALPN protocols offered, in order of preference.
pub(crate) const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// Quiet time after a file event before the files are read, so a cert and key written one
/// after the other are picked up together.
pub(crate) const RELOAD_DEBOUNCE: Duration = Duration::from_millis(250);
/// Longest a reload waits for quiet after the first event.
pub(crate) const RELOAD_MAX_DELAY: Duration = Duration::from_secs(5);
/// How often the files are compared when no filesystem watch could be set up.
pub(crate) const RELOAD_POLL_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) use crate::config::tls::{certified_key, TlsProblem};
pub(crate) use crate::config::tls::{provider, read_pem, Pem};

/// The certificate handed to new handshakes; swapped whole on reload.
#[derive(Debug)]
pub(crate) struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    /// A store serving `key` until it is replaced.
    pub(crate) fn new(key: CertifiedKey) -> Self {
        CertStore {
            current: ArcSwap::from_pointee(key),
        }
    }

    /// Replaces the certificate for handshakes from now on.
    pub(crate) fn replace(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The rustls server settings: certificates from `store`, ALPN `h2` then `http/1.1`.
pub(crate) fn server_config(store: Arc<CertStore>) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(store);
    cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A bound TLS listener with its certificate loaded, not yet serving.
pub(crate) struct TlsListener {
    listener: TcpListener,
    store: Arc<CertStore>,
    pem: Pem,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsListener {
    /// Loads the certificate and key and binds `tls.listen` with the listen `backlog`
    /// (`limits.listen_backlog`).
    pub(crate) async fn bind(cfg: &Tls, backlog: u32) -> io::Result<TlsListener> {
        let pem = read_pem(&cfg.cert, &cfg.key).map_err(invalid)?;
        let ck = certified_key(&pem.cert, &pem.key).map_err(invalid)?;
        let listener = super::bind_listener(cfg.listen, backlog).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {} (tls.listen): {e}", cfg.listen),
            )
        })?;
        Ok(TlsListener {
            listener,
            store: Arc::new(CertStore::new(ck)),
            pem,
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
        })
    }

    /// Where it listens.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections until `close` turns true, reloading the certificate meanwhile.
    /// Resolves to the graceful-shutdown handle covering every connection it accepted.
    pub(crate) fn serve(
        self,
        shared: Arc<Shared>,
        inbound: Arc<Inbound>,
        handshake_timeout: Duration,
        close: crate::shutdown::Signal,
        conns: Arc<Connections>,
    ) -> JoinHandle<()> {
        let reloader = tokio::spawn(reload_loop(
            self.store.clone(),
            self.cert,
            self.key,
            self.pem,
            close.clone(),
        ));
        let acceptor = TlsAcceptor::from(server_config(self.store));
        tokio::spawn(async move {
            accept_tls(
                self.listener,
                acceptor,
                shared,
                inbound,
                handshake_timeout,
                close,
                conns,
            )
            .await;
            let _ = reloader.await;
        })
    }
}

fn invalid(problems: Vec<TlsProblem>) -> io::Error {
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    io::Error::new(io::ErrorKind::InvalidData, text.join("; "))
}

async fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    inbound: Arc<Inbound>,
    handshake_timeout: Duration,
    close: crate::shutdown::Signal,
    conns: Arc<Connections>,
) {
    let metrics = shared.metrics.clone();
    let conn_close = close.clone();
    // The slot is taken before the handshake, so a shutdown waits for connections still
    // shaking hands.
    accept_loop(
        listener,
        "tls",
        metrics,
        conns,
        close,
        |stream, remote, guard| {
            let close = conn_close.clone();
            let acceptor = acceptor.clone();
            let shared = shared.clone();
            let inbound = inbound.clone();
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                let svc = Proxy::new(shared, remote, "https");
                // ALPN decides: `h2` is HTTP/2, anything else (or none) HTTP/1.1, on the fast
                // path as on a plain connection.
                if h2 {
                    drive(inbound.http2(tls, svc), close, guard).await;
                } else {
                    let deadline = tokio::time::Instant::now() + inbound.client_header();
                    crate::listen::fast::serve(inbound, tls, svc, close, guard, deadline).await;
                }
            });
        },
    )
    .await;
}

/// Sets up a filesystem watch on the directories of `paths`; each change wakes `wake`.
/// Directories, not files: certificate tools (and Kubernetes secret mounts) replace files by
/// renaming, which a watch on the old file would miss.
fn watch_dirs(paths: &[&Path], wake: Arc<Notify>) -> notify::Result<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            // Our own reads show up as access events; they change nothing. A writer closing
            // the file does.
            Ok(ev)
                if matches!(ev.kind, EventKind::Access(a)
                    if a != AccessKind::Close(AccessMode::Write)) => {}
            _ => wake.notify_one(),
        }
    })?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    for p in paths {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dirs.contains(&dir) {
            watcher.watch(&dir, RecursiveMode::NonRecursive)?;
            dirs.push(dir);
        }
    }
    Ok(watcher)
}

async fn reload_loop(
    store: Arc<CertStore>,
    cert: PathBuf,
    key: PathBuf,
    mut last: Pem,
    mut stop: crate::shutdown::Signal,
) {
    let wake = Arc::new(Notify::new());
    let watcher = match watch_dirs(&[&cert, &key], wake.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, interval = ?RELOAD_POLL_INTERVAL, "cannot watch the TLS files; checking them on an interval instead");
            None
        }
    };
    loop {
        tokio::select! {
            _ = stop.fired() => break,
            _ = wake.notified(), if watcher.is_some() => {
                // Wait for the files to go quiet: each further event restarts the wait, up to
                // a bound (other files in the directory may never go quiet).
                let latest = tokio::time::Instant::now() + RELOAD_MAX_DELAY;
                while tokio::time::Instant::now() < latest
                    && tokio::time::timeout(RELOAD_DEBOUNCE, wake.notified()).await.is_ok()
                {}
            }
            _ = tokio::time::sleep(RELOAD_POLL_INTERVAL), if watcher.is_none() => {}
        }
        let pem = match read_pem(&cert, &key) {
            Ok(pem) => pem,
            Err(problems) => {
                // Mid-rotation a file can be missing for a moment; the next event retries.
                for p in problems {
                    debug!("TLS reload deferred: {p}");
                }
                continue;
            }
        };
        if pem == last {
            continue;
        }
        match certified_key(&pem.cert, &pem.key) {
            Ok(ck) => {
                store.replace(ck);
                info!(cert = %cert.display(), "TLS certificate reloaded");
            }
            Err(problems) => {
                for p in problems {
                    warn!("TLS reload failed, keeping the previous certificate: {p}");
                }
            }
        }
        last = pem;
    }
    drop(watcher);
}
