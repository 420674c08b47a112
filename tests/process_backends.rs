//! Process backends across the life of the `reveille` binary: a binary upgrade followed by a
//! reload, a crash (`kill -9`), a leftover pid file, and an address some other process holds.
//! Each test starts the real binary and real backend processes.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;

/// A directory of its own for one test, under Cargo's scratch space (the same filesystem as
/// the built binary, so it can be hard-linked there).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("process-backends-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Puts a `reveille` binary at `to` (a hard link where possible: the debug binary is large).
fn install_binary(to: &Path) {
    if std::fs::hard_link(BIN, to).is_err() {
        std::fs::copy(BIN, to).unwrap();
    }
}

/// A `reveille serve` started from `exe` with `config`, its log in `dir/reveille.log`.
struct Reveille {
    child: tokio::process::Child,
    log: PathBuf,
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Reveille {
    async fn start(exe: &Path, dir: &Path, config: &str, proxy: u16, admin: u16) -> Reveille {
        let path = dir.join("reveille.yaml");
        std::fs::write(&path, config).unwrap();
        let log = dir.join("reveille.log");
        let child = tokio::process::Command::new(exe)
            .args(["serve", "--config", path.to_str().unwrap()])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let r = Reveille {
            child,
            log,
            proxy: ([127, 0, 0, 1], proxy).into(),
            admin: ([127, 0, 0, 1], admin).into(),
        };
        let admin = r.admin;
        wait_until(
            "reveille listening",
            Duration::from_secs(20),
            || async move { tokio::net::TcpStream::connect(admin).await.is_ok() },
        )
        .await;
        r
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("running") as i32)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and the exit status once it exited.
    async fn terminate(mut self) -> std::process::ExitStatus {
        let _ = kill(self.pid(), Signal::SIGTERM);
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap()
    }
}

/// The pid a demo backend reports.
fn demo_pid(resp: &Resp) -> u32 {
    resp.header("x-demo-pid")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no x-demo-pid in {resp:?}"))
}

fn one_service(proxy: u16, admin: u16, command: &str, backend: u16, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:{proxy}\nadmin: 127.0.0.1:{admin}\n{extra}services:\n  - name: hello\n    hosts: [hello.test]\n    backend:\n      process:\n        command: {command}\n        address: 127.0.0.1:{backend}\n        stop_grace: 2s\n"
    )
}

/// Issue 12, item 10: after the binary is replaced on disk, `${REVEILLE_EXE}` still resolves
/// to the path it had at start, so a reload of the unchanged config changes nothing and the
/// backend starts again from the binary now installed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reveille_exe_is_stable_across_a_binary_upgrade_and_a_reload() {
    let dir = scratch("upgrade");
    let exe = dir.join("reveille");
    install_binary(&exe);
    let (proxy, admin, backend) = (free_port(), free_port(), free_port());
    let command =
        format!("[\"${{REVEILLE_EXE}}\", demo-backend, --listen, \"127.0.0.1:{backend}\"]");
    let config = one_service(proxy, admin, &command, backend, "");
    let r = Reveille::start(&exe, &dir, &config, proxy, admin).await;
    let c = client();
    let first = get(&c, r.proxy, "hello.test", "/").await;
    assert_eq!(first.status, 200, "{first:?}");

    // The upgrade: the file is replaced (a new inode at the same path), then SIGHUP.
    std::fs::remove_file(&exe).unwrap();
    install_binary(&exe);
    kill(r.pid(), Signal::SIGHUP).unwrap();
    wait_until("the reload", Duration::from_secs(10), || async {
        r.log().contains("configuration reloaded")
    })
    .await;
    let log = r.log();
    let reload = log
        .lines()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap();
    assert!(
        reload.contains("replaced: []") && reload.contains("added: []"),
        "an unchanged config changed: {reload}"
    );

    // The backend still runs: the same one answers.
    let again = get(&c, r.proxy, "hello.test", "/").await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(
        demo_pid(&again),
        demo_pid(&first),
        "the backend was restarted"
    );

    // Once it is gone, it starts again from the path, now the new binary.
    kill(Pid::from_raw(demo_pid(&first) as i32), Signal::SIGKILL).unwrap();
    let admin_addr = r.admin;
    wait_until("the backend's exit seen", Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let s = get(&c, admin_addr, "admin", "/api/services").await.body;
            s.contains("\"ready_endpoints\":[]")
        }
    })
    .await;
    let restarted = get(&c, r.proxy, "hello.test", "/").await;
    assert_eq!(restarted.status, 200, "{restarted:?}\n{}", r.log());
    assert_ne!(demo_pid(&restarted), demo_pid(&first));
    assert!(r.terminate().await.success());
    let _ = std::fs::remove_dir_all(&dir);
}
