//! Scalers: what wakes a service and tells its gate which endpoints are ready. One driver task
//! per service runs the activation state machine for its platform:
//!
//! - [`process`]: starts a local command on demand, probes it until ready, stops it when idle.
//! - [`r#static`]: fixed addresses, always ready (plain proxying).
//! - [`kubernetes`]: patches a Deployment's or StatefulSet's `scale` subresource and follows
//!   its pods through an EndpointSlice watch.
//!
//! A driver only talks to its [`Gate`]: it waits for demand and idleness there, and publishes
//! endpoints and the state. It stops when `stop` turns true (Reveille is shutting down).

pub mod kubernetes;
pub mod process;
pub mod r#static;

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Backend, Service};
use crate::gate::Gate;

/// Starts the driver task of a service's backend.
pub fn spawn_driver(
    gate: Arc<Gate>,
    service: &Service,
    kube: Option<&kubernetes::KubeContext>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    match &service.backend {
        Backend::Process(p) => {
            tokio::spawn(process::run(gate, p.clone(), service.idle_timeout, stop))
        }
        Backend::Static(s) => tokio::spawn(r#static::run(gate, s.addresses.clone(), stop)),
        Backend::Kubernetes(k) => {
            let Some(ctx) = kube.cloned() else {
                return tokio::spawn(kubernetes::unavailable(gate, stop));
            };
            tokio::spawn(kubernetes::run(
                gate,
                k.clone(),
                service.idle_timeout,
                ctx,
                stop,
            ))
        }
    }
}

/// Resolves when `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
