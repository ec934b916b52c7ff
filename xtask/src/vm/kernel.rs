//! The kernel the VM boots: Debian 12's `linux-image-cloud-amd64` (Linux 6.1), fetched with `apt-get download` and
//! unpacked with `dpkg-deb -x` under `target/vm/`. Nothing is installed on the host: no files in /boot or
//! /lib/modules, no initramfs or bootloader hooks.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    cmd::{self, announce},
    host::Apt,
};

/// Debian's meta-package for the current 6.1 ABI of the small "cloud" flavour (virtio, netfilter and BPF as in the
/// generic kernel, fewer hardware drivers). It depends on exactly one `linux-image-6.1.0-<abi>-cloud-amd64`.
const META_PACKAGE: &str = "linux-image-cloud-amd64";
/// The kernel line this step exists to test; a host whose apt sources resolve the meta-package to another line
/// (Debian 13 ships 6.12) must not silently test that instead.
const WANTED_LINE: &str = "6.1.";
/// Written last into an unpacked kernel directory, holding the package version: a directory without it is an
/// interrupted unpack and is redone.
const STAMP: &str = ".nmi-kernel-version";

pub struct Kernel {
    /// What `uname -r` says in the guest, e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    /// The Debian package version, e.g. `6.1.192-3` (upstream Linux 6.1.192).
    pub version: String,
    /// The unpacked package: `boot/vmlinuz-<release>` and `lib/modules/<release>/` with its `modules.dep`.
    root: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    /// `lib/modules/<release>` of the unpacked package, with `modules.dep` and `modules.alias` generated.
    pub fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// The unpacked kernel under `vm_dir`, downloading it when the current package is not there yet. `busybox` runs
/// `depmod`, which Debian hosts without kmod lack.
pub fn fetch(vm_dir: &Path, busybox: &Path, apt: &mut Apt) -> Result<Kernel> {
    let package = match current_package() {
        Ok(package) => package,
        // No package lists yet (a fresh container) or a stale view of them: refresh once and ask again.
        Err(_) if !apt.is_updated() => {
            apt.update()?;
            current_package()?
        }
        Err(error) => return Err(error),
    };
    let release = package
        .strip_prefix("linux-image-")
        .context("unreachable: current_package only returns linux-image-* names")?
        .to_owned();
    let root = vm_dir.join(&package);
    if let Ok(version) = fs::read_to_string(root.join(STAMP)) {
        announce(format!(
            "kernel {release} ({package} {version}) already unpacked"
        ));
        return Ok(Kernel {
            release,
            version,
            root,
        });
    }

    fs::create_dir_all(vm_dir).with_context(|| format!("cannot create {}", vm_dir.display()))?;
    let deb = match download(vm_dir, &package) {
        Ok(deb) => deb,
        // The mirror drops superseded kernels, so stale lists can name a file that is gone.
        Err(_) if !apt.is_updated() => {
            apt.update()?;
            download(vm_dir, &package)?
        }
        Err(error) => return Err(error),
    };
    let version = cmd::stdout(
        Command::new("dpkg-deb")
            .args(["--field"])
            .arg(&deb)
            .arg("Version"),
        "dpkg-deb could not read the downloaded package; delete it and retry",
    )?
    .trim()
    .to_owned();
    unpack(&deb, &root, &release, busybox)?;
    fs::write(root.join(STAMP), &version)
        .with_context(|| format!("cannot write {}", root.join(STAMP).display()))?;
    fs::remove_file(&deb).with_context(|| format!("cannot remove {}", deb.display()))?;
    remove_older_kernels(vm_dir, &package);
    Ok(Kernel {
        release,
        version,
        root,
    })
}

/// `linux-image-6.1.0-<abi>-cloud-amd64`: what the meta-package depends on in the host's package lists.
fn current_package() -> Result<String> {
    let depends = cmd::stdout(
        Command::new("apt-cache").args(["depends", "--important", META_PACKAGE]),
        "apt-cache needs the package lists (`apt-get update`); this step needs a Debian host",
    )?;
    let package = depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-"))
        .with_context(|| {
            format!("{META_PACKAGE} depends on no linux-image-* package:\n{depends}")
        })?;
    let release = package.trim_start_matches("linux-image-");
    if !release.starts_with(WANTED_LINE) {
        bail!(
            "{META_PACKAGE} resolves to {package} here, not to Linux 6.1: this step tests Debian 12 (bookworm)'s \
             kernel; add bookworm to the apt sources or run on Debian 12"
        );
    }
    Ok(package.to_owned())
}

fn download(vm_dir: &Path, package: &str) -> Result<PathBuf> {
    announce(format!("apt-get download {package}"));
    // apt drops to the `_apt` user for downloads, which cannot write to a root-owned target dir; the sandbox
    // setting keeps it as the caller instead of warning about that on every run.
    cmd::run(
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
            .current_dir(vm_dir),
        "needs network access to the Debian mirrors",
    )?;
    let prefix = format!("{package}_");
    let entries =
        fs::read_dir(vm_dir).with_context(|| format!("cannot list {}", vm_dir.display()))?;
    entries
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&prefix) && name.ends_with(".deb"))
        })
        .with_context(|| {
            format!(
                "apt-get download reported success but no {prefix}*.deb is in {}",
                vm_dir.display()
            )
        })
}

/// Unpacks into a sibling directory first and renames it into place, so an interrupted run leaves nothing that
/// looks complete; then generates `modules.dep` and `modules.alias` (the package's postinst would run depmod).
fn unpack(deb: &Path, root: &Path, release: &str, busybox: &Path) -> Result<()> {
    // Not with_extension: the release itself contains dots.
    let mut partial = root.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    for dir in [&partial, &root.to_path_buf()] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
    }
    announce(format!(
        "unpacking {} into {}",
        deb.display(),
        root.display()
    ));
    cmd::run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(&partial),
        "dpkg-deb could not unpack the kernel package; delete it and retry",
    )?;
    cmd::run(
        Command::new(busybox)
            .args(["depmod", "-b"])
            .arg(&partial)
            .arg(release),
        "busybox depmod failed on the unpacked kernel modules",
    )?;
    let kernel = partial.join("boot").join(format!("vmlinuz-{release}"));
    if !kernel.is_file() {
        bail!(
            "the package has no boot/vmlinuz-{release}; is {} a kernel image package?",
            deb.display()
        );
    }
    fs::rename(&partial, root).with_context(|| format!("cannot rename {}", partial.display()))
}

/// Keeps target/vm to one kernel: Debian bumps the ABI number with most security updates.
fn remove_older_kernels(vm_dir: &Path, current: &str) {
    let Ok(entries) = fs::read_dir(vm_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("linux-image-") && name != current && entry.path().is_dir() {
            announce(format!("removing the superseded kernel {name}"));
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
