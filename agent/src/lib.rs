//! nmi-agent: the kernel intercepts and records ([`datapath`]), the agent attests the caller ([`attest`]), picks the
//! identity bound to it ([`identity`]) and serves the token as IMDS would ([`imds`]); [`server`] is the front door
//! that puts an attested caller in front of the IMDS service, [`run`] wires the process from the [`cli`], [`boot`]
//! guards a node before the agent runs, and [`telemetry`] reports on all of it.
//!
//! Dependencies point downstream only: server → imds → identity → attest → datapath, and telemetry below all of them
//! (the kernel's numbers reach it through [`telemetry::metrics::KernelStats`], which the datapath implements).

pub mod attest;
pub mod boot;
pub mod cli;
pub mod datapath;
pub mod identity;
pub mod imds;
pub mod run;
pub mod server;
pub mod telemetry;
