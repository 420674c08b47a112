//! The rollout's state as the admin API shows it (`/api/services`, `rollout`): filled by the
//! rollout controller ([`crate::activate::kubernetes::rollout`]), kept on the gate. Fields are
//! in name order, as the JSON object always had them.

use std::collections::BTreeMap;

use serde::Serialize;

/// A controlled rollout's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutReport {
    /// The newest version that is not the current one and still has pods.
    pub candidate: Option<RolloutCandidate>,
    /// The Deployment revision of the current version.
    pub current_revision: Option<i64>,
    /// The version the gate routes to (pod-template hash).
    pub current_version: Option<String>,
    /// Whether a rollout is validating or switching.
    pub in_progress: bool,
    /// `rollout.on_failure`.
    pub on_failure: &'static str,
    /// `rollout.overlap`.
    pub overlap: &'static str,
    /// `auto` or `manual`.
    pub promotion: &'static str,
    /// `rollout.quiesce`, in seconds.
    pub quiesce_seconds: f64,
    /// The last finished validation.
    pub result: Option<ValidationResult>,
    /// What the rollout does now (`switching`, a validation step, `waiting for pods`).
    pub step: Option<String>,
    /// Each validating pod's step (pod name → `step 2/3 (POST /validate)`).
    pub validating: BTreeMap<String, String>,
    /// With `after:`: why new pods are not validated now.
    pub waiting_for: Option<String>,
    /// A warning about the Deployment (`overlap: none` on a strategy that overlaps).
    pub warning: Option<String>,
}

/// The candidate version in a [`RolloutReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutCandidate {
    /// Its pods validated and awaiting promotion (`promotion: manual`).
    pub awaiting_promotion: usize,
    /// Its pods whose validation failed.
    pub failed_pods: usize,
    /// Its pods waiting for (or in) validation.
    pub pending_pods: usize,
    /// Its ready pods.
    pub ready_endpoints: usize,
    /// Its Deployment revision.
    pub revision: i64,
    /// Whether one of its pods passed validation.
    pub validated: bool,
    /// The version (pod-template hash).
    pub version: String,
}

/// A finished validation in a [`RolloutReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ValidationResult {
    /// What passed or why it failed.
    pub message: String,
    /// Whether it passed.
    pub passed: bool,
    /// The pod validated.
    pub pod: String,
    /// Its version.
    pub version: String,
}
