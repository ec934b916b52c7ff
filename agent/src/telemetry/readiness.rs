//! Readiness: the conditions `/readyz` waits for, the tasks that keep them current, and the `serving`/`ready` log
//! lines an operator watches for at start.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;

use super::metrics::Metrics;

/// The conditions `/readyz` waits for; each one names what is missing while it is false.
#[derive(Default)]
pub struct Readiness {
    pub programs_attached: AtomicBool,
    pub bindings_loaded: AtomicBool,
    pub upstream_reachable: AtomicBool,
}

impl Readiness {
    /// Whether the token service can answer callers: programs attached and bindings in place. IMDS being unreachable
    /// does not stop that (callers get IMDS-shaped errors), but it does keep the agent from being ready.
    pub fn serving(&self) -> bool {
        self.programs_attached.load(Ordering::Acquire)
            && self.bindings_loaded.load(Ordering::Acquire)
    }

    /// What is still missing; empty when ready.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.programs_attached.load(Ordering::Acquire) {
            missing.push("kernel programs not attached");
        }
        if !self.bindings_loaded.load(Ordering::Acquire) {
            missing.push("identity bindings not loaded or synced");
        }
        if !self.upstream_reachable.load(Ordering::Acquire) {
            missing.push("IMDS (--imds-url) not reachable");
        }
        missing
    }
}

/// Marks bindings loaded once `ready` says the binding source has them (Kubernetes: every reflector listed once), and
/// keeps the bindings gauge at the size of `bound`, the source's set of bound client ids.
pub fn track_bindings(
    ready: impl Fn() -> bool + Send + 'static,
    mut bound: watch::Receiver<Arc<BTreeSet<String>>>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
) {
    tokio::spawn(async move {
        loop {
            if ready() {
                readiness.bindings_loaded.store(true, Ordering::Release);
            }
            metrics
                .bindings_loaded
                .set(bound.borrow_and_update().len() as i64);
            tokio::select! {
                changed = bound.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(Duration::from_millis(200)), if !ready() => {},
            }
        }
    });
}

/// Logs `serving` once the token service can answer callers, and `ready` once everything `/readyz` checks is in
/// place; in between, says what is missing whenever that changes.
pub async fn announce_ready(readiness: Arc<Readiness>, listen: SocketAddrV4, health: SocketAddr) {
    let (mut serving, mut last_missing) = (false, Vec::new());
    loop {
        if !serving && readiness.serving() {
            serving = true;
            tracing::info!(listen = %listen, health = %health, "serving");
        }
        let missing = readiness.missing();
        if missing.is_empty() {
            tracing::info!(listen = %listen, health = %health, "ready");
            return;
        }
        if missing != last_missing {
            tracing::info!(missing = %missing.join("; "), "waiting to be ready");
            last_missing = missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How often `/readyz` re-checks that IMDS accepts connections; one TCP handshake, far below IMDS's rate limits.
const UPSTREAM_CHECK_EVERY: Duration = Duration::from_secs(10);
const UPSTREAM_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// An `--imds-url` the upstream check cannot connect to.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamUrlError {
    #[error("--imds-url {url}")]
    Invalid {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("--imds-url {url} has no host")]
    NoHost { url: String },
}

/// `host:port` of the IMDS URL, the address the upstream check connects to (port 80 unless given).
pub fn upstream_addr(imds_url: &str) -> Result<String, UpstreamUrlError> {
    let uri: http::Uri = imds_url
        .parse()
        .map_err(|source| UpstreamUrlError::Invalid {
            url: imds_url.to_owned(),
            source,
        })?;
    let host = uri.host().ok_or_else(|| UpstreamUrlError::NoHost {
        url: imds_url.to_owned(),
    })?;
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(80)))
}

/// Keeps `readiness.upstream_reachable` current with a TCP connect to the IMDS address.
pub fn watch_upstream(imds_url: &str, readiness: Arc<Readiness>) -> Result<(), UpstreamUrlError> {
    let addr = upstream_addr(imds_url)?;
    tokio::spawn(async move {
        let mut was = None;
        loop {
            let connect = tokio::net::TcpStream::connect(&addr);
            let result = match tokio::time::timeout(UPSTREAM_CHECK_TIMEOUT, connect).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {UPSTREAM_CHECK_TIMEOUT:?}")),
            };
            let reachable = result.is_ok();
            readiness
                .upstream_reachable
                .store(reachable, Ordering::Release);
            if was != Some(reachable) {
                match result {
                    Ok(()) => tracing::info!(imds = %addr, "IMDS reachable"),
                    Err(e) => {
                        tracing::warn!(imds = %addr, error = %e, "IMDS not reachable; callers get 503 until it is")
                    }
                }
                was = Some(reachable);
            }
            tokio::time::sleep(UPSTREAM_CHECK_EVERY).await;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_names_each_condition_until_it_holds() {
        let r = Readiness::default();
        assert_eq!(r.missing().len(), 3);
        assert!(!r.serving());
        r.programs_attached.store(true, Ordering::Release);
        r.bindings_loaded.store(true, Ordering::Release);
        assert!(r.serving(), "serving needs only programs and bindings");
        assert_eq!(r.missing(), vec!["IMDS (--imds-url) not reachable"]);
        r.upstream_reachable.store(true, Ordering::Release);
        assert!(r.missing().is_empty());
    }

    #[test]
    fn the_upstream_address_defaults_to_port_80_and_needs_a_host() {
        assert_eq!(
            upstream_addr("http://169.254.169.254").expect("addr"),
            "169.254.169.254:80"
        );
        assert_eq!(
            upstream_addr("http://127.0.0.1:8080").expect("addr"),
            "127.0.0.1:8080"
        );
        let err = upstream_addr("/no/host").expect_err("a URL without host was accepted");
        assert_eq!(err.to_string(), "--imds-url /no/host has no host");
    }

    #[tokio::test]
    async fn bindings_count_as_loaded_once_the_source_is_ready_and_the_gauge_follows_the_set() {
        let ready = Arc::new(AtomicBool::new(false));
        let (tx, rx) = watch::channel(Arc::new(BTreeSet::from(["a".to_owned()])));
        let (readiness, metrics) = (Arc::new(Readiness::default()), Arc::new(Metrics::new()));
        let flag = Arc::clone(&ready);
        track_bindings(
            move || flag.load(Ordering::Acquire),
            rx,
            Arc::clone(&readiness),
            Arc::clone(&metrics),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!readiness.bindings_loaded.load(Ordering::Acquire));
        assert_eq!(metrics.bindings_loaded.get(), 1);

        ready.store(true, Ordering::Release);
        tx.send_replace(Arc::new(BTreeSet::from(["a".to_owned(), "b".to_owned()])));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !(readiness.bindings_loaded.load(Ordering::Acquire)
            && metrics.bindings_loaded.get() == 2)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never marked loaded with 2 bindings"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
