//! The `reveille` binary: config checking, and a graceful shutdown with requests held.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("reveille-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_accepts_the_shipped_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/local.yaml");
    let out = Command::new(BIN)
        .args(["check", "--config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 services)"));
}

#[test]
fn check_reports_every_problem_with_its_field_and_exits_2() {
    let path = write_config(
        "bad.yaml",
        "services:\n  - name: a\n    hosts: [a.test]\n    backend: { static: { addresses: [127.0.0.1:1] } }\n    queue: { capacity: 0 }\n  - name: a\n    hosts: []\n    backend: {}\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "invalid configuration",
        "services[0].queue.capacity: must be at least 1",
        "services[1].name: duplicate name \"a\" (also services[0])",
        "services[1].hosts: at least one host is required",
        "services[1].backend: exactly one of `process`, `static` or `kubernetes` is required",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn check_reports_unknown_fields_together_with_every_other_problem() {
    let path = write_config(
        "unknown.yaml",
        "services:\n  - name: a\n    hosts: [a.test]\n    idle_timout: 3s\n    backend: { static: { addresses: [127.0.0.1:1] } }\n    queue: { capacity: 0 }\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "invalid configuration",
        "services[0].idle_timout: unknown field `idle_timout`",
        "services[0].queue.capacity: must be at least 1",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn serve_refuses_a_bad_config_before_binding() {
    let port = free_port();
    let path = write_config(
        "bad-serve.yaml",
        &format!("listen: 127.0.0.1:{port}\nservices:\n  - name: a\n    hosts: [a.test]\n    backend: {{ static: {{ addresses: [127.0.0.1:1] }} }}\n    idle_timeout: soon\n"),
    );
    let out = Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("services[0].idle_timeout: invalid duration \"soon\""),
        "{err}"
    );
    // Nothing was bound.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port still free");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/reveille.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/reveille.yaml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_held_requests_then_stops_the_backend_and_exits_0() {
    let (proxy, admin, backend) = (free_port(), free_port(), free_port());
    let path = write_config(
        "shutdown.yaml",
        &format!(
            "listen: 127.0.0.1:{proxy}\nadmin: 127.0.0.1:{admin}\nshutdown: {{ delay: 300ms, grace: 20s }}\nservices:\n  - name: hello\n    hosts: [hello.test]\n    backend:\n      process:\n        command: {}\n        address: 127.0.0.1:{backend}\n",
            demo_command(backend, "1500ms")
        ),
    );
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let proxy_addr = ([127, 0, 0, 1], proxy).into();
    let admin_addr = ([127, 0, 0, 1], admin).into();
    let c = client();
    wait_until("reveille listening", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(admin_addr).await.is_ok()
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            get(&c, proxy_addr, "hello.test", &format!("/held/{i}")).await
        }));
    }
    let c2 = c.clone();
    wait_until("20 held", Duration::from_secs(10), || {
        let c = c2.clone();
        async move {
            let s = get(&c, admin_addr, "a", "/api/services").await.body;
            s.contains("\"held\":20")
        }
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // During the shutdown delay, readiness fails but the proxy still answers.
    wait_until("readyz 503", Duration::from_secs(2), || {
        let c = c.clone();
        async move { get(&c, admin_addr, "a", "/readyz").await.status == 503 }
    })
    .await;
    let mut pid = None;
    for t in tasks {
        let resp = t.await.unwrap();
        assert_eq!(resp.status, 200, "{resp:?}");
        pid = resp.header("x-demo-pid").map(|p| p.parse::<u32>().unwrap());
    }
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after the shutdown")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let pid = pid.expect("backend pid");
    assert!(!alive(pid), "backend {pid} was stopped");
    // Listeners are closed.
    assert!(tokio::net::TcpStream::connect(proxy_addr).await.is_err());
}
