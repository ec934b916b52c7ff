//! One attempt's report: filled in as the attempt goes, printed as one JSON line.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Instant;

use nmi_agent_e2e::probe::Attempt;

pub fn emit(a: &Attempt) {
    let line = serde_json::to_string(a).expect("serialize");
    // One write per line under the stdout lock, so concurrent attempts never interleave.
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

/// Runs `attempt` as a `mode` attempt at `addr`, timed; Err names the step that failed and why.
pub fn timed(
    mode: &str,
    addr: SocketAddr,
    attempt: impl FnOnce(&mut Attempt) -> Result<(), (&'static str, io::Error)>,
) -> Attempt {
    let mut a = Attempt {
        mode: mode.into(),
        pid: std::process::id(),
        addr: addr.to_string(),
        ..Attempt::default()
    };
    let start = Instant::now();
    match attempt(&mut a) {
        Ok(()) => a.ok = true,
        Err((stage, e)) => {
            a.ok = false;
            a.stage = Some(stage.into());
            a.error = Some(format!("{:?}", e.kind()));
            a.errno = e.raw_os_error();
        }
    }
    a.elapsed_us = start.elapsed().as_micros() as u64;
    a
}
