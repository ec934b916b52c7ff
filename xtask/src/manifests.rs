//! The `manifests` step of `cargo xtask test`: deploy/ checked against the Kubernetes schemas, the CRDs against
//! aad-pod-identity's API, and checkov's findings against the accepted list (deploy/validate_manifests.py says what
//! exactly). The tools live in a venv under target/, installed from deploy/requirements-validate.txt and reinstalled
//! only when that file changes; after that the step runs offline.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::{
    artifacts, cmd,
    host::{self, Apt},
};

const REQUIREMENTS: &str = "deploy/requirements-validate.txt";
const SCRIPT: &str = "deploy/validate_manifests.py";

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
    host::ensure_venv(
        venv,
        &root.join(REQUIREMENTS),
        &mut Apt::default(),
        |venv| {
            cmd::succeeds(
                Command::new(venv.join("bin/python")).args(["-c", "import kubernetes_validate"]),
            ) && venv.join("bin/checkov").is_file()
        },
    )
}
