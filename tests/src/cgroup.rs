//! cgroup v2 directories: create, identify, empty and remove them.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use nmi_agent::attest::cgroupfs::cgroup2_mount_in;
use nmi_testkit::wait::poll;
use rustix::process::{Pid, Signal, kill_process};

/// Where cgroup v2 is mounted. Hybrid hosts (this project's machines) have it at `/sys/fs/cgroup/unified`, AKS
/// nodes at `/sys/fs/cgroup`, so it is read from mountinfo rather than assumed, by the agent's own parser: the
/// harness and the agent must agree on it.
pub fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_else(|e| panic!("read /proc/self/mountinfo: {e}"));
        cgroup2_mount_in(&mountinfo).expect("no cgroup2 mount in /proc/self/mountinfo")
    })
}

/// One cgroup v2 directory. Plain data: the [`crate::cleanup::Cleanup`] that created it removes it.
#[derive(Clone, Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(path: PathBuf) -> Cgroup {
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup { path }
    }

    /// The id the kernel reports for this cgroup (`bpf_get_current_cgroup_id`): the directory's inode number.
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
            .ino()
    }

    /// The pids directly in this cgroup.
    pub fn procs(&self) -> Vec<i32> {
        procs(&self.path)
    }

    /// This cgroup's path as `/proc/<pid>/cgroup` shows it (relative to the cgroup v2 root, leading slash).
    pub fn proc_path(&self) -> String {
        format!(
            "/{}",
            self.path
                .strip_prefix(root())
                .expect("cgroup under the cgroup2 root")
                .display()
        )
    }
}

fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Kills every process in the subtree at `dir` and waits until the kernel reports it empty, so that the
/// directories can be removed. `cgroup.kill` (5.14+) is atomic against forks; older kernels get a SIGKILL per pid,
/// repeated until nothing is left.
pub fn kill_all(dir: &Path) {
    let kill_file = dir.join("cgroup.kill");
    let have_kill = kill_file.exists();
    if have_kill {
        let _ = fs::write(&kill_file, "1");
    }
    let emptied = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        if !populated(dir) {
            return Some(());
        }
        if !have_kill {
            for pid in subtree(dir).iter().flat_map(|sub| procs(sub)) {
                // A pid that is gone by now only yields ESRCH.
                if let Some(pid) = Pid::from_raw(pid) {
                    let _ = kill_process(pid, Signal::KILL);
                }
            }
        }
        None
    });
    if emptied.is_none() {
        eprintln!(
            "warning: {} still populated after SIGKILL; leaving it",
            dir.display()
        );
    }
}

/// Whether any live process is in the subtree (`populated` in `cgroup.events` counts descendants too).
fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// `dir` and all cgroup directories below it, parents before children.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = fs::read_dir(&out[i]) {
            out.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    out
}

/// Kills everything in the subtree at `dir`, then removes its directories leaf-first. Missing is fine (cleanup runs
/// on partially built topologies). A directory that stays busy is reported, not fatal: a panic in a destructor
/// would abort the test binary and hide the test's own failure.
pub fn remove_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    kill_all(dir);
    for sub in subtree(dir).iter().rev() {
        // rmdir can briefly fail with EBUSY while the last killed task is being released.
        let mut last_error = None;
        let removed =
            poll(
                Duration::from_secs(5),
                Duration::from_millis(20),
                || match fs::remove_dir(sub) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        last_error = Some(e);
                        None
                    }
                    _ => Some(()),
                },
            );
        if let (None, Some(e)) = (removed, last_error) {
            eprintln!("warning: rmdir {}: {e}", sub.display());
        }
    }
}
