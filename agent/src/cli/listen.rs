//! The token service's address, checked before anything else starts: the kernel redirects pods' connects there, so
//! it must be an address pods can reach.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use super::{DEFAULT_PORT, InterceptArgs};

/// A `--listen` (or `NODE_IP`) the redirect could not use, with what to pass instead.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    #[error("no token service address: pass --listen IP:PORT (or set NODE_IP in Kubernetes)")]
    Missing,
    #[error("--listen {0}: IMDS is IPv4-only, so the redirect target must be an IPv4 address")]
    NotIpv4(SocketAddr),
    #[error(
        "--listen {0}: use the node's own IP and a fixed port; loopback or 0.0.0.0 is not reachable from pods"
    )]
    Unreachable(SocketAddr),
}

/// Where to listen: `listen`, else the node IP on the default port. Loopback is refused: inside a pod's network
/// namespace it is the pod itself, so a redirect there would never reach us.
pub fn token_listen_addr(
    listen: Option<SocketAddr>,
    node_ip: Option<IpAddr>,
) -> Result<SocketAddrV4, ListenError> {
    let addr = match (listen, node_ip) {
        (Some(addr), _) => addr,
        (None, Some(ip)) => SocketAddr::new(ip, DEFAULT_PORT),
        (None, None) => return Err(ListenError::Missing),
    };
    let SocketAddr::V4(v4) = addr else {
        return Err(ListenError::NotIpv4(addr));
    };
    if v4.ip().is_loopback() || v4.ip().is_unspecified() || v4.port() == 0 {
        return Err(ListenError::Unreachable(addr));
    }
    Ok(v4)
}

impl InterceptArgs {
    /// The token service address from `--listen` or `NODE_IP`; see [`token_listen_addr`].
    pub fn listen_addr(&self) -> Result<SocketAddrV4, ListenError> {
        token_listen_addr(self.listen, self.node_ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn an_explicit_listen_address_wins_over_the_node_ip() {
        assert_eq!(
            token_listen_addr(
                Some(addr("10.0.0.5:8080")),
                Some("10.0.0.9".parse().expect("ip"))
            ),
            Ok("10.0.0.5:8080".parse().expect("v4"))
        );
    }

    #[test]
    fn the_node_ip_gets_the_default_port() {
        assert_eq!(
            token_listen_addr(None, Some("10.0.0.9".parse().expect("ip"))),
            Ok(SocketAddrV4::new(
                "10.0.0.9".parse().expect("ip"),
                DEFAULT_PORT
            ))
        );
    }

    #[test]
    fn without_either_the_message_names_both_ways_to_give_one() {
        let err = token_listen_addr(None, None).expect_err("no address was accepted");
        assert_eq!(err, ListenError::Missing);
        let text = err.to_string();
        assert!(
            text.contains("--listen") && text.contains("NODE_IP"),
            "{text}"
        );
    }

    #[test]
    fn ipv6_is_refused_because_imds_is_ipv4_only() {
        assert_eq!(
            token_listen_addr(Some(addr("[fd00::1]:2579")), None),
            Err(ListenError::NotIpv4(addr("[fd00::1]:2579")))
        );
        // A node IP that is IPv6 takes the same path.
        assert!(matches!(
            token_listen_addr(None, Some("fd00::1".parse().expect("ip"))),
            Err(ListenError::NotIpv4(_))
        ));
    }

    #[test]
    fn loopback_unspecified_and_port_zero_are_unreachable_from_pods() {
        for bad in [
            "127.0.0.1:2579",
            "127.1.2.3:2579",
            "0.0.0.0:2579",
            "10.0.0.5:0",
        ] {
            let err = token_listen_addr(Some(addr(bad)), None).expect_err(bad);
            assert_eq!(err, ListenError::Unreachable(addr(bad)));
            assert!(err.to_string().contains("loopback"), "{err}");
        }
    }
}
