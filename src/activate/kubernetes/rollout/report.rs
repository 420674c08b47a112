//! The rollout's state for `/api/services` (`rollout`), published on the gate.

use serde_json::json;

use super::Controller;

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
            .map(|(h, v)| {
                json!({
                    "version": h,
                    "revision": v.revision,
                    "validated": v.validated,
                    "ready_endpoints": v.ready.len(),
                    "pending_pods": v.pending,
                    "failed_pods": v.failed,
                    "awaiting_promotion": v.awaiting,
                })
            });
        let progress = self.progress.lock().clone();
        let step = match step {
            Some(s) => json!(s),
            None if self.switching => json!("switching"),
            // The first validating pod's step (`step 2/2 (POST /validate)`); every pod's is in
            // `validating`.
            None if !progress.is_empty() => json!(progress.values().next()),
            None if self.gate.rolling_out() => json!("waiting for pods"),
            None => serde_json::Value::Null,
        };
        self.gate.set_rollout_report(json!({
            "current_version": self.active,
            "current_revision": active_rev,
            "candidate": candidate,
            "in_progress": self.gate.rolling_out(),
            "step": step,
            "validating": progress,
            "waiting_for": self.waiting_for,
            "overlap": self.cfg.overlap.as_str(),
            "promotion": match self.cfg.promotion {
                crate::config::Promotion::Auto => "auto",
                crate::config::Promotion::Manual => "manual",
            },
            "warning": self.warning,
            "result": self.last_result,
            "on_failure": self.cfg.on_failure.as_str(),
            "quiesce_seconds": self.cfg.quiesce.as_secs_f64(),
        }));
    }
}
