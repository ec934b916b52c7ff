//! The token service's front door: accept, attest by the kernel's record, then serve HTTP for attested callers only.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};

use crate::{
    attest::{AttestError, Attestation, Attestor},
    datapath::ConnLookup,
    telemetry::metrics::{Metrics, ReasonLabels},
};

/// Answers one request from an attested caller.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        caller: Arc<Attestation>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Bounds that keep a slow or malformed client from tying up the service.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time allowed for a request's headers to arrive, from the connection's start or the previous response.
    pub header_read_timeout: Duration,
    /// Largest request head (request line plus headers) accepted.
    pub max_header_bytes: usize,
    /// Connections served at once; further accepts wait for a slot.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            max_connections: 4096,
        }
    }
}

/// Serves until `shutdown` turns true.
pub async fn serve<L, H>(
    listener: TcpListener,
    attestor: Arc<Attestor<L>>,
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) where
    L: ConnLookup + Send + Sync + 'static,
    H: Handler,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (attestor, handler, metrics) = (
            Arc::clone(&attestor),
            Arc::clone(&handler),
            Arc::clone(&metrics),
        );
        tokio::spawn(async move {
            connection(stream, peer, &attestor, handler, &metrics, limits).await;
            drop(permit);
        });
    }
}

async fn connection<L: ConnLookup, H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    attestor: &Attestor<L>,
    handler: Arc<H>,
    metrics: &Metrics,
    limits: Limits,
) {
    let attested = match stream.local_addr() {
        Ok(local) => attestor.attest(peer, local),
        Err(e) => Err(AttestError::Socket(e.to_string())),
    };
    let caller = match attested {
        Ok(caller) => Arc::new(caller),
        Err(e) => {
            metrics
                .attestation_failures
                .get_or_create(&ReasonLabels { reason: e.kind() })
                .inc();
            tracing::warn!(target: "audit", event = "connection", peer = %peer, verdict = "refused", reason = %e);
            return;
        }
    };
    tracing::info!(
        target: "audit",
        event = "connection",
        peer = %peer,
        verdict = "attested",
        cgroup = %caller.cgroup.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "<gone>".into()),
        cgroup_id = caller.cgroup_id,
        pid = caller.pid,
    );
    let service = service_fn(move |req| {
        let (handler, caller) = (Arc::clone(&handler), Arc::clone(&caller));
        async move { Ok::<_, Infallible>(handler.handle(caller, req).await) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
    }
}
