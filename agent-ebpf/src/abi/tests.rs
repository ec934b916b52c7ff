use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use super::*;

// The raw values below are what the kernel hands a little-endian program for 10.1.2.3:46273 / 169.254.169.254:80;
// the sock_ops remote_port sample (0xc1b40000 -> 46273) was read off kernel 6.18.
const IP_10_1_2_3_RAW: u32 = u32::from_ne_bytes([10, 1, 2, 3]);

#[test]
fn sock_addr_fields_round_trip() {
    let user_port = u32::from(80u16.to_be());
    let ep = Endpoint4::from_sock_addr(u32::from_ne_bytes(IMDS_ADDR), user_port);
    assert_eq!(ep, Endpoint4::new(IMDS_ADDR, IMDS_PORT));
    assert_eq!(ep.port(), 80);
    assert_eq!(
        ep.to_sock_addr(),
        (u32::from_ne_bytes(IMDS_ADDR), user_port)
    );
}

#[test]
fn sock_ops_remote_port_lives_in_the_upper_half() {
    let ep = Endpoint4::from_sock_ops_remote(IP_10_1_2_3_RAW, 0xc1b4_0000);
    assert_eq!(
        SocketAddrV4::from(ep),
        SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 46273)
    );
}

#[test]
fn sock_ops_local_port_is_host_order() {
    let ep = Endpoint4::from_sock_ops_local(IP_10_1_2_3_RAW, 46273);
    assert_eq!(
        SocketAddrV4::from(ep),
        SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 46273)
    );
}

#[test]
fn kernel_and_user_views_of_a_connection_agree() {
    // sock_ops on the client: local = client, remote = agent. accept() on the agent: peer = client, local = agent.
    let client = SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 46273);
    let agent = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 2579);
    // remote_port as the kernel stores it: two zero bytes, then the port's network-order bytes.
    let [hi, lo] = 2579u16.to_be_bytes();
    let from_kernel = ConnKey {
        client: Endpoint4::from_sock_ops_local(IP_10_1_2_3_RAW, 46273),
        server: Endpoint4::from_sock_ops_remote(
            u32::from_ne_bytes([10, 1, 0, 1]),
            u32::from_ne_bytes([0, 0, hi, lo]),
        ),
    };
    assert_eq!(from_kernel, ConnKey::accepted(client, agent));
}

#[test]
fn layouts_have_no_implicit_padding() {
    assert_eq!(core::mem::size_of::<Endpoint4>(), 8);
    assert_eq!(core::mem::size_of::<ConnKey>(), 16);
    assert_eq!(core::mem::size_of::<ConnRecord>(), 32);
    // The agent and the kernel read the record's fields at these offsets; the padding is a named field, zeroed.
    assert_eq!(core::mem::offset_of!(ConnRecord, cgroup_id), 0);
    assert_eq!(core::mem::offset_of!(ConnRecord, cookie), 8);
    assert_eq!(core::mem::offset_of!(ConnRecord, original), 16);
    assert_eq!(core::mem::offset_of!(ConnRecord, tgid), 24);
    assert_eq!(core::mem::offset_of!(ConnRecord, _pad), 28);
    assert_eq!(core::mem::size_of::<RedirectConfig>(), 32);
    assert_eq!(
        core::mem::offset_of!(RedirectConfig, max_sockets_per_cgroup),
        24
    );
}

/// `user_ip6` as the kernel lays it out: the address's bytes in order, read four at a time in native order.
fn user_ip6(addr: &str) -> Ip6Words {
    let octets = addr
        .parse::<std::net::Ipv6Addr>()
        .unwrap_or_else(|e| panic!("{addr}: {e}"))
        .octets();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

#[test]
fn ipv4_mapped_recognises_exactly_the_kernels_mapped_form() {
    let table: [(&str, Option<[u8; 4]>); 10] = [
        ("::ffff:169.254.169.254", Some(IMDS_ADDR)),
        ("0:0:0:0:0:ffff:a9fe:a9fe", Some(IMDS_ADDR)),
        ("::ffff:10.1.0.1", Some([10, 1, 0, 1])),
        ("::ffff:0.0.0.0", Some([0, 0, 0, 0])),
        ("::ffff:0:0", Some([0, 0, 0, 0])),
        // IPv4-compatible and the unspecified address are IPv6 to the kernel.
        ("::169.254.169.254", None),
        ("::", None),
        // One bit off in the prefix, or the ones in the wrong word.
        ("::fffe:169.254.169.254", None),
        ("::ffff:0:169.254.169.254", None),
        ("64:ff9b::169.254.169.254", None),
    ];
    for (addr, want) in table {
        assert_eq!(ipv4_mapped(user_ip6(addr)), want, "{addr}");
    }
}

/// A bind address as the hooks see it, from its text.
fn bind_addr(addr: &str) -> BindAddr {
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => BindAddr::V4(ip.octets()),
        Ok(IpAddr::V6(_)) => BindAddr::V6(user_ip6(addr)),
        Err(e) => panic!("{addr}: {e}"),
    }
}

#[test]
fn a_bind_takes_the_agents_port_under_every_spelling_of_its_address_or_the_wildcard() {
    let agent = Endpoint4::new([10, 1, 0, 1], 2579);
    let takes = [
        "10.1.0.1",
        "0.0.0.0",
        "::",
        "0:0:0:0:0:0:0:0",
        "::ffff:0.0.0.0",
        "::ffff:0:0",
        "0:0:0:0:0:ffff:0:0",
        "::ffff:10.1.0.1",
        "::ffff:a01:1",
    ];
    for addr in takes {
        assert!(
            bind_takes_agent_port(agent, bind_addr(addr), 2579),
            "{addr} on the agent's port"
        );
        // The same address on any other port is free, and nothing is guarded before a redirect is configured.
        assert!(
            !bind_takes_agent_port(agent, bind_addr(addr), 2580),
            "{addr}:2580"
        );
        assert!(
            !bind_takes_agent_port(Endpoint4::default(), bind_addr(addr), 2579),
            "{addr} with no agent configured"
        );
    }
}

#[test]
fn a_bind_to_any_other_address_leaves_the_agents_port_alone() {
    let agent = Endpoint4::new([10, 1, 0, 1], 2579);
    let free = [
        "10.1.0.2",
        "127.0.0.1",
        "255.255.255.255",
        "::1",
        // IPv4-compatible, NAT64 and the like are IPv6 addresses to the kernel, not the agent's IPv4 one.
        "::10.1.0.1",
        "::ffff:0:a01:1",
        "64:ff9b::a01:1",
        "::ffff:10.1.0.2",
        "::ffff:127.0.0.1",
        "fe80::1",
    ];
    for addr in free {
        assert!(
            !bind_takes_agent_port(agent, bind_addr(addr), 2579),
            "{addr} on the agent's port"
        );
    }
}

#[test]
fn an_agent_on_the_ipv4_wildcard_collides_with_every_ipv4_address_on_its_port() {
    let agent = Endpoint4::new([0, 0, 0, 0], 9102);
    for addr in [
        "127.0.0.1",
        "10.1.0.1",
        "0.0.0.0",
        "::",
        "::ffff:0.0.0.0",
        "::ffff:127.0.0.1",
        "::ffff:a01:1",
    ] {
        assert!(
            bind_takes_agent_port(agent, bind_addr(addr), 9102),
            "{addr} on the agent's port"
        );
        assert!(
            !bind_takes_agent_port(agent, bind_addr(addr), 9103),
            "{addr}:9103"
        );
    }
    // Plain IPv6 addresses never reach an IPv4 listener.
    for addr in ["::1", "fe80::1", "::127.0.0.1"] {
        assert!(
            !bind_takes_agent_port(agent, bind_addr(addr), 9102),
            "{addr} on the agent's port"
        );
    }
}

#[test]
fn the_bind_hooks_guard_the_token_port_and_the_health_port_under_every_spelling() {
    let config = RedirectConfig {
        target: Endpoint4::new([10, 1, 0, 1], 2579),
        netns_cookie: 1,
        health: Endpoint4::new([127, 0, 0, 1], 9102),
        ..RedirectConfig::default()
    };
    // (address, port, refused)
    let table: [(&str, u16, bool); 22] = [
        // The token service's port: its address, the wildcard, their dual-stack spellings.
        ("10.1.0.1", 2579, true),
        ("0.0.0.0", 2579, true),
        ("::", 2579, true),
        ("::ffff:0.0.0.0", 2579, true),
        ("::ffff:10.1.0.1", 2579, true),
        ("127.0.0.1", 2579, false),
        // The health port: loopback, the wildcard, and every IPv6 form that lands on them.
        ("127.0.0.1", 9102, true),
        ("0.0.0.0", 9102, true),
        ("::", 9102, true),
        ("0:0:0:0:0:0:0:0", 9102, true),
        ("::ffff:0.0.0.0", 9102, true),
        ("::ffff:0:0", 9102, true),
        ("::ffff:127.0.0.1", 9102, true),
        ("::ffff:7f00:1", 9102, true),
        // Other addresses on the health port do not collide with a loopback listener.
        ("127.0.0.2", 9102, false),
        ("10.1.0.1", 9102, false),
        ("::1", 9102, false),
        ("::127.0.0.1", 9102, false),
        ("::ffff:127.0.0.2", 9102, false),
        // Other ports, and the kernel's "any port".
        ("127.0.0.1", 9103, false),
        ("0.0.0.0", 0, false),
        ("::", 2580, false),
    ];
    for (addr, port, refused) in table {
        assert_eq!(
            config.bind_takes_an_agent_port(bind_addr(addr), port),
            refused,
            "{addr} port {port}"
        );
    }
    // Without a health address (an IPv6 one, or a config from before it existed) only the token port is guarded.
    let no_health = RedirectConfig {
        health: Endpoint4::default(),
        ..config
    };
    assert!(!no_health.bind_takes_an_agent_port(bind_addr("127.0.0.1"), 9102));
    assert!(!no_health.bind_takes_an_agent_port(bind_addr("0.0.0.0"), 0));
    assert!(no_health.bind_takes_an_agent_port(bind_addr("0.0.0.0"), 2579));
}

#[test]
fn the_forward_guard_drops_packets_to_imds_that_no_ip_socket_of_the_node_sent() {
    // (destination, the packet's socket family, dropped): AF_INET 2, AF_INET6 10, AF_PACKET 17.
    let other = [10, 213, 0, 1];
    let table: [([u8; 4], Option<u32>, bool); 8] = [
        (IMDS_ADDR, None, true), // forwarded: a pod's frame, a decapsulated packet
        (IMDS_ADDR, Some(17), true), // a packet socket on the node's own device
        (IMDS_ADDR, Some(1), true), // any other family is no IP socket either
        (IMDS_ADDR, Some(2), false), // the agent's upstream, a node daemon
        (IMDS_ADDR, Some(10), false), // a dual-stack socket connected to ::ffff:169.254.169.254
        (other, None, false),    // forwarded traffic elsewhere is not ours to judge
        (other, Some(17), false),
        ([169, 254, 169, 253], None, false),
    ];
    for (daddr, family, dropped) in table {
        assert_eq!(
            forward_guard_drops(daddr, family),
            dropped,
            "{daddr:?} from {family:?}"
        );
    }
}

#[test]
fn the_cap_refuses_the_socket_beyond_it_and_zero_means_no_cap() {
    // (live sockets already held, cap, refused)
    let table: [(i64, u32, bool); 8] = [
        (0, 1, false),
        (0, 512, false),
        (511, 512, false),
        (512, 512, true),
        // A count above the cap (concurrent connects overshot it, or the cap was lowered) still refuses.
        (600, 512, true),
        // Below zero (a count the LRU forgot while its sockets were open): looser, never stuck.
        (-3, 1, false),
        (0, 0, false),
        (i64::MAX, 0, false),
    ];
    for (live, cap, refused) in table {
        assert_eq!(over_cap(live, cap), refused, "{live} held, cap {cap}");
    }
}

#[test]
fn every_refusal_reason_has_its_own_slot_and_its_own_counter() {
    for (i, r) in Refusal::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i, "{r:?} is not at its index");
    }
    let counters: std::collections::HashSet<u32> =
        Refusal::ALL.iter().map(|r| r.counter() as u32).collect();
    assert_eq!(
        counters.len(),
        Refusal::COUNT,
        "two reasons share a counter"
    );
    // The connect refusals keep counting in `refused` as well, as they always did; the cap and the bind guard had
    // counters of their own before.
    let in_refused: Vec<Refusal> = Refusal::ALL
        .into_iter()
        .filter(|r| r.is_refused_connect())
        .collect();
    assert_eq!(
        in_refused,
        [
            Refusal::Port,
            Refusal::Protocol,
            Refusal::V6Mapped,
            Refusal::NoTarget
        ]
    );
    assert_eq!(core::mem::size_of::<CgroupRefusals>(), 8 * Refusal::COUNT);
}

#[test]
fn counters_are_indexed_by_their_place_in_all() {
    for (i, c) in Counter::ALL.iter().enumerate() {
        assert_eq!(*c as usize, i, "{c:?}");
    }
}
