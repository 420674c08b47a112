//! How fast KEDA hears of demand: the time from a request sent to Reveille (in-process,
//! `reveille::start`) to the `true` it pushes on an open `StreamIsActive` stream, received by a
//! gRPC client over loopback. This is the figure `tests/keda.rs` bounds only loosely (a CI
//! machine's timing is no benchmark): the push must come on the held event, long before
//! KEDA's 30 s polling interval would have asked.
//!
//! The service's backend is a process that never listens (`sleep`), so every request is held;
//! the hold times out after 1 ms (answered 504, awaited but not measured) before the next
//! request, so holds never overlap. The stream's periodic state is hourly: every `true` received is
//! the push of a new hold (one per hold; a release pushes nothing).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use reveille::keda::proto::external_scaler_client::ExternalScalerClient;
use reveille::keda::proto::{IsActiveResponse, ScaledObjectRef};
use reveille::Config;
use tokio::sync::Mutex;
use tonic::Streaming;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn setup() -> (reveille::Running, Streaming<IsActiveResponse>) {
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nkeda: {{ listen: 127.0.0.1:0, stream_interval: 1h }}\nservices:\n  - name: bench\n    hosts: [\"127.0.0.1\"]\n    backend:\n      process:\n        command: [sleep, \"3600\"]\n        address: 127.0.0.1:{}\n        start_timeout: 1h\n        start_attempts: 1\n        stop_grace: 1s\n    queue: {{ capacity: 100000, timeout: 1ms }}\n",
        free_port()
    );
    let running = reveille::start(Config::parse(&yaml).expect("bench config"))
        .await
        .expect("reveille starts");
    let keda = running.keda_addr.expect("keda listener");
    let http = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut grpc = ExternalScalerClient::with_origin(
        http,
        format!("http://{keda}").parse().expect("keda uri"),
    );
    let mut stream = grpc
        .stream_is_active(ScaledObjectRef {
            name: "bench".into(),
            namespace: "default".into(),
            scaler_metadata: HashMap::new(),
        })
        .await
        .expect("stream opened")
        .into_inner();
    // The state at once (nothing held yet).
    let first = stream
        .message()
        .await
        .expect("stream")
        .expect("first message");
    assert!(!first.result, "nothing held yet");
    (running, stream)
}

/// Sends one request (answered 504 after the hold timeout, in the background) and waits for
/// the push it causes; the time between the two.
async fn held_to_push(
    client: &HttpClient,
    proxy: SocketAddr,
    stream: &mut Streaming<IsActiveResponse>,
) -> Duration {
    let req = Request::get(format!("http://{proxy}/cold"))
        .body(Empty::new())
        .expect("request");
    let sent = Instant::now();
    let answered = tokio::spawn(client.request(req));
    let pushed = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a push within 10 s")
        .expect("stream")
        .expect("stream open");
    let took = sent.elapsed();
    assert!(pushed.result, "the push says active");
    // Not timed: the hold ends (504) before the next request, so holds never overlap (two
    // holds between two looks of the stream's task would be one push).
    let resp = answered.await.expect("task").expect("response");
    assert_eq!(resp.status(), 504, "held, then timed out");
    took
}

fn keda(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (running, stream) = rt.block_on(setup());
    let stream = Arc::new(Mutex::new(stream));
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let proxy = running.proxy_addr;

    let mut g = c.benchmark_group("keda");
    g.bench_function("held_request_to_stream_push", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (client, stream) = (client.clone(), stream.clone());
            async move {
                let mut stream = stream.lock().await;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += held_to_push(&client, proxy, &mut stream).await;
                }
                total
            }
        })
    });
    g.finish();
    running.shutdown();
    // The timer is made inside the runtime (a `Sleep` needs its reactor).
    let _ =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), running.wait()).await });
}

criterion_group!(benches, keda);
criterion_main!(benches);
