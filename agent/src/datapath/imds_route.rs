//! Which device the node routes 169.254.169.254 through: `ip route get 169.254.169.254` over rtnetlink, in the agent's
//! network namespace (the node's). The forwarding guard sits on that device's egress.

use std::net::Ipv4Addr;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nmi_agent_ebpf::abi::IMDS_ADDR;

/// Where the kernel would send a packet to IMDS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImdsRoute {
    /// Out of this device (its index): forwarded packets to IMDS leave through it.
    Device(u32),
    /// 169.254.169.254 is an address of this namespace: packets to it are delivered here, never forwarded.
    Local,
    /// No route (`ENETUNREACH`, or an unreachable/blackhole/prohibit route): nothing reaches IMDS from here now.
    Unreachable,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("asking the kernel for the route to 169.254.169.254 (rtnetlink): {0}")]
    Io(#[from] std::io::Error),
    #[error("the kernel's answer to the route lookup of 169.254.169.254 could not be read: {0}")]
    Decode(String),
    #[error("the route to 169.254.169.254 names no output device: {0}")]
    NoDevice(String),
}

/// Looks the route to IMDS up, as `ip route get 169.254.169.254` would.
pub fn lookup() -> Result<ImdsRoute, RouteError> {
    let mut request = RouteMessage::default();
    request.header.address_family = AddressFamily::Inet;
    request.header.destination_prefix_length = 32;
    request
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(
            Ipv4Addr::from(IMDS_ADDR),
        )));
    let mut message = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(request));
    message.header.flags = NLM_F_REQUEST;
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let (reply, _) = socket.recv_from_full()?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|e| RouteError::Decode(e.to_string()))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => from_route(&route),
        NetlinkPayload::Error(e) => match e.code {
            Some(code) if -code.get() == libc::ENETUNREACH || -code.get() == libc::EHOSTUNREACH => {
                Ok(ImdsRoute::Unreachable)
            }
            _ => Err(RouteError::Io(e.to_io())),
        },
        other => Err(RouteError::Decode(format!("unexpected answer {other:?}"))),
    }
}

/// The answer to one route lookup, read.
fn from_route(route: &RouteMessage) -> Result<ImdsRoute, RouteError> {
    match route.header.kind {
        RouteType::Local => return Ok(ImdsRoute::Local),
        RouteType::Unreachable | RouteType::BlackHole | RouteType::Prohibit => {
            return Ok(ImdsRoute::Unreachable);
        }
        _ => {}
    }
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Oif(index) => Some(ImdsRoute::Device(*index)),
            _ => None,
        })
        .ok_or_else(|| RouteError::NoDevice(format!("{route:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(kind: RouteType, attributes: Vec<RouteAttribute>) -> RouteMessage {
        let mut route = RouteMessage::default();
        route.header.kind = kind;
        route.attributes = attributes;
        route
    }

    #[test]
    fn a_unicast_route_names_its_output_device() {
        let gateway = RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 0, 0, 1)));
        let r = route(RouteType::Unicast, vec![gateway, RouteAttribute::Oif(7)]);
        assert_eq!(from_route(&r).expect("a device"), ImdsRoute::Device(7));
        let without = route(RouteType::Unicast, vec![]);
        assert!(matches!(from_route(&without), Err(RouteError::NoDevice(_))));
    }

    #[test]
    fn local_and_unreachable_routes_have_no_device_to_guard() {
        // The kernel names `lo` as the device of a local route; what matters is that nothing is forwarded.
        let local = route(RouteType::Local, vec![RouteAttribute::Oif(1)]);
        assert_eq!(from_route(&local).expect("local"), ImdsRoute::Local);
        for kind in [
            RouteType::Unreachable,
            RouteType::BlackHole,
            RouteType::Prohibit,
        ] {
            assert_eq!(
                from_route(&route(kind, vec![])).expect("no route"),
                ImdsRoute::Unreachable
            );
        }
    }
}
