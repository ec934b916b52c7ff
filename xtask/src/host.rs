//! Host programs and the Python environment the end-to-end tests drive.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, announce};

/// Reads the effective uid from /proc, which needs no libc binding in xtask.
pub fn is_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status")
        .context("cannot read /proc/self/status to check for root")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("/proc/self/status has no readable Uid: line")?;
    Ok(euid == "0")
}

/// Runs `apt-get update` at most once per xtask run, and only when something needs installing.
#[derive(Default)]
pub struct Apt {
    updated: bool,
}

const APT_HINT: &str =
    "needs root and network access to the Debian mirrors; or install the packages by hand";

impl Apt {
    pub fn install(&mut self, packages: &[&str]) -> Result<()> {
        if cmd::find_program("apt-get").is_none() {
            bail!(
                "cannot install {} without apt-get: install them by hand",
                packages.join(" ")
            );
        }
        self.update()?;
        announce(format!("apt-get install {}", packages.join(" ")));
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            APT_HINT,
        )
    }

    /// `apt-get update`, unless this run did it already.
    pub fn update(&mut self) -> Result<()> {
        if !self.updated {
            announce("apt-get update");
            cmd::run(Command::new("apt-get").args(["update", "-q"]), APT_HINT)?;
            self.updated = true;
        }
        Ok(())
    }

    /// Whether this run has refreshed the package lists already (so a retry after one would not help).
    pub fn is_updated(&self) -> bool {
        self.updated
    }
}

/// (program, Debian package that provides it) for everything the test topology shells out to.
const HOST_TOOLS: [(&str, &str); 3] = [
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("nsenter", "util-linux"),
];

pub fn ensure_host_tools(apt: &mut Apt) -> Result<()> {
    ensure_programs(apt, "host tools", &HOST_TOOLS)
}

/// What the agent's own tests shell out to: the boot guard's unit is checked with `systemd-analyze verify` and
/// `systemctl is-enabled` against a temporary root (no running systemd needed).
const UNIT_TEST_TOOLS: [(&str, &str); 2] =
    [("systemd-analyze", "systemd"), ("systemctl", "systemd")];

/// Installs the unit tests' tools when they are missing. Only root can; without root a missing tool makes its test
/// skip loudly (or fail under CI), and the test says how to install it.
pub fn ensure_unit_test_tools(apt: &mut Apt) -> Result<()> {
    if !is_root()? {
        return Ok(());
    }
    ensure_programs(apt, "unit test tools", &UNIT_TEST_TOOLS)
}

/// Installs the Debian package of every (program, package) whose program is not on PATH, then checks it arrived;
/// `what` names the set in the progress line.
pub fn ensure_programs(apt: &mut Apt, what: &str, tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<_> = tools
        .iter()
        .filter(|(program, _)| cmd::find_program(program).is_none())
        .collect();
    if missing.is_empty() {
        let programs: Vec<&str> = tools.iter().map(|(program, _)| *program).collect();
        announce(format!("{what} present: {}", programs.join(", ")));
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    apt.install(&packages)?;
    for (program, package) in missing {
        if cmd::find_program(program).is_none() {
            bail!(
                "`{program}` is still missing after installing {package}; check the apt output above"
            );
        }
    }
    Ok(())
}

const REQUIREMENTS: &str = "tests/clients/requirements.txt";
const STAMP: &str = ".nmi-requirements-stamp";

/// A venv with the unchanged Azure SDK clients the tests run; returns its python, or None while the tests define
/// no Python clients. Reinstalls only when the requirements file changes.
pub fn ensure_python_clients(root: &Path, venv: &Path, apt: &mut Apt) -> Result<Option<PathBuf>> {
    let requirements = root.join(REQUIREMENTS);
    if !requirements.exists() {
        return Ok(None);
    }
    ensure_venv(venv, &requirements, apt, |_| true).map(Some)
}

/// The python of a venv at `venv` with `requirements` installed. Installs only when the venv is missing or broken,
/// `installed` says a tool is missing, or the requirements changed since the last install (a stamp in the venv).
pub fn ensure_venv(
    venv: &Path,
    requirements: &Path,
    apt: &mut Apt,
    installed: impl Fn(&Path) -> bool,
) -> Result<PathBuf> {
    let bytes = fs::read(requirements)
        .with_context(|| format!("cannot read {}", requirements.display()))?;
    let wanted = format!("{:016x}\n", fnv1a64(&bytes));
    let python = venv.join("bin/python");
    let stamp = venv.join(STAMP);

    let venv_works = cmd::succeeds(Command::new(&python).args(["-c", "import sys"]));
    if venv_works && installed(venv) && fs::read_to_string(&stamp).is_ok_and(|have| have == wanted)
    {
        announce(format!(
            "{} up to date in {}",
            requirements.display(),
            venv.display()
        ));
        return Ok(python);
    }
    if !venv_works {
        create_venv(venv, apt)?;
    }

    announce(format!(
        "installing {} into {}",
        requirements.display(),
        venv.display()
    ));
    cmd::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-q",
                "-r",
            ])
            .arg(requirements),
        "pip install failed; needs network access to PyPI",
    )?;
    fs::write(&stamp, wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(python)
}

fn create_venv(venv: &Path, apt: &mut Apt) -> Result<()> {
    if fs::symlink_metadata(venv).is_ok() {
        fs::remove_dir_all(venv)
            .with_context(|| format!("cannot remove the broken venv {}", venv.display()))?;
    }
    announce(format!("creating a Python venv in {}", venv.display()));
    let mut create = Command::new("python3");
    create.args(["-m", "venv"]).arg(venv);
    if cmd::succeeds(&mut create) {
        return Ok(());
    }
    // Debian's python3 leaves out ensurepip, which venv needs, unless python3-venv is installed.
    if is_root()? && cmd::find_program("apt-get").is_some() {
        apt.install(&["python3-venv"])?;
        if fs::symlink_metadata(venv).is_ok() {
            fs::remove_dir_all(venv)
                .with_context(|| format!("cannot remove the half-made venv {}", venv.display()))?;
        }
    }
    cmd::run(
        &mut create,
        "cannot create a Python venv; needs python3 with the venv module (Debian: python3-venv)",
    )
}

/// A stable content hash for the stamp; std's hashers may change between Rust releases.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::fnv1a64;

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
