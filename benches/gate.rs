//! The gate's hot paths: a warm permit (no hold), the hold queue's enqueue and dequeue (a
//! request that joins the queue and leaves it), and the wake-up of held waiters, drained either
//! by endpoints becoming ready (`set_endpoints`, a cold start) or one by one by permits being
//! released under a per-endpoint limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::FutureExt;
use reveille::config::Protocol;
use reveille::gate::{Gate, GateSettings, HeldLimit};
use reveille::telemetry::metrics::Metrics;
use tokio::runtime::Runtime;
use tokio::time::Instant;

fn gate(concurrency: Option<usize>) -> Arc<Gate> {
    Gate::new(
        "bench",
        GateSettings {
            capacity: 100_000,
            hold_timeout: Duration::from_secs(60),
            concurrency,
            protocol: Protocol::Http1,
            upstream: None,
            held_limit: HeldLimit::new(1_000_000),
            upgrades: GateSettings::default_upgrades(),
        },
        Metrics::new().service("bench"),
    )
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn warm(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("gate_warm");
    for endpoints in [1u16, 8] {
        let gt = gate(Some(1000));
        let addrs: Vec<_> = (1..=endpoints).map(addr).collect();
        gt.set_endpoints(&addrs);
        g.bench_with_input(
            BenchmarkId::new("acquire_release", endpoints),
            &gt,
            |b, gt| {
                b.to_async(&rt).iter(|| async {
                    let a = gt.acquire(deadline()).await.expect("warm permit");
                    drop(a);
                })
            },
        );
    }
    g.finish();
}

fn hold_queue(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("gate_hold");
    // A request joins the queue of a cold gate (one poll), then leaves it (client gone).
    let cold = gate(None);
    g.bench_function("enqueue_then_cancel", |b| {
        b.to_async(&rt).iter(|| async {
            let r = cold.acquire(deadline()).now_or_never();
            assert!(r.is_none(), "a cold gate holds");
        })
    });
    drop(cold);

    // N held waiters, then endpoints become ready: every waiter gets its permit.
    for n in [1usize, 100, 1000] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("wake_on_set_endpoints", n), &n, |b, &n| {
            b.to_async(&rt).iter(|| async move {
                let gt = gate(None);
                let waiters: Vec<_> = (0..n)
                    .map(|_| {
                        let gt = gt.clone();
                        tokio::spawn(async move { gt.acquire(deadline()).await.map(|_| ()) })
                    })
                    .collect();
                while gt.held() < n {
                    tokio::task::yield_now().await;
                }
                gt.set_endpoints(&[addr(1)]);
                for w in waiters {
                    w.await.expect("task").expect("permit");
                }
            })
        });
    }

    // N held waiters drained one at a time: each released permit hands the slot to the next.
    for n in [100usize, 1000] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(
            BenchmarkId::new("drain_by_release_limit1", n),
            &n,
            |b, &n| {
                b.to_async(&rt).iter(|| async move {
                    let gt = gate(Some(1));
                    let waiters: Vec<_> = (0..n)
                        .map(|_| {
                            let gt = gt.clone();
                            tokio::spawn(async move { gt.acquire(deadline()).await.map(drop) })
                        })
                        .collect();
                    while gt.held() < n {
                        tokio::task::yield_now().await;
                    }
                    gt.set_endpoints(&[addr(1)]);
                    for w in waiters {
                        w.await.expect("task").expect("permit");
                    }
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, warm, hold_queue);
criterion_main!(benches);
