//! Self-test of the harness, no agent involved: if these fail, a datapath test's verdict would mean nothing.
//!
//! Run: `cargo test --release -p nmi-agent-e2e --test harness -- --test-threads=1` (as root).

use std::net::{SocketAddr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use nmi_agent_e2e::cgroup::{self, Cgroup};
use nmi_agent_e2e::netns::{self, Netns};
use nmi_agent_e2e::trap::{IMDS, TRAP_STATUS, TrapListener};
use nmi_agent_e2e::{Topology, cleanup, process, require_root, wait};

fn ino(path: &std::path::Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

#[test]
fn topology_places_processes_routes_pods_counts_trap_packets_and_cleans_up() {
    if !require_root("harness::topology") {
        return;
    }
    let topo = Topology::new();
    let outside = topo.outside_in(&topo.pod_a);

    // Processes land in the intended cgroup and namespace before they run.
    for pod in [
        &topo.pod_a,
        &topo.pod_b,
        &topo.hostnet,
        &outside,
        &topo.in_agent_cgroup(),
    ] {
        let me = pod.whoami();
        assert_eq!(me.cgroup, pod.cgroup.proc_path(), "{}: cgroup", pod.label);
        assert_eq!(
            me.netns_inode,
            ino(&pod.netns.path()),
            "{}: network namespace",
            pod.label
        );
    }
    assert_ne!(ino(&topo.pod_a.netns.path()), ino(&topo.pod_b.netns.path()));

    // Every pod reaches the bridge address over TCP, with its own source address.
    let bridge = SocketAddrV4::new(topo.bridge_ip, 8080);
    let listener = TrapListener::bind(&topo.node, bridge);
    for pod in [&topo.pod_a, &topo.pod_b, &topo.hostnet] {
        let a = pod.probe_one(&["connect", "--addr", &bridge.to_string()]);
        assert!(a.ok, "{} -> {bridge}: {a:?}", pod.label);
        let local = a.local.expect("local address");
        assert_eq!(local.ip(), pod.ip, "{}: source address", pod.label);
        wait_until(
            || listener.accepted().contains(&local),
            &format!("{bridge} accepted {local}"),
        );
    }

    // With nothing attached, a pod's datagram to 169.254.169.254 reaches the trap and is counted.
    assert_eq!(topo.trap.packets(), 0, "trap counter starts at zero");
    let a = topo.pod_a.probe_one(&["udp"]);
    assert!(a.ok, "udp send: {a:?}");
    assert!(
        topo.trap.wait_above(0, Duration::from_secs(2)) >= 1,
        "trap did not count a pod's UDP packet"
    );

    // ... and the trap listener answers TCP, where getpeername shows 169.254.169.254:80.
    let trap = topo.trap.listen_tcp(80);
    let a = topo.pod_b.probe_one(&["http"]);
    assert_eq!(a.status.as_deref(), Some(TRAP_STATUS), "{a:?}");
    assert_eq!(a.peer, Some(SocketAddr::V4(IMDS)));
    assert!(trap.accepted().contains(&a.local.expect("local")));

    // Everything goes on drop, even with sockets and processes still around.
    let mut sleeper = topo
        .pod_a
        .command("sleep")
        .arg("600")
        .spawn()
        .expect("spawn sleep");
    let names: Vec<String> = topo.netns_names().to_vec();
    let (cg, pins, logs) = (
        topo.cgroup.path.clone(),
        topo.pin_dir.clone(),
        topo.log_dir.clone(),
    );
    assert_eq!(names.len(), 3, "node + two pods: {names:?}");
    assert!(names.iter().all(|n| netns::list().contains(n)));
    drop(topo);
    let left: Vec<_> = names.iter().filter(|n| netns::list().contains(n)).collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(!cg.exists(), "cgroup {} left", cg.display());
    assert!(!pins.exists() && !logs.exists());
    let status = sleeper.wait().expect("wait sleep");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "cleanup did not kill the pod's process"
    );
}

#[test]
fn leftovers_of_a_dead_run_are_removed_and_live_runs_kept() {
    if !require_root("harness::stale") {
        return;
    }
    cleanup::prepare_once();
    // A pid that certainly belonged to a process that is gone now.
    let mut gone = Command::new("true").spawn().expect("spawn true");
    gone.wait().expect("wait true");
    let stale = format!("nmie2e-{}-0", gone.id());
    // Stands for a concurrent run: named after this (live) process, so a crash here leaves nothing that a later
    // run would mistake for someone else's live resources.
    let live = format!("nmie2e-{}-live", std::process::id());

    for name in [&stale, &live] {
        Netns::create(&format!("{name}-node"));
        let cg = Cgroup::create(cgroup::root().join(name));
        Cgroup::create(cg.path.join("intercepted"));
        std::fs::create_dir(std::path::Path::new(cleanup::BPFFS).join(name))
            .expect("mkdir pin dir");
    }
    // An orphan still running in the stale tree, like an agent whose test process crashed: `sh` exits at once and
    // the sleep is reparented, so only the cgroup can find it.
    let stale_leaf = Cgroup {
        path: cgroup::root().join(&stale).join("intercepted"),
    };
    let mut sh = Command::new("sh");
    sh.args(["-c", "sleep 600 >/dev/null 2>&1 &"]);
    process::place(&mut sh, Some(&stale_leaf), None);
    process::run_ok(&mut sh);
    assert_eq!(
        stale_leaf.procs().len(),
        1,
        "orphan sleep in the stale cgroup"
    );

    cleanup::remove_stale();

    assert!(
        !netns::list().contains(&format!("{stale}-node")),
        "stale netns kept"
    );
    assert!(!cgroup::root().join(&stale).exists(), "stale cgroup kept");
    assert!(
        !std::path::Path::new(cleanup::BPFFS).join(&stale).exists(),
        "stale pin dir kept"
    );
    let live_kept = netns::list().contains(&format!("{live}-node"))
        && cgroup::root().join(&live).exists()
        && std::path::Path::new(cleanup::BPFFS).join(&live).exists();
    // Remove the stand-in before asserting, so a failure leaves nothing behind.
    netns::delete(&format!("{live}-node"));
    cgroup::remove_tree(&cgroup::root().join(&live));
    let _ = std::fs::remove_dir(std::path::Path::new(cleanup::BPFFS).join(&live));
    assert!(live_kept, "a live run's resources were removed");
}

fn wait_until(cond: impl FnMut() -> bool, what: &str) {
    wait::wait_until(Duration::from_secs(5), what, cond);
}
