//! The token service end to end: the real agent binary in a topology, the IMDS emulator as the real IMDS, and
//! unchanged Azure SDK callers (Python `azure-identity`, Rust `azure_identity`) or `nmi-probe` in pods. One behaviour
//! per test; each builds and removes its own topology. Tokens are the emulator's unsigned JWTs, so "which identity did
//! the caller get" is read from the claims (`appid`/`oid` = client id, `xms_mirid` ends in the identity's name, `aud` =
//! resource).
//!
//! Run: `cargo xtask test`, or by hand (root, after `cargo xtask build`, with the venv xtask makes in target/pyenv):
//! `NMI_AGENT_BIN=target/release/nmi-agent cargo test --release -p nmi-agent-e2e --test token_service -- --test-threads=1`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nmi_agent_e2e::bindings::{self, FileIdentity};
use nmi_agent_e2e::cgroup::Cgroup;
use nmi_agent_e2e::clients::{ClientOutput, python_token, rust_token};
use nmi_agent_e2e::imds_emulator::{Capacity, EmulatedIdentity, EmulatorConfig, Fault};
use nmi_agent_e2e::node::{NodeApiServer, NodeEmulator};
use nmi_agent_e2e::probe::{self, Background};
use nmi_agent_e2e::trap::IMDS;
use nmi_agent_e2e::wait::poll;
use nmi_agent_e2e::{Agent, Attempt, Pod, Topology, require_root};
use serde_json::{Value, json};

const VAULT: &str = "https://vault.azure.net";
/// The emulator's port on the bridge address (node namespace).
const EMULATOR_PORT: u16 = 8079;

/// (name, client id) of the identities the standalone world binds: pod-a, pod-b and the hostNetwork pod.
const ORDERS: (&str, &str) = ("orders", "11111111-1111-1111-1111-111111111111");
const BILLING: (&str, &str) = ("billing", "22222222-2222-2222-2222-222222222222");
const HOSTNET: (&str, &str) = ("hostnet-mi", "33333333-3333-3333-3333-333333333333");

/// Field order is drop order: the agent dies (and prints its log tail on failure) first, then the emulator, then the
/// topology removes the world they lived in.
struct World {
    agent: Agent,
    emu: NodeEmulator,
    topo: Topology,
}

fn emulated(ids: &[(&str, &str)]) -> Vec<EmulatedIdentity> {
    ids.iter()
        .map(|(name, cid)| EmulatedIdentity::new(*cid, *name))
        .collect()
}

/// Standalone bindings: pod-a -> orders, pod-b -> billing, hostnet -> hostnet-mi.
fn write_bindings(dir: &Path) -> String {
    let ids: Vec<FileIdentity> = [ORDERS, BILLING, HOSTNET]
        .iter()
        .map(|(name, cid)| FileIdentity::new(name, cid))
        .collect();
    let path = bindings::write(
        dir,
        &ids,
        &[
            ("pod-a", ORDERS.0),
            ("pod-b", BILLING.0),
            ("hostnet", HOSTNET.0),
        ],
    );
    path.display().to_string()
}

/// The standard world: the emulator on the bridge address knows all three identities, and the agent, in standalone
/// mode with [`write_bindings`], uses it as IMDS.
fn world(test: &str) -> Option<World> {
    if !require_root(test) {
        return None;
    }
    let topo = Topology::new();
    let emu = NodeEmulator::start(
        &topo.node,
        SocketAddr::from((topo.bridge_ip, EMULATOR_PORT)),
        emulated(&[ORDERS, BILLING, HOSTNET]),
    );
    let bindings = write_bindings(&topo.log_dir);
    let agent = Agent::start(&topo, &["--bindings", &bindings, "--imds-url", &emu.url()]);
    Some(World { agent, emu, topo })
}

/// Asserts that a client got a token for `identity` (name, client id) and the Key Vault audience.
fn assert_token_for(out: &ClientOutput, who: &str, identity: (&str, &str)) {
    let (name, client_id) = identity;
    assert!(out.ok, "{who}: expected a token for {name}, got {out:?}");
    let c = out.claims();
    assert_eq!(c["appid"], client_id, "{who}: token is not {name}'s: {c}");
    assert_eq!(c["oid"], client_id, "{who}: token is not {name}'s: {c}");
    assert!(
        c["xms_mirid"]
            .as_str()
            .is_some_and(|m| m.ends_with(&format!("/{name}"))),
        "{who}: xms_mirid does not name {name}: {c}"
    );
    assert_eq!(c["aud"], VAULT, "{who}: audience: {c}");
}

/// The HTTP status code of a probe's answer; panics (with the attempt) if none came back.
fn status_code(a: &Attempt) -> u16 {
    a.status
        .as_deref()
        .and_then(|s| s.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {a:?}"))
}

/// The JSON body of a probe's answer, which must be IMDS's error shape: `{"error": .., "error_description": ..}`.
fn imds_error(a: &Attempt) -> Value {
    let body = a.body.as_deref().unwrap_or_default();
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("answer body is not JSON ({e}): {a:?}"));
    assert!(
        v["error"].as_str().is_some_and(|s| !s.is_empty()) && v["error_description"].is_string(),
        "not an IMDS-shaped error body: {v}"
    );
    v
}

fn elapsed(a: &Attempt) -> Duration {
    Duration::from_micros(a.elapsed_us)
}

#[test]
fn python_sdk_in_each_pod_gets_the_token_of_its_own_identity_and_unbound_gets_none() {
    let Some(mut w) = world("token_service::python_per_pod") else {
        return;
    };
    // With IMDS (the emulator) reachable and the bindings loaded, /readyz turns 200 within its first check.
    let ready = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        Some(w.agent.readyz()).filter(|r| r.0 == 200)
    })
    .unwrap_or_else(|| w.agent.readyz());
    assert_eq!(ready.0, 200, "/readyz with everything in place: {ready:?}");

    let unbound = w.topo.add_pod("pod-c");
    for (pod, identity) in [
        (&w.topo.pod_a, ORDERS),
        (&w.topo.pod_b, BILLING),
        (&w.topo.hostnet, HOSTNET),
    ] {
        let out = python_token(pod, None);
        assert_token_for(&out, &pod.label, identity);
    }
    let out = python_token(&unbound, None);
    assert_eq!(
        out.error.as_deref(),
        Some("CredentialUnavailableError"),
        "unbound pod: {out:?}"
    );

    // One upstream fetch per bound identity, none for the unbound caller (the agent answered it itself).
    let calls = w.emu.calls();
    let want: BTreeMap<String, u64> = [ORDERS, BILLING, HOSTNET]
        .iter()
        .map(|(_, cid)| (cid.to_string(), 1))
        .collect();
    assert_eq!(calls.by_client_id, want, "upstream token calls: {calls:?}");
    let denied = w.agent.token_audits().into_iter().find(|a| {
        a["outcome"] == "denied"
            && a["cgroup"].as_str().is_some_and(|c| c.ends_with("/pod-c"))
            && a["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("unbound"))
    });
    assert!(
        denied.is_some(),
        "no `denied: unbound` token audit for pod-c; {}",
        w.agent.describe()
    );
    assert_eq!(w.topo.trap.packets(), 0, "a client reached 169.254.169.254");

    // What an SRE's dashboard sees: three tokens fetched (cache misses), the unbound caller denied.
    let granted = w
        .agent
        .metric(r#"nmi_token_requests_total{outcome="granted",cache="miss"}"#)
        .unwrap_or(0.0);
    assert_eq!(granted, 3.0, "granted cache misses on /metrics");
    let denied = w
        .agent
        .metric(r#"nmi_token_requests_total{outcome="denied",cache="none"}"#)
        .unwrap_or(0.0);
    assert!(denied >= 1.0, "denied requests on /metrics: {denied}");
}

#[test]
fn a_pod_asking_for_another_pods_identity_is_refused_without_asking_imds() {
    let Some(w) = world("token_service::other_identity") else {
        return;
    };
    let out = python_token(&w.topo.pod_a, Some(BILLING.1));
    println!("pod-a asking for billing's client id: {out:?}");
    assert!(
        !out.ok,
        "pod-a got a token for billing's client id: {out:?}"
    );
    let refused = out.error.as_deref() == Some("CredentialUnavailableError")
        || out.message.as_deref().is_some_and(|m| m.contains("400"));
    assert!(
        refused,
        "expected CredentialUnavailableError or a 400: {out:?}"
    );
    let calls = w.emu.calls();
    assert_eq!(
        w.emu.calls_for(BILLING.1),
        0,
        "billing's identity was fetched for pod-a: {calls:?}"
    );
    assert_eq!(calls.token, 0, "something went upstream: {calls:?}");

    // Control: the selector itself works, for the pod that is bound to that identity.
    let out = python_token(&w.topo.pod_b, Some(BILLING.1));
    assert_token_for(&out, "pod-b asking for its own client id", BILLING);
}

#[test]
fn five_hundred_concurrent_cold_requests_make_one_upstream_call() {
    let Some(w) = world("token_service::single_flight") else {
        return;
    };
    let started = Instant::now();
    let attempts = w
        .topo
        .pod_a
        .probe(&["http", "--count", "500", "--concurrency", "100"]);
    let took = started.elapsed();
    assert_eq!(attempts.len(), 500, "attempts made");
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for a in &attempts {
        *by_status
            .entry(format!("{:?}/{:?}/{:?}", a.status, a.stage, a.error))
            .or_default() += 1;
    }
    let ok = attempts
        .iter()
        .filter(|a| {
            a.ok && a
                .status
                .as_deref()
                .is_some_and(|s| s.starts_with("HTTP/1.1 200"))
                && a.body
                    .as_deref()
                    .is_some_and(|b| b.contains("\"access_token\""))
        })
        .count();
    println!("500 cold requests in {took:?}: {by_status:?}");
    assert_eq!(ok, 500, "not all got a token: {by_status:?}");
    let calls = w.emu.calls();
    assert_eq!(
        (calls.token, calls.issued, w.emu.calls_for(ORDERS.1)),
        (1, 1, 1),
        "upstream calls for 500 concurrent misses: {calls:?}"
    );
}

#[test]
fn upstream_429_then_200_is_retried_and_the_caller_gets_the_token() {
    let Some(w) = world("token_service::retry_429") else {
        return;
    };
    w.emu.push_faults([Fault::status(429), Fault::status(200)]);
    let a = w.topo.pod_a.probe_one(&["http"]);
    assert_eq!(status_code(&a), 200, "{a:?}");
    assert!(
        a.body
            .as_deref()
            .is_some_and(|b| b.contains("\"access_token\"")),
        "{a:?}"
    );
    let calls = w.emu.calls();
    assert_eq!(
        (calls.token, calls.faults, calls.issued),
        (2, 2, 1),
        "{calls:?}"
    );
    assert!(
        elapsed(&a) < Duration::from_secs(10),
        "took {:?}",
        elapsed(&a)
    );
}

#[test]
fn upstream_410_is_passed_through_at_once() {
    let Some(w) = world("token_service::pass_410") else {
        return;
    };
    w.emu.push_faults([Fault::status(410)]);
    let a = w.topo.pod_a.probe_one(&["http"]);
    assert_eq!(status_code(&a), 410, "{a:?}");
    let body = imds_error(&a);
    assert_eq!(
        body["error"], "gone",
        "IMDS's own body should pass through: {body}"
    );
    let calls = w.emu.calls();
    assert_eq!(
        calls.token, 1,
        "a 410 must not be retried by the agent: {calls:?}"
    );
    assert!(
        elapsed(&a) < Duration::from_secs(2),
        "passing a 410 through took {:?}",
        elapsed(&a)
    );
}

#[test]
fn upstream_500_three_times_is_passed_through_within_the_bound() {
    let Some(w) = world("token_service::pass_500") else {
        return;
    };
    w.emu
        .push_faults([Fault::status(500), Fault::status(500), Fault::status(500)]);
    let a = w.topo.pod_a.probe_one(&["http"]);
    assert_eq!(status_code(&a), 500, "{a:?}");
    let body = imds_error(&a);
    assert_eq!(
        body["error"], "unknown",
        "IMDS's own body should pass through: {body}"
    );
    let calls = w.emu.calls();
    assert_eq!(calls.token, 3, "attempts upstream: {calls:?}");
    assert!(w.emu.pending_faults().is_empty());
    assert!(
        elapsed(&a) < Duration::from_secs(10),
        "three 500s took {:?}",
        elapsed(&a)
    );
}

#[test]
fn a_slow_upstream_yields_an_imds_shaped_5xx_within_the_total_bound() {
    let Some(w) = world("token_service::slow") else {
        return;
    };
    // Longer than the agent's 5 s per-attempt timeout; one per attempt the agent may make.
    w.emu
        .push_faults([Fault::delay(8000), Fault::delay(8000), Fault::delay(8000)]);
    let a = w.topo.pod_a.probe_one(&["http", "--timeout-ms", "30000"]);
    let took = elapsed(&a);
    println!("slow upstream: {:?} after {took:?}: {:?}", a.status, a.body);
    let status = status_code(&a);
    assert!((500..600).contains(&status), "expected a 5xx: {a:?}");
    imds_error(&a);
    assert!(
        took >= Duration::from_secs(5),
        "answered before one attempt could time out ({took:?}): the delay did not apply? {a:?}"
    );
    assert!(
        took < Duration::from_millis(12_500),
        "the caller waited {took:?}, past the agent's 10 s total bound (plus 2.5 s for a loaded machine)"
    );
}

#[test]
fn rust_sdk_in_a_pod_gets_the_token_of_its_own_identity() {
    let Some(mut w) = world("token_service::rust_sdk") else {
        return;
    };
    let out = rust_token(&w.topo.pod_a, None);
    assert_token_for(&out, "pod-a (Rust azure_identity)", ORDERS);
    let unbound = w.topo.add_pod("pod-c");
    let out = rust_token(&unbound, None);
    println!("unbound pod, Rust SDK: {out:?}");
    // The Rust SDK's wording for IMDS's 400 `Identity not found`.
    assert!(
        !out.ok
            && out
                .message
                .as_deref()
                .is_some_and(|m| m.contains("has not been assigned")),
        "unbound pod with the Rust SDK: {out:?}"
    );
    assert_eq!(w.emu.calls().token, 1, "{:?}", w.emu.calls());
}

/// A pod uid and container id in the shapes kubelet and containerd use.
const POD_UID: &str = "0f3a4b5c-6d7e-4f80-91a2-b3c4d5e6f708";
const NODE_NAME: &str = "node-e2e";
const KUBE_MI: (&str, &str) = ("kube-mi", "44444444-4444-4444-4444-444444444444");

struct KubeWorld {
    agent: Agent,
    api: NodeApiServer,
    emu: NodeEmulator,
    topo: Topology,
}

#[test]
fn kubernetes_mode_serves_the_bound_identity_until_the_binding_is_deleted() {
    if !require_root("token_service::kubernetes") {
        return;
    }
    let mut topo = Topology::new();
    let emu = NodeEmulator::start(
        &topo.node,
        SocketAddr::from((topo.bridge_ip, EMULATOR_PORT)),
        emulated(&[KUBE_MI]),
    );
    let api = NodeApiServer::start(&topo.node);

    // The pod: its own network namespace, and a container cgroup where kubelet + containerd would put it.
    let mut pod: Pod = topo.add_pod("kpod");
    let qos = Cgroup::create(topo.intercepted.path.join("kubepods-besteffort.slice"));
    let pod_cg = Cgroup::create(qos.path.join(format!(
        "kubepods-besteffort-pod{}.slice",
        POD_UID.replace('-', "_")
    )));
    pod.cgroup = Cgroup::create(pod_cg.path.join(format!(
        "cri-containerd-{}.scope",
        "0123456789abcdef".repeat(4)
    )));

    api.server.create(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "kpod", "namespace": "default", "uid": POD_UID,
                     "labels": {"aadpodidbinding": "sel"}},
        "spec": {"nodeName": NODE_NAME, "containers": [{"name": "app", "image": "app"}]},
        "status": {"podIP": pod.ip.to_string(), "podIPs": [{"ip": pod.ip.to_string()}]},
    }));
    api.server.create(json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
        "metadata": {"name": KUBE_MI.0, "namespace": "default"},
        "spec": {"type": 0, "clientID": KUBE_MI.1},
    }));
    let binding = api.server.create(json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
        "metadata": {"name": "kube-mi-binding", "namespace": "default"},
        "spec": {"azureIdentity": KUBE_MI.0, "selector": "sel"},
    }));

    let kubeconfig = topo.log_dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("write kubeconfig");
    let agent = Agent::start_with_env(
        &topo,
        &["--node-name", NODE_NAME, "--imds-url", &emu.url()],
        &[("KUBECONFIG", &kubeconfig.display().to_string())],
    );
    let w = KubeWorld {
        agent,
        api,
        emu,
        topo,
    };

    let out = python_token(&pod, None);
    assert_token_for(&out, "kpod", KUBE_MI);
    let granted = w
        .agent
        .token_audits()
        .into_iter()
        .find(|a| a["outcome"] == "granted");
    let granted =
        granted.unwrap_or_else(|| panic!("no granted token audit; {}", w.agent.describe()));
    assert_eq!(
        (&granted["pod"], &granted["namespace"], &granted["pod_uid"]),
        (&json!("kpod"), &json!("default"), &json!(POD_UID)),
        "audit names the pod: {granted}"
    );

    // The same pod speaking from an address that is not its own (a secondary address on its eth0, as a container with
    // NET_ADMIN can add): the kernel attests its cgroup, and the source-address check refuses it all the same.
    let octets = w.topo.bridge_ip.octets();
    let other = std::net::Ipv4Addr::new(octets[0], octets[1], octets[2], 200);
    pod.netns
        .ip(&["addr", "add", &format!("{other}/24"), "dev", "eth0"]);
    let spoofed = pod.probe_one(&[
        "from",
        "--source",
        &format!("{other}:0"),
        "--request",
        "--timeout-ms",
        "5000",
    ]);
    assert!(
        spoofed
            .status
            .as_deref()
            .is_some_and(|s| s.contains(" 403 ")),
        "a request from an address that is not the pod's own must be refused: {spoofed:?}"
    );
    let refused = w
        .agent
        .token_audits()
        .into_iter()
        .find(|a| a["outcome"] == "denied")
        .unwrap_or_else(|| panic!("no denied token audit; {}", w.agent.describe()));
    assert!(
        refused["reason"].as_str().is_some_and(
            |r| r.starts_with("source_address_mismatch") && r.contains(&other.to_string())
        ),
        "the audit says why: {refused}"
    );
    assert_eq!(refused["pod"], json!("kpod"), "{refused}");
    assert_eq!(
        w.emu.calls_for(KUBE_MI.1),
        1,
        "the refused request fetched nothing"
    );

    // Delete the binding: the next fresh client process must find no identity. The watch delivers the deletion
    // asynchronously, so allow it a moment, and count how many fresh clients still got a token meanwhile.
    w.api.server.delete(&binding);
    let deleted = Instant::now();
    let mut still_served = 0;
    let out = loop {
        let out = python_token(&pod, None);
        if !out.ok || deleted.elapsed() > Duration::from_secs(5) {
            break out;
        }
        still_served += 1;
        thread::sleep(Duration::from_millis(100));
    };
    println!(
        "binding deleted: {still_served} fresh client(s) still got a token; unavailable after {:?}",
        deleted.elapsed()
    );
    assert_eq!(
        out.error.as_deref(),
        Some("CredentialUnavailableError"),
        "after deleting the binding: {out:?}"
    );
    assert_eq!(
        w.emu.calls_for(KUBE_MI.1),
        1,
        "upstream calls: {:?}",
        w.emu.calls()
    );
    assert_eq!(w.topo.trap.packets(), 0, "a client reached 169.254.169.254");
}

#[test]
fn the_agents_own_upstream_call_to_169_254_169_254_is_not_redirected() {
    if !require_root("token_service::exempt_upstream") {
        return;
    }
    let topo = Topology::new();
    // The emulator *is* 169.254.169.254:80 here (on the node namespace's lo), and the agent uses its default
    // --imds-url: if its own call were redirected, it would come back to the agent instead of reaching it.
    let emu = NodeEmulator::start(
        &topo.node,
        SocketAddr::V4(IMDS),
        emulated(&[ORDERS, BILLING, HOSTNET]),
    );
    let bindings = write_bindings(&topo.log_dir);
    let agent = Agent::start(&topo, &["--bindings", &bindings]);
    let w = World { agent, emu, topo };

    let out = python_token(&w.topo.pod_a, None);
    assert_token_for(&out, "pod-a", ORDERS);
    let calls = w.emu.calls();
    assert_eq!(
        (calls.token, w.emu.calls_for(ORDERS.1)),
        (1, 1),
        "the emulator at 169.254.169.254 should see exactly the agent's one fetch: {calls:?}"
    );
    // The pod's own calls (the SDK's header-less probe, its token request) went to the agent, not here.
    assert_eq!(
        (calls.no_metadata_header, calls.other),
        (0, 0),
        "a pod call reached 169.254.169.254 directly: {calls:?}"
    );
    let own: Vec<_> = w
        .agent
        .audits()
        .into_iter()
        .filter(|a| a.cgroup.as_deref() == Some("/agent"))
        .collect();
    assert!(
        own.is_empty(),
        "the agent's own upstream call was redirected back to it: {own:?}"
    );
}

/// A hostile pod opens hundreds of connections and pipelines requests on each whose answers it never reads (which
/// once held every connection slot of the agent for ever). Beyond its share it is answered 429 and closed, the
/// connections it keeps are cut once their answers stall, and another pod's unchanged SDK gets its token within 1 s
/// all the while.
#[test]
fn a_pod_that_never_reads_its_answers_cannot_take_the_service_from_another() {
    let Some(w) = world("token_service::wedge") else {
        return;
    };
    let attack = Background::spawn(
        &mut w
            .topo
            .pod_b
            .probe_command(&[&probe::WEDGE[..], &["--hold-ms", "20000"]].concat()),
    );
    let limited = r#"nmi_caller_limited_total{reason="connections"}"#;
    poll(Duration::from_secs(20), Duration::from_millis(100), || {
        w.agent.metric(limited).filter(|n| *n > 0.0)
    })
    .unwrap_or_else(|| {
        panic!(
            "the attacker never went over its share; {}",
            w.agent.describe()
        )
    });

    for round in 0..3 {
        let out = python_token(&w.topo.pod_a, None);
        assert_token_for(&out, "pod-a", ORDERS);
        let took = out.elapsed_ms.unwrap_or(f64::MAX);
        assert!(
            took < 1000.0,
            "round {round}: pod-a's SDK waited {took} ms for its token"
        );
    }
    let cut = r#"nmi_connections_cut_total{reason="io_timeout"}"#;
    poll(Duration::from_secs(30), Duration::from_millis(200), || {
        w.agent.metric(cut).filter(|n| *n > 0.0)
    })
    .unwrap_or_else(|| panic!("no stalled connection was cut; {}", w.agent.describe()));
    let opened = attack.finish();
    assert!(
        opened.iter().filter(|a| a.ok).count() >= 200,
        "the attack did not open its connections: {} of {}",
        opened.iter().filter(|a| a.ok).count(),
        opened.len()
    );
    assert_eq!(w.topo.trap.packets(), 0, "a client reached 169.254.169.254");
}

/// A pod flooding `/metadata/instance` (forwarded to IMDS as the node) against an IMDS that throttles as the real one
/// does (a few calls at once per VM, 429 beyond): the agent spends no more of IMDS than its budget, the flooding pod
/// waits for its own requests, and another pod's unchanged SDK gets its token within 1 s.
#[test]
fn a_pod_flooding_instance_metadata_cannot_spend_imds_for_another() {
    if !require_root("token_service::instance_flood") {
        return;
    }
    let topo = Topology::new();
    let emu = NodeEmulator::start_with(
        &topo.node,
        EmulatorConfig {
            listen: SocketAddr::from((topo.bridge_ip, EMULATOR_PORT)),
            capacity: Some(Capacity {
                in_flight: 5,
                service_time: Duration::from_millis(200),
            }),
            ..EmulatorConfig::new(emulated(&[ORDERS, BILLING, HOSTNET]))
        },
    );
    let bindings = write_bindings(&topo.log_dir);
    let agent = Agent::start(&topo, &["--bindings", &bindings, "--imds-url", &emu.url()]);
    let w = World { agent, emu, topo };

    let mut flood =
        w.topo
            .pod_b
            .probe_command(&["soak", "--instance", "--threads", "16", "--requests", "100"]);
    let flooding = flood
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the flood");
    poll(Duration::from_secs(10), Duration::from_millis(50), || {
        Some(()).filter(|()| w.emu.calls().instance >= 5)
    })
    .unwrap_or_else(|| panic!("the flood never reached IMDS; {}", w.agent.describe()));

    let out = python_token(&w.topo.pod_a, None);
    assert_token_for(&out, "pod-a", ORDERS);
    let took = out.elapsed_ms.unwrap_or(f64::MAX);
    assert!(
        took < 1000.0,
        "pod-a's SDK waited {took} ms behind the flood"
    );

    let done = flooding.wait_with_output().expect("wait for the flood");
    let summary: Value = serde_json::from_slice(&done.stdout)
        .unwrap_or_else(|e| panic!("flood summary ({e}): {done:?}"));
    println!("instance flood: {summary}; emulator {:?}", w.emu.calls());
    assert_eq!(
        summary["failed"].as_u64(),
        Some(0),
        "the flooding pod is slowed down, not refused: {summary}"
    );
    assert_eq!(
        w.emu.calls().throttled,
        0,
        "the agent sent IMDS more than it takes at once: {:?}",
        w.emu.calls()
    );
}
