//! The process's signals, owned by one task: SIGTERM and SIGINT stop the agent; SIGHUP is handed to whoever the
//! wiring names (the bindings file reloads on it), and never ends the process.

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};

/// Listens for the agent's signals from now on. The returned receiver turns true on SIGTERM or SIGINT; `on_hangup`
/// runs on every SIGHUP. Call inside the runtime.
pub fn spawn(on_hangup: impl FnMut() + Send + 'static) -> watch::Receiver<bool> {
    // Registered here rather than in the task, so that a signal arriving before the task first runs is not lost (and
    // a SIGHUP then does not end the process, its default action).
    let stop = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => Some((term, int)),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM/SIGINT; only SIGKILL stops the agent");
            None
        }
    };
    // In Kubernetes mode there is nothing to reload, and a stray `kill -HUP` must not take the node's agent down.
    let hangup = signal(SignalKind::hangup())
        .inspect_err(
            |e| tracing::warn!(error = %e, "cannot listen for SIGHUP; it would end the agent"),
        )
        .ok();
    let (stopped_tx, stopped) = watch::channel(false);
    tokio::spawn(async move {
        match stop {
            Some((term, int)) => {
                wait(term, int, hangup, on_hangup).await;
                let _ = stopped_tx.send(true);
            }
            // Holding the sender: a dropped one would read as "stop" to the server.
            None => std::future::pending::<()>().await,
        }
    });
    stopped
}

/// Calls `on_hangup` on each SIGHUP until SIGTERM or SIGINT arrives.
async fn wait(
    mut term: Signal,
    mut int: Signal,
    mut hangup: Option<Signal>,
    mut on_hangup: impl FnMut(),
) {
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            Some(()) = async { hangup.as_mut()?.recv().await } => on_hangup(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use rustix::process::{Signal, getpid, kill_process};

    use super::*;

    fn raise(signal: Signal) {
        kill_process(getpid(), signal).expect("kill(2) on our own pid");
    }

    async fn stops(stopped: &mut watch::Receiver<bool>) -> bool {
        tokio::time::timeout(Duration::from_secs(5), stopped.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    // One test for all three signals: every listener in the process sees every signal, so tests sending them in
    // parallel would stop each other's tasks.
    #[tokio::test]
    async fn sighup_goes_to_the_hook_and_sigterm_or_sigint_stops() {
        let hangups = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hangups);
        let mut stopped = spawn(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while hangups.load(Ordering::SeqCst) == 0 {
            raise(Signal::HUP);
            assert!(
                tokio::time::Instant::now() < deadline,
                "SIGHUP never reached the hook"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!*stopped.borrow(), "SIGHUP stopped the agent");

        raise(Signal::TERM);
        assert!(stops(&mut stopped).await, "SIGTERM did not stop");

        let mut stopped = spawn(|| {});
        raise(Signal::INT);
        assert!(stops(&mut stopped).await, "SIGINT did not stop");
    }
}
