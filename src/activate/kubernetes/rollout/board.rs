//! What the rollout controllers of different services share, kept in the Kubernetes context
//! (one per Reveille process): the live gates by name, so a validation step can go `via`
//! another service; and each service's rollout phase, so a service with `after:` waits for
//! the rollouts it follows; and a way to each controller for `promote` and `abort`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

use crate::gate::Gate;

/// Finds a live service's gate by name (implemented by the live service set, which sits above
/// the scalers: the scalers only see this trait).
pub trait GateDirectory: Send + Sync {
    /// The gate of the service named `name`, if it runs.
    fn gate(&self, name: &str) -> Option<Arc<Gate>>;
}

/// Where a service's rollout stands, as the services that follow it (`after:`) see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The newest version is routed and nothing is pending: followers may go.
    Completed,
    /// A newer version is rolling out (what it is doing).
    InProgress(String),
    /// The newest version failed validation (why); followers wait for a newer one to pass.
    Failed(String),
}

/// A command for a service's rollout (`promotion: manual`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Switch to the validated candidate.
    Promote,
    /// Refuse the candidate (and roll back with `on_failure: rollback`).
    Abort,
}

/// Why a command was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No rollout controller runs for that name.
    #[error("no service {0:?} with a rollout")]
    NoRollout(String),
    /// The controller cannot do it now (not manual, nothing awaiting).
    #[error("{0}")]
    Refused(String),
}

/// What a controller answers a command with: what it did, or why not.
pub type Reply = Result<String, CommandError>;

/// A command and where its reply goes.
pub type Request = (Command, oneshot::Sender<Reply>);

/// Bound on waiting for a controller's answer to a command.
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Commands queued per controller at most (a human types them).
const COMMAND_QUEUE: usize = 4;

/// Shared by every rollout controller of this process.
pub struct Board {
    directory: OnceLock<Weak<dyn GateDirectory>>,
    commands: Mutex<HashMap<String, mpsc::Sender<Request>>>,
    phases: Mutex<HashMap<String, Phase>>,
    /// Bumped on every change of a phase; controllers with `after:` reconcile on it.
    changed: watch::Sender<u64>,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            directory: OnceLock::new(),
            commands: Mutex::default(),
            phases: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
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

    /// Publishes `service`'s phase; followers are told only when it changed.
    pub fn publish(&self, service: &str, phase: Phase) {
        let changed = {
            let mut phases = self.phases.lock();
            phases.insert(service.to_string(), phase.clone()) != Some(phase)
        };
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Registers `service`'s controller for commands; it reads them from the receiver.
    pub fn listen(&self, service: &str) -> mpsc::Receiver<Request> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        self.commands.lock().insert(service.to_string(), tx);
        rx
    }

    /// Sends `command` to `service`'s controller and waits (bounded) for its answer.
    pub async fn command(&self, service: &str, command: Command) -> Reply {
        let no = || CommandError::NoRollout(service.to_string());
        let tx = self.commands.lock().get(service).cloned().ok_or_else(no)?;
        let (reply, answer) = oneshot::channel();
        let busy = || CommandError::Refused("the rollout controller is busy; try again".into());
        tx.try_send((command, reply)).map_err(|_| busy())?;
        match tokio::time::timeout(COMMAND_TIMEOUT, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(no()),
            Err(_) => Err(busy()),
        }
    }

    /// Forgets `service` (its controller stopped).
    pub fn forget(&self, service: &str) {
        self.commands.lock().remove(service);
        if self.phases.lock().remove(service).is_some() {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Fires when any service's phase changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Why a service with `after: [..]` must wait now (the first service in `after` whose
    /// rollout has not completed), or `None` when it may validate its new pods.
    pub fn waiting_for(&self, after: &[String]) -> Option<String> {
        let phases = self.phases.lock();
        after.iter().find_map(|name| match phases.get(name) {
            Some(Phase::Completed) => None,
            None => Some(format!(
                "waiting for {name}'s rollout to complete (its state is not known yet)"
            )),
            Some(Phase::InProgress(what)) => Some(format!(
                "waiting for {name}'s rollout to complete ({name}: {what})"
            )),
            Some(Phase::Failed(why)) => Some(format!(
                "waiting for {name}: its rollout failed ({why}); a newer version of {name} must pass first"
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_wait_until_every_leader_completed() {
        let b = Board::default();
        let mut rx = b.subscribe();
        let after = ["api".to_string(), "db".to_string()];
        assert!(b.waiting_for(&after).unwrap().contains("not known yet"));
        b.publish("api", Phase::InProgress("validating version v2".into()));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        b.publish("api", Phase::InProgress("validating version v2".into()));
        assert!(!rx.has_changed().unwrap(), "no news, no wake-up");
        assert_eq!(
            b.waiting_for(&after).unwrap(),
            "waiting for api's rollout to complete (api: validating version v2)"
        );
        b.publish(
            "api",
            Phase::Failed("step 1 (GET /x): status 500, expected 200".into()),
        );
        let w = b.waiting_for(&after).unwrap();
        assert!(
            w.starts_with("waiting for api: its rollout failed (step 1"),
            "{w}"
        );
        b.publish("api", Phase::Completed);
        assert!(b
            .waiting_for(&after)
            .unwrap()
            .starts_with("waiting for db's"));
        b.publish("db", Phase::Completed);
        assert_eq!(b.waiting_for(&after), None);
        assert_eq!(b.waiting_for(&[]), None);
    }
}
