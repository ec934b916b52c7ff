//! The four measurements, one function each, numbered as in docs/benchmarks.md. Each prints its progress and
//! returns its part of `results.json`.

use std::net::SocketAddr;

use nmi_agent_e2e::Agent;
use nmi_agent_e2e::trap::IMDS;
use serde_json::{Value, json};

use crate::Opts;
use crate::report::{mean, median, pct};
use crate::setup::{Bench, HIT_QUERY, IDENTITY};

/// Measurement 1, the connect path: paired rounds of sequential connects with no agent (a) and with the agent attached (b).
pub fn connect_path(b: &Bench, o: &Opts) -> Value {
    println!(
        "nmi-bench: 1/4 connect path: {} rounds x 2 x {} connects to {}",
        o.rounds, o.connects, b.listen
    );
    // Warm-up (page cache, conntrack-free paths, CPU frequency).
    connect_run(b, o.connects / 4);
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
            b.assert_redirect(false);
            connect_run(b, o.connects)
        };
        let with_agent = || {
            let mut agent = b.start_agent();
            b.assert_redirect(true);
            let measured = connect_run(b, o.connects);
            agent.kill9();
            agent.uninstall();
            measured
        };
        let ((a, ea), (with, eb)) = if r % 2 == 0 {
            let a = no_agent();
            (a, with_agent())
        } else {
            let with = with_agent();
            (no_agent(), with)
        };
        connect_errors += ea + eb;
        println!(
            "  round {} ({}): a (no agent) {a:.2} µs, b (agent attached) {with:.2} µs, b/a {:.3}",
            r + 1,
            if r % 2 == 0 { "a, b" } else { "b, a" },
            with / a
        );
        a_us.push(a);
        b_us.push(with);
        ratios.push(with / a);
    }
    json!({
        "connects_per_arm_per_round": o.connects,
        "rounds": o.rounds,
        "a_no_agent_us": a_us,
        "b_agent_us": b_us,
        "ratios_b_over_a": ratios,
        "median_a_us": median(&a_us),
        "median_b_us": median(&b_us),
        "median_ratio": median(&ratios),
        "errors": connect_errors,
    })
}

/// Mean µs per connect of `n` sequential connects from the pod, and the number that failed.
fn connect_run(b: &Bench, n: usize) -> (f64, u64) {
    let v = b.worker(&["connect", &b.listen.to_string(), &n.to_string()]);
    let errors = v["errors"].as_u64().unwrap_or(0);
    let us = v["elapsed_ns"].as_f64().unwrap_or(0.0) / 1e3 / n.max(1) as f64;
    (us, errors)
}

/// The query that asks the emulator directly for the token the agent asks for.
fn direct_query() -> String {
    format!("{HIT_QUERY}&client_id={}", IDENTITY.1)
}

/// Measurement 2, the redirect path: requests per second through 169.254.169.254 (the agent, cache hit) vs straight to the
/// emulator, two rounds each.
pub fn redirect_path(b: &Bench, o: &Opts) -> Value {
    println!(
        "nmi-bench: 2/4 redirect path: {} threads x {} s, agent vs emulator direct",
        o.threads, o.secs
    );
    let agent_addr = SocketAddr::V4(IMDS);
    let direct_query = direct_query();
    let paths = [
        ("agent", agent_addr, HIT_QUERY),
        ("direct", b.emu_addr, direct_query.as_str()),
    ];
    // Prime the cache, and check both paths answer 200 before measuring.
    for (_, addr, q) in paths {
        let v = b.worker(&["latency", &addr.to_string(), "1", q]);
        assert_eq!(v["errors"], 0, "priming {addr}: {v}");
    }
    let mut via_agent = Vec::new();
    let mut direct = Vec::new();
    let mut load_errors = 0;
    for r in 0..2 {
        for (name, addr, q) in paths {
            let v = b.worker(&[
                "load",
                &addr.to_string(),
                &o.threads.to_string(),
                &o.secs.to_string(),
                q,
            ]);
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
    json!({
        "threads": o.threads,
        "secs_per_run": o.secs,
        "agent_rps": via_agent,
        "direct_rps": direct,
        "mean_agent_rps": agent_rps,
        "mean_direct_rps": direct_rps,
        "ratio_agent_over_direct": agent_rps / direct_rps,
        "errors": load_errors,
    })
}

/// Measurement 3, the token cache: per-request latency through the agent, cache hit vs cold miss, and straight to the emulator.
pub fn token_latency(b: &Bench, o: &Opts) -> Value {
    println!(
        "nmi-bench: 3/4 token latency through the agent: {} hits, {} cold misses",
        o.hits, o.misses
    );
    let agent_addr = IMDS.to_string();
    let latency = |addr: &str, n: usize, query: &str| {
        summary(&b.worker(&["latency", addr, &n.to_string(), query]))
    };
    json!({
        "hit": latency(&agent_addr, o.hits, HIT_QUERY),
        "miss": latency(&agent_addr, o.misses, "resource=https://bench-miss-{i}.example.net"),
        "direct_emulator": latency(&b.emu_addr.to_string(), o.hits, &direct_query()),
    })
}

/// Percentiles of a latency worker's answer.
fn summary(v: &Value) -> Value {
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
}

/// The agent's resident and peak memory, KiB.
pub struct Memory {
    rss: u64,
    hwm: u64,
}

impl Memory {
    pub fn of(agent: &Agent) -> Memory {
        let pid = agent.pid().expect("agent runs");
        Memory {
            rss: proc_status_kb(pid, "VmRSS"),
            hwm: proc_status_kb(pid, "VmHWM"),
        }
    }
}

/// Measurement 4, the agent's memory: after start (`at_start`) and now, after the load.
pub fn memory(at_start: Memory, agent: &Agent) -> Value {
    let now = Memory::of(agent);
    json!({
        "rss_after_start_kb": at_start.rss,
        "hwm_after_start_kb": at_start.hwm,
        "rss_after_load_kb": now.rss,
        "hwm_kb": now.hwm,
    })
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
