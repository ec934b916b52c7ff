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
    /// Largest request body accepted. IMDS requests are GETs without one; the body is never read, and a client must
    /// not be able to stream an endless one through a kept-alive connection.
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            max_connections: 4096,
            max_body_bytes: 4096,
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
    let service = service_fn(move |req: Request<Incoming>| {
        let (handler, caller) = (Arc::clone(&handler), Arc::clone(&caller));
        async move {
            if let Some(refusal) = refuse_body(&req, limits.max_body_bytes) {
                return Ok::<_, Infallible>(refusal);
            }
            Ok(handler.handle(caller, req).await)
        }
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

/// A 413 that closes the connection, for a request whose body is larger than `max` or of unknown length (chunked).
fn refuse_body<B: hyper::body::Body>(req: &Request<B>, max: u64) -> Option<Response<Full<Bytes>>> {
    let hint = req.body().size_hint();
    if hint.upper().is_some_and(|upper| upper <= max) {
        return None;
    }
    let mut refusal = crate::imds::response::error(
        http::StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request",
        "request bodies are not accepted",
    );
    refusal.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    Some(refusal)
}

#[cfg(test)]
mod tests {
    use http_body_util::{Empty, StreamBody};

    use super::*;

    fn request<B>(body: B) -> Request<B> {
        let mut req = Request::new(body);
        *req.uri_mut() = "/metadata/identity/oauth2/token?resource=x"
            .parse()
            .expect("uri");
        req
    }

    #[test]
    fn gets_without_a_body_and_small_bodies_pass() {
        assert!(refuse_body(&request(Empty::<Bytes>::new()), 4096).is_none());
        assert!(refuse_body(&request(Full::new(Bytes::from_static(b"{}"))), 4096).is_none());
    }

    #[test]
    fn large_and_chunked_bodies_are_refused_and_the_connection_closed() {
        let large =
            refuse_body(&request(Full::new(Bytes::from(vec![0u8; 4097]))), 4096).expect("refused");
        assert_eq!(large.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(large.headers()[http::header::CONNECTION], "close");
        // A chunked body has no known length: it could go on forever.
        let chunks = futures_util::stream::iter(vec![Ok::<_, Infallible>(
            hyper::body::Frame::data(Bytes::new()),
        )]);
        assert!(refuse_body(&request(StreamBody::new(chunks)), 4096).is_some());
    }
}
