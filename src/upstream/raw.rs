//! Idle HTTP/1.1 connections to backends for the fast path: plain TCP streams, by endpoint
//! address, most recently used first, a bounded number per endpoint. Nothing runs per
//! connection: a connection is checked when it is taken (no system call unless the socket is
//! readable, which an idle connection is only when its backend closed it or broke the
//! protocol), and a reaper drops the ones idle too long or closed. Ages are counted in reaper
//! ticks, so parking a connection reads no clock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::upstream::{connect_tcp, reap_period, Endpoints};

struct Idle {
    stream: TcpStream,
    tick: u64,
}

/// The idle connections to one endpoint address.
pub struct Host {
    idle: Mutex<Vec<Idle>>,
    pool: Weak<Inner>,
}

impl Host {
    /// The most recently used idle connection that is still open.
    pub fn checkout(&self) -> Option<TcpStream> {
        loop {
            let idle = self.idle.lock().pop()?;
            if usable(&idle.stream) {
                return Some(idle.stream);
            }
        }
    }

    /// Parks a connection whose last response ended cleanly.
    pub fn put(&self, stream: TcpStream) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let tick = pool.tick.load(Ordering::Relaxed);
        let mut idle = self.idle.lock();
        if idle.len() < super::MAX_IDLE_PER_ENDPOINT {
            idle.push(Idle { stream, tick });
        }
    }
}

/// Whether an idle connection can take a request: not readable (nothing arrived since its last
/// response), or readable but with nothing to read yet. Readable with bytes or an end means
/// the backend closed it or sent something unasked: not usable.
fn usable(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

struct Inner {
    hosts: Endpoints<Host>,
    /// Reaper ticks so far: the pool's clock.
    tick: AtomicU64,
    /// Ticks an idle connection may wait.
    max_idle_ticks: u64,
    every: Duration,
    connect_timeout: Duration,
}

/// The fast path's pool of cleartext HTTP/1.1 connections, by endpoint address.
#[derive(Clone)]
pub struct RawPool(Arc<Inner>);

impl RawPool {
    /// An empty pool: connections wait idle at most `idle_timeout` (rounded to the reaper's
    /// period, a quarter of it within 100 ms..5 s), connecting gives up after `connect_timeout`.
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        let every = reap_period(idle_timeout);
        let max_idle_ticks = (idle_timeout.as_nanos() / every.as_nanos().max(1)).max(1) as u64;
        RawPool(Arc::new(Inner {
            hosts: Endpoints::default(),
            tick: AtomicU64::new(0),
            max_idle_ticks,
            every,
            connect_timeout,
        }))
    }

    /// The idle list of `addr` (made on first use).
    pub fn host(&self, addr: SocketAddr) -> Arc<Host> {
        self.0.hosts.get(
            addr,
            || Host {
                idle: Mutex::new(Vec::new()),
                pool: Arc::downgrade(&self.0),
            },
            || {
                tokio::spawn(reap(Arc::downgrade(&self.0)));
            },
        )
    }

    /// A new connection to `addr`, bounded by the connect timeout.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        connect_tcp(addr, self.0.connect_timeout).await
    }

    /// Idle connections to `addr` now.
    #[cfg(test)]
    fn idle(&self, addr: SocketAddr) -> usize {
        self.0.hosts.peek(addr).map_or(0, |h| h.idle.lock().len())
    }
}

/// Every tick: advances the pool's clock, drops idle connections past the idle timeout and
/// those their backend closed, and forgets endpoints nobody uses.
async fn reap(pool: Weak<Inner>) {
    let Some(every) = pool.upgrade().map(|p| p.every) else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = pool.tick.fetch_add(1, Ordering::Relaxed) + 1;
        pool.hosts.prune(|host| {
            let mut idle = host.idle.lock();
            idle.retain(|i| now - i.tick <= pool.max_idle_ticks && usable(&i.stream));
            !idle.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_not_handed_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = RawPool::new(Duration::from_secs(1), Duration::from_secs(60));
        let host = pool.host(addr);
        let (a, accepted) = tokio::join!(pool.connect(addr), listener.accept());
        let mut backend_a = accepted.unwrap().0;
        let (b, accepted) = tokio::join!(pool.connect(addr), listener.accept());
        let backend_b = accepted.unwrap().0;
        host.put(a.unwrap());
        host.put(b.unwrap());
        assert_eq!(pool.idle(addr), 2);
        // b (the most recent) is closed by its backend, a gets bytes nobody asked for.
        drop(backend_b);
        backend_a.write_all(b"junk").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(host.checkout().is_none());
        assert_eq!(pool.idle(addr), 0);

        let (c, _backend_c) = tokio::join!(pool.connect(addr), listener.accept());
        host.put(c.unwrap());
        assert!(
            host.checkout().is_some(),
            "an open, quiet connection is reused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_dropped_after_the_idle_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = RawPool::new(Duration::from_secs(1), Duration::from_secs(2));
        let host = pool.host(addr);
        let (a, _backend) = tokio::join!(pool.connect(addr), listener.accept());
        host.put(a.unwrap());
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert_eq!(pool.idle(addr), 1, "younger than the idle timeout");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(pool.idle(addr), 0, "older than the idle timeout");
    }
}
