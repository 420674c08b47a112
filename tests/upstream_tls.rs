//! TLS to backends (`protocol: h2` and `https` with `upstream_tls`): a rustls backend on
//! 127.0.0.1 with an rcgen certificate for `backend.test` signed by a test CA, ALPN `h2` and
//! `http/1.1`; an untrusted certificate; config errors.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;
use tokio::net::{TcpListener, TcpStream};

/// A CA, and a leaf for `backend.test` it signed.
struct Pki {
    ca_pem: String,
    leaf_der: CertificateDer<'static>,
    leaf_key: Vec<u8>,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Reveille test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params = rcgen::CertificateParams::new(vec!["backend.test".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        leaf_der: leaf.der().clone(),
        leaf_key: leaf_key.serialize_der(),
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "reveille-upstream-tls-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_ca(dir: &Path, pki: &Pki) -> PathBuf {
    let path = dir.join("ca.pem");
    std::fs::write(&path, &pki.ca_pem).unwrap();
    path
}

/// A TLS backend (ALPN `h2`, `http/1.1`). It answers with the HTTP version it saw
/// (`x-version`), the SNI (`x-sni`) and `te` (`x-te`), echoes the body, and over HTTP/2 ends
/// with gRPC-like trailers. Also returns the count of completed handshakes.
async fn tls_backend(pki: &Pki) -> (SocketAddr, Arc<AtomicUsize>) {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![pki.leaf_der.clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.leaf_key.clone())),
    )
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let (_, conn) = tls.get_ref();
                let sni = conn.server_name().unwrap_or("").to_string();
                let h2 = conn.alpn_protocol() == Some(b"h2");
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let sni = sni.clone();
                    async move {
                        let te = req
                            .headers()
                            .get("te")
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default();
                        let version = format!("{:?}", req.version());
                        let is_h2 = req.version() == http::Version::HTTP_2;
                        let body = req.into_body().collect().await?.to_bytes();
                        let mut frames = vec![Ok::<_, hyper::Error>(Frame::data(body))];
                        if is_h2 {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            trailers.insert("grpc-message", "done".parse().unwrap());
                            frames.push(Ok(Frame::trailers(trailers)));
                        }
                        let mut resp =
                            Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                        let h = resp.headers_mut();
                        h.insert("x-te", te.parse().unwrap());
                        h.insert("x-version", version.parse().unwrap());
                        h.insert("x-sni", sni.parse().unwrap());
                        Ok::<_, hyper::Error>(resp)
                    }
                });
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    (addr, handshakes)
}

fn config(backend: SocketAddr, protocol: &str, upstream_tls: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: hello\n    hosts: [hello.test]\n    protocol: {protocol}\n    upstream_tls: {upstream_tls}\n    backend: {{ static: {{ addresses: [{backend}] }} }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_like_h2_with_trailers_goes_over_tls_to_the_backend() {
    let pki = pki();
    let dir = tempdir("h2");
    let ca = write_ca(&dir, &pki);
    let (backend, handshakes) = tls_backend(&pki).await;
    let tls = format!("{{ ca: {}, server_name: backend.test }}", ca.display());
    let r = start(&config(backend, "h2", &tls)).await;
    // h2c to Reveille, h2 over TLS from Reveille to the backend.
    let stream = TcpStream::connect(r.proxy_addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = Request::builder()
            .method("POST")
            .uri("http://hello.test/echo.Echo/Unary")
            .header("te", "trailers")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from(format!("message {i}"))))
            .unwrap();
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-version"], "HTTP/2.0", "h2 to the backend");
        assert_eq!(resp.headers()["x-sni"], "backend.test", "configured SNI");
        assert_eq!(resp.headers()["x-te"], "trailers");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers passed on");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "done");
        assert_eq!(collected.to_bytes(), format!("message {i}"));
    }
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        1,
        "one pooled h2 connection"
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_speaks_http1_over_tls() {
    let pki = pki();
    let dir = tempdir("https");
    let ca = write_ca(&dir, &pki);
    let (backend, handshakes) = tls_backend(&pki).await;
    let tls = format!("{{ ca: {}, server_name: backend.test }}", ca.display());
    let r = start(&config(backend, "https", &tls)).await;
    let c = client();
    // An HTTP/1.1 connection goes back to hyper's pool a moment after its response ends (in a
    // task of its own, which nothing outside shows): requests are sent one after another
    // until the backend sees one come on a connection it already knows (fewer handshakes than
    // requests). A client that never reuses a connection shakes hands for each, to the end.
    let sent = Arc::new(AtomicUsize::new(0));
    wait_until(
        "a request on a kept-alive connection",
        std::time::Duration::from_secs(10),
        || {
            let (c, sent, handshakes) = (c.clone(), sent.clone(), handshakes.clone());
            let proxy = r.proxy_addr;
            async move {
                let resp = send(&c, proxy, "POST", "hello.test", "/x", "hello").await;
                assert_eq!(resp.status, 200, "{resp:?}");
                assert_eq!(resp.header("x-version"), Some("HTTP/1.1"));
                assert_eq!(resp.header("x-sni"), Some("backend.test"));
                assert_eq!(resp.body, "hello");
                let sent = sent.fetch_add(1, Ordering::SeqCst) + 1;
                handshakes.load(Ordering::SeqCst) < sent
            }
        },
    )
    .await;
    let (n, sent) = (
        handshakes.load(Ordering::SeqCst),
        sent.load(Ordering::SeqCst),
    );
    assert!(
        n < sent,
        "kept-alive connections are reused ({n} handshakes for {sent} requests)"
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_certificate_from_another_ca_is_a_connect_error() {
    let backend_pki = pki();
    let other = pki();
    let dir = tempdir("untrusted");
    let ca = write_ca(&dir, &other);
    let (backend, handshakes) = tls_backend(&backend_pki).await;
    let tls = format!("{{ ca: {}, server_name: backend.test }}", ca.display());
    let r = start(&config(backend, "h2", &tls)).await;
    let resp = get(&client(), r.proxy_addr, "hello.test", "/").await;
    // The handshake fails inside the connector, before any request is sent: a connect error.
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "{resp:?}");
    assert_eq!(resp.header("x-reveille-error"), Some("upstream_connect"));
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        0,
        "no handshake completed"
    );
    stop(r).await;
}

/// A reload that replaces the gate (its queue changed) keeps the TLS client and its pooled
/// connection: the request after the reload makes no new handshake. Removing the service drops
/// the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_replaces_the_gate_keeps_the_pooled_tls_connection() {
    let pki = pki();
    let dir = tempdir("reload");
    let ca = write_ca(&dir, &pki);
    let (backend, handshakes) = tls_backend(&pki).await;
    let tls = format!("{{ ca: {}, server_name: backend.test }}", ca.display());
    let first_yaml = config(backend, "h2", &tls);
    let first = reveille::Config::parse(&first_yaml).unwrap();
    let r = reveille::start(first.clone()).await.unwrap();
    let c = client();
    let resp = get(&c, r.proxy_addr, "hello.test", "/").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);
    let old_gate = r.services().load().gate("hello").unwrap().clone();

    let second = reveille::Config::parse(&format!(
        "{first_yaml}    queue: {{ capacity: 50, timeout: 30s }}\n"
    ))
    .unwrap();
    let out = r.reload(&second, &first).await;
    assert_eq!(out.changes.replaced, vec!["hello".to_string()]);
    let new_gate = r.services().load().gate("hello").unwrap().clone();
    assert!(!Arc::ptr_eq(&old_gate, &new_gate), "a new gate");
    let (old_client, new_client) = (
        old_gate.settings().upstream.clone().expect("TLS client"),
        new_gate.settings().upstream.clone().expect("TLS client"),
    );
    assert!(Arc::ptr_eq(&old_client, &new_client), "the same TLS client");
    drop((old_gate, old_client));
    for _ in 0..3 {
        let resp = get(&c, r.proxy_addr, "hello.test", "/").await;
        assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
        assert_eq!(resp.header("x-version"), Some("HTTP/2.0"));
    }
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        1,
        "the pooled h2 connection outlived the old gate"
    );
    assert_eq!(r.services().upstreams().tls.len(), 1);

    let third = reveille::Config::parse(&format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: other\n    hosts: [other.test]\n    backend: {{ static: {{ addresses: [{backend}] }} }}\n"
    ))
    .unwrap();
    let out = r.reload(&third, &second).await;
    assert_eq!(out.changes.removed, vec!["hello".to_string()]);
    assert!(
        r.services().upstreams().tls.is_empty(),
        "no service uses the TLS client any more"
    );
    stop(r).await;
}

#[test]
fn upstream_tls_config_errors_name_their_fields() {
    let backend: SocketAddr = ([127, 0, 0, 1], 9).into();
    let dir = tempdir("config");
    let pki = pki();
    let ca = write_ca(&dir, &pki);
    let errors = |yaml: String| -> Vec<String> {
        reveille::Config::parse(&yaml)
            .expect_err("config error expected")
            .problems
            .into_iter()
            .map(|p| p.to_string())
            .collect()
    };
    let with_ca = format!("{{ ca: {}, server_name: backend.test }}", ca.display());

    let e = errors(config(backend, "http1", &with_ca));
    assert!(
        e.iter().any(|p| p.starts_with("services[0].upstream_tls:")
            && p.contains("only valid with protocol h2 or https")),
        "{e:?}"
    );

    let missing = dir.join("nope.pem");
    let e = errors(config(
        backend,
        "h2",
        &format!("{{ ca: {}, server_name: backend.test }}", missing.display()),
    ));
    assert!(
        e.iter()
            .any(|p| p.starts_with("services[0].upstream_tls.ca:") && p.contains("cannot read")),
        "{e:?}"
    );

    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let e = errors(config(
        backend,
        "https",
        &format!("{{ ca: {}, server_name: backend.test }}", garbage.display()),
    ));
    assert!(
        e.iter()
            .any(|p| p.starts_with("services[0].upstream_tls.ca:")),
        "{e:?}"
    );

    let e = errors(config(
        backend,
        "h2",
        &format!("{{ ca: {} }}", ca.display()),
    ));
    assert!(
        e.iter()
            .any(|p| p.starts_with("services[0].upstream_tls.server_name:")),
        "{e:?}"
    );

    let e = errors(format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: hello\n    hosts: [hello.test]\n    protocol: h2\n    backend: {{ static: {{ addresses: [{backend}] }} }}\n"
    ));
    assert!(
        e.iter().any(|p| p.starts_with("services[0].upstream_tls:")),
        "{e:?}"
    );

    let ok = reveille::Config::parse(&config(backend, "https", &with_ca)).unwrap();
    let tls = ok.services[0].upstream_tls.as_ref().expect("upstream_tls");
    assert_eq!(tls.server_name.to_str(), "backend.test");
    assert_eq!(tls.roots.len(), 1);
}
