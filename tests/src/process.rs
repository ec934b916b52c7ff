//! Starting processes inside a cgroup and a network namespace.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

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
    // SAFETY: the hook makes only async-signal-safe syscalls on fds it owns.
    unsafe {
        cmd.pre_exec(move || {
            let check = |ok: bool| match ok {
                true => Ok(()),
                false => Err(std::io::Error::last_os_error()),
            };
            if let Some(fd) = &procs {
                // "0" means "the writing process".
                check(libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1)?;
            }
            if let Some(fd) = &ns {
                check(libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) == 0)?;
            }
            Ok(())
        });
    }
}

/// Runs `cmd` to completion; panics with its stderr unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out
}
