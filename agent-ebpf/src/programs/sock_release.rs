//! `cgroup/sock_release`: the last word on every socket of the subtree. A redirected socket whose connect failed
//! before sock_ops saw it (no route, no free source port) never reports a TCP close, so its record and its place
//! under its cgroup's cap would otherwise stay until the LRU pushed them out; here they go with the socket.

use aya_ebpf::programs::SockContext;

use super::{ALLOW, maps::drop_socket, socket_cookie};

#[inline(always)]
pub fn sock_release(ctx: &SockContext) -> i32 {
    drop_socket(socket_cookie(ctx));
    ALLOW
}
