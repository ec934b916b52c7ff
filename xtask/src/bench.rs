//! `cargo xtask bench`: builds, then runs `nmi-bench` as root (see docs/benchmarks.md); extra arguments go to it.

use std::path::Path;

use anyhow::Result;

use crate::{
    artifacts::{self, Profile},
    host::{self, Apt},
};

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    // Checked before minutes of building: the benchmark builds network namespaces and attaches eBPF programs.
    if !host::is_root()? {
        anyhow::bail!(
            "cargo xtask bench needs root (cgroups, network namespaces, eBPF); run it as root"
        );
    }
    host::ensure_host_tools(&mut Apt::default())?;
    let built = artifacts::build(root, Profile::Release)?;
    built.run_tool("nmi-bench", args)
}
