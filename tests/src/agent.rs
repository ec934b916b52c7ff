//! The real `nmi-agent` binary, run inside a topology: in the node namespace, in cgroup `intercepted/agent`.

mod log;

use std::fs::OpenOptions;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::Duration;

use nmi_testkit::wait::poll;

pub use log::Audit;

use crate::cgroup::Cgroup;
use crate::process;
use crate::topology::{Pod, Topology};

/// The agent's `--listen` port on the bridge address.
pub const LISTEN_PORT: u16 = 2579;
/// The agent's `--health-listen` port on the node namespace's loopback (private to the topology).
pub const HEALTH_PORT: u16 = 9464;
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Agent {
    bin: PathBuf,
    args: Vec<String>,
    /// Environment variables set on top of the test's own (e.g. `KUBECONFIG`).
    env: Vec<(String, String)>,
    /// Where it runs: the agent cgroup in the node namespace.
    home: Pod,
    pub listen: SocketAddrV4,
    pub pin_dir: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// `$NMI_AGENT_BIN`. The tests must exercise the binary that xtask just built, not whatever a path search
    /// finds, so there is no fallback.
    pub fn bin() -> PathBuf {
        match std::env::var_os("NMI_AGENT_BIN") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => panic!(
                "NMI_AGENT_BIN is not set: run the end-to-end tests with `cargo xtask test` (it builds the agent \
                 and the eBPF programs and points NMI_AGENT_BIN at target/release/nmi-agent)"
            ),
        }
    }

    /// Starts the agent on `topo` and waits until it logs `serving` (programs attached, bindings loaded).
    pub fn start(topo: &Topology, extra: &[&str]) -> Agent {
        Agent::start_with_env(topo, extra, &[])
    }

    /// [`Agent::start`] with extra environment variables.
    pub fn start_with_env(topo: &Topology, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start_in(topo, &topo.intercepted, topo.in_agent_cgroup(), extra, env)
    }

    /// [`Agent::start_with_env`] intercepting `intercepted` instead of the topology's subtree, and running in `home`.
    pub fn start_in(
        topo: &Topology,
        intercepted: &Cgroup,
        home: Pod,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let listen = SocketAddrV4::new(topo.bridge_ip, LISTEN_PORT);
        let mut args: Vec<String> = vec!["run".into()];
        args.extend(intercept_args(topo, intercepted));
        args.extend([
            "--health-listen".into(),
            format!("127.0.0.1:{HEALTH_PORT}"),
            "--log-format".into(),
            "json".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut agent = Agent {
            bin: Agent::bin(),
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            home,
            listen,
            pin_dir: topo.pin_dir.clone(),
            log_path: topo.log_dir.join("agent.log"),
            child: None,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path.display()));
        // Readiness must come from *this* start, not from an earlier one in the same (appended) log.
        let from = log.metadata().expect("stat log").len() as usize;
        let mut cmd = self.home.command(&self.bin);
        // The tests read the agent's info-level log (serving, audit): the caller's RUST_LOG must not hide it, and
        // the caller's proxy or Azure settings must not change what the agent does.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().to_ascii_uppercase();
            if key.ends_with("_PROXY") || key.starts_with("AZURE_") || key == "KUBECONFIG" {
                cmd.env_remove(&key);
                cmd.env_remove(key.to_ascii_lowercase());
            }
        }
        cmd.env("RUST_LOG", "info");
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log);
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            cmd.env("RUST_BACKTRACE", "1");
        }
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display())),
        );
        self.wait_ready(from);
    }

    /// Waits until the log written after byte `from` says `serving`; panics if the agent exits or times out first.
    fn wait_ready(&mut self, from: usize) {
        let ready = poll(READY_TIMEOUT, Duration::from_millis(50), || {
            if self.logged_since(from, "serving") {
                return Some(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"))
            {
                self.child = None;
                panic!(
                    "nmi-agent exited before ready ({status}); {}",
                    self.describe()
                );
            }
            None
        });
        if ready.is_none() {
            panic!(
                "nmi-agent not ready after {READY_TIMEOUT:?}; {}",
                self.describe()
            );
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGSTOP: the kernel still completes handshakes into the agent's listen backlog, but the agent accepts (and
    /// attests) nothing until [`Agent::resume`]. Widens the window between a client's connect and the agent's
    /// lookup, which is where a forged or deleted record would change the verdict.
    pub fn pause(&self) {
        self.signal(rustix::process::Signal::STOP);
    }

    pub fn resume(&self) {
        self.signal(rustix::process::Signal::CONT);
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = self.pid().expect("the agent runs");
        let pid = rustix::process::Pid::from_raw(pid as i32).expect("a child's pid is positive");
        rustix::process::kill_process(pid, signal)
            .unwrap_or_else(|e| panic!("signal {signal:?} to the agent: {e}"));
    }

    /// SIGKILL, no chance to clean up: what a crash or an OOM kill looks like. Its pinned programs stay.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the agent again with the same arguments in another cgroup, as Kubernetes does for a new container of the
    /// DaemonSet (killing the old one first if it still runs).
    pub fn restart_in(&mut self, home: Pod) {
        self.kill9();
        self.home = home;
        self.spawn();
    }

    /// Starts the agent again with the same arguments (killing it first if it still runs).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// `nmi-agent uninstall --pin-dir <dir>`, in the agent's network namespace as the DaemonSet runs it (the forwarding
    /// guard's filters live on that namespace's devices); panics unless it succeeds. `--host-root` names an empty
    /// directory of the test's own: a test never touches the machine's systemd units.
    pub fn uninstall(&self) -> Output {
        let mut cmd = Command::new(&self.bin);
        process::place(&mut cmd, None, Some(&self.home.netns));
        cmd.args(["uninstall", "--pin-dir"]).arg(&self.pin_dir);
        cmd.arg("--host-root")
            .arg(self.log_path.with_file_name("host-root"));
        process::run_ok(&mut cmd)
    }

    /// `GET /readyz` on the health port, from inside the node namespace: (status code, body).
    pub fn readyz(&self) -> (u16, String) {
        self.health_get("/readyz")
    }

    /// The value of the first `/metrics` sample whose line starts with `series` (name plus labels as rendered, e.g.
    /// `nmi_token_requests_total{outcome="granted",cache="miss"}`), or None if there is none.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (status, body) = self.health_get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        body.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// `GET path` on the health port, from inside the node namespace: (status code, body).
    pub fn health_get(&self, path: &str) -> (u16, String) {
        self.try_health_get(path)
            .unwrap_or_else(|e| panic!("GET {path} on the health port: {e}"))
    }

    /// [`Agent::health_get`], or why nothing answered (e.g. the agent has not bound its health address yet).
    pub fn try_health_get(&self, path: &str) -> Result<(u16, String), String> {
        self.home.netns.run_in(|| {
            use std::io::{Read, Write};
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], HEALTH_PORT));
            let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("read timeout");
            stream
                .write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .map_err(|e| format!("send {path}: {e}"))?;
            let mut reply = String::new();
            let _ = stream.read_to_string(&mut reply);
            let status = reply
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("no HTTP status in {reply:?}"))?;
            let body = reply.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
            Ok((status, body))
        })
    }
}

/// `--cgroup`, `--listen` and `--pin-dir` as the agent gets them on `topo`: what `run` and `guard` share.
fn intercept_args(topo: &Topology, intercepted: &Cgroup) -> Vec<String> {
    vec![
        "--cgroup".into(),
        intercepted.path.display().to_string(),
        "--listen".into(),
        SocketAddrV4::new(topo.bridge_ip, LISTEN_PORT).to_string(),
        "--pin-dir".into(),
        topo.pin_dir.display().to_string(),
    ]
}

/// `nmi-agent guard` for `topo` with `intercepted` as `--cgroup` (which may not exist yet), run as the boot unit runs
/// it: outside the intercepted subtree, in the node's network namespace. Panics unless it exits 0; returns its
/// output.
pub fn guard(topo: &Topology, intercepted: &Cgroup) -> Output {
    let mut cmd = topo.outside_in(&topo.hostnet).command(Agent::bin());
    cmd.arg("guard").args(intercept_args(topo, intercepted));
    process::run_ok(&mut cmd)
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if thread::panicking() {
            eprintln!("--- {}\n---", self.describe());
        }
    }
}
