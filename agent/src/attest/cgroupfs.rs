//! cgroup v2 on the host: where it is mounted, which cgroup we are in, and cgroup id -> path.

use std::{
    collections::HashMap,
    fs,
    ops::ControlFlow,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Mutex, RwLock},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup2 filesystem in /proc/self/mountinfo; nmi-agent needs cgroup v2 (unified hierarchy)"
    )]
    NoCgroup2,
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--cgroup {0} is not inside the cgroup v2 mount {1}; pass a directory under it")]
    OutsideMount(PathBuf, PathBuf),
    #[error(
        "could not find this process's own cgroup (cgroup namespace hides it and no cgroup.procs lists our pid)"
    )]
    OwnCgroupNotFound,
    #[error("found no kubelet pods cgroup (kubepods.slice or kubepods) under {0}; pass --cgroup")]
    NoKubepods(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The cgroup v2 mount point, from a mountinfo text. `/sys/fs/cgroup` wins when there are several (AKS); hybrid hosts
/// mount it at `/sys/fs/cgroup/unified`.
///
/// Read as proc(5) lays a line out: six fields (the fifth is the mount point), optional fields up to a `-`, then the
/// filesystem type. Fields are separated by single spaces: the kernel escapes only space, tab, newline and backslash in
/// a mount point, so any other whitespace (a vertical tab, a no-break space) is part of the name, and so is a `-`.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    let mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let mount_point = fields.nth(4)?;
            let fs_type = fields.skip(1).skip_while(|f| *f != "-").nth(1)?;
            (fs_type == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect();
    mounts
        .iter()
        .find(|m| m.as_path() == Path::new("/sys/fs/cgroup"))
        .or_else(|| mounts.first())
        .cloned()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io(path))?;
    cgroup2_mount_in(&text).ok_or(CgroupError::NoCgroup2)
}

/// This process's cgroup v2 directory.
///
/// `/proc/self/cgroup` names it relative to our cgroup namespace. A container usually has its own (containerd does
/// this on cgroup v2), and then the file says `0::/` although we sit deep under `kubepods.slice`; joining that with
/// the host's mount would name the root. So when the path is the root, look for the cgroup that lists our pid,
/// first under `search_root` (the intercepted subtree, where an agent running as a pod lives), then the whole mount.
pub fn own_cgroup(mount: &Path, search_root: &Path) -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(io(path))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NoCgroup2)?
        .trim_start_matches('/');
    let pid = std::process::id().to_string();
    let lists_us = |dir: &Path| {
        fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|p| p.trim() == pid))
    };
    // Taken as it stands only if that cgroup really lists us: inside a cgroup namespace a non-root path is relative
    // to the namespace, and joined onto the host's mount it could name some other cgroup, which we would exempt.
    let named = mount.join(rel);
    if !rel.is_empty() && lists_us(&named) {
        return Ok(named);
    }
    [search_root, mount]
        .into_iter()
        .find_map(|root| {
            let found = walk_dirs(root, Path::new("/"), 0, &mut |dir, _| {
                if lists_us(dir) {
                    ControlFlow::Break(dir.to_owned())
                } else {
                    ControlFlow::Continue(())
                }
            });
            found.break_value()
        })
        .ok_or(CgroupError::OwnCgroupNotFound)
}

/// Visits `dir` (as `rel` under the walk's root) and the directories below it, depth first and at most
/// [`WALK_DEPTH_MAX`] levels deep, until `visit` breaks. Unreadable directories are skipped.
fn walk_dirs<B>(
    dir: &Path,
    rel: &Path,
    depth: usize,
    visit: &mut impl FnMut(&Path, &Path) -> ControlFlow<B>,
) -> ControlFlow<B> {
    visit(dir, rel)?;
    if depth >= WALK_DEPTH_MAX {
        return ControlFlow::Continue(());
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return ControlFlow::Continue(());
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk_dirs(
                &entry.path(),
                &rel.join(entry.file_name()),
                depth + 1,
                visit,
            )?;
        }
    }
    ControlFlow::Continue(())
}

/// A cgroup's id: the inode number of its directory, which is what `bpf_get_current_cgroup_id` returns.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(dir).map_err(io(dir))?.ino())
}

/// The kubelet's pods cgroup: `kubepods.slice` (systemd driver) or `kubepods` (cgroupfs driver).
pub fn kubepods(mount: &Path) -> Result<PathBuf, CgroupError> {
    ["kubepods.slice", "kubepods"]
        .iter()
        .map(|name| mount.join(name))
        .find(|p| p.is_dir())
        .ok_or_else(|| CgroupError::NoKubepods(mount.to_owned()))
}

/// Checks that `dir` is a cgroup v2 directory under `mount`.
pub fn check_under_mount(dir: &Path, mount: &Path) -> Result<PathBuf, CgroupError> {
    let dir = fs::canonicalize(dir).map_err(io(dir))?;
    if !dir.starts_with(mount) {
        return Err(CgroupError::OutsideMount(dir, mount.to_owned()));
    }
    Ok(dir)
}

/// Beyond this many remembered cgroups the cache starts over: ids of removed cgroups are never reused, so stale
/// entries are harmless but must not grow without bound.
const CACHE_MAX: usize = 65_536;
/// kubelet nests pods four or five levels deep; this bounds a walk on a pathological tree.
const WALK_DEPTH_MAX: usize = 12;

/// cgroup id -> path under the intercepted root. Cached; a miss walks the subtree once and refreshes the cache.
pub struct CgroupResolver {
    root: PathBuf,
    cache: RwLock<HashMap<u64, PathBuf>>,
    walk: Mutex<()>,
}

impl CgroupResolver {
    pub fn new(root: PathBuf) -> Self {
        CgroupResolver {
            root,
            cache: RwLock::new(HashMap::new()),
            walk: Mutex::new(()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn cached(&self, id: u64) -> Option<PathBuf> {
        self.cache.read().ok()?.get(&id).cloned()
    }

    /// The path (relative to the root, with a leading `/`) of cgroup `id`, or `None` if it is not (or no longer) under
    /// the root.
    pub fn path_of(&self, id: u64) -> Option<PathBuf> {
        if let Some(p) = self.cached(id) {
            return Some(p);
        }
        // One walk at a time; whoever waited re-checks the cache the previous walk filled.
        let _walking = self.walk.lock().ok()?;
        if let Some(p) = self.cached(id) {
            return Some(p);
        }
        let mut found = HashMap::new();
        let _ = walk_dirs::<()>(&self.root, Path::new("/"), 0, &mut |dir, rel| {
            if let Ok(meta) = fs::metadata(dir) {
                found.insert(meta.ino(), rel.to_owned());
            }
            ControlFlow::Continue(())
        });
        let hit = found.get(&id).cloned();
        if let Ok(mut cache) = self.cache.write() {
            if cache.len() + found.len() > CACHE_MAX {
                cache.clear();
            }
            cache.extend(found);
        }
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_mount_on_hybrid_hosts_and_prefers_sys_fs_cgroup() {
        let hybrid = "25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                      42 25 0:39 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let aks = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount_in(aks), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            cgroup2_mount_in("1 2 0:3 / /proc rw - proc proc rw\n"),
            None
        );
    }

    #[test]
    fn mount_points_with_spaces_are_unescaped() {
        let info = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(info),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    /// Found by fuzzing (fuzz/regressions/mountinfo/): whitespace other than a space inside a mount point split it in two.
    #[test]
    fn whitespace_the_kernel_does_not_escape_stays_in_the_mount_point() {
        let info = "41 31 0:38 / /mnt/a\u{b}b\u{a0}c rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(info),
            Some(PathBuf::from("/mnt/a\u{b}b\u{a0}c"))
        );
    }

    /// Found by fuzzing: a mount point named `-` was taken for the separator before the filesystem type.
    #[test]
    fn a_mount_point_named_like_the_separator_is_still_the_mount_point() {
        let info = "36 25 0:30 / - rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount_in(info), Some(PathBuf::from("-")));
        let no_optional_fields = "36 25 0:30 / /a rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(no_optional_fields),
            Some(PathBuf::from("/a"))
        );
    }

    #[test]
    fn resolves_ids_of_nested_directories_and_refreshes_on_miss() {
        let root = tempfile::tempdir().expect("tempdir");
        let a = root.path().join("kubepods-burstable.slice/pod1");
        fs::create_dir_all(&a).expect("mkdir");
        let resolver = CgroupResolver::new(root.path().to_owned());
        let id_a = cgroup_id(&a).expect("id");
        assert_eq!(
            resolver.path_of(id_a),
            Some(PathBuf::from("/kubepods-burstable.slice/pod1"))
        );
        // A directory created after the first walk is found by the refresh a miss triggers.
        let b = root.path().join("late");
        fs::create_dir(&b).expect("mkdir");
        assert_eq!(
            resolver.path_of(cgroup_id(&b).expect("id")),
            Some(PathBuf::from("/late"))
        );
        assert_eq!(resolver.path_of(u64::MAX), None);
    }
}
