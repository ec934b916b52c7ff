//! The datapath end-to-end tests on a second kernel: Debian 12's Linux 6.1, booted under QEMU in plain emulation,
//! with the tests, the agent and the programs they need packed into an initramfs. `cargo xtask test` runs this
//! after the same tests passed on the host's kernel; `cargo xtask vm` runs just this.
//!
//! Steps: make sure of the host tools (QEMU, busybox, cpio), fetch the kernel (`vm/kernel.rs`), find the compiled
//! test binary, build the initramfs (`vm/initramfs.rs`), boot it and read the verdict off the console
//! (`vm/qemu.rs`).

mod initramfs;
mod kernel;
mod qemu;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{
    artifacts::{self, Built, Profile},
    cmd::{self, announce},
    host::{self, Apt},
    steps::is_ci,
};

/// The step's name in `cargo xtask test`.
pub const STEP: &str = "datapath on Linux 6.1 (VM)";

/// (program, Debian package that provides it) for building and booting the VM.
const VM_TOOLS: [(&str, &str); 3] = [
    (qemu::QEMU, "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
];

/// `cargo xtask vm [test args]`: build, then run the datapath tests in the VM. Extra arguments go to the test
/// binary (a test name filter, `--nocapture`).
pub fn command(root: &Path, test_args: &[String]) -> Result<()> {
    let built = artifacts::build(root, Profile::Release)?;
    let mut apt = Apt::default();
    host::ensure_host_tools(&mut apt)?;
    run(root, &built, &mut apt, test_args)
}

/// Runs the datapath tests of `built` inside the VM; fails unless every one of them passed there.
pub fn run(root: &Path, built: &Built, apt: &mut Apt, test_args: &[String]) -> Result<()> {
    host::ensure_programs(apt, "VM tools", &VM_TOOLS)?;
    let busybox = cmd::find_program("busybox").context("busybox vanished after installing it")?;
    let vm_dir = artifacts::target_dir(root).join("vm");
    let kernel = kernel::fetch(&vm_dir, &busybox, apt)
        .context("cannot get Debian 12's Linux 6.1 kernel for the VM")?;
    let test_binary = datapath_test_binary(root, built)?;

    let mut env = vec![
        (
            "NMI_AGENT_BIN",
            format!("{}/nmi-agent", initramfs::GUEST_BIN_DIR),
        ),
        ("NMI_E2E_BIN_DIR", initramfs::GUEST_BIN_DIR.to_owned()),
        ("RUST_BACKTRACE", "1".to_owned()),
    ];
    // The tests refuse to skip under CI, in the guest as on the host.
    if is_ci() {
        env.push(("CI", "true".to_owned()));
    }
    let payload = initramfs::Payload {
        test_binary: &test_binary,
        binaries: vec![built.agent(), built.bin_dir.join("nmi-probe")],
        env,
        test_args: std::iter::once("--test-threads=1".to_owned())
            .chain(test_args.iter().cloned())
            .collect(),
    };
    let start = Instant::now();
    let image = initramfs::build(&vm_dir, &kernel, &busybox, &payload)?;
    announce(format!(
        "initramfs {} ({} MiB) built in {:.1}s; booting Linux {} (Debian {}) under QEMU (TCG, no network)",
        image.display(),
        image.metadata().map(|m| m.len() >> 20).unwrap_or(0),
        start.elapsed().as_secs_f64(),
        kernel.release,
        kernel.version,
    ));

    let start = Instant::now();
    let report = qemu::boot(&kernel, &image)?;
    let summary = format!(
        "vm {}: {} passed, {} failed ({:.0}s in the VM)",
        kernel.release,
        report.passed,
        report.failed,
        start.elapsed().as_secs_f64()
    );
    announce(&summary);
    match report.exit_code {
        Some(0) if report.passed > 0 => Ok(()),
        Some(0) => bail!("{summary}: no test ran in the VM; check the test arguments"),
        Some(code) => bail!(
            "{summary}: the datapath tests failed on Linux {} (test binary exit code {code}); their output is above",
            kernel.release
        ),
        None => bail!(
            "{summary}: the VM stopped before the tests finished; the kernel's and the tests' output above says why"
        ),
    }
}

/// The compiled `tests/tests/datapath.rs`, as cargo reports it (building it if the host step did not already).
fn datapath_test_binary(root: &Path, built: &Built) -> Result<PathBuf> {
    let output = cmd::stdout(
        cmd::cargo()
            .args([
                "test",
                "--release",
                "--package",
                "nmi-agent-e2e",
                "--test",
                "datapath",
                "--no-run",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(root)
            // Compiler progress stays visible: a cold build of the tests takes minutes.
            .stderr(Stdio::inherit())
            // Same value as the build step, so cargo does not rebuild the agent with an empty eBPF stand-in.
            .env("NMI_AGENT_EBPF_OBJ", &built.ebpf_object),
        "building the datapath test binary failed",
    )?;
    test_executable(&output, "datapath")
        .context("cargo built the datapath tests but reported no executable for them")
}

/// The `executable` of the test target `name` in cargo's JSON messages.
fn test_executable(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == name
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
}

#[cfg(test)]
mod tests;
