//! The boot guard's systemd unit: its text, and installing it into (or removing it from) a host root the way
//! `systemctl enable` would, each file written atomically (a temporary file, then a rename).
//!
//! What `install` writes, relative to the host root, and nothing else:
//! - `opt/nmi-agent/bin/nmi-agent`: this binary (static), so the host can run it before any container exists;
//! - `etc/systemd/system/nmi-agent-guard.service`: the unit;
//! - `etc/systemd/system/kubelet.service.requires/nmi-agent-guard.service` (or `.wants/`): the enable link.
//!
//! `remove` deletes exactly those, and the directories install created if they are empty then; a unit file without
//! the marker line or a link pointing elsewhere is someone else's and stays.

use std::{
    fs,
    io::Write,
    net::SocketAddrV4,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
};

use crate::cli::KubeletDependency;

pub const UNIT_NAME: &str = "nmi-agent-guard.service";
/// The unit directory and the guard's binary, relative to the host root.
pub const UNIT_DIR: &str = "etc/systemd/system";
pub const BINARY: &str = "opt/nmi-agent/bin/nmi-agent";
/// The unit's first line: what `remove` recognises as ours.
const MARKER: &str =
    "# Written by `nmi-agent install-guard`; `nmi-agent uninstall` removes it. See docs/boot.md.";
const KUBELET: &str = "kubelet.service";

#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error(
        "{0} is not a directory: mount the host's /{UNIT_DIR} there (--host-root names where the host's root is)"
    )]
    NoUnitDir(PathBuf),
    #[error(
        "{what} {value:?} cannot go into the unit's command line as it stands; use a path of letters, digits and ._-/:@+"
    )]
    Unquotable { what: &'static str, value: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> UnitError + 'a {
    move |source| UnitError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What the guard is run with: the values `run` resolves, fixed at install time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardCommand {
    pub cgroup: PathBuf,
    pub listen: SocketAddrV4,
    pub pin_dir: PathBuf,
    /// `--imds-device`, when the operator names one (the route lookup finds it otherwise, at boot as at run).
    pub imds_device: Option<String>,
}

impl GuardCommand {
    /// The unit's `ExecStart=` value. Arguments are never quoted: anything that would need it (spaces, `%`
    /// specifiers, `$` expansion, quotes) is refused instead.
    pub fn exec_start(&self) -> Result<String, UnitError> {
        let cgroup = plain("--cgroup", &self.cgroup)?;
        let pin_dir = plain("--pin-dir", &self.pin_dir)?;
        let mut line = format!(
            "/{BINARY} guard --cgroup {cgroup} --listen {} --pin-dir {pin_dir}",
            self.listen
        );
        if let Some(device) = &self.imds_device {
            let unquotable = || UnitError::Unquotable {
                what: "--imds-device",
                value: device.clone(),
            };
            if device.is_empty()
                || !device
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-@:".contains(c))
            {
                return Err(unquotable());
            }
            line.push_str(&format!(" --imds-device {device}"));
        }
        Ok(line)
    }
}

fn plain<'a>(what: &'static str, path: &'a Path) -> Result<&'a str, UnitError> {
    let unquotable = || UnitError::Unquotable {
        what,
        value: path.display().to_string(),
    };
    let text = path.to_str().ok_or_else(unquotable)?;
    let ok = path.is_absolute()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@+".contains(c));
    if ok { Ok(text) } else { Err(unquotable()) }
}

/// The directory of the enable link, per kind of dependency.
fn link_dir(dependency: KubeletDependency) -> String {
    match dependency {
        KubeletDependency::Required => format!("{KUBELET}.requires"),
        KubeletDependency::Wanted => format!("{KUBELET}.wants"),
    }
}

/// The unit's text.
pub fn render(command: &GuardCommand, dependency: KubeletDependency) -> Result<String, UnitError> {
    let install = match dependency {
        KubeletDependency::Required => "RequiredBy",
        KubeletDependency::Wanted => "WantedBy",
    };
    Ok(format!(
        "{MARKER}
[Unit]
Description=nmi-agent boot guard: pods' IMDS connects fail closed until the agent serves
# The pins go on bpffs (the guard mounts it when systemd has not). The forwarding guard sits on the device the route
# to 169.254.169.254 leaves through: wait for the network (the kubelet does too), so that route exists.
Wants=network-online.target
After=sys-fs-bpf.mount network-online.target
# Before anything can start a pod.
Before={KUBELET} containerd.service

[Service]
Type=oneshot
# Stays active, so that the kubelet's dependency holds until shutdown and a kubelet restart does not rerun it.
RemainAfterExit=yes
ExecStart={exec}

[Install]
{install}={KUBELET}
",
        exec = command.exec_start()?,
    ))
}

/// What `install` wrote (host paths as this process sees them) and the command the unit runs.
#[derive(Debug)]
pub struct Installed {
    pub paths: Vec<PathBuf>,
    pub exec_start: String,
}

/// Copies `binary` to the host, writes the unit and enables it for the kubelet; a link of the other dependency kind
/// (an earlier install) is removed. Takes effect at the next boot: nothing is started now (the agent is running).
pub fn install(
    host_root: &Path,
    binary: &Path,
    command: &GuardCommand,
    dependency: KubeletDependency,
) -> Result<Installed, UnitError> {
    let unit_dir = host_root.join(UNIT_DIR);
    if !unit_dir.is_dir() {
        return Err(UnitError::NoUnitDir(unit_dir));
    }
    let text = render(command, dependency)?;
    // The binary first: at no moment may an enabled unit name a binary that is not there.
    let bin = host_root.join(BINARY);
    let bytes = fs::read(binary).map_err(io("reading", binary))?;
    write_atomic(&bin, &bytes, 0o755)?;
    let unit = unit_dir.join(UNIT_NAME);
    write_atomic(&unit, text.as_bytes(), 0o644)?;

    let link = unit_dir.join(link_dir(dependency)).join(UNIT_NAME);
    let links_dir = link.parent().unwrap_or(&unit_dir);
    fs::create_dir_all(links_dir).map_err(io("creating", links_dir))?;
    let tmp = temporary(&link);
    let _ = fs::remove_file(&tmp);
    symlink(unit_target(), &tmp).map_err(io("linking", &tmp))?;
    fs::rename(&tmp, &link).map_err(io("renaming to", &link))?;
    let other = match dependency {
        KubeletDependency::Required => KubeletDependency::Wanted,
        KubeletDependency::Wanted => KubeletDependency::Required,
    };
    remove_link(&unit_dir, other)?;
    Ok(Installed {
        paths: vec![bin, unit, link],
        exec_start: command.exec_start()?,
    })
}

/// Removes what `install` wrote under `host_root` and returns the paths removed (none when nothing was installed).
pub fn remove(host_root: &Path) -> Result<Vec<PathBuf>, UnitError> {
    let unit_dir = host_root.join(UNIT_DIR);
    let mut removed = Vec::new();
    for dependency in [KubeletDependency::Required, KubeletDependency::Wanted] {
        removed.extend(remove_link(&unit_dir, dependency)?);
    }
    let unit = unit_dir.join(UNIT_NAME);
    let ours = fs::read_to_string(&unit).is_ok_and(|text| text.starts_with(MARKER));
    if ours {
        fs::remove_file(&unit).map_err(io("removing", &unit))?;
        removed.push(unit);
    }
    let bin = host_root.join(BINARY);
    if bin.is_file() {
        fs::remove_file(&bin).map_err(io("removing", &bin))?;
        removed.push(bin.clone());
        // opt/nmi-agent/bin, then opt/nmi-agent: only if empty, and a mount point (the DaemonSet's) stays.
        for dir in bin.ancestors().skip(1).take(2) {
            let _ = fs::remove_dir(dir);
        }
    }
    Ok(removed)
}

/// The enable link's target, as `systemctl enable` writes it: the unit's path on the host.
fn unit_target() -> PathBuf {
    Path::new("/").join(UNIT_DIR).join(UNIT_NAME)
}

/// Removes the enable link of `dependency` if it points at our unit, then its directory if that left it empty.
fn remove_link(
    unit_dir: &Path,
    dependency: KubeletDependency,
) -> Result<Option<PathBuf>, UnitError> {
    let dir = unit_dir.join(link_dir(dependency));
    let link = dir.join(UNIT_NAME);
    if fs::read_link(&link).ok() != Some(unit_target()) {
        return Ok(None);
    }
    fs::remove_file(&link).map_err(io("removing", &link))?;
    let _ = fs::remove_dir(&dir);
    Ok(Some(link))
}

fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to a temporary file next to `path`, syncs it and renames it over `path`: a reader (or a boot that
/// interrupts us) sees the old file or the new one, never half of one.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), UnitError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    let tmp = temporary(path);
    let mut file = fs::File::create(&tmp).map_err(io("creating", &tmp))?;
    file.write_all(bytes).map_err(io("writing", &tmp))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io("setting the mode of", &tmp))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io("renaming to", path))
}

#[cfg(test)]
mod tests;
