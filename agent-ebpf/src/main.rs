//! Entry points only: each hook hands its context to the module that decides (see `programs`).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod entry {
    use aya_ebpf::{
        macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, classifier, sock_ops},
        programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext, TcContext},
    };
    use nmi_agent_ebpf::programs;

    #[cgroup_sock_addr(connect4)]
    pub fn nmi_connect4(ctx: SockAddrContext) -> i32 {
        programs::connect::connect4(&ctx)
    }

    #[cgroup_sock_addr(connect6)]
    pub fn nmi_connect6(ctx: SockAddrContext) -> i32 {
        programs::connect::connect6(&ctx)
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn nmi_getpeername4(ctx: SockAddrContext) -> i32 {
        programs::getpeername::getpeername4(&ctx)
    }

    #[cgroup_sock_addr(bind4)]
    pub fn nmi_bind4(ctx: SockAddrContext) -> i32 {
        programs::bind::bind4(&ctx)
    }

    #[cgroup_sock_addr(bind6)]
    pub fn nmi_bind6(ctx: SockAddrContext) -> i32 {
        programs::bind::bind6(&ctx)
    }

    #[sock_ops]
    pub fn nmi_sock_ops(ctx: SockOpsContext) -> u32 {
        programs::sock_ops::sock_ops(&ctx)
    }

    #[cgroup_sock(sock_release)]
    pub fn nmi_sock_release(ctx: SockContext) -> i32 {
        programs::sock_release::sock_release(&ctx)
    }

    #[cgroup_skb(egress)]
    pub fn nmi_egress(ctx: SkBuffContext) -> i32 {
        programs::egress::egress(&ctx)
    }

    #[classifier]
    pub fn nmi_forward(ctx: TcContext) -> i32 {
        programs::forward::forward(&ctx)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

/// On the host this crate only provides the shared map types; the programs exist for the bpf target alone.
#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("nmi-agent-ebpf holds kernel programs; build them with `cargo xtask build`.");
}
