//! The command line as an operator meets it: bad input exits non-zero, before anything touches the kernel, with a
//! message that names the problem (and, for the bindings file, the line). Needs no root.

use std::process::{Command, Output};

fn nmi_agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nmi-agent"))
        .args(args)
        // Keep the caller's environment from filling in flags (NODE_IP, NMI_AGENT_*).
        .env_clear()
        .output()
        .expect("run nmi-agent")
}

/// A bindings file with `text` in a fresh temporary directory (kept alive by the returned guard).
fn bindings_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bindings.yaml");
    std::fs::write(&path, text).expect("write bindings file");
    (dir, path.display().to_string())
}

const NO_BINDINGS: &str = "identities:\nbindings:\n";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_bindings_file_is_refused_with_its_line() {
    let (_dir, path) = bindings_file(
        "identities:\n  - name: orders\n    clientID: \"11111111-1111-1111-1111-111111111111\"\nbindings:\n  - cgroup: orders\n    identity: billing\n",
    );
    let out = nmi_agent(&["run", "--bindings", &path, "--cgroup", "/nonexistent"]);
    assert!(!out.status.success(), "a bad bindings file was accepted");
    let err = stderr(&out);
    assert!(
        err.contains("bindings.yaml"),
        "the message does not name the file: {err}"
    );
    // Line 5 is where the offending binding starts.
    assert!(
        err.contains("line 5"),
        "the message does not name the line: {err}"
    );
    assert!(
        err.contains("billing"),
        "the message does not name the unknown identity: {err}"
    );
}

#[test]
fn standalone_mode_needs_a_cgroup() {
    let (_dir, path) = bindings_file(NO_BINDINGS);
    let out = nmi_agent(&["run", "--bindings", &path]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--cgroup is required"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_loopback_listen_address_is_refused() {
    let (_dir, path) = bindings_file(NO_BINDINGS);
    let mount = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.contains(" - cgroup2 "))
                .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        });
    let Some(mount) = mount else {
        eprintln!("SKIP a_loopback_listen_address_is_refused: no cgroup v2 mount on this machine");
        assert!(
            std::env::var_os("CI").is_none(),
            "CI machines must have cgroup v2"
        );
        return;
    };
    let out = nmi_agent(&[
        "run",
        "--bindings",
        &path,
        "--cgroup",
        &mount,
        "--listen",
        "127.0.0.1:2579",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("loopback"),
        "the message does not say why: {err}"
    );
}

#[test]
fn kubernetes_mode_needs_a_node_name() {
    let out = nmi_agent(&["run", "--cgroup", "/", "--listen", "10.0.0.1:2579"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--node-name"),
        "the message does not say what to pass: {err}"
    );
}

#[test]
fn a_cgroup_outside_the_cgroup_v2_mount_is_refused() {
    let (_dir, path) = bindings_file(NO_BINDINGS);
    let out = nmi_agent(&["run", "--bindings", &path, "--cgroup", "/"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--cgroup /"),
        "the message does not name the flag and value: {err}"
    );
}

#[test]
fn uninstall_of_nothing_says_so_and_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pins = dir.path().join("none-here");
    let out = nmi_agent(&["uninstall", "--pin-dir", &pins.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing pinned"));
}

#[test]
fn per_caller_limits_outside_their_range_are_refused_with_the_range() {
    for (flag, value, range) in [
        ("--max-connections-per-caller", "0", "1.."),
        ("--max-upstream-per-caller", "6", "1..=5"),
        ("--max-upstream-per-caller", "0", "1..=5"),
    ] {
        let out = nmi_agent(&["run", "--bindings", "/nonexistent", flag, value]);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        let err = stderr(&out);
        assert!(
            err.contains(flag) && err.contains(range),
            "{flag} {value}: the message does not say the allowed range: {err}"
        );
    }
}
