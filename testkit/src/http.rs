//! What both fakes need to be HTTP servers: a listener, the accept loop that owns every connection, and JSON answers.

use std::{convert::Infallible, error::Error, future::Future, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{
    net::{TcpListener, TcpSocket},
    task::{JoinHandle, JoinSet},
};

/// The body type of every answer: a whole buffer, or a channel for a watch stream.
pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// Binds `addr` (port 0 picks one). A large backlog: connection storms from many pods must queue, not see SYN drops.
pub(crate) fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves HTTP/1.1 on `listener`, one `handle` call per request, until the returned task is aborted. The task owns
/// every connection, so aborting it ends them all. An `Err` from `handle` drops the connection without an answer.
pub(crate) fn serve<F, Fut, E>(
    name: &'static str,
    listener: TcpListener,
    handle: F,
) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, E>> + Send + 'static,
    E: Into<Box<dyn Error + Send + Sync>> + 'static,
{
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("{name}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handle = handle.clone();
            connections.spawn(async move {
                // Errors here are clients going away or connections dropped on purpose: nothing to do.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(handle))
                    .await;
            });
            // Reap finished connections so the set does not grow without bound.
            while connections.try_join_next().is_some() {}
        }
    })
}

/// `body` as JSON with `status` and the given content type.
pub(crate) fn json(status: StatusCode, content_type: &'static str, body: &Value) -> Response<Body> {
    text(status, content_type, body.to_string())
}

/// `body` as is, with `status` and the given content type.
pub(crate) fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}
