//! Teardown of everything a topology creates, and removal of what crashed earlier runs left behind.
//!
//! Every resource is named `nmie2e-<pid>-<k>[-suffix]` (pid of the test process, k a per-process counter), so a
//! leftover can be told apart from a live run's by whether its pid is still alive.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Once;

use crate::{cgroup, netns};

pub const PREFIX: &str = "nmie2e-";
pub const BPFFS: &str = "/sys/fs/bpf";

/// Records resources in creation order and removes them on drop. It is created before the first resource, so a
/// topology that panics half-built still cleans up what it made.
#[derive(Default)]
pub struct Cleanup {
    cgroup_root: Option<PathBuf>,
    netns: Vec<String>,
    pin_dirs: Vec<PathBuf>,
}

impl Cleanup {
    pub fn cgroup_root(&mut self, dir: &Path) {
        self.cgroup_root = Some(dir.to_path_buf());
    }
    pub fn netns(&mut self, name: &str) {
        self.netns.push(name.to_string());
    }
    pub fn pin_dir(&mut self, dir: &Path) {
        self.pin_dirs.push(dir.to_path_buf());
    }
    pub fn netns_names(&self) -> &[String] {
        &self.netns
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Processes first: they hold the namespaces alive and keep the cgroups busy.
        if let Some(root) = &self.cgroup_root {
            cgroup::kill_all(root);
        }
        // Removing the pins detaches the programs (their links were only held by the pins and the dead agent).
        for dir in &self.pin_dirs {
            remove_pin_dir(dir);
        }
        for name in self.netns.iter().rev() {
            netns::delete(name);
        }
        if let Some(root) = &self.cgroup_root {
            cgroup::remove_tree(root);
        }
    }
}

fn remove_pin_dir(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            eprintln!("warning: remove {}: {e}", dir.display())
        }
        _ => {}
    }
}

/// Once per test process, before the first topology: mount bpffs if needed (the agent pins there, and this
/// project's machines do not mount it at boot) and remove leftovers of dead runs.
pub fn prepare_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        mount_bpffs();
        // Nothing of ours exists yet, so a resource carrying our own pid belongs to an earlier process that had
        // the same pid, and is stale too.
        remove_stale_where(|pid| pid == std::process::id() || !alive(pid));
    });
}

/// Mounts bpffs at [`BPFFS`] unless one is there, exactly as the agent would.
fn mount_bpffs() {
    nmi_agent::datapath::ensure_bpffs(Path::new(BPFFS)).unwrap_or_else(|e| panic!("{e}"));
}

/// The pid in a resource name `nmie2e-<pid>-...`, if it is one of ours.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes every `nmie2e-<dead pid>-*` cgroup (killing what still runs there, e.g. an orphaned agent), pin dir
/// and network namespace. Safe while other runs, including this process's own topologies, are live.
pub fn remove_stale() {
    remove_stale_where(|pid| !alive(pid));
}

fn remove_stale_where(stale_pid: impl Fn(u32) -> bool) {
    let is_stale = |name: &str| owner_pid(name).is_some_and(&stale_pid);
    let stale_entries = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| is_stale(&e.file_name().to_string_lossy()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let cgroups = stale_entries(cgroup::root());
    for dir in &cgroups {
        cgroup::kill_all(dir);
    }
    for dir in stale_entries(Path::new(BPFFS)) {
        remove_pin_dir(&dir);
    }
    for name in netns::list().into_iter().filter(|n| is_stale(n)) {
        netns::delete(&name);
    }
    for dir in &cgroups {
        cgroup::remove_tree(dir);
    }
    let removed = cgroups.len();
    if removed > 0 {
        eprintln!("nmi-e2e: removed {removed} stale cgroup tree(s) of earlier runs");
    }
}

#[cfg(test)]
mod tests;
