//! IMDS behind the node, routed as on AKS: "IMDS" in a network namespace of its own, reached from the node namespace
//! over a veth link and a route for 169.254.169.254, with forwarding on in the node namespace only. Pods' packets to
//! IMDS that the node forwards (hand-built frames, decapsulated tunnels) leave through that link, where the agent's
//! forwarding guard sits. The tunnel endpoints a CNI would set up (IPIP, VXLAN) are added on request.
//!
//! Names (k = the topology's number): netns `<topology>-imds`; links in the node namespace `ne<k>im` (to IMDS),
//! `ne<k>ip` (IPIP), `ne<k>vx` (VXLAN); 10.214.k.1/24 (node) and 10.214.k.2/24 (IMDS) on the link.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::imds_emulator::EmulatedIdentity;
use crate::netns::Netns;
use crate::node::NodeEmulator;
use crate::topology::Topology;
use crate::trap::{IMDS, IMDS_IP, Trap};

/// The VXLAN device's UDP port, network identifier and MAC address (inner frames for the node are addressed to it).
pub const VXLAN_PORT: u16 = 4789;
pub const VXLAN_VNI: u32 = 42;
pub const VXLAN_MAC: &str = "02:6e:6d:69:00:01";

pub struct RoutedImds {
    pub netns: Netns,
    /// Counts packets to 169.254.169.254 in the IMDS namespace from anyone but the node's own address on the link.
    pub trap: Trap,
    /// The node-side link: the device the route to IMDS leaves through.
    pub device: String,
    /// The node's address on that link: the source of the agent's (and any node daemon's) calls to IMDS.
    pub node_addr: Ipv4Addr,
}

impl RoutedImds {
    /// Moves IMDS out of `topo`'s node namespace: the trap address leaves the node's `lo`, a new namespace holds it,
    /// and the node routes to it.
    pub fn build(topo: &mut Topology) -> RoutedImds {
        let k = topo.k();
        let netns = topo.add_netns("imds");
        let device = format!("ne{k:x}im");
        let node_addr = Ipv4Addr::new(10, 214, (k % 256) as u8, 1);
        let imds_addr = Ipv4Addr::new(10, 214, (k % 256) as u8, 2);
        let node = &topo.node;
        node.ip(&["addr", "del", &format!("{IMDS_IP}/32"), "dev", "lo"]);
        node.ip(&[
            "link",
            "add",
            &device,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns.name,
        ]);
        node.ip(&["addr", "add", &format!("{node_addr}/24"), "dev", &device]);
        node.ip(&["link", "set", &device, "up"]);
        node.ip(&[
            "route",
            "add",
            &format!("{IMDS_IP}/32"),
            "via",
            &imds_addr.to_string(),
            "dev",
            &device,
        ]);
        node.sysctl("net/ipv4/ip_forward", "1");
        // Decapsulated packets arrive on the tunnel device with a pod's source address, routed back via the bridge:
        // strict reverse-path filtering would drop them before the forward path, hiding what the guard must stop.
        for scope in ["all", "default"] {
            node.sysctl(&format!("net/ipv4/conf/{scope}/rp_filter"), "0");
        }

        netns.ip(&["addr", "add", &format!("{imds_addr}/24"), "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        let trap = Trap::install_except(&netns, Some(node_addr));
        netns.ip(&["route", "add", "default", "via", &node_addr.to_string()]);
        RoutedImds {
            netns,
            trap,
            device,
            node_addr,
        }
    }

    /// The IMDS emulator on 169.254.169.254:80 in the IMDS namespace: the agent's default `--imds-url` reaches it
    /// through the routed link.
    pub fn serve(&self, identities: Vec<EmulatedIdentity>) -> NodeEmulator {
        NodeEmulator::start(&self.netns, SocketAddr::V4(IMDS), identities)
    }
}

/// An IPIP endpoint in the node namespace on the bridge address, as Calico's `tunl0` would be; its name. None when the
/// kernel has no IPIP (the host kernel of this project is built without it; the 6.1 VM has it).
pub fn add_ipip(topo: &Topology) -> Option<String> {
    let name = format!("ne{:x}ip", topo.k());
    let local = topo.bridge_ip.to_string();
    let mut cmd = topo.node.command("ip");
    cmd.args(["link", "add", &name, "type", "ipip", "local", &local]);
    let out = cmd.output().expect("run ip");
    if !out.status.success() {
        eprintln!(
            "nmi-e2e: this kernel cannot make an ipip link ({}); the IPIP case is left to kernels that can",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    topo.node.ip(&["link", "set", &name, "up"]);
    Some(name)
}

/// A VXLAN endpoint in the node namespace on the bridge address (VNI [`VXLAN_VNI`], port [`VXLAN_PORT`], MAC
/// [`VXLAN_MAC`]), as flannel's `flannel.1` would be. Returns where pods send to.
pub fn add_vxlan(topo: &Topology) -> SocketAddrV4 {
    let name = format!("ne{:x}vx", topo.k());
    let local = topo.bridge_ip.to_string();
    topo.node.ip(&[
        "link",
        "add",
        &name,
        "address",
        VXLAN_MAC,
        "type",
        "vxlan",
        "id",
        &VXLAN_VNI.to_string(),
        "dstport",
        &VXLAN_PORT.to_string(),
        "local",
        &local,
        "nolearning",
    ]);
    topo.node.ip(&["link", "set", &name, "up"]);
    SocketAddrV4::new(topo.bridge_ip, VXLAN_PORT)
}
