//! The process scaler, Reveille's embedded default: a local command started on the first held
//! request, probed until it accepts connections (or answers an HTTP readiness path), stopped
//! after the idle period with SIGTERM, then SIGKILL after a grace.
//!
//! The child runs in its own process group so that a wrapper (`sh -c ...`) and what it starts
//! are stopped together. Its exit is watched all the time: a backend that dies by itself is
//! removed from the gate at once, and held requests start it again.
//!
//! "Ready" means the process Reveille started accepts: before a start, the address must be
//! free (else the activation fails, naming it: an orphaned backend or another program holds
//! it), and a probe answered after the child exited does not count. Started by the `reveille`
//! binary, a backend goes through [`super::launch`] and dies with Reveille; its pid file (in
//! `state_dir`, see [`super::pidfile`]) lets the next Reveille clean up what survived.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use super::launch;
use super::pidfile::PidFile;
use crate::config::ProcessBackend;
use crate::error::ProxyError;
use crate::gate::{Gate, State};
use crate::telemetry::wake::Phase;

/// Bound on one readiness probe (connect plus HTTP answer).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// First pause before restarting a process that exited while starting; doubles each attempt.
const RESTART_BACKOFF: Duration = Duration::from_millis(100);

/// The program backends are started through ([`super::launch`]); see [`use_launcher`].
static LAUNCHER: OnceLock<PathBuf> = OnceLock::new();

/// Starts every process backend through `exe`'s launcher subcommand, so that it dies with
/// this process. The `reveille` binary passes `/proc/self/exe`: its own image, even once the
/// file was replaced. Not called (a program embedding the library), backends are started
/// directly and may outlive it.
pub fn use_launcher(exe: PathBuf) {
    let _ = LAUNCHER.set(exe);
}

enum StartError {
    Failed(String),
    NotReady(String),
    Stopped,
}

/// The driver loop: Idle → Waking → Ready → Stopping → Idle, until `stop`, or until the
/// service is idle with nothing held nor kept awake (the driver was started by a held request
/// or a pre-warm, and the next one starts it again, see [`super::Driver`]). Returns true when
/// it ended because a wake-up nobody waits for (a pre-warm) failed: that one is not retried.
pub async fn run(
    gate: &Arc<Gate>,
    cfg: &ProcessBackend,
    idle_timeout: Duration,
    pid_dir: Option<&Path>,
    mut stop: crate::shutdown::Signal,
) -> bool {
    loop {
        gate.set_state(State::Idle);
        if gate.held() == 0 && !gate.kept_awake() {
            return false;
        }
        tokio::select! {
            _ = gate.wait_for_demand() => {}
            _ = stop.fired() => return false,
        }
        gate.set_state(State::Waking);
        // One span per wake-up: its events are the milestones (spawned, ready, forwarded).
        let span = gate.wake().begin(gate.name(), gate.held());
        match dependencies(gate, &mut stop, &span).await {
            Deps::Ready => {}
            Deps::Failed { retry: true } => continue,
            Deps::Failed { retry: false } => return !stop.is_fired(),
        }
        let started = Instant::now();
        let result = start_until_ready(gate, cfg, pid_dir, &mut stop)
            .instrument(span.clone())
            .await;
        let mut backend = match result {
            Ok(backend) => backend,
            Err(StartError::Stopped) => {
                gate.after_stop();
                gate.wake().abort("shutdown");
                gate.fail_held(ProxyError::ShuttingDown {
                    service: gate.name().clone(),
                });
                gate.set_state(State::Idle);
                return false;
            }
            Err(StartError::Failed(reason)) => {
                span.in_scope(|| warn!(%reason, "backend failed to start"));
                let e = ProxyError::ActivationFailed {
                    service: gate.name().clone(),
                    reason: reason.into(),
                };
                if failed(gate, "failed", e) {
                    return true;
                }
                continue;
            }
            Err(StartError::NotReady(reason)) => {
                span.in_scope(|| warn!(%reason, "backend did not become ready"));
                let e = ProxyError::ActivationTimeout {
                    service: gate.name().clone(),
                    reason: reason.into(),
                };
                if failed(gate, "timeout", e) {
                    return true;
                }
                continue;
            }
        };
        let took = started.elapsed();
        gate.activated(took);
        gate.metrics().activation("ready", Some(took.as_secs_f64()));
        gate.wake().mark(Phase::EndpointReady, gate.metrics());
        gate.set_endpoints(&[cfg.address]);
        gate.set_state(State::Ready);
        span.in_scope(|| info!(took_ms = took.as_secs_f64() * 1e3, "backend ready"));

        let shutting_down = tokio::select! {
            status = backend.child.wait() => {
                // Died by itself: no request may go to its address any more. Held requests
                // (and the next arrival) wake it again.
                gate.set_endpoints(&[]);
                backend.exited();
                warn!(service = %gate.name(), status = %describe(status), "backend exited while ready");
                continue;
            }
            _ = gate.wait_idle(idle_timeout) => false,
            _ = stop.fired() => true,
        };
        gate.set_state(State::Stopping);
        gate.set_endpoints(&[]);
        // Requests that took a slot just before the endpoints were withdrawn finish first.
        tokio::select! {
            _ = gate.wait_drained() => {}
            _ = backend.child.wait() => {}
            _ = tokio::time::sleep(cfg.stop_grace) => {}
        }
        info!(service = %gate.name(), reason = if shutting_down { "shutdown" } else { "idle" }, "stopping backend");
        backend.terminate(cfg.stop_grace).await;
        gate.after_stop();
        if shutting_down {
            gate.set_state(State::Idle);
            return false;
        }
    }
}

/// Ends a failed wake-up (`outcome`: `failed` or `timeout`): the held requests get `e`, the
/// dependencies are let go. True when nothing is held any more (a pre-warm's wake-up failed:
/// it is not retried); the state is then idle.
fn failed(gate: &Gate, outcome: &'static str, e: ProxyError) -> bool {
    gate.wake().abort(outcome);
    gate.metrics().activation(outcome, None);
    gate.fail_held(e);
    gate.after_stop();
    let done = gate.held() == 0;
    if done {
        gate.set_state(State::Idle);
    }
    done
}

/// What became of a service's dependencies before its wake-up.
enum Deps {
    /// All ready (or none): wake the backend.
    Ready,
    /// One failed (its held requests were answered): `retry` when requests are held again.
    Failed { retry: bool },
}

/// Wakes the dependencies first, each ready before the next (`depends_on`).
async fn dependencies(
    gate: &Arc<Gate>,
    stop: &mut crate::shutdown::Signal,
    span: &tracing::Span,
) -> Deps {
    let deps = tokio::select! {
        r = gate.before_wake() => r,
        _ = stop.fired() => Err(ProxyError::ShuttingDown { service: gate.name().clone() }),
    };
    let Err(e) = deps else { return Deps::Ready };
    span.in_scope(|| warn!(error = %e, "dependencies not ready"));
    gate.wake().abort("dependency");
    gate.fail_held(e);
    gate.after_stop();
    gate.set_state(State::Idle);
    Deps::Failed {
        retry: !stop.is_fired() && gate.held() > 0,
    }
}

async fn start_until_ready(
    gate: &Gate,
    cfg: &ProcessBackend,
    pid_dir: Option<&Path>,
    stop: &mut crate::shutdown::Signal,
) -> Result<Backend, StartError> {
    let deadline = Instant::now() + cfg.start_timeout;
    let mut last_exit = String::new();
    for attempt in 1..=cfg.start_attempts {
        // Whatever accepts there now is not ours: it would pass every probe.
        if matches!(
            tokio::time::timeout(PROBE_TIMEOUT, probe(cfg.address, None)).await,
            Ok(true)
        ) {
            return Err(StartError::Failed(format!(
                "{} already accepts connections from a process Reveille did not start (an orphaned backend or another program); not starting {:?}",
                cfg.address, cfg.command[0]
            )));
        }
        let mut backend = Backend::spawn(cfg, gate.name(), pid_dir)
            .map_err(|e| StartError::Failed(format!("cannot run {:?}: {e}", cfg.command[0])))?;
        info!(attempt, pid = backend.pid, "backend started");
        gate.wake().mark(Phase::ScaleAccepted, gate.metrics());
        tokio::select! {
            r = backend.ready(cfg) => match r {
                Ok(()) => return Ok(backend),
                Err(exit) => {
                    backend.exited();
                    last_exit = format!("exited with {exit} before it was ready");
                    warn!(attempt, service = %gate.name(), "backend {last_exit}");
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                backend.terminate(cfg.stop_grace).await;
                return Err(StartError::NotReady(format!(
                    "not accepting connections on {} within {}",
                    cfg.address,
                    humantime::format_duration(cfg.start_timeout)
                )));
            }
            _ = stop.fired() => {
                backend.terminate(cfg.stop_grace).await;
                return Err(StartError::Stopped);
            }
        }
        if attempt < cfg.start_attempts {
            let pause = RESTART_BACKOFF * 2u32.pow(attempt - 1);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.fired() => return Err(StartError::Stopped),
            }
        }
    }
    Err(StartError::Failed(last_exit))
}

/// A started backend: its process (the leader of its process group) and its pid file.
struct Backend {
    child: Child,
    pid: Option<u32>,
    pid_file: Option<PidFile>,
}

impl Backend {
    /// Starts the command, through the launcher when there is one ([`use_launcher`]), and
    /// writes its pid file in `pid_dir`.
    ///
    /// The launcher's parent-death signal fires when the *thread* that forked it exits, not
    /// the process. This runs in a driver task on a runtime worker thread, which lives as long
    /// as the runtime (Reveille calls no `block_in_place`, which would retire one); it must not
    /// move to a blocking-pool thread, which exits after 10 s idle and would take the backend
    /// with it.
    fn spawn(
        cfg: &ProcessBackend,
        service: &str,
        pid_dir: Option<&Path>,
    ) -> std::io::Result<Backend> {
        let mut cmd = match LAUNCHER.get() {
            Some(exe) => {
                let mut c = Command::new(exe);
                c.args(launch::args(std::process::id(), &cfg.command));
                c
            }
            None => {
                let mut c = Command::new(&cfg.command[0]);
                c.args(&cfg.command[1..]);
                c
            }
        };
        cmd.envs(&cfg.env)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &cfg.cwd {
            cmd.current_dir(dir);
        }
        let child = cmd.spawn()?;
        let pid = child.id();
        let pid_file = match (pid_dir, pid) {
            (Some(dir), Some(pid)) => PidFile::write(dir, service, pid)
                .inspect_err(|e| {
                    warn!(service, dir = %dir.display(), error = %e, "cannot write the backend's pid file");
                })
                .ok(),
            _ => None,
        };
        Ok(Backend {
            child,
            pid,
            pid_file,
        })
    }

    /// Probes until the backend is ready; or says how it exited first. Probes are cheap (a
    /// refused loopback connect costs microseconds), so the interval is short: readiness is
    /// seen within one interval.
    async fn ready(&mut self, cfg: &ProcessBackend) -> Result<(), String> {
        let mut tick = tokio::time::interval(cfg.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                status = self.child.wait() => return Err(describe(status)),
                _ = tick.tick() => {}
            }
            let ok = tokio::time::timeout(
                PROBE_TIMEOUT,
                probe(cfg.address, cfg.readiness_path.as_deref()),
            )
            .await;
            if let Ok(true) = ok {
                // What answered is ours only if our child still runs.
                return match self.child.try_wait() {
                    Ok(None) => Ok(()),
                    Ok(Some(status)) => Err(status.to_string()),
                    Err(e) => Err(format!("unknown status ({e})")),
                };
            }
        }
    }

    /// It exited by itself: what it left in its group is killed, its pid file removed.
    fn exited(&mut self) {
        if let Some(pid) = self.pid {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if let Some(f) = self.pid_file.take() {
            f.remove();
        }
    }

    /// SIGTERM to the process group, SIGKILL after `grace`, reap; the pid file is removed.
    async fn terminate(&mut self, grace: Duration) {
        // `None` once reaped.
        if let Some(pid) = self.child.id() {
            let pgid = Pid::from_raw(pid as i32);
            let _ = killpg(pgid, Signal::SIGTERM);
            if tokio::time::timeout(grace, self.child.wait())
                .await
                .is_err()
            {
                warn!(pid, "backend ignored SIGTERM; killing it");
                let _ = killpg(pgid, Signal::SIGKILL);
                let _ = self.child.wait().await;
            } else {
                // Children of a wrapper that outlived it.
                let _ = killpg(pgid, Signal::SIGKILL);
            }
        }
        if let Some(f) = self.pid_file.take() {
            f.remove();
        }
    }
}

/// One probe: a TCP connect, and with a path an HTTP/1.1 GET that must answer 2xx.
pub async fn probe(addr: SocketAddr, path: Option<&str>) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    let Some(path) = path else { return true };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: reveille-probe\r\nConnection: close\r\n\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut n = 0;
    while n < 12 {
        match stream.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => n += k,
        }
    }
    // "HTTP/1.1 200 "
    buf.starts_with(b"HTTP/1.") && buf[9] == b'2'
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown status ({e})"),
    }
}
