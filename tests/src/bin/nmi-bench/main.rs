//! `cargo xtask bench` (root): the numbers behind docs/benchmarks.md, measured in one run inside one private
//! topology (see `nmi_agent_e2e::Topology`), so that ratios compare like with like.
//!
//! 1. Connect path: from pod-a, N sequential TCP connect+close (SO_LINGER 0) to a plain listener on the bridge
//!    address (backlog 4096, accept loop in the node namespace). (a) nothing attached (agent killed and
//!    `nmi-agent uninstall`ed), (b) the agent running with its programs on pod-a's parent cgroup. Paired rounds
//!    in alternating order; median per-connect µs of each and median of the per-round ratios b/a.
//! 2. Redirect path: token requests (`Connection: close`, cache hit) from pod-a to 169.254.169.254:80 (redirected to
//!    the agent) vs the same request straight to the IMDS emulator on the bridge address, C threads for S seconds.
//! 3. Token cache: per-request latency through the agent, cache hit vs cold miss (a new resource per request;
//!    emulator without delay).
//! 4. Agent memory: VmRSS / VmHWM of the agent after the load.
//!
//! Prints a table and writes `target/bench/results.json`. The load generators run inside pod-a as re-executions of
//! this binary (`nmi-bench worker ...`), so the kernel sees them as that pod's processes.
//!
//! ```text
//! nmi-bench [--connects N] [--rounds R] [--threads C] [--secs S] [--hits H] [--misses M]
//! ```
//!
//! The files: [`setup`] (the topology, the emulator, the listener, running a worker in the pod), [`measure`] (one
//! function per numbered measurement), [`report`] (the table, the JSON file, the statistics), [`worker`] (the load
//! generators).

mod measure;
mod report;
mod setup;
mod worker;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use nmi_agent_e2e::require_root;
use serde_json::json;

use setup::Bench;

/// Measures what nmi-agent costs on a node (docs/benchmarks.md); needs root.
#[derive(Parser)]
#[command(name = "nmi-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Subcommand)]
enum Command {
    /// A load generator, run by the benchmark inside the pod; prints one JSON object.
    #[command(hide = true)]
    Worker {
        #[command(subcommand)]
        mode: worker::Mode,
    },
}

/// How much to measure.
#[derive(Args)]
pub struct Opts {
    /// Connects per arm and round (measurement 1).
    #[arg(long, default_value_t = 20_000, value_parser = at_least_one)]
    connects: usize,
    /// Paired rounds (measurement 1).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    rounds: usize,
    /// Load threads (measurement 2).
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    threads: usize,
    /// Seconds per load run (measurement 2).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    secs: usize,
    /// Cache-hit requests (measurement 3).
    #[arg(long, default_value_t = 2_000, value_parser = at_least_one)]
    hits: usize,
    /// Cold-miss requests (measurement 3).
    #[arg(long, default_value_t = 500, value_parser = at_least_one)]
    misses: usize,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Worker { mode }) = cli.command {
        println!("{}", mode.run());
        return ExitCode::SUCCESS;
    }
    if !require_root("nmi-bench") {
        return ExitCode::FAILURE;
    }
    match bench(&cli.opts) {
        0 => ExitCode::SUCCESS,
        errors => {
            eprintln!(
                "nmi-bench: INVALID RUN: {errors} request(s) or connect(s) failed; the numbers above are not comparable"
            );
            ExitCode::FAILURE
        }
    }
}

/// Runs every measurement, prints the table and writes the results; returns the number of failed connects and
/// requests (a valid run has none).
fn bench(o: &Opts) -> u64 {
    let started = Instant::now();
    let b = Bench::new();
    let connect = measure::connect_path(&b, o);
    // The agent for the rest of the run.
    let agent = b.start_agent();
    let memory_at_start = measure::Memory::of(&agent);
    let redirect = measure::redirect_path(&b, o);
    let cache = measure::token_latency(&b, o);
    let memory = measure::memory(memory_at_start, &agent);
    let results = json!({
        "command": "cargo xtask bench",
        "machine": report::machine(),
        "connect": connect,
        "redirect": redirect,
        "cache": cache,
        "memory": memory,
        "wall_secs": started.elapsed().as_secs_f64(),
    });
    drop(agent);
    drop(b);
    report::print_table(&results);
    report::write(&results);
    report::errors(&results)
}

#[cfg(test)]
mod tests;
