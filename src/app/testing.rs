//! Unit tests' one way to build the state the request path shares: the live services of a
//! YAML config and the [`Shared`] every connection holds, wired as [`super::start_with`] wires
//! them, without listeners.

use std::sync::Arc;

use crate::config::Config;
use crate::forward::Shared;
use crate::gate::HeldLimit;
use crate::route::services::Services;
use crate::telemetry::metrics::Metrics;

/// The state of a config, built step by step.
pub(crate) struct TestState {
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    max_held: usize,
}

impl TestState {
    /// For `yaml` (which must parse).
    pub(crate) fn new(yaml: &str) -> Self {
        Self::of(Config::parse(yaml).expect("a test config parses"))
    }

    /// For a config already parsed.
    pub(crate) fn of(config: Config) -> Self {
        TestState {
            config,
            metrics: Metrics::new(),
            max_held: 100,
        }
    }

    /// At most `n` requests held across services (`limits.max_held`).
    pub(crate) fn max_held(mut self, n: usize) -> Self {
        self.max_held = n;
        self
    }

    /// The live services, none applied yet.
    pub(crate) fn services(&self) -> Arc<Services> {
        Services::new(
            self.metrics.clone(),
            HeldLimit::new(self.max_held),
            None,
            self.config.timeouts,
        )
    }

    /// The shared state with no service applied (nothing routes; the size and wiring of
    /// connections can be looked at).
    pub(crate) fn shared_empty(&self) -> Arc<Shared> {
        Arc::new(Shared::new(
            self.services(),
            self.metrics.clone(),
            &self.config,
        ))
    }

    /// The shared state with the config's services applied.
    pub(crate) async fn shared(&self) -> Arc<Shared> {
        let services = self.services();
        services.apply(&self.config.services).await;
        Arc::new(Shared::new(services, self.metrics.clone(), &self.config))
    }
}
