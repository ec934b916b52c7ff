//! Datagram attempts: UDP through a normal socket, and UDP through a raw one (which no socket hook sees).

use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};

use nmi_agent_e2e::probe::Attempt;
use rustix::net::{AddressFamily, Protocol, SendFlags, SocketFlags, SocketType, ipproto};

use crate::report::timed;

const PAYLOAD: &[u8] = b"nmi-probe";

pub fn udp(addr: SocketAddr, use_connect: bool) -> Attempt {
    let mode = if use_connect { "udp-connect" } else { "udp" };
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("constant");
    timed(mode, addr, |a| {
        let s = UdpSocket::bind(bind).map_err(|e| ("socket", e))?;
        if use_connect {
            s.connect(addr).map_err(|e| ("connect", e))?;
            a.peer = s.peer_addr().ok();
            s.send(PAYLOAD).map_err(|e| ("send", e))?;
        } else {
            s.send_to(PAYLOAD, addr).map_err(|e| ("send", e))?;
        }
        a.local = s.local_addr().ok();
        Ok(())
    })
}

/// One UDP datagram to `addr` through a raw socket: with `hdrincl`, IPPROTO_RAW and an IP header we build (the
/// kernel fills in source, id, length and checksum where we leave zeros); else IPPROTO_UDP, where the kernel builds
/// the IP header. Raw sockets bypass the connect/sendmsg hooks entirely; only an egress filter can stop them.
pub fn raw(addr: SocketAddr, hdrincl: bool) -> Attempt {
    let mode = if hdrincl { "raw-hdrincl" } else { "raw" };
    timed(mode, addr, |_| {
        let SocketAddr::V4(dst) = addr else {
            return Err(("socket", io::Error::from(io::ErrorKind::InvalidInput)));
        };
        let proto = if hdrincl { ipproto::RAW } else { ipproto::UDP };
        raw_send(&dst, &packet(&dst, hdrincl), proto)
    })
}

/// The UDP datagram carrying [`PAYLOAD`] to `dst`, behind an IPv4 header when `with_ip_header`.
fn packet(dst: &SocketAddrV4, with_ip_header: bool) -> Vec<u8> {
    let udp_len = (8 + PAYLOAD.len()) as u16;
    let mut packet = Vec::new();
    if with_ip_header {
        let total = 20 + udp_len;
        let udp = ipproto::UDP.as_raw().get() as u8;
        packet.extend_from_slice(&[0x45, 0]);
        packet.extend_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&[0, 0, 0, 0, 64, udp, 0, 0]);
        packet.extend_from_slice(&[0, 0, 0, 0]);
        packet.extend_from_slice(&dst.ip().octets());
    }
    packet.extend_from_slice(&40000u16.to_be_bytes());
    packet.extend_from_slice(&dst.port().to_be_bytes());
    packet.extend_from_slice(&udp_len.to_be_bytes());
    packet.extend_from_slice(&[0, 0]); // no UDP checksum: allowed over IPv4
    packet.extend_from_slice(PAYLOAD);
    packet
}

fn raw_send(
    dst: &SocketAddrV4,
    packet: &[u8],
    proto: Protocol,
) -> Result<(), (&'static str, io::Error)> {
    let fd = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(proto),
    )
    .map_err(|e| ("socket", e.into()))?;
    // raw(7): the port is ignored for sending and must be 0.
    let to = SocketAddrV4::new(*dst.ip(), 0);
    rustix::net::sendto(&fd, packet, SendFlags::empty(), &to).map_err(|e| ("send", e.into()))?;
    Ok(())
}
