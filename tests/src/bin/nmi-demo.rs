//! `nmi-demo` (run it with `cargo xtask demo`, as root): two teams' pods on one node, each reading its own Key Vault
//! secret with an unchanged Azure SDK client, through nmi-agent.
//!
//! The scenario: pods `orders` and `billing` are bound (tests/demo/bindings.yaml) to the user-assigned identities
//! `orders` and `billing`; a third pod, `unbound`, has no binding. Each pod runs tests/clients/python_keyvault.py
//! (`SecretClient` + `ManagedIdentityCredential()`) against a Key Vault emulator (tests/demo/keyvault_emulator.py:
//! HTTPS, challenge auth, the per-secret access policy in tests/demo/access-policy.json) and asks for its own secret,
//! then for the other team's. The IMDS emulator plays the VM's IMDS, which has both identities and a
//! system-assigned one. Expected: each team reads its own secret and is refused (403) the other's; the unbound pod
//! gets no token at all; nothing reaches 169.254.169.254 except through the agent.
//!
//! Exits 0 when every expectation holds, 1 when one fails or the demo could not be set up, 130 when interrupted.
//! On every exit path the topology (namespaces, cgroups, processes, bpffs pins) is removed; SIGINT and SIGTERM kill
//! what runs in it so that the main thread unwinds and drops it.
//!
//! Environment (set by `cargo xtask demo`): `NMI_AGENT_BIN` (the agent), `NMI_E2E_BIN_DIR` (imds-emulator),
//! `NMI_E2E_PYTHON` (the venv with the SDK clients), `NMI_DEMO_TESTS_DIR` (this crate's directory).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nmi_agent_e2e::{Agent, Pod, Topology, cgroup, netns, probe};
use serde_json::Value;

/// The IMDS emulator listens on the node namespace's loopback: only the agent (node namespace) can reach it.
const IMDS_EMULATOR: &str = "127.0.0.1:50080";
const VAULT_PORT: u16 = 8443;
/// The emulated VM's system-assigned identity: what an unbound pod would get from a fail-open proxy.
const NODE_IDENTITY: &str = "0c0c0c0c-0000-4000-8000-0000000000c3";
const ORDERS_SECRET: &str = "orders-db-password";
const BILLING_SECRET: &str = "billing-api-key";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The live topology's cgroup subtree: what a signal empties so that the main thread's waits end.
static TOPOLOGY_CGROUP: Mutex<Option<PathBuf>> = Mutex::new(None);

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Why the scenario stopped early.
enum Stop {
    Interrupted,
    Setup(String),
}

impl From<String> for Stop {
    fn from(message: String) -> Self {
        if interrupted() {
            Stop::Interrupted
        } else {
            Stop::Setup(message)
        }
    }
}

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "nmi-demo: needs root (cgroups, network namespaces, eBPF); run `cargo xtask demo` as root"
        );
        return ExitCode::from(2);
    }
    let hold = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => false,
        [flag] if flag == "--hold" => true,
        _ => {
            eprintln!(
                "usage: nmi-demo [--hold]   (run it with `cargo xtask demo [--hold]`)\n  \
                 --hold  keep the topology, the agent and the emulators up after the scenario, until Ctrl-C"
            );
            return ExitCode::from(2);
        }
    };
    install_signal_handlers();
    let paths = match Paths::from_env() {
        Ok(paths) => paths,
        Err(message) => {
            eprintln!("nmi-demo: {message}");
            return ExitCode::from(2);
        }
    };
    // The harness panics on failure; its message is the diagnosis, unless the panic is the consequence of an
    // interrupt (the signal killed the agent while it was starting, say).
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if !interrupted() {
            default_hook(info);
        }
    }));

    let started = Instant::now();
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| scenario(&paths, hold)));
    *TOPOLOGY_CGROUP.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let leftovers = leftovers();
    let code = match outcome {
        Ok(Ok(true)) => {
            println!(
                "\nnmi-demo: all expectations held ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Ok(Ok(false)) => {
            println!(
                "\nnmi-demo: FAILED: the outcomes marked above are not what the scenario expects"
            );
            ExitCode::FAILURE
        }
        _ if interrupted() => {
            eprintln!("\nnmi-demo: interrupted; the topology is removed");
            ExitCode::from(130)
        }
        Ok(Err(Stop::Setup(message))) => {
            eprintln!("\nnmi-demo: setup failed: {message}");
            ExitCode::FAILURE
        }
        Ok(Err(Stop::Interrupted)) => ExitCode::from(130),
        Err(_) => {
            eprintln!(
                "\nnmi-demo: setup failed (the panic above says where); the topology is removed"
            );
            ExitCode::FAILURE
        }
    };
    if !leftovers.is_empty() {
        eprintln!("nmi-demo: WARNING: left behind: {}", leftovers.join(", "));
        return ExitCode::FAILURE;
    }
    code
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag (all a handler may safely do); a watcher thread then kills every process in the
/// topology, which ends whatever the main thread waits for, and the main thread unwinds, dropping the topology.
/// A handled signal is reset to the default in exec'd children, so the agent and the emulators keep their own
/// SIGINT/SIGTERM behaviour.
fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    thread::spawn(|| {
        while !interrupted() {
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "\nnmi-demo: signal received; stopping the demo's processes and removing the topology"
        );
        let cgroup = TOPOLOGY_CGROUP
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(dir) = cgroup {
            cgroup::kill_all(&dir);
        }
    });
}

/// Everything the demo reads, found from the environment xtask sets.
struct Paths {
    tests_dir: PathBuf,
    python: PathBuf,
    imds_emulator: PathBuf,
}

impl Paths {
    fn from_env() -> Result<Paths, String> {
        let tests_dir = std::env::var_os("NMI_DEMO_TESTS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        if std::env::var_os("NMI_AGENT_BIN").is_none_or(|p| !Path::new(&p).is_file()) {
            return Err(
                "NMI_AGENT_BIN does not name the agent binary: run the demo with `cargo xtask demo`, which \
                 builds the agent with its eBPF programs and sets it"
                    .into(),
            );
        }
        let python = match std::env::var_os("NMI_E2E_PYTHON") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => tests_dir.join("../target/pyenv/bin/python"),
        };
        if !python.is_file() {
            return Err(format!(
                "no Python with the Azure SDK at {}: run the demo with `cargo xtask demo`, which creates it",
                python.display()
            ));
        }
        for file in [
            "demo/bindings.yaml",
            "demo/keyvault_emulator.py",
            "demo/access-policy.json",
            "demo/secrets.json",
            "clients/python_keyvault.py",
        ] {
            if !tests_dir.join(file).is_file() {
                return Err(format!(
                    "{} is missing (NMI_DEMO_TESTS_DIR must be the repository's tests/ directory)",
                    tests_dir.join(file).display()
                ));
            }
        }
        Ok(Paths {
            imds_emulator: probe::package_bin("imds-emulator"),
            python,
            tests_dir,
        })
    }

    fn demo(&self, file: &str) -> PathBuf {
        self.tests_dir.join("demo").join(file)
    }
}

/// `(name, clientID)` of each identity in the bindings file, so the IMDS emulator knows the same identities. The
/// file's format is the agent's (docs/configuration.md); this reads only the two keys it needs.
fn identities(bindings: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(bindings)
        .map_err(|e| format!("read {}: {e}", bindings.display()))?;
    let mut out = Vec::new();
    let mut name = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let line = line.strip_prefix("- ").unwrap_or(line).trim();
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_string();
        match key.trim() {
            "name" => name = Some(value),
            "clientID" => {
                let name = name
                    .take()
                    .ok_or_else(|| format!("{}: clientID before name", bindings.display()))?;
                out.push((name, value));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A helper process in the topology (an emulator); killed and reaped on drop. The topology's cleanup would kill it
/// too (it lives in the topology's `outside` cgroup), but reaping it here keeps zombies out of `ps`.
struct Helper {
    child: Child,
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` and waits for it to print `ready` on stdout; its stderr goes to `log`.
fn start_helper(what: &str, cmd: &mut std::process::Command, log: &Path) -> Result<Helper, String> {
    let log_file =
        std::fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("start {what}: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let helper = Helper { child };
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        // Keep draining so the helper never blocks on a full pipe.
        for _ in lines {}
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(Ok(line))) if line.trim() == "ready" => return Ok(helper),
            Ok(other) => {
                let log_text = std::fs::read_to_string(log).unwrap_or_default();
                return Err(format!(
                    "{what} did not start (first line {other:?}); its stderr:\n{log_text}"
                ));
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline && !interrupted() => {
            }
            Err(_) => return Err(format!("{what} not ready after {READY_TIMEOUT:?}")),
        }
    }
}

/// What one client call reported (a line of python_keyvault.py's output).
struct SecretRead {
    pod: String,
    identity: String,
    secret: String,
    outcome: Outcome,
    elapsed_ms: f64,
    /// Empty when the outcome is what the scenario expects.
    unexpected: String,
}

#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Value(String),
    Refused(u16, String),
    NoToken,
    Other(String),
}

impl Outcome {
    fn describe(&self) -> String {
        match self {
            Outcome::Value(v) => {
                let shown: String = v.chars().take(8).collect();
                format!("read \"{shown}…\"")
            }
            Outcome::Refused(status, code) => format!("refused {status} {code}"),
            Outcome::NoToken => "no token (CredentialUnavailableError)".into(),
            Outcome::Other(what) => what.clone(),
        }
    }
}

fn parse_read(pod: &str, identity: &str, line: &Value) -> SecretRead {
    let secret = line["secret"].as_str().unwrap_or("?").to_string();
    let outcome = if line["ok"] == true {
        Outcome::Value(line["value"].as_str().unwrap_or("").to_string())
    } else if line["error"] == "CredentialUnavailableError" {
        Outcome::NoToken
    } else if let Some(status) = line["status"].as_u64() {
        Outcome::Refused(
            status as u16,
            line["code"].as_str().unwrap_or("").to_string(),
        )
    } else {
        Outcome::Other(format!(
            "{}: {}",
            line["error"].as_str().unwrap_or("error"),
            line["message"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(80)
                .collect::<String>()
        ))
    };
    SecretRead {
        pod: pod.to_string(),
        identity: identity.to_string(),
        secret,
        outcome,
        elapsed_ms: line["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
        unexpected: String::new(),
    }
}

/// Runs the unchanged SDK client in `pod`: a fresh process, with only the environment a pod spec would give it
/// (no proxy settings or anything else of the node's), the vault's CA trusted through the standard variables.
fn run_client(
    paths: &Paths,
    pod: &Pod,
    identity: &str,
    vault_url: &str,
    ca: &Path,
    secrets: &[&str],
) -> Result<Vec<SecretRead>, String> {
    if interrupted() {
        return Err("interrupted".into());
    }
    let mut cmd = pod.command(&paths.python);
    cmd.arg(paths.tests_dir.join("clients/python_keyvault.py"))
        .arg(vault_url)
        .args(secrets)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp")
        .env("LANG", "C.UTF-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("REQUESTS_CA_BUNDLE", ca)
        .env("SSL_CERT_FILE", ca)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("start the client in {}: {e}", pod.label))?;
    // Read both pipes on threads so a chatty client cannot block on a full pipe while we wait.
    let pipe = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = pipe(Box::new(child.stdout.take().expect("piped")));
    let stderr = pipe(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the client in {} did not finish within {CLIENT_TIMEOUT:?}",
                pod.label
            ));
        }
        thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    if !status.success() {
        return Err(format!(
            "the client in {} failed ({status}):\n{}",
            pod.label,
            stderr.trim()
        ));
    }
    let reads: Vec<SecretRead> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .map(|v| parse_read(&pod.label, identity, &v))
                .map_err(|e| format!("client output {l:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if reads.len() != secrets.len() {
        return Err(format!(
            "the client in {} reported {} reads for {} secrets:\n{stdout}{stderr}",
            pod.label,
            reads.len(),
            secrets.len()
        ));
    }
    Ok(reads)
}

fn step(started: &Instant, message: &str) {
    println!("  [{:>5.1}s] {message}", started.elapsed().as_secs_f64());
}

/// The whole demo; Ok(true) when every expectation held. The topology and everything in it is dropped (removed)
/// before this returns, also when it panics.
fn scenario(paths: &Paths, hold: bool) -> Result<bool, Stop> {
    let t0 = Instant::now();
    println!(
        "nmi-agent demo: two teams' pods on one node, one Key Vault, unchanged Azure SDK clients\n"
    );
    let bindings = paths.demo("bindings.yaml");
    let identities = identities(&bindings)?;
    for wanted in ["orders", "billing"] {
        if !identities.iter().any(|(name, _)| name == wanted) {
            return Err(Stop::Setup(format!(
                "{} has no identity named `{wanted}`",
                bindings.display()
            )));
        }
    }
    let secrets: BTreeMap<String, Value> = serde_json::from_str(
        &std::fs::read_to_string(paths.demo("secrets.json"))
            .map_err(|e| format!("secrets.json: {e}"))?,
    )
    .map_err(|e| format!("secrets.json: {e}"))?;
    let secret_value = |name: &str| {
        secrets
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };

    // Declared in this order so that they drop in reverse: agent, emulators, then the topology.
    let mut topo = Topology::new();
    *TOPOLOGY_CGROUP.lock().unwrap_or_else(|e| e.into_inner()) = Some(topo.cgroup.path.clone());
    let orders = topo.add_pod("orders");
    let billing = topo.add_pod("billing");
    let unbound = topo.add_pod("unbound");
    step(
        &t0,
        &format!(
            "topology {}: node namespace, bridge {}/24, pods orders {} / billing {} / unbound {}",
            topo.name, topo.bridge_ip, orders.ip, billing.ip, unbound.ip
        ),
    );
    if interrupted() {
        return Err(Stop::Interrupted);
    }

    // Helpers run in the node namespace and in the topology's `outside` cgroup: not intercepted, and emptied by the
    // topology's cleanup.
    let node_helper = topo.outside_in(&topo.hostnet);
    let mut imds = node_helper.command(&paths.imds_emulator);
    imds.args(["--listen", IMDS_EMULATOR]);
    for (name, id) in &identities {
        imds.args(["--identity", &format!("{id}={name}")]);
    }
    imds.args(["--system-identity", &format!("{NODE_IDENTITY}=node")]);
    let _imds = start_helper(
        "imds-emulator",
        &mut imds,
        &topo.log_dir.join("imds-emulator.log"),
    )?;
    step(
        &t0,
        &format!(
            "IMDS emulator on {IMDS_EMULATOR} (node namespace): identities {}, system-assigned `node`",
            identities
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    let vault_addr = format!("{}:{VAULT_PORT}", topo.bridge_ip);
    let vault_url = format!("https://{vault_addr}");
    let cert_dir = topo.log_dir.join("vault-tls");
    let mut vault = node_helper.command(&paths.python);
    vault
        .arg(paths.demo("keyvault_emulator.py"))
        .args(["--listen", &vault_addr, "--dir"])
        .arg(&cert_dir)
        .arg("--policy")
        .arg(paths.demo("access-policy.json"))
        .arg("--secrets")
        .arg(paths.demo("secrets.json"));
    let vault_log = topo.log_dir.join("keyvault.log");
    let _vault = start_helper("the Key Vault emulator", &mut vault, &vault_log)?;
    let ca = cert_dir.join("ca.pem");
    step(
        &t0,
        &format!(
            "Key Vault emulator on {vault_url} (TLS: a fresh demo CA, server certificate for {})",
            topo.bridge_ip
        ),
    );

    if interrupted() {
        return Err(Stop::Interrupted);
    }
    let bindings_arg = bindings.display().to_string();
    let imds_url = format!("http://{IMDS_EMULATOR}");
    let agent = Agent::start(
        &topo,
        &["--bindings", &bindings_arg, "--imds-url", &imds_url],
    );
    step(
        &t0,
        &format!(
            "nmi-agent ready: listening on {}, programs on {}/, bindings {}",
            agent.listen,
            topo.intercepted.proc_path(),
            relative(&bindings)
        ),
    );

    println!(
        "\nEach pod runs python_keyvault.py: SecretClient(vault, ManagedIdentityCredential()).get_secret(...)\n"
    );
    let mut reads = Vec::new();
    for (pod, identity, secrets) in [
        (&orders, "orders", [ORDERS_SECRET, BILLING_SECRET]),
        (&billing, "billing", [BILLING_SECRET, ORDERS_SECRET]),
        (&unbound, "-", [ORDERS_SECRET, BILLING_SECRET]),
    ] {
        reads.extend(run_client(paths, pod, identity, &vault_url, &ca, &secrets)?);
    }
    // A new process in the orders pod: its SDK has no token yet, so it asks again, and the agent answers from its
    // cache (IMDS is not called).
    let rerun = reads.len();
    reads.extend(run_client(
        paths,
        &orders,
        "orders",
        &vault_url,
        &ca,
        &[ORDERS_SECRET],
    )?);

    // What the scenario expects of each read.
    for read in &mut reads {
        let expected = match (read.pod.as_str(), read.secret.as_str()) {
            ("orders", ORDERS_SECRET) | ("billing", BILLING_SECRET) => {
                Outcome::Value(secret_value(&read.secret))
            }
            ("orders", _) | ("billing", _) => Outcome::Refused(403, "Forbidden".into()),
            _ => Outcome::NoToken,
        };
        if read.outcome != expected {
            read.unexpected = format!("expected {}", expected.describe());
        }
    }
    for read in &mut reads[rerun..] {
        read.pod = "orders, again".into();
    }
    print_table(&reads);

    // The agent's side: one audit line per token decision. The unbound pod must get no identity, the others their
    // own; wait briefly, as a line may trail the caller's EOF.
    let deadline = Instant::now() + Duration::from_secs(3);
    let token_audits = loop {
        let audits: Vec<Value> = agent
            .logs()
            .into_iter()
            .filter(|v| v["target"] == "audit" && v["event"] == "token")
            .collect();
        // One decision per token request: orders asked twice (two processes), billing once, unbound at least once.
        let count = |cgroup: &str| audits.iter().filter(|a| a["cgroup"] == cgroup).count();
        let pods_seen = count("/orders") >= 2 && count("/billing") >= 1 && count("/unbound") >= 1;
        if pods_seen || Instant::now() > deadline {
            break audits;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let mut audit_problems = Vec::new();
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
            audit_problems.push(format!("no `granted` audit for {cgroup}"));
        }
        if let Some(other) = granted.iter().find(|name| *name != identity) {
            audit_problems.push(format!("{cgroup} was granted {other}"));
        }
    }
    // The second orders process asked after the first: the agent must have answered from its cache (24 h tokens).
    let last_orders = token_audits.iter().rfind(|a| a["cgroup"] == "/orders");
    if last_orders.is_none_or(|a| a["cache"] != "hit") {
        audit_problems
            .push("the second orders process was not served from the agent's cache".into());
    }
    let unbound_audits: Vec<&Value> = token_audits
        .iter()
        .filter(|a| a["cgroup"] == "/unbound")
        .collect();
    if unbound_audits.is_empty() {
        audit_problems.push("no audit for /unbound's token requests".into());
    }
    if unbound_audits.iter().any(|a| a["outcome"] != "denied") {
        audit_problems.push("a token request of /unbound was not denied".into());
    }
    print_audits(&token_audits, &audit_problems, &name_of, &bindings);

    let leaked = topo.trap.packets();
    println!(
        "\nThe trap at 169.254.169.254 in the node namespace (the real IMDS's address) counted {leaked} packet(s){}",
        if leaked == 0 {
            ": nothing bypassed the agent."
        } else {
            ": LEAK"
        }
    );

    let passed =
        reads.iter().all(|r| r.unexpected.is_empty()) && audit_problems.is_empty() && leaked == 0;
    if !passed {
        println!(
            "\n--- agent log tail ({}):\n{}",
            agent.log_path.display(),
            agent.log_tail(30)
        );
        println!(
            "--- Key Vault emulator decisions:\n{}",
            std::fs::read_to_string(&vault_log)
                .unwrap_or_default()
                .trim_end()
        );
        // Keep the logs: the topology removes its log dir on a clean drop.
        let kept = std::env::temp_dir().join(format!("nmi-demo-logs-{}", std::process::id()));
        if copy_dir(&topo.log_dir, &kept).is_ok() {
            println!("--- logs kept in {}", kept.display());
        }
    }

    print_next_steps();
    if hold {
        let cgroup = orders.cgroup.path.join("cgroup.procs");
        println!(
            "\nHolding the topology until Ctrl-C. Ask for a token as the orders pod would (enter its network namespace,\n\
             join its cgroup, then call IMDS as usual):\n  \
             nsenter --net={} sh -c 'echo $$ > {} && exec curl -s -H Metadata:true \
             \"http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net\"'\n\
             Agent log: {}",
            orders.netns.path().display(),
            cgroup.display(),
            agent.log_path.display()
        );
        while !interrupted() {
            thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(passed)
}

fn relative(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
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

fn print_table(reads: &[SecretRead]) {
    let header = ["pod", "identity", "secret", "result", "latency ms"];
    let rows: Vec<[String; 5]> = reads
        .iter()
        .map(|r| {
            let mut result = r.outcome.describe();
            if !r.unexpected.is_empty() {
                write!(result, "   <-- UNEXPECTED, {}", r.unexpected).ok();
            }
            [
                r.pod.clone(),
                r.identity.clone(),
                r.secret.clone(),
                result,
                format!("{:.1}", r.elapsed_ms),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut out = String::from(" ");
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == 4 {
                write!(out, " {cell:>w$} ").ok();
            } else {
                write!(out, " {cell:<w$} |").ok();
            }
        }
        out.trim_end().to_string()
    };
    println!("{}", line(header));
    println!(
        "  {}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for row in &rows {
        println!(
            "{}",
            line([&row[0], &row[1], &row[2], &row[3], &row[4]].map(String::as_str))
        );
    }
    println!(
        "\n  The first read of a process includes Key Vault's 401 challenge and the token request through nmi-agent.\n  \
         `orders, again` is a new process in the orders pod: nmi-agent answers it from its token cache."
    );
}

fn print_audits(
    audits: &[Value],
    problems: &[String],
    name_of: &dyn Fn(&str) -> String,
    bindings: &Path,
) {
    println!(
        "\nnmi-agent's audit log: its token decisions ({} lines, `\"target\":\"audit\",\"event\":\"token\"`)",
        audits.len()
    );
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let bindings = bindings.display().to_string();
    let header = ["cgroup", "identity", "outcome", "reason", "cache", "ms"];
    let rows: Vec<[String; 6]> = audits
        .iter()
        .map(|a| {
            let identity = match s(&a["identity"]) {
                id if id.is_empty() => "-".to_string(),
                id => name_of(&id),
            };
            [
                s(&a["cgroup"]),
                identity,
                s(&a["outcome"]),
                s(&a["reason"]).replace(&bindings, "bindings.yaml"),
                s(&a["cache"]),
                a["latency_ms"]
                    .as_u64()
                    .map_or("?".into(), |n| n.to_string()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::from(" ");
        for (cell, w) in cells.iter().zip(widths) {
            write!(out, " {cell:<w$}").ok();
        }
        out.trim_end().to_string()
    };
    println!("{}", line(header));
    for row in &rows {
        println!(
            "{}",
            line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]].map(String::as_str))
        );
    }
    for problem in problems {
        println!("  <-- UNEXPECTED: {problem}");
    }
}

fn print_next_steps() {
    println!(
        "\nWhere to look next:\n\
         \x20 README.md              what nmi-agent is and how to run it\n\
         \x20 docs/architecture.md   how a connect to 169.254.169.254 becomes an attested, per-pod token\n\
         \x20 docs/configuration.md  flags, the bindings file this demo used (tests/demo/bindings.yaml), Kubernetes mode\n\
         \x20 cargo xtask test       every check CI runs, including the end-to-end tests behind this demo"
    );
}

/// Namespaces or cgroups of this process's topologies that still exist after the demo.
fn leftovers() -> Vec<String> {
    let prefix = format!("{}{}-", nmi_agent_e2e::cleanup::PREFIX, std::process::id());
    let mut out: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .map(|n| format!("netns {n}"))
        .collect();
    if let Ok(dir) = std::fs::read_dir(cgroup::root()) {
        out.extend(
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .map(|n| format!("cgroup {n}")),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_identities_from_the_checked_in_bindings() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/bindings.yaml");
        let ids = identities(&path).expect("bindings");
        let names: Vec<&str> = ids.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["orders", "billing"]);
        assert!(ids.iter().all(|(_, id)| id.len() == 36), "{ids:?}");
    }

    #[test]
    fn outcomes_read_compactly() {
        assert_eq!(
            Outcome::Value("orders-Pa55w0rd".into()).describe(),
            "read \"orders-P…\""
        );
        assert_eq!(
            Outcome::Refused(403, "Forbidden".into()).describe(),
            "refused 403 Forbidden"
        );
    }
}
