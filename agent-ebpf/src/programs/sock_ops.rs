//! `sockops`: file a redirected socket's record under its 4-tuple, and drop both entries when it closes.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    programs::SockOpsContext,
};

use super::{
    maps::{NMI_CONNS, NMI_SOCKETS, count, socket_record},
    socket_cookie,
};
use crate::abi::{ConnKey, Counter, Endpoint4};

const AF_INET: u32 = 2;

#[inline(always)]
pub fn sock_ops(ctx: &SockOpsContext) -> u32 {
    match ctx.op() {
        // The source port is bound by now and no SYN has left yet, so the entry exists before the agent can accept.
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(ctx),
        _ => {}
    }
    0
}

#[inline(always)]
fn key(ctx: &SockOpsContext) -> ConnKey {
    ConnKey {
        client: Endpoint4::from_sock_ops_local(ctx.local_ip4(), ctx.local_port()),
        server: Endpoint4::from_sock_ops_remote(ctx.remote_ip4(), ctx.remote_port()),
    }
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    if ctx.family() != AF_INET {
        return;
    }
    let Some(record) = socket_record(socket_cookie(ctx)) else {
        return;
    };
    if NMI_CONNS.insert(key(ctx), record, 0).is_ok() {
        count(Counter::Linked);
    }
    // Ask for state changes so the entries go away with the connection, including a connect that never completes.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    if ctx.family() != AF_INET {
        return;
    }
    let _ = NMI_SOCKETS.remove(socket_cookie(ctx));
    let _ = NMI_CONNS.remove(key(ctx));
}
