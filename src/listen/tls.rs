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
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
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

/// Which of the two files a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsFile {
    /// The certificate chain (`tls.cert`).
    Cert,
    /// The private key (`tls.key`).
    Key,
}

impl TlsFile {
    /// The config field naming this file.
    pub(crate) fn field(self) -> &'static str {
        match self {
            TlsFile::Cert => "tls.cert",
            TlsFile::Key => "tls.key",
        }
    }
}

/// Why a certificate or key could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsProblem {
    /// The file at fault.
    pub(crate) file: TlsFile,
    /// What is wrong with it.
    pub(crate) reason: String,
}

impl std::fmt::Display for TlsProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.field(), self.reason)
    }
}

fn problem(file: TlsFile, reason: impl Into<String>) -> TlsProblem {
    TlsProblem {
        file,
        reason: reason.into(),
    }
}

/// The crypto provider for every TLS config, inbound and outbound.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM bundle of CA certificates to trust for backends (`upstream_tls.ca`). Every
/// certificate in it must be a usable trust anchor.
pub(crate) fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: invalid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no CERTIFICATE block found (PEM)",
            path.display()
        ));
    }
    let mut store = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        store.add(cert.clone()).map_err(|e| {
            format!(
                "{}: certificate {} is not a usable CA: {e}",
                path.display(),
                i + 1
            )
        })?;
    }
    Ok(certs)
}

/// The system's trusted roots (`upstream_tls` without `ca`); an error when there are none.
pub(crate) fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = rustls::RootCertStore::empty();
    let certs: Vec<_> = found
        .certs
        .into_iter()
        .filter(|c| store.add(c.clone()).is_ok())
        .collect();
    if certs.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(format!("no system CA certificates were found{why}"));
    }
    Ok(certs)
}

/// The raw contents of the two files, as last read.
#[derive(Clone, PartialEq, Eq)]
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn read_pem(cert: &Path, key: &Path) -> Result<Pem, Vec<TlsProblem>> {
    let read = |file, path: &Path| {
        std::fs::read(path)
            .map_err(|e| problem(file, format!("cannot read {}: {e}", path.display())))
    };
    match (read(TlsFile::Cert, cert), read(TlsFile::Key, key)) {
        (Ok(cert), Ok(key)) => Ok(Pem { cert, key }),
        (c, k) => Err([c.err(), k.err()].into_iter().flatten().collect()),
    }
}

fn parse_chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsProblem> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(TlsFile::Cert, format!("invalid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(problem(TlsFile::Cert, "no CERTIFICATE block found (PEM)"));
    }
    Ok(chain)
}

fn parse_key(pem: &[u8]) -> Result<Arc<dyn SigningKey>, TlsProblem> {
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            problem(TlsFile::Key, "no PRIVATE KEY block found (PEM)")
        }
        e => problem(TlsFile::Key, format!("invalid PEM: {e}")),
    })?;
    provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| problem(TlsFile::Key, format!("unusable private key: {e}")))
}

/// Builds a certificate chain and signing key from PEM text, checking that the key belongs to
/// the first certificate. Every problem found is returned, each against its file.
pub(crate) fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, Vec<TlsProblem>> {
    let (chain, signer) = match (parse_chain(cert_pem), parse_key(key_pem)) {
        (Ok(chain), Ok(signer)) => (chain, signer),
        (c, k) => return Err([c.err(), k.err()].into_iter().flatten().collect()),
    };
    let ck = CertifiedKey::new(chain, signer);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(_)) => Err(vec![problem(
            TlsFile::Key,
            "does not match the certificate in tls.cert",
        )]),
        Err(e) => Err(vec![problem(
            TlsFile::Cert,
            format!("invalid certificate: {e}"),
        )]),
    }
}

/// Reads and checks a certificate and key file pair; every problem found is returned.
pub(crate) fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, Vec<TlsProblem>> {
    let read = |file, path: &Path| {
        std::fs::read(path)
            .map_err(|e| problem(file, format!("cannot read {}: {e}", path.display())))
    };
    let (cert_pem, key_pem) = match (read(TlsFile::Cert, cert), read(TlsFile::Key, key)) {
        (Ok(c), Ok(k)) => (c, k),
        // Whatever could be read is still checked, so one run reports both files' problems.
        (c, k) => {
            let mut problems = Vec::new();
            match c {
                Ok(pem) => problems.extend(parse_chain(&pem).err()),
                Err(p) => problems.push(p),
            }
            match k {
                Ok(pem) => problems.extend(parse_key(&pem).err()),
                Err(p) => problems.push(p),
            }
            return Err(problems);
        }
    };
    certified_key(&cert_pem, &key_pem)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_reported_against_the_right_file() {
        let e = certified_key(b"not pem", b"").unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(
            e[0].to_string(),
            "tls.cert: no CERTIFICATE block found (PEM)"
        );
        assert_eq!(
            e[1].to_string(),
            "tls.key: no PRIVATE KEY block found (PEM)"
        );
        let cert = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = certified_key(cert, b"nothing here").unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].file, TlsFile::Key);
    }

    #[test]
    fn missing_files_are_all_reported() {
        let e = load(
            Path::new("/nonexistent/reveille/c.pem"),
            Path::new("/nonexistent/reveille/k.pem"),
        )
        .unwrap_err();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].file, TlsFile::Cert);
        assert_eq!(e[1].file, TlsFile::Key);
        assert!(e[0]
            .reason
            .starts_with("cannot read /nonexistent/reveille/c.pem"));
    }
}
