//! `cgroup/bind4` and `cgroup/bind6`: while the agent is down, every redirected connect still goes to its address.
//! A hostNetwork pod shares the agent's network namespace and could bind that address and port first, then answer
//! pods' token requests itself; or bind the agent's health address, so that the restarted agent could not serve its
//! probes. Binds that would take either, under any spelling (see
//! [`crate::abi::RedirectConfig::bind_takes_an_agent_port`]), from intercepted processes in the agent's namespace
//! are refused; pods in their own namespaces may use the ports freely.

use aya_ebpf::{
    EbpfContext, bindings::bpf_sock_addr, helpers::generated::bpf_get_netns_cookie,
    programs::SockAddrContext,
};

use super::{
    ALLOW,
    maps::{NMI_CONFIG, intercepted_caller, refuse},
};
use crate::abi::{BindAddr, Endpoint4, Refusal};

#[inline(always)]
pub fn bind4(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; the verifier checks each field access.
    let (user_ip4, user_port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let wanted = Endpoint4::from_sock_addr(user_ip4, user_port);
    guard(ctx, BindAddr::V4(wanted.addr), wanted.port())
}

#[inline(always)]
pub fn bind6(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; the verifier checks each field access.
    let (user_ip6, user_port) = unsafe { ((*sa).user_ip6, (*sa).user_port) };
    let port = Endpoint4::from_sock_addr(0, user_port).port();
    guard(ctx, BindAddr::V6(user_ip6), port)
}

/// Refuses the bind if it would take the agent's token or health port in the agent's own namespace.
#[inline(always)]
fn guard(ctx: &SockAddrContext, addr: BindAddr, port: u16) -> i32 {
    let Some(config) = NMI_CONFIG.get(0) else {
        return ALLOW;
    };
    if !config.bind_takes_an_agent_port(addr, port) {
        return ALLOW;
    }
    // SAFETY: the helper takes this program's own context pointer, valid for the program's run.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns != config.netns_cookie {
        return ALLOW;
    }
    match intercepted_caller() {
        // Counted, not logged: the agent's per-cgroup summary reports it.
        Some(cgroup_id) => refuse(Refusal::Bind, cgroup_id),
        None => ALLOW,
    }
}
