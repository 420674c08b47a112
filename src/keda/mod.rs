//! KEDA integration: the external scaler gRPC service (`keda.listen`), and the cluster view it
//! and the admin `metrics-api` endpoint answer from.
//!
//! KEDA owns the replica count of a service; Reveille tells it about demand. The gate signals
//! every change of its held count; an open `StreamIsActive` stream turns the first held request
//! into a pushed `true` at once, so KEDA scales from zero without waiting for its polling
//! interval. Counts are summed over Reveille's replicas ([`Cluster`]), found by a
//! [`PeerSource`].
//!
//! - [`local`]: this replica's counts and request rate.
//! - [`peers`]: where peers are and how their counts are read.
//! - [`cluster`]: the sum over replicas; the peer long-polls behind pushes.
//! - [`resolve`]: which service, metric and target a call is about.
//! - [`scaler`]: the gRPC service.

pub mod cluster;
pub mod local;

pub mod resolve;
pub mod scaler;

/// Code generated from `proto/externalscaler.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("externalscaler");
}

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::listen::accept::AcceptBackoff;
use crate::telemetry::metrics::Metrics;

pub use cluster::{Cluster, Totals};
pub use local::Local;
pub use resolve::ServiceTargets;
pub use scaler::Scaler;

use proto::external_scaler_server::ExternalScalerServer;

/// Serves the external scaler over HTTP/2 (cleartext, as KEDA dials it) until `stop`.
pub async fn serve(
    listener: TcpListener,
    scaler: Scaler,
    metrics: Metrics,
    mut stop: crate::shutdown::Signal,
) {
    let mut backoff = AcceptBackoff::new("keda", metrics);
    let svc = ExternalScalerServer::new(scaler);
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        // Streams stay open for hours; keep-alive pings find dead KEDA connections.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
            _ = stop.fired() => return,
        };
        backoff.accepted();
        let _ = stream.set_nodelay(true);
        let conn =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc.clone()));
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.fired() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
}
