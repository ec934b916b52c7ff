//! Packets to IMDS that no socket hook of the pod sees: a TCP SYN in a hand-built Ethernet frame on an `AF_PACKET`
//! socket, and a TCP SYN encapsulated in IPIP or VXLAN and addressed to the node, which decapsulates and forwards it.
//! connect4 never runs for them, and the pod's cgroup egress guard sees only the outer packet (to the node) or
//! nothing at all (packet sockets bypass it). Each attempt reports whether the kernel took the packet; whether it
//! reached IMDS is for the trap to say.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

use clap::Args;
use etherparse::PacketBuilder;
use nmi_agent_e2e::probe::Attempt;
use rustix::net::{AddressFamily, Protocol, SendFlags, SocketFlags, SocketType};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::To;
use crate::report::timed;

const ETH_P_IP: u16 = 0x0800;
/// IPPROTO_IPIP: the outer packet's protocol for IPv4 in IPv4.
const IPPROTO_IPIP: u32 = 4;
/// A source port no connection of the pod uses, so a SYN-ACK that comes back is refused by the pod's kernel.
const SOURCE_PORT: u16 = 40_123;

/// What a forged SYN says about itself, and where it goes.
#[derive(Args)]
pub struct Inner {
    #[command(flatten)]
    to: To,
    /// The inner packet's source address (the pod's own, as a CNI would see it).
    #[arg(long)]
    source: Ipv4Addr,
}

#[derive(Args)]
pub struct FrameArgs {
    #[command(flatten)]
    inner: Inner,
    /// The pod's device the frame is written on.
    #[arg(long, default_value = "eth0")]
    dev: String,
    /// The frame's destination MAC (the pod's gateway: the node's bridge).
    #[arg(long = "dst-mac", value_parser = parse_mac)]
    dst_mac: [u8; 6],
    /// The frame's source MAC.
    #[arg(long = "src-mac", value_parser = parse_mac, default_value = "02:00:00:00:00:01")]
    src_mac: [u8; 6],
}

#[derive(Args)]
pub struct IpipArgs {
    #[command(flatten)]
    inner: Inner,
    /// The node address the outer packet goes to (the tunnel endpoint that decapsulates it).
    #[arg(long)]
    via: Ipv4Addr,
}

#[derive(Args)]
pub struct VxlanArgs {
    #[command(flatten)]
    inner: Inner,
    /// The node's VXLAN endpoint (address and UDP port).
    #[arg(long)]
    via: SocketAddrV4,
    #[arg(long, default_value_t = 42)]
    vni: u32,
    /// The inner frame's destination MAC: the node's VXLAN device, so the node takes the frame as its own and routes it.
    #[arg(long = "inner-dst-mac", value_parser = parse_mac)]
    inner_dst_mac: [u8; 6],
}

/// An Ethernet/IPv4/TCP SYN on an `AF_PACKET` socket bound to nothing, sent out of `dev`.
pub fn frame(args: &FrameArgs) -> Attempt {
    let dst = args.inner.to.addr;
    timed("frame", dst, |_| {
        let (source, target) = endpoints(&args.inner)?;
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(args.src_mac, args.dst_mac)
            .ipv4(source.octets(), target.ip().octets(), 64)
            .tcp(SOURCE_PORT, target.port(), 1, 64_240)
            .syn()
            .write(&mut frame, &[])
            .map_err(|e| ("build", io::Error::other(e.to_string())))?;
        let protocol = socket2::Protocol::from(i32::from(ETH_P_IP.to_be()));
        let socket =
            Socket::new(Domain::PACKET, Type::RAW, Some(protocol)).map_err(|e| ("socket", e))?;
        let index = rustix::net::netdevice::name_to_index(&socket, &args.dev)
            .map_err(|e| ("socket", e.into()))?;
        socket
            .send_to(&frame, &link_address(index, args.dst_mac))
            .map_err(|e| ("send", e))?;
        Ok(())
    })
}

/// The inner SYN behind an IPv4 header to `via` with protocol IPIP, through a raw socket (the kernel builds the outer
/// header).
pub fn ipip(args: &IpipArgs) -> Attempt {
    let dst = args.inner.to.addr;
    timed("ipip", dst, |_| {
        let inner = inner_packet(&args.inner)?;
        let socket = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(Protocol::from_raw(
                IPPROTO_IPIP.try_into().expect("non-zero"),
            )),
        )
        .map_err(|e| ("socket", e.into()))?;
        rustix::net::sendto(
            &socket,
            &inner,
            SendFlags::empty(),
            &SocketAddrV4::new(args.via, 0),
        )
        .map_err(|e| ("send", e.into()))?;
        Ok(())
    })
}

/// The inner SYN in an Ethernet frame behind a VXLAN header, over an ordinary UDP socket to the node's endpoint.
pub fn vxlan(args: &VxlanArgs) -> Attempt {
    let dst = args.inner.to.addr;
    timed("vxlan", dst, |_| {
        let (source, target) = endpoints(&args.inner)?;
        // RFC 7348: flags with the VNI-valid bit, 24 reserved bits, the VNI, 8 reserved bits.
        let mut datagram = vec![0x08, 0, 0, 0];
        datagram.extend_from_slice(&(args.vni << 8).to_be_bytes());
        PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 0x02], args.inner_dst_mac)
            .ipv4(source.octets(), target.ip().octets(), 64)
            .tcp(SOURCE_PORT, target.port(), 1, 64_240)
            .syn()
            .write(&mut datagram, &[])
            .map_err(|e| ("build", io::Error::other(e.to_string())))?;
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| ("socket", e))?;
        socket
            .send_to(&datagram, args.via)
            .map_err(|e| ("send", e))?;
        Ok(())
    })
}

/// An IPv4/TCP SYN from the inner source to the target.
fn inner_packet(inner: &Inner) -> Result<Vec<u8>, (&'static str, io::Error)> {
    let (source, target) = endpoints(inner)?;
    let mut packet = Vec::new();
    PacketBuilder::ipv4(source.octets(), target.ip().octets(), 64)
        .tcp(SOURCE_PORT, target.port(), 1, 64_240)
        .syn()
        .write(&mut packet, &[])
        .map_err(|e| ("build", io::Error::other(e.to_string())))?;
    Ok(packet)
}

fn endpoints(inner: &Inner) -> Result<(Ipv4Addr, SocketAddrV4), (&'static str, io::Error)> {
    match inner.to.addr {
        SocketAddr::V4(target) => Ok((inner.source, target)),
        SocketAddr::V6(_) => Err(("build", io::Error::from(io::ErrorKind::InvalidInput))),
    }
}

/// A `sockaddr_ll` for sending an IPv4 frame out of device `index` to `mac`.
fn link_address(index: u32, mac: [u8; 6]) -> SockAddr {
    let mut ll = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: ETH_P_IP.to_be(),
        sll_ifindex: index as i32,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0; 8],
    };
    ll.sll_addr[..6].copy_from_slice(&mac);
    // SAFETY: `try_init` hands over zeroed storage large enough for any socket address; exactly one `sockaddr_ll` is
    // written into it and its length reported, which is what the kernel expects of an AF_PACKET address.
    let ((), addr) = unsafe {
        SockAddr::try_init(|storage, len| {
            std::ptr::write(storage.cast::<libc::sockaddr_ll>(), ll);
            *len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            Ok(())
        })
    }
    .expect("a sockaddr_ll fits in sockaddr_storage");
    addr
}

/// `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{text}: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{text}: a MAC address has six bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_and_wrong_lengths_do_not() {
        assert_eq!(parse_mac("02:ab:00:00:00:ff"), Ok([2, 0xab, 0, 0, 0, 0xff]));
        assert!(parse_mac("02:ab:00:00:00").is_err());
        assert!(parse_mac("02:ab:00:00:00:zz").is_err());
    }

    #[test]
    fn the_inner_packet_is_a_syn_to_the_target_from_the_given_source() {
        let inner = Inner {
            to: To {
                addr: "169.254.169.254:80".parse().expect("addr"),
            },
            source: Ipv4Addr::new(10, 213, 0, 2),
        };
        let packet = inner_packet(&inner).expect("built");
        let parsed = etherparse::SlicedPacket::from_ip(&packet).expect("parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = &parsed.net else {
            panic!("not IPv4: {parsed:?}");
        };
        assert_eq!(ip.header().source(), [10, 213, 0, 2]);
        assert_eq!(ip.header().destination(), [169, 254, 169, 254]);
        let Some(etherparse::TransportSlice::Tcp(tcp)) = &parsed.transport else {
            panic!("not TCP: {parsed:?}");
        };
        assert!(tcp.syn() && !tcp.ack());
        assert_eq!(tcp.destination_port(), 80);
    }
}
