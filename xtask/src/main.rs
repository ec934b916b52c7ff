//! `cargo xtask`: the project's build and test entry point (see `--help`).

mod artifacts;
mod bench;
mod cmd;
mod demo;
mod ebpf;
mod fuzz;
mod host;
mod image;
mod manifests;
mod soak;
mod steps;
mod toolchain;
mod vm;

use std::{
    env,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::artifacts::Profile;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test, fuzz, demo and benchmark nmi-agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object (installing rust-src and bpf-linker when missing) and the agent with it embedded.
    Build {
        /// Build the user-space binaries without `--release` (the eBPF object is always optimised).
        #[arg(long)]
        debug: bool,
    },
    /// Run every check CI runs: fmt, clippy, unit tests, build, end-to-end tests (these need root).
    Test {
        /// Skip the end-to-end tests, for local iteration. CI never uses this.
        #[arg(long)]
        quick: bool,
    },
    /// Build, then run the demo (`nmi-demo`); extra arguments are passed on.
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run the benchmarks (`nmi-bench`); extra arguments are passed on.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run the soak (20 pods, two hostile, every answer checked) at full size; needs root.
    Soak {
        /// Token requests over the twenty pods.
        #[arg(long, default_value_t = 100_000)]
        requests: u64,
    },
    /// Build, then run the datapath end-to-end tests inside a QEMU VM on Debian 12's Linux 6.1 (needs no KVM);
    /// extra arguments go to the test binary (e.g. a test name filter).
    Vm {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the cargo-fuzz targets in fuzz/ (all, or those named) for --secs each with the nightly, installing
    /// cargo-fuzz when missing; prints executions, coverage and crashes per target. Crashes are saved to
    /// fuzz/regressions/<target>/, which `cargo test` replays.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Afterwards, add the inputs that found new coverage to the repo's corpus (fuzz/corpus/<target>/).
        #[arg(long)]
        merge: bool,
        targets: Vec<String>,
    },
    /// Build the static (musl) agent and its OCI image offline with buildah into target/image/nmi-agent.tar; prints
    /// the image digest.
    Image {
        /// Also write that digest into deploy/kustomization.yaml.
        #[arg(long)]
        pin: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Printed by hand: anyhow's Debug form adds a backtrace whenever RUST_BACKTRACE is set (as in CI),
            // which buries the one line that says what to do.
            eprintln!("\nxtask: error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    let root = workspace_root()?;
    match command {
        Command::Build { debug } => {
            let profile = if debug {
                Profile::Debug
            } else {
                Profile::Release
            };
            artifacts::build(&root, profile).map(|_| ())
        }
        Command::Test { quick } => steps::test(&root, quick),
        Command::Demo { args } => demo::run(&root, &args),
        Command::Bench { args } => bench::run(&root, &args),
        Command::Soak { requests } => soak::run(&root, requests),
        Command::Vm { args } => vm::command(&root, &args),
        Command::Image { pin } => image::image(&root, pin),
        Command::Fuzz {
            secs,
            merge,
            targets,
        } => fuzz::run(&root, secs, &targets, merge).map(|_| ()),
    }
}

/// Every path xtask uses is relative to the workspace, whichever directory `cargo xtask` was started from.
/// `cargo run` sets CARGO_MANIFEST_DIR at run time too, and that value wins: the compile-time one is stale when a
/// target dir is shared between two checkouts, because cargo reuses the xtask binary across them.
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent; xtask must live at <workspace>/xtask")
}
