//! `cgroup/getpeername4`: a redirected socket reports the address its caller asked for, as it would without us.

use aya_ebpf::programs::SockAddrContext;

use super::{ALLOW, maps::socket_record, set_user_addr4, socket_cookie};

#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) -> i32 {
    if let Some(record) = socket_record(socket_cookie(ctx)) {
        set_user_addr4(ctx, record.original);
    }
    ALLOW
}
