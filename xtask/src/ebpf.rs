//! Builds the kernel programs (`agent-ebpf`) for the BPF target, the way aya-build would (aya-notes §1.2), but
//! from xtask so the agent's build.rs stays a plain embed and stable-only machines can still check the workspace.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::{
    cmd::{self, announce},
    toolchain::{self, BpfLinker},
};

const PACKAGE: &str = "nmi-agent-ebpf";

fn bpf_target() -> &'static str {
    if cfg!(target_endian = "big") {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    }
}

/// Flags for the BPF compile. `bpf_target_arch` selects the host's pt_regs layout in aya-ebpf, and `--btf`
/// makes bpf-linker emit the BTF the loader needs. They travel in the 0x1f-separated form, so no flag from the
/// caller's RUSTFLAGS can mix in.
fn encoded_rustflags(host_arch: &str) -> String {
    [
        "--cfg".to_owned(),
        format!("bpf_target_arch=\"{host_arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    .join("\x1f")
}

/// `cargo <subcommand>` on the nightly for the BPF target, with build-std and the flags above, in `target/ebpf`.
fn bpf_cargo(root: &Path, target_dir: &Path, subcommand: &str) -> Command {
    let mut cargo = toolchain::nightly_command("cargo");
    cargo
        .arg(subcommand)
        .args(["--package", PACKAGE, "--release", "--target", bpf_target()])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(target_dir.join("ebpf"))
        .current_dir(root)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            encoded_rustflags(env::consts::ARCH),
        );
    // The outer `cargo xtask` runs on stable and may set these; any of them would point the nightly build at the
    // wrong compiler or add host-only flags.
    for var in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cargo.env_remove(var);
    }
    cargo
}

/// Builds the object and returns its absolute path.
pub fn build_object(root: &Path, target_dir: &Path, linker: &BpfLinker) -> Result<PathBuf> {
    let target = bpf_target();
    announce(format!(
        "building {PACKAGE} for {target} with {}",
        toolchain::NIGHTLY
    ));
    let mut build = bpf_cargo(root, target_dir, "build");
    build
        .arg("--bins")
        .env("PATH", cmd::prepend_path("PATH", &linker.bin_dir)?)
        .env(
            "LD_LIBRARY_PATH",
            cmd::prepend_path("LD_LIBRARY_PATH", &linker.lib_dir)?,
        );
    cmd::run(
        &mut build,
        "the eBPF build failed: compiler or verifier-style errors are in agent-ebpf; \
         a bpf-linker error naming LLVM versions means the linker does not match the nightly",
    )?;

    let object = target_dir
        .join("ebpf")
        .join(target)
        .join("release")
        .join(PACKAGE);
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} is missing; does {PACKAGE} still have a bin target named {PACKAGE}?",
            object.display()
        );
    }
    Ok(object)
}

/// Lints the kernel programs as they are built, for the BPF target: the host-side `cargo clippy --workspace` sees
/// only `abi.rs`, because everything else in the crate is `cfg(target_arch = "bpf")`. Checking needs no linker.
pub fn clippy(root: &Path, target_dir: &Path) -> Result<()> {
    announce(format!(
        "linting {PACKAGE} for {} with {}",
        bpf_target(),
        toolchain::NIGHTLY
    ));
    cmd::run(
        bpf_cargo(root, target_dir, "clippy").args(["--lib", "--bins", "--", "-D", "warnings"]),
        "the kernel programs (agent-ebpf, built for the BPF target) have lint findings, listed above; \
         fix them in agent-ebpf (warnings count as errors)",
    )
}

#[cfg(test)]
mod tests {
    use super::encoded_rustflags;

    #[test]
    fn rustflags_are_unit_separated_and_name_the_host_arch() {
        let flags = encoded_rustflags("x86_64");
        assert_eq!(
            flags.split('\x1f').collect::<Vec<_>>(),
            [
                "--cfg",
                "bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf"
            ]
        );
    }
}
