//! `cargo xtask demo`: builds what the demo needs (eBPF object, `nmi-agent`, `nmi-demo`, `imds-emulator`), makes
//! sure of the host tools and the Python venv with the unchanged Azure SDK clients, then becomes `nmi-demo`
//! (tests/src/bin/nmi-demo/), which runs the Key Vault scenario and exits non-zero when it does not go as expected.

use std::{os::unix::process::CommandExt, path::Path, process::Command};

use anyhow::{Result, bail};

use crate::{
    artifacts::{self, Profile},
    cmd::announce,
    host::{self, Apt},
};

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    // Before the build, so a non-root user learns it in a second rather than after minutes of compiling.
    if !host::is_root()? {
        bail!(
            "the demo needs root (it makes cgroups and network namespaces and attaches eBPF programs): run \
             `cargo xtask demo` as root"
        );
    }
    let built = artifacts::build(root, Profile::Release)?;
    let mut apt = Apt::default();
    host::ensure_host_tools(&mut apt)?;
    let venv = artifacts::target_dir(root).join("pyenv");
    let Some(python) = host::ensure_python_clients(root, &venv, &mut apt)? else {
        bail!("tests/clients/requirements.txt is missing; the demo's clients need it");
    };

    let demo = built.bin_dir.join("nmi-demo");
    if !demo.is_file() {
        bail!(
            "{} was not built: nmi-agent-e2e has no bin target named nmi-demo",
            demo.display()
        );
    }
    announce(format!("running {}", demo.display()));
    // exec, not spawn: nmi-demo becomes this process, so Ctrl-C, `timeout` and `kill` reach it directly and whoever
    // waits for `cargo xtask demo` waits until it has removed its topology (xtask would otherwise die at once on
    // SIGINT and leave the cleanup running in the background).
    let error = Command::new(&demo)
        .args(args)
        .current_dir(root)
        .env("NMI_AGENT_BIN", built.agent())
        .env("NMI_E2E_BIN_DIR", &built.bin_dir)
        .env("NMI_E2E_PYTHON", &python)
        .env("NMI_DEMO_TESTS_DIR", root.join("tests"))
        .exec();
    bail!("could not start {}: {error}", demo.display())
}
