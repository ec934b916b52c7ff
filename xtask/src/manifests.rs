//! The `manifests` step of `cargo xtask test`: deploy/ checked against the Kubernetes schemas, the CRDs against
//! aad-pod-identity's API, and checkov's findings against the accepted list (deploy/validate_manifests.py says what
//! exactly). The tools live in a venv under target/, installed from deploy/requirements-validate.txt and reinstalled
//! only when that file changes; after that the step runs offline.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    artifacts,
    cmd::{self, announce},
    host::{self, Apt},
};

const REQUIREMENTS: &str = "deploy/requirements-validate.txt";
const SCRIPT: &str = "deploy/validate_manifests.py";
/// A copy of the requirements the venv was installed from; a mismatch means reinstall.
const STAMP: &str = ".nmi-requirements-validate";

pub fn validate_manifests(root: &Path) -> Result<()> {
    let target = artifacts::target_dir(root);
    let venv = target.join("deploy-venv");
    let python = ensure_venv(root, &venv)?;
    cmd::run(
        Command::new(&python)
            .arg(root.join(SCRIPT))
            .arg("--deploy")
            .arg(root.join("deploy"))
            .arg("--checkov")
            .arg(venv.join("bin/checkov"))
            .arg("--scan-dir")
            .arg(target.join("deploy-scan"))
            .current_dir(root),
        "fix the manifests named above, or accept a checkov finding with its reason in deploy/checkov-accepted.yaml",
    )
}

/// The venv's python, with deploy/requirements-validate.txt installed.
fn ensure_venv(root: &Path, venv: &Path) -> Result<PathBuf> {
    let requirements = root.join(REQUIREMENTS);
    let wanted = fs::read_to_string(&requirements)
        .with_context(|| format!("cannot read {}", requirements.display()))?;
    let python = venv.join("bin/python");
    let stamp = venv.join(STAMP);

    let works = cmd::succeeds(Command::new(&python).args(["-c", "import kubernetes_validate"]))
        && venv.join("bin/checkov").is_file();
    if works && fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        announce(format!("manifest tools up to date in {}", venv.display()));
        return Ok(python);
    }
    if !cmd::succeeds(Command::new(&python).args(["-c", "import sys"])) {
        create_venv(venv)?;
    }
    announce(format!(
        "installing {REQUIREMENTS} into {} (about a minute, once)",
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
            .arg(&requirements),
        "pip install failed; needs network access to PyPI",
    )?;
    fs::write(&stamp, wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(python)
}

fn create_venv(venv: &Path) -> Result<()> {
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
    if host::is_root()? && cmd::find_program("apt-get").is_some() {
        Apt::default().install(&["python3-venv"])?;
        if fs::symlink_metadata(venv).is_ok() {
            fs::remove_dir_all(venv)
                .with_context(|| format!("cannot remove the half-made venv {}", venv.display()))?;
        }
    } else {
        bail!(
            "cannot create a Python venv; needs python3 with the venv module (Debian: python3-venv)"
        );
    }
    cmd::run(
        &mut create,
        "cannot create a Python venv; needs python3 with the venv module (Debian: python3-venv)",
    )
}
