//! A fast static HTTP origin for load tests and cold-start measurements: HTTP/1.1 and h2c
//! (prior knowledge) on one port, a fixed small body for every request.
//!
//! With `--stamp`, every answer carries the origin's CLOCK_MONOTONIC readings in nanoseconds:
//! `x-origin-listen-ns` (when the socket started listening) and `x-origin-recv-ns` (when this
//! request's headers were parsed). The wake-up harness (`examples/coldpath.rs`) subtracts the
//! two on the first request after a cold start: that is Reveille's wake-up overhead, from the
//! backend becoming ready to the first held request reaching it.
//!
//! ```sh
//! cargo run --release --example origin -- --listen 127.0.0.1:18000 --threads 1
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use nix::time::{clock_gettime, ClockId};
use tokio::net::TcpListener;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Response body size in bytes.
    #[arg(long, default_value_t = 13)]
    body_bytes: usize,
    /// Wait this long before listening (a slow-starting backend).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    startup_delay: Duration,
    /// Add `x-origin-listen-ns` and `x-origin-recv-ns` (CLOCK_MONOTONIC) to every answer.
    #[arg(long)]
    stamp: bool,
}

/// CLOCK_MONOTONIC in nanoseconds; comparable across processes on one machine.
fn monotonic_ns() -> u64 {
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always there");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: Args) -> std::io::Result<()> {
    tokio::time::sleep(args.startup_delay).await;
    let listener = TcpListener::bind(args.listen).await?;
    let listen_ns = monotonic_ns();
    let body = Bytes::from(
        b"hello, world\n"
            .iter()
            .copied()
            .cycle()
            .take(args.body_bytes)
            .collect::<Vec<u8>>(),
    );
    let listen_hdr = HeaderValue::from(listen_ns);
    let stamp = args.stamp;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                // Out of file descriptors: let a few connections finish.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let listen_hdr = listen_hdr.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<Incoming>| {
                let recv_ns = stamp.then(monotonic_ns);
                let mut resp = Response::new(Full::new(body.clone()));
                if let Some(ns) = recv_ns {
                    let h = resp.headers_mut();
                    h.insert("x-origin-listen-ns", listen_hdr.clone());
                    h.insert("x-origin-recv-ns", HeaderValue::from(ns));
                }
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
