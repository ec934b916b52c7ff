//! The kernel datapath end to end: the real agent binary with its real eBPF programs, attached to a test's own
//! cgroup subtree, and processes in pods making the calls a workload would make. One kernel behaviour per test;
//! each builds and removes its own topology.
//!
//! Run: `cargo xtask test`, or by hand (root, after `cargo xtask build`):
//! `NMI_AGENT_BIN=target/release/nmi-agent cargo test --release -p nmi-agent-e2e --test datapath -- --test-threads=1`

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use nmi_agent_e2e::agent::{self, HEALTH_PORT};
use nmi_agent_e2e::bindings::{self, FileIdentity};
use nmi_agent_e2e::cgroup::{self, Cgroup};
use nmi_agent_e2e::imds_emulator::EmulatedIdentity;
use nmi_agent_e2e::netns::Netns;
use nmi_agent_e2e::node::NodeEmulator;
use nmi_agent_e2e::probe::{Background, RETRY_LOOP};
use nmi_agent_e2e::trap::{IMDS, TRAP_STATUS};
use nmi_agent_e2e::wait::wait_until;
use nmi_agent_e2e::{Agent, Attempt, Audit, Pod, Topology, require_root};

// In a folder of its own so that cargo does not take it for a test target; it runs with these tests (and in the VM).
#[path = "datapath/forwarded.rs"]
mod forwarded;

/// Audit records can trail the caller's EOF; a packet can still be in flight when the probe exits.
pub(crate) const SETTLE: Duration = Duration::from_millis(300);

/// The agent must be dropped (killed, log tail printed on failure) before the topology removes its world.
struct World {
    agent: Agent,
    topo: Topology,
}

fn world(test: &str) -> Option<World> {
    world_with(test, &[])
}

/// [`world`], with more agent flags.
fn world_with(test: &str, extra: &[&str]) -> Option<World> {
    if !require_root(test) {
        return None;
    }
    let topo = Topology::new();
    // The agent's own upstream calls must not land on the trap (169.254.169.254, the default), or every "trap stays
    // at zero" assertion would be about the agent's traffic instead of the pods'. Nothing listens on this port.
    // Standalone mode with no identities: these tests are about interception and attestation, not tokens.
    let bindings = nmi_agent_e2e::bindings::write(&topo.log_dir, &[], &[]);
    let bindings = bindings.display().to_string();
    let mut args = vec!["--bindings", &bindings, "--imds-url", "http://127.0.0.1:9"];
    args.extend_from_slice(extra);
    let agent = Agent::start(&topo, &args);
    Some(World { agent, topo })
}

/// Asserts that `a` went through the agent and the agent attributed it to `pod`'s cgroup and the probe's process.
fn assert_attested(agent: &Agent, pod: &Pod, a: &Attempt) -> Audit {
    assert!(
        a.ok && a.answered(),
        "{}: no HTTP answer through the agent: {a:?}",
        pod.label
    );
    assert_ne!(
        a.status.as_deref(),
        Some(TRAP_STATUS),
        "{}: answered by the trap, not the agent",
        pod.label
    );
    let local = a.local.expect("connected attempt has a local address");
    assert_eq!(local.ip(), pod.ip, "{}: source address", pod.label);
    let audit = agent.audit_for(local);
    assert_eq!(audit.verdict, "attested", "{}: {audit:?}", pod.label);
    assert_eq!(
        audit.cgroup.as_deref(),
        Some(format!("/{}", pod.label).as_str()),
        "{}: {audit:?}",
        pod.label
    );
    assert_eq!(
        audit.cgroup_id,
        Some(pod.cgroup.id()),
        "{}: cgroup id: {audit:?}",
        pod.label
    );
    assert_eq!(audit.pid, Some(a.pid), "{}: pid: {audit:?}", pod.label);
    audit
}

/// The binds of `addrs` from `pod` that the bind guard did not refuse (with EPERM).
fn binds_not_refused(pod: &Pod, addrs: &[String]) -> Vec<Attempt> {
    addrs
        .iter()
        .map(|addr| pod.probe_one(&["bind", "--addr", addr]))
        .filter(|a| a.ok || a.errno != Some(libc::EPERM))
        .collect()
}

/// Polls `cond` for up to 10 s; panics naming `what` if it never holds.
fn wait_for(cond: impl FnMut() -> bool, what: &str) {
    wait_until(Duration::from_secs(10), what, cond);
}

#[test]
fn pod_and_host_network_pod_reach_the_agent_attested_as_their_own_cgroup() {
    let Some(w) = world("datapath::attested") else {
        return;
    };
    // The agent serves, but its IMDS (nothing listens there) is unreachable: /readyz says so instead of passing.
    let (status, body) = w.agent.readyz();
    assert_eq!(status, 503, "/readyz with IMDS unreachable: {body}");
    assert!(
        body.contains("IMDS"),
        "/readyz does not name what is missing: {body}"
    );

    for pod in [&w.topo.pod_a, &w.topo.hostnet] {
        let a = pod.probe_one(&["http"]);
        assert_attested(&w.agent, pod, &a);
        // The workload must not notice the redirect: SDKs and proxies look at the peer address.
        assert_eq!(
            a.peer,
            Some(SocketAddr::V4(IMDS)),
            "{}: getpeername after redirect",
            pod.label
        );
    }
    thread::sleep(SETTLE);
    assert_eq!(
        w.topo.trap.packets(),
        0,
        "a redirected connection leaked to 169.254.169.254"
    );
}

#[test]
fn a_thousand_concurrent_connections_from_two_pods_are_all_attributed_correctly() {
    let Some(w) = world("datapath::thousand") else {
        return;
    };
    let pods = [&w.topo.pod_a, &w.topo.pod_b];
    let before = w.agent.audits().len();
    let running: Vec<Background> = pods
        .iter()
        .map(|p| {
            Background::spawn(&mut p.probe_command(&[
                "http",
                "--count",
                "500",
                "--concurrency",
                "64",
            ]))
        })
        .collect();
    let results: Vec<Vec<Attempt>> = running.into_iter().map(Background::finish).collect();

    let failed: Vec<&Attempt> = results
        .iter()
        .flatten()
        .filter(|a| !(a.ok && a.answered()))
        .collect();
    // Every connection the agent accepted must be audited, also those whose caller failed later.
    let connected = results
        .iter()
        .flatten()
        .filter(|a| a.local.is_some())
        .count();
    let audits = w
        .agent
        .wait_audits(before + connected, Duration::from_secs(20));
    let mut by_peer: HashMap<SocketAddr, Vec<&Audit>> = HashMap::new();
    for a in &audits[before..] {
        by_peer.entry(a.peer).or_default().push(a);
    }
    let (mut attested, mut refused, mut missing, mut duplicate, mut misattributed) =
        (0, 0, 0, 0, Vec::new());
    for (pod, attempts) in pods.iter().zip(&results) {
        assert_eq!(attempts.len(), 500, "{}: attempts made", pod.label);
        // A client may reuse a source port once its earlier connection is closed (Linux 6.1 does for the same
        // destination), so a peer address can stand for several connections: each needs an audit of its own.
        let mut by_local: HashMap<SocketAddr, Vec<&Attempt>> = HashMap::new();
        for a in attempts {
            if let Some(local) = a.local {
                by_local.entry(local).or_default().push(a);
            }
        }
        for (local, made) in by_local {
            let audited = by_peer.get(&local).map(Vec::as_slice).unwrap_or_default();
            missing += made.len().saturating_sub(audited.len());
            duplicate += audited.len().saturating_sub(made.len());
            for audit in audited {
                if audit.verdict != "attested" {
                    refused += 1;
                    continue;
                }
                let want = (Some(format!("/{}", pod.label)), Some(pod.cgroup.id()));
                let pid_ok = made.iter().any(|a| Some(a.pid) == audit.pid);
                if (audit.cgroup.clone(), audit.cgroup_id) == want && pid_ok {
                    attested += 1;
                } else {
                    misattributed.push(format!("{} {local} -> {audit:?}", pod.label));
                }
            }
        }
    }
    println!(
        "1000 connections: {attested} attested correctly, {} misattributed, {refused} refused, {missing} not \
         audited, {duplicate} audited twice, {} failed at the caller",
        misattributed.len(),
        failed.len()
    );
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for a in &failed {
        *kinds
            .entry(format!("{:?}/{:?}/{:?}", a.stage, a.error, a.status))
            .or_default() += 1;
    }
    assert!(
        failed.is_empty(),
        "{} callers failed, by stage/error/status: {kinds:?}",
        failed.len()
    );
    assert!(
        misattributed.is_empty(),
        "misattributed: {misattributed:#?}"
    );
    assert_eq!(
        (refused, missing, duplicate),
        (0, 0, 0),
        "refused, not audited, audited twice"
    );
    assert_eq!(attested, 1000);
    thread::sleep(SETTLE);
    assert_eq!(
        w.topo.trap.packets(),
        0,
        "a redirected connection leaked to 169.254.169.254"
    );

    // The kernel counted every redirect, and once the connections are closed their map entries are gone again: the
    // 4-tuple map does not fill up with dead connections.
    let redirected = w.agent.metric("nmi_kernel_redirected_total").unwrap_or(0.0);
    assert!(
        redirected >= 1000.0,
        "nmi_kernel_redirected_total = {redirected}"
    );
    wait_for(
        || w.agent.metric("nmi_tracked_connections") == Some(0.0),
        "no redirect records are left after every connection closed",
    );
}

#[test]
fn bypass_attempts_from_a_pod_fail_and_never_reach_imds() {
    let Some(w) = world("datapath::bypass") else {
        return;
    };
    let trap = &w.topo.trap;
    let pod = &w.topo.pod_a;

    // First prove the trap would see these very packets: from the same pod namespace but outside the intercepted
    // subtree, a UDP datagram and a raw packet must arrive. Otherwise "the counter stayed at 0" proves nothing.
    let control = w.topo.outside_in(pod);
    for mode in [&["udp"][..], &["raw"], &["raw", "--hdrincl"]] {
        let before = trap.packets();
        let a = control.probe_one(mode);
        assert!(a.ok, "control {mode:?} could not send: {a:?}");
        let after = trap.wait_above(before, Duration::from_secs(2));
        assert!(
            after > before,
            "control {mode:?} from outside the intercepted cgroup did not reach the trap"
        );
    }
    let baseline = trap.packets();

    let eperm = Some(libc::EPERM);
    let refused_connects = [
        (
            &["v6mapped"][..],
            "TCP over IPv6 to ::ffff:169.254.169.254:80",
        ),
        (&["connect", "--addr", "169.254.169.254:443"], "TCP to :443"),
        (&["udp", "--connect"], "connected UDP to :80"),
    ];
    for (args, what) in refused_connects {
        let a = pod.probe_one(args);
        assert!(
            !a.ok && a.errno == eperm,
            "{what}: expected EPERM at connect, got {a:?}"
        );
    }
    // The refusals reach the agent's log, counted per cgroup and reason (the kernel logs none of them itself).
    wait_for_refusal_line(&w.agent, pod, "TCP to a port other than 80");
    for (reason, n) in [("port", 1.0), ("protocol", 1.0), ("v6mapped", 1.0)] {
        let series = format!("nmi_kernel_refused_{reason}_total");
        assert_eq!(w.agent.metric(&series), Some(n), "{series}");
    }

    // These skip connect; the egress guard must drop the packets. Whether the send call reports it is not the
    // contract (a silent drop is as good), so only the trap decides, below.
    let mut unconnected = Vec::new();
    for args in [
        &["udp"][..],
        &["udp", "--addr", "[::ffff:169.254.169.254]:80"],
        &["raw"],
        &["raw", "--hdrincl"],
    ] {
        unconnected.push(pod.probe_one(args));
    }

    // Talking to the agent's port directly gets a connection but no record in the kernel's map: refused.
    let direct = w.agent.listen.to_string();
    let a = pod.probe_one(&["http", "--addr", &direct]);
    let local = a
        .local
        .unwrap_or_else(|| panic!("direct connect to the agent at {direct} failed: {a:?}"));
    assert!(
        !a.answered(),
        "the agent answered a connection that was not redirected: {a:?}"
    );
    let audit = w.agent.audit_for(local);
    assert_eq!(audit.verdict, "refused", "{audit:?}");
    assert!(
        audit.reason.as_deref().is_some_and(|r| !r.is_empty()),
        "refusal without a reason: {audit:?}"
    );

    thread::sleep(SETTLE);
    assert_eq!(
        trap.packets(),
        baseline,
        "a bypass attempt reached 169.254.169.254; unconnected sends: {unconnected:#?}"
    );
}

/// Kubernetes restarts a crashed agent in a new container, so in a new cgroup: the programs the dead agent pinned
/// (their bind guard lets only exempt cgroups take the agent's port) must not refuse the new agent its own listener.
#[test]
fn an_agent_restarted_in_a_new_cgroup_binds_its_port_and_serves() {
    let Some(mut w) = world("datapath::new_container") else {
        return;
    };
    let before = w.topo.pod_a.probe_one(&["http"]);
    assert_attested(&w.agent, &w.topo.pod_a, &before);
    // More restarts than the pinned exempt set has room for (a crash loop over a node's uptime): each start must
    // make room by dropping the cgroups of agents that are gone, or the 65th would be refused its port for good.
    let restarts = nmi_agent_ebpf::abi::EXEMPT_MAX as usize + 6;
    let mut previous: Option<Pod> = None;
    for n in 2..2 + restarts {
        w.agent.kill9();
        if let Some(old) = previous.take() {
            // The dead container's cgroup goes, as the runtime removes it.
            cgroup::remove_tree(&old.cgroup.path);
        }
        let home = w.topo.in_new_agent_cgroup(&format!("agent-{n}"));
        previous = Some(home.clone());
        w.agent.restart_in(home);
    }
    let after = w.topo.pod_a.probe_one(&["http"]);
    assert_attested(&w.agent, &w.topo.pod_a, &after);
    assert_eq!(w.topo.trap.packets(), 0, "a pod reached 169.254.169.254");
}

#[test]
fn agent_crash_fails_closed_restart_resumes_and_uninstall_restores_direct_access() {
    let Some(mut w) = world("datapath::crash") else {
        return;
    };
    let (trap, pod_a, pod_b) = (&w.topo.trap, &w.topo.pod_a, &w.topo.pod_b);

    // A workload retrying all the time, across the crash and the restart.
    let looping = Background::spawn(&mut pod_b.probe_command(&RETRY_LOOP));
    // Served by the agent at least once before the crash: polled, not slept, so a slow machine cannot fool it.
    let served_b = |agent: &Agent| {
        agent
            .audits()
            .iter()
            .filter(|a| a.verdict == "attested" && a.peer.ip() == std::net::IpAddr::V4(pod_b.ip))
            .count()
    };
    wait_for(
        || served_b(&w.agent) > 0,
        "the loop in pod-b served before the crash",
    );

    w.agent.kill9();
    let a = pod_a.probe_one(&["connect"]);
    assert_eq!(
        a.error.as_deref(),
        Some("ConnectionRefused"),
        "connect with the agent dead: {a:?}"
    );
    assert!(
        a.elapsed_us < 1_000_000,
        "failing closed took {} µs",
        a.elapsed_us
    );
    thread::sleep(SETTLE);
    assert_eq!(
        trap.packets(),
        0,
        "with the agent dead, a pod reached 169.254.169.254"
    );

    // Nobody may stand in for the dead agent: a hostNetwork pod shares its network namespace, so binding its address
    // (or the wildcard) and port would receive every pod's token requests. A pod in its own namespace may use the port.
    let agent_addr = w.agent.listen.to_string();
    let agent_port = w.agent.listen.port();
    for addr in [
        agent_addr.clone(),
        format!("0.0.0.0:{agent_port}"),
        format!("[::]:{agent_port}"),
    ] {
        let a = w.topo.hostnet.probe_one(&["bind", "--addr", &addr]);
        assert!(
            !a.ok && a.errno == Some(libc::EPERM),
            "a hostNetwork pod bound {addr} while the agent was down: {a:?}"
        );
    }
    let own_netns = pod_a.probe_one(&["bind", "--addr", &format!("0.0.0.0:{agent_port}")]);
    assert!(
        own_netns.ok,
        "a pod in its own namespace could not use the port: {own_netns:?}"
    );

    let before_restart = served_b(&w.agent);
    w.agent.restart();
    assert_attested(&w.agent, pod_a, &pod_a.probe_one(&["http"]));
    wait_for(
        || served_b(&w.agent) > before_restart,
        "the loop in pod-b served again after the restart",
    );
    let looped = looping.finish();
    let failures: Vec<&Attempt> = looped.iter().filter(|a| !a.answered()).collect();
    let last_failure = looped.iter().rposition(|a| !a.answered());
    println!(
        "restart loop: {} attempts, {} without an answer",
        looped.len(),
        failures.len()
    );
    assert!(
        !failures.is_empty(),
        "the loop never saw the agent down, so it proves nothing: {} attempts",
        looped.len()
    );
    assert!(
        last_failure.is_some_and(|i| looped[i + 1..].iter().any(Attempt::answered)),
        "the loop was not served again after the restart"
    );
    // Failing closed must also fail fast: an SDK stuck in a timeout is an outage of its own.
    let slow: Vec<&&Attempt> = failures
        .iter()
        .filter(|a| a.elapsed_us >= 1_000_000)
        .collect();
    assert!(
        slow.is_empty(),
        "failures that took a second or more: {slow:#?}"
    );
    assert_eq!(
        trap.packets(),
        0,
        "while the agent restarted, a pod reached 169.254.169.254"
    );

    w.agent.kill9();
    let out = w.agent.uninstall();
    assert!(
        !w.agent.pin_dir.exists(),
        "uninstall left {}: {out:?}",
        w.agent.pin_dir.display()
    );
    // With the programs gone, the pod's default route takes it straight to "IMDS": the trap answers and counts.
    let listener = trap.listen_tcp(80);
    let a = pod_a.probe_one(&["http"]);
    assert_eq!(
        a.status.as_deref(),
        Some(TRAP_STATUS),
        "after uninstall the pod should reach 169.254.169.254: {a:?}"
    );
    assert!(listener.accepted().contains(&a.local.expect("connected")));
    assert!(
        trap.packets() > 0,
        "trap counter did not see the direct connection"
    );
}

/// The pinned links under `pin_dir`, sorted: which programs intercept, and from which start.
fn pinned_links(pin_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut links: Vec<_> = std::fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|layout| {
            std::fs::read_dir(layout.path().join("links"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .map(|link| link.path())
        .collect();
    links.sort();
    links
}

/// A node's boot: no pins, and no pods cgroup yet (the kubelet has not run). The boot guard attaches, creating the
/// cgroup as the kubelet would; a pod loops on IMDS from its first instant and is refused at once, with nothing
/// reaching IMDS; the agent then starts (a pod itself), adopts the pins and serves the same process its own token. The
/// guard run again, before or after the agent is up, changes nothing.
#[test]
fn at_boot_the_guard_fails_pods_closed_until_the_agent_adopts_its_pins_and_serves_them() {
    if !require_root("datapath::boot") {
        return;
    }
    const IDENTITY: (&str, &str) = ("boot-mi", "44444444-4444-4444-4444-444444444444");
    let topo = Topology::new();
    // A leak would be answered by "IMDS" (and counted), not refused.
    let imds = topo.trap.listen_tcp(80);
    let kubepods = Cgroup {
        path: topo.cgroup.path.join("kubepods"),
    };
    assert!(
        !kubepods.path.exists() && pinned_links(&topo.pin_dir).is_empty(),
        "not a boot: the pods cgroup or pins exist already"
    );

    let said = |out: &std::process::Output| String::from_utf8_lossy(&out.stdout).into_owned();
    let first = said(&agent::guard(&topo, &kubepods));
    assert!(first.contains("links pinned"), "guard: {first}");
    assert!(
        kubepods.path.is_dir(),
        "the guard did not create the pods cgroup"
    );
    let guarded = pinned_links(&topo.pin_dir);
    assert!(
        !guarded.is_empty(),
        "the guard exited 0 without pinning anything"
    );

    // The kubelet creates a pod's cgroup and starts it; its first instruction is a token request, repeated.
    let pod = Pod {
        label: "pod-boot".into(),
        cgroup: Cgroup::create(kubepods.path.join("pod-boot")),
        ..topo.pod_a.clone()
    };
    let looping = Background::spawn(&mut pod.probe_command(&RETRY_LOOP));
    let refused = pod.probe_one(&["connect"]);
    assert_eq!(
        refused.error.as_deref(),
        Some("ConnectionRefused"),
        "a pod's connect with only the guard attached: {refused:?}"
    );
    let again = said(&agent::guard(&topo, &kubepods));
    assert!(again.contains("left as it is"), "second guard: {again}");
    assert_eq!(
        pinned_links(&topo.pin_dir),
        guarded,
        "a second guard replaced the links"
    );
    // Nor can a hostNetwork pod stand in for the agent before it runs: the guard turned the bind guard on.
    let hostnet = Pod {
        label: "hostnet-boot".into(),
        cgroup: Cgroup::create(kubepods.path.join("hostnet-boot")),
        ..topo.hostnet.clone()
    };
    let port = agent::LISTEN_PORT;
    let taken = binds_not_refused(
        &hostnet,
        &[
            format!("{}:{port}", topo.bridge_ip),
            format!("0.0.0.0:{port}"),
        ],
    );
    assert!(
        taken.is_empty(),
        "with only the guard attached, a hostNetwork pod bound the agent's port: {taken:?}"
    );
    thread::sleep(SETTLE);
    assert_eq!(
        topo.trap.packets(),
        0,
        "with the guard attached, a pod reached 169.254.169.254"
    );

    // The agent is a pod too: it starts under the pods cgroup the guard intercepts, and adopts the pins.
    let emu = NodeEmulator::start(
        &topo.node,
        SocketAddr::from((topo.bridge_ip, 8079)),
        vec![EmulatedIdentity::new(IDENTITY.1, IDENTITY.0)],
    );
    let file = bindings::write(
        &topo.log_dir,
        &[FileIdentity::new(IDENTITY.0, IDENTITY.1)],
        &[("pod-boot", IDENTITY.0)],
    );
    let home = Pod {
        label: "agent".into(),
        cgroup: Cgroup::create(kubepods.path.join("agent")),
        ..topo.hostnet.clone()
    };
    let file = file.display().to_string();
    let agent = Agent::start_in(
        &topo,
        &kubepods,
        home,
        &["--bindings", &file, "--imds-url", &emu.url()],
        &[],
    );
    wait_for(
        || emu.calls_for(IDENTITY.1) > 0,
        "the looping pod's identity asked of IMDS by the agent",
    );
    let adopted = pinned_links(&topo.pin_dir);
    assert!(
        !adopted.is_empty() && adopted.iter().all(|link| !guarded.contains(link)),
        "the agent did not replace the guard's links: {guarded:?} -> {adopted:?}"
    );
    // With the agent up, the guard (a rerun of the unit, an operator) leaves its links alone.
    let with_agent = said(&agent::guard(&topo, &kubepods));
    assert!(
        with_agent.contains("left as it is"),
        "guard with the agent up: {with_agent}"
    );
    assert_eq!(
        pinned_links(&topo.pin_dir),
        adopted,
        "the guard replaced the agent's links"
    );
    assert_attested(&agent, &pod, &pod.probe_one(&["http"]));

    let looped = looping.finish();
    let first_served = looped.iter().position(Attempt::answered);
    println!(
        "boot loop: {} attempts, first answer at attempt {first_served:?}",
        looped.len()
    );
    let first_served = first_served.expect("the looping pod was never served");
    assert!(
        first_served > 0,
        "served before the agent started, so the loop proves nothing"
    );
    assert!(
        looped.iter().all(|a| a.pid == looped[0].pid),
        "the loop is not one process: the pod was restarted"
    );
    assert_eq!(
        looped[0].error.as_deref(),
        Some("ConnectionRefused"),
        "the pod's first request: {:?}",
        looped[0]
    );
    assert!(
        looped[0].elapsed_us < 1_000_000,
        "refusing took {} µs",
        looped[0].elapsed_us
    );
    assert!(
        looped[..first_served].iter().all(|a| !a.answered()),
        "answered before the agent served"
    );
    let served = &looped[first_served];
    assert!(
        served
            .status
            .as_deref()
            .is_some_and(|s| s.contains(" 200 ")),
        "the first answer is not a token: {served:?}"
    );
    assert!(
        agent.audits().iter().any(|a| a.verdict == "attested"
            && Some(a.peer) == served.local
            && a.cgroup.as_deref() == Some("/pod-boot")
            && a.pid == Some(served.pid)),
        "the token was not served to the looping pod's own cgroup and process"
    );
    thread::sleep(SETTLE);
    assert_eq!(
        topo.trap.packets(),
        0,
        "a pod reached 169.254.169.254 during the boot"
    );
    assert!(
        imds.accepted().is_empty(),
        "\"IMDS\" accepted a pod's connection"
    );
}

#[test]
fn the_agents_own_cgroup_is_not_redirected() {
    let Some(w) = world("datapath::exempt") else {
        return;
    };
    let listener = w.topo.trap.listen_tcp(80);

    let own = w.topo.in_agent_cgroup().probe_one(&["http"]);
    assert_eq!(
        own.status.as_deref(),
        Some(TRAP_STATUS),
        "agent cgroup did not reach 169.254.169.254: {own:?}"
    );
    let own_local = own.local.expect("connected");
    assert!(listener.accepted().contains(&own_local));

    // Control: the same call from the same namespace, one cgroup over, is redirected (else the exemption is
    // indistinguishable from programs that are not attached at all).
    let host = &w.topo.hostnet;
    assert_attested(&w.agent, host, &host.probe_one(&["http"]));
    assert!(
        w.agent.audits().iter().all(|a| a.peer != own_local),
        "the agent's own connection was redirected to itself"
    );
}

#[test]
fn a_process_outside_the_intercepted_subtree_is_untouched() {
    let Some(w) = world("datapath::outside") else {
        return;
    };
    let listener = w.topo.trap.listen_tcp(80);
    let pod = &w.topo.pod_a;

    let before = w.topo.trap.packets();
    let outside = w.topo.outside_in(pod).probe_one(&["http"]);
    assert_eq!(
        outside.status.as_deref(),
        Some(TRAP_STATUS),
        "outside/ did not reach 169.254.169.254: {outside:?}"
    );
    assert_eq!(outside.peer, Some(SocketAddr::V4(IMDS)));
    let local = outside.local.expect("connected");
    assert!(listener.accepted().contains(&local));
    assert!(
        w.topo.trap.wait_above(before, Duration::from_secs(2)) > before,
        "trap did not count it"
    );

    // Control: the same pod namespace, intercepted cgroup, goes to the agent.
    assert_attested(&w.agent, pod, &pod.probe_one(&["http"]));
    assert!(
        w.agent.audits().iter().all(|a| a.peer != local),
        "the agent saw a connection from outside/"
    );
}

#[test]
fn a_host_network_pod_cannot_bind_the_agents_port_by_any_spelling_of_its_address_while_it_is_down()
{
    let Some(mut w) = world("datapath::bind_spellings") else {
        return;
    };
    let (ip, port) = (*w.agent.listen.ip(), w.agent.listen.port());
    // Every address whose bound socket would receive the connects redirected to the agent: its own, the IPv4
    // wildcard, and the IPv6 forms a dual-stack socket maps onto those two (`::ffff:0.0.0.0` is the IPv4 wildcard).
    let spellings = |port: u16| {
        [
            format!("{ip}:{port}"),
            format!("0.0.0.0:{port}"),
            format!("[::]:{port}"),
            format!("[::ffff:0.0.0.0]:{port}"),
            format!("[::ffff:{ip}]:{port}"),
        ]
    };
    w.agent.kill9();
    let hostnet = &w.topo.hostnet;

    // Control: one port over, every spelling binds, so the refusals below are the guard's and not the address's.
    for addr in spellings(port + 1) {
        let a = hostnet.probe_one(&["bind", "--addr", &addr]);
        assert!(
            a.ok,
            "control: a hostNetwork pod could not bind {addr}: {a:?}"
        );
    }
    let bound = binds_not_refused(hostnet, &spellings(port));
    assert!(
        bound.is_empty(),
        "while the agent was down, a hostNetwork pod could bind its port: {bound:#?}"
    );

    // The refusals were the kernel program's (they are counted in the pinned map), and the agent takes its port back.
    w.agent.restart();
    let refused = w.agent.metric("nmi_kernel_bind_refused_total");
    assert!(
        refused.is_some_and(|n| n >= 5.0),
        "nmi_kernel_bind_refused_total = {refused:?} after five refused binds"
    );
    assert_attested(&w.agent, &w.topo.pod_a, &w.topo.pod_a.probe_one(&["http"]));
}

#[test]
fn the_health_port_is_guarded_and_a_held_health_port_never_stops_the_token_service() {
    let Some(mut w) = world("datapath::health_port") else {
        return;
    };
    let port = HEALTH_PORT;
    w.agent.kill9();
    let hostnet = &w.topo.hostnet;

    // A hostNetwork pod holding the health address while the agent restarts would keep it from starting: every
    // spelling that collides with the agent's 127.0.0.1 listener is refused. Control: one port over, it binds.
    let control = hostnet.probe_one(&["bind", "--addr", &format!("127.0.0.1:{}", port + 1)]);
    assert!(
        control.ok,
        "control: a hostNetwork pod could not bind: {control:?}"
    );
    let spellings = [
        format!("127.0.0.1:{port}"),
        format!("0.0.0.0:{port}"),
        format!("[::]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
    ];
    let bound = binds_not_refused(hostnet, &spellings);
    assert!(
        bound.is_empty(),
        "while the agent was down, a hostNetwork pod could bind its health port: {bound:#?}"
    );

    // What the guard cannot reach (a process outside the intercepted subtree, here the test itself in the node
    // namespace) may still hold the port: the agent starts anyway and serves tokens without its health listener.
    let held = w
        .topo
        .node
        .run_in(|| std::net::TcpListener::bind(("127.0.0.1", port)))
        .expect("the test binds the health port in the node namespace");
    w.agent.restart();
    assert_attested(&w.agent, &w.topo.pod_a, &w.topo.pod_a.probe_one(&["http"]));
    let warned = w.agent.logs().iter().any(|v| {
        v["level"] == "WARN"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("cannot bind the health address"))
    });
    assert!(warned, "no warning that the health address is taken");

    // Once the port is free, the agent takes it, and says on /metrics that it had to retry.
    drop(held);
    wait_until(
        Duration::from_secs(30),
        "the agent's /healthz answers once the port is free",
        || matches!(w.agent.try_health_get("/healthz"), Ok((200, _))),
    );
    let failures = w.agent.metric("nmi_health_listener_bind_failures_total");
    assert!(
        failures.is_some_and(|n| n >= 1.0),
        "nmi_health_listener_bind_failures_total = {failures:?} after the port was held"
    );
    let refused = w.agent.metric("nmi_kernel_bind_refused_total");
    assert!(
        refused.is_some_and(|n| n >= spellings.len() as f64),
        "nmi_kernel_bind_refused_total = {refused:?} after {} refused binds",
        spellings.len()
    );
}

/// Waits for the agent's log line about `pod`'s refusals (its first, or a summary) that names `reason`.
fn wait_for_refusal_line(agent: &Agent, pod: &Pod, reason: &str) {
    let cgroup = format!("/{}", pod.label);
    wait_for(
        || {
            agent.logs().iter().any(|l| {
                l["cgroup"] == cgroup.as_str()
                    && l["reasons"].as_str().is_some_and(|r| r.contains(reason))
            })
        },
        &format!("the agent's log names {cgroup} and its refusals ({reason})"),
    );
}

/// Whether `netns` has a TCP socket in `state` (an `ss` state name) that matches the `ss` filter `filter`.
fn has_socket(netns: &Netns, state: &str, filter: &[&str]) -> bool {
    sockets(netns, state, filter) > 0
}

/// How many TCP sockets in `state` that match the `ss` filter `filter` `netns` has.
fn sockets(netns: &Netns, state: &str, filter: &[&str]) -> usize {
    let mut ss = netns.command("ss");
    ss.args(["-Htn", "state", state]).args(filter);
    let out = ss.output().expect("run ss");
    assert!(out.status.success(), "ss: {out:?}");
    out.stdout.iter().filter(|&&b| b == b'\n').count()
}

#[test]
fn a_pod_that_spoofs_another_pods_address_can_neither_take_nor_delete_its_record() {
    let Some(w) = world("datapath::spoofed_record") else {
        return;
    };
    // pod-b is root in its own namespace (as a container with NET_ADMIN is): with IP_TRANSPARENT it binds pod-a's
    // address and port and connects, so its socket has the very 4-tuple of pod-a's connection to the agent. Its SYN
    // reaches the agent, but the answers go to pod-a, the real owner of the address.
    let (victim, spoofer) = (&w.topo.pod_a, &w.topo.pod_b);
    // The spoofer either holds its socket while the agent attests pod-a's connection (a record filed at connect
    // would replace pod-a's), or gives up and closes it first (a close deleting by 4-tuple would remove pod-a's).
    for (port, spoofer_timeout, holds) in [(40_001, "3000", true), (40_002, "300", false)] {
        let source = SocketAddr::from((victim.ip, port)).to_string();
        // Paused, the agent leaves pod-a's connection in its backlog: the window between connect and attestation,
        // made wide enough to act in.
        w.agent.pause();
        let victim_run = Background::spawn(&mut victim.probe_command(&[
            "from",
            "--source",
            &source,
            "--request",
            "--timeout-ms",
            "20000",
        ]));
        wait_for(
            || has_socket(&w.topo.node, "established", &["dst", &source]),
            "pod-a's connection is in the agent's backlog",
        );
        let spoof = Background::spawn(&mut spoofer.probe_command(&[
            "from",
            "--source",
            &source,
            "--transparent",
            "--timeout-ms",
            spoofer_timeout,
        ]));
        let spoofed = if holds {
            wait_for(
                || has_socket(&spoofer.netns, "syn-sent", &["src", &source]),
                "the spoofer's SYN under pod-a's 4-tuple is out",
            );
            thread::sleep(Duration::from_millis(100));
            w.agent.resume();
            spoof.finish()
        } else {
            let spoofed = spoof.finish();
            w.agent.resume();
            spoofed
        };
        let victim_attempts = victim_run.finish();
        let [v] = &victim_attempts[..] else {
            panic!("the victim's probe reports one attempt: {victim_attempts:?}");
        };
        assert_attested(&w.agent, victim, v);
        let [s] = &spoofed[..] else {
            panic!("the spoofer's probe reports one attempt: {spoofed:?}");
        };
        assert!(
            s.peer.is_none() && s.stage.as_deref() == Some("connect"),
            "the spoofer connected under pod-a's 4-tuple: {s:?}"
        );
        let audits = w.agent.audits();
        let for_source: Vec<&Audit> = audits
            .iter()
            .filter(|a| a.peer.to_string() == source)
            .collect();
        assert_eq!(for_source.len(), 1, "audits for {source}: {for_source:?}");
    }
    // The spoofer never completed a handshake, so it never filed a record, and nothing collided.
    assert_eq!(
        w.agent.metric("nmi_kernel_record_collided_total"),
        Some(0.0)
    );
}

/// `netns`'s `eth0` MAC address.
fn mac_of_eth0(netns: &Netns) -> String {
    netns.link_mac("eth0")
}

#[test]
fn a_second_connection_under_a_recorded_4_tuple_is_refused_not_attested_as_the_first() {
    let Some(w) = world("datapath::collided_record") else {
        return;
    };
    let (victim, spoofer, node) = (&w.topo.pod_a, &w.topo.pod_b, &w.topo.node);
    let source = SocketAddr::from((victim.ip, 40_003)).to_string();
    // The agent's end of a connection it closed lingers for tcp_fin_timeout; shortened, so the 4-tuple is free at
    // the agent soon while pod-a's end (and its record) stay.
    let mut sysctl = node.command("sysctl");
    sysctl.args(["-qw", "net.ipv4.tcp_fin_timeout=1"]);
    nmi_agent_e2e::process::run_ok(&mut sysctl);

    // pod-a is served, and keeps its end open after the agent closed its own (CLOSE_WAIT): its record stays filed.
    let victim_run = Background::spawn(&mut victim.probe_command(&[
        "from",
        "--source",
        &source,
        "--request",
        "--hold-ms",
        "5000",
    ]));
    wait_for(
        || has_socket(&victim.netns, "close-wait", &["src", &source]),
        "pod-a was answered and holds its end open",
    );
    wait_for(
        || !has_socket(node, "all", &["dst", &source]),
        "the agent's end of pod-a's connection is gone",
    );

    // pod-b takes pod-a's address as its own and wins the node's ARP entry for it (as an ARP spoofer on a bridged
    // CNI does), so it completes a handshake with the agent under pod-a's 4-tuple.
    spoofer
        .netns
        .ip(&["addr", "add", &format!("{}/32", victim.ip), "dev", "lo"]);
    node.ip(&[
        "neigh",
        "replace",
        &victim.ip.to_string(),
        "lladdr",
        &mac_of_eth0(&spoofer.netns),
        "dev",
        &w.topo.bridge(),
        "nud",
        "permanent",
    ]);
    let spoofed = spoofer.probe(&["from", "--source", &source, "--request"]);
    let [s] = &spoofed[..] else {
        panic!("the spoofer's probe reports one attempt: {spoofed:?}");
    };
    assert!(
        s.peer.is_some(),
        "control: the spoofer did not connect: {s:?}"
    );
    assert!(
        !s.answered(),
        "the agent answered a connection whose 4-tuple had another socket's record: {s:?}"
    );
    let victim_attempts = victim_run.finish();
    let [v] = &victim_attempts[..] else {
        panic!("the victim's probe reports one attempt: {victim_attempts:?}");
    };
    assert!(v.ok && v.answered(), "pod-a was not served: {v:?}");

    let audits = w.agent.wait_audits(2, Duration::from_secs(10));
    let verdicts: Vec<(&str, Option<&str>)> = audits
        .iter()
        .filter(|a| a.peer.to_string() == source)
        .map(|a| (a.verdict.as_str(), a.cgroup.as_deref()))
        .collect();
    assert_eq!(
        verdicts,
        [("attested", Some("/pod-a")), ("refused", None)],
        "pod-a's connection, then the spoofer's under the same 4-tuple"
    );
    assert_eq!(
        w.agent.metric("nmi_kernel_record_collided_total"),
        Some(1.0)
    );
}

#[test]
fn a_pod_holding_redirected_sockets_meets_its_cap_and_other_pods_keep_being_served() {
    // A low cap keeps the flood small; the default (512) is the same code with a larger number.
    const CAP: usize = 32;
    const FLOOD: usize = 200;
    let cap = CAP.to_string();
    let Some(w) = world_with("datapath::cgroup_cap", &["--max-sockets-per-cgroup", &cap]) else {
        return;
    };
    let (flooder, victim) = (&w.topo.pod_a, &w.topo.pod_b);
    let count = FLOOD.to_string();
    let flood = Background::spawn(&mut flooder.probe_command(&["hold", "--count", &count]));
    let refused = || {
        w.agent
            .metric("nmi_kernel_cgroup_cap_refused_total")
            .unwrap_or(0.0)
    };
    // While the flooder sits on every redirected socket it may have and keeps asking for more, another pod's token
    // requests are redirected, attested and answered at once.
    let mut served = 0;
    while refused() < (FLOOD - CAP) as f64 {
        let a = victim.probe_one(&["http"]);
        assert_attested(&w.agent, victim, &a);
        assert!(
            a.elapsed_us < 1_000_000,
            "{}: a token request took {} ms during the flood",
            victim.label,
            a.elapsed_us / 1000
        );
        served += 1;
        assert!(
            served < 500,
            "the flood never met its cap: refused = {}",
            refused()
        );
    }
    // And while the flooder holds its cap's worth, too.
    for _ in 0..5 {
        let a = victim.probe_one(&["http"]);
        assert_attested(&w.agent, victim, &a);
        assert!(a.elapsed_us < 1_000_000, "{a:?}");
        served += 1;
    }

    let attempts = flood.finish();
    let held = attempts.iter().filter(|a| a.ok).count();
    let eperm = attempts
        .iter()
        .filter(|a| !a.ok && a.errno == Some(libc::EPERM))
        .count();
    println!(
        "flood of {FLOOD}: {held} held, {eperm} refused; {served} requests of another pod served meanwhile"
    );
    assert_eq!(
        (held, eperm),
        (CAP, FLOOD - CAP),
        "held, refused at the cap"
    );
    assert_eq!(
        refused(),
        (FLOOD - CAP) as f64,
        "nmi_kernel_cgroup_cap_refused_total"
    );

    // Closing them gives every place back, no more and no fewer: the count follows the sockets down.
    assert_attested(&w.agent, flooder, &flooder.probe_one(&["http"]));
    let half = CAP / 2;
    let established =
        Background::spawn(&mut flooder.probe_command(&["hold", "--count", &half.to_string()]));
    let agent = w.agent.listen.to_string();
    // The agent may already have closed its end of an idle connection (CLOSE_WAIT here): still held.
    wait_for(
        || {
            sockets(&flooder.netns, "established", &["dst", &agent])
                + sockets(&flooder.netns, "close-wait", &["dst", &agent])
                == half
        },
        "the flooder holds half its cap in established connections",
    );

    // Now sockets held in SYN_SENT: the flooder's next hop is black-holed, so its handshakes never complete. They
    // count against the cap like established ones, and another pod is served all the while.
    let bridge_ip = w.topo.bridge_ip.to_string();
    let nowhere = [
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ];
    flooder
        .netns
        .ip(&[&["neigh", "replace", &bridge_ip][..], &nowhere].concat());
    let pending =
        Background::spawn(&mut flooder.probe_command(&["hold", "--pending", "--count", &count]));
    wait_for(
        || sockets(&flooder.netns, "syn-sent", &["dst", &agent]) == CAP - half,
        "the flooder holds the rest of its cap in SYN_SENT",
    );
    for _ in 0..5 {
        let a = victim.probe_one(&["http"]);
        assert_attested(&w.agent, victim, &a);
        assert!(a.elapsed_us < 1_000_000, "{a:?}");
    }
    let attempts = pending.finish();
    let connecting = attempts.iter().filter(|a| a.ok).count();
    let eperm = attempts
        .iter()
        .filter(|a| a.errno == Some(libc::EPERM))
        .count();
    assert_eq!(
        (connecting, eperm),
        (CAP - half, FLOOD - (CAP - half)),
        "in SYN_SENT, refused at the cap: {:?}",
        attempts
            .iter()
            .find(|a| !a.ok && a.errno != Some(libc::EPERM))
    );
    assert_eq!(
        refused(),
        (2 * FLOOD - CAP - (CAP - half)) as f64,
        "nmi_kernel_cgroup_cap_refused_total after both floods"
    );
    flooder
        .netns
        .ip(&["neigh", "del", &bridge_ip, "dev", "eth0"]);

    // The sockets released in SYN_SENT gave back their places exactly once (twice would leave room for more than
    // the cap, never would leave none): with half the cap still established, half of it is free again.
    let again = flooder.probe(&["hold", "--count", &cap]);
    let held = again.iter().filter(|a| a.ok).count();
    assert_eq!(
        held,
        CAP - half,
        "sockets the flooder could add: {again:#?}"
    );
    let established = established.finish();
    assert_eq!(established.iter().filter(|a| a.ok).count(), half);

    // With every socket closed, the whole cap is free again.
    let over = (CAP + 1).to_string();
    let again = flooder.probe(&["hold", "--count", &over]);
    let held = again.iter().filter(|a| a.ok).count();
    assert_eq!(held, CAP, "sockets held after the flood ended: {again:#?}");
    assert_eq!(
        again.last().and_then(|a| a.errno),
        Some(libc::EPERM),
        "the connect beyond the cap"
    );
    // The log has the flooder's refusals, summarised: named by its cgroup, with the reason.
    wait_for_refusal_line(&w.agent, flooder, "over the cgroup's cap");
}

#[test]
fn a_pod_refused_thousands_of_times_costs_a_few_log_lines_and_is_counted_exactly() {
    const FLOOD: usize = 5_000;
    let Some(w) = world("datapath::refusal_log") else {
        return;
    };
    let pod = &w.topo.pod_a;
    let cgroup = format!("/{}", pod.label);
    // Lines about this pod's refusals, however they are worded: its cgroup, or any mention of a refusal.
    let about_refusals = || -> Vec<serde_json::Value> {
        w.agent
            .logs()
            .into_iter()
            .filter(|l| {
                let text = l.to_string().to_lowercase();
                l["cgroup"] == cgroup.as_str() || text.contains("refus")
            })
            .collect()
    };
    let before = about_refusals().len();

    // One refusal first: it is logged at once, naming the pod's cgroup and the reason.
    let first = pod.probe_one(&["udp", "--connect"]);
    assert!(!first.ok && first.errno == Some(libc::EPERM), "{first:?}");
    wait_until(
        Duration::from_secs(3),
        "the first refusal of pod-a is logged at once",
        || {
            about_refusals().iter().any(|l| {
                l["cgroup"] == cgroup.as_str()
                    && l["refused"] == 1
                    && l["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(&cgroup) && m.contains("not TCP: 1"))
            })
        },
    );
    // Then the flood.
    let attempts = pod.probe(&["udp", "--connect", "--count", &(FLOOD - 1).to_string()]);
    let refused = attempts
        .iter()
        .filter(|a| !a.ok && a.stage.as_deref() == Some("connect") && a.errno == Some(libc::EPERM))
        .count();
    assert_eq!(
        refused,
        FLOOD - 1,
        "UDP connects to IMDS refused at connect"
    );
    // Counted exactly, node-wide and by reason.
    assert_eq!(
        w.agent.metric("nmi_kernel_refused_protocol_total"),
        Some(FLOOD as f64)
    );
    assert_eq!(
        w.agent.metric("nmi_kernel_refused_total"),
        Some(FLOOD as f64)
    );

    // The log: the first refusal at once, the rest in one summary per interval; together they account for every
    // refusal, under the pod's cgroup.
    let reported = || -> u64 {
        about_refusals()
            .iter()
            .filter(|l| l["cgroup"] == cgroup.as_str())
            .filter_map(|l| l["refused"].as_u64())
            .sum()
    };
    wait_until(
        Duration::from_secs(30),
        "the agent's refusal lines for pod-a add up to the flood",
        || reported() == FLOOD as u64,
    );
    let lines = about_refusals();
    let new = &lines[before..];
    println!(
        "{FLOOD} refused connects: {} log lines: {new:#?}",
        new.len()
    );
    assert!(
        new.len() <= 4,
        "{} log lines about {FLOOD} refusals: {new:#?}",
        new.len()
    );
    // The rest came as summaries (one per 10 s interval at most), naming the cgroup, the count and the reason.
    let summaries: Vec<&serde_json::Value> = new
        .iter()
        .filter(|l| {
            l["message"].as_str().is_some_and(|m| {
                m.contains("in the last 10 s") && m.contains(&cgroup) && m.contains("not TCP: ")
            })
        })
        .collect();
    let summarised: u64 = summaries.iter().filter_map(|l| l["refused"].as_u64()).sum();
    assert_eq!(summarised, FLOOD as u64 - 1, "summaries: {summaries:#?}");
}
