//! Gate tests on tokio's paused clock.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use super::*;
use crate::error::ProxyError;
use crate::telemetry::metrics::Metrics;

fn gate(capacity: usize, concurrency: Option<usize>) -> Arc<Gate> {
    gate_with_limit(capacity, concurrency, HeldLimit::new(1000))
}

fn gate_with_limit(
    capacity: usize,
    concurrency: Option<usize>,
    held_limit: Arc<HeldLimit>,
) -> Arc<Gate> {
    Gate::new(
        "svc",
        GateSettings {
            capacity,
            hold_timeout: Duration::from_secs(5),
            concurrency,
            protocol: Protocol::Http1,
            upstream: None,
            held_limit,
            upgrades: GateSettings::default_upgrades(),
        },
        Metrics::new().service("svc"),
    )
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[tokio::test(start_paused = true)]
async fn warm_path_takes_a_permit_without_holding() {
    let g = gate(10, None);
    g.set_endpoints(&[addr(1)]);
    let a = g.acquire(deadline()).await.unwrap();
    assert!(a.held_for.is_none());
    assert!(!a.cold);
    assert_eq!(g.in_flight(), 1);
    drop(a);
    assert_eq!(g.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn held_requests_drain_in_arrival_order_within_the_limit() {
    let g = gate(100, Some(1));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..5 {
        let g = g.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let a = g.acquire(deadline()).await.unwrap();
            assert!(a.cold);
            tx.send((i, a.permit)).unwrap();
        });
        tokio::task::yield_now().await;
    }
    assert_eq!(g.held(), 5);
    g.set_endpoints(&[addr(1)]);
    for want in 0..5 {
        let (i, permit) = rx.recv().await.unwrap();
        assert_eq!(i, want);
        // Only one in flight at a time: the next waits for this permit.
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err());
        assert_eq!(g.in_flight(), 1);
        drop(permit);
    }
    assert_eq!(g.held(), 0);
}

#[tokio::test(start_paused = true)]
async fn full_queue_rejects_at_once() {
    let g = gate(2, None);
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            g.acquire(deadline()).await.map(|_| ())
        }));
    }
    tokio::task::yield_now().await;
    assert_eq!(g.held(), 2);
    let e = g.acquire(deadline()).await.err().unwrap();
    assert_eq!(e.kind(), "queue_full");
    g.set_endpoints(&[addr(1)]);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn deadline_gives_hold_timeout_and_frees_the_slot() {
    let g = gate(1, None);
    let e = g
        .acquire(Instant::now() + Duration::from_millis(300))
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), "hold_timeout");
    assert_eq!(g.held(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_leaves_the_queue_at_once() {
    let g = gate(1, None);
    let g2 = g.clone();
    let t = tokio::spawn(async move { g2.acquire(deadline()).await.map(|_| ()) });
    tokio::task::yield_now().await;
    assert_eq!(g.held(), 1);
    t.abort();
    let _ = t.await;
    assert_eq!(g.held(), 0);
    // The slot is free again.
    let g3 = g.clone();
    let t = tokio::spawn(async move { g3.acquire(deadline()).await.map(|_| ()) });
    tokio::task::yield_now().await;
    assert_eq!(g.held(), 1);
    g.set_endpoints(&[addr(1)]);
    t.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn fail_held_answers_every_waiter() {
    let g = gate(10, None);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            g.acquire(deadline()).await.map(|_| ())
        }));
    }
    tokio::task::yield_now().await;
    g.fail_held(ProxyError::ActivationFailed {
        service: "svc".into(),
        reason: "boom".into(),
    });
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap_err().kind(), "activation_failed");
    }
}

#[tokio::test(start_paused = true)]
async fn demand_and_idle_signals() {
    let g = gate(10, None);
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.acquire(deadline()).await.map(|a| a.permit) });
    tokio::time::timeout(Duration::from_secs(1), g.wait_for_demand())
        .await
        .expect("demand signalled");
    g.set_endpoints(&[addr(1)]);
    let permit = waiter.await.unwrap().unwrap();
    // Not idle while in flight.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), g.wait_idle(Duration::from_secs(1)))
            .await
            .is_err()
    );
    drop(permit);
    let t0 = Instant::now();
    g.wait_idle(Duration::from_secs(2)).await;
    assert!(t0.elapsed() >= Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn p2c_spreads_over_endpoints_within_limits() {
    let g = gate(100, Some(2));
    g.set_endpoints(&[addr(1), addr(2), addr(3)]);
    let mut permits = Vec::new();
    for _ in 0..6 {
        permits.push(g.acquire(deadline()).await.unwrap().permit);
    }
    for ep in g.endpoints().iter() {
        assert_eq!(ep.in_flight(), 2, "{}", ep.addr);
    }
    // The seventh must wait.
    let g2 = g.clone();
    let t = tokio::spawn(async move { g2.acquire(deadline()).await.map(|a| a.permit) });
    tokio::task::yield_now().await;
    assert_eq!(g.held(), 1);
    permits.pop();
    let p = t.await.unwrap().unwrap();
    assert_eq!(p.endpoint().in_flight(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_global_held_limit_spans_gates() {
    let limit = HeldLimit::new(3);
    let a = gate_with_limit(10, None, limit.clone());
    let b = gate_with_limit(10, None, limit.clone());
    let mut tasks = Vec::new();
    for g in [&a, &a, &b] {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            g.acquire(deadline()).await.map(|_| ())
        }));
    }
    tokio::task::yield_now().await;
    assert_eq!(limit.held(), 3);
    assert_eq!(
        b.acquire(deadline()).await.err().unwrap().kind(),
        "held_limit"
    );
    a.set_endpoints(&[addr(1)]);
    tokio::task::yield_now().await;
    assert_eq!(limit.held(), 1);
    b.fail_held(ProxyError::ShuttingDown {
        service: "svc".into(),
    });
    assert_eq!(limit.held(), 0);
    for t in tasks {
        let _ = t.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn an_ejected_endpoint_is_skipped_until_its_time_is_up() {
    let g = gate(100, None);
    g.set_endpoints(&[addr(1), addr(2)]);
    let bad = g.endpoints()[0].clone();
    g.eject(&bad, Duration::from_secs(1));
    let mut permits = Vec::new();
    for _ in 0..20 {
        permits.push(g.acquire(deadline()).await.unwrap().permit);
    }
    assert!(permits.iter().all(|p| p.endpoint().addr == addr(2)));
    drop(permits);
    tokio::time::advance(Duration::from_millis(1001)).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        seen.insert(g.acquire(deadline()).await.unwrap().permit.endpoint().addr);
    }
    assert_eq!(seen.len(), 2, "both endpoints in use again");
}

#[tokio::test(start_paused = true)]
async fn held_changes_fire_the_event_source() {
    let g = gate(10, None);
    let mut rx = g.subscribe_held();
    assert_eq!(*rx.borrow_and_update(), 0);
    let g2 = g.clone();
    let t = tokio::spawn(async move { g2.acquire(deadline()).await.map(|a| a.permit) });
    tokio::time::timeout(Duration::from_secs(1), rx.changed())
        .await
        .expect("held event")
        .unwrap();
    assert_eq!(*rx.borrow_and_update(), 1);
    assert_eq!(g.holds_total(), 1);
    g.set_endpoints(&[addr(1)]);
    let permit = t.await.unwrap().unwrap();
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), 0);
    // The warm path (a free endpoint, nothing held) does not touch the event source.
    drop(permit);
    let _warm = g.acquire(deadline()).await.unwrap();
    assert!(!rx.has_changed().unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_switch_holds_new_requests_until_the_old_ones_finish() {
    let g = gate(100, None);
    g.set_endpoints(&[addr(1)]);
    let old = g.acquire(deadline()).await.unwrap();
    let switch = {
        let g = g.clone();
        tokio::spawn(async move { g.switch_endpoints(&[addr(2)], Duration::from_secs(3)).await })
    };
    tokio::task::yield_now().await;
    // A request arriving mid-switch is held, not sent to the old endpoint.
    let newer = {
        let g = g.clone();
        tokio::spawn(async move {
            g.acquire(deadline())
                .await
                .map(|a| a.permit.endpoint().addr)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(g.held(), 1, "held while the old request is in flight");
    assert!(!newer.is_finished());
    drop(old);
    assert!(switch.await.unwrap(), "drained within quiesce");
    assert_eq!(newer.await.unwrap().unwrap(), addr(2));
    let a = g.acquire(deadline()).await.unwrap();
    assert_eq!(a.permit.endpoint().addr, addr(2));
}

#[tokio::test(start_paused = true)]
async fn a_switch_waits_no_longer_than_quiesce() {
    let g = gate(100, None);
    g.set_endpoints(&[addr(1)]);
    let _stuck = g.acquire(deadline()).await.unwrap();
    let started = Instant::now();
    let drained = g.switch_endpoints(&[addr(2)], Duration::from_secs(2)).await;
    assert!(!drained);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    let a = g.acquire(deadline()).await.unwrap();
    assert_eq!(a.permit.endpoint().addr, addr(2));
}

#[tokio::test(start_paused = true)]
async fn rolling_out_wakes_held_watchers() {
    let g = gate(10, None);
    let mut rx = g.subscribe_held();
    rx.borrow_and_update();
    g.set_rolling_out(true);
    assert!(g.rolling_out());
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();
    g.set_rolling_out(true);
    assert!(!rx.has_changed().unwrap(), "no change, no wake-up");
}

#[tokio::test(start_paused = true)]
async fn an_aborted_switch_does_not_leave_the_gate_paused() {
    let g = gate(100, None);
    g.set_endpoints(&[addr(1)]);
    let _stuck = g.acquire(deadline()).await.unwrap();
    let switch = {
        let g = g.clone();
        tokio::spawn(async move {
            g.switch_endpoints(&[addr(2)], Duration::from_secs(60))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let held = {
        let g = g.clone();
        tokio::spawn(async move {
            g.acquire(deadline())
                .await
                .map(|a| a.permit.endpoint().addr)
        })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(g.held(), 1);
    switch.abort();
    let _ = switch.await;
    // The pause ends with the switch; the old endpoints stay (the switch never finished).
    assert_eq!(held.await.unwrap().unwrap(), addr(1));
}

/// What a switch installs is decided after the old requests are done and before any held
/// request goes: a withdrawal meanwhile (a scale-down) keeps them held rather than sent to
/// pods being stopped.
#[tokio::test(start_paused = true)]
async fn a_switch_decides_its_endpoints_before_releasing_the_held() {
    let g = gate(100, None);
    g.set_endpoints(&[addr(1)]);
    let old = g.acquire(deadline()).await.unwrap();
    let withdrawn = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let switch = {
        let (g, withdrawn) = (g.clone(), withdrawn.clone());
        tokio::spawn(async move {
            let install = || {
                let to: &[SocketAddr] = if withdrawn.load(Ordering::SeqCst) {
                    &[]
                } else {
                    &[addr(2)]
                };
                g.set_endpoints(to);
            };
            g.switch_with(Duration::from_secs(3), install).await
        })
    };
    tokio::task::yield_now().await;
    let held = {
        let g = g.clone();
        tokio::spawn(async move {
            g.acquire(deadline())
                .await
                .map(|a| a.permit.endpoint().addr)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    withdrawn.store(true, Ordering::SeqCst);
    drop(old);
    assert!(switch.await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "not sent to the withdrawn version");
    assert_eq!(g.held(), 1);
}
