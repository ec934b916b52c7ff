//! `cargo xtask test`: the README's test command and what CI runs. Each step is timed; the first failure stops the
//! run, and the closing `xtask: N passed, 0 failed` line is what CI looks for.

use std::{
    env,
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};

use crate::{
    artifacts::{self, Profile},
    cmd::{self, announce},
    ebpf, fuzz,
    host::{self, Apt},
    image, manifests, toolchain, vm,
};

const TOTAL_STEPS: usize = 12;

/// Seconds each fuzz target runs in `cargo xtask test`: a smoke test that the targets build and hold on their corpus
/// and a little more; `cargo xtask fuzz` runs them for longer.
const FUZZ_SMOKE_SECS: u64 = 10;

pub fn test(root: &Path, quick: bool) -> Result<()> {
    let mut steps = Steps::default();

    steps.run("toolchain components", toolchain::ensure_rustfmt_and_clippy)?;
    steps.run("fmt", || {
        cmd::run(
            cmd::cargo()
                .args(["fmt", "--all", "--", "--check"])
                .current_dir(root),
            "formatting differs; run `cargo fmt --all` and review the diff",
        )
    })?;
    steps.run("clippy", || {
        cmd::run(
            cmd::cargo()
                .args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ])
                .current_dir(root),
            "fix the lints above (warnings count as errors)",
        )
    })?;
    // The host clippy above sees only the parts of agent-ebpf that compile for the host; this lints the programs.
    steps.run("kernel clippy", || {
        let nightly = toolchain::nightly()?;
        toolchain::ensure_rust_src(&nightly)?;
        toolchain::ensure_nightly_clippy()?;
        ebpf::clippy(root, &artifacts::target_dir(root))
    })?;
    let mut apt = Apt::default();
    steps.run("unit tests", || {
        host::ensure_unit_test_tools(&mut apt)?;
        cmd::run(
            cmd::cargo()
                .args(["test", "--workspace", "--exclude", "nmi-agent-e2e"])
                .current_dir(root),
            "a unit test failed; its name and assertion are above",
        )?;
        // The harness's own pure tests (parsers, the test binaries' command lines) need no root: run them here too,
        // so they also run where the end-to-end step is skipped. The fakes' tests (nmi-testkit) ran just above.
        cmd::run(
            cmd::cargo()
                .args(["test", "--package", "nmi-agent-e2e", "--lib", "--bins"])
                .current_dir(root),
            "a unit test of the test harness failed; its name and assertion are above",
        )
    })?;
    steps.run("manifests", || manifests::validate_manifests(root))?;
    let built = steps.run("build", || artifacts::build(root, Profile::Release))?;
    // Fuzzing needs the nightly; outside CI a machine without one skips it rather than failing.
    if toolchain::nightly().is_err() && !is_ci() {
        steps.skip("fuzz smoke", "no nightly toolchain");
    } else {
        steps.run("fuzz smoke", || {
            fuzz::run(root, FUZZ_SMOKE_SECS, &[], false).map(|_| ())
        })?;
    }

    if quick {
        if is_ci() {
            return steps.fail(
                "end-to-end tests",
                anyhow!("--quick skips the end-to-end tests, which CI must run; drop --quick"),
            );
        }
        steps.skip("host tools", "--quick");
        steps.skip("end-to-end tests", "--quick");
        steps.skip(vm::STEP, "--quick");
        steps.skip("image", "--quick");
        return steps.finish();
    }
    if !host::is_root()? {
        steps.skip("host tools", "not root");
        println!(
            "\n{}",
            banner("SKIPPED end-to-end tests: need root (cgroups, network namespaces, eBPF)")
        );
        if is_ci() {
            return steps.fail(
                "end-to-end tests",
                anyhow!(
                    "CI must run the end-to-end tests, and they need root: run `.ci/run` as root"
                ),
            );
        }
        steps.skip("end-to-end tests", "not root");
        steps.skip(vm::STEP, "not root");
        steps.skip("image", "not root");
        return steps.finish();
    }

    let venv = artifacts::target_dir(root).join("pyenv");
    let python = steps.run("host tools", || {
        host::ensure_host_tools(&mut apt)?;
        host::ensure_python_clients(root, &venv, &mut apt)
    })?;
    steps.run("end-to-end tests", || {
        cmd::run(
            &mut e2e_command(root, &built, python.as_deref(), &[]),
            "an end-to-end test failed; its name and output are above",
        )
    })?;
    // The same datapath tests on a second kernel, the oldest this project tests (see docs/kernels.md).
    steps.run(vm::STEP, || vm::run(root, &built, &mut apt, &[]))?;
    // The release artefact itself: the static binary in the OCI image the DaemonSet pins by digest.
    steps.run("image", || image::image(root, false))?;
    steps.finish()
}

/// `cargo test --release -p nmi-agent-e2e` with the environment the tests need: the built agent and tools, its eBPF
/// object (the same value as the build, so cargo does not rebuild the agent with an empty stand-in) and the SDK venv.
/// `args` go to cargo before `--` (e.g. `--test soak`).
pub fn e2e_command(
    root: &Path,
    built: &artifacts::Built,
    python: Option<&Path>,
    args: &[&str],
) -> std::process::Command {
    let mut e2e = cmd::cargo();
    e2e.args(["test", "--release", "--package", "nmi-agent-e2e"])
        .args(args)
        .args(["--", "--test-threads=1"])
        .current_dir(root)
        .env("NMI_AGENT_BIN", built.agent())
        .env("NMI_E2E_BIN_DIR", &built.bin_dir)
        .env("NMI_AGENT_EBPF_OBJ", &built.ebpf_object)
        .env("RUST_BACKTRACE", "1");
    if let Some(python) = python {
        e2e.env("NMI_E2E_PYTHON", python);
    }
    e2e
}

pub fn is_ci() -> bool {
    env::var("CI").is_ok_and(|value| value.eq_ignore_ascii_case("true") || value == "1")
}

enum Outcome {
    Passed,
    Failed,
    Skipped(&'static str),
}

#[derive(Default)]
struct Steps {
    done: Vec<(&'static str, Outcome, Duration)>,
}

impl Steps {
    fn run<T>(&mut self, name: &'static str, step: impl FnOnce() -> Result<T>) -> Result<T> {
        println!("\n==> [{}/{TOTAL_STEPS}] {name}", self.done.len() + 1);
        let start = Instant::now();
        let result = step();
        let elapsed = start.elapsed();
        match result {
            Ok(value) => {
                announce(format!("{name}: passed in {}", format_duration(elapsed)));
                self.done.push((name, Outcome::Passed, elapsed));
                Ok(value)
            }
            Err(error) => {
                self.done.push((name, Outcome::Failed, elapsed));
                self.print_summary();
                Err(error.context(format!("step `{name}` failed")))
            }
        }
    }

    fn skip(&mut self, name: &'static str, reason: &'static str) {
        println!(
            "\n==> [{}/{TOTAL_STEPS}] {name}: skipped ({reason})",
            self.done.len() + 1
        );
        self.done
            .push((name, Outcome::Skipped(reason), Duration::ZERO));
    }

    fn fail<T>(mut self, name: &'static str, error: anyhow::Error) -> Result<T> {
        self.done.push((name, Outcome::Failed, Duration::ZERO));
        self.print_summary();
        Err(error.context(format!("step `{name}` failed")))
    }

    fn finish(self) -> Result<()> {
        self.print_summary();
        Ok(())
    }

    fn print_summary(&self) {
        let mut table = String::from("\nxtask: summary\n");
        let mut total = Duration::ZERO;
        let (mut passed, mut failed) = (0, 0);
        for (name, outcome, elapsed) in &self.done {
            total += *elapsed;
            let result = match outcome {
                Outcome::Passed => {
                    passed += 1;
                    "passed".to_owned()
                }
                Outcome::Failed => {
                    failed += 1;
                    "FAILED".to_owned()
                }
                Outcome::Skipped(reason) => format!("skipped ({reason})"),
            };
            let _ = writeln!(
                table,
                "  {name:<26} {result:<22} {:>9}",
                format_duration(*elapsed)
            );
        }
        let _ = writeln!(
            table,
            "  {:<26} {:<22} {:>9}",
            "total",
            "",
            format_duration(total)
        );
        print!("{table}");
        println!("xtask: {passed} passed, {failed} failed");
    }
}

fn banner(message: &str) -> String {
    let rule = "!".repeat(message.len() + 8);
    format!("{rule}\n!!  {message}  !!\n{rule}")
}

fn format_duration(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64();
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else {
        let minutes = (seconds / 60.0).floor();
        format!("{minutes:.0}m{:04.1}s", seconds - minutes * 60.0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::format_duration;

    #[test]
    fn durations_read_as_seconds_then_minutes() {
        assert_eq!(format_duration(Duration::from_millis(1_240)), "1.2s");
        assert_eq!(format_duration(Duration::from_secs(75)), "1m15.0s");
    }
}
