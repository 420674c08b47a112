//! Leader election over a `coordination.k8s.io/v1` Lease, so that one Reveille replica at a time
//! decides scale-downs.
//!
//! The holder renews every third of the lease duration. Another replica takes over only after
//! the lease's `renewTime` has not changed for a whole duration *on its own clock* (no clock
//! comparison between nodes). The holder counts itself leader only until two thirds of a duration
//! after its last successful renewal, so it stops deciding before anyone else may start. Every
//! write carries the `resourceVersion` it read: two replicas racing for the lease get one winner
//! and one `409 Conflict`. Losing the lease, or the API server, only delays scale-downs.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::Coordination;

/// Whether this replica holds the lease now.
#[derive(Default)]
pub struct Leadership {
    until: Mutex<Option<Instant>>,
}

impl Leadership {
    /// True while this replica may decide scale-downs.
    pub fn is_leader(&self) -> bool {
        self.until.lock().is_some_and(|t| Instant::now() < t)
    }

    fn set(&self, until: Option<Instant>) {
        *self.until.lock() = until;
    }
}

/// What the elector last saw of someone else's lease.
struct Observed {
    holder: Option<String>,
    renew: Option<MicroTime>,
    since: Instant,
}

/// Keeps trying to hold the lease until `stop`.
pub async fn run(
    client: Client,
    cfg: Coordination,
    leadership: Arc<Leadership>,
    mut stop: crate::shutdown::Signal,
) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let period = cfg.lease_duration / 3;
    let mut observed: Option<Observed> = None;
    loop {
        let tried = Instant::now();
        match step(&api, &cfg, &mut observed).await {
            Ok(true) => {
                if !leadership.is_leader() {
                    info!(lease = %cfg.lease, identity = %cfg.identity, "acquired the scale-down lease");
                }
                leadership.set(Some(tried + cfg.lease_duration * 2 / 3));
            }
            Ok(false) => leadership.set(None),
            Err(e) => {
                warn!(lease = %cfg.lease, error = %e, "lease update failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.fired() => {
                let held = leadership.is_leader();
                leadership.set(None);
                if held {
                    release(&api, &cfg).await;
                }
                return;
            }
        }
    }
}

/// Gives the lease up on shutdown, so a successor takes over at its next round instead of
/// waiting a whole lease duration. Only a lease this replica still holds is cleared (the write
/// carries the `resourceVersion` read); failures are logged and left to expiry.
async fn release(api: &Api<Lease>, cfg: &Coordination) {
    let result = async {
        let Some(mut lease) = bounded_by(RELEASE_TIMEOUT, api.get_opt(&cfg.lease)).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        bounded_by(
            RELEASE_TIMEOUT,
            api.replace(&cfg.lease, &PostParams::default(), &lease),
        )
        .await
        .map(|_| true)
    }
    .await;
    match result {
        Ok(true) => info!(lease = %cfg.lease, "released the scale-down lease"),
        Ok(false) => {}
        Err(e) => {
            warn!(lease = %cfg.lease, error = %e, "could not release the lease; it expires instead")
        }
    }
}

/// How long shutdown waits for the lease release.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Bounds one API call, so an unreachable API server never stalls the elector.
async fn bounded<T>(call: impl std::future::Future<Output = kube::Result<T>>) -> kube::Result<T> {
    bounded_by(Duration::from_secs(10), call).await
}

async fn bounded_by<T>(
    limit: Duration,
    call: impl std::future::Future<Output = kube::Result<T>>,
) -> kube::Result<T> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(kube::Error::Service("lease call timed out".into())))
}

/// Whether a create was refused because someone else created the object first. The API server
/// answers that `409` with reason `AlreadyExists` (not `Conflict`, which is a stale
/// `resourceVersion` on an update), so both are the race lost.
fn lost_create_race(s: &kube::core::Status) -> bool {
    s.is_already_exists() || s.is_conflict()
}

/// One round: create, renew or take over the lease. `Ok(true)` when this replica holds it.
async fn step(
    api: &Api<Lease>,
    cfg: &Coordination,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let duration_secs = cfg.lease_duration.as_secs().max(1) as i32;
    let Some(mut lease) = bounded(api.get_opt(&cfg.lease)).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.lease.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match bounded(api.create(&PostParams::default(), &lease)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if lost_create_race(&s) => {
                // Another replica created it between our read and our create: the expected
                // outcome of the race, not a failure. Follow; the next round reads theirs.
                debug!(lease = %cfg.lease, "another replica created the lease first; following");
                Ok(false)
            }
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    if holder.as_deref() != Some(cfg.identity.as_str()) {
        // Someone else's (or nobody's): free once it has not been renewed for a whole duration.
        let changed = observed
            .as_ref()
            .is_none_or(|o| o.holder != holder || o.renew != spec.renew_time);
        if changed {
            *observed = Some(Observed {
                holder: holder.clone(),
                renew: spec.renew_time.clone(),
                since: Instant::now(),
            });
        }
        let their = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(1) as u64))
            .unwrap_or(cfg.lease_duration);
        let expired = observed
            .as_ref()
            .is_some_and(|o| o.since.elapsed() >= their);
        if holder.is_some() && !expired {
            return Ok(false);
        }
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        info!(lease = %cfg.lease, previous = ?holder, "taking over the scale-down lease");
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(duration_secs);
    match bounded(api.replace(&cfg.lease, &PostParams::default(), &lease)).await {
        Ok(_) => {
            *observed = None;
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body a real API server sends when a create finds the object there (and the one for
    /// a stale update): both are the race lost, followed without a warning.
    #[test]
    fn a_lost_create_race_is_followed() {
        let status = |reason: &str| -> kube::core::Status {
            serde_json::from_value(serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "leases.coordination.k8s.io \"reveille-scale-down\" already exists",
                "reason": reason, "details": {"name": "reveille-scale-down",
                "group": "coordination.k8s.io", "kind": "leases"}, "code": 409,
            }))
            .unwrap()
        };
        assert!(lost_create_race(&status("AlreadyExists")));
        assert!(lost_create_race(&status("Conflict")));
        let mut forbidden = status("Forbidden");
        forbidden.code = 403;
        assert!(!lost_create_race(&forbidden));
    }
}
