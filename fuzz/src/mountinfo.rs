//! `/proc/self/mountinfo` -> the cgroup v2 mount. Never panics on any text; a mount point comes back exactly as the
//! kernel named it, whatever characters it holds; and `/sys/fs/cgroup` wins over every other cgroup2 mount.

use std::path::{Path, PathBuf};

use nmi_agent::attest::cgroupfs::cgroup2_mount_in;

const SYS_FS_CGROUP: &str =
    "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw";

pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let found = cgroup2_mount_in(&text);
    if let Some(mount) = &found {
        assert!(
            text.lines().any(|line| line.contains("cgroup2")),
            "{mount:?} found in a text without a cgroup2 line"
        );
    }
    assert_eq!(
        cgroup2_mount_in(&format!("{text}\n{SYS_FS_CGROUP}\n")).as_deref(),
        Some(Path::new("/sys/fs/cgroup")),
        "/sys/fs/cgroup did not win over the mounts in {text:?}"
    );

    // The first line as a mount point: the kernel escapes space, tab, newline and backslash (and nothing else).
    let mount_point = text.lines().next().unwrap_or_default().replace('\0', "");
    if mount_point.is_empty() {
        return;
    }
    let line = format!(
        "36 25 0:30 / {} rw,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate",
        kernel_escape(&mount_point)
    );
    assert_eq!(
        cgroup2_mount_in(&line),
        Some(PathBuf::from(&mount_point)),
        "the mount point of {line:?} read back wrong"
    );
}

/// What the kernel's `mangle()` does to a mount point in mountinfo.
fn kernel_escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}
