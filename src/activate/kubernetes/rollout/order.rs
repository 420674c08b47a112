//! Ordered rollouts (`after: [api]`): a service's new pods are validated only once the
//! rollouts it follows have completed. Each controller publishes its own [`Phase`] on the
//! [`Board`](super::board::Board); a follower's waiting pods get the `reveille.dev/validated`
//! condition False with reason `WaitingForRollout` and a message naming what they wait for
//! (so `kubectl describe pod` says why the rollout stalls), and are validated when it clears.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use super::board::Phase;
use super::validate::{now_rfc3339, API_TIMEOUT, CONDITION};
use super::Version;
use crate::gate::ValidationResult;

/// The condition's reason while a pod waits for the rollouts its service follows.
pub const REASON_WAITING: &str = "WaitingForRollout";

/// This service's phase for its followers: completed when its newest version (by revision)
/// is the routed one and nothing is pending or switching; failed when that version has failed
/// pods and no validated one.
pub(super) fn phase(
    versions: &BTreeMap<String, Version>,
    active: Option<&str>,
    busy: bool,
    last_result: Option<&ValidationResult>,
) -> Phase {
    let Some((newest, v)) = versions
        .iter()
        .max_by_key(|(h, v)| (v.revision, h.as_str()))
    else {
        return Phase::Completed; // no pods at all (at zero): nothing rolling out
    };
    if v.failed > 0 && !v.validated {
        let why = last_result
            .filter(|r| r.version == *newest && !r.passed)
            .map(|r| r.message.as_str())
            .map_or_else(
                || format!("version {newest} failed validation"),
                |m| format!("version {newest}: {m}"),
            );
        return Phase::Failed(why);
    }
    if active != Some(newest.as_str()) || v.pending > 0 || busy {
        return Phase::InProgress(format!("version {newest} rolling out"));
    }
    Phase::Completed
}

/// The message of the pod's `reveille.dev/validated` condition, if it has one.
pub(super) fn condition_message(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION)?
        .message
        .as_deref()
}

/// Marks `pods` as waiting (condition False, reason `WaitingForRollout`, message `why`),
/// skipping those that already say so. False when an API call failed (tried again at the next
/// reconcile).
pub(super) async fn hold(pods_api: &Api<Pod>, pods: &[Arc<Pod>], why: &str) -> bool {
    let mut ok = true;
    for pod in pods {
        if condition_message(pod) == Some(why) {
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let patch = json!({
            "status": {"conditions": [{
                "type": CONDITION,
                "status": "False",
                "reason": REASON_WAITING,
                "message": why,
                "lastTransitionTime": now_rfc3339(),
            }]}
        });
        let r = tokio::time::timeout(
            API_TIMEOUT,
            pods_api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch)),
        )
        .await;
        ok &= matches!(r, Ok(Ok(_)));
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(revision: i64, validated: bool, pending: usize, failed: usize) -> Version {
        Version {
            revision,
            validated,
            pending,
            failed,
            ..Version::default()
        }
    }

    #[test]
    fn completed_only_when_the_newest_version_is_routed_and_settled() {
        let mut vs = BTreeMap::new();
        assert_eq!(phase(&vs, None, false, None), Phase::Completed);
        vs.insert("v1".to_string(), version(1, true, 0, 0));
        assert_eq!(phase(&vs, Some("v1"), false, None), Phase::Completed);
        assert!(matches!(
            phase(&vs, Some("v1"), true, None),
            Phase::InProgress(_)
        ));
        vs.insert("v2".to_string(), version(2, false, 1, 0));
        assert_eq!(
            phase(&vs, Some("v1"), false, None),
            Phase::InProgress("version v2 rolling out".into())
        );
        vs.insert("v2".to_string(), version(2, false, 0, 2));
        let result = ValidationResult {
            pod: "p".into(),
            version: "v2".into(),
            passed: false,
            message: "step 1 (GET /x): status 500, expected 200".into(),
        };
        assert_eq!(
            phase(&vs, Some("v1"), false, Some(&result)),
            Phase::Failed("version v2: step 1 (GET /x): status 500, expected 200".into())
        );
        assert_eq!(
            phase(&vs, Some("v1"), false, None),
            Phase::Failed("version v2 failed validation".into())
        );
        vs.insert("v2".to_string(), version(2, true, 0, 0));
        assert_eq!(phase(&vs, Some("v2"), false, None), Phase::Completed);
    }
}
