//! The scenario in order: set the world up, let each pod read secrets, check what the agent audited and what reached
//! the trap, and say whether every expectation held.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nmi_agent_e2e::wait::poll;
use nmi_agent_e2e::{Agent, Topology};
use serde_json::Value;

use crate::Stop;
use crate::client::{self, Outcome, SecretRead};
use crate::report::{print_audits, print_next_steps, print_table};
use crate::setup::{self, Paths, Secrets};
use crate::signals::interrupted;
use crate::world::World;

const ORDERS_SECRET: &str = "orders-db-password";
const BILLING_SECRET: &str = "billing-api-key";

/// The whole demo; Ok(true) when every expectation held. The topology and everything in it is dropped (removed)
/// before this returns, also when it panics.
pub fn run(paths: &Paths, hold: bool) -> Result<bool, Stop> {
    let t0 = Instant::now();
    println!(
        "nmi-agent demo: two teams' pods on one node, one Key Vault, unchanged Azure SDK clients\n"
    );
    let bindings = paths.demo("bindings.yaml");
    let identities = setup::identities(&bindings)?;
    for wanted in ["orders", "billing"] {
        if !identities.iter().any(|(name, _)| name == wanted) {
            return Err(Stop::Setup(format!(
                "{} has no identity named `{wanted}`",
                bindings.display()
            )));
        }
    }
    let secrets = Secrets::load(paths)?;
    let world = World::start(paths, &t0, &identities, &bindings)?;

    let reads = read_secrets(paths, &world, &secrets)?;
    let audit_problems = check_audits(&world.agent, &identities, &bindings);
    let leaked = check_trap(&world.topo);
    let passed =
        reads.iter().all(|r| r.unexpected.is_empty()) && audit_problems.is_empty() && leaked == 0;
    if !passed {
        show_logs(&world);
    }
    print_next_steps();
    if hold {
        hold_until_interrupted(&world);
    }
    Ok(passed)
}

/// Each pod's client asks for its own secret and the other team's (the unbound pod for both), then a new process in
/// the orders pod asks again; every read is judged against what the scenario expects, and the table printed.
fn read_secrets(paths: &Paths, w: &World, secrets: &Secrets) -> Result<Vec<SecretRead>, Stop> {
    println!(
        "\nEach pod runs python_keyvault.py: SecretClient(vault, ManagedIdentityCredential()).get_secret(...)\n"
    );
    let mut reads = Vec::new();
    for (pod, identity, wanted) in [
        (&w.orders, "orders", [ORDERS_SECRET, BILLING_SECRET]),
        (&w.billing, "billing", [BILLING_SECRET, ORDERS_SECRET]),
        (&w.unbound, "-", [ORDERS_SECRET, BILLING_SECRET]),
    ] {
        reads.extend(client::run(paths, pod, identity, &w.vault, &wanted)?);
    }
    // A new process in the orders pod: its SDK has no token yet, so it asks again, and the agent answers from its
    // cache (IMDS is not called).
    let rerun = reads.len();
    reads.extend(client::run(
        paths,
        &w.orders,
        "orders",
        &w.vault,
        &[ORDERS_SECRET],
    )?);
    for read in &mut reads {
        judge(read, secrets);
    }
    for read in &mut reads[rerun..] {
        read.pod = "orders, again".into();
    }
    print_table(&reads);
    Ok(reads)
}

/// Marks `read` unexpected unless it is what the scenario expects: each team reads its own secret and is refused the
/// other's; the unbound pod gets no token.
fn judge(read: &mut SecretRead, secrets: &Secrets) {
    let expected = match (read.pod.as_str(), read.secret.as_str()) {
        ("orders", ORDERS_SECRET) | ("billing", BILLING_SECRET) => {
            Outcome::Value(secrets.value(&read.secret))
        }
        ("orders", _) | ("billing", _) => Outcome::Refused(403, "Forbidden".into()),
        _ => Outcome::NoToken,
    };
    if read.outcome != expected {
        read.unexpected = format!("expected {}", expected.describe());
    }
}

/// The agent's side: one audit line per token decision. The unbound pod must get no identity, the others their
/// own. Prints the audit table; returns what is wrong with it.
fn check_audits(agent: &Agent, identities: &[(String, String)], bindings: &Path) -> Vec<String> {
    let token_audits = token_audits(agent);
    let mut problems = Vec::new();
    // The audit names an identity by its client id.
    let name_of = |client_id: &str| {
        identities
            .iter()
            .find(|(_, id)| id.eq_ignore_ascii_case(client_id))
            .map_or(client_id.to_string(), |(name, _)| name.clone())
    };
    for (cgroup, identity) in [("/orders", "orders"), ("/billing", "billing")] {
        let granted: Vec<String> = token_audits
            .iter()
            .filter(|a| a["cgroup"] == cgroup && a["outcome"] == "granted")
            .map(|a| name_of(a["identity"].as_str().unwrap_or("")))
            .collect();
        if granted.is_empty() {
            problems.push(format!("no `granted` audit for {cgroup}"));
        }
        if let Some(other) = granted.iter().find(|name| *name != identity) {
            problems.push(format!("{cgroup} was granted {other}"));
        }
    }
    // The second orders process asked after the first: the agent must have answered from its cache (24 h tokens).
    let last_orders = token_audits.iter().rfind(|a| a["cgroup"] == "/orders");
    if last_orders.is_none_or(|a| a["cache"] != "hit") {
        problems.push("the second orders process was not served from the agent's cache".into());
    }
    let unbound_audits: Vec<&Value> = token_audits
        .iter()
        .filter(|a| a["cgroup"] == "/unbound")
        .collect();
    if unbound_audits.is_empty() {
        problems.push("no audit for /unbound's token requests".into());
    }
    if unbound_audits.iter().any(|a| a["outcome"] != "denied") {
        problems.push("a token request of /unbound was not denied".into());
    }
    print_audits(&token_audits, &problems, &name_of, bindings);
    problems
}

/// The token audits, once every pod's are there (a line may trail the caller's EOF), or what there is after 3 s.
fn token_audits(agent: &Agent) -> Vec<Value> {
    // One decision per token request: orders asked twice (two processes), billing once, unbound at least once.
    let all_pods_seen = |audits: &[Value]| {
        let count = |cgroup: &str| audits.iter().filter(|a| a["cgroup"] == cgroup).count();
        count("/orders") >= 2 && count("/billing") >= 1 && count("/unbound") >= 1
    };
    poll(Duration::from_secs(3), Duration::from_millis(50), || {
        Some(agent.token_audits()).filter(|audits| all_pods_seen(audits))
    })
    .unwrap_or_else(|| agent.token_audits())
}

/// Prints what the trap at 169.254.169.254 counted and returns it: anything is a leak.
fn check_trap(topo: &Topology) -> u64 {
    let leaked = topo.trap.packets();
    println!(
        "\nThe trap at 169.254.169.254 in the node namespace (the real IMDS's address) counted {leaked} packet(s){}",
        if leaked == 0 {
            ": nothing bypassed the agent."
        } else {
            ": LEAK"
        }
    );
    leaked
}

/// After a failure: the agent's log tail and the vault's decisions, and a copy of the logs that outlives the
/// topology (which removes its log dir on a clean drop).
fn show_logs(w: &World) {
    println!(
        "\n--- agent log tail ({}):\n{}",
        w.agent.log_path.display(),
        w.agent.log_tail(30)
    );
    println!(
        "--- Key Vault emulator decisions:\n{}",
        std::fs::read_to_string(&w.vault_log)
            .unwrap_or_default()
            .trim_end()
    );
    let kept = std::env::temp_dir().join(format!("nmi-demo-logs-{}", std::process::id()));
    if copy_dir(&w.topo.log_dir, &kept).is_ok() {
        println!("--- logs kept in {}", kept.display());
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// `--hold`: says how to ask for a token as the orders pod would, and keeps everything up until Ctrl-C.
fn hold_until_interrupted(w: &World) {
    let cgroup = w.orders.cgroup.path.join("cgroup.procs");
    println!(
        "\nHolding the topology until Ctrl-C. Ask for a token as the orders pod would (enter its network namespace,\n\
         join its cgroup, then call IMDS as usual):\n  \
         nsenter --net={} sh -c 'echo $$ > {} && exec curl -s -H Metadata:true \
         \"http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net\"'\n\
         Agent log: {}",
        w.orders.netns.path().display(),
        cgroup.display(),
        w.agent.log_path.display()
    );
    while !interrupted() {
        thread::sleep(Duration::from_millis(100));
    }
}
