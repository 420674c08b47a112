//! Manual promotion (`promotion: manual`): a pod whose steps passed gets the
//! `reveille.dev/validated` condition False with reason `AwaitingPromotion` (so Kubernetes
//! keeps the old pods and the old version keeps serving), until someone promotes or aborts
//! through the admin API (`reveille rollout promote|abort SERVICE`). Promote sets the
//! candidate's pods True: they turn ready and the usual quiet switch follows. Abort fails
//! them like a failed step (condition, Event, metric, and with `on_failure: rollback`, the
//! rollback).

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::Api;
use serde_json::json;
use tracing::info;

use super::board::{Command, CommandError, Reply};
use super::validate::{self, now_rfc3339, API_TIMEOUT, CONDITION};
use super::{Controller, Outcome};
use crate::config::Promotion;

/// The condition's reason while a validated pod awaits promotion.
pub const REASON_AWAITING: &str = "AwaitingPromotion";

/// Marks a validated pod as awaiting promotion.
pub(super) async fn await_promotion(
    pods: &Api<Pod>,
    pod: &str,
    service: &str,
) -> Result<(), kube::Error> {
    let patch = json!({
        "status": {"conditions": [{
            "type": CONDITION,
            "status": "False",
            "reason": REASON_AWAITING,
            "message": format!("validation passed; awaiting `reveille rollout promote {service}`"),
            "lastTransitionTime": now_rfc3339(),
        }]}
    });
    pods.patch_status(pod, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map(|_| ())
}

impl Controller {
    /// Carries out `promote` or `abort` on the newest version's pods awaiting promotion.
    pub(super) async fn command(
        &mut self,
        cmd: Command,
        pods: &Store<Pod>,
        replicasets: &Store<ReplicaSet>,
    ) -> Reply {
        if self.cfg.promotion != Promotion::Manual {
            return Err(CommandError::Refused(
                "this service promotes automatically (`promotion: auto`)".into(),
            ));
        }
        let candidate = self
            .versions
            .iter()
            .filter(|(_, v)| v.awaiting > 0)
            .max_by_key(|(h, v)| (v.revision, h.as_str()))
            .map(|(h, _)| h.clone())
            .ok_or_else(|| CommandError::Refused("no validated version awaits promotion".into()))?;
        let waiting: Vec<_> = pods
            .state()
            .into_iter()
            .filter(|p| validate::template_hash(&p.metadata) == Some(&candidate))
            .filter(|p| validate::condition(p, CONDITION) == Some(("False", Some(REASON_AWAITING))))
            .collect();
        let n = waiting.len();
        match cmd {
            Command::Promote => {
                for pod in &waiting {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    let call = validate::set_condition(
                        &self.pods,
                        &name,
                        true,
                        "validation passed; promoted by hand",
                    );
                    if !matches!(tokio::time::timeout(API_TIMEOUT, call).await, Ok(Ok(()))) {
                        self.gate.metrics().kube_api_error("patch_pod_status");
                        return Err(CommandError::Refused(format!(
                            "setting pod {name}'s condition failed; try again"
                        )));
                    }
                }
                info!(version = %candidate, pods = n, "promoted by hand");
                Ok(format!("promoting version {candidate} ({n} pods)"))
            }
            Command::Abort => {
                for pod in waiting {
                    let outcome = Outcome {
                        pod,
                        version: candidate.clone(),
                        result: Err("aborted by hand (`reveille rollout abort`)".into()),
                    };
                    self.finish(outcome, replicasets).await;
                }
                info!(version = %candidate, pods = n, "aborted by hand");
                Ok(format!("aborted version {candidate} ({n} pods)"))
            }
        }
    }
}
