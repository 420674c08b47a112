//! Inbound TLS end to end: certificates made here with rcgen, a rustls client on 127.0.0.1,
//! HTTP/1.1 and HTTP/2 chosen by ALPN, certificate reload, graceful shutdown, bad configs.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A self-signed certificate for `hello.test`: PEM files' contents and the DER a client sees.
struct TestCert {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn make_cert(names: &[&str]) -> TestCert {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
    TestCert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
        der: ck.cert.der().to_vec(),
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("reveille-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Replaces `path` atomically (write beside it, then rename), as certificate tools do.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// How many times Reveille logged (anywhere in this test binary) that it rejected a reloaded
/// pair and kept the previous one. The first call installs a global subscriber keeping those
/// warnings; only the reload test writes broken pairs.
fn reloads_rejected() -> usize {
    static LOG: std::sync::OnceLock<Arc<parking_lot::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    struct Sink(Arc<parking_lot::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = LOG.get_or_init(|| {
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = log.clone();
        tracing_subscriber::fmt()
            .with_writer(move || Sink(sink.clone()))
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .try_init()
            .expect("the only subscriber of this test binary");
        log
    });
    String::from_utf8_lossy(&log.lock())
        .matches("TLS reload failed, keeping the previous certificate")
        .count()
}

fn write_pair(dir: &Path, c: &TestCert) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    replace_file(&cert, &c.cert_pem);
    replace_file(&key, &c.key_pem);
    (cert, key)
}

fn tls_config(port: u16, cert: &Path, key: &Path) -> String {
    let mut yaml = process_config(port, "0s", &[]);
    yaml.push_str(&format!(
        "tls:\n  listen: 127.0.0.1:0\n  cert: {}\n  key: {}\n",
        cert.display(),
        key.display()
    ));
    yaml
}

fn connector(trusted: &[&TestCert], alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in trusted {
        roots.add(CertificateDer::from(c.der.clone())).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(cfg))
}

async fn connect(c: &TlsConnector, addr: std::net::SocketAddr) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("hello.test").unwrap();
    tokio::time::timeout(Duration::from_secs(10), c.connect(name, tcp))
        .await
        .expect("handshake within 10s")
        .expect("handshake")
}

fn peer_cert(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().expect("server cert")[0].to_vec()
}

type H1 = http1::SendRequest<Empty<Bytes>>;

async fn h1(s: TlsStream<TcpStream>) -> H1 {
    let (send, conn) = http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    send
}

/// One GET on an HTTP/1.1 connection: status, version, headers, body.
async fn get_h1(send: &mut H1, path: &str) -> (http::response::Parts, String) {
    send.ready().await.expect("connection usable");
    let req = Request::get(path)
        .header("host", "hello.test")
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), send.send_request(req))
        .await
        .expect("answer within 30s")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_forwards_with_proto_https() {
    let dir = tempdir("h1");
    let c = make_cert(&["hello.test"]);
    let (cert, key) = write_pair(&dir, &c);
    let r = start(&tls_config(free_port(), &cert, &key)).await;
    let tls_addr = r.tls_addr.expect("TLS listener");

    let s = connect(&connector(&[&c], &[b"http/1.1"]), tls_addr).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(b"http/1.1".as_slice()));
    assert_eq!(peer_cert(&s), c.der);
    let mut send = h1(s).await;
    let (parts, body) = get_h1(&mut send, "/over-tls").await;
    assert_eq!(parts.status, StatusCode::OK, "{body}");
    assert_eq!(parts.version, Version::HTTP_11);
    assert!(body.contains("GET /over-tls"), "{body}");
    assert_eq!(parts.headers["x-demo-forwarded-proto"], "https");
    assert_eq!(parts.headers["x-demo-host"], "hello.test");
    // Keep-alive: a second request on the same TLS connection.
    let (parts, _) = get_h1(&mut send, "/again").await;
    assert_eq!(parts.status, StatusCode::OK);

    // A client that offers no ALPN at all gets HTTP/1.1.
    let s = connect(&connector(&[&c], &[]), tls_addr).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), None);
    let (parts, _) = get_h1(&mut h1(s).await, "/no-alpn").await;
    assert_eq!(parts.status, StatusCode::OK);

    // The plain listener still says http.
    let plain = get(&client(), r.proxy_addr, "hello.test", "/plain").await;
    assert_eq!(plain.header("x-demo-forwarded-proto"), Some("http"));
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_is_chosen_by_alpn() {
    let dir = tempdir("h2");
    let c = make_cert(&["hello.test"]);
    let (cert, key) = write_pair(&dir, &c);
    let r = start(&tls_config(free_port(), &cert, &key)).await;

    let s = connect(
        &connector(&[&c], &[b"h2", b"http/1.1"]),
        r.tls_addr.unwrap(),
    )
    .await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (mut send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    // Several concurrent streams on the one connection.
    let mut tasks = Vec::new();
    for i in 0..5 {
        let req = Request::get(format!("https://hello.test/h2/{i}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let fut = send.send_request(req);
        tasks.push(tokio::spawn(async move {
            let resp = tokio::time::timeout(Duration::from_secs(30), fut)
                .await
                .expect("answer within 30s")
                .expect("response");
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (parts, String::from_utf8_lossy(&body).into_owned(), i)
        }));
    }
    for t in tasks {
        let (parts, body, i) = t.await.unwrap();
        assert_eq!(parts.status, StatusCode::OK, "{body}");
        assert_eq!(parts.version, Version::HTTP_2);
        assert!(body.contains(&format!("GET /h2/{i}")), "{body}");
        assert_eq!(parts.headers["x-demo-forwarded-proto"], "https");
        // :authority became the backend's Host.
        assert_eq!(parts.headers["x-demo-host"], "hello.test");
    }
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reload_reaches_new_connections_and_spares_open_ones() {
    let dir = tempdir("reload");
    let old = make_cert(&["hello.test"]);
    let new = make_cert(&["hello.test", "new.hello.test"]);
    let newer = make_cert(&["hello.test", "newer.hello.test"]);
    assert_ne!(old.der, new.der);
    let (cert, key) = write_pair(&dir, &old);
    reloads_rejected(); // the log is kept from here on
    let r = start(&tls_config(free_port(), &cert, &key)).await;
    let addr = r.tls_addr.unwrap();
    let trust_all = connector(&[&old, &new, &newer], &[b"http/1.1"]);

    let s = connect(&trust_all, addr).await;
    assert_eq!(peer_cert(&s), old.der);
    let mut open = h1(s).await;
    let (parts, _) = get_h1(&mut open, "/before").await;
    assert_eq!(parts.status, StatusCode::OK);

    write_pair(&dir, &new);
    wait_until(
        "a new connection sees the new certificate",
        Duration::from_secs(30),
        || {
            let (trust_all, want) = (trust_all.clone(), new.der.clone());
            async move { peer_cert(&connect(&trust_all, addr).await) == want }
        },
    )
    .await;
    // The connection opened before the reload still works.
    let (parts, _) = get_h1(&mut open, "/after").await;
    assert_eq!(parts.status, StatusCode::OK);

    // A broken certificate is not taken: once Reveille has read it (and said so), handshakes
    // keep getting the current one.
    let rejected = reloads_rejected();
    replace_file(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    wait_until(
        "the broken certificate rejected",
        Duration::from_secs(30),
        || async { reloads_rejected() > rejected },
    )
    .await;
    assert_eq!(peer_cert(&connect(&trust_all, addr).await), new.der);
    // Neither is a certificate whose key does not match.
    let rejected = reloads_rejected();
    replace_file(&cert, &newer.cert_pem);
    wait_until(
        "the mismatched pair rejected",
        Duration::from_secs(30),
        || async { reloads_rejected() > rejected },
    )
    .await;
    assert_eq!(peer_cert(&connect(&trust_all, addr).await), new.der);
    // Once the matching key arrives, the pair is taken.
    replace_file(&key, &newer.key_pem);
    wait_until(
        "the repaired pair is served",
        Duration::from_secs(30),
        || {
            let (trust_all, want) = (trust_all.clone(), newer.der.clone());
            async move { peer_cert(&connect(&trust_all, addr).await) == want }
        },
    )
    .await;
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_tls_requests_finish() {
    let dir = tempdir("shutdown");
    let c = make_cert(&["hello.test"]);
    let (cert, key) = write_pair(&dir, &c);
    let r = start(&tls_config(free_port(), &cert, &key)).await;
    let addr = r.tls_addr.unwrap();
    let tls = connector(&[&c], &[b"http/1.1"]);
    let mut warm = h1(connect(&tls, addr).await).await;
    assert_eq!(get_h1(&mut warm, "/warm").await.0.status, StatusCode::OK);

    let mut slow = h1(connect(&tls, addr).await).await;
    let in_flight = tokio::spawn(async move { get_h1(&mut slow, "/_demo/sleep?ms=1500").await });
    // The slow request is in flight (forwarded, not answered) before the shutdown starts.
    let gate = r.gates()[0].clone();
    wait_until(
        "the slow request in flight",
        Duration::from_secs(10),
        || {
            let gate = gate.clone();
            async move { gate.in_flight() == 1 }
        },
    )
    .await;
    r.shutdown();
    let (parts, body) = in_flight.await.unwrap();
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "slept 1500ms\n");
    tokio::time::timeout(Duration::from_secs(30), r.wait())
        .await
        .expect("shutdown completes");
    // The TLS listener is closed.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_comes_is_cut_off() {
    let dir = tempdir("handshake");
    let c = make_cert(&["hello.test"]);
    let (cert, key) = write_pair(&dir, &c);
    let mut yaml = tls_config(free_port(), &cert, &key);
    yaml.push_str("timeouts:\n  client_header: 300ms\n");
    let r = start(&yaml).await;
    let mut idle = TcpStream::connect(r.tls_addr.unwrap()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("closed within 10s")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    // The listener still works for a real client.
    let s = connect(&connector(&[&c], &[b"http/1.1"]), r.tls_addr.unwrap()).await;
    assert_eq!(
        get_h1(&mut h1(s).await, "/after").await.0.status,
        StatusCode::OK
    );
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_count_against_max_connections_with_plain_ones() {
    let dir = tempdir("maxconn");
    let c = make_cert(&["hello.test"]);
    let (cert, key) = write_pair(&dir, &c);
    let mut yaml = tls_config(free_port(), &cert, &key);
    yaml.push_str("limits:\n  max_connections: 1\n");
    let r = start(&yaml).await;
    let mut tls = h1(connect(&connector(&[&c], &[b"http/1.1"]), r.tls_addr.unwrap()).await).await;
    assert_eq!(get_h1(&mut tls, "/one").await.0.status, StatusCode::OK);

    // The one slot is the TLS connection's: a plain connection is closed without an answer.
    let mut plain = TcpStream::connect(r.proxy_addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), plain.read(&mut buf))
        .await
        .expect("closed within 10s")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // Once the TLS connection is gone, plain traffic gets the slot.
    drop(tls);
    let c = client();
    wait_until("the slot is free again", Duration::from_secs(10), || {
        let c = c.clone();
        let addr = r.proxy_addr;
        async move {
            let req = http::Request::get(format!("http://{addr}/again"))
                .header("host", "hello.test")
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap();
            matches!(c.request(req).await, Ok(resp) if resp.status() == StatusCode::OK)
        }
    })
    .await;
    stop(r).await;
}

#[test]
fn serve_refuses_a_bad_certificate_before_binding() {
    let dir = tempdir("serve-bad");
    let port = free_port();
    let cert = dir.join("cert.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    let mut yaml = process_config(18998, "0s", &[])
        .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
    yaml.push_str(&format!(
        "tls:\n  listen: 127.0.0.1:0\n  cert: {}\n  key: {}\n",
        cert.display(),
        dir.join("missing-key.pem").display()
    ));
    let file = dir.join("reveille.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.cert: no CERTIFICATE block found (PEM)"),
        "{err}"
    );
    assert!(err.contains("tls.key: cannot read"), "{err}");
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("nothing was bound");
}

#[test]
fn bad_certificates_are_config_errors_naming_the_field() {
    let dir = tempdir("bad");
    let a = make_cert(&["hello.test"]);
    let b = make_cert(&["hello.test"]);
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let yaml = tls_config(18999, &cert, &key);
    let problems = |yaml: &str| -> Vec<String> {
        reveille::Config::parse(yaml)
            .expect_err("bad TLS config")
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect()
    };

    // Missing files: both named.
    let e = problems(&yaml);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e[0].starts_with(&format!("tls.cert: cannot read {}", cert.display())),
        "{e:?}"
    );
    assert!(
        e[1].starts_with(&format!("tls.key: cannot read {}", key.display())),
        "{e:?}"
    );

    // Not a certificate.
    std::fs::write(&cert, "hello").unwrap();
    std::fs::write(&key, &a.key_pem).unwrap();
    assert_eq!(
        problems(&yaml),
        vec!["tls.cert: no CERTIFICATE block found (PEM)"]
    );
    // A key that belongs to another certificate.
    std::fs::write(&cert, &a.cert_pem).unwrap();
    std::fs::write(&key, &b.key_pem).unwrap();
    assert_eq!(
        problems(&yaml),
        vec!["tls.key: does not match the certificate in tls.cert"]
    );
    // A certificate given as the key.
    std::fs::write(&key, &a.cert_pem).unwrap();
    assert_eq!(
        problems(&yaml),
        vec!["tls.key: no PRIVATE KEY block found (PEM)"]
    );
    // `reveille check` reports it and exits 2.
    let file = dir.join("reveille.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.key: no PRIVATE KEY block found (PEM)"),
        "{err}"
    );

    // The good pair passes.
    std::fs::write(&key, &a.key_pem).unwrap();
    let cfg = reveille::Config::parse(&yaml).expect("good TLS config");
    assert_eq!(cfg.tls.unwrap().cert, cert);
}
