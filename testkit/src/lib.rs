//! In-process fakes for nmi-agent's tests, usable without root: the agent's own tests dev-depend on this crate, and
//! the end-to-end harness (`nmi-agent-e2e`) runs the same fakes inside a test topology.
//!
//! - [`imds_emulator`]: the Azure Instance Metadata Service (token API, instance metadata, fault injection).
//! - [`fake_apiserver`]: a Kubernetes API server speaking the list/watch wire format kube-rs relies on.
//! - [`wait`]: polling until a condition holds, with a timeout.
//!
//! Like the rest of the test support, the test-facing methods panic on misuse: a test wants the stack trace, not an
//! error to handle.

pub mod fake_apiserver;
mod http;
pub mod imds_emulator;
#[cfg(test)]
mod raw_http;
pub mod wait;
