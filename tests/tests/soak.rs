//! The soak: isolation under load and attack, on the real kernel path. Twenty pods in their own cgroups and network
//! namespaces (ten bound to nine identities, two of them sharing one; ten unbound) run a load generator that checks
//! every answer (`nmi-probe soak`), unchanged Python SDK clients ask in between, and two hostile pods attack the whole
//! time: one holds connections whose answers it never reads, one floods IMDS with a new resource per request.
//!
//! Asserted: no token for a wrong identity (read from the token's claims), no failed request for a well-behaved pod,
//! one audit line per decision, the agent's memory bounded, and IMDS asked at most once per (identity, resource).
//!
//! Size: `NMI_SOAK_REQUESTS` requests over the twenty pods (default 20,000, what `cargo xtask test` runs;
//! `cargo xtask soak` runs 100,000 and more).
//!
//! Run: `cargo xtask test` or `cargo xtask soak`; by hand as in tests/tests/token_service.rs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Instant;

use nmi_agent_e2e::bindings::{self, FileIdentity};
use nmi_agent_e2e::clients::python_token;
use nmi_agent_e2e::imds_emulator::EmulatedIdentity;
use nmi_agent_e2e::node::NodeEmulator;
use nmi_agent_e2e::probe::{self, Background};
use nmi_agent_e2e::{Agent, Pod, Topology, require_root};
use serde_json::Value;

const EMULATOR_PORT: u16 = 8079;
const PODS: usize = 20;
/// Bound pods: s0 and s1 share identity 0, s<i> (i >= 2) has identity i-1.
const BOUND: usize = 10;
/// The hostile pods' identity (both are bound to it, so their answers are tokens, large enough to stall).
const HOSTILE_ID: usize = 9;

fn client_id(i: usize) -> String {
    format!("{:08x}-0000-4000-8000-{i:012x}", 0x50a4_0000 + i)
}

fn identity_of(pod: usize) -> Option<usize> {
    (pod < BOUND).then(|| pod.saturating_sub(1))
}

fn requests() -> usize {
    std::env::var("NMI_SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Starts `nmi-probe soak` in `pod`.
fn soak_in(pod: &Pod, requests: usize, expect: Option<&str>, extra: &[&str]) -> Child {
    let mut cmd = pod.probe_command(&["soak", "--requests", &requests.to_string()]);
    if let Some(id) = expect {
        cmd.args(["--expect-client-id", id]);
    }
    cmd.args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn soak in {}: {e}", pod.label))
}

fn summary_of(pod: &str, child: Child) -> Value {
    let out = child.wait_with_output().expect("wait for soak");
    assert!(
        out.status.success(),
        "soak in {pod} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("soak in {pod} printed no summary ({e}): {out:?}"))
}

#[test]
fn twenty_pods_under_load_and_attack_each_get_exactly_their_own_identity() {
    if !require_root("soak") {
        return;
    }
    let total = requests();
    let per_pod = (total / PODS).max(1);
    let mut topo = Topology::new();
    let ids: Vec<String> = (0..=HOSTILE_ID).map(client_id).collect();
    let emu = NodeEmulator::start(
        &topo.node,
        SocketAddr::from((topo.bridge_ip, EMULATOR_PORT)),
        ids.iter()
            .enumerate()
            .map(|(i, cid)| EmulatedIdentity::new(cid.clone(), format!("soak-id-{i}")))
            .collect(),
    );
    let pods: Vec<Pod> = (0..PODS).map(|i| topo.add_pod(&format!("s{i}"))).collect();
    let (wedge, flood) = (topo.add_pod("hwedge"), topo.add_pod("hflood"));
    let file_ids: Vec<FileIdentity> = ids
        .iter()
        .enumerate()
        .map(|(i, cid)| FileIdentity::new(&format!("soak-id-{i}"), cid))
        .collect();
    let names: Vec<String> = (0..=HOSTILE_ID).map(|i| format!("soak-id-{i}")).collect();
    let mut bound: Vec<(&str, &str)> = (0..BOUND)
        .filter_map(|p| identity_of(p).map(|i| (pods[p].label.as_str(), names[i].as_str())))
        .collect();
    bound.push((wedge.label.as_str(), names[HOSTILE_ID].as_str()));
    bound.push((flood.label.as_str(), names[HOSTILE_ID].as_str()));
    let file = bindings::write(&topo.log_dir, &file_ids, &bound);
    let agent = Agent::start(
        &topo,
        &[
            "--bindings",
            &file.display().to_string(),
            "--imds-url",
            &emu.url(),
        ],
    );
    let pid = agent.pid().expect("agent pid");
    let rss_start = rss_kib(pid);

    // The attackers, for the whole run.
    let wedging = Background::spawn(
        &mut wedge.probe_command(&[&probe::WEDGE[..], &["--hold-ms", "600000"]].concat()),
    );
    let flood_requests = (total / 10).max(100);
    let flooding = soak_in(
        &flood,
        flood_requests,
        Some(&ids[HOSTILE_ID]),
        &["--distinct-resources", "--threads", "4"],
    );

    let started = Instant::now();
    let workers: Vec<(String, Child)> = pods
        .iter()
        .enumerate()
        .map(|(p, pod)| {
            let expect = identity_of(p).map(|i| ids[i].as_str());
            (pod.label.clone(), soak_in(pod, per_pod, expect, &[]))
        })
        .collect();
    // Unchanged SDKs in the middle of it: a bound pod, the pod sharing its identity, an unbound pod.
    for p in [0, 1, 2] {
        let out = python_token(&pods[p], None);
        let want = &ids[identity_of(p).expect("bound")];
        assert!(
            out.ok,
            "{}: the SDK got no token under load: {out:?}",
            pods[p].label
        );
        assert_eq!(
            out.claims()["appid"],
            want.as_str(),
            "{}: {out:?}",
            pods[p].label
        );
    }
    let unbound = python_token(&pods[BOUND], None);
    assert_eq!(
        unbound.error.as_deref(),
        Some("CredentialUnavailableError"),
        "an unbound pod's SDK: {unbound:?}"
    );

    let mut summaries = BTreeMap::new();
    for (label, child) in workers {
        summaries.insert(label.clone(), summary_of(&label, child));
    }
    let elapsed = started.elapsed();
    let flood_summary = summary_of(&flood.label, flooding);
    drop(wedging);
    let rss_end = rss_kib(pid);

    let (mut made, mut wrong, mut failed, mut worst_ms) = (0u64, 0u64, 0u64, 0f64);
    for (label, s) in &summaries {
        made += s["requests"].as_u64().unwrap_or(0);
        wrong += s["wrong_identity"].as_u64().unwrap_or(0);
        failed += s["failed"].as_u64().unwrap_or(0);
        worst_ms = worst_ms.max(s["max_latency_ms"].as_f64().unwrap_or(0.0));
        assert_eq!(s["requests"].as_u64(), Some(per_pod as u64), "{label}: {s}");
    }
    println!(
        "soak: {made} requests from {PODS} pods in {:.1} s ({:.0}/s), slowest {worst_ms:.0} ms; flood {} requests; \
         agent VmRSS {rss_start} KiB -> {rss_end} KiB",
        elapsed.as_secs_f64(),
        made as f64 / elapsed.as_secs_f64(),
        flood_summary["requests"]
    );
    assert_eq!(wrong, 0, "tokens for a wrong identity: {summaries:?}");
    assert_eq!(
        flood_summary["wrong_identity"].as_u64(),
        Some(0),
        "the flooding pod got another's token: {flood_summary}"
    );
    assert_eq!(
        failed, 0,
        "well-behaved pods' requests failed: {summaries:?}"
    );

    // One audit line per decision: every request of every soak pod, plus the SDK calls above.
    let audits = agent.token_audits();
    for (p, pod) in pods.iter().enumerate() {
        let cgroup = format!("/{}", pod.label);
        let decided = audits
            .iter()
            .filter(|a| a["cgroup"] == cgroup.as_str() && a["outcome"] != "probe")
            .count();
        let sdk_calls = usize::from(p <= 2 || p == BOUND);
        assert!(
            decided >= per_pod + sdk_calls && decided <= per_pod + 3 * sdk_calls,
            "{}: {decided} audited decisions for {per_pod} requests (+{sdk_calls} SDK calls)",
            pod.label
        );
    }

    // IMDS asked at most once per (identity, resource): the pods' one resource each; the flood's, each once.
    for (i, id) in ids.iter().enumerate().take(HOSTILE_ID) {
        assert!(emu.calls_for(id) <= 1, "identity {i}: {:?}", emu.calls());
    }
    assert_eq!(
        emu.calls_for(&ids[HOSTILE_ID]),
        flood_summary["expected"].as_u64().unwrap_or(0) + 1,
        "the flood's distinct resources (+ the wedging pod's one) each fetched once"
    );
    assert!(
        rss_end < rss_start + 64 * 1024,
        "agent memory grew from {rss_start} KiB to {rss_end} KiB"
    );
    assert_eq!(topo.trap.packets(), 0, "a pod reached 169.254.169.254");
}
