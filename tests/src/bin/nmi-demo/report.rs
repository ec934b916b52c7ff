//! What the demo prints: a line per setup step, the table of secret reads, the table of the agent's token audits,
//! and where to look next.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use serde_json::Value;

use crate::client::SecretRead;

/// One setup step, with the time since the demo started.
pub fn step(started: &Instant, message: &str) {
    println!("  [{:>5.1}s] {message}", started.elapsed().as_secs_f64());
}

/// `path` relative to the working directory, if it lies below it.
pub fn relative(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

/// The table of secret reads, one row per read.
pub fn print_table(reads: &[SecretRead]) {
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
    let widths = widths(header, &rows);
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
        println!("{}", line(row.each_ref().map(String::as_str)));
    }
    println!(
        "\n  The first read of a process includes Key Vault's 401 challenge and the token request through nmi-agent.\n  \
         `orders, again` is a new process in the orders pod: nmi-agent answers it from its token cache."
    );
}

/// The table of the agent's token audits, then the `problems` found in them.
pub fn print_audits(
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
    let widths = widths(header, &rows);
    let line = |cells: [&str; 6]| {
        let mut out = String::from(" ");
        for (cell, w) in cells.iter().zip(widths) {
            write!(out, " {cell:<w$}").ok();
        }
        out.trim_end().to_string()
    };
    println!("{}", line(header));
    for row in &rows {
        println!("{}", line(row.each_ref().map(String::as_str)));
    }
    for problem in problems {
        println!("  <-- UNEXPECTED: {problem}");
    }
}

pub fn print_next_steps() {
    println!(
        "\nWhere to look next:\n\
         \x20 README.md              what nmi-agent is and how to run it\n\
         \x20 docs/architecture.md   how a connect to 169.254.169.254 becomes an attested, per-pod token\n\
         \x20 docs/configuration.md  flags, the bindings file this demo used (tests/demo/bindings.yaml), Kubernetes mode\n\
         \x20 cargo xtask test       every check CI runs, including the end-to-end tests behind this demo"
    );
}

/// The width of each column: its widest cell, header included.
fn widths<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> [usize; N] {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    widths
}
