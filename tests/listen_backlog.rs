//! Connections that arrive while Reveille is not accepting (its thread busy, as during a burst
//! of thousands) wait in the kernel's accept queue, sized by `limits.listen_backlog`. With the
//! 128 that `TcpListener::bind` asks for, the 130th connection's handshake was dropped; in the
//! 10,000-connection cold-start burst that occasionally ended in a reset connection (see
//! docs/performance.md).

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use reveille::Config;
use tokio::io::AsyncReadExt;

/// More connections than the 128 of `TcpListener::bind`, few enough for a 1024-fd limit (each
/// is two descriptors in this process once accepted).
const CONNECTIONS: usize = 400;

fn somaxconn() -> usize {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

#[test]
fn connections_wait_in_the_backlog_while_reveille_does_not_accept_and_all_are_answered() {
    // The kernel caps the backlog at net.core.somaxconn (4096 by default since Linux 5.4).
    let n = CONNECTIONS.min(somaxconn());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg = Config::parse(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: a\n    hosts: [a.test]\n    backend: { static: { addresses: [\"127.0.0.1:1\"] } }\n",
    )
    .unwrap();
    assert_eq!(cfg.limits.listen_backlog, 4096, "the default");
    let running = rt.block_on(reveille::start(cfg)).unwrap();
    let addr = running.proxy_addr;
    // The current-thread runtime runs only inside `block_on`: from here until the next one,
    // Reveille accepts nothing, and every connection must be kept by the kernel.
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        // On loopback a handshake with room in the queue completes at once; with the queue
        // full the SYN is dropped and the client would retry only after 1 s.
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => conns.push(s),
            Err(e) => panic!("connection {} of {n} was not taken while Reveille was busy: {e} (listen backlog too small)", i + 1),
        }
    }
    for s in &mut conns {
        s.write_all(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\nConnection: close\r\n\r\n")
            .unwrap();
    }
    // Now Reveille runs: every one of them is accepted and answered (no route: 404).
    let answers = rt.block_on(async {
        let reads = conns.into_iter().map(|s| async move {
            s.set_nonblocking(true).unwrap();
            let mut s = tokio::net::TcpStream::from_std(s).unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.map(|_| out)
        });
        tokio::time::timeout(
            Duration::from_secs(60),
            futures_util::future::join_all(reads),
        )
        .await
        .expect("every connection answered")
    });
    for (i, a) in answers.into_iter().enumerate() {
        let a = a.unwrap_or_else(|e| panic!("connection {}: {e}", i + 1));
        assert!(
            a.starts_with(b"HTTP/1.1 404"),
            "connection {}: {:?}",
            i + 1,
            String::from_utf8_lossy(&a)
        );
    }
    running.shutdown();
    rt.block_on(running.wait());
}

#[test]
fn a_backlog_out_of_range_is_refused_naming_the_field() {
    for (value, why) in [
        ("0", "must be at least 1"),
        ("3000000000", "must be at most 2147483647"),
    ] {
        let e = Config::parse(&format!(
            "limits: {{ listen_backlog: {value} }}\nservices:\n  - name: a\n    hosts: [a.test]\n    backend: {{ static: {{ addresses: [\"127.0.0.1:1\"] }} }}\n"
        ))
        .unwrap_err();
        let problems: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            problems,
            [format!("limits.listen_backlog: {why}")],
            "{value}"
        );
    }
}
