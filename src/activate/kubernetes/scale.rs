//! The workload side of the Kubernetes scaler: reading and patching the `scale` subresource of
//! a Deployment or StatefulSet, and telling whether a rollout is in progress.
//!
//! Every patch carries the `resourceVersion` it was computed from, so two writers never
//! overwrite each other blindly: a `409 Conflict` means someone else changed the count, and the
//! change is re-read and re-decided. Raising never lowers a count someone else raised.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v1::Scale;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::config::{Workload, WorkloadKind};

/// Re-reads after a conflict before giving up for this attempt.
const MAX_CONFLICTS: u32 = 5;
/// Bound on one API call, so an unreachable API server delays a decision but never blocks it.
const API_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed call to the API server, with the operation that failed (a metric label).
#[derive(Debug, thiserror::Error)]
#[error("{operation} failed: {failure}")]
pub struct ApiError {
    /// `get_scale`, `patch_scale` or `get_workload`.
    pub operation: &'static str,
    /// What went wrong.
    #[source]
    pub failure: Failure,
}

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The client or the API server reported an error.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// No answer in time.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

/// Runs one API call within [`API_CALL_TIMEOUT`].
async fn bounded<T>(
    operation: &'static str,
    call: impl std::future::Future<Output = kube::Result<T>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(API_CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiError {
            operation,
            failure: Failure::Kube(e),
        }),
        Err(_) => Err(ApiError {
            operation,
            failure: Failure::Timeout(API_CALL_TIMEOUT),
        }),
    }
}

/// What a scale call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The count was already where it had to be.
    Unchanged(i32),
    /// Reveille changed the count.
    Patched {
        /// Before.
        from: i32,
        /// After.
        to: i32,
    },
}

/// One workload's API handle.
#[derive(Clone)]
pub struct WorkloadApi {
    name: String,
    api: Kind,
}

#[derive(Clone)]
enum Kind {
    Deployment(Api<Deployment>),
    StatefulSet(Api<StatefulSet>),
}

fn is_conflict(e: &ApiError) -> bool {
    matches!(&e.failure, Failure::Kube(kube::Error::Api(s)) if s.is_conflict())
}

impl WorkloadApi {
    /// The API handle of `workload` in `namespace`.
    pub fn new(client: Client, namespace: &str, workload: &Workload) -> WorkloadApi {
        let api = match workload.kind {
            WorkloadKind::Deployment => Kind::Deployment(Api::namespaced(client, namespace)),
            WorkloadKind::StatefulSet => Kind::StatefulSet(Api::namespaced(client, namespace)),
        };
        WorkloadApi {
            name: workload.name.clone(),
            api,
        }
    }

    async fn get_scale(&self) -> Result<Scale, ApiError> {
        match &self.api {
            Kind::Deployment(a) => bounded("get_scale", a.get_scale(&self.name)).await,
            Kind::StatefulSet(a) => bounded("get_scale", a.get_scale(&self.name)).await,
        }
    }

    async fn patch_scale(
        &self,
        resource_version: Option<String>,
        replicas: i32,
    ) -> Result<Scale, ApiError> {
        let patch = Patch::Merge(json!({
            "metadata": { "resourceVersion": resource_version },
            "spec": { "replicas": replicas },
        }));
        let pp = PatchParams::default();
        match &self.api {
            Kind::Deployment(a) => {
                bounded("patch_scale", a.patch_scale(&self.name, &pp, &patch)).await
            }
            Kind::StatefulSet(a) => {
                bounded("patch_scale", a.patch_scale(&self.name, &pp, &patch)).await
            }
        }
    }

    /// Sets the count with `decide(current) -> Some(new)`, re-reading after each conflict.
    async fn adjust(&self, decide: impl Fn(i32) -> Option<i32>) -> Result<Change, ApiError> {
        let mut conflicts = 0;
        loop {
            let scale = self.get_scale().await?;
            let current = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
            let Some(want) = decide(current) else {
                return Ok(Change::Unchanged(current));
            };
            match self
                .patch_scale(scale.metadata.resource_version, want)
                .await
            {
                Ok(_) => {
                    return Ok(Change::Patched {
                        from: current,
                        to: want,
                    })
                }
                Err(e) if is_conflict(&e) && conflicts < MAX_CONFLICTS => {
                    conflicts += 1;
                    tracing::debug!(workload = %self.name, conflicts, "scale patch conflict; re-reading");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Raises the count to at least `replicas`; a higher count is left alone.
    pub async fn raise_to(&self, replicas: i32) -> Result<Change, ApiError> {
        self.adjust(|current| (current < replicas).then_some(replicas))
            .await
    }

    /// Lowers the count to zero.
    pub async fn lower_to_zero(&self) -> Result<Change, ApiError> {
        self.adjust(|current| (current > 0).then_some(0)).await
    }

    /// Why a rollout is in progress, if one is: the controller has not observed the latest
    /// spec, or fewer replicas are updated or ready than asked for.
    pub async fn rollout_in_progress(&self) -> Result<Option<String>, ApiError> {
        let (generation, observed, want, updated, ready) = match &self.api {
            Kind::Deployment(a) => {
                let d = bounded("get_workload", a.get(&self.name)).await?;
                let st = d.status.unwrap_or_default();
                (
                    d.metadata.generation,
                    st.observed_generation,
                    d.spec.and_then(|s| s.replicas).unwrap_or(1),
                    st.updated_replicas.unwrap_or(0),
                    st.ready_replicas.unwrap_or(0),
                )
            }
            Kind::StatefulSet(a) => {
                let s = bounded("get_workload", a.get(&self.name)).await?;
                let st = s.status.unwrap_or_default();
                (
                    s.metadata.generation,
                    st.observed_generation,
                    s.spec.and_then(|s| s.replicas).unwrap_or(1),
                    st.updated_replicas.unwrap_or(0),
                    st.ready_replicas.unwrap_or(0),
                )
            }
        };
        Ok(rollout_reason(generation, observed, want, updated, ready))
    }
}

/// The rollout rule, apart from the API calls.
fn rollout_reason(
    generation: Option<i64>,
    observed: Option<i64>,
    want: i32,
    updated: i32,
    ready: i32,
) -> Option<String> {
    if let Some(g) = generation {
        if observed.unwrap_or(0) < g {
            return Some(format!(
                "observedGeneration {} < generation {g}",
                observed.unwrap_or(0)
            ));
        }
    }
    if updated < want {
        return Some(format!("updatedReplicas {updated} < replicas {want}"));
    }
    if ready < want {
        return Some(format!("readyReplicas {ready} < replicas {want}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_rule() {
        assert_eq!(rollout_reason(Some(3), Some(3), 2, 2, 2), None);
        assert_eq!(
            rollout_reason(Some(4), Some(3), 2, 2, 2).as_deref(),
            Some("observedGeneration 3 < generation 4")
        );
        assert_eq!(
            rollout_reason(Some(4), Some(4), 2, 1, 2).as_deref(),
            Some("updatedReplicas 1 < replicas 2")
        );
        assert_eq!(
            rollout_reason(Some(4), Some(4), 2, 2, 0).as_deref(),
            Some("readyReplicas 0 < replicas 2")
        );
        // Already at zero: nothing to wait for.
        assert_eq!(rollout_reason(Some(5), Some(5), 0, 0, 0), None);
    }
}
