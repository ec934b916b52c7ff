//! `cargo xtask bench` (root): the numbers behind docs/benchmarks.md, measured in one run inside one private
//! topology (see `nmi_agent_e2e::Topology`), so that ratios compare like with like.
//!
//! 1. Connect path: from pod-a, N sequential TCP connect+close (SO_LINGER 0) to a plain listener on the bridge
//!    address (backlog 4096, accept loop in the node namespace). (a) nothing attached (agent killed and
//!    `nmi-agent uninstall`ed), (b) the agent running with its programs on pod-a's parent cgroup. Paired rounds
//!    in alternating order; median per-connect µs of each and median of the per-round ratios b/a.
//! 2. Redirect path: token requests (`Connection: close`, cache hit) from pod-a to 169.254.169.254:80 (redirected to
//!    the agent) vs the same request straight to the IMDS emulator on the bridge address, C threads for S seconds.
//! 3. Token cache: per-request latency through the agent, cache hit vs cold miss (a new resource per request;
//!    emulator without delay).
//! 4. Agent memory: VmRSS / VmHWM of the agent after the load.
//!
//! Prints a table and writes `target/bench/results.json`. The load generators run inside pod-a as re-executions of
//! this binary (`nmi-bench worker ...`), so the kernel sees them as that pod's processes.
//!
//! ```text
//! nmi-bench [--connects N] [--rounds R] [--threads C] [--secs S] [--hits H] [--misses M]
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nmi_agent_e2e::bindings::{self, FileIdentity};
use nmi_agent_e2e::imds_emulator::EmulatedIdentity;
use nmi_agent_e2e::node::NodeEmulator;
use nmi_agent_e2e::trap::IMDS;
use nmi_agent_e2e::{Agent, Pod, Topology, require_root};
use serde_json::{Value, json};

const EMULATOR_PORT: u16 = 8079;
const LISTENER_PORT: u16 = 8090;
const IDENTITY: (&str, &str) = ("orders", "11111111-1111-1111-1111-111111111111");
const HIT_QUERY: &str = "resource=https://vault.azure.net";

struct Opts {
    connects: usize,
    rounds: usize,
    threads: usize,
    secs: u64,
    hits: usize,
    misses: usize,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("worker") {
        return worker(&args[1..]);
    }
    let mut o = Opts {
        connects: 20_000,
        rounds: 5,
        threads: 32,
        secs: 5,
        hits: 2_000,
        misses: 500,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v: usize = match it.next().map(|v| v.parse()) {
            Some(Ok(v)) => v,
            _ => {
                eprintln!("nmi-bench: {flag} needs a number");
                return ExitCode::from(2);
            }
        };
        match flag.as_str() {
            "--connects" => o.connects = v.max(1),
            "--rounds" => o.rounds = v.max(1),
            "--threads" => o.threads = v.max(1),
            "--secs" => o.secs = v.max(1) as u64,
            "--hits" => o.hits = v.max(1),
            "--misses" => o.misses = v.max(1),
            _ => {
                eprintln!("nmi-bench: unknown argument {flag}");
                return ExitCode::from(2);
            }
        }
    }
    if !require_root("nmi-bench") {
        return ExitCode::FAILURE;
    }
    match bench(&o) {
        0 => ExitCode::SUCCESS,
        errors => {
            eprintln!(
                "nmi-bench: INVALID RUN: {errors} request(s) or connect(s) failed; the numbers above are not comparable"
            );
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Orchestrator
// ---------------------------------------------------------------------------------------------------------------

/// Runs everything; returns the number of failed connects and requests (a valid run has none).
fn bench(o: &Opts) -> u64 {
    let started = Instant::now();
    let topo = Topology::new();
    let pod = topo.pod_a.clone();
    let emu = NodeEmulator::start(
        &topo.node,
        SocketAddr::from((topo.bridge_ip, EMULATOR_PORT)),
        vec![EmulatedIdentity::new(IDENTITY.1, IDENTITY.0)],
    );
    let bindings = bindings::write(
        &topo.log_dir,
        &[FileIdentity::new(IDENTITY.0, IDENTITY.1)],
        &[("pod-a", IDENTITY.0)],
    )
    .display()
    .to_string();
    let emu_url = emu.url();
    let agent_args = [
        "--bindings",
        bindings.as_str(),
        "--imds-url",
        emu_url.as_str(),
    ];

    // A plain listener in the node namespace: backlog 4096, accept and drop.
    let listen = SocketAddr::from((topo.bridge_ip, LISTENER_PORT));
    let listener: TcpListener = topo.node.run_in(|| {
        let l = TcpListener::bind(listen).unwrap_or_else(|e| panic!("bind {listen}: {e}"));
        // SAFETY: a valid listening socket; listen(2) again only changes the backlog.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 4096) }, 0, "listen");
        l
    });
    thread::spawn(move || {
        loop {
            if let Ok((s, _)) = listener.accept() {
                drop(s);
            }
        }
    });

    // --- 1. connect path -------------------------------------------------------------------------------------
    println!(
        "nmi-bench: 1/4 connect path: {} rounds x 2 x {} connects to {listen}",
        o.rounds, o.connects
    );
    // Warm-up (page cache, conntrack-free paths, CPU frequency).
    connect_run(&pod, listen, o.connects / 4);
    let mut a_us = Vec::new();
    let mut b_us = Vec::new();
    let mut ratios = Vec::new();
    let mut connect_errors = 0;
    for r in 0..o.rounds {
        // Each arm first checks that it is the arm it claims to be: without programs a request to
        // 169.254.169.254 reaches the node namespace's trap (not a 200), with them the agent answers 200.
        // The order alternates (a-b, b-a, ...) so that drift within a round does not favour one arm; either
        // order costs one agent start per round.
        let no_agent = || {
            assert_redirect(&pod, false);
            connect_run(&pod, listen, o.connects)
        };
        let with_agent = || {
            let mut agent = Agent::start(&topo, &agent_args);
            assert_redirect(&pod, true);
            let b = connect_run(&pod, listen, o.connects);
            agent.kill9();
            agent.uninstall();
            b
        };
        let ((a, ea), (b, eb)) = if r % 2 == 0 {
            let a = no_agent();
            (a, with_agent())
        } else {
            let b = with_agent();
            (no_agent(), b)
        };
        connect_errors += ea + eb;
        println!(
            "  round {} ({}): a (no agent) {a:.2} µs, b (agent attached) {b:.2} µs, b/a {:.3}",
            r + 1,
            if r % 2 == 0 { "a, b" } else { "b, a" },
            b / a
        );
        a_us.push(a);
        b_us.push(b);
        ratios.push(b / a);
    }
    let connect = json!({
        "connects_per_arm_per_round": o.connects,
        "rounds": o.rounds,
        "a_no_agent_us": a_us,
        "b_agent_us": b_us,
        "ratios_b_over_a": ratios,
        "median_a_us": median(&a_us),
        "median_b_us": median(&b_us),
        "median_ratio": median(&ratios),
        "errors": connect_errors,
    });

    // The agent for the rest of the run.
    let agent = Agent::start(&topo, &agent_args);
    let agent_pid = agent.pid().expect("agent runs");
    let rss_idle = proc_status_kb(agent_pid, "VmRSS");
    let hwm_idle = proc_status_kb(agent_pid, "VmHWM");

    // --- 2. redirect path throughput --------------------------------------------------------------------------
    println!(
        "nmi-bench: 2/4 redirect path: {} threads x {} s, agent vs emulator direct",
        o.threads, o.secs
    );
    let agent_addr = SocketAddr::V4(IMDS);
    let emu_addr = SocketAddr::from((topo.bridge_ip, EMULATOR_PORT));
    let direct_query = format!("{HIT_QUERY}&client_id={}", IDENTITY.1);
    // Prime the cache, and check both paths answer 200 before measuring.
    for (addr, q) in [(agent_addr, HIT_QUERY), (emu_addr, direct_query.as_str())] {
        let v = worker_json(&pod, &["latency", &addr.to_string(), "1", q]);
        assert_eq!(v["errors"], 0, "priming {addr}: {v}");
    }
    let mut via_agent = Vec::new();
    let mut direct = Vec::new();
    let mut load_errors = 0;
    for r in 0..2 {
        for (name, addr, q) in [
            ("agent", agent_addr, HIT_QUERY),
            ("direct", emu_addr, direct_query.as_str()),
        ] {
            let v = worker_json(
                &pod,
                &[
                    "load",
                    &addr.to_string(),
                    &o.threads.to_string(),
                    &o.secs.to_string(),
                    q,
                ],
            );
            let rps =
                v["ok"].as_f64().unwrap_or(0.0) / (v["elapsed_ns"].as_f64().unwrap_or(1.0) / 1e9);
            load_errors += v["errors"].as_u64().unwrap_or(0);
            if v["errors"].as_u64().unwrap_or(0) > 0 {
                println!("  {name}: errors: {v}");
            }
            println!("  round {}: {name}: {rps:.0} req/s", r + 1);
            if name == "agent" {
                via_agent.push(rps);
            } else {
                direct.push(rps);
            }
        }
    }
    let agent_rps = mean(&via_agent);
    let direct_rps = mean(&direct);
    let redirect = json!({
        "threads": o.threads,
        "secs_per_run": o.secs,
        "agent_rps": via_agent,
        "direct_rps": direct,
        "mean_agent_rps": agent_rps,
        "mean_direct_rps": direct_rps,
        "ratio_agent_over_direct": agent_rps / direct_rps,
        "errors": load_errors,
    });

    // --- 3. token cache latency -------------------------------------------------------------------------------
    println!(
        "nmi-bench: 3/4 token latency through the agent: {} hits, {} cold misses",
        o.hits, o.misses
    );
    let hits = worker_json(
        &pod,
        &[
            "latency",
            &agent_addr.to_string(),
            &o.hits.to_string(),
            HIT_QUERY,
        ],
    );
    let misses = worker_json(
        &pod,
        &[
            "latency",
            &agent_addr.to_string(),
            &o.misses.to_string(),
            "resource=https://bench-miss-{i}.example.net",
        ],
    );
    let direct_lat = worker_json(
        &pod,
        &[
            "latency",
            &emu_addr.to_string(),
            &o.hits.to_string(),
            &direct_query,
        ],
    );
    let summary = |v: &Value| {
        let mut l: Vec<f64> = v["lat_us"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        l.sort_by(f64::total_cmp);
        json!({
            "n": l.len(),
            "errors": v["errors"],
            "p50_us": pct(&l, 0.50),
            "p99_us": pct(&l, 0.99),
            "max_us": l.last().copied().unwrap_or(0.0),
        })
    };
    let cache = json!({
        "hit": summary(&hits),
        "miss": summary(&misses),
        "direct_emulator": summary(&direct_lat),
    });

    // --- 4. memory ---------------------------------------------------------------------------------------------
    let rss = proc_status_kb(agent_pid, "VmRSS");
    let hwm = proc_status_kb(agent_pid, "VmHWM");
    let memory = json!({
        "rss_after_start_kb": rss_idle,
        "hwm_after_start_kb": hwm_idle,
        "rss_after_load_kb": rss,
        "hwm_kb": hwm,
    });

    let machine = json!({
        "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    });
    let results = json!({
        "command": "cargo xtask bench",
        "machine": machine,
        "connect": connect,
        "redirect": redirect,
        "cache": cache,
        "memory": memory,
        "wall_secs": started.elapsed().as_secs_f64(),
    });
    drop(agent);
    drop(emu);
    drop(topo);

    print_table(&results);
    let path = out_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&results).expect("serialize") + "\n",
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    println!("nmi-bench: wrote {}", path.display());
    let errors_in = |v: &Value| v["errors"].as_u64().unwrap_or(0);
    errors_in(&results["connect"])
        + errors_in(&results["redirect"])
        + ["hit", "miss", "direct_emulator"]
            .iter()
            .map(|k| errors_in(&results["cache"][k]))
            .sum::<u64>()
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let c = &r["connect"];
    let d = &r["redirect"];
    let k = &r["cache"];
    let m = &r["memory"];
    println!();
    println!(
        "machine: {} cpus, kernel {}",
        r["machine"]["cpus"],
        r["machine"]["kernel"].as_str().unwrap_or("?")
    );
    println!("{:<58} {:>14}", "measurement", "value");
    println!("{}", "-".repeat(73));
    let row = |name: &str, value: String| println!("{name:<58} {value:>14}");
    row(
        "connect+close, no agent (median µs)",
        format!("{:.2}", f(&c["median_a_us"])),
    );
    row(
        "connect+close, agent attached (median µs)",
        format!("{:.2}", f(&c["median_b_us"])),
    );
    row(
        "connect+close ratio b/a (median of rounds)",
        format!("{:.3}", f(&c["median_ratio"])),
    );
    row(
        "token via 169.254.169.254 -> agent, cache hit (req/s)",
        format!("{:.0}", f(&d["mean_agent_rps"])),
    );
    row(
        "token straight to emulator (req/s)",
        format!("{:.0}", f(&d["mean_direct_rps"])),
    );
    row(
        "ratio agent/direct",
        format!("{:.3}", f(&d["ratio_agent_over_direct"])),
    );
    for (name, key) in [
        ("cache hit", "hit"),
        ("cold miss", "miss"),
        ("emulator direct", "direct_emulator"),
    ] {
        row(
            &format!("token latency, {name}: p50 / p99 (µs)"),
            format!("{:.0} / {:.0}", f(&k[key]["p50_us"]), f(&k[key]["p99_us"])),
        );
    }
    row(
        "agent VmRSS after start / after load (KiB)",
        format!("{} / {}", m["rss_after_start_kb"], m["rss_after_load_kb"]),
    );
    row(
        "agent VmHWM after start / after load (KiB)",
        format!("{} / {}", m["hwm_after_start_kb"], m["hwm_kb"]),
    );
    println!();
}

/// `target/bench/results.json`: next to the directory xtask ran us from (`$NMI_E2E_BIN_DIR` = target/release).
fn out_path() -> PathBuf {
    let bin_dir = std::env::var_os("NMI_E2E_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(PathBuf::from))
        })
        .unwrap_or_else(|| PathBuf::from("target/release"));
    let target = bin_dir.parent().map(PathBuf::from).unwrap_or(bin_dir);
    target.join("bench").join("results.json")
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("{field}:")))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Panics unless a token request from `pod` to 169.254.169.254:80 gets a 200 exactly when `attached`.
fn assert_redirect(pod: &Pod, attached: bool) {
    let v = worker_json(pod, &["latency", &IMDS.to_string(), "1", HIT_QUERY]);
    let answered = v["errors"] == 0;
    assert_eq!(
        answered,
        attached,
        "expected the agent's programs to be {}: {v}",
        if attached { "attached" } else { "detached" }
    );
}

/// Mean µs per connect of `n` sequential connects from `pod`, and the number that failed.
fn connect_run(pod: &Pod, addr: SocketAddr, n: usize) -> (f64, u64) {
    let v = worker_json(pod, &["connect", &addr.to_string(), &n.to_string()]);
    let errors = v["errors"].as_u64().unwrap_or(0);
    let us = v["elapsed_ns"].as_f64().unwrap_or(0.0) / 1e3 / n.max(1) as f64;
    (us, errors)
}

/// Runs `nmi-bench worker <args>` inside `pod` and parses its one JSON line.
fn worker_json(pod: &Pod, args: &[&str]) -> Value {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = pod.command(&exe);
    cmd.arg("worker").args(args).stdin(Stdio::null());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "worker {args:?}: bad output ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Nearest-rank percentile of sorted `s`.
fn pct(s: &[f64], p: f64) -> f64 {
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

// ---------------------------------------------------------------------------------------------------------------
// Worker: runs inside the pod, prints one JSON object
// ---------------------------------------------------------------------------------------------------------------

fn worker(args: &[String]) -> ExitCode {
    let arg = |i: usize| -> &str { args.get(i).map(String::as_str).unwrap_or("") };
    let addr: SocketAddr = match arg(1).parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nmi-bench worker: address {:?}: {e}", arg(1));
            return ExitCode::from(2);
        }
    };
    let num = |i: usize| arg(i).parse::<usize>().unwrap_or(1).max(1);
    let out = match arg(0) {
        "connect" => connect_loop(addr, num(2)),
        "load" => load(addr, num(2), Duration::from_secs(num(3) as u64), arg(4)),
        "latency" => latency(addr, num(2), arg(3)),
        other => {
            eprintln!("nmi-bench worker: unknown mode {other:?}");
            return ExitCode::from(2);
        }
    };
    println!("{out}");
    ExitCode::SUCCESS
}

/// Sets SO_LINGER {on, 0}: close sends RST, so neither side keeps a TIME_WAIT and tens of thousands of
/// connections from one source address never run out of ports.
fn linger0(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn connect_loop(addr: SocketAddr, n: usize) -> Value {
    let mut errors = 0u64;
    let mut first_error = None;
    let t = Instant::now();
    for _ in 0..n {
        match TcpStream::connect(addr) {
            Ok(s) => {
                linger0(&s);
                drop(s);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let elapsed = t.elapsed();
    json!({ "n": n, "elapsed_ns": elapsed.as_nanos() as u64, "errors": errors, "first_error": first_error })
}

/// One token request, `Connection: close`, read to EOF. Ok if the answer is a 200.
fn request(addr: SocketAddr, query: &str, buf: &mut Vec<u8>) -> Result<(), String> {
    let req = format!(
        "GET /metadata/identity/oauth2/token?api-version=2018-02-01&{query} HTTP/1.1\r\n\
         Host: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n"
    );
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    buf.clear();
    s.read_to_end(buf).map_err(|e| format!("read: {e}"))?;
    linger0(&s);
    if buf.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        let head = String::from_utf8_lossy(&buf[..buf.len().min(200)]).into_owned();
        Err(format!("answer: {head}"))
    }
}

fn load(addr: SocketAddr, threads: usize, dur: Duration, query: &str) -> Value {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let t = Instant::now();
    thread::scope(|s| {
        for _ in 0..threads {
            let (stop, ok, errors, first_error) = (&stop, &ok, &errors, &first_error);
            s.spawn(move || {
                let mut buf = Vec::with_capacity(8192);
                while !stop.load(Ordering::Relaxed) {
                    match request(addr, query, &mut buf) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            first_error.lock().expect("lock").get_or_insert(e);
                            errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }
        thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = t.elapsed();
    let first_error = first_error.lock().expect("lock").clone();
    json!({
        "ok": ok.load(Ordering::Relaxed),
        "errors": errors.load(Ordering::Relaxed),
        "elapsed_ns": elapsed.as_nanos() as u64,
        "first_error": first_error,
    })
}

/// `n` sequential requests; `{i}` in the query is replaced by the request's index (a distinct cache key each).
fn latency(addr: SocketAddr, n: usize, query: &str) -> Value {
    let mut lat = Vec::with_capacity(n);
    let mut errors = 0u64;
    let mut first_error = None;
    let mut buf = Vec::with_capacity(8192);
    for i in 0..n {
        let q = query.replace("{i}", &i.to_string());
        let t = Instant::now();
        match request(addr, &q, &mut buf) {
            Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e6),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    json!({ "lat_us": lat, "errors": errors, "first_error": first_error })
}
