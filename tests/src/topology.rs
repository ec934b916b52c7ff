//! One test's private world: a node namespace with a bridge and the trap, pods, and the cgroup tree.
//!
//! Names (k = per-process counter, P = test pid):
//! - netns `nmie2e-P-k-node`: the node; holds the bridge, the agent, hostNetwork pods and the trap.
//! - netns `nmie2e-P-k-<pod>`: one per pod; `eth0` with 10.213.k.n/24 and a default route via the bridge.
//! - link `ne<k>br` (node ns): the bridge, 10.213.k.1/24. `ne<k>p<n>` (node ns): node end of pod n's veth.
//!   Links live inside this topology's namespaces, so IFNAMSIZ (15) is the only constraint on their names.
//! - cgroup `<cg2>/nmie2e-P-k/`: `intercepted/` (the agent's `--cgroup`), `intercepted/agent` (the agent itself,
//!   exempt), `intercepted/<pod>` per pod and hostNetwork pod, `outside/` (not intercepted: the control group).
//! - bpffs `/sys/fs/bpf/nmie2e-P-k`: the agent's `--pin-dir`.
//! - `$TMPDIR/nmi-e2e/nmie2e-P-k/`: logs; kept when the test fails.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::cgroup::{self, Cgroup};
use crate::cleanup::{self, Cleanup};
use crate::netns::Netns;
use crate::probe::{self, Attempt, Whoami};
use crate::process;
use crate::trap::Trap;

/// A workload: a cgroup plus the network namespace its processes run in.
#[derive(Clone, Debug)]
pub struct Pod {
    /// `pod-a`, `hostnet`, ...: also the cgroup's name and what the agent's audit reports (as `/<label>`).
    pub label: String,
    pub cgroup: Cgroup,
    pub netns: Netns,
    /// The source address its connections carry (the bridge address for a hostNetwork pod).
    pub ip: Ipv4Addr,
}

impl Pod {
    /// A command that starts in this pod's cgroup and network namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        process::place(&mut cmd, Some(&self.cgroup), Some(&self.netns));
        cmd
    }

    /// An `nmi-probe` command in this pod.
    pub fn probe_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.command(probe::bin());
        cmd.args(args);
        cmd
    }

    /// Runs `nmi-probe <args>` in this pod and returns its reports.
    pub fn probe(&self, args: &[&str]) -> Vec<Attempt> {
        probe::run(&mut self.probe_command(args))
    }

    /// Runs a single-attempt probe mode and returns that attempt.
    pub fn probe_one(&self, args: &[&str]) -> Attempt {
        let mut all = self.probe(args);
        assert_eq!(
            all.len(),
            1,
            "probe {args:?} should report one attempt: {all:?}"
        );
        all.pop().expect("one attempt")
    }

    /// Where a process started by [`Pod::command`] really is, as the kernel reports it.
    pub fn whoami(&self) -> Whoami {
        let mut all: Vec<Whoami> = probe::run(&mut self.probe_command(&["whoami"]));
        all.pop().expect("whoami reports one line")
    }
}

pub struct Topology {
    /// `nmie2e-<pid>-<k>`.
    pub name: String,
    pub node: Netns,
    pub bridge_ip: Ipv4Addr,
    /// `<cg2>/nmie2e-P-k`.
    pub cgroup: Cgroup,
    /// The subtree the agent intercepts (`--cgroup`).
    pub intercepted: Cgroup,
    /// `intercepted/agent`: where the agent runs; its own connections must not be redirected.
    pub agent_cgroup: Cgroup,
    /// Not intercepted: processes here behave as if no agent existed.
    pub outside: Cgroup,
    pub pod_a: Pod,
    pub pod_b: Pod,
    /// A hostNetwork pod: intercepted cgroup, node namespace.
    pub hostnet: Pod,
    pub trap: Trap,
    pub pin_dir: PathBuf,
    pub log_dir: PathBuf,
    k: u32,
    pods: u32,
    cleanup: Cleanup,
}

impl Topology {
    /// Builds the standard world: node + bridge + trap, `pod-a` and `pod-b` with their own namespaces, `hostnet`
    /// in the node namespace, and the `agent` and `outside` cgroups.
    // No Default: building namespaces and cgroups is not what a reader expects from `Topology::default()`.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Topology {
        cleanup::prepare_once();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let k = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}{}-{k}", cleanup::PREFIX, std::process::id());
        let mut cleanup = Cleanup::default();

        let cg_root = cgroup::root().join(&name);
        cleanup.cgroup_root(&cg_root);
        let cg = Cgroup::create(cg_root);
        let intercepted = Cgroup::create(cg.path.join("intercepted"));
        let agent_cgroup = Cgroup::create(intercepted.path.join("agent"));
        let outside = Cgroup::create(cg.path.join("outside"));

        let pin_dir = PathBuf::from(cleanup::BPFFS).join(&name);
        cleanup.pin_dir(&pin_dir);

        let node_name = format!("{name}-node");
        cleanup.netns(&node_name);
        let node = Netns::create(&node_name);
        // The subnet is per topology only for readability: each topology has its own namespaces, so parallel
        // topologies could not clash even with the same one.
        let bridge_ip = Ipv4Addr::new(10, 213, (k % 256) as u8, 1);
        let bridge = format!("ne{k:x}br");
        node.ip(&["link", "add", &bridge, "type", "bridge"]);
        node.ip(&["addr", "add", &format!("{bridge_ip}/24"), "dev", &bridge]);
        node.ip(&["link", "set", &bridge, "up"]);
        let trap = Trap::install(&node);

        let log_dir = std::env::temp_dir().join("nmi-e2e").join(&name);
        // A kept log of an earlier run with the same pid must not be read as this run's (logs are appended).
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", log_dir.display()));

        let hostnet = Pod {
            label: "hostnet".into(),
            cgroup: Cgroup::create(intercepted.path.join("hostnet")),
            netns: node.clone(),
            ip: bridge_ip,
        };
        let mut topo = Topology {
            name,
            node,
            bridge_ip,
            cgroup: cg,
            intercepted,
            agent_cgroup,
            outside,
            // Placeholders: add_pod needs the topology it extends; they are replaced right below.
            pod_a: hostnet.clone(),
            pod_b: hostnet.clone(),
            hostnet,
            trap,
            pin_dir,
            log_dir,
            k,
            pods: 0,
            cleanup,
        };
        topo.pod_a = topo.add_pod("pod-a");
        topo.pod_b = topo.add_pod("pod-b");
        topo
    }

    /// A pod with its own network namespace on the bridge and its own cgroup under `intercepted/`.
    pub fn add_pod(&mut self, label: &str) -> Pod {
        self.pods += 1;
        let n = self.pods + 1; // .1 is the bridge
        assert!(n < 255, "too many pods in one topology");
        let ns_name = format!("{}-{label}", self.name);
        self.cleanup.netns(&ns_name);
        let netns = Netns::create(&ns_name);
        let ip = Ipv4Addr::new(10, 213, (self.k % 256) as u8, n as u8);
        let bridge = self.bridge();
        let veth = format!("ne{:x}p{n}", self.k);
        assert!(veth.len() <= 15, "link name {veth} exceeds IFNAMSIZ");
        // Created in the node namespace with the peer born inside the pod's: no link ever exists in the root one.
        self.node.ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns_name,
        ]);
        self.node
            .ip(&["link", "set", &veth, "master", &bridge, "up"]);
        netns.ip(&["link", "set", "lo", "up"]);
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        netns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &self.bridge_ip.to_string(),
        ]);
        Pod {
            label: label.to_string(),
            cgroup: Cgroup::create(self.intercepted.path.join(label)),
            netns,
            ip,
        }
    }

    /// A further network namespace of this topology (`<name>-<suffix>`), removed with it.
    pub fn add_netns(&mut self, suffix: &str) -> Netns {
        let name = format!("{}-{suffix}", self.name);
        self.cleanup.netns(&name);
        Netns::create(&name)
    }

    /// This topology's number: link names in its namespaces carry it (`ne<k>...`).
    pub fn k(&self) -> u32 {
        self.k
    }

    /// The bridge's link name in the node namespace.
    pub fn bridge(&self) -> String {
        format!("ne{:x}br", self.k)
    }

    /// A workload in the *not intercepted* cgroup but inside `pod`'s network namespace: the control that shows
    /// what a pod's traffic does when no agent program applies to it.
    pub fn outside_in(&self, pod: &Pod) -> Pod {
        Pod {
            label: "outside".into(),
            cgroup: self.outside.clone(),
            ..pod.clone()
        }
    }

    /// A workload in the agent's own cgroup (node namespace), i.e. what the agent's upstream calls look like.
    pub fn in_agent_cgroup(&self) -> Pod {
        Pod {
            label: "agent".into(),
            cgroup: self.agent_cgroup.clone(),
            ..self.hostnet.clone()
        }
    }

    /// Another cgroup for the agent, next to its first one (what a new container of the DaemonSet gets).
    pub fn in_new_agent_cgroup(&self, name: &str) -> Pod {
        Pod {
            label: name.into(),
            cgroup: Cgroup::create(self.intercepted.path.join(name)),
            ..self.hostnet.clone()
        }
    }

    /// All namespace names of this topology (for leak checks).
    pub fn netns_names(&self) -> &[String] {
        self.cleanup.netns_names()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "nmi-e2e: test failed; logs of {} kept in {}",
                self.name,
                self.log_dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
        // `cleanup` drops after this and removes processes, pins, namespaces and cgroups.
    }
}
