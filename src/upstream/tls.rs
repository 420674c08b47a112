//! The pooled clients of TLS backends, owned by the upstream layer: one per distinct TLS
//! setting (server name, trusted roots, `h2` or `https`), made on first use and shared by
//! every gate with those settings. A gate replaced by a reload (its queue changed, say) gets
//! the same client back, so its pooled connections (and their handshakes) survive; a client
//! no service uses any more is dropped after the reload ([`TlsClients::retain`]), and its
//! connections close once the requests still on them are done.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use rustls_pki_types::{CertificateDer, ServerName};

use super::{tls_client, UpstreamClient};
use crate::config::{Protocol, Timeouts, UpstreamTls};

/// What makes two TLS clients the same: what [`tls_client`] builds one from.
#[derive(PartialEq, Eq, Hash)]
struct TlsKey {
    server_name: ServerName<'static>,
    roots: Arc<Vec<CertificateDer<'static>>>,
    h2: bool,
}

impl TlsKey {
    fn of(tls: &UpstreamTls, protocol: Protocol) -> Self {
        TlsKey {
            server_name: tls.server_name.clone(),
            roots: tls.roots.clone(),
            h2: protocol == Protocol::H2,
        }
    }
}

/// The TLS backends' pooled clients, by TLS setting.
pub struct TlsClients {
    timeouts: Timeouts,
    clients: Mutex<HashMap<TlsKey, Arc<UpstreamClient>>>,
}

impl TlsClients {
    /// No client yet; those made later get `timeouts`.
    pub fn new(timeouts: &Timeouts) -> Self {
        TlsClients {
            timeouts: *timeouts,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client for `tls` over `protocol` (`h2` or `https`): the one already made for the
    /// same settings, else a new one.
    pub fn client(&self, tls: &UpstreamTls, protocol: Protocol) -> Arc<UpstreamClient> {
        self.clients
            .lock()
            .entry(TlsKey::of(tls, protocol))
            .or_insert_with(|| Arc::new(tls_client(tls, protocol, &self.timeouts)))
            .clone()
    }

    /// Keeps only the clients of the settings in `used` (the services now configured).
    pub fn retain<'a>(&self, used: impl IntoIterator<Item = (&'a UpstreamTls, Protocol)>) {
        let used: Vec<TlsKey> = used
            .into_iter()
            .map(|(tls, p)| TlsKey::of(tls, p))
            .collect();
        self.clients.lock().retain(|k, _| used.contains(k));
    }

    /// How many clients there are.
    pub fn len(&self) -> usize {
        self.clients.lock().len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(name: &str) -> UpstreamTls {
        UpstreamTls {
            ca: None,
            server_name: ServerName::try_from(name.to_string()).unwrap(),
            roots: Arc::new(Vec::new()),
        }
    }

    #[tokio::test]
    async fn one_client_per_setting_shared_until_unused() {
        let cfg = crate::Config::parse(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: a\n    hosts: [a]\n    backend: { static: { addresses: [\"127.0.0.1:1\"] } }\n",
        )
        .unwrap();
        let clients = TlsClients::new(&cfg.timeouts);
        let a = clients.client(&tls("a.test"), Protocol::H2);
        let again = clients.client(&tls("a.test"), Protocol::H2);
        assert!(Arc::ptr_eq(&a, &again), "same settings, same client");
        let https = clients.client(&tls("a.test"), Protocol::Https);
        assert!(!Arc::ptr_eq(&a, &https), "ALPN differs");
        let b = clients.client(&tls("b.test"), Protocol::H2);
        assert!(!Arc::ptr_eq(&a, &b), "server name differs");
        assert_eq!(clients.len(), 3);
        let a_tls = tls("a.test");
        clients.retain([(&a_tls, Protocol::H2)]);
        assert_eq!(clients.len(), 1);
        let kept = clients.client(&tls("a.test"), Protocol::H2);
        assert!(Arc::ptr_eq(&a, &kept), "kept across the prune");
    }
}
