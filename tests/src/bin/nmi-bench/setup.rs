//! The benchmark's world: a topology with the IMDS emulator, a plain listener on the bridge address, the agent's
//! arguments, and how to run a load generator inside pod-a.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::thread;

use nmi_agent_e2e::bindings::{self, FileIdentity};
use nmi_agent_e2e::imds_emulator::EmulatedIdentity;
use nmi_agent_e2e::node::NodeEmulator;
use nmi_agent_e2e::process::run_ok;
use nmi_agent_e2e::trap::IMDS;
use nmi_agent_e2e::{Agent, Pod, Topology};
use serde_json::Value;

const EMULATOR_PORT: u16 = 8079;
const LISTENER_PORT: u16 = 8090;
/// The one identity, bound to pod-a: (name, client id).
pub const IDENTITY: (&str, &str) = ("orders", "11111111-1111-1111-1111-111111111111");
/// The query of a token request the agent answers from its cache once primed.
pub const HIT_QUERY: &str = "resource=https://vault.azure.net";

/// Field order is drop order: the emulator stops before the topology goes.
pub struct Bench {
    /// Serves for the whole run; only its address is used.
    _emu: NodeEmulator,
    /// Where load comes from.
    pub pod: Pod,
    /// The emulator on the bridge address: the direct path the redirect is compared with.
    pub emu_addr: SocketAddr,
    /// A plain listener (accept and drop) on the bridge address: the connect path's target.
    pub listen: SocketAddr,
    agent_args: Vec<String>,
    pub topo: Topology,
}

impl Bench {
    pub fn new() -> Bench {
        let topo = Topology::new();
        let emu_addr = SocketAddr::from((topo.bridge_ip, EMULATOR_PORT));
        let emu = NodeEmulator::start(
            &topo.node,
            emu_addr,
            vec![EmulatedIdentity::new(IDENTITY.1, IDENTITY.0)],
        );
        let bindings = bindings::write(
            &topo.log_dir,
            &[FileIdentity::new(IDENTITY.0, IDENTITY.1)],
            &[("pod-a", IDENTITY.0)],
        );
        let agent_args = vec![
            "--bindings".into(),
            bindings.display().to_string(),
            "--imds-url".into(),
            emu.url(),
        ];
        let listen = SocketAddr::from((topo.bridge_ip, LISTENER_PORT));
        accept_and_drop(&topo, listen);
        Bench {
            _emu: emu,
            pod: topo.pod_a.clone(),
            emu_addr,
            listen,
            agent_args,
            topo,
        }
    }

    /// The agent with pod-a bound to [`IDENTITY`] and the emulator as IMDS.
    pub fn start_agent(&self) -> Agent {
        let args: Vec<&str> = self.agent_args.iter().map(String::as_str).collect();
        Agent::start(&self.topo, &args)
    }

    /// Runs `nmi-bench worker <args>` inside pod-a and parses its one JSON line.
    pub fn worker(&self, args: &[&str]) -> Value {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd: Command = self.pod.command(&exe);
        cmd.arg("worker").args(args).stdin(Stdio::null());
        let out = run_ok(&mut cmd);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "worker {args:?}: bad output ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Panics unless a token request from pod-a to 169.254.169.254:80 gets a 200 exactly when `attached`.
    pub fn assert_redirect(&self, attached: bool) {
        let v = self.worker(&["latency", &IMDS.to_string(), "1", HIT_QUERY]);
        let answered = v["errors"] == 0;
        assert_eq!(
            answered,
            attached,
            "expected the agent's programs to be {}: {v}",
            if attached { "attached" } else { "detached" }
        );
    }
}

/// A plain listener in the node namespace: backlog 4096, accept and drop, for the rest of the run.
fn accept_and_drop(topo: &Topology, listen: SocketAddr) {
    let listener: TcpListener = topo.node.run_in(|| {
        let l = TcpListener::bind(listen).unwrap_or_else(|e| panic!("bind {listen}: {e}"));
        // std listens with a smaller backlog; listen(2) again only raises it.
        rustix::net::listen(&l, 4096).unwrap_or_else(|e| panic!("listen {listen}: {e}"));
        l
    });
    thread::spawn(move || {
        loop {
            if let Ok((s, _)) = listener.accept() {
                drop(s);
            }
        }
    });
}
