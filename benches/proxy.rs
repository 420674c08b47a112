//! An in-process proxy round trip: a hyper client sends GET through a running Reveille
//! (`reveille::start`, one service with a static backend) to a small hyper origin on loopback,
//! over pooled keep-alive connections, HTTP/1.1 and h2c. The same request sent to the origin
//! directly is the baseline; the difference is what Reveille adds.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use reveille::Config;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

async fn origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("origin address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"hello, world\n",
                    ))))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn setup() -> (SocketAddr, SocketAddr, reveille::Running) {
    let origin = origin().await;
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: bench\n    hosts: [bench.local, \"127.0.0.1\"]\n    backend:\n      static:\n        addresses: [\"{origin}\"]\n"
    );
    let config = Config::parse(&yaml).expect("bench config");
    let running = reveille::start(config).await.expect("reveille starts");
    // The static driver publishes the endpoint from its own task.
    while running.gates()[0].endpoints().is_empty() {
        tokio::task::yield_now().await;
    }
    (origin, running.proxy_addr, running)
}

async fn round_trip(client: &HttpClient, addr: SocketAddr) {
    // Routed by the target's authority (`127.0.0.1`): over HTTP/2 it is `:authority`, and a
    // `Host` naming another host beside it would be refused as ambiguous.
    let req = Request::get(format!("http://{addr}/hello"))
        .body(Empty::new())
        .expect("request");
    let resp = client.request(req).await.expect("response");
    assert!(resp.status().is_success(), "{}", resp.status());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body.len(), 13);
}

fn proxy(c: &mut Criterion) {
    let rt: Runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (origin, proxy, running) = rt.block_on(setup());
    let h1: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let h2: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();

    let mut g = c.benchmark_group("round_trip");
    g.bench_function("http1_direct", |b| {
        b.to_async(&rt).iter(|| round_trip(&h1, origin))
    });
    g.bench_function("http1_via_reveille", |b| {
        b.to_async(&rt).iter(|| round_trip(&h1, proxy))
    });
    g.bench_function("h2c_direct", |b| {
        b.to_async(&rt).iter(|| round_trip(&h2, origin))
    });
    g.bench_function("h2c_via_reveille", |b| {
        b.to_async(&rt).iter(|| round_trip(&h2, proxy))
    });
    g.finish();
    running.shutdown();
}

criterion_group!(benches, proxy);
criterion_main!(benches);
