//! Pins need a bpf filesystem. On many hosts (including these test machines) nothing mounts one at /sys/fs/bpf.

use std::{ffi::CString, path::Path};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs with a valid NUL-terminated path and a zeroed out-struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
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
    let target = CString::new(DEFAULT_BPFFS).map_err(|e| e.to_string())?;
    let fstype = CString::new("bpf").map_err(|e| e.to_string())?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mounting bpffs at {DEFAULT_BPFFS}: {} (needs CAP_SYS_ADMIN; on Kubernetes mount the host's /sys/fs/bpf)",
            std::io::Error::last_os_error()
        ));
    }
    tracing::info!(path = DEFAULT_BPFFS, "mounted bpffs");
    Ok(())
}
