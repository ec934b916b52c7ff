//! Booting the guest under QEMU and reading its serial console: every line is echoed as it arrives, and the result
//! is taken from the lines the guest's init and libtest print.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::kernel::Kernel;

/// The program, from Debian's `qemu-system-x86`.
pub const QEMU: &str = "qemu-system-x86_64";
/// Generous: the datapath tests take a few minutes under emulation; this only ends a guest that hangs.
const TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// What `xtask/vm/init.sh` prints once the tests have exited, followed by their exit code.
const EXIT_MARKER: &str = "nmi-vm: exit ";

/// What the guest reported.
pub struct Report {
    /// The test binary's exit code; None when the guest stopped before the tests finished.
    pub exit_code: Option<i32>,
    pub passed: usize,
    pub failed: usize,
}

/// Boots `kernel` with `initramfs` as its only filesystem and waits for it to power off.
pub fn boot(kernel: &Kernel, initramfs: &Path) -> Result<Report> {
    let mut qemu = Command::new(QEMU);
    qemu.args([
        // Plain emulation: this machine's /dev/kvm cannot run nested guests (a KVM guest hangs at boot).
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "2G",
        // No default devices, and above all no network card: the tests build their own namespaces and links
        // inside the guest, and nothing in it may reach the host's network.
        "-nodefaults",
        "-nic",
        "none",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
    ])
    .arg(kernel.vmlinuz())
    .arg("-initrd")
    .arg(initramfs)
    .args([
        "-append",
        // panic=-1 with -no-reboot turns a kernel panic into QEMU exiting instead of a hang until the timeout.
        // mitigations=off only saves emulated work: root's BPF programs skip the Spectre hardening anyway.
        "console=ttyS0 quiet panic=-1 mitigations=off",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());

    let mut child = qemu
        .spawn()
        .with_context(|| format!("could not start {QEMU} (Debian package qemu-system-x86)"))?;
    let stdout = child.stdout.take().context("QEMU has no stdout pipe")?;
    let (lines, received) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_owned();
            println!("{line}");
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + TIMEOUT;
    let mut report = Report {
        exit_code: None,
        passed: 0,
        failed: 0,
    };
    loop {
        match received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => read_line(&line, &mut report),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the VM did not finish within {} minutes and was stopped; its console output is above",
                    TIMEOUT.as_secs() / 60
                );
            }
        }
    }
    let _ = reader.join();
    let status = child.wait().context("QEMU did not exit")?;
    if !status.success() && report.exit_code.is_none() {
        bail!("{QEMU} failed ({status}); its messages are above");
    }
    Ok(report)
}

/// Picks the exit marker and libtest's `test result:` counts out of one console line.
fn read_line(line: &str, report: &mut Report) {
    if let Some(code) = line.strip_prefix(EXIT_MARKER) {
        report.exit_code = code.trim().parse().ok();
    } else if let Some((passed, failed)) = test_result(line) {
        report.passed += passed;
        report.failed += failed;
    }
}

/// `test result: ok. 6 passed; 0 failed; 0 ignored; ...` -> (6, 0).
fn test_result(line: &str) -> Option<(usize, usize)> {
    let counts = line
        .trim()
        .strip_prefix("test result: ")?
        .split_once(". ")?
        .1;
    let count = |what: &str| {
        counts.split(';').find_map(|part| {
            part.trim()
                .strip_suffix(what)
                .and_then(|number| number.trim().parse().ok())
        })
    };
    Some((count(" passed")?, count(" failed")?))
}

#[cfg(test)]
mod tests;
