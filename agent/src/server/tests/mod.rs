use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{Empty, Full, StreamBody};
use hyper::{Request, Response, body::Incoming};
use nmi_agent_ebpf::abi::{ConnKey, ConnRecord};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Notify, Semaphore, watch},
    task::JoinHandle,
    time::{Instant, timeout},
};

use super::{Handler, Limits, connection::refuse_body, serve};
use crate::{
    attest::{Attestation, Attestor, cgroupfs::CgroupResolver},
    datapath::ConnLookup,
    telemetry::metrics::Metrics,
};

/// Answers each request once it is let through; says when a request has arrived.
struct Gate {
    arrived: Notify,
    open: Semaphore,
    body: Bytes,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            arrived: Notify::new(),
            open: Semaphore::new(0),
            body: Bytes::from_static(b"answered"),
        }
    }
}

impl Handler for Gate {
    async fn handle(
        &self,
        _caller: Arc<Attestation>,
        _req: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        self.arrived.notify_one();
        // The semaphore is never closed; a permit is one request let through.
        if let Ok(permit) = self.open.acquire().await {
            permit.forget();
        }
        Response::new(Full::new(self.body.clone()))
    }

    fn refusal(&self, status: StatusCode, reason: &'static str) -> Response<Full<Bytes>> {
        let mut refusal = Response::new(Full::new(Bytes::from_static(reason.as_bytes())));
        *refusal.status_mut() = status;
        refusal
    }
}

mod limits;

/// Every connection counts as redirected, from the cgroup whose id is the last byte of its source address (clients
/// on 127.0.0.2 and 127.0.0.3 are two callers).
struct AnyConnection;

impl ConnLookup for AnyConnection {
    fn lookup(&self, key: &ConnKey) -> Result<Option<ConnRecord>, String> {
        Ok(Some(ConnRecord {
            cgroup_id: u64::from(key.client.addr[3]),
            ..ConnRecord::default()
        }))
    }
}

struct Running {
    addr: SocketAddr,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    _cgroups: tempfile::TempDir,
}

async fn start(limits: Limits) -> Running {
    start_with(limits, Gate::default()).await
}

async fn start_with(limits: Limits, gate: Gate) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let cgroups = tempfile::tempdir().expect("tempdir");
    let attestor = Arc::new(Attestor::new(
        AnyConnection,
        Arc::new(CgroupResolver::new(cgroups.path().to_owned())),
    ));
    let gate = Arc::new(gate);
    let (stop, stopped) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let server = tokio::spawn(serve(
        listener,
        attestor,
        Arc::clone(&gate),
        Arc::clone(&metrics),
        limits,
        stopped,
    ));
    Running {
        addr,
        gate,
        metrics,
        stop,
        server,
        _cgroups: cgroups,
    }
}

async fn send_request(addr: SocketAddr) -> TcpStream {
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(b"GET /metadata/identity/oauth2/token HTTP/1.1\r\nhost: agent\r\n\r\n")
        .await
        .expect("send request");
    client
}

/// Everything the server sends until it closes the connection.
async fn read_until_closed(client: &mut TcpStream) -> String {
    let mut response = Vec::new();
    timeout(Duration::from_secs(5), client.read_to_end(&mut response))
        .await
        .expect("the server did not close the connection")
        .expect("read response");
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn an_in_flight_request_completes_after_shutdown_and_new_connects_are_refused() {
    let run = start(Limits::default()).await;
    let mut client = send_request(run.addr).await;
    timeout(Duration::from_secs(5), run.gate.arrived.notified())
        .await
        .expect("the request never reached the handler");

    run.stop.send_replace(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(run.addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            // Connected before the accept loop saw the stop (the backlog), or some other error: try again.
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "connects still accepted after shutdown"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(
        !run.server.is_finished(),
        "the server stopped before its request in flight was answered"
    );

    run.gate.open.add_permits(1);
    let response = read_until_closed(&mut client).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("answered"), "{response}");
    timeout(Duration::from_secs(5), run.server)
        .await
        .expect("the server did not return once drained")
        .expect("server task");
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_at_once_on_shutdown() {
    let run = start(Limits::default()).await;
    run.gate.open.add_permits(1);
    let mut client = send_request(run.addr).await;
    let mut first = [0u8; 12];
    client.read_exact(&mut first).await.expect("response");
    assert_eq!(&first, b"HTTP/1.1 200");

    run.stop.send_replace(true);
    timeout(Duration::from_secs(2), run.server)
        .await
        .expect("an idle connection held up the shutdown")
        .expect("server task");
    // The rest of the first response, then the end of the stream.
    assert!(read_until_closed(&mut client).await.ends_with("answered"));
}

#[tokio::test]
async fn a_request_that_outlasts_the_drain_time_does_not_hold_up_the_stop() {
    let drain = Duration::from_millis(300);
    let run = start(Limits {
        shutdown_drain: drain,
        ..Limits::default()
    })
    .await;
    let _client = send_request(run.addr).await;
    timeout(Duration::from_secs(5), run.gate.arrived.notified())
        .await
        .expect("the request never reached the handler");

    let stopped_at = Instant::now();
    run.stop.send_replace(true);
    timeout(Duration::from_secs(5), run.server)
        .await
        .expect("the server waited past its drain time")
        .expect("server task");
    assert!(
        stopped_at.elapsed() >= drain,
        "the server gave up on its request in flight before the drain time"
    );
}

fn request<B>(body: B) -> Request<B> {
    let mut req = Request::new(body);
    *req.uri_mut() = "/metadata/identity/oauth2/token?resource=x"
        .parse()
        .expect("uri");
    req
}

#[test]
fn gets_without_a_body_and_small_bodies_pass() {
    let gate = Gate::default();
    assert!(refuse_body(&request(Empty::<Bytes>::new()), 4096, &gate).is_none());
    assert!(refuse_body(&request(Full::new(Bytes::from_static(b"{}"))), 4096, &gate).is_none());
}

#[test]
fn large_and_chunked_bodies_are_refused_and_the_connection_closed() {
    let gate = Gate::default();
    let large = refuse_body(
        &request(Full::new(Bytes::from(vec![0u8; 4097]))),
        4096,
        &gate,
    )
    .expect("refused");
    assert_eq!(large.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(large.headers()[http::header::CONNECTION], "close");
    // A chunked body has no known length: it could go on forever.
    let chunks = futures_util::stream::iter(vec![Ok::<_, Infallible>(hyper::body::Frame::data(
        Bytes::new(),
    ))]);
    assert!(refuse_body(&request(StreamBody::new(chunks)), 4096, &gate).is_some());
}
