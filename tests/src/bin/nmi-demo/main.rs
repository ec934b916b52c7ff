//! `nmi-demo` (run it with `cargo xtask demo`, as root): two teams' pods on one node, each reading its own Key Vault
//! secret with an unchanged Azure SDK client, through nmi-agent.
//!
//! The scenario: pods `orders` and `billing` are bound (tests/demo/bindings.yaml) to the user-assigned identities
//! `orders` and `billing`; a third pod, `unbound`, has no binding. Each pod runs tests/clients/python_keyvault.py
//! (`SecretClient` + `ManagedIdentityCredential()`) against a Key Vault emulator (tests/demo/keyvault_emulator.py:
//! HTTPS, challenge auth, the per-secret access policy in tests/demo/access-policy.json) and asks for its own secret,
//! then for the other team's. The IMDS emulator plays the VM's IMDS, which has both identities and a
//! system-assigned one. Expected: each team reads its own secret and is refused (403) the other's; the unbound pod
//! gets no token at all; nothing reaches 169.254.169.254 except through the agent.
//!
//! Exits 0 when every expectation holds, 1 when one fails or the demo could not be set up, 130 when interrupted.
//! On every exit path the topology (namespaces, cgroups, processes, bpffs pins) is removed; SIGINT and SIGTERM kill
//! what runs in it so that the main thread unwinds and drops it.
//!
//! Environment (set by `cargo xtask demo`): `NMI_AGENT_BIN` (the agent), `NMI_E2E_BIN_DIR` (imds-emulator),
//! `NMI_E2E_PYTHON` (the venv with the SDK clients), `NMI_DEMO_TESTS_DIR` (this crate's directory).
//!
//! The files: [`setup`] (what the demo reads), [`world`] (the topology and what runs in it, one function per step),
//! [`client`] (one SDK client run), [`scenario`] (the steps in order and the verdict), [`report`] (the tables),
//! [`signals`] (Ctrl-C).

mod client;
mod helper;
mod report;
mod scenario;
mod setup;
mod signals;
mod world;

use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use nmi_agent_e2e::{cgroup, netns};

use setup::Paths;
use signals::interrupted;

/// Two teams' pods read their own Key Vault secrets through nmi-agent with unchanged Azure SDK clients.
#[derive(Parser)]
#[command(
    name = "nmi-demo",
    after_help = "Run it with `cargo xtask demo [--hold]`, as root."
)]
struct Cli {
    /// Keep the topology, the agent and the emulators up after the scenario, until Ctrl-C.
    #[arg(long)]
    hold: bool,
}

/// Why the scenario stopped early.
enum Stop {
    Interrupted,
    Setup(String),
}

impl From<String> for Stop {
    fn from(message: String) -> Self {
        if interrupted() {
            Stop::Interrupted
        } else {
            Stop::Setup(message)
        }
    }
}

fn main() -> ExitCode {
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "nmi-demo: needs root (cgroups, network namespaces, eBPF); run `cargo xtask demo` as root"
        );
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    if let Err(e) = signals::install() {
        eprintln!("nmi-demo: installing the SIGINT/SIGTERM handlers: {e}");
        return ExitCode::FAILURE;
    }
    let paths = match Paths::from_env() {
        Ok(paths) => paths,
        Err(message) => {
            eprintln!("nmi-demo: {message}");
            return ExitCode::from(2);
        }
    };
    // The harness panics on failure; its message is the diagnosis, unless the panic is the consequence of an
    // interrupt (the signal killed the agent while it was starting, say).
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if !interrupted() {
            default_hook(info);
        }
    }));

    let started = Instant::now();
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| scenario::run(&paths, cli.hold)));
    signals::forget_topology();
    let leftovers = leftovers();
    let code = exit_code(outcome, started);
    if !leftovers.is_empty() {
        eprintln!("nmi-demo: WARNING: left behind: {}", leftovers.join(", "));
        return ExitCode::FAILURE;
    }
    code
}

/// Says how the demo ended and turns that into the exit status.
fn exit_code(outcome: std::thread::Result<Result<bool, Stop>>, started: Instant) -> ExitCode {
    match outcome {
        Ok(Ok(true)) => {
            println!(
                "\nnmi-demo: all expectations held ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Ok(Ok(false)) => {
            println!(
                "\nnmi-demo: FAILED: the outcomes marked above are not what the scenario expects"
            );
            ExitCode::FAILURE
        }
        _ if interrupted() => {
            eprintln!("\nnmi-demo: interrupted; the topology is removed");
            ExitCode::from(130)
        }
        Ok(Err(Stop::Setup(message))) => {
            eprintln!("\nnmi-demo: setup failed: {message}");
            ExitCode::FAILURE
        }
        Ok(Err(Stop::Interrupted)) => ExitCode::from(130),
        Err(_) => {
            eprintln!(
                "\nnmi-demo: setup failed (the panic above says where); the topology is removed"
            );
            ExitCode::FAILURE
        }
    }
}

/// Namespaces or cgroups of this process's topologies that still exist after the demo.
fn leftovers() -> Vec<String> {
    let prefix = format!("{}{}-", nmi_agent_e2e::cleanup::PREFIX, std::process::id());
    let mut out: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .map(|n| format!("netns {n}"))
        .collect();
    if let Ok(dir) = std::fs::read_dir(cgroup::root()) {
        out.extend(
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .map(|n| format!("cgroup {n}")),
        );
    }
    out
}

#[cfg(test)]
mod tests;
