//! The demo's world, set up one step at a time: the topology with its three pods, the IMDS emulator, the Key Vault
//! emulator, and the agent. Each step prints one line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use nmi_agent_e2e::{Agent, Pod, Topology};

use crate::Stop;
use crate::client::Vault;
use crate::helper::{self, Helper};
use crate::report::{relative, step};
use crate::setup::Paths;
use crate::signals::{self, interrupted};

/// The IMDS emulator listens on the node namespace's loopback: only the agent (node namespace) can reach it.
const IMDS_EMULATOR: &str = "127.0.0.1:50080";
const VAULT_PORT: u16 = 8443;
/// The emulated VM's system-assigned identity: what an unbound pod would get from a fail-open proxy.
const NODE_IDENTITY: &str = "0c0c0c0c-0000-4000-8000-0000000000c3";

/// Everything that runs. Field order is drop order: the agent, the emulators, then the topology they live in.
pub struct World {
    pub agent: Agent,
    pub vault: Vault,
    /// The Key Vault emulator's log: its access decisions.
    pub vault_log: PathBuf,
    _vault: Helper,
    _imds: Helper,
    pub orders: Pod,
    pub billing: Pod,
    pub unbound: Pod,
    pub topo: Topology,
}

impl World {
    /// Sets everything up; `t0` is when the demo started, for the step lines.
    pub fn start(
        paths: &Paths,
        t0: &Instant,
        identities: &[(String, String)],
        bindings: &Path,
    ) -> Result<World, Stop> {
        let (topo, [orders, billing, unbound]) = topology(t0)?;
        let imds = imds_emulator(paths, t0, &topo, identities)?;
        let (vault_helper, vault, vault_log) = vault(paths, t0, &topo)?;
        if interrupted() {
            return Err(Stop::Interrupted);
        }
        let agent = agent(t0, &topo, bindings);
        Ok(World {
            agent,
            vault,
            vault_log,
            _vault: vault_helper,
            _imds: imds,
            orders,
            billing,
            unbound,
            topo,
        })
    }
}

/// The topology with the pods `orders`, `billing` and `unbound`.
fn topology(t0: &Instant) -> Result<(Topology, [Pod; 3]), Stop> {
    let mut topo = Topology::new();
    signals::watch_topology(topo.cgroup.path.clone());
    let pods = ["orders", "billing", "unbound"].map(|label| topo.add_pod(label));
    let [orders, billing, unbound] = &pods;
    step(
        t0,
        &format!(
            "topology {}: node namespace, bridge {}/24, pods orders {} / billing {} / unbound {}",
            topo.name, topo.bridge_ip, orders.ip, billing.ip, unbound.ip
        ),
    );
    if interrupted() {
        return Err(Stop::Interrupted);
    }
    Ok((topo, pods))
}

/// Helpers run in the node namespace and in the topology's `outside` cgroup: not intercepted, and emptied by the
/// topology's cleanup.
fn node_helper(topo: &Topology) -> Pod {
    topo.outside_in(&topo.hostnet)
}

/// The IMDS emulator with the bindings file's identities and a system-assigned one.
fn imds_emulator(
    paths: &Paths,
    t0: &Instant,
    topo: &Topology,
    identities: &[(String, String)],
) -> Result<Helper, Stop> {
    let mut imds = node_helper(topo).command(&paths.imds_emulator);
    imds.args(["--listen", IMDS_EMULATOR]);
    for (name, id) in identities {
        imds.args(["--identity", &format!("{id}={name}")]);
    }
    imds.args(["--system-identity", &format!("{NODE_IDENTITY}=node")]);
    let helper = helper::start(
        "imds-emulator",
        &mut imds,
        &topo.log_dir.join("imds-emulator.log"),
    )?;
    step(
        t0,
        &format!(
            "IMDS emulator on {IMDS_EMULATOR} (node namespace): identities {}, system-assigned `node`",
            identities
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    Ok(helper)
}

/// The Key Vault emulator on the bridge address, with a fresh demo CA; its log.
fn vault(paths: &Paths, t0: &Instant, topo: &Topology) -> Result<(Helper, Vault, PathBuf), Stop> {
    let vault_addr = format!("{}:{VAULT_PORT}", topo.bridge_ip);
    let url = format!("https://{vault_addr}");
    let cert_dir = topo.log_dir.join("vault-tls");
    let mut cmd = node_helper(topo).command(&paths.python);
    cmd.arg(paths.demo("keyvault_emulator.py"))
        .args(["--listen", &vault_addr, "--dir"])
        .arg(&cert_dir)
        .arg("--policy")
        .arg(paths.demo("access-policy.json"))
        .arg("--secrets")
        .arg(paths.demo("secrets.json"));
    let log = topo.log_dir.join("keyvault.log");
    let helper = helper::start("the Key Vault emulator", &mut cmd, &log)?;
    step(
        t0,
        &format!(
            "Key Vault emulator on {url} (TLS: a fresh demo CA, server certificate for {})",
            topo.bridge_ip
        ),
    );
    let vault = Vault {
        url,
        ca: cert_dir.join("ca.pem"),
    };
    Ok((helper, vault, log))
}

/// The agent in standalone mode with the demo's bindings, using the IMDS emulator as IMDS.
fn agent(t0: &Instant, topo: &Topology, bindings: &Path) -> Agent {
    let bindings_arg = bindings.display().to_string();
    let imds_url = format!("http://{IMDS_EMULATOR}");
    let agent = Agent::start(
        topo,
        &["--bindings", &bindings_arg, "--imds-url", &imds_url],
    );
    step(
        t0,
        &format!(
            "nmi-agent ready: listening on {}, programs on {}/, bindings {}",
            agent.listen,
            topo.intercepted.proc_path(),
            relative(bindings)
        ),
    );
    agent
}
