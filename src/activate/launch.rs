//! The launcher a process backend is started through when Reveille runs as its own binary:
//! `reveille __launch <reveille-pid> -- COMMAND ARGS...`.
//!
//! A backend must not outlive Reveille: after a `kill -9` it would keep the service's address,
//! and the next Reveille would route to a process it did not start. The launcher asks the
//! kernel to SIGKILL it when its parent dies (`PR_SET_PDEATHSIG`, which `exec` keeps), checks
//! that the parent did not die before that, and then execs the command in its own place (same
//! pid, same process group, environment and working directory as Reveille set them up). With
//! `unsafe_code` forbidden, this is how the child gets the setting: no `pre_exec` hook.
//!
//! The signal reaches the command itself. A wrapper's children (`sh -c 'a; b'`) are not its
//! target; they stay in the backend's process group, which the pid file names, and the next
//! Reveille terminates that group at start (see [`super::pidfile`]).

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use nix::unistd::{execvp, getppid};

/// The hidden subcommand's name.
pub const SUBCOMMAND: &str = "__launch";

/// The launcher's arguments: Reveille's pid, `--`, then the command.
pub fn args(parent: u32, command: &[String]) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![SUBCOMMAND.into(), parent.to_string().into(), "--".into()];
    v.extend(command.iter().map(OsString::from));
    v
}

/// Runs the launcher with the arguments after [`SUBCOMMAND`]. Returns only when the command
/// could not be run (127, as a shell does), or the arguments are wrong (2), or Reveille is
/// already gone (1).
pub fn run(args: &[OsString]) -> ExitCode {
    let [parent, dashes, command @ ..] = args else {
        return usage();
    };
    let Some(parent) = parent.to_str().and_then(|p| p.parse::<i32>().ok()) else {
        return usage();
    };
    if dashes != "--" || command.is_empty() {
        return usage();
    }
    if let Err(e) = set_pdeathsig(Signal::SIGKILL) {
        eprintln!("reveille {SUBCOMMAND}: cannot set the parent-death signal: {e}");
        return ExitCode::from(1);
    }
    // Reveille may have died before the line above, and then nothing would signal us.
    if getppid().as_raw() != parent {
        return ExitCode::from(1);
    }
    let argv: Result<Vec<CString>, _> =
        command.iter().map(|a| CString::new(a.as_bytes())).collect();
    let Ok(argv) = argv else {
        eprintln!("reveille {SUBCOMMAND}: an argument holds a NUL byte");
        return ExitCode::from(2);
    };
    let err = match execvp(&argv[0], &argv) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    eprintln!("reveille: cannot run {:?}: {err}", command[0]);
    ExitCode::from(127)
}

fn usage() -> ExitCode {
    eprintln!("usage: reveille {SUBCOMMAND} <parent-pid> -- COMMAND [ARGS...]");
    ExitCode::from(2)
}
