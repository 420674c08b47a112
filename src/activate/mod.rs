//! Scalers: what wakes a service and tells its gate which endpoints are ready. A driver task per
//! service runs the activation state machine for its platform:
//!
//! - [`process`]: starts a local command on demand, probes it until ready, stops it when idle.
//! - [`r#static`]: fixed addresses, always ready (plain proxying).
//! - [`kubernetes`]: patches a Deployment's or StatefulSet's `scale` subresource and follows
//!   its pods through an EndpointSlice watch.
//!
//! A driver only talks to its [`Gate`]: it waits for demand and idleness there, and publishes
//! endpoints and the state. It stops when `stop` turns true (Reveille is shutting down).
//!
//! A [`Driver`] owns the task. A process backend's task is started by the first request held
//! while the service has no endpoint and ends once the backend is stopped and nothing is held,
//! so an idle service costs no task (a replica may front thousands of them); the other
//! backends' tasks run from launch until stopped (a Kubernetes service must follow its pods
//! even while idle).

pub mod group;
pub mod kubernetes;
pub mod launch;
pub mod pidfile;
pub mod process;
pub mod r#static;

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::config::{Backend, Service};
use crate::gate::{Gate, OnDemand};

/// A service's driver: starts its task (at once, or on demand for a process backend), stops
/// it, and tells when it has stopped (its backend with it).
pub struct Driver {
    service: Arc<Service>,
    kube: Option<Arc<kubernetes::KubeContext>>,
    /// Where a process backend's pid file goes; `None`: nowhere.
    pid_dir: Option<PathBuf>,
    state: Mutex<DriverState>,
    done: Notify,
}

struct DriverState {
    /// The running task's stop signal; `None` while no task runs.
    running: Option<crate::shutdown::Trigger>,
    /// [`Driver::stop`] was called: no task starts any more.
    stopped: bool,
    /// Stopped, and no task runs.
    done: bool,
    /// The driver this one replaces: its backend must be gone before ours starts (a process
    /// would clash on its port). Taken by the first task.
    after: Option<Arc<Driver>>,
}

impl Driver {
    /// The driver of `gate`'s service, started after `after` (the replaced service's driver)
    /// is done. A process backend's driver waits for the gate's first demand; the others
    /// start now. A process backend's pid file goes in `pid_dir`.
    pub fn launch(
        gate: &Arc<Gate>,
        service: Arc<Service>,
        kube: Option<Arc<kubernetes::KubeContext>>,
        after: Option<Arc<Driver>>,
        pid_dir: Option<PathBuf>,
    ) -> Arc<Driver> {
        let lazy = matches!(service.backend, Backend::Process(_));
        // A predecessor already gone need not be kept (nor waited for).
        let after = after.filter(|before| !before.state.lock().done);
        let driver = Arc::new(Driver {
            service,
            kube,
            pid_dir,
            state: Mutex::new(DriverState {
                running: None,
                stopped: false,
                done: false,
                after,
            }),
            done: Notify::new(),
        });
        // Only a process driver waits for demand; the others run from now on and need no word
        // of each held request.
        if lazy {
            gate.set_on_demand(driver.clone());
        } else {
            driver.start(gate);
        }
        driver
    }

    /// Starts the task unless it runs or the driver was stopped.
    fn start(self: &Arc<Self>, gate: &Arc<Gate>) {
        let mut st = self.state.lock();
        if st.stopped || st.running.is_some() {
            return;
        }
        let (stop, stop_rx) = crate::shutdown::channel();
        st.running = Some(stop);
        let after = st.after.take();
        drop(st);
        tokio::spawn(self.clone().run(gate.clone(), stop_rx, after));
    }

    async fn run(
        self: Arc<Self>,
        gate: Arc<Gate>,
        stop: crate::shutdown::Signal,
        after: Option<Arc<Driver>>,
    ) {
        if let Some(before) = after {
            before.stopped().await;
        }
        loop {
            let mut failed = false;
            match &self.service.backend {
                Backend::Process(p) => {
                    let pid_dir = self.pid_dir.as_deref();
                    failed =
                        process::run(&gate, p, self.service.idle_timeout, pid_dir, stop.clone())
                            .await
                }
                Backend::Static(s) => r#static::run(gate.clone(), &s.addresses, stop.clone()).await,
                Backend::Kubernetes(k) => match &self.kube {
                    Some(ctx) => {
                        kubernetes::run(
                            gate.clone(),
                            k.clone(),
                            self.service.idle_timeout,
                            (**ctx).clone(),
                            stop.clone(),
                        )
                        .await
                    }
                    None => kubernetes::unavailable(gate.clone(), stop.clone()).await,
                },
            }
            let mut st = self.state.lock();
            // A process driver returns when nothing is held nor kept awake; a request held
            // since, or a pre-warm begun since (it found the task still running, so it started
            // none), keeps it going. A pre-warm whose wake-up failed is not tried again.
            let wanted = gate.held() > 0 || (gate.kept_awake() && !failed);
            if !st.stopped && wanted && matches!(self.service.backend, Backend::Process(_)) {
                continue;
            }
            st.running = None;
            if st.stopped {
                st.done = true;
                self.done.notify_waiters();
            }
            return;
        }
    }

    /// Stops the task (and its backend); no task starts any more. See [`Driver::stopped`].
    pub fn stop(self: &Arc<Self>) {
        let mut st = self.state.lock();
        st.stopped = true;
        if let Some(stop) = &st.running {
            stop.fire();
            return;
        }
        match st.after.take() {
            // Never started, but the driver it replaced may still be stopping its backend: a
            // successor waits on this one, so it is done only once that one is.
            Some(before) => {
                drop(st);
                let this = self.clone();
                tokio::spawn(async move {
                    before.stopped().await;
                    this.finish();
                });
            }
            None => {
                st.done = true;
                self.done.notify_waiters();
            }
        }
    }

    fn finish(&self) {
        self.state.lock().done = true;
        self.done.notify_waiters();
    }

    /// Resolves once [`Driver::stop`] was called and the task (with its backend) is gone.
    pub async fn stopped(&self) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.state.lock().done {
                return;
            }
            done.await;
        }
    }

    /// Whether the task runs now.
    pub fn running(&self) -> bool {
        self.state.lock().running.is_some()
    }
}

impl OnDemand for Driver {
    fn demand(self: Arc<Self>, gate: &Arc<Gate>) {
        self.start(gate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(yaml_backend: &str) -> (Arc<Gate>, Arc<Service>) {
        let cfg = crate::Config::parse(&format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: a\n    hosts: [a]\n    backend: {yaml_backend}\n"
        ))
        .unwrap();
        let spec = Arc::new(cfg.services[0].clone());
        let gate = Gate::new(
            "a",
            crate::gate::GateSettings {
                capacity: 1,
                hold_timeout: Duration::from_secs(1),
                concurrency: None,
                protocol: spec.protocol,
                upstream: None,
                held_limit: crate::gate::HeldLimit::new(1),
                upgrades: crate::gate::GateSettings::default_upgrades(),
            },
            crate::telemetry::metrics::Metrics::new().service("a"),
        );
        (gate, spec)
    }

    /// A replacement that never started (a process service nobody asked for) is stopped only
    /// once the driver it replaced is: the one after it must not start its backend beside the
    /// first one's.
    #[tokio::test]
    async fn a_driver_that_never_started_is_done_only_after_the_one_it_replaced() {
        let (gate_a, static_spec) = spec("{ static: { addresses: [\"127.0.0.1:1\"] } }");
        let a = Driver::launch(&gate_a, static_spec, None, None, None);
        let (gate_b, process_spec) =
            spec("{ process: { command: [\"/bin/true\"], address: \"127.0.0.1:2\" } }");
        let b = Driver::launch(&gate_b, process_spec, None, Some(a.clone()), None);
        assert!(!b.running(), "a process driver waits for a demand");
        b.stop();
        let early = tokio::time::timeout(Duration::from_millis(100), b.stopped()).await;
        assert!(early.is_err(), "done while the replaced driver still runs");
        a.stop();
        tokio::time::timeout(Duration::from_secs(5), b.stopped())
            .await
            .expect("done once the replaced driver is");
    }
}
