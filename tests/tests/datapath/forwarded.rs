//! Traffic that no socket hook sees: a pod with `NET_RAW` writes hand-built frames on an `AF_PACKET` socket, or sends
//! IPIP/VXLAN that the node decapsulates. Neither passes connect4 nor the cgroup egress guard; on a node that routes to
//! IMDS (AKS) the node forwards them there. The agent's forwarding guard (tc on the device that routes to IMDS) must
//! drop them, pass the agent's own upstream calls, and stay while the agent is down.

use nmi_agent_e2e::bindings::{self, FileIdentity};
use nmi_agent_e2e::imds_emulator::EmulatedIdentity;
use nmi_agent_e2e::node::NodeEmulator;
use nmi_agent_e2e::routed::{self, RoutedImds, VXLAN_MAC};
use nmi_agent_e2e::{Agent, Attempt, Pod, Topology, require_root};

use super::SETTLE;

const ORDERS: (&str, &str) = ("orders", "11111111-1111-1111-1111-111111111111");
/// Packets of each kind a test sends per round.
const ROUND: usize = 3;

/// Field order is drop order: the agent dies first, then the emulator, then the topology removes their world.
struct Routed {
    agent: Agent,
    emu: NodeEmulator,
    imds: RoutedImds,
    /// The node's tunnel endpoints: VXLAN always, IPIP where the kernel has it.
    vxlan: std::net::SocketAddrV4,
    ipip: bool,
    topo: Topology,
}

/// The routed world: IMDS (the emulator, knowing pod-a's identity) behind the node, tunnel endpoints in the node, and
/// the agent with its default `--imds-url`, so its upstream calls leave through the guarded device too.
fn routed_world(test: &str) -> Option<Routed> {
    if !require_root(test) {
        return None;
    }
    let mut topo = Topology::new();
    let imds = RoutedImds::build(&mut topo);
    let emu = imds.serve(vec![EmulatedIdentity::new(ORDERS.1, ORDERS.0)]);
    let vxlan = routed::add_vxlan(&topo);
    let ipip = routed::add_ipip(&topo).is_some();
    let bindings = bindings::write(
        &topo.log_dir,
        &[FileIdentity::new(ORDERS.0, ORDERS.1)],
        &[("pod-a", ORDERS.0)],
    );
    let agent = Agent::start(&topo, &["--bindings", &bindings.display().to_string()]);
    Some(Routed {
        agent,
        emu,
        imds,
        vxlan,
        ipip,
        topo,
    })
}

impl Routed {
    /// Sends [`ROUND`] packets of each kind to 169.254.169.254:80 (from pod-a, and hand-built frames from the
    /// hostNetwork pod on the node's own IMDS device) and returns, per kind, how many more packets reached IMDS than
    /// before.
    fn send_round(&self) -> Vec<(&'static str, u64)> {
        let (pod, hostnet) = (&self.topo.pod_a, &self.topo.hostnet);
        let source = pod.ip.to_string();
        let gateway_mac = self.topo.node.link_mac(&self.topo.bridge());
        let imds_mac = self.imds.netns.link_mac("eth0");
        let node_source = self.topo.bridge_ip.to_string();
        let via_vxlan = self.vxlan.to_string();
        let via_ipip = self.topo.bridge_ip.to_string();
        let mut kinds: Vec<(&'static str, &Pod, Vec<&str>)> = vec![
            (
                "frame",
                pod,
                vec!["frame", "--source", &source, "--dst-mac", &gateway_mac],
            ),
            // A packet socket on the node itself: its packets have a socket, but no IP socket.
            (
                "hostnet-frame",
                hostnet,
                vec![
                    "frame",
                    "--source",
                    &node_source,
                    "--dev",
                    &self.imds.device,
                    "--dst-mac",
                    &imds_mac,
                ],
            ),
            (
                "vxlan",
                pod,
                vec![
                    "vxlan",
                    "--source",
                    &source,
                    "--via",
                    &via_vxlan,
                    "--inner-dst-mac",
                    VXLAN_MAC,
                ],
            ),
        ];
        if self.ipip {
            kinds.push((
                "ipip",
                pod,
                vec!["ipip", "--source", &source, "--via", &via_ipip],
            ));
        }
        kinds
            .into_iter()
            .map(|(kind, pod, args)| {
                let before = self.imds.trap.packets();
                for _ in 0..ROUND {
                    let sent: Attempt = pod.probe_one(&args);
                    // A drop on the node's own device is reported to a local packet socket's sender (ENOBUFS).
                    let dropped_locally =
                        pod.netns.name == self.topo.node.name && sent.errno == Some(libc::ENOBUFS);
                    assert!(
                        sent.ok || dropped_locally,
                        "{kind}: the pod's kernel refused to send: {sent:?}"
                    );
                }
                std::thread::sleep(SETTLE);
                (kind, self.imds.trap.packets() - before)
            })
            .collect()
    }

    fn packets_sent_per_round(&self) -> f64 {
        (ROUND * if self.ipip { 4 } else { 3 }) as f64
    }

    fn dropped(&self) -> f64 {
        self.agent
            .metric("nmi_kernel_forward_dropped_total")
            .expect("nmi_kernel_forward_dropped_total on /metrics")
    }
}

#[test]
fn frames_and_tunnelled_packets_from_a_pod_never_reach_a_routed_imds_and_the_agent_still_does() {
    let Some(mut w) = routed_world("datapath::forwarded") else {
        return;
    };
    let reached = w.send_round();
    assert!(
        reached.iter().all(|(_, n)| *n == 0),
        "packets a pod forged reached the routed IMDS (per kind): {reached:?}"
    );
    let guard = w
        .agent
        .logs()
        .into_iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("forwarding guard on"))
        })
        .unwrap_or_else(|| {
            panic!(
                "the agent logged no forwarding guard; {}",
                w.agent.describe()
            )
        });
    assert_eq!(
        guard["device"], w.imds.device,
        "guarded the wrong device: {guard}"
    );

    let dropped = w.dropped();
    println!(
        "{} {}: reached IMDS {reached:?}, nmi_kernel_forward_dropped_total {dropped}",
        guard["message"], w.imds.device
    );
    assert!(
        dropped >= w.packets_sent_per_round(),
        "nmi_kernel_forward_dropped_total = {dropped} after {} forged packets",
        w.packets_sent_per_round()
    );

    // The same pod's ordinary request: through the agent, whose upstream call leaves through the guarded device.
    let a = w.topo.pod_a.probe_one(&["http"]);
    assert_eq!(
        a.status
            .as_deref()
            .and_then(|s| s.split_whitespace().nth(1)),
        Some("200"),
        "pod-a's token request through the agent: {a:?}"
    );
    assert!(
        a.body
            .as_deref()
            .is_some_and(|b| b.contains("access_token")),
        "no token in the answer: {a:?}"
    );
    assert!(
        w.emu.calls_for(ORDERS.1) >= 1,
        "the agent's upstream call never reached the routed IMDS"
    );

    // Control: without the guard the very same packets reach IMDS, so the zeros above are the guard's doing.
    w.agent.kill9();
    w.agent.uninstall();
    let unguarded = w.send_round();
    println!("without the guard, reached IMDS {unguarded:?}");
    assert!(
        unguarded.iter().all(|(_, n)| *n > 0),
        "after uninstall, some kind of forged packet still did not reach IMDS (the topology does not forward it, \
         so the test proves nothing for it): {unguarded:?}"
    );
}

#[test]
fn the_forwarding_guard_stays_while_the_agent_is_down_and_a_restart_adopts_it() {
    let Some(mut w) = routed_world("datapath::forwarded_crash") else {
        return;
    };
    w.agent.kill9();
    let while_down = w.send_round();
    assert!(
        while_down.iter().all(|(_, n)| *n == 0),
        "with the agent down, forged packets reached the routed IMDS: {while_down:?}"
    );

    w.agent.restart();
    let after_restart = w.send_round();
    assert!(
        after_restart.iter().all(|(_, n)| *n == 0),
        "after a restart, forged packets reached the routed IMDS: {after_restart:?}"
    );
    // The counter lives in a pinned map: the drops while the agent was down count too.
    let dropped = w.dropped();
    println!(
        "agent down: reached IMDS {while_down:?}; restarted: {after_restart:?}; nmi_kernel_forward_dropped_total {dropped}"
    );
    assert!(
        dropped >= 2.0 * w.packets_sent_per_round(),
        "nmi_kernel_forward_dropped_total = {dropped} after two rounds"
    );
    let a = w.topo.pod_a.probe_one(&["http"]);
    assert!(
        a.body
            .as_deref()
            .is_some_and(|b| b.contains("access_token")),
        "pod-a's token request after the restart: {a:?}"
    );
}
