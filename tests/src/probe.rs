//! The `nmi-probe` binary's report format, and finding and running the binary.
//!
//! The probe is a separate executable (not a thread of the test) because what is under test is the kernel's view
//! of a *process*: its cgroup and network namespace decide what connect4, sockops and the egress guard do.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde::{Deserialize, Serialize};

/// One network attempt, as the probe prints it (one JSON object per line).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// `http`, `connect`, `udp`, `raw`.
    pub mode: String,
    /// The probe's pid (tgid): what the agent's audit must report for this connection.
    pub pid: u32,
    /// Where the attempt was aimed.
    pub addr: String,
    /// Every step succeeded (for http: connected, sent, and read to EOF without an error).
    pub ok: bool,
    /// getsockname after connect: the 4-tuple half the agent sees as the peer.
    pub local: Option<SocketAddr>,
    /// getpeername after connect: what the caller believes it is talking to.
    pub peer: Option<SocketAddr>,
    /// First line of the HTTP answer, if any bytes came back.
    pub status: Option<String>,
    /// Up to 512 bytes of the answer after the headers, lossily decoded (diagnostics only).
    pub body: Option<String>,
    /// The failing step: `socket`, `connect`, `write`, `read`, `send`.
    pub stage: Option<String>,
    /// `std::io::ErrorKind` of the failure, Debug-formatted (`ConnectionRefused`, `PermissionDenied`, ...).
    pub error: Option<String>,
    pub errno: Option<i32>,
    /// From just before connect/send to the end of the attempt.
    pub elapsed_us: u64,
}

impl Attempt {
    /// True when an HTTP status line came back.
    pub fn answered(&self) -> bool {
        self.status
            .as_deref()
            .is_some_and(|s| s.starts_with("HTTP/"))
    }
}

/// `nmi-probe whoami`: where the kernel thinks the probe lives.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Whoami {
    pub pid: u32,
    /// The cgroup v2 path from /proc/self/cgroup (`0::<path>`).
    pub cgroup: String,
    /// Inode of /proc/self/ns/net: equal inodes mean the same network namespace.
    pub netns_inode: u64,
}

/// The probe binary: `$NMI_E2E_BIN_DIR/nmi-probe` (xtask points that at target/release), else next to the test
/// binary (cargo puts test binaries in `<profile>/deps/` and the package's binaries in `<profile>/`).
pub fn bin() -> PathBuf {
    package_bin("nmi-probe")
}

/// One of this package's binaries (`nmi-probe`, `nmi-rust-client`, ...), found as [`bin`] finds the probe.
pub fn package_bin(name: &str) -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("NMI_E2E_BIN_DIR") {
        candidates.push(PathBuf::from(dir).join(name));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join(name));
        }
    }
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!("{name} not found (looked at {candidates:?}); build it with `cargo build --release -p nmi-agent-e2e` or run `cargo xtask test`")
    })
}

/// Parses the probe's stdout: one JSON object per non-empty line.
pub fn parse<T: for<'de> Deserialize<'de>>(stdout: &[u8]) -> Vec<T> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad probe line {l:?}: {e}")))
        .collect()
}

/// Runs a prepared probe command to completion and returns its reports; panics if the probe itself failed (bad
/// arguments, or it could not be placed in its cgroup/namespace), since then nothing was measured.
pub fn run<T: for<'de> Deserialize<'de>>(cmd: &mut Command) -> Vec<T> {
    parse(&crate::process::run_ok(cmd).stdout)
}

/// `nmi-probe` arguments of a workload retrying all the time: a token request every 10 ms, each given 3 s, until the
/// test closes its stdin (run it with [`Background`]).
pub const RETRY_LOOP: [&str; 8] = [
    "http",
    "--count",
    "0",
    "--until-stdin-eof",
    "--interval-ms",
    "10",
    "--timeout-ms",
    "3000",
];

/// `nmi-probe` arguments of the pod that tries to take the token service from the others: 300 connections, each with
/// 200 pipelined requests whose answers it never reads (add `--hold-ms`). Run it with [`Background`].
pub const WEDGE: [&str; 5] = ["wedge", "--connections", "300", "--pipelined", "200"];

/// A probe running in the background (e.g. a connect loop across an agent restart).
pub struct Background {
    /// None once finished, so that Drop only kills a probe the test abandoned.
    child: Option<Child>,
}

impl Background {
    pub fn spawn(cmd: &mut Command) -> Background {
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Background { child: Some(child) }
    }

    /// Closes the probe's stdin (which ends an `--until-stdin-eof` loop), waits for it to exit and returns its
    /// reports.
    pub fn finish(mut self) -> Vec<Attempt> {
        let mut child = self.child.take().expect("not finished");
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("wait for probe");
        if !out.status.success() {
            panic!(
                "probe failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        parse(&out.stdout)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // A test that panics before finish() must not leave a loop running (its cgroup could not be removed).
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
