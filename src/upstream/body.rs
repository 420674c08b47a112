//! The client's request body on its way to a backend (hyper's path): shared across attempts,
//! bounded in time (`timeouts.client_body`: no bytes for that long ends it), and read ahead
//! when it is chunked, so a body whose framing is broken is answered `400` before anything of
//! the request reaches a backend. A failure of the client's body is remembered, so the request
//! is answered as the client's error (`400`, `408`), never as the backend's (`502`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use parking_lot::Mutex;
use tokio::time::{Instant, Sleep};

use super::BoxError;
use crate::error::ProxyError;

/// How much of a chunked body is read before the request is sent: a body that ends within it
/// is checked whole (the fast path takes bodies up to the same size whole).
pub const READ_AHEAD: usize = 64 * 1024;

const FAULT_NONE: u8 = 0;
const FAULT_MALFORMED: u8 = 1;
const FAULT_STALLED: u8 = 2;

/// What went wrong with the client's body, if anything.
struct Shared {
    body: Mutex<Option<ClientBody>>,
    fault: AtomicU8,
    stall: Duration,
}

/// The client's body: frames read ahead, then the rest as it comes.
struct ClientBody {
    ahead: VecDeque<Frame<Bytes>>,
    rest: Option<Incoming>,
    /// Armed while the client sends nothing; allocated on the first wait.
    timer: Option<Pin<Box<Sleep>>>,
}

/// Where a request's body waits until an attempt sends it. A connect failure happens before
/// the body is polled, so the body is still there for a retry on another endpoint.
#[derive(Clone)]
pub struct BodySlot(Arc<Shared>);

impl BodySlot {
    /// Holds `body` for the attempts; no bytes for `stall` ends it as the client's fault.
    pub fn new(body: Incoming, stall: Duration) -> Self {
        Self::with_ahead(VecDeque::new(), Some(body), stall)
    }

    fn with_ahead(ahead: VecDeque<Frame<Bytes>>, rest: Option<Incoming>, stall: Duration) -> Self {
        BodySlot(Arc::new(Shared {
            body: Mutex::new(Some(ClientBody {
                ahead,
                rest,
                timer: None,
            })),
            fault: AtomicU8::new(FAULT_NONE),
            stall,
        }))
    }

    /// Reads up to [`READ_AHEAD`] bytes of `body` (all of it when it is smaller), each frame
    /// within `stall`: a broken framing or a stall is the request's answer before anything is
    /// sent.
    pub async fn read_ahead(mut body: Incoming, stall: Duration) -> Result<Self, ProxyError> {
        let mut ahead = VecDeque::new();
        let mut read = 0;
        while read < READ_AHEAD && !body.is_end_stream() {
            match tokio::time::timeout(stall, body.frame()).await {
                Err(_) => return Err(ProxyError::BodyTimeout { after: stall }),
                Ok(Some(Err(_))) => return Err(ProxyError::BadBody),
                Ok(None) => {
                    return Ok(Self::with_ahead(ahead, None, stall));
                }
                Ok(Some(Ok(frame))) => {
                    read += frame.data_ref().map_or(0, |d| d.len());
                    ahead.push_back(frame);
                }
            }
        }
        let rest = (!body.is_end_stream()).then_some(body);
        Ok(Self::with_ahead(ahead, rest, stall))
    }

    /// Whether the body's length is unknown until it ends (it is still streaming from the
    /// client after what was read ahead, and the client did not say its length).
    pub fn unknown_length(&self) -> bool {
        self.0
            .body
            .lock()
            .as_ref()
            .and_then(|b| b.rest.as_ref())
            .is_some_and(|r| r.size_hint().exact().is_none())
    }

    /// Whether no attempt has started sending the body.
    pub fn untouched(&self) -> bool {
        self.0.body.lock().is_some()
    }

    /// The client's part in a failed attempt: its body broke or stalled.
    pub fn fault(&self) -> Option<ProxyError> {
        match self.0.fault.load(Ordering::Relaxed) {
            FAULT_MALFORMED => Some(ProxyError::BadBody),
            FAULT_STALLED => Some(ProxyError::BodyTimeout {
                after: self.0.stall,
            }),
            _ => None,
        }
    }

    /// A body for one attempt.
    pub fn body(&self) -> RequestBody {
        RequestBody {
            shared: self.0.clone(),
            taken: None,
        }
    }
}

/// One attempt's request body: the first attempt that polls it takes the client's body.
pub struct RequestBody {
    shared: Arc<Shared>,
    taken: Option<ClientBody>,
}

impl RequestBody {
    fn fail(&self, fault: u8, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.shared.fault.store(fault, Ordering::Relaxed);
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.taken.is_none() {
            this.taken = this.shared.body.lock().take();
        }
        let Some(b) = this.taken.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(frame) = b.ahead.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(rest) = b.rest.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = b.timer.as_mut() {
                    t.as_mut().reset(Instant::now() + this.shared.stall);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.fail(FAULT_MALFORMED, e.into()),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let stall = this.shared.stall;
                let timer = b
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => this.fail(FAULT_STALLED, "the client's body stalled".into()),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = |b: &ClientBody| {
            b.ahead.is_empty() && b.rest.as_ref().is_none_or(|r| r.is_end_stream())
        };
        match &self.taken {
            Some(b) => end(b),
            None => self.shared.body.lock().as_ref().is_none_or(end),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let hint = |b: &ClientBody| {
            let ahead: u64 = b
                .ahead
                .iter()
                .filter_map(|f| f.data_ref())
                .map(|d| d.len() as u64)
                .sum();
            match &b.rest {
                None => SizeHint::with_exact(ahead),
                Some(r) => {
                    let h = r.size_hint();
                    let mut out = SizeHint::new();
                    out.set_lower(h.lower() + ahead);
                    if let Some(u) = h.upper() {
                        out.set_upper(u + ahead);
                    }
                    out
                }
            }
        };
        match &self.taken {
            Some(b) => hint(b),
            None => self
                .shared
                .body
                .lock()
                .as_ref()
                .map(hint)
                .unwrap_or_else(|| SizeHint::with_exact(0)),
        }
    }
}
