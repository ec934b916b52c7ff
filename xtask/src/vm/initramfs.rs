//! The guest's whole filesystem: an initramfs holding busybox, the test binaries, the host programs the tests run
//! (`ip`, `nft`, `ss`) with the shared libraries they load, the kernel modules the tests' networking needs, and
//! `xtask/vm/init.sh` as `/init`.
//!
//! Why not share the host's root over 9p or virtiofs: Debian's cloud kernel has no 9p, virtiofs would need a
//! daemon with write access to the host, and a self-contained image keeps the guest from touching any host file.

use std::{
    collections::{BTreeSet, HashMap},
    ffi::OsString,
    fs::{self, File},
    io::Write,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Component, Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::kernel::Kernel;
use crate::cmd;

/// PID 1 of the guest.
const INIT: &str = include_str!("../../vm/init.sh");

/// Host programs the tests start by name; the guest finds them on PATH where the host has them. `ss` lists sockets
/// (the record tests wait for a connection to sit in the agent's backlog).
const PROGRAMS: [&str; 3] = ["ip", "nft", "ss"];

/// Module subtrees (relative to `lib/modules/<release>`) the tests' topologies need: veth and bridge links, and
/// nftables for the trap counter. All of netfilter rather than the handful the trap loads today, so that a test adding
/// an nft rule does not fail on a module missing from the image; dependencies outside these trees are added. The
/// socket-diagnostics modules answer `ss`. The tunnel endpoints a CNI would add (IPIP, VXLAN) carry the forged packets
/// of the forwarding-guard tests, and 6.1 has no TCX, so the guard goes on a clsact qdisc with a cls_bpf filter.
const MODULE_TREES: [&str; 11] = [
    "kernel/net/netfilter/",
    "kernel/net/ipv4/netfilter/",
    "kernel/net/ipv6/netfilter/",
    "kernel/net/bridge/",
    "kernel/drivers/net/veth.ko",
    "kernel/net/ipv4/inet_diag.ko",
    "kernel/net/ipv4/tcp_diag.ko",
    "kernel/net/ipv4/ipip.ko",
    "kernel/drivers/net/vxlan/",
    "kernel/net/sched/sch_ingress.ko",
    "kernel/net/sched/cls_bpf.ko",
];

/// Where the guest finds what xtask put there (the init script reads these paths too).
pub const GUEST_BIN_DIR: &str = "/nmi/bin";
pub const GUEST_TEST: &str = "/nmi/bin/datapath";

/// What the guest runs, as host paths.
pub struct Payload<'a> {
    pub test_binary: &'a Path,
    /// `nmi-agent`, `nmi-probe`, ...: copied into [`GUEST_BIN_DIR`] under their own names.
    pub binaries: Vec<PathBuf>,
    /// Environment of the test process, written to `/nmi/env`.
    pub env: Vec<(&'static str, String)>,
    /// Arguments of the test binary, one per line in `/nmi/test-args`.
    pub test_args: Vec<String>,
}

/// Builds `<vm_dir>/initramfs.cpio` (uncompressed: TCG decompresses slowly, and the host has the memory) from a
/// fresh staging directory.
pub fn build(vm_dir: &Path, kernel: &Kernel, busybox: &Path, payload: &Payload) -> Result<PathBuf> {
    let stage = vm_dir.join("initramfs");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("cannot remove {}", stage.display()))?;
    }
    fs::create_dir_all(stage.join("nmi/bin"))
        .with_context(|| format!("cannot create {}", stage.display()))?;

    copy_executable(&stage, busybox, Path::new("/nmi/busybox"))?;
    for program in PROGRAMS {
        let path = cmd::find_program(program).with_context(|| {
            format!("`{program}` is not installed on the host; the VM copies it from there")
        })?;
        mirror_file(&stage, &path)?;
        add_libraries(&stage, &path)?;
    }
    copy_executable(&stage, payload.test_binary, Path::new(GUEST_TEST))?;
    for binary in &payload.binaries {
        let name = binary
            .file_name()
            .with_context(|| format!("{} has no file name", binary.display()))?;
        copy_executable(&stage, binary, &Path::new(GUEST_BIN_DIR).join(name))?;
    }
    add_modules(&stage, kernel)?;

    write_file(&stage.join("init"), INIT, 0o755)?;
    let env: String = payload
        .env
        .iter()
        .map(|(key, value)| format!("export {key}={}\n", shell_quote(value)))
        .collect();
    write_file(&stage.join("nmi/env"), &env, 0o644)?;
    let args: String = payload
        .test_args
        .iter()
        .map(|arg| format!("{arg}\n"))
        .collect();
    write_file(&stage.join("nmi/test-args"), &args, 0o644)?;

    let archive = vm_dir.join("initramfs.cpio");
    pack(&stage, &archive)?;
    Ok(archive)
}

/// Copies a binary to `guest` (an absolute guest path outside the mirrored host tree) plus its libraries.
fn copy_executable(stage: &Path, host: &Path, guest: &Path) -> Result<()> {
    let target = stage.join(guest.strip_prefix("/").unwrap_or(guest));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    fs::copy(host, &target)
        .with_context(|| format!("cannot copy {} into the initramfs", host.display()))?;
    add_libraries(stage, host)
}

/// Mirrors every shared library `binary` loads (as `ldd` resolves them on the host, the dynamic loader included).
fn add_libraries(stage: &Path, binary: &Path) -> Result<()> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("could not run ldd on {}", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // A static binary (busybox-static) has nothing to add.
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&output.stderr).contains("not a dynamic executable")
        {
            return Ok(());
        }
        bail!("ldd {} failed: {text}", binary.display());
    }
    for library in parse_ldd(&text).with_context(|| format!("ldd {}", binary.display()))? {
        mirror_file(stage, &library)?;
    }
    Ok(())
}

/// The library paths in `ldd` output; an unresolved library is an error (the guest could not start the binary).
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in text.lines().map(str::trim) {
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    bail!("{} is not installed", name.trim());
                }
                target
            }
            None => line,
        };
        // `(0x...)` follows every path; the vDSO has no path at all.
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// Copies the host file at `path` into `stage` under the same path, recreating each symlink met on the way (Debian's
/// `/lib -> usr/lib`, `/usr/sbin/ip -> /bin/ip`), so that PATH lookups and the dynamic loader behave as on the host.
fn mirror_file(stage: &Path, path: &Path) -> Result<()> {
    let real = mirror_path(stage, path)?;
    let target = staged(stage, &real);
    if target.exists() {
        return Ok(());
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    fs::copy(&real, &target)
        .map(drop)
        .with_context(|| format!("cannot copy {} into the initramfs", real.display()))
}

/// Resolves `path` on the host like the kernel would, creating in `stage` every symlink it passes through, and
/// returns the real path. Staged directories are only ever created at real (symlink-free) paths, so no write can
/// follow a staged symlink out of `stage`.
fn mirror_path(stage: &Path, path: &Path) -> Result<PathBuf> {
    let mut pending: Vec<OsString> = components(path);
    let mut real = PathBuf::from("/");
    let mut hops = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            real.pop();
            continue;
        }
        let host = real.join(&name);
        let meta = fs::symlink_metadata(&host).with_context(|| {
            format!(
                "cannot stat {} (resolving {})",
                host.display(),
                path.display()
            )
        })?;
        if !meta.file_type().is_symlink() {
            real = host;
            continue;
        }
        hops += 1;
        if hops > 40 {
            bail!("too many symlinks resolving {}", path.display());
        }
        let link =
            fs::read_link(&host).with_context(|| format!("cannot read {}", host.display()))?;
        let target = staged(stage, &host);
        if fs::symlink_metadata(&target).is_err() {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            symlink(&link, &target)
                .with_context(|| format!("cannot create the symlink {}", target.display()))?;
        }
        if link.is_absolute() {
            real = PathBuf::from("/");
        }
        pending.extend(components(&link));
    }
    Ok(real)
}

/// Path components as a stack (last component first out), `..` kept, `.` and the root dropped.
fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .rev()
        .filter_map(|component| match component {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn staged(stage: &Path, host: &Path) -> PathBuf {
    stage.join(host.strip_prefix("/").unwrap_or(host))
}

/// Copies the modules under [`MODULE_TREES`] and everything they depend on, with the package's own `modules.dep`,
/// `modules.alias` and friends: the kernel asks the guest's (busybox) modprobe for `nft-expr-objref` or
/// `rtnl-link-veth`, and modprobe resolves those names through these files.
fn add_modules(stage: &Path, kernel: &Kernel) -> Result<()> {
    let source = kernel.modules();
    let dep_file = source.join("modules.dep");
    let deps = fs::read_to_string(&dep_file)
        .with_context(|| format!("cannot read {}", dep_file.display()))?;
    let wanted = module_closure(&deps, &MODULE_TREES);
    if wanted.is_empty() {
        bail!("{} lists none of {MODULE_TREES:?}", dep_file.display());
    }
    // The guest's /lib/modules goes where the host's /lib points (usr/lib on merged-/usr Debian).
    let lib = mirror_path(stage, Path::new("/lib"))?;
    let target = staged(stage, &lib).join("modules").join(&kernel.release);
    for module in &wanted {
        let to = target.join(module);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        fs::copy(source.join(module), &to)
            .with_context(|| format!("cannot copy module {module}"))?;
    }
    for index in [
        "modules.dep",
        "modules.alias",
        "modules.symbols",
        "modules.builtin",
        "modules.order",
    ] {
        // Entries for modules left out make modprobe fail the same way as a module the kernel lacks.
        fs::copy(source.join(index), target.join(index))
            .with_context(|| format!("cannot copy {index} of {}", source.display()))?;
    }
    Ok(())
}

/// The modules `modules.dep` lists under `trees` plus, transitively, everything they need.
fn module_closure(modules_dep: &str, trees: &[&str]) -> BTreeSet<String> {
    let table: HashMap<&str, Vec<&str>> = modules_dep
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, deps)| (module.trim(), deps.split_whitespace().collect()))
        .collect();
    let mut todo: Vec<&str> = table
        .keys()
        .copied()
        .filter(|module| trees.iter().any(|tree| module.starts_with(tree)))
        .collect();
    let mut wanted = BTreeSet::new();
    while let Some(module) = todo.pop() {
        if wanted.insert(module.to_owned())
            && let Some(deps) = table.get(module)
        {
            todo.extend(deps.iter().copied());
        }
    }
    wanted
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut file =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

/// Single-quotes `value` for sh.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// Packs `stage` as a newc cpio archive (the format the kernel unpacks), every entry owned by root.
fn pack(stage: &Path, archive: &Path) -> Result<()> {
    let mut entries = Vec::new();
    list(stage, Path::new(""), &mut entries)?;
    let out =
        File::create(archive).with_context(|| format!("cannot create {}", archive.display()))?;
    let mut cpio = Command::new("cpio")
        .args(["--create", "--format=newc", "--owner=0:0", "--quiet"])
        .current_dir(stage)
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .context("could not start cpio (Debian package cpio)")?;
    let mut stdin = cpio.stdin.take().context("cpio has no stdin")?;
    for entry in &entries {
        writeln!(stdin, "{}", entry.display()).context("cannot feed cpio its file list")?;
    }
    drop(stdin);
    let status = cpio.wait().context("cpio did not finish")?;
    if !status.success() {
        bail!("cpio failed ({status}) packing {}", stage.display());
    }
    Ok(())
}

/// Every path under `dir` relative to the stage, parents before children, symlinks not followed.
fn list(stage: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let full = stage.join(dir);
    let mut names: Vec<OsString> = fs::read_dir(&full)
        .with_context(|| format!("cannot list {}", full.display()))?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot list {}", full.display()))?;
    names.sort();
    for name in names {
        let relative = dir.join(&name);
        out.push(relative.clone());
        if fs::symlink_metadata(stage.join(&relative))
            .with_context(|| format!("cannot stat {}", relative.display()))?
            .is_dir()
        {
            list(stage, &relative, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
