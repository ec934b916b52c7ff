//! The pieces the eBPF build needs beyond stable Rust: the nightly's `rust-src` and a bpf-linker built against
//! the nightly's own LLVM. bpf-linker reads rustc's bitcode, so any LLVM skew breaks it (aya-notes §4.6, §7).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, announce};

/// rustup's name for the toolchain that builds the eBPF object.
pub const NIGHTLY: &str = "nightly";

/// Where the nightly lives and which LLVM it carries.
pub struct Nightly {
    pub sysroot: PathBuf,
    pub llvm_major: u32,
}

impl Nightly {
    pub fn lib_dir(&self) -> PathBuf {
        self.sysroot.join("lib")
    }
}

/// A bpf-linker that works with this nightly; `bin_dir` goes first on PATH and `lib_dir` on LD_LIBRARY_PATH.
pub struct BpfLinker {
    pub bin_dir: PathBuf,
    pub lib_dir: PathBuf,
}

/// `rustup run nightly <tool>` rather than `<tool> +nightly`: the `+` syntax only works when PATH finds rustup's
/// proxy first, which a toolchain bin directory on PATH would break.
pub fn nightly_command(tool: &str) -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", NIGHTLY, tool]);
    command
}

pub fn nightly() -> Result<Nightly> {
    const HINT: &str =
        "the eBPF build needs rustup's `nightly` toolchain: `rustup toolchain install nightly`";
    let version = cmd::stdout(nightly_command("rustc").arg("-vV"), HINT)?;
    let llvm_major = parse_llvm_major(&version)?;
    let sysroot = cmd::stdout(nightly_command("rustc").args(["--print", "sysroot"]), HINT)?;
    Ok(Nightly {
        sysroot: PathBuf::from(sysroot.trim()),
        llvm_major,
    })
}

fn parse_llvm_major(rustc_vv: &str) -> Result<u32> {
    let version = rustc_vv
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .context("`rustc -vV` of the nightly reports no `LLVM version:` line; cannot pick a bpf-linker LLVM feature")?
        .trim();
    let major = version.split('.').next().unwrap_or_default();
    major.parse().with_context(|| {
        format!("cannot read an LLVM major version from `{version}` (nightly `rustc -vV`)")
    })
}

/// `-Z build-std=core` compiles core from source, and the nightly ships without it.
pub fn ensure_rust_src(nightly: &Nightly) -> Result<()> {
    let core = nightly.sysroot.join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        return Ok(());
    }
    announce(format!(
        "installing rust-src for {NIGHTLY} (missing {})",
        core.display()
    ));
    cmd::run(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]),
        "rust-src install failed; needs network access to static.rust-lang.org, \
         or run `rustup component add rust-src --toolchain nightly` by hand",
    )
}

/// `cargo xtask test` runs `cargo fmt` and `cargo clippy`; rustup's minimal profile leaves both out.
pub fn ensure_rustfmt_and_clippy() -> Result<()> {
    for (subcommand, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        ensure_cargo_component(cmd::cargo(), None, subcommand, component)?;
    }
    Ok(())
}

/// The kernel crate is linted by the nightly that builds it, which needs its own clippy.
pub fn ensure_nightly_clippy() -> Result<()> {
    ensure_cargo_component(nightly_command("cargo"), Some(NIGHTLY), "clippy", "clippy")
}

/// Installs `component` into `toolchain` (rustup's default when `None`) unless `cargo <subcommand>` already runs.
fn ensure_cargo_component(
    mut cargo: Command,
    toolchain: Option<&str>,
    subcommand: &str,
    component: &str,
) -> Result<()> {
    if cmd::succeeds(cargo.args([subcommand, "--version"])) {
        return Ok(());
    }
    let mut add = Command::new("rustup");
    add.args(["component", "add", component]);
    if let Some(toolchain) = toolchain {
        add.args(["--toolchain", toolchain]);
    }
    let by_hand = match toolchain {
        Some(toolchain) => format!("rustup component add {component} --toolchain {toolchain}"),
        None => format!("rustup component add {component}"),
    };
    announce(format!(
        "installing the {component} component (cargo {subcommand} is missing)"
    ));
    cmd::run(
        &mut add,
        &format!(
            "component install failed; needs network access to static.rust-lang.org, or run `{by_hand}` by hand"
        ),
    )
}

/// Tools live outside the target dir so that `cargo clean` does not cost a bpf-linker rebuild.
/// `NMI_AGENT_TOOLS_DIR` overrides it, e.g. to rehearse a fresh machine.
pub fn tools_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("NMI_AGENT_TOOLS_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let cargo_home = match env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home),
        None => env::home_dir()
            .context("neither CARGO_HOME nor HOME is set; set NMI_AGENT_TOOLS_DIR to where xtask may install tools")?
            .join(".cargo"),
    };
    Ok(cargo_home.join("nmi-agent-tools"))
}

pub fn ensure_bpf_linker(nightly: &Nightly) -> Result<BpfLinker> {
    let major = nightly.llvm_major;
    // One directory is both the LLVM_PREFIX bpf-linker's build reads and the --root it installs into.
    let root = tools_dir()?.join(format!("llvm-{major}"));
    let linker = BpfLinker {
        bin_dir: root.join("bin"),
        lib_dir: nightly.lib_dir(),
    };

    // A nightly update renames libLLVM, which makes the old binary fail to load, so this probe also detects skew.
    let probe = Command::new(linker.bin_dir.join("bpf-linker"))
        .arg("--version")
        .env(
            "LD_LIBRARY_PATH",
            cmd::prepend_path("LD_LIBRARY_PATH", &linker.lib_dir)?,
        )
        .output();
    if let Ok(output) = probe
        && output.status.success()
    {
        return Ok(linker);
    }

    let prefix_lib = root.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    link_nightly_llvm(&nightly.lib_dir(), &prefix_lib.join("libLLVM.so"))?;

    announce(format!(
        "installing bpf-linker for LLVM {major} into {} (about 2 minutes, once)",
        root.display()
    ));
    let mut install = cargo_install(&root);
    install
        .args([
            "bpf-linker",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &root)
        .env(
            "LD_LIBRARY_PATH",
            cmd::prepend_path("LD_LIBRARY_PATH", &linker.lib_dir)?,
        );
    cmd::run(
        &mut install,
        "bpf-linker install failed; needs network access to crates.io and a bpf-linker release with an \
         `llvm-<major>` feature for the nightly's LLVM",
    )?;

    cmd::run(
        Command::new(linker.bin_dir.join("bpf-linker"))
            .arg("--version")
            .env(
                "LD_LIBRARY_PATH",
                cmd::prepend_path("LD_LIBRARY_PATH", &linker.lib_dir)?,
            ),
        "the freshly installed bpf-linker does not run; delete the tools directory and retry",
    )?;
    Ok(linker)
}

/// `cargo install --locked --root <root>` (the crate and its options to be added), run in `root`: outside the
/// workspace, so the project's .cargo/config.toml and flags do not leak into the install.
pub fn cargo_install(root: &Path) -> Command {
    let mut install = cmd::cargo();
    install
        .args(["install", "--locked", "--root"])
        .arg(root)
        .current_dir(root);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        install.env_remove(var);
    }
    install
}

/// The nightly ships `libLLVM.so.<ver>-rust-<ver>-nightly` but no plain `libLLVM.so`, which is the name the linker
/// flags in bpf-linker's build look for.
fn link_nightly_llvm(nightly_lib: &Path, link: &Path) -> Result<()> {
    let entries = fs::read_dir(nightly_lib)
        .with_context(|| format!("cannot list {}", nightly_lib.display()))?;
    let mut candidates = Vec::new();
    for entry in entries {
        let name = entry
            .with_context(|| format!("cannot list {}", nightly_lib.display()))?
            .file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libLLVM.so.") && name.ends_with("-nightly") {
            candidates.push(nightly_lib.join(name.as_ref()));
        }
    }
    candidates.sort();
    let Some(target) = candidates.pop() else {
        bail!(
            "no libLLVM.so.*-nightly in {}; the nightly toolchain looks incomplete: reinstall it with \
             `rustup toolchain install nightly --force`",
            nightly_lib.display()
        );
    };

    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link)
            .with_context(|| format!("cannot replace the stale {}", link.display()))?;
    }
    std::os::unix::fs::symlink(&target, link)
        .with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))
}

#[cfg(test)]
mod tests {
    use super::parse_llvm_major;

    #[test]
    fn reads_the_llvm_major_from_rustc_vv() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(vv).ok(), Some(22));
    }

    #[test]
    fn refuses_output_without_an_llvm_line() {
        assert!(parse_llvm_major("rustc 1.97.0-nightly\n").is_err());
        assert!(parse_llvm_major("LLVM version: unknown\n").is_err());
    }
}
