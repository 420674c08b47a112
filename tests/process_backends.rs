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

/// Whether `pid` runs (a zombie does not: it waits for its parent to read its status).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s[s.rfind(')')? + 1..]
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z")
        })
        .unwrap_or(false)
}

/// Issue 12, item 11: a backend does not outlive a Reveille killed with SIGKILL, and the next
/// Reveille starts its own backend on the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dies_with_a_killed_reveille() {
    let dir = scratch("kill9");
    let (proxy, admin, backend) = (free_port(), free_port(), free_port());
    let config = one_service(proxy, admin, &demo_command(backend, "0s"), backend, "");
    let mut r = Reveille::start(Path::new(BIN), &dir, &config, proxy, admin).await;
    let c = client();
    let resp = get(&c, r.proxy, "hello.test", "/").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let pid = demo_pid(&resp);
    let pid_file = std::fs::read_to_string(dir.join(".reveille-state/hello.pid"))
        .expect("a pid file in the default state_dir");
    assert!(
        pid_file.starts_with(&format!("pid {pid}\n")),
        "{pid_file:?}"
    );

    kill(r.pid(), Signal::SIGKILL).unwrap();
    r.child.wait().await.unwrap();
    wait_until("the backend is gone", Duration::from_secs(5), || async {
        !running(pid)
    })
    .await;

    // The pid file is left behind; the next Reveille finds its backend gone and starts its own.
    let r = Reveille::start(Path::new(BIN), &dir, &config, proxy, admin).await;
    let resp = get(&c, r.proxy, "hello.test", "/").await;
    assert_eq!(resp.status, 200, "{resp:?}\n{}", r.log());
    assert_ne!(demo_pid(&resp), pid);
    assert!(r.terminate().await.success());
    assert!(
        !dir.join(".reveille-state/hello.pid").exists(),
        "the pid file is removed at a clean stop"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pid file whose writer is gone, naming a backend that still runs (as after a `kill -9` of
/// a Reveille started without the launcher): that backend is terminated at start, before the
/// service starts its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_backend_named_by_a_pid_file_is_terminated_at_start() {
    let dir = scratch("leftover");
    let (proxy, admin, backend) = (free_port(), free_port(), free_port());
    // The orphan: a demo backend on the service's address, in its own process group.
    let mut orphan = tokio::process::Command::new(BIN)
        .args(["demo-backend", "--listen", &format!("127.0.0.1:{backend}")])
        .process_group(0)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let orphan_pid = orphan.id().unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], backend).into();
    wait_until(
        "the orphan listens",
        Duration::from_secs(10),
        || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
    )
    .await;
    // Its writer: a process that has exited.
    let owner = std::process::Command::new("true").spawn().unwrap();
    let owner_pid = owner.id();
    let mut owner = owner;
    owner.wait().unwrap();
    let start = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        s[s.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .nth(19)
            .unwrap()
            .parse()
            .unwrap()
    };
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::write(
        dir.join("state/hello.pid"),
        format!(
            "pid {orphan_pid}\nstart {}\nowner {owner_pid}\nowner_start 1\n",
            start(orphan_pid)
        ),
    )
    .unwrap();

    let config = one_service(
        proxy,
        admin,
        &demo_command(backend, "0s"),
        backend,
        "state_dir: state\n",
    );
    let r = Reveille::start(Path::new(BIN), &dir, &config, proxy, admin).await;
    let status = tokio::time::timeout(Duration::from_secs(5), orphan.wait())
        .await
        .expect("the orphan is terminated at start")
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(Signal::SIGTERM as i32),
        "{status}"
    );
    // The service starts its own backend on the address.
    let c = client();
    let resp = get(&c, r.proxy, "hello.test", "/").await;
    assert_eq!(resp.status, 200, "{resp:?}\n{}", r.log());
    assert_ne!(demo_pid(&resp), orphan_pid);
    assert!(r.log().contains("left running by a previous Reveille"));
    assert!(r.terminate().await.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// An address something else already accepts on is not a ready backend: the activation fails
/// and says which address, and no request reaches the stranger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_taken_by_a_foreign_listener_fails_the_activation() {
    let dir = scratch("foreign");
    let (proxy, admin) = (free_port(), free_port());
    let foreign = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = foreign.local_addr().unwrap().port();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = received.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = foreign.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
                    seen.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    let config = one_service(
        proxy,
        admin,
        &demo_command(backend, "0s"),
        backend,
        "state_dir: state\n",
    );
    let r = Reveille::start(Path::new(BIN), &dir, &config, proxy, admin).await;
    let c = client();
    let resp = tokio::time::timeout(Duration::from_secs(5), get(&c, r.proxy, "hello.test", "/"))
        .await
        .expect("answered at once, not forwarded to a listener that never answers");
    assert_eq!(resp.status, 502, "{resp:?}");
    assert!(resp.body.contains("failed to start"), "{resp:?}");
    let log = r.log();
    assert!(
        log.contains(&format!(
            "127.0.0.1:{backend} already accepts connections from a process Reveille did not start"
        )),
        "{log}"
    );
    assert!(
        pids_with_arg(&format!("127.0.0.1:{backend}")).is_empty(),
        "no backend was started"
    );
    assert_eq!(
        received.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "bytes reached the foreign listener"
    );
    assert!(r.terminate().await.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `state_dir` must be usable when a process service exists; `serve` says so, naming it,
/// before it binds anything. Without process services it is not needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_names_an_unusable_state_dir_only_when_a_process_service_needs_it() {
    let dir = scratch("state-dir");
    std::fs::write(dir.join("file"), "").unwrap();
    let bad = dir.join("file/state");
    let (proxy, admin, backend) = (free_port(), free_port(), free_port());
    let extra = format!("state_dir: {}\n", bad.display());
    let config = one_service(proxy, admin, &demo_command(backend, "0s"), backend, &extra);
    let path = dir.join("process.yaml");
    std::fs::write(&path, &config).unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("state_dir {}: cannot create it", bad.display())),
        "{err}"
    );
    std::net::TcpListener::bind(("127.0.0.1", proxy)).expect("nothing was bound");

    let config = format!(
        "listen: 127.0.0.1:{proxy}\nadmin: 127.0.0.1:{admin}\n{extra}services:\n  - name: s\n    hosts: [s.test]\n    backend: {{ static: {{ addresses: [\"127.0.0.1:1\"] }} }}\n"
    );
    let r = Reveille::start(Path::new(BIN), &dir, &config, proxy, admin).await;
    assert!(r.terminate().await.success());
    let _ = std::fs::remove_dir_all(&dir);
}
