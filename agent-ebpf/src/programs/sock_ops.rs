//! `sockops`: file a redirected socket's record under its 4-tuple once the connection is established, and remove
//! what this socket filed when it closes.
//!
//! The 4-tuple is not a secret: a process with `NET_ADMIN`/`NET_RAW` in its own network namespace can bind another
//! pod's address and port (`IP_TRANSPARENT`) and connect from there. Three rules keep such a socket from taking or
//! destroying another socket's record:
//! - the record is filed at `ACTIVE_ESTABLISHED_CB`, i.e. only by a socket that received the agent's SYN-ACK, which a
//!   spoofed source address never does (it goes to the real owner of the address);
//! - it is inserted with `BPF_NOEXIST`, never over another record; a second established socket under a recorded
//!   4-tuple withdraws the record, so the agent refuses that 4-tuple rather than attest it as either socket;
//! - on close, a socket removes the 4-tuple's record only if the record carries its own cookie.
//!
//! The socket's own entry (`NMI_SOCKETS`, and with it its place under its cgroup's cap) goes through
//! `maps::drop_socket` here or in `sock_release`, whichever comes first; only the one whose delete succeeds gives the
//! place back.
//!
//! Why the agent never accepts before the record exists (docs/architecture.md, "Attestation" has the kernel path):
//! `tcp_rcv_synsent_state_process` runs `tcp_finish_connect` -> `tcp_init_transfer` -> `bpf_skops_established`
//! (this program, `ACTIVE_ESTABLISHED_CB`) before it sends the ACK that completes the agent's handshake.

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    programs::SockOpsContext,
};

use super::{
    maps::{NMI_CONNS, count, drop_socket, socket_record},
    socket_cookie,
};
use crate::abi::{ConnKey, Counter, Endpoint4};

const AF_INET: u32 = 2;
const EEXIST: i32 = 17;

#[inline(always)]
pub fn sock_ops(ctx: &SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        // Always called for an active open (no callback flag needed), before the final ACK of the handshake leaves.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(ctx),
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

/// A redirected socket sends its SYN: ask for state changes, so that its entries go away with it, also when the
/// connect never completes.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    if ctx.family() != AF_INET || socket_record(socket_cookie(ctx)).is_none() {
        return;
    }
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    if ctx.family() != AF_INET {
        return;
    }
    let Some(record) = socket_record(socket_cookie(ctx)) else {
        return;
    };
    let key = key(ctx);
    match NMI_CONNS.insert(key, record, BPF_NOEXIST.into()) {
        Ok(()) => count(Counter::Linked),
        Err(e) if e == -EEXIST => {
            // Two established sockets under one 4-tuple: one of them uses an address that is not its own, and the
            // record cannot say which. Withdraw it so the agent refuses the 4-tuple (fail closed: at worst the
            // owner's connection is refused, never attested as the spoofer or the spoofer as the owner). The owner's
            // close later finds no record, or one without its cookie, and leaves it.
            count(Counter::RecordCollided);
            let _ = NMI_CONNS.remove(key);
        }
        // No record: the agent refuses the connection.
        Err(_) => count(Counter::RecordFailed),
    }
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    if ctx.family() != AF_INET {
        return;
    }
    let cookie = socket_cookie(ctx);
    drop_socket(cookie);
    let key = key(ctx);
    // SAFETY: copied out at once; a concurrent update or eviction can only make the copy stale, not invalid.
    let filed_by_us = unsafe { NMI_CONNS.get(key) }.is_some_and(|r| r.cookie == cookie);
    // Lookup and delete are two steps, but the record cannot change hands between them: records are never
    // overwritten (BPF_NOEXIST), only this socket's close removes its own, and this callback runs before the kernel
    // unhashes the socket (tcp_set_state calls it first), so no other socket in this network namespace can hold the
    // 4-tuple yet. A record filed in between would have to come from a socket spoofing this address from another
    // namespace; deleting that one refuses the spoofer's connection, which is the safe side.
    if filed_by_us {
        let _ = NMI_CONNS.remove(key);
    }
}
