//! Reading /proc/self/mountinfo: where cgroup2 and bpffs are mounted.

use std::path::PathBuf;

/// Mount points of all filesystems of type `fstype` in this process's mount namespace, in mount order.
pub fn mount_points(fstype: &str) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    parse(&info, fstype)
}

fn parse(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // Fields: id parent maj:min root mount-point options [optional...] - fstype source super-options
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == fstype).then(|| PathBuf::from(mount_point))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mounts_by_type_in_hybrid_and_unified_layouts() {
        let hybrid = "30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n\
                      42 30 0:39 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      50 24 0:45 / /sys/fs/bpf rw,relatime - bpf bpf rw\n";
        assert_eq!(
            parse(hybrid, "cgroup2"),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert_eq!(parse(hybrid, "bpf"), [PathBuf::from("/sys/fs/bpf")]);
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(parse(unified, "cgroup2"), [PathBuf::from("/sys/fs/cgroup")]);
        assert!(parse(unified, "bpf").is_empty());
    }
}
