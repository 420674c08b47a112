//! The `keda:` block (the external scaler listener and the peer replicas) and each service's
//! `keda:` block (which metric KEDA scales on, and its target): raw shapes and validation.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{dur, positive, HumanDuration, Problems};

/// Default bound on one read of a peer replica's counts.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_millis(250);
/// Default time an unreachable peer's last counts are still used.
pub const DEFAULT_PEER_STALE_AFTER: Duration = Duration::from_secs(30);
/// Default interval at which a `StreamIsActive` stream repeats the current state.
pub const DEFAULT_STREAM_INTERVAL: Duration = Duration::from_secs(5);
/// Default window of the request-rate metric.
pub const DEFAULT_RATE_WINDOW: Duration = Duration::from_secs(60);
/// Default target of the concurrency metric when neither KEDA nor the service sets one.
pub const DEFAULT_TARGET_CONCURRENCY: f64 = 100.0;
/// Default target of the request-rate metric (requests per second).
pub const DEFAULT_TARGET_RATE: f64 = 100.0;

/// KEDA integration and replica aggregation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keda {
    /// The external scaler gRPC listener; `None`: not served.
    pub listen: Option<SocketAddr>,
    /// Admin addresses of the other Reveille replicas (static peer list).
    pub peers: Vec<SocketAddr>,
    /// Bound on one read of a peer's counts. Default 250 ms.
    pub peer_timeout: Duration,
    /// How long an unreachable peer's last counts are used before they are dropped. Default 30 s.
    pub peer_stale_after: Duration,
    /// Interval at which an open `StreamIsActive` stream repeats the current state. Default 5 s.
    pub stream_interval: Duration,
    /// Window of the request-rate metric. Default 60 s.
    pub rate_window: Duration,
}

impl Default for Keda {
    fn default() -> Self {
        Keda {
            listen: None,
            peers: Vec::new(),
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            peer_stale_after: DEFAULT_PEER_STALE_AFTER,
            stream_interval: DEFAULT_STREAM_INTERVAL,
            rate_window: DEFAULT_RATE_WINDOW,
        }
    }
}

/// Which number KEDA scales a service on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScalingMetric {
    /// Held plus in-flight requests, summed over replicas.
    #[default]
    Concurrency,
    /// Requests per second over `keda.rate_window`, summed over replicas.
    Rate,
}

impl ScalingMetric {
    /// The metric's name in KEDA metric names and metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            ScalingMetric::Concurrency => "concurrency",
            ScalingMetric::Rate => "rate",
        }
    }
}

/// A service's KEDA settings; the ScaledObject's metadata overrides both.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ServiceKeda {
    /// The metric. Default: concurrency.
    pub metric: ScalingMetric,
    /// Target value per replica. Default: the service's `concurrency` for the concurrency
    /// metric, else 100.
    pub target: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawKeda {
    listen: Option<SocketAddr>,
    #[serde(default)]
    peers: Vec<SocketAddr>,
    peer_timeout: Option<HumanDuration>,
    peer_stale_after: Option<HumanDuration>,
    stream_interval: Option<HumanDuration>,
    rate_window: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawServiceKeda {
    #[serde(default)]
    metric: ScalingMetric,
    target: Option<f64>,
}

/// Validates the top-level `keda:` block; `own` are Reveille's other listeners.
pub(super) fn validate(p: &mut Problems, raw: RawKeda, own: &[(&str, SocketAddr)]) -> Keda {
    let k = Keda {
        listen: raw.listen,
        peers: raw.peers,
        peer_timeout: dur(raw.peer_timeout, DEFAULT_PEER_TIMEOUT),
        peer_stale_after: dur(raw.peer_stale_after, DEFAULT_PEER_STALE_AFTER),
        stream_interval: dur(raw.stream_interval, DEFAULT_STREAM_INTERVAL),
        rate_window: dur(raw.rate_window, DEFAULT_RATE_WINDOW),
    };
    if let Some(listen) = k.listen {
        for (name, addr) in own {
            if *addr == listen && listen.port() != 0 {
                p.add("keda.listen", format!("must differ from {name} ({addr})"));
            }
        }
    }
    for (i, peer) in k.peers.iter().enumerate() {
        if peer.port() == 0 {
            p.add(format!("keda.peers[{i}]"), "port must not be 0");
        }
        if own.iter().any(|(name, a)| *name == "admin" && a == peer) {
            p.add(
                format!("keda.peers[{i}]"),
                format!("{peer} is this replica's own admin address (it would be counted twice)"),
            );
        }
        if k.peers[..i].contains(peer) {
            p.add(format!("keda.peers[{i}]"), format!("duplicate peer {peer}"));
        }
    }
    positive(p, "keda.peer_timeout".into(), k.peer_timeout);
    positive(p, "keda.peer_stale_after".into(), k.peer_stale_after);
    positive(p, "keda.stream_interval".into(), k.stream_interval);
    if k.rate_window < Duration::from_secs(1) {
        p.add("keda.rate_window", "must be at least 1s");
    }
    k
}

/// Validates a service's `keda:` block at path `at`.
pub(super) fn validate_service(p: &mut Problems, at: &str, raw: RawServiceKeda) -> ServiceKeda {
    if let Some(t) = raw.target {
        if !(t.is_finite() && t > 0.0) {
            p.add(format!("{at}.target"), "must be a number greater than 0");
        }
    }
    ServiceKeda {
        metric: raw.metric,
        target: raw.target,
    }
}
