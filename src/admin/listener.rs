//! The admin listener's accept loop and connections, bounded like the proxy's: the admin port
//! is reachable by whatever can reach the pod, and a liveness probe depends on it.
//!
//! - At most `limits.admin_max_connections` connections are open; one more is closed at once
//!   (counted as `reveille_rejected_total{reason="admin_max_connections"}`), so idle clients
//!   cannot use up the process's file descriptors and stop the proxy from accepting.
//! - A connection must complete its first request head within `timeouts.client_header`; after
//!   an answer it may stay idle `timeouts.client_idle`, and a head once begun must be complete
//!   within `timeouts.client_header`. Then it is closed.
//! - `accept` failures back off ([`crate::listen::accept`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tracing::debug;

use super::AdminState;
use crate::listen::accept::AcceptBackoff;

/// The admin listener's bounds (from `limits` and `timeouts`).
#[derive(Debug, Clone, Copy)]
pub struct AdminBounds {
    /// Open connections at most.
    pub max_connections: usize,
    /// For the first request head, and for any head once its first byte came.
    pub header: Duration,
    /// For the wait between an answer and the next request's first byte.
    pub idle: Duration,
}

/// Serves the admin endpoints on `listener` until `stop`. Connections already open finish by
/// themselves (each is bounded by the timeouts above).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    bounds: AdminBounds,
    mut stop: crate::shutdown::Signal,
) {
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let mut backoff = AcceptBackoff::new("admin", state.metrics.clone());
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
            _ = stop.fired() => return,
        };
        backoff.accepted();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the limit: closed at once (dropped), so it holds no descriptor.
            state.metrics.reject_connection("admin_max_connections");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            connection(stream, state, bounds).await;
            drop(slot);
        });
    }
}

/// Serves one connection until the client closes it or a timeout closes it.
async fn connection(stream: TcpStream, state: Arc<AdminState>, bounds: AdminBounds) {
    let clock = Arc::new(Clock::new());
    let io = TokioIo::new(Watched {
        stream,
        clock: clock.clone(),
    });
    let svc_clock = clock.clone();
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(
        io,
        service_fn(move |req| {
            let (state, clock) = (state.clone(), svc_clock.clone());
            async move {
                clock.set(Phase::Busy);
                let resp = super::handle(state, req).await;
                clock.set(Phase::Waiting { first: false });
                resp
            }
        }),
    );
    tokio::pin!(conn);
    loop {
        let deadline = clock.deadline(bounds);
        tokio::select! {
            _ = conn.as_mut() => return,
            // A new phase has a new deadline (busy: none, each endpoint bounds its own wait).
            _ = clock.changed.notified() => {}
            _ = sleep_until(deadline) => {
                if clock.deadline(bounds).is_some_and(|d| d <= Instant::now()) {
                    debug!(phase = ?clock.phase(), "admin connection timed out; closing");
                    return; // dropping the connection closes it
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No byte of a next request yet (`first`: nor of any request).
    Waiting { first: bool },
    /// A request head has begun.
    Head,
    /// A request is being answered.
    Busy,
}

/// A connection's phase and since when.
struct Clock {
    at: Mutex<(Phase, Instant)>,
    /// Told when the phase changes (from [`Phase::Busy`]).
    changed: Notify,
}

impl Clock {
    fn new() -> Self {
        Clock {
            at: Mutex::new((Phase::Waiting { first: true }, Instant::now())),
            changed: Notify::new(),
        }
    }

    fn set(&self, phase: Phase) {
        *self.at.lock() = (phase, Instant::now());
        self.changed.notify_one();
    }

    fn phase(&self) -> Phase {
        self.at.lock().0
    }

    /// Bytes arrived: a head begins unless one is already under way. The first head's time
    /// still counts from the accept.
    fn read(&self) {
        let mut at = self.at.lock();
        if let Phase::Waiting { first } = at.0 {
            let since = if first { at.1 } else { Instant::now() };
            *at = (Phase::Head, since);
            drop(at);
            self.changed.notify_one();
        }
    }

    /// When the connection is to be closed if nothing changes; `None` while busy.
    fn deadline(&self, bounds: AdminBounds) -> Option<Instant> {
        let (phase, since) = *self.at.lock();
        match phase {
            Phase::Waiting { first: true } | Phase::Head => Some(since + bounds.header),
            Phase::Waiting { first: false } => Some(since + bounds.idle),
            Phase::Busy => None,
        }
    }
}

/// The client's stream, noting when request bytes arrive.
struct Watched {
    stream: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
