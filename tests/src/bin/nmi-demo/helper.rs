//! The demo's helper processes (the IMDS and Key Vault emulators): started, awaited until they say `ready`, and
//! stopped on drop.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::signals::interrupted;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A helper process in the topology (an emulator); killed and reaped on drop. The topology's cleanup would kill it
/// too (it lives in the topology's `outside` cgroup), but reaping it here keeps zombies out of `ps`.
pub struct Helper {
    child: Child,
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` and waits for it to print `ready` on stdout; its stderr goes to `log`.
pub fn start(what: &str, cmd: &mut Command, log: &Path) -> Result<Helper, String> {
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
