//! Running child processes with errors that name the command and say what to do next.

use std::{
    env,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

pub fn announce(message: impl std::fmt::Display) {
    println!("xtask: {message}");
}

/// The cargo that runs xtask, so nested builds use the same toolchain as the outer `cargo xtask`.
pub fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
}

/// Runs `command` with inherited stdio; on failure the error names the command and carries `hint`.
pub fn run(command: &mut Command, hint: &str) -> Result<()> {
    let shown = display(command);
    let status = command
        .status()
        .with_context(|| format!("could not start `{shown}`; {hint}"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status}); see its output above; {hint}");
    }
    Ok(())
}

/// Runs `command` and returns its stdout; stderr is shown only when it fails.
pub fn stdout(command: &mut Command, hint: &str) -> Result<String> {
    let shown = display(command);
    let output = command
        .output()
        .with_context(|| format!("could not start `{shown}`; {hint}"))?;
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}): {}; {hint}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{shown}` printed something that is not UTF-8"))
}

/// True when `command` starts and exits 0, with its output discarded: for "is this already installed?" probes.
pub fn succeeds(command: &mut Command) -> bool {
    command.output().is_ok_and(|output| output.status.success())
}

/// `dir` followed by the current value of the path-list variable `var`.
pub fn prepend_path(var: &str, dir: &Path) -> Result<OsString> {
    let rest = env::var_os(var).unwrap_or_default();
    env::join_paths(std::iter::once(dir.to_path_buf()).chain(env::split_paths(&rest)))
        .with_context(|| format!("cannot add {} to {var}: it contains a ':'", dir.display()))
}

/// Finds an executable the way a root shell would, also in the sbin directories a user's PATH often lacks.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn display(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}
