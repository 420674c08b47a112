//! Pid files of process backends, one per service (`<state_dir>/<service>.pid`): written when
//! the backend is spawned, removed once it is stopped. A file still there at start means the
//! Reveille that wrote it died without stopping its backend (`kill -9`, an OOM kill), and
//! [`reap_leftovers`] terminates that backend's process group before any service starts, so
//! the address is free for a backend this Reveille starts itself.
//!
//! A pid alone could name a reused pid; the file also holds the process's start time (field 22
//! of `/proc/PID/stat`, unchanged by `exec`), and the writer's pid and start time, so that a
//! file whose writer still runs (another Reveille on the same `state_dir`, or this process in
//! tests) is left alone. The format is one `key value` pair a line: `pid`, `start`, `owner`,
//! `owner_start`.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tracing::{info, warn};

/// How often a terminated group is checked for being gone.
const GONE_CHECK: Duration = Duration::from_millis(20);
/// Bound on waiting for a SIGKILLed group to be gone.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// Creates `dir` if need be and checks that files can be written there.
pub fn prepare(dir: &Path) -> io::Result<()> {
    let fail = |what: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!(
                "state_dir {}: cannot {what} (pid files of process backends are kept there): {e}",
                dir.display()
            ),
        )
    };
    std::fs::create_dir_all(dir).map_err(|e| fail("create it", e))?;
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| fail("write in it", e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// What a pid file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The backend's pid, also its process group.
    pub pid: u32,
    /// The backend's start time (clock ticks after boot).
    pub start: u64,
    /// The pid of the Reveille that started it.
    pub owner: u32,
    /// That Reveille's start time.
    pub owner_start: u64,
}

impl Record {
    /// The record for `pid`, started by this process.
    fn of(pid: u32) -> io::Result<Record> {
        let me = std::process::id();
        Ok(Record {
            pid,
            start: stat(pid)?.start,
            owner: me,
            owner_start: stat(me)?.start,
        })
    }

    /// The file's text.
    pub fn render(&self) -> String {
        format!(
            "pid {}\nstart {}\nowner {}\nowner_start {}\n",
            self.pid, self.start, self.owner, self.owner_start
        )
    }

    fn parse(text: &str) -> Option<Record> {
        let kv: HashMap<&str, u64> = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(k, v)| Some((k, v.trim().parse().ok()?)))
            .collect();
        Some(Record {
            pid: u32::try_from(*kv.get("pid")?).ok()?,
            start: *kv.get("start")?,
            owner: u32::try_from(*kv.get("owner")?).ok()?,
            owner_start: *kv.get("owner_start")?,
        })
    }
}

/// A written pid file; [`PidFile::remove`] it once the backend is gone.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    record: Record,
}

impl PidFile {
    /// Records `pid` as `service`'s backend in `dir` (created if need be). Written to a
    /// temporary file and renamed, so a reader never sees half a file.
    pub fn write(dir: &Path, service: &str, pid: u32) -> io::Result<PidFile> {
        let record = Record::of(pid)?;
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{service}.pid"));
        let tmp = dir.join(format!(".{service}.pid.{}", std::process::id()));
        std::fs::write(&tmp, record.render())?;
        std::fs::rename(&tmp, &path)?;
        Ok(PidFile { path, record })
    }

    /// Removes the file, unless another backend's record replaced it meanwhile.
    pub fn remove(self) {
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| Record::parse(&t))
            == Some(self.record);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Terminates the backends that pid files in `dir` name and whose Reveille is gone (SIGTERM
/// to the process group, SIGKILL after the service's grace from `grace`), and removes those
/// files. Returns how many process groups it terminated. A missing `dir` holds none.
pub async fn reap_leftovers(dir: &Path, grace: &dyn Fn(&str) -> Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut work = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(service) = name.strip_suffix(".pid").filter(|s| !s.starts_with('.')) else {
            continue;
        };
        let Some(record) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| Record::parse(&t))
        else {
            warn!(file = %path.display(), "unreadable pid file; removing it");
            let _ = std::fs::remove_file(&path);
            continue;
        };
        if is_running(record.owner, record.owner_start) {
            continue; // its Reveille runs: not a leftover
        }
        let grace = grace(service);
        let service = service.to_string();
        work.push(async move {
            let killed = terminate_orphan(&service, record, grace).await;
            let _ = std::fs::remove_file(&path);
            killed
        });
    }
    futures_util::future::join_all(work)
        .await
        .into_iter()
        .filter(|k| *k)
        .count()
}

/// Terminates an orphaned backend's group, if anything of it still runs. True if it did.
async fn terminate_orphan(service: &str, r: Record, grace: Duration) -> bool {
    // Its pid now names another process: the group was empty when the pid was reused (a
    // process group's number is not reused while the group has members).
    if stat(r.pid).is_ok_and(|s| s.start != r.start) {
        return false;
    }
    if !remains(r) {
        return false;
    }
    warn!(
        service,
        pid = r.pid,
        "terminating a backend left running by a previous Reveille"
    );
    signal(r, Signal::SIGTERM);
    if !gone(r, grace).await {
        warn!(
            service,
            pid = r.pid,
            "leftover backend ignored SIGTERM; killing it"
        );
        signal(r, Signal::SIGKILL);
        gone(r, KILL_WAIT).await;
    }
    info!(service, pid = r.pid, "leftover backend terminated");
    true
}

/// Whether the backend or any process of its group still runs.
fn remains(r: Record) -> bool {
    is_running(r.pid, r.start) || group_members(r.pid) > 0
}

/// Signals the group, and the backend itself in case it left the group.
fn signal(r: Record, sig: Signal) {
    let pid = Pid::from_raw(r.pid as i32);
    let _ = killpg(pid, sig);
    if is_running(r.pid, r.start) {
        let _ = kill(pid, sig);
    }
}

/// Waits up to `within` for nothing of the backend to run; true if nothing does.
async fn gone(r: Record, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if !remains(r) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        // No event tells that a process which is not our child exited: look again shortly.
        tokio::time::sleep(GONE_CHECK).await;
    }
}

/// Whether `pid` runs and is the process that started at `start`.
fn is_running(pid: u32, start: u64) -> bool {
    stat(pid).is_ok_and(|s| s.start == start && s.state != 'Z')
}

/// Processes of group `pgid` that run (zombies excluded).
fn group_members(pgid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| stat(pid).ok())
        .filter(|s| s.pgrp == pgid && s.state != 'Z')
        .count()
}

/// The fields of `/proc/PID/stat` used here.
#[derive(Debug, Clone, Copy)]
struct Stat {
    state: char,
    pgrp: u32,
    start: u64,
}

fn stat(pid: u32) -> io::Result<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::other(format!("unexpected /proc/{pid}/stat")))
}

/// Fields after the command name (which may hold spaces and parentheses): state is field 3,
/// pgrp field 5, starttime field 22.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_a_stat_line_with_odd_names_parses() {
        let r = Record {
            pid: 12,
            start: 345,
            owner: 6,
            owner_start: 78,
        };
        assert_eq!(Record::parse(&r.render()), Some(r));
        assert_eq!(Record::parse("pid 12\nstart x\n"), None);
        let s = parse_stat("42 (a) b (c)) S 1 40 40 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 987 0 0")
            .unwrap();
        assert_eq!((s.state, s.pgrp, s.start), ('S', 40, 987));
    }

    #[test]
    fn this_process_is_running_and_its_file_is_removed_only_while_it_is_its_own() {
        let dir = std::env::temp_dir().join(format!("reveille-pidfile-{}", std::process::id()));
        let me = std::process::id();
        let f = PidFile::write(&dir, "svc", me).unwrap();
        let r = f.record;
        assert!(is_running(r.pid, r.start));
        assert!(
            !is_running(r.pid, r.start + 1),
            "another start time is another process"
        );
        // Another backend's record replaced it: removing ours leaves it.
        let path = dir.join("svc.pid");
        let other = Record { pid: 1, ..r };
        std::fs::write(&path, other.render()).unwrap();
        f.remove();
        assert!(path.exists());
        let f = PidFile::write(&dir, "svc", me).unwrap();
        f.remove();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
