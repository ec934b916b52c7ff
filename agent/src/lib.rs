//! nmi-agent: the kernel intercepts and records ([`datapath`]), the agent attests the caller ([`attest`]), picks the
//! identity bound to it ([`identity`]) and serves the token as IMDS would ([`imds`]); [`server`] ties them together and
//! [`telemetry`] reports on all of it.

pub mod attest;
pub mod cli;
pub mod datapath;
pub mod identity;
pub mod imds;
pub mod run;
pub mod server;
pub mod telemetry;
