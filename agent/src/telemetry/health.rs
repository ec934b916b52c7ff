//! `/healthz`, `/readyz` and `/metrics` on the health address (loopback by default): the HTTP side only; what
//! `/readyz` checks is kept in [`super::readiness`].
//!
//! The health listener is never allowed to stop the token service: when its address is taken (another process on a
//! shared host network holds it) or cannot be bound, the failure is logged and counted, and binding is retried with
//! backoff for as long as it takes, while tokens are served.

use std::{collections::VecDeque, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};

use super::{metrics::Metrics, readiness::Readiness};

/// Serves the health address in the background. The first bind is tried before this returns, so that a free address
/// answers by the time the agent says it is serving; a taken one is retried in the background (see [`RETRY`]).
pub async fn start(addr: SocketAddr, readiness: Arc<Readiness>, metrics: Arc<Metrics>) {
    let first = TcpListener::bind(addr)
        .await
        .inspect_err(|e| bind_failed(addr, e, Duration::ZERO, &metrics))
        .ok();
    tokio::spawn(async move {
        let listener = match first {
            Some(listener) => listener,
            None => match bind_retrying(addr, &metrics, RETRY).await {
                Some(listener) => listener,
                None => return,
            },
        };
        serve(listener, readiness, metrics).await;
    });
}

/// Connections the health address serves at once: probes and a scraper need a handful. A new connection beyond it
/// closes the oldest one, so a flood from the host network can neither grow the agent's memory nor keep the kubelet's
/// probe out: a probe asks at once and is answered in microseconds, while the flood's idle connections are the oldest.
const MAX_CONNECTIONS: usize = 64;
/// A probe sends its request at once and its whole exchange takes milliseconds; these bound a client that stalls.
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve(listener: TcpListener, readiness: Arc<Readiness>, metrics: Arc<Metrics>) {
    let mut open: VecDeque<JoinHandle<()>> = VecDeque::with_capacity(MAX_CONNECTIONS);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning a worker.
                tracing::warn!(error = %e, "health listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        open.retain(|conn| !conn.is_finished());
        if open.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = open.pop_front() {
                oldest.abort();
            }
            metrics
                .caller_limited
                .get_or_create(&super::metrics::ReasonLabels {
                    reason: "health_connections",
                })
                .inc();
        }
        let (readiness, metrics) = (Arc::clone(&readiness), Arc::clone(&metrics));
        open.push_back(tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let answer = route(req.uri().path(), &readiness, metrics.as_ref());
                async move { Ok::<_, Infallible>(answer) }
            });
            // A client that does not send its request at once, or does not read the answer (`/metrics` is large),
            // must not hold a connection open.
            let mut io = tokio_io_timeout::TimeoutStream::new(stream);
            io.set_read_timeout(Some(IO_TIMEOUT));
            io.set_write_timeout(Some(IO_TIMEOUT));
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(Box::pin(io)), service)
                .await;
        }));
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

fn route(path: &str, readiness: &Readiness, metrics: &Metrics) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match readiness.missing().as_slice() {
            [] => text(StatusCode::OK, "text/plain", "ready\n".into()),
            missing => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {}\n", missing.join("; ")),
            ),
        },
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// How binding the health address is retried: soon at first (a restarted agent's predecessor may still be closing),
/// then every ten seconds or so, without end.
const RETRY: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_secs(10))
    .with_jitter()
    .without_max_times();

/// Binds the health address, retrying per `policy`; every failure is logged (with what to do) and counted in
/// `nmi_health_listener_bind_failures_total`. `None` only if `policy` gives up.
async fn bind_retrying(
    addr: SocketAddr,
    metrics: &Metrics,
    policy: ExponentialBuilder,
) -> Option<TcpListener> {
    let bound = (|| TcpListener::bind(addr))
        .retry(policy)
        .notify(|e, after| bind_failed(addr, e, after, metrics))
        .await;
    let failures = metrics.health_bind_failures.get();
    match bound {
        Ok(listener) if failures > 0 => {
            tracing::info!(health = %addr, failures, "health address bound after failed attempts");
            Some(listener)
        }
        Ok(listener) => Some(listener),
        Err(e) => {
            tracing::error!(health = %addr, error = %e, "gave up binding the health address; change --health-listen");
            None
        }
    }
}

/// Logs (with what to do) and counts one failed attempt to bind the health address.
fn bind_failed(addr: SocketAddr, error: &std::io::Error, retry_in: Duration, metrics: &Metrics) {
    metrics.health_bind_failures.inc();
    tracing::warn!(
        health = %addr,
        %error,
        ?retry_in,
        "cannot bind the health address; tokens are served meanwhile, but /healthz, /readyz and /metrics are \
         unavailable until it is bound: find what holds it (`ss -ltnp 'sport = :{}'`) or change --health-listen",
        addr.port()
    );
}

#[cfg(test)]
mod tests;
