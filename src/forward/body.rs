//! The body of every response Reveille sends through hyper: the backend's stream, holding its
//! endpoint slot ([`Permit`]) and pooled connection until the end, or a small body Reveille
//! wrote itself.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::gate::Permit;
use crate::upstream::Lease;

pin_project_lite::pin_project! {
    /// A response body: either the backend's stream (holding its endpoint slot until the end)
    /// or a small body Reveille wrote itself.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        /// Streamed from the backend; with a pooled connection, the body drives it.
        Upstream { #[pin] body: Incoming, permit: Option<Permit>, lease: Option<Lease> },
        /// Written by Reveille.
        Local { #[pin] body: Full<Bytes> },
    }
}

impl ProxyBody {
    /// A body Reveille writes itself.
    pub fn local(b: impl Into<Bytes>) -> Self {
        ProxyBody::Local {
            body: Full::new(b.into()),
        }
    }

    /// The backend's body, keeping `permit` until it ends; `lease` is the connection it comes
    /// on when that is ours to drive, returned to the pool when the body ends.
    pub fn upstream(body: Incoming, permit: Permit, mut lease: Option<Lease>) -> Self {
        if body.is_end_stream() {
            // Nothing more to read (HEAD, 204, 304, an empty body): the connection is free now
            // (hyper may never poll an empty body).
            if let Some(l) = lease.take() {
                l.release();
            }
        }
        ProxyBody::Upstream {
            body,
            permit: Some(permit),
            lease,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            ProxyBodyProj::Upstream {
                mut body,
                permit,
                lease,
                ..
            } => {
                let mut r = body.as_mut().poll_frame(cx);
                if r.is_pending() {
                    if let Some(l) = lease.as_mut() {
                        // Our connection: read on (this fills the body), then look again.
                        l.drive(cx);
                        r = body.as_mut().poll_frame(cx);
                    }
                }
                match &r {
                    Poll::Ready(Some(Err(_))) => {
                        permit.take();
                        lease.take();
                    }
                    // hyper stops polling a body once it says it has ended, so the end is
                    // seen with the last frame too.
                    Poll::Ready(None) | Poll::Ready(Some(Ok(_))) if body.is_end_stream() => {
                        // Done: the endpoint slot is free for the next request now, not when
                        // the connection gets around to dropping the body; the connection goes
                        // back to the pool.
                        permit.take();
                        if let Some(l) = lease.take() {
                            l.release();
                        }
                    }
                    Poll::Ready(None) => {
                        permit.take();
                    }
                    _ => {}
                }
                r
            }
            ProxyBodyProj::Local { body, .. } => {
                body.poll_frame(cx).map_err(|never| match never {})
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Local { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Local { body, .. } => body.size_hint(),
        }
    }
}
