//! The kernel programs' logic, one module per hook. Each returns its verdict; `main.rs` only wires them to sections.
//!
//! Data flow: [`connect`] redirects a pod's connect to IMDS and records the socket, [`sock_ops`] files that record
//! under the connection's 4-tuple (the agent's lookup key), [`getpeername`] hides the rewrite from the caller, and
//! [`egress`] drops whatever reaches for IMDS some other way, and [`bind`] keeps the agent's port the agent's.

pub mod bind;
pub mod connect;
pub mod egress;
pub mod getpeername;
pub mod maps;
pub mod sock_ops;

/// cgroup sock_addr and cgroup_skb verdicts.
pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;
