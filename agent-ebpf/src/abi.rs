//! The contract between the kernel programs and the agent: map names, sizes, key and value layouts.
//!
//! Every type is `#[repr(C)]` with explicit padding, because the kernel hashes every key byte and the verifier rejects
//! uninitialised stack bytes. Addresses and ports are stored as bytes in network order, so their meaning does not
//! depend on the host's endianness; the constructors below are the only place that converts the kernel's mixed
//! representations, and they are tested on the host.
//!
//! Changing any layout or size here requires bumping [`LAYOUT_VERSION`]: the agent pins maps under a directory named
//! after it, so a pinned map of an older layout is never reused.

/// Bumped on any change to a map's key, value, type or size.
pub const LAYOUT_VERSION: u32 = 5;

/// The Instance Metadata Service address every Azure SDK calls.
pub const IMDS_ADDR: [u8; 4] = [169, 254, 169, 254];
/// The only IMDS port that is redirected; every other port on [`IMDS_ADDR`] is refused.
pub const IMDS_PORT: u16 = 80;

pub const MAP_CONFIG: &str = "NMI_CONFIG";
pub const MAP_EXEMPT: &str = "NMI_EXEMPT";
pub const MAP_SOCKETS: &str = "NMI_SOCKETS";
pub const MAP_CONNS: &str = "NMI_CONNS";
pub const MAP_COUNTERS: &str = "NMI_COUNTERS";
pub const MAP_CGROUP_SOCKETS: &str = "NMI_CGROUP_SOCKETS";
pub const MAP_CGROUP_REFUSALS: &str = "NMI_CGROUP_REFUSALS";

/// Cgroups whose connects are never intercepted (the agent's own).
pub const EXEMPT_MAX: u32 = 64;
/// In-flight redirected sockets (socket cookie -> record). LRU: a socket whose close we never see is evicted oldest
/// first once this many newer ones exist.
pub const SOCKETS_MAX: u32 = 65_536;
/// Established redirected connections (4-tuple -> record). LRU, same reasoning.
pub const CONNS_MAX: u32 = 65_536;
/// Cgroups with a count of live redirected sockets (cgroup id -> count, an i64). LRU: a cgroup whose count is back at zero
/// is forgotten oldest first; a live count is only lost after this many more recently active cgroups, far more
/// than a node runs.
pub const CGROUP_SOCKETS_MAX: u32 = 16_384;
/// The default cap on live redirected sockets per cgroup (see `docs/configuration.md` for the sizing).
pub const DEFAULT_SOCKETS_PER_CGROUP: u32 = 512;
/// Cgroups with refused connects or binds (cgroup id -> [`CgroupRefusals`]). LRU: the cgroup refused least recently
/// is forgotten first; the agent reads the map every second, so a cgroup is only lost from its summaries when more
/// than this many others are refused within one second.
pub const CGROUP_REFUSALS_MAX: u32 = 4_096;

/// Whether a cgroup that already holds `live` redirected sockets may not have another one under `cap` (0: no cap).
/// `live` is signed: a count the LRU forgot and recreated while sockets were open ends below zero when they close,
/// which only loosens that cgroup's cap.
pub const fn over_cap(live: i64, cap: u32) -> bool {
    cap != 0 && live >= cap as i64
}

mod refusal;
pub use refusal::{CgroupRefusals, Refusal};

/// Program names as they appear in the object (the Rust function names of the entry points).
pub const PROG_CONNECT4: &str = "nmi_connect4";
pub const PROG_CONNECT6: &str = "nmi_connect6";
pub const PROG_GETPEERNAME4: &str = "nmi_getpeername4";
pub const PROG_SOCKOPS: &str = "nmi_sock_ops";
pub const PROG_EGRESS: &str = "nmi_egress";
pub const PROG_BIND4: &str = "nmi_bind4";
pub const PROG_BIND6: &str = "nmi_bind6";
pub const PROG_SOCK_RELEASE: &str = "nmi_sock_release";
/// The tc classifier on the device that routes to IMDS (not a cgroup program: attached per device).
pub const PROG_FORWARD: &str = "nmi_forward";

/// Indexes into the per-CPU counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A connect to IMDS:80 rewritten to the agent.
    Redirected = 0,
    /// A connect to IMDS refused: other port, not TCP, an IPv4-mapped IPv6 address, or no redirect configured.
    Refused = 1,
    /// A packet to IMDS dropped by the egress guard (UDP, raw sockets, anything that skipped connect).
    EgressDropped = 2,
    /// A redirect record could not be stored; the connect was refused rather than left unattested.
    RecordFailed = 3,
    /// A redirected connection's 4-tuple recorded for the agent to look up.
    Linked = 4,
    /// A bind to the agent's token or health address and port, from an intercepted cgroup in the agent's network
    /// namespace (a hostNetwork pod trying to stand in for the agent, or to keep it from starting, while it restarts),
    /// refused.
    BindRefused = 5,
    /// A redirected connection established under a 4-tuple that already had a record (a second socket with another
    /// socket's source address: a spoofer). Neither is filed for it and the existing record is withdrawn, so the
    /// agent refuses the connection instead of attesting it as the first socket's caller.
    RecordCollided = 6,
    /// A packet to IMDS leaving the node's IMDS device without a local socket (forwarded from a pod: hand-built
    /// frames, decapsulated IPIP/VXLAN, anything the node routes), or from a packet socket, dropped by the tc guard.
    ForwardDropped = 7,
    /// A connect to IMDS:80 refused because its cgroup already holds its cap of live redirected sockets.
    CgroupCapRefused = 8,
    /// A TCP connect to IMDS on a port other than 80, refused (also counted in `Refused`).
    RefusedPort = 9,
    /// A connect to IMDS that is not TCP (UDP, ...), refused (also counted in `Refused`).
    RefusedProtocol = 10,
    /// An IPv6 connect to `::ffff:169.254.169.254`, refused (also counted in `Refused`).
    RefusedV6Mapped = 11,
    /// A connect to IMDS:80 while no redirect target is configured, refused (also counted in `Refused`).
    RefusedNoTarget = 12,
}

impl Counter {
    pub const ALL: [Counter; 13] = [
        Counter::Redirected,
        Counter::Refused,
        Counter::EgressDropped,
        Counter::RecordFailed,
        Counter::Linked,
        Counter::BindRefused,
        Counter::RecordCollided,
        Counter::ForwardDropped,
        Counter::CgroupCapRefused,
        Counter::RefusedPort,
        Counter::RefusedProtocol,
        Counter::RefusedV6Mapped,
        Counter::RefusedNoTarget,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::Refused => "refused",
            Counter::EgressDropped => "egress_dropped",
            Counter::RecordFailed => "record_failed",
            Counter::Linked => "linked",
            Counter::BindRefused => "bind_refused",
            Counter::RecordCollided => "record_collided",
            Counter::ForwardDropped => "forward_dropped",
            Counter::CgroupCapRefused => "cgroup_cap_refused",
            Counter::RefusedPort => "refused_port",
            Counter::RefusedProtocol => "refused_protocol",
            Counter::RefusedV6Mapped => "refused_v6mapped",
            Counter::RefusedNoTarget => "refused_no_target",
        }
    }

    pub const fn help(self) -> &'static str {
        match self {
            Counter::Redirected => "connects to IMDS:80 redirected to the agent",
            Counter::Refused => {
                "connects to IMDS refused (other port, not TCP, IPv4-mapped IPv6, or no redirect target)"
            }
            Counter::EgressDropped => "packets to IMDS dropped by the egress guard",
            Counter::RecordFailed => {
                "connects refused because their redirect record could not be stored"
            }
            Counter::Linked => "redirected connections recorded under their 4-tuple",
            Counter::BindRefused => {
                "binds to the agent's token or health port by intercepted processes in its network namespace refused"
            }
            Counter::RecordCollided => {
                "redirected connections whose 4-tuple already had another socket's record (refused by the agent)"
            }
            Counter::ForwardDropped => {
                "packets to IMDS without a local socket (forwarded, decapsulated, or from a packet socket) dropped on the IMDS device"
            }
            Counter::CgroupCapRefused => {
                "connects to IMDS:80 refused because the cgroup already held its cap of redirected sockets"
            }
            Counter::RefusedPort => "TCP connects to IMDS on a port other than 80 refused",
            Counter::RefusedProtocol => "connects to IMDS that are not TCP (UDP, ...) refused",
            Counter::RefusedV6Mapped => "IPv6 connects to ::ffff:169.254.169.254 refused",
            Counter::RefusedNoTarget => {
                "connects to IMDS:80 refused while no redirect target was configured"
            }
        }
    }
}

/// An IPv4 address and port, both in network byte order as bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint4 {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

impl Endpoint4 {
    pub const fn new(addr: [u8; 4], port: u16) -> Self {
        Endpoint4 {
            addr,
            port: port.to_be_bytes(),
            _pad: [0; 2],
        }
    }

    /// From `bpf_sock_addr.user_ip4` / `user_port`: both hold network-order bytes in memory; the port sits in the low
    /// 16 bits of a u32 field.
    pub const fn from_sock_addr(user_ip4: u32, user_port: u32) -> Self {
        Endpoint4 {
            addr: user_ip4.to_ne_bytes(),
            port: (user_port as u16).to_ne_bytes(),
            _pad: [0; 2],
        }
    }

    /// The `(user_ip4, user_port)` values that make a `bpf_sock_addr` point at this endpoint.
    pub const fn to_sock_addr(self) -> (u32, u32) {
        (
            u32::from_ne_bytes(self.addr),
            u16::from_ne_bytes(self.port) as u32,
        )
    }

    /// From `bpf_sock_ops.local_ip4` / `local_port`: the address is network order, the port is in host order.
    pub const fn from_sock_ops_local(local_ip4: u32, local_port: u32) -> Self {
        Endpoint4 {
            addr: local_ip4.to_ne_bytes(),
            port: (local_port as u16).to_be_bytes(),
            _pad: [0; 2],
        }
    }

    /// From `bpf_sock_ops.remote_ip4` / `remote_port`: the address is network order, and the port's network-order
    /// bytes sit in the *upper* half of the u32 as the kernel stores it (a long-standing quirk of that field).
    pub const fn from_sock_ops_remote(remote_ip4: u32, remote_port: u32) -> Self {
        Endpoint4 {
            addr: remote_ip4.to_ne_bytes(),
            port: (u32::from_be(remote_port) as u16).to_be_bytes(),
            _pad: [0; 2],
        }
    }

    pub const fn port(self) -> u16 {
        u16::from_be_bytes(self.port)
    }

    pub const fn is_unset(self) -> bool {
        u32::from_ne_bytes(self.addr) == 0 && u16::from_ne_bytes(self.port) == 0
    }
}

/// `bpf_sock_addr.user_ip6`: an IPv6 address as four u32 words whose memory holds the address's network-order bytes.
pub type Ip6Words = [u32; 4];

/// The IPv4 address an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) stands for; `None` for every other IPv6 address.
///
/// This is the one form the kernel hands to IPv4 on a dual-stack socket (`ipv6_addr_type()` calls it
/// `IPV6_ADDR_MAPPED`): 80 zero bits, then 16 one bits. Every textual spelling of it (`::ffff:0:0`,
/// `0:0:0:0:0:ffff:a01:1`) is the same 16 bytes; the IPv4-compatible `::a.b.c.d` is plain IPv6.
pub const fn ipv4_mapped(ip6: Ip6Words) -> Option<[u8; 4]> {
    const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == MAPPED_PREFIX {
        Some(ip6[3].to_ne_bytes())
    } else {
        None
    }
}

/// An address a bind asks for, as the cgroup bind hooks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindAddr {
    /// `bind4`: `user_ip4`'s bytes.
    V4([u8; 4]),
    /// `bind6`: `user_ip6`.
    V6(Ip6Words),
}

/// Whether a socket bound to `addr` and `port` would receive the connects the kernel redirects to `agent`, so that
/// whoever holds it could answer pods' token requests in the agent's place (or, for the health address, keep the
/// agent from binding it).
///
/// An IPv4 connect to the agent finds a listener on the agent's port bound to the agent's address or to the IPv4
/// wildcard, and a dual-stack IPv6 socket is such a listener when bound to the IPv4-mapped form of either
/// (`::ffff:0.0.0.0` *is* the IPv4 wildcard) or to `::`. A `::` socket with `IPV6_V6ONLY` takes no IPv4, but the
/// hook cannot tell it from a dual-stack one; it is refused as well. When the agent itself listens on the IPv4
/// wildcard, every IPv4 address on its port collides with it. An agent endpoint without a port (unset: no redirect
/// yet, or no IPv4 health address) takes nothing.
pub fn bind_takes_agent_port(agent: Endpoint4, addr: BindAddr, port: u16) -> bool {
    if agent.port() == 0 || port != agent.port() {
        return false;
    }
    let ipv4 = match addr {
        BindAddr::V4(ipv4) => ipv4,
        BindAddr::V6([0, 0, 0, 0]) => return true,
        BindAddr::V6(ip6) => match ipv4_mapped(ip6) {
            Some(ipv4) => ipv4,
            None => return false,
        },
    };
    ipv4 == [0; 4] || agent.addr == [0; 4] || ipv4 == agent.addr
}

/// `AF_INET` and `AF_INET6`: the families of sockets whose packets to IMDS the socket hooks have already judged.
pub const INET_FAMILIES: [u32; 2] = [2, 10];

/// The tc guard's one decision, for an IPv4 packet leaving the device that routes to IMDS: drop it when it is
/// addressed to IMDS and no IP socket of this node sent it. `socket_family` is the family of the packet's socket
/// (`__sk_buff.sk->family`), `None` when it has none.
///
/// A packet without a socket was forwarded: it came from another network namespace (a pod's hand-built frames, a
/// packet the node decapsulated from IPIP or VXLAN, anything routed), and only the agent may talk to IMDS for pods.
/// A packet socket (`AF_PACKET`) is a hand-built frame on the node's own device. An IP socket of this network
/// namespace passed the cgroup hooks already: the agent's own upstream calls and node daemons outside the
/// intercepted subtree must keep reaching IMDS, and an intercepted hostNetwork pod's raw or UDP socket was dropped by
/// the cgroup egress guard before it got here.
pub fn forward_guard_drops(daddr: [u8; 4], socket_family: Option<u32>) -> bool {
    if daddr != IMDS_ADDR {
        return false;
    }
    match socket_family {
        None => true,
        Some(family) => family != INET_FAMILIES[0] && family != INET_FAMILIES[1],
    }
}

/// Where redirected connects go: the agent's token service, and the network namespace it listens in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    pub target: Endpoint4,
    /// The agent's network namespace cookie: binds to `target` or `health` from intercepted processes in that
    /// namespace are refused, so nobody else can take those ports while the agent is down.
    pub netns_cookie: u64,
    /// The agent's health listener (`/healthz`, `/readyz`, `/metrics`); unset when it is not an IPv4 address.
    pub health: Endpoint4,
    /// The most live redirected sockets one cgroup may hold; the connect beyond it is refused. 0 means no cap.
    pub max_sockets_per_cgroup: u32,
    pub _pad: u32,
}

impl RedirectConfig {
    /// Whether a bind to `addr` and `port` would take the token service's or the health listener's port (see
    /// [`bind_takes_agent_port`]): the one decision the bind hooks make.
    pub fn bind_takes_an_agent_port(&self, addr: BindAddr, port: u16) -> bool {
        bind_takes_agent_port(self.target, addr, port)
            || bind_takes_agent_port(self.health, addr, port)
    }
}

/// What connect4 learned about a redirected socket, and what the agent needs to attest its caller.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    /// cgroup v2 id of the task that called connect (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// The socket that called connect: sock_ops files and removes a 4-tuple's record only for this socket, so another
    /// socket with the same 4-tuple (a spoofed source address) can neither replace it nor delete it.
    pub cookie: u64,
    /// The destination the caller asked for, before the rewrite.
    pub original: Endpoint4,
    /// The calling process (thread group id).
    pub tgid: u32,
    pub _pad: u32,
}

/// A TCP connection seen from the client: its own address, and the server address it is connected to (the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub client: Endpoint4,
    pub server: Endpoint4,
}

/// The user-space half: aya copies these types to and from the maps as raw bytes.
#[cfg(feature = "user")]
mod pod {
    use super::{CgroupRefusals, ConnKey, ConnRecord, Endpoint4, RedirectConfig};

    // SAFETY: `#[repr(C)]` byte arrays with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for Endpoint4 {}
    // SAFETY: `#[repr(C)]`, an `Endpoint4`, a u64, an `Endpoint4` and two u32, no implicit padding; every bit pattern
    // is valid.
    unsafe impl aya::Pod for RedirectConfig {}
    // SAFETY: `#[repr(C)]` integers and an `Endpoint4`, padding explicit; every bit pattern is valid.
    unsafe impl aya::Pod for ConnRecord {}
    // SAFETY: `#[repr(C)]`, two `Endpoint4`; every bit pattern is valid.
    unsafe impl aya::Pod for ConnKey {}
    // SAFETY: `#[repr(C)]`, an array of u64; every bit pattern is valid.
    unsafe impl aya::Pod for CgroupRefusals {}
}

/// std's address types for the agent and the host tests (the crate has std everywhere but on the BPF target).
#[cfg(not(target_arch = "bpf"))]
mod host {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::{ConnKey, Endpoint4};

    impl From<SocketAddrV4> for Endpoint4 {
        fn from(sa: SocketAddrV4) -> Self {
            Endpoint4::new(sa.ip().octets(), sa.port())
        }
    }

    impl From<Endpoint4> for SocketAddrV4 {
        fn from(ep: Endpoint4) -> Self {
            SocketAddrV4::new(Ipv4Addr::from(ep.addr), ep.port())
        }
    }

    impl ConnKey {
        /// The key of an accepted connection: `peer` is the client, `local` the agent's side.
        pub fn accepted(peer: SocketAddrV4, local: SocketAddrV4) -> Self {
            ConnKey {
                client: peer.into(),
                server: local.into(),
            }
        }
    }
}

#[cfg(test)]
mod tests;
