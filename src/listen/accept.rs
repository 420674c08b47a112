//! What every listener (proxy, TLS, admin, KEDA) does when `accept` fails: back off.
//!
//! A failed `accept` (EMFILE or ENFILE when file descriptors run out, ENOBUFS, ENOMEM) leaves
//! the pending connection in the kernel's queue, so the listener stays readable and an
//! immediate retry fails again: a loop that retries at once spins a core and floods the log.
//! The pause starts at [`FIRST_PAUSE`] and doubles up to [`MAX_PAUSE`]; the next success resets
//! it. Every failure is counted in `reveille_accept_errors_total{listener}`; the log says so at
//! most once per [`LOG_EVERY`], with how many it did not say.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::{TcpListener, TcpStream};

use tokio::time::Instant;
use tracing::warn;

use crate::telemetry::metrics::Metrics;

/// The pause after a first failure.
pub const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause between two tries.
pub const MAX_PAUSE: Duration = Duration::from_secs(1);
/// At most one log line per listener this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One listener's backoff after accept failures.
pub(crate) struct AcceptBackoff {
    listener: &'static str,
    metrics: Metrics,
    pause: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl AcceptBackoff {
    /// For the listener named `listener` (a bounded label value: `proxy`, `tls`, `admin`,
    /// `keda`).
    pub(crate) fn new(listener: &'static str, metrics: Metrics) -> Self {
        AcceptBackoff {
            listener,
            metrics,
            pause: FIRST_PAUSE,
            last_log: None,
            unlogged: 0,
        }
    }

    /// A connection was accepted: the next failure pauses briefly again.
    pub(crate) fn accepted(&mut self) {
        self.pause = FIRST_PAUSE;
    }

    /// Counts the failure, logs it (rate-limited), and pauses before the next try.
    pub(crate) async fn failed(&mut self, error: &io::Error) {
        self.metrics.accept_error(self.listener);
        let now = Instant::now();
        if self.last_log.is_none_or(|at| now - at >= LOG_EVERY) {
            warn!(
                listener = self.listener,
                %error,
                pause_ms = self.pause.as_millis() as u64,
                not_logged = self.unlogged,
                "accept failed; backing off"
            );
            self.last_log = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
    }
}

/// Binds a client-facing listener (plain or TLS) with `backlog`: the connections the kernel
/// completes and keeps until they are accepted; it caps the value at `net.core.somaxconn`.
///
/// `TcpListener::bind` (tokio's, like std's) asks for 128. A burst of connections that arrives
/// faster than the accept loop takes them (thousands during a cold start, on one worker) then
/// overflows the accept queue: the kernel drops SYNs (the client retries after 1 s) and the
/// last ACK of handshakes the client already considers complete; such a connection's request
/// waits for retransmissions, and one whose retries all meet a full queue is reset.
pub(crate) fn bind_listener(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does on Unix: a restart can bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The accept loop of every client-facing listener, plain and TLS: takes a connection slot
/// for each accepted connection (or closes it at once when [`Connections`] are all taken),
/// hands it to `serve`, and backs off when `accept` fails. When `close` turns true it stops
/// accepting, then takes what the kernel already completed (those connections carry requests
/// too) before it returns.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    name: &'static str,
    metrics: Metrics,
    conns: Arc<Connections>,
    mut close: crate::shutdown::Signal,
    mut serve: impl FnMut(TcpStream, SocketAddr, ConnectionGuard),
) {
    let mut backoff = AcceptBackoff::new(name, metrics.clone());
    let mut open = |stream: TcpStream, remote: SocketAddr| {
        let Some(guard) = conns.try_open() else {
            // Over the limit: close at once rather than let memory grow.
            metrics.reject_connection("max_connections");
            return;
        };
        let _ = stream.set_nodelay(true);
        serve(stream, remote, guard);
    };
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, remote)) => {
                    backoff.accepted();
                    open(stream, remote);
                }
                // EMFILE and friends: back off instead of spinning.
                Err(e) => backoff.failed(&e).await,
            },
            _ = close.fired() => break,
        }
    }
    while let Some(Ok((stream, remote))) = listener.accept().now_or_never() {
        open(stream, remote);
    }
}

/// Open client connections, plain and TLS: bounded by `limits.max_connections`, and waited
/// for on shutdown.
pub struct Connections {
    max: usize,
    open: std::sync::atomic::AtomicUsize,
    closed: tokio::sync::Notify,
}

impl Connections {
    /// At most `max` open connections.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Connections {
            max,
            open: 0.into(),
            closed: tokio::sync::Notify::new(),
        })
    }

    /// Takes a connection slot, or `None` when all are taken.
    pub fn try_open(self: &Arc<Self>) -> Option<ConnectionGuard> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionGuard(self.clone()))
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Resolves when no connection is open.
    pub async fn drained(&self) {
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// One open connection's slot; released on drop.
pub struct ConnectionGuard(Arc<Connections>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(24)
    }

    #[tokio::test(start_paused = true)]
    async fn pauses_double_up_to_a_second_and_a_success_resets_them() {
        let metrics = Metrics::new();
        let mut b = AcceptBackoff::new("admin", metrics.clone());
        let mut pauses = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            b.failed(&emfile()).await;
            pauses.push(t.elapsed().as_millis());
        }
        assert_eq!(
            pauses,
            [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000],
            "pauses in ms"
        );
        b.accepted();
        let t = Instant::now();
        b.failed(&emfile()).await;
        assert_eq!(t.elapsed(), FIRST_PAUSE);
        let text = metrics.render();
        assert!(
            text.contains("reveille_accept_errors_total{listener=\"admin\"} 11"),
            "{text}"
        );
    }
}
