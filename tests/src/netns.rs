//! Named network namespaces (`ip netns`), and running code or processes inside one.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::thread;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use crate::process;

/// A network namespace bound at `/run/netns/<name>`. Plain data: the [`crate::cleanup::Cleanup`] that created it
/// deletes it.
#[derive(Clone, Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Netns {
        ip(&["netns", "add", name]);
        Netns {
            name: name.to_string(),
        }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// An fd on the namespace, for `setns`. Opened in the parent, before any fork, because a forked child of a
    /// multi-threaded process may only make raw syscalls.
    pub fn open(&self) -> OwnedFd {
        File::open(self.path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.path().display()))
            .into()
    }

    /// `ip -n <ns> <args>`; panics with ip's stderr on failure. (`ip -n` mounts its own sysfs in a private mount
    /// namespace, which is harmless for ip itself; see [`process::place`] for why processes are not started that way.)
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// A command that runs in this namespace, staying in the caller's cgroup.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        process::place(&mut cmd, None, Some(self));
        cmd
    }

    /// Runs `f` on a thread that has entered this namespace. Network namespace membership is per thread, and a
    /// socket keeps the namespace it was created in, so this is how the test process itself binds listeners in
    /// the node namespace without a helper process.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.open();
        thread::scope(|s| {
            s.spawn(move || {
                // setns changes only this short-lived thread's namespace.
                move_into_link_name_space(fd.as_fd(), Some(LinkNameSpaceType::Network))
                    .unwrap_or_else(|e| panic!("setns {}: {e}", self.name));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Netns {
    /// The MAC address of link `dev` in this namespace, as `ip -br link` prints it.
    pub fn link_mac(&self, dev: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-br", "link", "show", dev])
            .output()
            .expect("run ip");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no MAC for {dev} in {}: {text:?}", self.name))
            .to_string()
    }

    /// Sets `/proc/sys/<key>` (e.g. `net/ipv4/ip_forward`) in this namespace: the `net/` sysctls a process sees are
    /// those of its own network namespace, so the write happens on a thread inside it.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = PathBuf::from("/proc/sys").join(key);
        self.run_in(|| std::fs::write(&path, value))
            .unwrap_or_else(|e| {
                panic!("sysctl {} = {value} in {}: {e}", path.display(), self.name)
            });
    }
}

/// `ip <args>`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    process::run_ok(&mut cmd);
}

/// Deletes a named namespace; missing is fine. The namespace itself lives on until its last process or socket is
/// gone, which is why [`crate::cleanup::Cleanup`] kills the cgroups first.
pub fn delete(name: &str) {
    if PathBuf::from("/run/netns").join(name).exists() {
        let out = Command::new("ip")
            .args(["netns", "del", name])
            .output()
            .expect("run ip");
        if !out.status.success() {
            eprintln!(
                "warning: ip netns del {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

/// Names of all namespaces bound under /run/netns.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
