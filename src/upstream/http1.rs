//! [`Http1Pool`]: cleartext HTTP/1.1 backends through `hyper::client::conn::http1`
//! connections of our own, driven by the request's task and then by its response body.

use super::*;

/// hyper's connection state machine (with upgrades; its type cannot be named).
pub(super) type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// What a pooled connection keeps between requests: one allocation each per connection, none
/// per request.
pub(super) struct ConnIo {
    pub(super) driver: Driver,
    /// The response timer, re-armed per request.
    pub(super) timer: Pin<Box<tokio::time::Sleep>>,
}

/// One HTTP/1.1 connection to a backend, driven by whichever task uses it.
pub(super) struct Conn {
    pub(super) sender: hyper::client::conn::http1::SendRequest<RequestBody>,
    /// `None` once the connection has finished (closed, failed, or upgraded): dropping hyper's
    /// state answers any request it still held.
    pub(super) io: Option<ConnIo>,
}

impl Conn {
    /// Drives the connection; returns whether it has finished.
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(io) = self.io.as_mut() {
            if io.driver.as_mut().poll(cx).is_ready() {
                self.io = None;
            }
        }
        self.io.is_none()
    }

    /// Whether it can take a request now. Driving it first notices a close by the backend.
    pub(super) fn ready(&mut self, cx: &mut Context<'_>) -> bool {
        !self.drive(cx) && self.sender.is_ready()
    }
}

pub(super) struct Idle {
    pub(super) conn: Conn,
    pub(super) since: std::time::Instant,
}

/// The idle connections to one endpoint address.
pub(super) struct Host {
    pub(super) idle: Mutex<Vec<Idle>>,
}

impl Host {
    /// The most recently used idle connection. It is not driven here: one the backend closed
    /// since it was parked hands the request back untouched when driven (see
    /// [`Http1Pool::send`]), and driving it now would only register this task's waker where
    /// sending the request then wakes it for nothing.
    pub(super) fn checkout(&self) -> Option<Conn> {
        loop {
            let conn = self.idle.lock().pop()?.conn;
            if conn.io.is_some() && conn.sender.is_ready() {
                return Some(conn);
            }
        }
    }

    pub(super) fn put(&self, conn: Conn) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push(Idle {
                conn,
                since: std::time::Instant::now(),
            });
        }
    }
}

/// A connection lent to one request; goes back to its pool with [`Lease::release`] once the
/// response is complete, and is closed if dropped before.
pub struct Lease {
    pub(super) conn: Conn,
    pub(super) host: Arc<Host>,
}

impl Lease {
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        self.conn.drive(cx)
    }

    /// Returns the connection to the pool if it is ready for another request.
    pub(crate) fn release(mut self) {
        // Settle the connection to idle, leaving no waker of this task behind: an idle
        // connection must not wake the last task that used it.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if self.conn.ready(&mut cx) {
            self.host.put(self.conn);
        }
    }

    /// Drives the connection to its end (after a `101 Switching Protocols`, this hands the
    /// connection over to the response's upgrade).
    pub async fn finish(mut self) {
        std::future::poll_fn(|cx| {
            if self.drive(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

pub(super) struct PoolInner {
    pub(super) hosts: Endpoints<Host>,
    pub(super) connect_timeout: Duration,
    pub(super) idle_timeout: Duration,
    pub(super) builder: hyper::client::conn::http1::Builder,
}

/// The pool of HTTP/1.1 cleartext connections to backends, by endpoint address.
#[derive(Clone)]
pub struct Http1Pool(Arc<PoolInner>);

impl Http1Pool {
    /// An empty pool.
    pub fn new(timeouts: &Timeouts) -> Self {
        let builder = hyper::client::conn::http1::Builder::new();
        Http1Pool(Arc::new(PoolInner {
            hosts: Endpoints::default(),
            connect_timeout: timeouts.upstream_connect,
            idle_timeout: timeouts.upstream_idle,
            builder,
        }))
    }

    pub(super) fn host(&self, addr: SocketAddr) -> Arc<Host> {
        self.0.hosts.get(
            addr,
            || Host {
                idle: Mutex::new(Vec::new()),
            },
            || {
                let every = reap_period(self.0.idle_timeout);
                tokio::spawn(reap(Arc::downgrade(&self.0), every));
            },
        )
    }

    pub(super) async fn connect(&self, addr: SocketAddr) -> Result<Conn, SendError> {
        let tcp = connect_tcp(addr, self.0.connect_timeout)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        let (sender, driver) = self
            .0
            .builder
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        Ok(Conn {
            sender,
            io: Some(ConnIo {
                driver: Box::pin(driver.with_upgrades()),
                timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            }),
        })
    }

    /// Sends one attempt of `out` to `addr` on a pooled connection (or a new one), driving the
    /// connection in this task until the response head arrives or `timeout` passes. With
    /// `keep_headers`, `out` keeps its headers for another attempt; without, they move into the
    /// request (no copy) and come back only if the request was never written.
    pub async fn send(
        &self,
        addr: SocketAddr,
        out: &mut Outgoing,
        body: RequestBody,
        timeout: Duration,
        keep_headers: bool,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let host = self.host(addr);
        let mut req = None;
        let mut body = Some(body);
        let mut tries = 0;
        loop {
            tries += 1;
            let pooled = if tries <= STALE_TRIES {
                host.checkout()
            } else {
                None
            };
            let fresh = pooled.is_none();
            let mut conn = match pooled {
                Some(c) => c,
                None => match self.connect(addr).await {
                    Ok(c) => c,
                    Err(e) => {
                        if let Some(r) = req.take() {
                            out.restore(r);
                        }
                        return Err(e);
                    }
                },
            };
            let r = req.take().unwrap_or_else(|| {
                out.origin_request(body.take().expect("one body per send"), keep_headers)
            });
            if let Some(io) = conn.io.as_mut() {
                io.timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + timeout);
            }
            let mut answer = std::pin::pin!(conn.sender.try_send_request(r));
            let outcome = std::future::poll_fn(|cx| {
                conn.drive(cx);
                if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                    return Poll::Ready(Outcome::Answer(r));
                }
                match conn.io.as_mut() {
                    // Finished, and hyper's state (dropped) answered nothing: cannot happen,
                    // but a request must never hang on it.
                    None => Poll::Ready(Outcome::Ended),
                    Some(io) => match io.timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Outcome::TimedOut),
                        Poll::Pending => Poll::Pending,
                    },
                }
            })
            .await;
            match outcome {
                Outcome::Answer(Ok(resp)) => return Ok((resp, Lease { conn, host })),
                Outcome::Answer(Err(mut e)) => {
                    if let Some(r) = e.take_message() {
                        // Never written: the connection closed or was not ready after all.
                        if fresh {
                            out.restore(r);
                            return Err(SendError::Failed(e.into_error().into()));
                        }
                        req = Some(r);
                        continue;
                    }
                    return Err(SendError::Failed(e.into_error().into()));
                }
                Outcome::TimedOut => return Err(SendError::Timeout),
                Outcome::Ended => {
                    return Err(SendError::Failed(
                        "the backend connection ended without an answer".into(),
                    ))
                }
            }
        }
    }
}

/// How waiting for a response head ended (short-lived, on the stack: its size does not matter).
#[allow(clippy::large_enum_variant)]
pub(super) enum Outcome {
    Answer(Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<RequestBody>>>),
    TimedOut,
    Ended,
}

/// Drops idle connections past the idle timeout and those their backend closed, every `every`,
/// until the pool is gone.
pub(super) async fn reap(pool: std::sync::Weak<PoolInner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = std::time::Instant::now();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        pool.hosts.prune(|host| {
            let mut idle = host.idle.lock();
            idle.retain_mut(|i| {
                now.duration_since(i.since) < pool.idle_timeout && i.conn.ready(&mut cx)
            });
            !idle.is_empty()
        });
    }
}
