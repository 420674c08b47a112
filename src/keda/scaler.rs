//! The `ExternalScaler` gRPC service KEDA calls. Every answer is for the whole cluster
//! (see [`Cluster`]); `StreamIsActive` pushes `true` the moment a request is held, here (the
//! gate's held-count event) or on a peer (its long-poll answers), and repeats the current state
//! every `keda.stream_interval` while the stream is open.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::cluster::Cluster;
use super::proto::external_scaler_server::ExternalScaler;
use super::proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use super::resolve::{resolve, Resolved, ServiceTargets};
use crate::telemetry::metrics::Metrics;

type StreamItem = Result<IsActiveResponse, Status>;

/// The external scaler service.
#[derive(Clone)]
pub struct Scaler {
    cluster: Arc<Cluster>,
    targets: Arc<ArcSwap<HashMap<String, ServiceTargets>>>,
    interval: Duration,
    metrics: Metrics,
}

impl Scaler {
    /// A scaler answering from `cluster`; `targets` has each service's configured defaults.
    pub fn new(
        cluster: Arc<Cluster>,
        targets: HashMap<String, ServiceTargets>,
        interval: Duration,
        metrics: Metrics,
    ) -> Self {
        Scaler {
            cluster,
            targets: Arc::new(ArcSwap::from_pointee(targets)),
            interval,
            metrics,
        }
    }

    fn resolve(&self, r: &ScaledObjectRef) -> Result<Resolved, Status> {
        Ok(resolve(r, &self.targets.load())?)
    }

    /// Replaces the services' configured defaults (after a reload).
    pub fn set_targets(&self, targets: HashMap<String, ServiceTargets>) {
        self.targets.store(Arc::new(targets));
    }

    async fn value(&self, r: &Resolved) -> Result<f64, Status> {
        let t = self.cluster.totals(&r.service).await.ok_or_else(|| {
            Status::not_found(format!("service {:?} is not configured", r.service))
        })?;
        let v = match r.metric {
            crate::config::ScalingMetric::Concurrency => t.concurrency as f64,
            crate::config::ScalingMetric::Rate => t.rate,
        };
        // Kept up for a pre-warm window: at least one replica's worth of demand, so a metric
        // trigger scales to one replica (and not below) for the window.
        Ok(if t.kept_awake { v.max(r.target) } else { v })
    }
}

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        req: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let r = self.resolve(req.get_ref())?;
        let t = self.cluster.totals(&r.service).await.unwrap_or_default();
        Ok(Response::new(IsActiveResponse { result: t.active() }))
    }

    type StreamIsActiveStream = ReceiverStream<StreamItem>;

    async fn stream_is_active(
        &self,
        req: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let r = self.resolve(req.get_ref())?;
        let gate = self.cluster.local().gate(&r.service).ok_or_else(|| {
            Status::not_found(format!("service {:?} is not configured", r.service))
        })?;
        let (tx, rx) = mpsc::channel(16);
        let service: Arc<str> = r.service.into();
        let streams = StreamGuard::new(&self.metrics);

        // Dropped when the event task ends (the service is gone): the interval task follows,
        // and the stream closes.
        let (events_done, events_ended) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(push_events(
            gate,
            self.cluster.clone(),
            self.metrics.clone(),
            service.clone(),
            tx.clone(),
            (streams, events_done),
        ));
        tokio::spawn(push_state(
            self.cluster.clone(),
            self.metrics.clone(),
            service,
            self.interval,
            tx,
            events_ended,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_metric_spec(
        &self,
        req: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let r = self.resolve(req.get_ref())?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: r.metric_name(),
                target_size: r.target.ceil() as i64,
                target_size_float: r.target,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        req: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = req.into_inner();
        let sor = req
            .scaled_object_ref
            .ok_or_else(|| Status::invalid_argument("scaledObjectRef is required"))?;
        let r = self.resolve(&sor)?;
        let value = self.value(&r).await?;
        let metric_name = if req.metric_name.is_empty() {
            r.metric_name()
        } else {
            req.metric_name
        };
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name,
                metric_value: value.round() as i64,
                metric_value_float: value,
            }],
        }))
    }
}

/// How often a stream's peer watch follows changes of the peer list.
const PEER_RESYNC: Duration = Duration::from_secs(10);

/// Pushes `true` on each event: a request held here or on a peer (a new hold since the last
/// look), a rollout, a pre-warm window. Follows the service's gate across reloads; ends when
/// the service is gone or the stream is closed (`_guards` go with it).
async fn push_events(
    gate: Arc<crate::gate::Gate>,
    cluster: Arc<Cluster>,
    metrics: Metrics,
    name: Arc<str>,
    events_tx: mpsc::Sender<StreamItem>,
    _guards: (StreamGuard, tokio::sync::oneshot::Sender<()>),
) {
    let mut gate = gate;
    let mut held = gate.subscribe_held();
    let mut reloads = cluster.local().subscribe();
    let (peer_tx, mut peer_rx) = mpsc::channel(4);
    let mut peers = cluster.watch_peers(&name, peer_tx);
    held.borrow_and_update();
    reloads.borrow_and_update();
    let mut seen = gate.holds_total();
    let mut resync = tokio::time::interval(PEER_RESYNC);
    loop {
        let push = tokio::select! {
            _ = events_tx.closed() => return,
            _ = reloads.changed() => {
                reloads.borrow_and_update();
                // A reload replaced the service's gate: follow the new one. Removed:
                // end the stream, so KEDA's reopen gets "not configured".
                match cluster.local().gate(&name) {
                    Some(g) if Arc::ptr_eq(&g, &gate) => false,
                    Some(g) => {
                        held = g.subscribe_held();
                        held.borrow_and_update();
                        seen = g.holds_total();
                        let push = g.held() > 0;
                        gate = g;
                        push
                    }
                    None => return,
                }
            }
            changed = held.changed() => {
                if changed.is_err() {
                    return; // the service is gone
                }
                held.borrow_and_update();
                // A new hold since the last look, even if already released again.
                let holds = gate.holds_total();
                let push = holds != seen || gate.rolling_out() || gate.kept_awake();
                seen = holds;
                push
            }
            Some(()) = peer_rx.recv() => true,
            _ = resync.tick() => {
                peers.sync();
                false
            }
        };
        if push {
            metrics.keda_push(&name, "event", true);
            if events_tx
                .send(Ok(IsActiveResponse { result: true }))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Pushes the current state now and every `interval` (KEDA ignores `false`, but it tells a
/// watching human, and `true` again while traffic lasts), until the stream or the event task
/// ends.
async fn push_state(
    cluster: Arc<Cluster>,
    metrics: Metrics,
    service: Arc<str>,
    interval: Duration,
    tx: mpsc::Sender<StreamItem>,
    mut events_ended: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            _ = &mut events_ended => return,
            _ = tick.tick() => {}
        }
        let active = cluster.totals(&service).await.is_some_and(|t| t.active());
        metrics.keda_push(&service, "interval", active);
        if tx
            .send(Ok(IsActiveResponse { result: active }))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Counts an open stream in `reveille_keda_streams` until dropped.
struct StreamGuard(prometheus::IntGauge);

impl StreamGuard {
    fn new(m: &Metrics) -> Self {
        m.keda_streams.inc();
        StreamGuard(m.keda_streams.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
