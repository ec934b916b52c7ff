//! The token service's front door: accept, attest by the kernel's record, then serve HTTP for attested callers only.
//! On shutdown it stops accepting and lets requests in flight finish, for a bounded time.
//!
//! - this file: the listener, the accept loop and the drain;
//! - `connection`: one connection, from attestation to its last response;
//! - `fairness`: each caller's share of the connections;
//! - `imds_handler`: the IMDS service as the [`Handler`] of attested requests.

mod connection;
mod fairness;
mod imds_handler;
#[cfg(test)]
mod tests;

use std::{
    future::Future,
    net::SocketAddrV4,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};

use crate::{
    attest::{Attestation, Attestor},
    datapath::ConnLookup,
    telemetry::metrics::Metrics,
};

/// Answers requests from attested callers.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(
        &self,
        caller: Arc<Attestation>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;

    /// The answer, in the handler's own format, to a request the server refuses before [`Handler::handle`] sees it;
    /// `reason` is for the caller. The server adds what the refusal needs on the wire (e.g. `Connection: close`).
    fn refusal(&self, status: StatusCode, reason: &'static str) -> Response<Full<Bytes>>;
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
    /// Connections one caller (one cgroup) may hold at once; more are answered 429 and closed. HTTP/1.1 serves one
    /// request per connection at a time, so this is also the caller's limit of requests in flight.
    pub max_connections_per_caller: usize,
    /// How long a kept-alive connection may wait for its next request (or a read may stall) before it is closed.
    pub idle_timeout: Duration,
    /// How long writing a response may stall (a client that does not read its answers) before the connection is cut.
    pub write_timeout: Duration,
    /// After this, the next response closes the connection.
    pub connection_lifetime: Duration,
    /// Largest request body accepted. IMDS requests are GETs without one; the body is never read, and a client must
    /// not be able to stream an endless one through a kept-alive connection.
    pub max_body_bytes: u64,
    /// On shutdown, how long requests in flight may take to finish before their connections are dropped. Below
    /// Kubernetes' default grace period (30 s), so the agent exits on its own rather than by SIGKILL.
    pub shutdown_drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            max_connections: 4096,
            max_connections_per_caller: 64,
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            connection_lifetime: Duration::from_secs(300),
            max_body_bytes: 4096,
            shutdown_drain: Duration::from_secs(10),
        }
    }
}

/// Backlog of the token listener: a burst of pods starting at once must not see SYN drops (measured: a small backlog
/// stalls a connect+accept loop for seconds).
const LISTEN_BACKLOG: u32 = 4096;

/// The token listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("creating the token listener socket")]
    Socket(#[source] std::io::Error),
    #[error("binding the token service to {addr} (is that the node's IP, and is the port free?)")]
    Bind {
        addr: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the token listener on {addr}")]
    Listen {
        addr: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the token service's address, with room for a burst of connects.
pub fn bind(addr: SocketAddrV4) -> Result<TcpListener, BindError> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(BindError::Socket)?;
    let listen_err = |source| BindError::Listen { addr, source };
    socket.set_reuseaddr(true).map_err(listen_err)?;
    socket
        .bind(addr.into())
        .map_err(|source| BindError::Bind { addr, source })?;
    socket.listen(LISTEN_BACKLOG).map_err(listen_err)
}

/// Serves until `shutdown` turns true (or its sender goes away), then stops accepting, closes the listener and waits
/// up to [`Limits::shutdown_drain`] for requests in flight to be answered.
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
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let door = Arc::new(connection::Door {
        attestor,
        handler,
        metrics,
        limits,
        shares: fairness::CallerSlots::new(limits.max_connections_per_caller),
    });
    loop {
        let next = async {
            let permit = Arc::clone(&slots).acquire_owned().await.ok()?;
            Some((permit, listener.accept().await))
        };
        let (permit, accepted) = tokio::select! {
            biased;
            () = stop_requested(&mut shutdown) => break,
            next = next => match next {
                Some(next) => next,
                None => break,
            },
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
        let door = Arc::clone(&door);
        // Taken here, not in the task: a connection still being attested counts as open for the drain.
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            connection::serve(stream, peer, &door, watcher).await;
            drop(permit);
        });
    }
    // New connects are refused from here on, instead of waiting in the backlog of a listener nobody accepts on.
    drop(listener);
    drain(graceful, limits.shutdown_drain).await;
}

/// Resolves once `shutdown` holds true or its sender is gone.
async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Tells every open connection to finish its request in flight and close, and waits for that up to `within`.
async fn drain(graceful: GracefulShutdown, within: Duration) {
    let open = graceful.count();
    if open == 0 {
        return;
    }
    tracing::info!(connections = open, "draining open connections");
    let started = Instant::now();
    match tokio::time::timeout(within, graceful.shutdown()).await {
        Ok(()) => tracing::info!(after = ?started.elapsed(), "open connections drained"),
        Err(_) => tracing::warn!(
            after = ?within,
            "requests still in flight after the drain time; their connections are dropped"
        ),
    }
}
