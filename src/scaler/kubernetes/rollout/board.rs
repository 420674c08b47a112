//! What the rollout controllers of different services share, kept in the Kubernetes context
//! (one per Reveille process): the live gates by name, so a validation step can go `via`
//! another service.

use std::sync::{Arc, OnceLock, Weak};

use crate::gate::Gate;

/// Finds a live service's gate by name (implemented by the live service set, which sits above
/// the scalers: the scalers only see this trait).
pub trait GateDirectory: Send + Sync {
    /// The gate of the service named `name`, if it runs.
    fn gate(&self, name: &str) -> Option<Arc<Gate>>;
}

/// Shared by every rollout controller of this process.
#[derive(Default)]
pub struct Board {
    directory: OnceLock<Weak<dyn GateDirectory>>,
}

impl Board {
    /// Sets where gates are found (once, when the service set is built).
    pub fn set_directory(&self, directory: Weak<dyn GateDirectory>) {
        let _ = self.directory.set(directory);
    }

    /// The gate of the service named `name`, if it runs.
    pub fn gate(&self, name: &str) -> Option<Arc<Gate>> {
        self.directory.get()?.upgrade()?.gate(name)
    }
}
