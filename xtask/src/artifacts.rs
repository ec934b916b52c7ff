//! `cargo xtask build`: toolchain, eBPF object, then the user-space binaries with that object embedded.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::{
    cmd::{self, announce},
    ebpf, toolchain,
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

/// What a build produced, as absolute paths.
pub struct Built {
    pub ebpf_object: PathBuf,
    /// `target/<profile>`: `nmi-agent` and the test helper binaries.
    pub bin_dir: PathBuf,
}

impl Built {
    pub fn agent(&self) -> PathBuf {
        self.bin_dir.join("nmi-agent")
    }

    /// Runs one of the helper binaries the build produced (`nmi-demo`, `nmi-bench`) with `args`.
    pub fn run_tool(&self, name: &str, args: &[String]) -> Result<()> {
        let tool = self.bin_dir.join(name);
        if !tool.is_file() {
            bail!(
                "{name} is not built yet: {} does not exist (no bin target named {name} in nmi-agent or nmi-agent-e2e)",
                tool.display()
            );
        }
        announce(format!("running {}", tool.display()));
        cmd::run(
            Command::new(&tool)
                .args(args)
                .env("NMI_AGENT_BIN", self.agent())
                .env("NMI_E2E_BIN_DIR", &self.bin_dir),
            &format!("{name} failed; see its output above"),
        )
    }
}

/// Honours CARGO_TARGET_DIR like cargo does, so the binaries are found where cargo put them.
pub fn target_dir(root: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

pub fn build(root: &Path, profile: Profile) -> Result<Built> {
    announce(format!("checking the {} toolchain", toolchain::NIGHTLY));
    let nightly = toolchain::nightly()?;
    toolchain::ensure_rust_src(&nightly)?;
    announce(format!(
        "checking bpf-linker for LLVM {}",
        nightly.llvm_major
    ));
    let linker = toolchain::ensure_bpf_linker(&nightly)?;

    let target_dir = target_dir(root);
    let ebpf_object = ebpf::build_object(root, &target_dir, &linker)?;
    announce(format!("eBPF object: {}", ebpf_object.display()));

    announce(format!(
        "building nmi-agent ({}) with that object embedded",
        profile.dir()
    ));
    let mut build = cmd::cargo();
    build.args([
        "build",
        "--package",
        "nmi-agent",
        "--package",
        "nmi-agent-e2e",
        "--bins",
    ]);
    if profile == Profile::Release {
        build.arg("--release");
    }
    build
        .current_dir(root)
        .env("NMI_AGENT_EBPF_OBJ", &ebpf_object);
    cmd::run(
        &mut build,
        "the agent build failed; the compiler output above names the file",
    )?;

    let built = Built {
        ebpf_object,
        bin_dir: target_dir.join(profile.dir()),
    };
    if !built.agent().is_file() {
        bail!(
            "cargo reported success but {} is missing",
            built.agent().display()
        );
    }
    announce(format!("agent binary: {}", built.agent().display()));
    Ok(built)
}
