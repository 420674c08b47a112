//! Route lookup among 10,000 services: exact hosts (with and without a port, mixed case), path
//! prefixes on a shared host, wildcards, and misses. Also the cost of building such a table,
//! which a reload pays once.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use reveille::route::router::Router;

const SERVICES: usize = 10_000;

/// 10,000 services: 9,000 exact hosts, 900 path prefixes under one shared host, 100 wildcards.
fn table() -> Router<usize> {
    let mut r = Router::new();
    for i in 0..SERVICES {
        match i % 100 {
            0..=89 => r.insert(&format!("svc-{i}.team-{}.example.com", i % 37), None, i),
            90..=98 => r.insert("api.example.com", Some(&format!("/v{i}")), i),
            _ => r.insert(&format!("*.tenant-{i}.example.net"), None, i),
        }
    }
    r
}

fn lookups(c: &mut Criterion) {
    let r = table();
    assert_eq!(r.lookup("svc-4242.team-24.example.com", "/"), Some(&4242));
    assert_eq!(r.lookup("api.example.com", "/v4290/x"), Some(&4290));
    assert_eq!(r.lookup("a.b.tenant-4299.example.net", "/"), Some(&4299));
    let mut g = c.benchmark_group("router_10k");
    g.bench_function("exact_host", |b| {
        b.iter(|| r.lookup(black_box("svc-4242.team-24.example.com"), black_box("/")))
    });
    g.bench_function("exact_host_with_port_mixed_case", |b| {
        b.iter(|| {
            r.lookup(
                black_box("Svc-4242.Team-24.example.com:8080"),
                black_box("/"),
            )
        })
    });
    g.bench_function("path_prefix_among_900", |b| {
        b.iter(|| r.lookup(black_box("api.example.com"), black_box("/v4290/items/7")))
    });
    g.bench_function("wildcard", |b| {
        b.iter(|| r.lookup(black_box("a.b.tenant-4299.example.net"), black_box("/")))
    });
    g.bench_function("miss", |b| {
        b.iter(|| r.lookup(black_box("nobody.example.org"), black_box("/")))
    });
    g.finish();

    let mut g = c.benchmark_group("router_build");
    g.sample_size(10);
    g.bench_function("10k_services", |b| b.iter(table));
    g.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
