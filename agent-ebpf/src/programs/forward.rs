//! tc egress on the device that routes to IMDS: the node-level guard for packets no socket hook sees. A pod can write
//! hand-built frames on an `AF_PACKET` socket, or send IPIP/VXLAN that the node decapsulates; both reach the node as
//! packets without a socket and are forwarded, so connect4 and the cgroup egress guard never run for them. Whatever
//! leaves here for IMDS without an IP socket of this node is dropped (see `abi::forward_guard_drops`).
//!
//! Every IPv4 packet the device sends passes through here, so the common case is one comparison: not to IMDS, next.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_hdr_start_off::BPF_HDR_START_NET},
    helpers::bpf_skb_load_bytes_relative,
    programs::TcContext,
};
use aya_log_ebpf::debug;

use super::maps::count;
use crate::abi::{Counter, IMDS_ADDR, forward_guard_drops};

const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;
/// Offset of the destination address in the IPv4 header (options, if any, come after it).
const IPV4_DADDR_OFFSET: u32 = 16;

/// `TC_ACT_UNSPEC` is also TCX's `TCX_NEXT`, and `TC_ACT_SHOT` its `TCX_DROP`: one program serves both attach modes.
/// Passing means "next program", never "accept", so whatever else is attached to the device still runs.
const NEXT: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT;

#[inline(always)]
pub fn forward(ctx: &TcContext) -> i32 {
    if ctx.skb.protocol() != ETH_P_IP_BE {
        return NEXT;
    }
    // Relative to the network header: the device may have an Ethernet header, or none (a tunnel, WireGuard).
    let mut daddr = [0u8; 4];
    // SAFETY: the helper takes this program's own socket buffer and writes at most `daddr.len()` bytes into `daddr`.
    let loaded = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb as *const _,
            IPV4_DADDR_OFFSET,
            daddr.as_mut_ptr() as *mut _,
            daddr.len() as u32,
            BPF_HDR_START_NET,
        )
    };
    if loaded != 0 || daddr != IMDS_ADDR {
        return NEXT;
    }
    // SAFETY: the context pointer is valid for the program's run; `sk` is a field the verifier lets tc programs read
    // (a socket pointer or null).
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    let family = if sk.is_null() {
        None
    } else {
        // SAFETY: checked non-null above; `family` is part of the common socket fields every skb socket has.
        Some(unsafe { (*sk).family })
    };
    if !forward_guard_drops(daddr, family) {
        return NEXT;
    }
    count(Counter::ForwardDropped);
    // Debug only: a pod can send these as fast as it likes; the counter carries the volume.
    debug!(
        ctx,
        "dropped a packet to 169.254.169.254 without a local IP socket on ifindex {}",
        ifindex(ctx)
    );
    DROP
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run and `ifindex` is a readable field.
    unsafe { (*ctx.skb.skb).ifindex }
}
