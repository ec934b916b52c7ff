//! `cgroup/bind4` and `cgroup/bind6`: while the agent is down, every redirected connect still goes to its address.
//! A hostNetwork pod shares the agent's network namespace and could bind that address and port first, then answer
//! pods' token requests itself. Binds to it from intercepted processes in the agent's namespace are refused; pods
//! in their own namespaces may use the port freely.

use aya_ebpf::{
    EbpfContext, bindings::bpf_sock_addr, helpers::generated::bpf_get_netns_cookie,
    programs::SockAddrContext,
};
use aya_log_ebpf::info;

use super::{
    ALLOW, REJECT,
    maps::{NMI_CONFIG, count, intercepted_caller},
};
use crate::abi::{Counter, Endpoint4, ipv4_mapped};

/// Whether a bind to `port` in this socket's namespace would take the agent's listening address.
#[inline(always)]
fn takes_agent_port(
    ctx: &SockAddrContext,
    port: u16,
    addr_is_agents: impl Fn(Endpoint4) -> bool,
) -> bool {
    let Some(config) = NMI_CONFIG.get(0) else {
        return false;
    };
    let target = config.target;
    if target.is_unset() || port != target.port() || !addr_is_agents(target) {
        return false;
    }
    // SAFETY: the helper takes this program's own context pointer, valid for the program's run.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    netns == config.netns_cookie && intercepted_caller().is_some()
}

#[inline(always)]
fn refuse(ctx: &SockAddrContext, port: u16) -> i32 {
    count(Counter::BindRefused);
    info!(
        ctx,
        "refused a bind to the agent's port {} in its network namespace", port
    );
    REJECT
}

#[inline(always)]
pub fn bind4(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; the verifier checks each field access.
    let (user_ip4, user_port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let wanted = Endpoint4::from_sock_addr(user_ip4, user_port);
    // The wildcard address takes the agent's address too.
    let takes = takes_agent_port(ctx, wanted.port(), |target| {
        user_ip4 == 0 || wanted.addr == target.addr
    });
    if takes {
        refuse(ctx, wanted.port())
    } else {
        ALLOW
    }
}

#[inline(always)]
pub fn bind6(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; the verifier checks each field access.
    let (ip6, user_port) = unsafe { ((*sa).user_ip6, (*sa).user_port) };
    let port = Endpoint4::from_sock_addr(0, user_port).port();
    // `::` (dual-stack wildcard) and `::ffff:<agent ip>` both take the agent's IPv4 address and port.
    let takes = takes_agent_port(ctx, port, |target| {
        ip6 == [0; 4] || ipv4_mapped(ip6) == Some(target.addr)
    });
    if takes { refuse(ctx, port) } else { ALLOW }
}
