//! `/healthz`, `/readyz` and `/metrics` on the health address (loopback by default): the HTTP side only; what
//! `/readyz` checks is kept in [`super::readiness`].

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{metrics::Metrics, readiness::Readiness};

pub async fn serve(listener: TcpListener, readiness: Arc<Readiness>, metrics: Arc<Metrics>) {
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
        let (readiness, metrics) = (Arc::clone(&readiness), Arc::clone(&metrics));
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let answer = route(req.uri().path(), &readiness, metrics.as_ref());
                async move { Ok::<_, Infallible>(answer) }
            });
            // A probe sends its request at once; a client that does not must not hold a connection open.
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
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

/// Binds the health address, with a message that says which flag to change.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding the health address {addr}: {e} (change --health-listen)"))
}
