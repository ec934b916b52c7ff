//! The HTTP front door as a whole: arbitrary bytes written on an attested connection to `server::serve`, in front of
//! the real IMDS service (fake upstream and token source), must end in an answer or a close within a bound, never in
//! a panic or a task that keeps the caller's connection slot. Whatever the bytes say, IMDS is only ever asked for an
//! allowed path with nothing but the `Metadata` header, and only bound identities get tokens.
//!
//! The first byte picks the caller's binding (one identity, two identities, node exception); the rest goes on the
//! wire, then the client half-closes and reads until the server closes.

use std::{
    net::SocketAddr,
    panic,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, StatusCode};
use nmi_agent::{
    attest::{Attestation, Attestor, cgroupfs::CgroupResolver},
    datapath::ConnLookup,
    identity::{Binding, Identity, IdentityKind, Resolve, Workload},
    imds::{
        self,
        token::{
            FetchError, Token, TokenSource, TransportError, Upstream, UpstreamResponse, unix_now,
        },
    },
    server::{Limits, serve},
    telemetry::metrics::Metrics,
};
use nmi_agent_ebpf::abi::{ConnKey, ConnRecord};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
    sync::watch,
    time::{Instant, sleep, timeout},
};

use crate::path::is_allowed_upstream;

/// The server's own limits, short so that every way to hold a connection ends well inside [`BOUND`].
const LIMITS: Limits = Limits {
    header_read_timeout: Duration::from_millis(500),
    max_header_bytes: 16 * 1024,
    max_connections: 64,
    // One: a connection task that outlives its connection makes the next connection's answer a 429.
    max_connections_per_caller: 1,
    idle_timeout: Duration::from_millis(500),
    write_timeout: Duration::from_millis(500),
    connection_lifetime: Duration::from_secs(1),
    max_body_bytes: 4096,
    shutdown_drain: Duration::from_secs(1),
};

/// Longest an exchange may take: well over the server's longest own limit (lifetime + write + header timeouts, 2 s),
/// so that a loaded machine does not read as a hang.
const BOUND: Duration = Duration::from_secs(10);

const CLIENT_IDS: [&str; 2] = [
    "11111111-1111-4111-8111-111111111111",
    "22222222-2222-4222-8222-222222222222",
];

/// A valid request, answered 200 once the caller's slot is free again.
const PROBE: &[u8] =
    b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: fuzz\r\nMetadata: true\r\nConnection: close\r\n\r\n";

/// Set by the panic hook: a panic in a server task is swallowed by Tokio, but is a bug all the same.
static PANICKED: AtomicBool = AtomicBool::new(false);

struct FrontDoor {
    runtime: Runtime,
    /// One server per binding mode.
    servers: Vec<SocketAddr>,
    /// Held so that the servers run for the life of the process.
    _stops: Vec<watch::Sender<bool>>,
    _cgroups: tempfile::TempDir,
}

pub fn check(data: &[u8]) {
    let door = front_door();
    let Some((mode, wire)) = data.split_first() else {
        return;
    };
    let addr = door.servers[usize::from(*mode) % door.servers.len()];
    door.runtime.block_on(async {
        let answer = timeout(BOUND, exchange(addr, wire))
            .await
            .unwrap_or_else(|_| panic!("no answer and no close within {BOUND:?}"));
        assert!(
            answer.is_empty()
                || answer.starts_with(b"HTTP/1.1 ")
                || answer.starts_with(b"HTTP/1.0 "),
            "not an HTTP answer: {:?}",
            String::from_utf8_lossy(&answer)
        );
        assert_slot_freed(addr).await;
    });
    assert!(!PANICKED.load(Ordering::SeqCst), "a server task panicked");
}

/// Writes `wire`, half-closes, and reads until the server closes; a reset counts as a close.
async fn exchange(addr: SocketAddr, wire: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the server");
    let (mut read, mut write) = stream.split();
    let send = async {
        // The server may answer and close before it has read everything: a failed write is that close.
        if write.write_all(wire).await.is_ok() {
            let _ = write.shutdown().await;
        }
    };
    let mut answer = Vec::new();
    let receive = read.read_to_end(&mut answer);
    let ((), _closed_or_reset) = tokio::join!(send, receive);
    answer
}

/// The connection's task is gone once its slot is free: a valid request is answered 200, not 429, within the bound.
async fn assert_slot_freed(addr: SocketAddr) {
    let deadline = Instant::now() + BOUND;
    loop {
        let answer = exchange(addr, PROBE).await;
        if answer.starts_with(b"HTTP/1.1 200") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the caller's slot was not freed: {:?}",
            String::from_utf8_lossy(&answer)
        );
        sleep(Duration::from_millis(1)).await;
    }
}

fn front_door() -> &'static FrontDoor {
    static DOOR: OnceLock<FrontDoor> = OnceLock::new();
    DOOR.get_or_init(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a Tokio runtime");
        let cgroups = tempfile::tempdir().expect("a temporary cgroup root");
        let identities: Vec<Arc<Identity>> = CLIENT_IDS.iter().map(|id| identity(id)).collect();
        let modes = [
            Binding::Bound {
                workload: Workload::default(),
                identities: identities[..1].to_vec(),
            },
            Binding::Bound {
                workload: Workload::default(),
                identities,
            },
            Binding::NodeException {
                workload: Workload::default(),
            },
        ];
        let (servers, stops) = modes
            .into_iter()
            .map(|binding| runtime.block_on(start(binding, cgroups.path())))
            .unzip();
        FrontDoor {
            runtime,
            servers,
            _stops: stops,
            _cgroups: cgroups,
        }
    })
}

/// A server whose callers all have `binding`; it runs until the returned sender says stop or is dropped.
async fn start(binding: Binding, cgroups: &std::path::Path) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let attestor = Arc::new(Attestor::new(
        EveryConnection,
        Arc::new(CgroupResolver::new(cgroups.to_owned())),
    ));
    let service = imds::Service::with_parts(
        imds::Config::default(),
        Fixed(binding),
        Arc::new(CheckedUpstream),
        Arc::new(BoundTokens),
    );
    let metrics = Arc::new(Metrics::new());
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve(
        listener,
        attestor,
        Arc::new(service),
        metrics,
        LIMITS,
        stopped,
    ));
    (addr, stop)
}

fn identity(client_id: &str) -> Arc<Identity> {
    Arc::new(Identity {
        name: format!("id-{client_id}"),
        namespace: None,
        client_id: client_id.to_owned(),
        resource_id: Some(format!(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{client_id}"
        )),
        object_id: Some(client_id.replace('1', "a").replace('2', "b")),
        kind: IdentityKind::UserAssigned,
    })
}

/// The kernel's record says every connection was redirected, all from one caller (cgroup 1).
struct EveryConnection;

impl ConnLookup for EveryConnection {
    fn lookup(&self, _key: &ConnKey) -> Result<Option<ConnRecord>, String> {
        Ok(Some(ConnRecord {
            cgroup_id: 1,
            ..ConnRecord::default()
        }))
    }
}

struct Fixed(Binding);

impl Resolve for Fixed {
    fn resolve(&self, _caller: &Attestation) -> impl Future<Output = Binding> + Send {
        std::future::ready(self.0.clone())
    }
}

/// IMDS as the agent forwards to it: only allowed paths, only the `Metadata` header, and no bytes that could split
/// or retarget the request.
struct CheckedUpstream;

impl Upstream for CheckedUpstream {
    fn get<'a>(
        &'a self,
        path_and_query: &'a str,
        headers: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<UpstreamResponse, TransportError>> {
        let path = path_and_query
            .split_once('?')
            .map_or(path_and_query, |(p, _)| p);
        assert!(
            is_allowed_upstream(path) || path == "/metadata/identity/oauth2/token",
            "forwarded to IMDS: {path_and_query:?}"
        );
        assert!(
            !path_and_query
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'#'),
            "forwarded a target that is not one URI: {path_and_query:?}"
        );
        assert!(
            headers.keys().all(|name| name == "metadata"),
            "forwarded headers {headers:?}"
        );
        Box::pin(async {
            Ok(UpstreamResponse {
                status: StatusCode::OK,
                content_type: Some(HeaderValue::from_static("application/json")),
                retry_after: None,
                body: Bytes::from_static(b"{}"),
            })
        })
    }
}

/// Issues a token to the identities of [`CLIENT_IDS`] only.
struct BoundTokens;

impl TokenSource for BoundTokens {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, FetchError>> {
        assert!(
            CLIENT_IDS.contains(&identity.client_id.as_str()),
            "a token was fetched for {identity:?}"
        );
        let now = unix_now();
        let token = Token {
            access_token: format!("token-{}-{}", identity.client_id, resource.len()),
            client_id: identity.client_id.clone(),
            expires_on: now + 3600,
            not_before: now,
            ext_expires_on: now + 7200,
            token_type: "Bearer".to_owned(),
        };
        Box::pin(async move { Ok(token) })
    }
}
