//! Balancing and ejection: the service's ready endpoints, each with its in-flight count, and
//! the pick of one with a free slot (power of two choices on in-flight count), skipping
//! endpoints ejected for a moment after a failed connect.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use super::Gate;

/// A backend address with its in-flight count.
#[derive(Debug)]
pub struct Endpoint {
    /// Where requests go.
    pub addr: SocketAddr,
    /// `host:port` for the upstream request URI.
    pub authority: http::uri::Authority,
    in_flight: AtomicUsize,
    /// Gate-epoch milliseconds until which the endpoint is skipped (0: never ejected).
    ejected_until: AtomicU64,
}

impl Endpoint {
    pub(super) fn new(addr: SocketAddr) -> Self {
        let authority = addr
            .to_string()
            .parse()
            .expect("a socket address is a valid authority");
        Endpoint {
            addr,
            authority,
            in_flight: AtomicUsize::new(0),
            ejected_until: AtomicU64::new(0),
        }
    }

    /// Requests in flight to this endpoint.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Takes a slot if `limit` allows (always without a limit).
    pub(super) fn try_take(&self, limit: Option<usize>) -> bool {
        match limit {
            None => {
                self.in_flight.fetch_add(1, Ordering::SeqCst);
                true
            }
            Some(limit) => self
                .in_flight
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok(),
        }
    }

    /// Gives a slot back.
    pub(super) fn give_back(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The shared empty endpoint list (a gate without endpoints allocates none of its own).
fn no_endpoints() -> Arc<Vec<Arc<Endpoint>>> {
    static EMPTY: OnceLock<Arc<Vec<Arc<Endpoint>>>> = OnceLock::new();
    EMPTY.get_or_init(|| Arc::new(Vec::new())).clone()
}

/// A gate's endpoints and ejections.
pub(super) struct Balancer {
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// The latest ejection deadline of any endpoint (0: none), so `pick` reads no clock
    /// while nothing is ejected.
    ejections_until: AtomicU64,
    /// What ejection deadlines count from.
    epoch: Instant,
}

impl Balancer {
    pub(super) fn new(epoch: Instant) -> Self {
        Balancer {
            endpoints: ArcSwap::new(no_endpoints()),
            ejections_until: AtomicU64::new(0),
            epoch,
        }
    }

    /// The ready endpoints now.
    pub(super) fn load(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Whether no endpoint is ready.
    pub(super) fn is_empty(&self) -> bool {
        self.endpoints.load().is_empty()
    }

    /// Makes `addrs` the endpoints, keeping those (and their in-flight counts) that stay.
    /// Returns how many there are now.
    pub(super) fn replace(&self, addrs: &[SocketAddr]) -> usize {
        let old = self.endpoints.load();
        let new: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|a| {
                old.iter()
                    .find(|e| e.addr == *a)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(*a)))
            })
            .collect();
        let n = new.len();
        self.endpoints.store(if new.is_empty() {
            no_endpoints()
        } else {
            Arc::new(new)
        });
        n
    }

    /// Picks an endpoint with a free slot and takes the slot: power of two choices on in-flight
    /// count, then (with a limit) a scan so a free slot is never missed.
    pub(super) fn pick(&self, limit: Option<usize>) -> Option<Arc<Endpoint>> {
        let eps = self.endpoints.load();
        let n = eps.len();
        if n <= 1 {
            return eps.first().filter(|e| e.try_take(limit)).cloned();
        }
        let now = self.ejection_clock();
        let usable =
            |e: &Endpoint| now.is_none_or(|t| e.ejected_until.load(Ordering::Relaxed) <= t);
        let r = fast_rand();
        let a = (r % n as u64) as usize;
        let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
        if b >= a {
            b += 1;
        }
        let (first, second) = if eps[a].in_flight() <= eps[b].in_flight() {
            (a, b)
        } else {
            (b, a)
        };
        for i in [first, second] {
            if usable(&eps[i]) && eps[i].try_take(limit) {
                return Some(eps[i].clone());
            }
        }
        if limit.is_none() && now.is_none() {
            return None;
        }
        // A free, healthy slot anywhere; failing that, a recently failed endpoint rather than
        // nothing (it may be back, and a held request is better tried than starved).
        let ring = (0..n).map(|k| &eps[(a + k) % n]);
        ring.clone()
            .find(|e| usable(e) && e.try_take(limit))
            .or_else(|| ring.clone().find(|e| e.try_take(limit)))
            .cloned()
    }

    /// Milliseconds since the epoch while some endpoint is ejected; `None` (and no clock
    /// read) otherwise.
    fn ejection_clock(&self) -> Option<u64> {
        let until = self.ejections_until.load(Ordering::Relaxed);
        if until == 0 {
            return None;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        if now >= until {
            let _ = self.ejections_until.compare_exchange(
                until,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return None;
        }
        Some(now)
    }

    fn eject(&self, endpoint: &Endpoint, for_: Duration) {
        let until = (self.epoch.elapsed() + for_).as_millis() as u64;
        endpoint.ejected_until.store(until, Ordering::Relaxed);
        self.ejections_until.fetch_max(until, Ordering::Relaxed);
    }
}

impl Gate {
    /// The ready endpoints now.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.balance.load()
    }

    /// Keeps `endpoint` out of the balancer for a moment after a failed connect, so retries and
    /// the next requests go elsewhere (unless nothing else is left).
    pub fn eject(&self, endpoint: &Endpoint, for_: Duration) {
        self.balance.eject(endpoint, for_);
    }

    /// Replaces the ready endpoints (keeping in-flight counts of addresses that stay) and
    /// drains held requests onto them.
    pub fn set_endpoints(self: &Arc<Self>, addrs: &[SocketAddr]) {
        let n = self.balance.replace(addrs);
        self.metrics.ready_endpoints.set(n as i64);
        self.readiness_moved();
        self.dispatch();
    }
}

/// A cheap per-thread xorshift; balancing needs spread, not cryptographic randomness.
fn fast_rand() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(&h as *const _ as usize);
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}
