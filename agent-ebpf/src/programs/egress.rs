//! `cgroup_skb/egress`: the guard behind the redirect. Whatever leaves the intercepted subtree for IMDS without going
//! through connect (UDP, raw sockets, a socket connected before we attached) is dropped here.

use aya_ebpf::{helpers::bpf_skb_cgroup_id, programs::SkBuffContext};
use aya_log_ebpf::debug;

use super::{
    ALLOW, REJECT,
    maps::{count, is_exempt},
};
use crate::abi::{Counter, IMDS_ADDR};

const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;
/// Offset of the destination address in the IPv4 header; cgroup_skb data starts at the network header.
const IPV4_DADDR_OFFSET: usize = 16;

#[inline(always)]
pub fn egress(ctx: &SkBuffContext) -> i32 {
    if ctx.skb.protocol() != ETH_P_IP_BE {
        return ALLOW;
    }
    let Ok(daddr) = ctx.load::<[u8; 4]>(IPV4_DADDR_OFFSET) else {
        return ALLOW;
    };
    if daddr != IMDS_ADDR {
        return ALLOW;
    }
    // SAFETY: the helper takes this program's own socket buffer, valid for the program's run.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    if is_exempt(cgroup_id) {
        return ALLOW;
    }
    count(Counter::EgressDropped);
    // Debug only: a pod can send these as fast as it likes; the counter carries the volume.
    debug!(
        ctx,
        "dropped a packet to 169.254.169.254 from cgroup {}", cgroup_id
    );
    REJECT
}
