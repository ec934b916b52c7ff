//! Harness for nmi-agent's end-to-end tests.
//!
//! A [`Topology`] is one test's private world: a "node" network namespace with a bridge and a trap at
//! 169.254.169.254, pods (own network namespace + cgroup) and a hostNetwork pod (cgroup only), all under a cgroup
//! subtree named `nmie2e-<pid>-<k>`. An [`Agent`] runs the real `nmi-agent` binary inside that world, and
//! [`probe`] runs the `nmi-probe` binary inside a pod. Everything is torn down on drop, and leftovers of crashed
//! earlier runs are removed before the first topology of a process is built.
//!
//! Harness functions panic on failure (with the command and its stderr) instead of returning errors: the tests
//! that call them want a stack trace, and there is nothing a test could do to recover.
//!
//! [`routed`] moves "IMDS" out of the node into a namespace of its own, routed as on AKS, with the tunnel endpoints a
//! CNI would add.
//!
//! The in-process fakes live in `nmi-testkit` (the agent's own tests use them too); [`imds_emulator`],
//! [`fake_apiserver`] and [`wait`] are re-exported here, and [`node`] runs them inside a topology.

pub mod agent;
pub mod bindings;
pub mod cgroup;
pub mod cleanup;
pub mod clients;
pub mod netns;
pub mod node;
pub mod probe;
pub mod process;
pub mod routed;
pub mod topology;
pub mod trap;

use std::io::Write;

pub use agent::{Agent, Audit};
pub use nmi_testkit::{fake_apiserver, imds_emulator, wait};
pub use probe::Attempt;
pub use topology::{Pod, Topology};

/// Whether this is a CI run, by the same rule as `cargo xtask test`: `CI` is `true` (any case) or `1`.
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// True when the tests may run. They need root (cgroups, network namespaces, BPF); a developer without root gets a
/// loud skip, but CI must never report a green run that tested nothing, so there the same condition panics.
pub fn require_root(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if is_ci() {
        panic!("{test}: end-to-end tests need root, and CI=true forbids skipping them");
    }
    // Straight to stderr, not eprintln!: libtest swallows a passing test's eprintln! output, and a skip nobody
    // sees is worse than none.
    let _ = writeln!(
        std::io::stderr(),
        "\n################################################################\n\
         ## SKIP {test}: not root. End-to-end tests need root;\n\
         ## run them with `cargo xtask test` as root.\n\
         ################################################################\n"
    );
    false
}
