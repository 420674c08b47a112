//! The rollout's state for `/api/services` (`rollout`), published on the gate.

use super::Controller;
use crate::gate::{RolloutCandidate, RolloutReport};

impl Controller {
    /// Publishes the state for `/api/services`.
    pub(super) fn report(&self, step: Option<&str>) {
        let versions = &self.versions;
        let active_rev = self
            .active
            .as_ref()
            .and_then(|a| versions.get(a))
            .map(|v| v.revision);
        // The candidate: the newest version that is not the active one and still has pods.
        let candidate = versions
            .iter()
            .filter(|(h, _)| Some(h.as_str()) != self.active.as_deref())
            .filter(|(_, v)| active_rev.is_none_or(|r| v.revision > r))
            .max_by_key(|(h, v)| (v.revision, h.as_str()))
            .map(|(h, v)| RolloutCandidate {
                version: h.clone(),
                revision: v.revision,
                validated: v.validated,
                ready_endpoints: v.ready.len(),
                pending_pods: v.pending,
                failed_pods: v.failed,
                awaiting_promotion: v.awaiting,
            });
        let progress = self.progress.lock().clone();
        let step = match step {
            Some(s) => Some(s.to_string()),
            None if self.switching => Some("switching".to_string()),
            // The first validating pod's step (`step 2/2 (POST /validate)`); every pod's is in
            // `validating`.
            None if !progress.is_empty() => progress.values().next().cloned(),
            None if self.gate.rolling_out() => Some("waiting for pods".to_string()),
            None => None,
        };
        self.gate.set_rollout_report(RolloutReport {
            current_version: self.active.clone(),
            current_revision: active_rev,
            candidate,
            in_progress: self.gate.rolling_out(),
            step,
            validating: progress,
            waiting_for: self.waiting_for.clone(),
            overlap: self.cfg.overlap.as_str(),
            promotion: match self.cfg.promotion {
                crate::config::Promotion::Auto => "auto",
                crate::config::Promotion::Manual => "manual",
            },
            warning: self.warning.clone(),
            result: self.last_result.clone(),
            on_failure: self.cfg.on_failure.as_str(),
            quiesce_seconds: self.cfg.quiesce.as_secs_f64(),
        });
    }
}
