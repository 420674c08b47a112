//! Pre-warming: waking a service before its demand comes, in the activation layer beside the
//! scaler drivers (it does not touch the request path). A service's windows come from its
//! `prewarm.schedule` ([`schedule`]) and, with `learn: true`, from its demand history; a
//! [`runner`] task per service keeps the gate awake ([`crate::gate::Gate::keep_awake`]) from
//! `lead` before each window until it ends, so the driver wakes the backend as if a request
//! had come and does not stop it for idleness meanwhile. [`plan`] lists what will happen.
//!
//! Wall-clock time comes from a [`Clock`], so tests run windows on a clock they control; waits
//! are `tokio::time` sleeps of at most [`MAX_SLEEP`], after which the clock is read again (a
//! clock step, or NTP, is followed within that bound).

pub(crate) mod configmap;
pub(crate) mod delta;
pub mod import;
pub mod learn;
pub mod plan;
pub mod replay;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::config::{Lead, Prewarm, MIN_AUTO_LEAD};
use crate::gate::Gate;

pub use plan::{plan, Planned};
pub use runner::Runner;

/// Longest single sleep before the wall clock is read again.
pub const MAX_SLEEP: Duration = Duration::from_secs(60);
/// How far ahead windows are planned (`prewarm plan`, the runner's look-ahead).
pub const HORIZON: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where wall-clock time comes from.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that starts at a given instant and runs with tokio's time (so a test that pauses
/// and advances tokio's clock moves it too).
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base: Timestamp,
    at: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading `base` now.
    pub fn starting_at(base: Timestamp) -> Self {
        TokioClock {
            base,
            at: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let d = jiff::SignedDuration::try_from(self.at.elapsed()).unwrap_or_default();
        self.base.checked_add(d).unwrap_or(self.base)
    }
}

/// Where a window comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The service's `prewarm.schedule`.
    Schedule,
    /// Learned from the service's demand (`learn: true`).
    Learned,
}

impl Source {
    /// The name in metrics, plans and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Schedule => "schedule",
            Source::Learned => "learned",
        }
    }
}

/// The lead in force: fixed, or the service's observed p90 cold start (at least
/// [`MIN_AUTO_LEAD`]).
pub fn lead(cfg: &Prewarm, gate: Option<&Gate>) -> Duration {
    match cfg.lead {
        Lead::Fixed(d) => d,
        Lead::Auto => gate
            .and_then(|g| g.wake().p90())
            .map_or(MIN_AUTO_LEAD, |p| p.max(MIN_AUTO_LEAD)),
    }
}

/// What pre-warming needs besides a service's own settings: the clock and the learned
/// history (shared by every service's runner).
#[derive(Clone)]
pub struct Context {
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// The learned history; `None` when no service learns.
    pub store: Option<Arc<store::Store>>,
    /// Its ConfigMap, when it is shared between replicas (Kubernetes with `coordination:`).
    pub(crate) shared: Option<Arc<configmap::Shared>>,
}

impl Default for Context {
    fn default() -> Self {
        Context {
            clock: Arc::new(SystemClock),
            store: None,
            shared: None,
        }
    }
}

impl Context {
    /// The context for `config`: the system clock, and the history under `state_dir` when a
    /// service learns (an error when `state_dir` is not writable). Saved every minute while
    /// in use; call [`Context::save`] at shutdown.
    pub fn open(config: &crate::Config) -> Result<Context, store::StoreError> {
        let store = if learns(config) {
            let s = store::Store::open(&config.state_dir)?;
            s.spawn_saver();
            Some(s)
        } else {
            None
        };
        Ok(Context {
            clock: Arc::new(SystemClock),
            store,
            shared: None,
        })
    }

    /// The context for `config` on Kubernetes with `coordination`: the history is kept in a
    /// ConfigMap shared by the replicas ([`configmap`]), read before this returns, synced
    /// every lease duration; `is_leader` says whether this replica holds the Lease. Call
    /// [`Context::finish`] at shutdown.
    pub(crate) async fn open_shared(
        config: &crate::Config,
        client: kube::Client,
        coordination: &crate::config::Coordination,
        is_leader: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Context {
        let mut ctx = Context::default();
        if !learns(config) {
            return ctx;
        }
        let c = coordination;
        let store = store::Store::shared(&configmap::configmap_name(&c.lease));
        let shared = configmap::Shared::new(
            client,
            &c.namespace,
            &c.lease,
            &c.identity,
            is_leader,
            store.clone(),
            ctx.clock.clone(),
            c.lease_duration,
        );
        shared.load().await;
        shared.spawn();
        tracing::info!(configmap = %shared.name(), namespace = %c.namespace, "learned pre-warm history shared through a ConfigMap");
        ctx.store = Some(store);
        ctx.shared = Some(shared);
        ctx
    }

    /// At shutdown: writes the history (file), or hands this replica's last observations to
    /// the ConfigMap (shared).
    pub async fn finish(&self) {
        self.save();
        if let Some(s) = &self.shared {
            s.finish().await;
        }
    }

    /// Writes the learned history if it changed.
    pub fn save(&self) {
        if let Some(s) = &self.store {
            if let Err(e) = s.save() {
                tracing::warn!(path = %s.path().display(), error = %e, "cannot save the pre-warm history");
            }
        }
    }

    /// A service's learned windows overlapping `[from, from + span)`, as of `now`.
    pub fn learned(
        &self,
        service: &str,
        cfg: &Prewarm,
        now: Timestamp,
        from: Timestamp,
        span: Duration,
    ) -> Vec<Planned> {
        match self.store.as_ref() {
            Some(store) => store.read(|h| learned_in(h, service, cfg, now, from, span)),
            None => Vec::new(),
        }
    }
}

/// `service`'s learned windows in `history` overlapping `[from, from + span)`, as of `now`
/// (none unless it learns).
pub(crate) fn learned_in(
    history: &learn::History,
    service: &str,
    cfg: &Prewarm,
    now: Timestamp,
    from: Timestamp,
    span: Duration,
) -> Vec<Planned> {
    if !cfg.learn {
        return Vec::new();
    }
    let to = from
        .checked_add(jiff::SignedDuration::try_from(span).unwrap_or_default())
        .unwrap_or(Timestamp::MAX);
    history
        .services
        .get(service)
        .map(|s| s.windows_at(now, from, to, cfg.max_hours_per_week))
        .unwrap_or_default()
}

/// Whether any service learns its windows.
fn learns(config: &crate::Config) -> bool {
    config
        .services
        .iter()
        .any(|s| s.prewarm.as_ref().is_some_and(|p| p.learn))
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}
