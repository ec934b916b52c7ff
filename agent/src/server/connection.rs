//! One accepted connection: attest it by the kernel's record (refuse it without one), then serve its requests over
//! HTTP/1.1 within the [`Limits`], watched by the shutdown drain.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::Watcher,
};
use tokio::net::TcpStream;

use super::{Handler, Limits};
use crate::{
    attest::{AttestError, Attestor},
    datapath::ConnLookup,
    telemetry::metrics::{Metrics, ReasonLabels},
};

pub(super) async fn serve<L: ConnLookup, H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    attestor: &Attestor<L>,
    handler: Arc<H>,
    metrics: &Metrics,
    limits: Limits,
    drain: Watcher,
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
            if let Some(refusal) = refuse_body(&req, limits.max_body_bytes, handler.as_ref()) {
                return Ok::<_, Infallible>(refusal);
            }
            Ok(handler.handle(caller, req).await)
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = drain.watch(connection).await {
        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
    }
}

/// A 413 that closes the connection, for a request whose body is larger than `max` or of unknown length (chunked).
pub(super) fn refuse_body<B: hyper::body::Body>(
    req: &Request<B>,
    max: u64,
    handler: &impl Handler,
) -> Option<Response<Full<Bytes>>> {
    let hint = req.body().size_hint();
    if hint.upper().is_some_and(|upper| upper <= max) {
        return None;
    }
    let mut refusal = handler.refusal(
        http::StatusCode::PAYLOAD_TOO_LARGE,
        "request bodies are not accepted",
    );
    refusal.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    Some(refusal)
}
