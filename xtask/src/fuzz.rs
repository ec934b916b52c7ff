//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` (one per file in `fuzz/fuzz_targets/`) for a fixed time
//! each, with the nightly and cargo-fuzz (installed when missing). The repo's seed corpus (`fuzz/corpus/<target>/`) is
//! read but not written: what libFuzzer finds goes to `target/fuzz/corpus/<target>/`, and `--merge` copies the inputs
//! that add coverage back into the repo. A crash is written to `fuzz/regressions/<target>/`, where `cargo test`
//! replays it (`nmi-agent-fuzz`'s `regressions` test) until it is fixed.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    cmd::{self, announce},
    toolchain::{self, nightly_command},
};

/// What one target's run did, from libFuzzer's final statistics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Figures {
    pub executions: u64,
    /// Coverage counters hit (`cov:`), and features (`ft:`, edges with hit counts and more).
    pub cov: u64,
    pub ft: u64,
}

pub struct Report {
    pub target: String,
    pub secs: u64,
    pub figures: Figures,
    /// Inputs saved to `fuzz/regressions/<target>/` by this run.
    pub crashes: Vec<PathBuf>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Figures {
            executions,
            cov,
            ft,
        } = self.figures;
        write!(
            f,
            "{:<14} {executions:>11} executions in {:>4} s  cov: {cov:<6} ft: {ft:<7} crashes: {}",
            self.target,
            self.secs,
            self.crashes.len()
        )
    }
}

/// Runs `targets` (every target when empty) for `secs` seconds each, then prints one line per target. Fails if a
/// target crashed, after running all of them.
pub fn run(root: &Path, secs: u64, targets: &[String], merge: bool) -> Result<Vec<Report>> {
    let all = list_targets(root)?;
    let chosen: Vec<String> = if targets.is_empty() {
        all
    } else {
        for target in targets {
            if !all.contains(target) {
                bail!(
                    "no fuzz target `{target}`; the targets are: {}",
                    all.join(", ")
                );
            }
        }
        targets.to_vec()
    };
    toolchain::nightly()?;
    let tools = ensure_cargo_fuzz()?;
    cmd::run(
        cargo_fuzz(root, &tools)?.args(["build", "--sanitizer", "none"]),
        "building the fuzz targets failed; the compiler's message is above",
    )?;
    let mut reports = Vec::new();
    for target in &chosen {
        announce(format!("fuzzing {target} for {secs} s"));
        reports.push(run_target(root, &tools, target, secs, merge)?);
    }
    println!("\nxtask: fuzzing");
    for report in &reports {
        println!("  {report}");
    }
    let crashed: Vec<String> = reports
        .iter()
        .flat_map(|r| r.crashes.iter().map(|c| c.display().to_string()))
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzzing found {} crash(es), saved as {}; `cargo test -p nmi-agent-fuzz` replays them: fix the agent, keep \
             the input as a regression",
            crashed.len(),
            crashed.join(", ")
        );
    }
    Ok(reports)
}

fn run_target(root: &Path, tools: &Path, target: &str, secs: u64, merge: bool) -> Result<Report> {
    let seeds = root.join("fuzz/corpus").join(target);
    let found = root.join("target/fuzz/corpus").join(target);
    let regressions = root.join("fuzz/regressions").join(target);
    let log = root.join("target/fuzz/logs").join(format!("{target}.log"));
    for dir in [&seeds, &found, &regressions] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::create_dir_all(log.parent().unwrap_or(root))
        .with_context(|| format!("cannot create the directory of {}", log.display()))?;
    let before = crash_files(&regressions)?;
    let stderr =
        fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    // libFuzzer writes new inputs to the first corpus directory only.
    let status = cargo_fuzz(root, tools)?
        .args(["run", "--sanitizer", "none", target])
        .args([&found, &seeds])
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-artifact_prefix={}/", regressions.display()))
        .args([
            "-print_final_stats=1",
            // An input that takes this long is a hang, saved as `timeout-*`.
            "-timeout=20",
            "-rss_limit_mb=2048",
            // Slow units would be written next to the crashes.
            "-report_slow_units=100000",
        ])
        .stdout(stderr.try_clone()?)
        .stderr(stderr)
        .status()
        .with_context(|| format!("could not start cargo fuzz for {target}"))?;
    let output =
        fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
    let crashes: Vec<PathBuf> = crash_files(&regressions)?
        .into_iter()
        .filter(|file| !before.contains(file))
        .collect();
    if !status.success() && crashes.is_empty() {
        bail!(
            "cargo fuzz run {target} failed ({status}) without saving a crash; its output is in {}:\n{}",
            log.display(),
            tail(&output, 30)
        );
    }
    if !crashes.is_empty() {
        eprintln!("{}", tail(&output, 40));
    }
    if merge {
        cmd::run(
            cargo_fuzz(root, tools)?
                .args(["run", "--sanitizer", "none", target])
                .args([&seeds, &found])
                .args(["--", "-merge=1"]),
            "merging the new corpus into fuzz/corpus failed; see the output above",
        )?;
    }
    Ok(Report {
        target: target.to_owned(),
        secs,
        figures: parse_figures(&output),
        crashes,
    })
}

/// The targets, by the names of the files in `fuzz/fuzz_targets/`.
pub fn list_targets(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("fuzz/fuzz_targets");
    let mut targets = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem()
        {
            targets.push(stem.to_string_lossy().into_owned());
        }
    }
    targets.sort();
    Ok(targets)
}

/// The files libFuzzer saves for a failing input (`crash-`, `timeout-`, `oom-`, `leak-` followed by its hash).
fn crash_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if ["crash-", "timeout-", "oom-", "leak-"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            files.push(path);
        }
    }
    Ok(files)
}

/// `cargo fuzz` on the nightly, from the workspace root (where `fuzz/` is), finding an installed cargo-fuzz.
fn cargo_fuzz(root: &Path, tools: &Path) -> Result<Command> {
    let mut command = nightly_command("cargo");
    command
        .arg("fuzz")
        .current_dir(root)
        .env("PATH", cmd::prepend_path("PATH", &tools.join("bin"))?);
    Ok(command)
}

/// cargo-fuzz, from PATH or xtask's tools directory; installed there when neither has it. Returns that directory.
fn ensure_cargo_fuzz() -> Result<PathBuf> {
    let root = toolchain::tools_dir()?.join("cargo-fuzz");
    let mut probe = nightly_command("cargo");
    probe
        .args(["fuzz", "--version"])
        .env("PATH", cmd::prepend_path("PATH", &root.join("bin"))?);
    if cmd::succeeds(&mut probe) {
        return Ok(root);
    }
    announce(format!(
        "installing cargo-fuzz into {} (about 2 minutes, once)",
        root.display()
    ));
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let mut install = toolchain::cargo_install(&root);
    install.arg("cargo-fuzz");
    cmd::run(
        &mut install,
        "cargo-fuzz install failed; needs network access to crates.io, or run `cargo install cargo-fuzz --locked`",
    )?;
    Ok(root)
}

/// Executions, `cov:` and `ft:` from libFuzzer's output: the `stat::number_of_executed_units` line and the last status
/// line (`#123 DONE cov: 45 ft: 67 ...`).
fn parse_figures(output: &str) -> Figures {
    let mut figures = Figures::default();
    for line in output.lines() {
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            figures.executions = n.trim().parse().unwrap_or(figures.executions);
        }
        if line.starts_with('#') {
            let mut words = line.split_whitespace();
            while let Some(word) = words.next() {
                let slot = match word {
                    "cov:" => &mut figures.cov,
                    "ft:" => &mut figures.ft,
                    _ => continue,
                };
                if let Some(value) = words.next().and_then(|v| v.parse().ok()) {
                    *slot = value;
                }
            }
        }
    }
    figures
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::{Figures, parse_figures};

    #[test]
    fn figures_come_from_the_last_status_line_and_the_final_stats() {
        let output = "INFO: Seed: 1\n#2\tINITED cov: 10 ft: 12 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                      #4096\tpulse  cov: 40 ft: 90 corp: 9/99b lim: 4 exec/s: 2048 rss: 31Mb\n\
                      #9000\tDONE   cov: 41 ft: 95 corp: 10/120b lim: 4 exec/s: 4500 rss: 31Mb\n\
                      Done 9000 runs in 2 second(s)\nstat::number_of_executed_units: 9001\n\
                      stat::average_exec_per_sec:     4500\n";
        assert_eq!(
            parse_figures(output),
            Figures {
                executions: 9001,
                cov: 41,
                ft: 95
            }
        );
    }

    #[test]
    fn no_statistics_read_as_zero() {
        assert_eq!(
            parse_figures("error: could not compile\n"),
            Figures::default()
        );
    }
}
