//! Peer replicas: where they are ([`PeerSource`]) and how their counts are read ([`PeerClient`]).
//!
//! A peer is another Reveille replica's admin listener. Its counts come from `GET /api/local`,
//! bounded by a short timeout. The same endpoint long-polls: with `wait=SERVICE&since=N` it
//! answers as soon as that service holds a request again (its `holds_total` moves past `N`),
//! or after `timeout_ms`, which is how the replica that holds KEDA's stream learns at once of a
//! request held elsewhere.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One service's counts on one replica (the peer wire format).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceCounts {
    /// Requests held now.
    pub held: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Requests since the replica started.
    pub requests_total: u64,
    /// Requests per second over the rate window.
    pub rate: f64,
    /// Times the hold queue went from empty to non-empty (monotonic; a change means a request
    /// was held since the last look).
    #[serde(default)]
    pub holds_total: u64,
    /// Milliseconds since a request last arrived or finished (scale-down decisions need every
    /// replica idle). Absent from older replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_for_ms: Option<u64>,
    /// A controlled rollout is validating or switching here (the service counts as active).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolling_out: bool,
    /// A pre-warm window (or an awake dependent) keeps the service up here: it counts as
    /// active, with one replica's worth of demand.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept_awake: bool,
}

/// Every service's counts on one replica (the body of admin `/api/local`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalCounts {
    /// By service name.
    pub services: BTreeMap<String, ServiceCounts>,
}

/// Largest peer answer read (a count per service is small).
const MAX_BODY: usize = 1 << 20;

/// Where the other replicas are. The static list comes from `keda.peers`; a Kubernetes
/// backend can implement this from an EndpointSlice watch of Reveille's own Service.
pub trait PeerSource: Send + Sync + 'static {
    /// The admin addresses of the other replicas now (never this replica's own).
    fn peers(&self) -> Vec<SocketAddr>;
}

/// A fixed list of peers, from the config.
#[derive(Debug, Clone, Default)]
pub struct StaticPeers(pub Vec<SocketAddr>);

impl PeerSource for StaticPeers {
    fn peers(&self) -> Vec<SocketAddr> {
        self.0.clone()
    }
}

impl<T: PeerSource + ?Sized> PeerSource for Arc<T> {
    fn peers(&self) -> Vec<SocketAddr> {
        (**self).peers()
    }
}

/// Why a peer's counts could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting or the HTTP exchange failed.
    #[error("request failed: {0}")]
    Http(String),
    /// The peer answered with an error status.
    #[error("answered {0}")]
    Status(StatusCode),
    /// The body was not the expected JSON.
    #[error("bad answer: {0}")]
    Body(String),
}

/// Reads peers' counts over HTTP/1.1 (pooled connections).
#[derive(Clone)]
pub struct PeerClient {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for PeerClient {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerClient {
    /// A client with its own connection pool.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        PeerClient {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        }
    }

    /// The peer's counts now.
    pub async fn counts(
        &self,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<LocalCounts, PeerError> {
        self.get(peer, "/api/local".to_string(), timeout).await
    }

    /// Long-polls the peer until `service`'s `holds_total` differs from `since` (or `wait`
    /// passes), then returns its counts; without `since` it answers at once. `timeout` bounds
    /// the network part on top of `wait`.
    pub async fn wait_held(
        &self,
        peer: SocketAddr,
        service: &str,
        since: Option<u64>,
        wait: Duration,
        timeout: Duration,
    ) -> Result<LocalCounts, PeerError> {
        let path = match since {
            Some(n) => format!(
                "/api/local?wait={service}&since={n}&timeout_ms={}",
                wait.as_millis()
            ),
            None => format!("/api/local?wait={service}"),
        };
        self.get(peer, path, wait + timeout).await
    }

    async fn get(
        &self,
        peer: SocketAddr,
        path: String,
        timeout: Duration,
    ) -> Result<LocalCounts, PeerError> {
        let req = Request::get(format!("http://{peer}{path}"))
            .header(http::header::USER_AGENT, "reveille-peer")
            .body(Empty::new())
            .map_err(|e| PeerError::Http(e.to_string()))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| PeerError::Http(e.to_string()))?;
            if resp.status() != StatusCode::OK {
                return Err(PeerError::Status(resp.status()));
            }
            let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| PeerError::Body(e.to_string()))?
                .to_bytes();
            serde_json::from_slice(&body).map_err(|e| PeerError::Body(e.to_string()))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| PeerError::Timeout(timeout))?
    }
}
