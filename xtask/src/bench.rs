//! `cargo xtask bench`: builds, then runs `nmi-bench` as root (see docs/benchmarks.md); extra arguments go to it.

use std::path::Path;

use anyhow::Result;

use crate::artifacts::{self, Profile};

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let built = artifacts::build(root, Profile::Release)?;
    built.run_tool("nmi-bench", args)
}
