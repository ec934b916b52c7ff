//! `cargo xtask soak [--requests N]`: the soak test (tests/tests/soak.rs) at full size, as root. `cargo xtask test`
//! runs the same test at 20,000 requests; this runs 100,000 by default and prints the figures docs/benchmarks.md
//! quotes.

use std::path::Path;

use anyhow::Result;

use crate::{
    artifacts::{self, Profile},
    cmd,
    host::{self, Apt},
    steps,
};

pub fn run(root: &Path, requests: u64) -> Result<()> {
    if !host::is_root()? {
        anyhow::bail!(
            "cargo xtask soak needs root (cgroups, network namespaces, eBPF); run it as root"
        );
    }
    let mut apt = Apt::default();
    host::ensure_host_tools(&mut apt)?;
    let venv = artifacts::target_dir(root).join("pyenv");
    let python = host::ensure_python_clients(root, &venv, &mut apt)?;
    let built = artifacts::build(root, Profile::Release)?;
    let mut soak = steps::e2e_command(root, &built, python.as_deref(), &["--test", "soak"]);
    soak.arg("--nocapture")
        .env("NMI_SOAK_REQUESTS", requests.to_string());
    cmd::run(&mut soak, "the soak failed; what it saw is above")
}
