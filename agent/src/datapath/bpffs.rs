//! Pins need a bpf filesystem. On many hosts (including these test machines) nothing mounts one at /sys/fs/bpf.

use std::path::Path;

use rustix::mount::{MountFlags, mount};

/// `BPF_FS_MAGIC` from linux/magic.h; rustix names only a few filesystems' magic numbers.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    // f_type is a signed word on some targets; the magic is compared as the unsigned 32-bit value it is.
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type as u64 & 0xffff_ffff == BPF_FS_MAGIC)
}

/// Whether `path` is the mount point of a bpf filesystem itself (its parent is on another filesystem).
pub fn is_bpffs_root(path: &Path) -> bool {
    is_bpffs(path) && path.parent().is_none_or(|parent| !is_bpffs(parent))
}

/// Makes sure `pin_dir` lies on a bpf filesystem, mounting one at /sys/fs/bpf when the pin dir is under it and nothing
/// is mounted there yet.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), String> {
    let mut existing = pin_dir;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if is_bpffs(existing) {
        return Ok(());
    }
    let default = Path::new(DEFAULT_BPFFS);
    if !pin_dir.starts_with(default) {
        return Err(format!(
            "pin dir {} is not on a bpf filesystem; mount one (mount -t bpf bpf DIR) or use a dir under {DEFAULT_BPFFS}",
            pin_dir.display()
        ));
    }
    if let Err(e) = mount("bpf", DEFAULT_BPFFS, "bpf", MountFlags::empty(), None) {
        return Err(format!(
            "mounting bpffs at {DEFAULT_BPFFS}: {} (needs CAP_SYS_ADMIN; on Kubernetes mount the host's /sys/fs/bpf)",
            std::io::Error::from(e)
        ));
    }
    tracing::info!(path = DEFAULT_BPFFS, "mounted bpffs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordinary_directory_is_not_bpffs() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!is_bpffs(dir.path()));
        assert!(!is_bpffs_root(dir.path()));
    }

    #[test]
    fn a_pin_dir_outside_sys_fs_bpf_on_another_filesystem_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = ensure_bpffs(&dir.path().join("pins")).expect_err("accepted a non-bpf pin dir");
        assert!(err.contains("mount -t bpf"), "{err}");
    }
}
