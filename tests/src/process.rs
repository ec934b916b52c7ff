//! Starting processes inside a cgroup and a network namespace, and running a command that must succeed.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use crate::cgroup::Cgroup;
use crate::netns::Netns;

/// Makes `cmd`'s child join `cgroup` and then `netns` before it execs.
///
/// Why not `ip netns exec`: it mounts a fresh sysfs, so the cgroup2 mount below /sys vanishes inside it and the
/// child could not be moved any more. Why the cgroup first: the move must be in place before the program runs a
/// single instruction, so that every socket it opens is attributed to that cgroup; the order against setns does
/// not matter to the kernel, but writing cgroup.procs needs nothing from the new namespace.
///
/// Both files are opened here, in the parent: after fork, a child of a multi-threaded process may only make raw
/// syscalls (no allocation), so the pre_exec hook only calls write(2) and setns(2) on ready fds. The fds are
/// O_CLOEXEC and owned by the hook, so they live as long as `cmd` and never leak into the program.
pub fn place(cmd: &mut Command, cgroup: Option<&Cgroup>, netns: Option<&Netns>) {
    let procs: Option<OwnedFd> = cgroup.map(|cg| {
        let path = cg.path.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
            .into()
    });
    let ns: Option<OwnedFd> = netns.map(Netns::open);
    // SAFETY: pre_exec runs the hook between fork and exec, where only async-signal-safe work is allowed: the hook
    // makes two raw syscalls through rustix on fds it owns, and builds its errors without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = &procs {
                // "0" means "the writing process".
                if rustix::io::write(fd, b"0")? != 1 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
            }
            if let Some(fd) = &ns {
                move_into_link_name_space(fd.as_fd(), Some(LinkNameSpaceType::Network))?;
            }
            Ok(())
        });
    }
}

/// Runs `cmd` to completion; panics with its output unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    check(cmd, &out, None);
    out
}

/// [`run_ok`] with `input` on the command's stdin.
pub fn run_ok_with_stdin(cmd: &mut Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .unwrap_or_else(|e| panic!("write to the stdin of {cmd:?}: {e}"));
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"));
    check(cmd, &out, Some(input));
    out
}

fn check(cmd: &Command, out: &Output, input: Option<&str>) {
    if out.status.success() {
        return;
    }
    let input = input.map_or(String::new(), |i| format!("\ninput:\n{i}"));
    panic!(
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}{input}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
