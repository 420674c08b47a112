//! Gate: one per service, between the router and the upstream client. It owns the service's
//! ready endpoints, the per-endpoint in-flight limits, and the bounded FIFO hold queue.
//!
//! A request asks the gate for a [`Permit`] (an endpoint slot). When the service is ready and no
//! request is held, the permit is taken without a lock: two random endpoints are compared and
//! the one with fewer requests in flight is used (power of two choices). Otherwise the request
//! joins the hold queue and waits for a permit, its hold deadline, or an activation failure.
//! A permit released by a finished request, or endpoints becoming ready, drains the queue in
//! arrival order, no faster than the endpoints' limits allow.
//!
//! The gate does not start or stop anything: a driver (see [`crate::activate`]) watches demand
//! ([`Gate::wait_for_demand`]) and idleness ([`Gate::wait_idle`]), and publishes endpoints and
//! the activation state.
//!
//! A [`Gate`] is one part per concern, each owning its state and rules in its own file:
//!
//! - `queue.rs`: the hold queue and the permits (acquire, held and in-flight counts, the
//!   global [`HeldLimit`]);
//! - `balance.rs`: the endpoints, the power-of-two-choices pick, ejection;
//! - `switch.rs`: the version switch and its pause, a rollout's state (its [`RolloutReport`]
//!   from `report.rs`, its [`candidate`]);
//! - `activity.rs`: the activation state, demand and quiet, the idle clock, the held-count
//!   events KEDA streams push on; `awake.rs`: keeping a service up and the wake hook.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Protocol;
use crate::telemetry::metrics::ServiceMetrics;
use crate::upstream::UpstreamClient;

pub use crate::telemetry::State;

mod activity;
mod awake;
mod balance;
pub mod candidate;
mod queue;
mod report;
mod switch;

pub use activity::OnDemand;
pub use awake::{AwakeGuard, WakeHook};
pub use balance::Endpoint;
pub use queue::{Acquired, HeldLimit, Permit};
pub use report::{RolloutCandidate, RolloutReport, ValidationResult};

/// The settings a gate needs.
#[derive(Debug, Clone)]
pub struct GateSettings {
    /// Hold-queue capacity.
    pub capacity: usize,
    /// Per-request hold deadline.
    pub hold_timeout: Duration,
    /// In-flight limit per endpoint.
    pub concurrency: Option<usize>,
    /// Protocol to the backend.
    pub protocol: Protocol,
    /// The pooled client of a TLS backend (`h2`, `https`), owned by the upstream layer
    /// ([`crate::upstream::TlsClients`]) and shared by every gate with the same TLS settings,
    /// so its connections outlive a gate replaced by a reload; `None`: the shared cleartext
    /// client of `protocol`.
    pub upstream: Option<Arc<UpstreamClient>>,
    /// The global bound on held requests.
    pub held_limit: Arc<HeldLimit>,
    /// Upgrade protocols passed to the backend (`services[].upgrades`), lowercase.
    pub upgrades: Arc<[Box<str>]>,
}

impl GateSettings {
    /// `upgrades` as the gate keeps them.
    pub fn upgrades_of(list: &[String]) -> Arc<[Box<str>]> {
        list.iter().map(|u| Box::from(u.as_str())).collect()
    }

    /// The default upgrade list (`websocket`).
    pub fn default_upgrades() -> Arc<[Box<str>]> {
        crate::config::DEFAULT_UPGRADES
            .iter()
            .map(|u| Box::from(*u))
            .collect()
    }
}

/// One service's gate.
pub struct Gate {
    name: Arc<str>,
    settings: GateSettings,
    metrics: ServiceMetrics,
    /// The hold queue and the permits.
    queue: queue::Queue,
    /// The endpoints and their balancing.
    balance: balance::Balancer,
    /// The version switch and the rollout's state.
    switch: switch::Switch,
    /// What drivers and KEDA watch.
    activity: activity::Activity,
}

impl Gate {
    /// A new gate in state `Idle`, with no endpoints.
    pub fn new(name: &str, settings: GateSettings, metrics: ServiceMetrics) -> Arc<Gate> {
        metrics.state(State::Idle);
        let epoch = Instant::now();
        Arc::new(Gate {
            name: name.into(),
            settings,
            metrics,
            queue: queue::Queue::new(),
            balance: balance::Balancer::new(epoch),
            switch: switch::Switch::new(),
            activity: activity::Activity::new(epoch),
        })
    }

    /// The service's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The gate's settings.
    pub fn settings(&self) -> &GateSettings {
        &self.settings
    }

    /// The service's metric handles.
    pub fn metrics(&self) -> &ServiceMetrics {
        &self.metrics
    }
}

#[cfg(test)]
mod tests;
