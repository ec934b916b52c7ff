//! `cargo xtask bench`: the benchmarks behind docs/benchmarks (the binary is still to be written).

use std::path::Path;

use anyhow::Result;

use crate::artifacts::{self, Profile};

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let built = artifacts::build(root, Profile::Release)?;
    built.run_tool("nmi-bench", args)
}
