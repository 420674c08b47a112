//! Reading TLS material from PEM files: the inbound listener's certificate chain and key
//! (`tls.cert`, `tls.key`) and the CA bundles trusted for backends (`upstream_tls.ca`, or the
//! system's roots). Config validation loads them so a bad file is reported by `reveille check`;
//! the listener and the upstream connector use the same functions (re-exported by `crate::listen::tls`).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::{CertifiedKey, SigningKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Which of the two files a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// The certificate chain (`tls.cert`).
    Cert,
    /// The private key (`tls.key`).
    Key,
}

impl TlsFile {
    /// The config field naming this file.
    pub fn field(self) -> &'static str {
        match self {
            TlsFile::Cert => "tls.cert",
            TlsFile::Key => "tls.key",
        }
    }
}

/// Why a certificate or key could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsProblem {
    /// The file at fault.
    pub file: TlsFile,
    /// What is wrong with it.
    pub reason: String,
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
pub fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
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
pub fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
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
pub(crate) struct Pem {
    pub(crate) cert: Vec<u8>,
    pub(crate) key: Vec<u8>,
}

pub(crate) fn read_pem(cert: &Path, key: &Path) -> Result<Pem, Vec<TlsProblem>> {
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
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, Vec<TlsProblem>> {
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
pub fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, Vec<TlsProblem>> {
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
