//! Reading the agent's JSON log: its lines, the audit records the tests check, and the tail for failure messages.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use nmi_testkit::wait::poll;
use serde::Deserialize;
use serde_json::Value;

use super::Agent;

/// One audit record: the agent's account of one accepted connection.
#[derive(Clone, Debug, Deserialize)]
pub struct Audit {
    /// The connection's remote end as the agent saw it: the caller's `local` address.
    pub peer: SocketAddr,
    /// `attested` or `refused`.
    pub verdict: String,
    /// For attested: cgroup path relative to the agent's `--cgroup` dir, with a leading slash (`/pod-a`).
    pub cgroup: Option<String>,
    pub cgroup_id: Option<u64>,
    pub pid: Option<u32>,
    /// For refused: why.
    pub reason: Option<String>,
}

impl Agent {
    fn log_text(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether a line written after byte `from` of the log has this `message`.
    pub(super) fn logged_since(&self, from: usize, message: &str) -> bool {
        self.log_text()
            .get(from..)
            .unwrap_or("")
            .lines()
            .filter_map(parse_line)
            .any(|v| v["message"] == message)
    }

    /// Every JSON line of the log so far, with tracing's `fields` object merged into the top level (so the
    /// contract's top-level fields are found whether or not the subscriber flattens events).
    pub fn logs(&self) -> Vec<Value> {
        self.log_text().lines().filter_map(parse_line).collect()
    }

    /// All audit records so far. A line that claims to be an audit record but does not fit the contract panics:
    /// that is a contract violation, not noise.
    pub fn audits(&self) -> Vec<Audit> {
        self.logs()
            .into_iter()
            .filter(|v| v["target"] == "audit" && v["event"] == "connection")
            .map(|v| {
                let mut a: Audit = serde_json::from_value(v.clone())
                    .unwrap_or_else(|e| panic!("audit line {v} breaks the contract: {e}"));
                // An agent listening dual-stack would report v4 peers as v4-mapped v6; callers compare with v4.
                if let SocketAddr::V6(v6) = a.peer {
                    let ip = v6
                        .ip()
                        .to_ipv4_mapped()
                        .map_or(IpAddr::V6(*v6.ip()), IpAddr::V4);
                    a.peer = SocketAddr::new(ip, v6.port());
                }
                a
            })
            .collect()
    }

    /// Every token-decision audit record so far (`target: audit`, `event: token`), as logged.
    pub fn token_audits(&self) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|v| v["target"] == "audit" && v["event"] == "token")
            .collect()
    }

    /// Waits until at least `n` audit records exist (the agent may log after the caller already saw EOF) and returns
    /// them all; returns what there is after `timeout`.
    pub fn wait_audits(&self, n: usize, timeout: Duration) -> Vec<Audit> {
        poll(timeout, Duration::from_millis(50), || {
            Some(self.audits()).filter(|all| all.len() >= n)
        })
        .unwrap_or_else(|| self.audits())
    }

    /// The audit record of the connection whose caller-side address was `local`; panics with the log tail if none
    /// appears within 5 s.
    pub fn audit_for(&self, local: SocketAddr) -> Audit {
        poll(Duration::from_secs(5), Duration::from_millis(50), || {
            self.audits().into_iter().find(|a| a.peer == local)
        })
        .unwrap_or_else(|| panic!("no audit record with peer {local}; {}", self.describe()))
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Log location and tail, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "agent log {}, last lines:\n{}",
            self.log_path.display(),
            self.log_tail(40)
        )
    }
}

/// A JSON log line with `fields` flattened into the top level; None for non-JSON lines (panic messages, etc.).
fn parse_line(line: &str) -> Option<Value> {
    let mut v: Value = serde_json::from_str(line.trim()).ok()?;
    let obj = v.as_object_mut()?;
    if let Some(Value::Object(fields)) = obj.remove("fields") {
        for (k, val) in fields {
            obj.entry(k).or_insert(val);
        }
    }
    Some(v)
}

#[cfg(test)]
mod tests;
