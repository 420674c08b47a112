//! Large bodies stream through Reveille with backpressure: its memory stays small and fixed
//! whatever the size. Reveille runs as its own process so its peak RSS (VmHWM) is its alone.
//! `STREAM_MIB` sets the size each way (default 256; `loadtests` use 1024).

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 64 * 1024;

fn mib() -> u64 {
    std::env::var("STREAM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// A body of `total` bytes made on the fly, chunk by chunk (never held whole).
fn generated(
    total: u64,
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>>> {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let n = total / CHUNK as u64;
    StreamBody::new(futures_util::stream::iter(
        (0..n).map(move |_| Ok(Frame::data(chunk.clone()))),
    ))
}

/// A backend: `/upload` counts the request body's bytes; `/download?bytes=N` streams N bytes.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = if req.uri().path() == "/upload" {
                        let mut body = req.into_body();
                        let mut n: u64 = 0;
                        while let Some(f) = body.frame().await {
                            if let Ok(d) = f.unwrap().into_data() {
                                n += d.len() as u64;
                            }
                        }
                        http_body_util::Full::new(Bytes::from(n.to_string()))
                            .map_err(|never| match never {})
                            .boxed()
                    } else {
                        let total: u64 = req
                            .uri()
                            .query()
                            .and_then(|q| q.strip_prefix("bytes="))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        generated(total).boxed()
                    };
                    Ok::<_, std::convert::Infallible>(Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_uploads_and_downloads_stream_in_fixed_memory() {
    let total = mib() * 1024 * 1024;
    let origin = backend().await;
    let (proxy, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("reveille-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("stream.yaml");
    std::fs::write(
        &path,
        format!("listen: 127.0.0.1:{proxy}\nadmin: 127.0.0.1:{admin}\nservices:\n  - name: big\n    hosts: [big.test]\n    backend: {{ static: {{ addresses: [{origin}] }} }}\n"),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "serve",
            "--workers",
            "2",
            "--config",
            path.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], proxy).into();
    wait_until("reveille listening", Duration::from_secs(10), || async {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;
    let baseline = vm_hwm_kib(pid);

    // Upload.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "big.test")
        .body(generated(total))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let counted = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(counted, total.to_string(), "the backend got every byte");

    // Download, over an HTTP/2 connection this time.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(format!("http://big.test/download?bytes={total}"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got: u64 = 0;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            got += d.len() as u64;
        }
    }
    assert_eq!(got, total, "every byte came back");

    let peak = vm_hwm_kib(pid);
    println!(
        "streamed {} MiB each way; reveille peak RSS {} KiB (at start {} KiB)",
        mib(),
        peak,
        baseline
    );
    // Far below the body size: bodies were never held whole.
    assert!(
        peak < baseline + 64 * 1024,
        "peak RSS {peak} KiB grew more than 64 MiB over {baseline} KiB"
    );
    let _ = child.kill().await;
}
