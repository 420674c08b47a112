//! The process scaler, Reveille's embedded default: a local command started on the first held
//! request, probed until it accepts connections (or answers an HTTP readiness path), stopped
//! after the idle period with SIGTERM, then SIGKILL after a grace.
//!
//! The child runs in its own process group so that a wrapper (`sh -c ...`) and what it starts
//! are stopped together. Its exit is watched all the time: a backend that dies by itself is
//! removed from the gate at once, and held requests start it again.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use super::stopped;
use crate::config::ProcessBackend;
use crate::error::ProxyError;
use crate::gate::{Gate, State};
use crate::wake::Phase;

/// Bound on one readiness probe (connect plus HTTP answer).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// First pause before restarting a process that exited while starting; doubles each attempt.
const RESTART_BACKOFF: Duration = Duration::from_millis(100);

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
    mut stop: watch::Receiver<bool>,
) -> bool {
    loop {
        gate.set_state(State::Idle);
        if gate.held() == 0 && !gate.kept_awake() {
            return false;
        }
        tokio::select! {
            _ = gate.wait_for_demand() => {}
            _ = stopped(&mut stop) => return false,
        }
        gate.set_state(State::Waking);
        // One span per wake-up: its events are the milestones (spawned, ready, forwarded).
        let span = gate.wake().begin(gate.name(), gate.held());
        match dependencies(gate, &mut stop, &span).await {
            Deps::Ready => {}
            Deps::Failed { retry: true } => continue,
            Deps::Failed { retry: false } => return !*stop.borrow(),
        }
        let started = Instant::now();
        let result = start_until_ready(gate, cfg, &mut stop)
            .instrument(span.clone())
            .await;
        let mut child = match result {
            Ok(child) => child,
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
            status = child.wait() => {
                // Died by itself: no request may go to its address any more. Held requests
                // (and the next arrival) wake it again.
                gate.set_endpoints(&[]);
                warn!(service = %gate.name(), status = %describe(status), "backend exited while ready");
                continue;
            }
            _ = gate.wait_idle(idle_timeout) => false,
            _ = stopped(&mut stop) => true,
        };
        gate.set_state(State::Stopping);
        gate.set_endpoints(&[]);
        // Requests that took a slot just before the endpoints were withdrawn finish first.
        tokio::select! {
            _ = gate.wait_drained() => {}
            _ = child.wait() => {}
            _ = tokio::time::sleep(cfg.stop_grace) => {}
        }
        info!(service = %gate.name(), reason = if shutting_down { "shutdown" } else { "idle" }, "stopping backend");
        terminate(&mut child, cfg.stop_grace).await;
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
    stop: &mut watch::Receiver<bool>,
    span: &tracing::Span,
) -> Deps {
    let deps = tokio::select! {
        r = gate.before_wake() => r,
        _ = stopped(stop) => Err(ProxyError::ShuttingDown { service: gate.name().clone() }),
    };
    let Err(e) = deps else { return Deps::Ready };
    span.in_scope(|| warn!(error = %e, "dependencies not ready"));
    gate.wake().abort("dependency");
    gate.fail_held(e);
    gate.after_stop();
    gate.set_state(State::Idle);
    Deps::Failed {
        retry: !*stop.borrow() && gate.held() > 0,
    }
}

async fn start_until_ready(
    gate: &Gate,
    cfg: &ProcessBackend,
    stop: &mut watch::Receiver<bool>,
) -> Result<Child, StartError> {
    let deadline = Instant::now() + cfg.start_timeout;
    let mut last_exit = String::new();
    for attempt in 1..=cfg.start_attempts {
        let mut child = spawn(cfg)
            .map_err(|e| StartError::Failed(format!("cannot run {:?}: {e}", cfg.command[0])))?;
        info!(attempt, pid = child.id(), "backend started");
        gate.wake().mark(Phase::ScaleAccepted, gate.metrics());
        tokio::select! {
            () = probe_until_ready(cfg) => return Ok(child),
            status = child.wait() => {
                last_exit = format!("exited with {} before it was ready", describe(status));
                warn!(attempt, service = %gate.name(), "backend {last_exit}");
            }
            _ = tokio::time::sleep_until(deadline) => {
                terminate(&mut child, cfg.stop_grace).await;
                return Err(StartError::NotReady(format!(
                    "not accepting connections on {} within {}",
                    cfg.address,
                    humantime::format_duration(cfg.start_timeout)
                )));
            }
            _ = stopped(stop) => {
                terminate(&mut child, cfg.stop_grace).await;
                return Err(StartError::Stopped);
            }
        }
        if attempt < cfg.start_attempts {
            let pause = RESTART_BACKOFF * 2u32.pow(attempt - 1);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stopped(stop) => return Err(StartError::Stopped),
            }
        }
    }
    Err(StartError::Failed(last_exit))
}

fn spawn(cfg: &ProcessBackend) -> std::io::Result<Child> {
    let mut cmd = Command::new(&cfg.command[0]);
    cmd.args(&cfg.command[1..])
        .envs(&cfg.env)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &cfg.cwd {
        cmd.current_dir(dir);
    }
    cmd.spawn()
}

/// Probes until the backend is ready. Probes are cheap (a refused loopback connect costs
/// microseconds), so the interval is short: readiness is seen within one interval.
async fn probe_until_ready(cfg: &ProcessBackend) {
    let mut tick = tokio::time::interval(cfg.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = tokio::time::timeout(
            PROBE_TIMEOUT,
            probe(cfg.address, cfg.readiness_path.as_deref()),
        )
        .await;
        if let Ok(true) = ok {
            return;
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

/// SIGTERM to the process group, SIGKILL after `grace`, and reap.
async fn terminate(child: &mut Child, grace: Duration) {
    let Some(pid) = child.id() else {
        return; // already reaped
    };
    let pgid = Pid::from_raw(pid as i32);
    let _ = killpg(pgid, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        warn!(pid, "backend ignored SIGTERM; killing it");
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = child.wait().await;
    } else {
        // Children of a wrapper that outlived it.
        let _ = killpg(pgid, Signal::SIGKILL);
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown status ({e})"),
    }
}
