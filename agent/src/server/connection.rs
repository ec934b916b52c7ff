//! One accepted connection: attest it by the kernel's record (refuse it without one), take the caller's share of the
//! front door ([`CallerSlots`]), then serve its requests over HTTP/1.1 within the [`Limits`], watched by the shutdown
//! drain.
//!
//! Every way a client can keep a connection without using it is bounded: the request head must arrive within
//! `header_read_timeout`, a kept-alive connection may sit idle for `idle_timeout`, a response the client does not
//! read (pipelined requests whose answers fill the socket buffer) must drain within `write_timeout`, and after
//! `connection_lifetime` the next response closes the connection.

use std::{convert::Infallible, net::SocketAddr, pin::pin, sync::Arc, time::Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::Watcher,
};
use tokio::net::TcpStream;
use tokio_io_timeout::TimeoutStream;

use super::{
    Handler, Limits,
    fairness::{CallerSlot, CallerSlots},
};
use crate::{
    attest::{AttestError, Attestor},
    datapath::ConnLookup,
    telemetry::metrics::{Metrics, ReasonLabels},
};

/// What every connection of one server shares.
pub(super) struct Door<L, H> {
    pub attestor: Arc<Attestor<L>>,
    pub handler: Arc<H>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub shares: Arc<CallerSlots>,
}

pub(super) async fn serve<L: ConnLookup, H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    door: &Door<L, H>,
    drain: Watcher,
) {
    let Door {
        attestor,
        metrics,
        limits,
        shares: slots,
        ..
    } = door;
    let (handler, limits) = (Arc::clone(&door.handler), *limits);
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
    // Over its share, a caller's connection is still answered (so its SDK sees a retryable 429, not a hang), and
    // closed after that answer.
    let slot: Option<CallerSlot> = slots.try_acquire(caller.cgroup_id);
    if slot.is_none() {
        tracing::debug!(peer = %peer, cgroup_id = caller.cgroup_id, "caller over its connection share");
    }
    let started = Instant::now();
    let limited = slot.is_none();
    let limited_count = metrics
        .caller_limited
        .get_or_create(&ReasonLabels {
            reason: "connections",
        })
        .clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let (handler, caller) = (Arc::clone(&handler), Arc::clone(&caller));
        let limited_count = limited_count.clone();
        async move {
            if limited {
                limited_count.inc();
                return Ok::<_, Infallible>(too_many_connections(handler.as_ref()));
            }
            if let Some(refusal) = refuse_body(&req, limits.max_body_bytes, handler.as_ref()) {
                return Ok(refusal);
            }
            let mut response = handler.handle(caller, req).await;
            // Past its lifetime, the connection ends after this answer; the client opens a new one.
            if started.elapsed() >= limits.connection_lifetime {
                close_after(&mut response);
            }
            Ok(response)
        }
    });
    let mut io = TimeoutStream::new(stream);
    io.set_write_timeout(Some(limits.write_timeout));
    io.set_read_timeout(Some(limits.idle_timeout));
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // A caller over its share gets its 429 as soon as it asks, and no time to hold the connection otherwise.
        .header_read_timeout(if limited {
            OVER_SHARE_HEADER_TIMEOUT
        } else {
            limits.header_read_timeout
        })
        .max_buf_size(limits.max_header_bytes.max(8192))
        .serve_connection(TokioIo::new(Box::pin(io)), service);
    // Backstop for a client that keeps a connection busy past its lifetime (the close above ends the normal case):
    // late enough that a request begun just before the lifetime ends still completes.
    let hard_stop = limits.connection_lifetime + LONGEST_REQUEST;
    match tokio::time::timeout(hard_stop, pin!(drain.watch(connection))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let reason = if e.is_timeout() {
                Some("header_timeout")
            } else if io_timed_out(&e) {
                Some("io_timeout")
            } else {
                None
            };
            if let Some(reason) = reason {
                metrics
                    .connections_cut
                    .get_or_create(&ReasonLabels { reason })
                    .inc();
            }
            tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
        }
        Err(_) => {
            metrics
                .connections_cut
                .get_or_create(&ReasonLabels { reason: "lifetime" })
                .inc();
            tracing::debug!(peer = %peer, "connection cut at the end of its lifetime");
        }
    }
    drop(slot);
}

/// Longer than any one request can take: the caller's wait for its IMDS share and the fetch (each at most
/// `RetryPolicy::total`, 10 s), a pod's wait for the API server (1 s) and a service principal's Entra ID call (12 s).
/// `Limits::idle_timeout` must not be shorter, since a read may be pending while a request is served.
const LONGEST_REQUEST: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a connection over its caller's share has to send the request its 429 answers.
const OVER_SHARE_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether hyper's error comes from an I/O timeout of [`TimeoutStream`] (a read or write that did not progress).
fn io_timed_out(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::TimedOut;
        }
        source = s.source();
    }
    false
}

fn close_after(response: &mut Response<Full<Bytes>>) {
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
}

/// 429 with `Retry-After`, closing the connection: the caller holds its share of connections already.
fn too_many_connections(handler: &impl Handler) -> Response<Full<Bytes>> {
    let mut refusal = handler.refusal(
        http::StatusCode::TOO_MANY_REQUESTS,
        "too many connections from this caller; retry on one of them",
    );
    refusal.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    close_after(&mut refusal);
    refusal
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
