//! `cgroup/connect4` and `cgroup/connect6`: the interception point.
//!
//! Every connect in the intercepted subtree passes through here, so the common case (not IMDS) costs one comparison.
//! A refusal writes no log record, only counts (`maps::refuse`): a pod refused in a loop could otherwise fill the
//! log ring buffer; the agent logs a rate-limited summary per cgroup from those counts.

use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::bpf_get_current_pid_tgid, programs::SockAddrContext,
};

use aya_log_ebpf::error;

use super::{
    ALLOW, REJECT,
    maps::{FileError, NMI_CONFIG, count, file_socket, intercepted_caller, refuse},
    set_user_addr4, socket_cookie,
};
use crate::abi::{ConnRecord, Counter, Endpoint4, IMDS_ADDR, IMDS_PORT, Refusal, ipv4_mapped};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IMDS_IP4_RAW: u32 = u32::from_ne_bytes(IMDS_ADDR);

/// IPv4 connect: redirect TCP to IMDS:80 to the agent and record who asked; refuse any other reach for IMDS.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; the verifier checks each field access.
    let user_ip4 = unsafe { (*sa).user_ip4 };
    if user_ip4 != IMDS_IP4_RAW {
        return ALLOW;
    }
    let Some(cgroup_id) = intercepted_caller() else {
        return ALLOW;
    };
    // SAFETY: as above.
    let (sock_type, protocol, user_port) =
        unsafe { ((*sa).type_, (*sa).protocol, (*sa).user_port) };
    let original = Endpoint4::from_sock_addr(user_ip4, user_port);
    if sock_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return refuse(Refusal::Protocol, cgroup_id);
    }
    if original.port() != IMDS_PORT {
        return refuse(Refusal::Port, cgroup_id);
    }
    // No redirect target configured yet means nobody could attest this caller: refuse, never pass through.
    let Some(config) = NMI_CONFIG.get(0) else {
        return refuse(Refusal::NoTarget, cgroup_id);
    };
    let target = config.target;
    if target.is_unset() {
        return refuse(Refusal::NoTarget, cgroup_id);
    }
    let cookie = socket_cookie(ctx);
    let record = ConnRecord {
        cgroup_id,
        cookie,
        original,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
    };
    match file_socket(cookie, &record, config.max_sockets_per_cgroup) {
        Ok(()) => {}
        Err(FileError::OverCap) => return refuse(Refusal::Cap, cgroup_id),
        Err(FileError::Map) => {
            count(Counter::RecordFailed);
            error!(
                ctx,
                "could not record a redirected socket of cgroup {}; connect refused", cgroup_id
            );
            return REJECT;
        }
    }
    set_user_addr4(ctx, target);
    count(Counter::Redirected);
    ALLOW
}

/// IPv6 connect: `::ffff:169.254.169.254` reaches IMDS over IPv4 from a dual-stack socket. Refuse it so an IPv6
/// socket is no way around the redirect; callers fall back to IPv4, as every SDK does anyway.
#[inline(always)]
pub fn connect6(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; the verifier checks the field access.
    let ip6 = unsafe { (*sa).user_ip6 };
    if ipv4_mapped(ip6) != Some(IMDS_ADDR) {
        return ALLOW;
    }
    let Some(cgroup_id) = intercepted_caller() else {
        return ALLOW;
    };
    refuse(Refusal::V6Mapped, cgroup_id)
}
