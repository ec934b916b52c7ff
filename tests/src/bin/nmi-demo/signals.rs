//! Ctrl-C and SIGTERM: the demo stops where it is and still removes its topology.
//!
//! A signal sets a flag (all a handler may safely do); a watcher thread then kills every process in the topology,
//! which ends whatever the main thread waits for, and the main thread unwinds, dropping the topology. A handled
//! signal is reset to the default in exec'd children, so the agent and the emulators keep their own SIGINT/SIGTERM
//! behaviour.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::thread;
use std::time::Duration;

use nmi_agent_e2e::cgroup;
use signal_hook::consts::{SIGINT, SIGTERM};

static INTERRUPTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);
/// The live topology's cgroup subtree: what a signal empties so that the main thread's waits end.
static TOPOLOGY_CGROUP: Mutex<Option<PathBuf>> = Mutex::new(None);

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Installs the handlers and starts the watcher thread.
pub fn install() -> std::io::Result<()> {
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&INTERRUPTED))?;
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
    Ok(())
}

/// What a signal must empty from now on.
pub fn watch_topology(cgroup: PathBuf) {
    *TOPOLOGY_CGROUP.lock().unwrap_or_else(|e| e.into_inner()) = Some(cgroup);
}

/// The topology is gone: a late signal has nothing to kill.
pub fn forget_topology() {
    *TOPOLOGY_CGROUP.lock().unwrap_or_else(|e| e.into_inner()) = None;
}
