//! `cgroup/getpeername4`: a redirected socket reports the address its caller asked for, as it would without us.

use aya_ebpf::{
    EbpfContext, bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie, programs::SockAddrContext,
};

use super::{ALLOW, maps::NMI_SOCKETS};

#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    if let Some(record) = (unsafe { NMI_SOCKETS.get(&cookie) }).copied() {
        let (ip4, port) = record.original.to_sock_addr();
        unsafe {
            (*sa).user_ip4 = ip4;
            (*sa).user_port = port;
        }
    }
    ALLOW
}
