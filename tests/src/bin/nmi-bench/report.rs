//! The benchmark's outputs: the table on stdout, `target/bench/results.json`, and the statistics behind them.

use std::path::PathBuf;
use std::thread;

use serde_json::{Value, json};

/// The machine the numbers come from.
pub fn machine() -> Value {
    json!({
        "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

/// Writes `results` to [`out_path`].
pub fn write(results: &Value) {
    let path = out_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    std::fs::write(
        &path,
        serde_json::to_string_pretty(results).expect("serialize") + "\n",
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    println!("nmi-bench: wrote {}", path.display());
}

/// Failed connects and requests over all measurements.
pub fn errors(results: &Value) -> u64 {
    let errors_in = |v: &Value| v["errors"].as_u64().unwrap_or(0);
    errors_in(&results["connect"])
        + errors_in(&results["redirect"])
        + ["hit", "miss", "direct_emulator"]
            .iter()
            .map(|k| errors_in(&results["cache"][k]))
            .sum::<u64>()
}

pub fn print_table(r: &Value) {
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

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Nearest-rank percentile of sorted `s`.
pub fn pct(s: &[f64], p: f64) -> f64 {
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

#[cfg(test)]
mod tests;
