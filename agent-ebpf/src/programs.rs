//! The kernel programs' logic, one module per hook. Each returns its verdict; `main.rs` only wires them to sections.
//!
//! Data flow: [`connect`] redirects a pod's connect to IMDS and records the socket, [`sock_ops`] files that record
//! under the connection's 4-tuple (the agent's lookup key), [`getpeername`] hides the rewrite from the caller, and
//! [`egress`] drops whatever reaches for IMDS some other way, [`forward`] drops what the node would forward to IMDS,
//! and [`bind`] keeps the agent's port the agent's. [`sock_release`] drops a record whose socket goes without a TCP
//! close, so each cgroup's count of live redirected sockets (its cap, see `maps::file_socket`) stays exact.

pub mod bind;
pub mod connect;
pub mod egress;
pub mod forward;
pub mod getpeername;
pub mod maps;
pub mod sock_ops;
pub mod sock_release;

use aya_ebpf::{EbpfContext, helpers::bpf_get_socket_cookie, programs::SockAddrContext};

use crate::abi::Endpoint4;

/// cgroup sock_addr and cgroup_skb verdicts.
pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;

/// Points a sock_addr hook's address at `to`: the destination in connect4, the reported peer in getpeername4.
#[inline(always)]
fn set_user_addr4(ctx: &SockAddrContext, to: Endpoint4) {
    let (ip4, port) = to.to_sock_addr();
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run, and the hooks that call this may write these
    // two fields (the verifier refuses the load otherwise).
    unsafe {
        (*sa).user_ip4 = ip4;
        (*sa).user_port = port;
    }
}

/// The socket's cookie: one value for one socket in every hook, so it joins connect4's record to sock_ops' 4-tuple.
#[inline(always)]
fn socket_cookie(ctx: &impl EbpfContext) -> u64 {
    // SAFETY: the helper takes this program's own context pointer, valid for the program's run.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}
