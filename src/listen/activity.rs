//! What the bounds on a hyper-served client connection need to see: whether a request is in
//! progress (a request is in progress from its head until its response body has been handed
//! to the connection whole), and since when a write to the client has been waiting. The
//! connection's own task ([`super::drive`]) looks at both now and then: a connection with no
//! request in progress for `timeouts.client_idle` is shut down gracefully (HTTP/2: GOAWAY), one
//! whose writes made no progress for `timeouts.client_write` is closed at once, which frees the
//! endpoint slot and the backend connection of the response it was writing.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::forward::Proxy;
use crate::forward::ProxyBody;

/// Milliseconds since a process-wide origin (so an instant fits an atomic); never 0.
fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| Instant::now() - Duration::from_millis(1));
    origin.elapsed().as_millis() as u64
}

/// One connection's activity, shared by its service (requests) and its IO (writes).
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    /// When `open` last went to 0 (ms, [`now_ms`]).
    idle_since: AtomicU64,
    /// Since when a write has been waiting (ms); 0: none is.
    blocked_since: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            open: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now_ms()),
            blocked_since: AtomicU64::new(0),
        })
    }

    /// A request begins; it ends when the guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InProgress {
        self.open.fetch_add(1, Ordering::AcqRel);
        InProgress(self.clone())
    }

    /// How long the connection has had no request in progress (zero while one is).
    pub(crate) fn idle_for(&self) -> Duration {
        if self.open.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let since = self.idle_since.load(Ordering::Acquire);
        Duration::from_millis(now_ms().saturating_sub(since))
    }

    /// How long a write to the client has been waiting (zero when none is).
    pub(crate) fn write_blocked_for(&self) -> Duration {
        match self.blocked_since.load(Ordering::Acquire) {
            0 => Duration::ZERO,
            since => Duration::from_millis(now_ms().saturating_sub(since)),
        }
    }

    fn wrote(&self, pending: bool) {
        let blocked = self.blocked_since.load(Ordering::Relaxed);
        if pending {
            if blocked == 0 {
                self.blocked_since.store(now_ms(), Ordering::Release);
            }
        } else if blocked != 0 {
            self.blocked_since.store(0, Ordering::Release);
        }
    }
}

/// A request in progress on a connection (see [`Activity::begin`]).
#[derive(Debug)]
pub struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle_since.store(now_ms(), Ordering::Release);
        }
    }
}

pin_project_lite::pin_project! {
    /// A client connection's IO, noting when its writes wait.
    pub struct Watched<I> {
        #[pin]
        inner: I,
        activity: Arc<Activity>,
    }
}

impl<I> Watched<I> {
    pub(crate) fn new(inner: I, activity: Arc<Activity>) -> Self {
        Watched { inner, activity }
    }
}

impl<I: AsyncRead> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        this.activity.wrote(r.is_pending());
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        this.activity.wrote(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let r = this.inner.poll_flush(cx);
        this.activity.wrote(r.is_pending());
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// The proxy service of one hyper-served connection, counting its requests in progress: from
/// the head until the response body is done with (dropped by hyper).
#[derive(Clone)]
pub struct Tracked {
    proxy: Proxy,
    activity: Arc<Activity>,
}

impl Tracked {
    pub(crate) fn new(proxy: Proxy, activity: Arc<Activity>) -> Self {
        Tracked { proxy, activity }
    }
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedFuture;

    fn call(&self, req: Request<Incoming>) -> TrackedFuture {
        TrackedFuture {
            request: Some(self.activity.begin()),
            inner: hyper::service::Service::call(&self.proxy, req),
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Tracked`]'s future: the proxy's, then its response body keeps the request counted.
    pub struct TrackedFuture {
        #[pin]
        inner: <Proxy as hyper::service::Service<Request<Incoming>>>::Future,
        request: Option<InProgress>,
    }
}

impl Future for TrackedFuture {
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(resp)) => resp,
            Poll::Ready(Err(never)) => match never {},
        };
        let request = this.request.take();
        Poll::Ready(Ok(resp.map(|body| TrackedBody {
            body,
            _request: request,
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in progress until it is dropped.
    pub struct TrackedBody {
        #[pin]
        body: ProxyBody,
        _request: Option<InProgress>,
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_counts_from_the_last_request_and_not_during_one() {
        let a = Activity::new();
        let r1 = a.begin();
        let r2 = a.begin();
        assert_eq!(a.idle_for(), Duration::ZERO);
        drop(r1);
        assert_eq!(
            a.idle_for(),
            Duration::ZERO,
            "one request still in progress"
        );
        drop(r2);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            a.idle_for() >= Duration::from_millis(15),
            "{:?}",
            a.idle_for()
        );
        let _r3 = a.begin();
        assert_eq!(a.idle_for(), Duration::ZERO);
    }

    #[test]
    fn a_blocked_write_counts_until_one_makes_progress() {
        let a = Activity::new();
        assert_eq!(a.write_blocked_for(), Duration::ZERO);
        a.wrote(true);
        std::thread::sleep(Duration::from_millis(20));
        a.wrote(true);
        assert!(a.write_blocked_for() >= Duration::from_millis(15));
        a.wrote(false);
        assert_eq!(a.write_blocked_for(), Duration::ZERO);
    }
}
