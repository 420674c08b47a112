//! The hold queue and the permits: a request takes a [`Permit`] (an endpoint slot) at once
//! when the service is ready and nobody is held, else joins the bounded FIFO queue and waits
//! for a permit, its hold deadline, or an activation failure. A released permit, or endpoints
//! becoming ready, drains the queue in arrival order, no faster than the endpoints' limits
//! allow.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Endpoint, Gate};
use crate::error::ProxyError;

/// A bound on held requests shared by every gate (a memory bound).
#[derive(Debug)]
pub struct HeldLimit {
    max: usize,
    held: AtomicUsize,
}

impl HeldLimit {
    /// At most `max` requests held across the gates sharing it.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(HeldLimit {
            max,
            held: AtomicUsize::new(0),
        })
    }

    /// Requests held now, all gates together.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

type Grant = Result<Permit, ProxyError>;

/// A gate's held requests and its counts of requests.
pub(super) struct Queue {
    line: Mutex<Line>,
    held: AtomicUsize,
    in_flight: AtomicUsize,
    requests_total: AtomicU64,
}

/// The held requests, under the queue lock.
pub(super) struct Line {
    next_id: u64,
    /// Ordered by arrival; removal by id is O(log n) when a client leaves.
    waiters: BTreeMap<u64, Waiter>,
}

struct Waiter {
    tx: oneshot::Sender<Grant>,
    since: Instant,
}

impl Queue {
    pub(super) fn new() -> Self {
        Queue {
            line: Mutex::new(Line {
                next_id: 0,
                waiters: BTreeMap::new(),
            }),
            held: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            requests_total: AtomicU64::new(0),
        }
    }

    /// The queue lock (every change of the held count is made under it).
    pub(super) fn lock(&self) -> MutexGuard<'_, Line> {
        self.line.lock()
    }

    pub(super) fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

/// What a request got from [`Gate::acquire`].
pub struct Acquired {
    /// The endpoint slot; release by dropping.
    pub permit: Permit,
    /// How long the request was held, if it was.
    pub held_for: Option<Duration>,
    /// Whether it was held while the service had no ready endpoint (a cold start).
    pub cold: bool,
}

impl Gate {
    /// Requests held now.
    pub fn held(&self) -> usize {
        self.queue.held()
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.queue.in_flight.load(Ordering::SeqCst)
    }

    /// Requests that arrived since start (monotonic).
    pub fn requests_total(&self) -> u64 {
        self.queue.requests_total.load(Ordering::Relaxed)
    }

    /// Gets an endpoint slot: at once when one is free and nobody is held, else after holding
    /// in the queue until `deadline`.
    pub async fn acquire(self: &Arc<Self>, deadline: Instant) -> Result<Acquired, ProxyError> {
        self.queue.requests_total.fetch_add(1, Ordering::Relaxed);
        self.acquire_again(deadline).await
    }

    /// Like [`Gate::acquire`], for a retry of a request already counted.
    pub async fn acquire_again(
        self: &Arc<Self>,
        deadline: Instant,
    ) -> Result<Acquired, ProxyError> {
        self.activity.touch();
        if self.queue.held() == 0 && !self.switch.paused() {
            if let Some(ep) = self.balance.pick(self.settings.concurrency) {
                let permit = self.permit(ep);
                // A switch that paused meanwhile either sees this request in flight (and waits
                // for it) or this check sees the pause (and the request is held instead).
                if !self.switch.paused() {
                    return Ok(Acquired {
                        permit,
                        held_for: None,
                        cold: false,
                    });
                }
                drop(permit);
            }
        }
        self.hold(deadline).await
    }

    /// Holds the request in the queue until a permit, `deadline`, or a failure.
    async fn hold(self: &Arc<Self>, deadline: Instant) -> Result<Acquired, ProxyError> {
        let since = Instant::now();
        let cold = self.balance.is_empty();
        let (tx, rx) = oneshot::channel();
        let id = self.enqueue(Waiter { tx, since })?;
        if cold {
            self.demanded();
        }
        let mut held = Held {
            gate: self,
            id,
            rx: Some(rx),
        };
        let rx = held.rx.as_mut().expect("set above");
        let grant = match tokio::time::timeout_at(deadline, &mut *rx).await {
            Ok(Ok(grant)) => grant,
            Ok(Err(_)) => Err(ProxyError::ServiceRemoved {
                service: self.name.clone(),
            }),
            // A permit sent at the last instant is still used.
            Err(_) => rx.try_recv().unwrap_or_else(|_| {
                Err(ProxyError::HoldTimeout {
                    service: self.name.clone(),
                    waited: self.settings.hold_timeout,
                })
            }),
        };
        drop(held);
        let held_for = since.elapsed();
        self.metrics.held_for(held_for.as_secs_f64());
        if cold && grant.is_ok() {
            self.activity.wake.first_forwarded(&self.metrics);
        }
        grant.map(|permit| Acquired {
            permit,
            held_for: Some(held_for),
            cold,
        })
    }

    /// Puts `waiter` at the end of the queue (unless the queue or the global bound is full)
    /// and hands out what is free already.
    fn enqueue(self: &Arc<Self>, waiter: Waiter) -> Result<u64, ProxyError> {
        let mut q = self.queue.lock();
        if q.waiters.len() >= self.settings.capacity {
            return Err(ProxyError::QueueFull {
                service: self.name.clone(),
                capacity: self.settings.capacity,
            });
        }
        let limit = &self.settings.held_limit;
        if limit.held() >= limit.max {
            return Err(ProxyError::HeldLimit {
                service: self.name.clone(),
                limit: limit.max,
            });
        }
        let id = q.next_id;
        q.next_id += 1;
        q.waiters.insert(id, waiter);
        self.set_held(q.waiters.len());
        self.dispatch_locked(&mut q);
        Ok(id)
    }

    /// A permit on `endpoint`, whose slot the caller has taken.
    pub(super) fn permit(self: &Arc<Self>, endpoint: Arc<Endpoint>) -> Permit {
        self.queue.in_flight.fetch_add(1, Ordering::SeqCst);
        self.metrics.in_flight.inc();
        Permit {
            gate: self.clone(),
            endpoint: Some(endpoint),
        }
    }

    fn set_held(&self, n: usize) {
        let old = self.queue.held.swap(n, Ordering::SeqCst);
        if old == n {
            return;
        }
        let global = &self.settings.held_limit.held;
        if n > old {
            global.fetch_add(n - old, Ordering::Relaxed);
        } else {
            global.fetch_sub(old - n, Ordering::Relaxed);
        }
        self.metrics.held.set(n as i64);
        self.activity.held_moved(old, n);
    }

    /// Hands free slots to held requests, oldest first.
    pub(super) fn dispatch(self: &Arc<Self>) {
        let mut q = self.queue.lock();
        self.dispatch_locked(&mut q);
    }

    /// [`Gate::dispatch`] under the queue lock.
    fn dispatch_locked(self: &Arc<Self>, q: &mut Line) {
        if self.switch.paused() {
            self.set_held(q.waiters.len());
            return;
        }
        while let Some(entry) = q.waiters.first_entry() {
            if entry.get().tx.is_closed() {
                entry.remove();
                continue;
            }
            let Some(ep) = self.balance.pick(self.settings.concurrency) else {
                break;
            };
            let waiter = entry.remove();
            if let Err(Ok(permit)) = waiter.tx.send(Ok(self.permit(ep))) {
                // The client left between the check and the send: give the slot back without
                // re-entering dispatch (we hold the queue lock).
                permit.release_quietly();
            }
        }
        self.set_held(q.waiters.len());
        if q.waiters.is_empty() {
            self.activity.quieted();
        }
    }

    fn release(self: &Arc<Self>, ep: &Endpoint) {
        ep.give_back();
        let left = self.queue.in_flight.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.in_flight.dec();
        self.activity.touch();
        if self.queue.held() > 0 {
            self.dispatch();
        }
        if left == 0 {
            self.activity.quieted();
        }
    }

    /// Answers every held request with `err` (activation failed, shutting down).
    pub fn fail_held(&self, err: ProxyError) {
        let mut q = self.queue.lock();
        let waiters = std::mem::take(&mut q.waiters);
        self.set_held(0);
        drop(q);
        for (_, w) in waiters {
            let _ = w.tx.send(Err(err.clone()));
        }
        self.activity.quieted();
    }

    /// The arrival time of the oldest held request.
    pub fn oldest_held_since(&self) -> Option<Instant> {
        self.queue.lock().waiters.values().next().map(|w| w.since)
    }
}

/// A held request's place in the queue; leaving (client gone, deadline) removes it at once.
struct Held<'a> {
    gate: &'a Arc<Gate>,
    id: u64,
    rx: Option<oneshot::Receiver<Grant>>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Drop the receiver first: a permit sent into it is released (and may go to the next
        // held request) before we take the queue lock.
        drop(self.rx.take());
        let mut q = self.gate.queue.lock();
        if q.waiters.remove(&self.id).is_some() {
            self.gate.set_held(q.waiters.len());
            if q.waiters.is_empty() {
                self.gate.activity.quieted();
            }
        }
    }
}

/// One request's slot on an endpoint. Dropping it frees the slot and lets the next held
/// request go.
pub struct Permit {
    gate: Arc<Gate>,
    endpoint: Option<Arc<Endpoint>>,
}

impl Permit {
    /// The endpoint this request goes to.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        self.endpoint.as_ref().expect("present until drop")
    }

    /// The gate that granted it.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    fn release_quietly(mut self) {
        if let Some(ep) = self.endpoint.take() {
            ep.give_back();
            self.gate.queue.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.gate.metrics.in_flight.dec();
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(ep) = self.endpoint.take() {
            self.gate.release(&ep);
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("service", &self.gate.name)
            .field("endpoint", &self.endpoint.as_ref().map(|e| e.addr))
            .finish()
    }
}
