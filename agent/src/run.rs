//! `nmi-agent run`: wires the parts together in data-flow order. This is the edge where errors become messages.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context, bail};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    attest::{
        Attestor,
        cgroupfs::{self, CgroupResolver},
    },
    cli::{DEFAULT_PORT, RunArgs},
    datapath::{self, Datapath},
    server,
    telemetry::{self, health, metrics::Metrics},
};

/// Backlog of the token listener: a burst of pods starting at once must not see SYN drops (measured: a small backlog
/// stalls a connect+accept loop for seconds).
const LISTEN_BACKLOG: u32 = 4096;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(args))
}

/// Where to listen: `--listen`, else the node IP on the default port. Loopback is refused: inside a pod's network
/// namespace it is the pod itself, so a redirect there would never reach us.
fn listen_addr(args: &RunArgs) -> anyhow::Result<SocketAddrV4> {
    let addr = match (args.listen, args.node_ip) {
        (Some(addr), _) => addr,
        (None, Some(ip)) => SocketAddr::new(ip, DEFAULT_PORT),
        (None, None) => bail!("no token service address: pass --listen IP:PORT (or set NODE_IP in Kubernetes)"),
    };
    let SocketAddr::V4(v4) = addr else {
        bail!("--listen {addr}: IMDS is IPv4-only, so the redirect target must be an IPv4 address");
    };
    if v4.ip().is_loopback() || v4.ip().is_unspecified() || v4.port() == 0 {
        bail!("--listen {addr}: use the node's own IP and a fixed port; loopback or 0.0.0.0 is not reachable from pods");
    }
    Ok(v4)
}

fn bind(addr: SocketAddrV4) -> anyhow::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4().context("creating the token listener socket")?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr.into())
        .with_context(|| format!("binding the token service to {addr} (is that the node's IP, and is the port free?)"))?;
    Ok(socket.listen(LISTEN_BACKLOG)?)
}

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    let mount = cgroupfs::cgroup2_mount()?;
    let cgroup = match (&args.cgroup, &args.bindings) {
        (Some(dir), _) => dir.clone(),
        (None, Some(_)) => bail!("--cgroup is required in standalone mode (--bindings): name the subtree to intercept"),
        (None, None) => cgroupfs::kubepods(&mount)?,
    };
    let cgroup = cgroupfs::check_under_mount(&cgroup, &mount)?;
    let listen = listen_addr(&args)?;
    let own = cgroupfs::own_cgroup(&mount)?;
    let own_id = cgroupfs::cgroup_id(&own)?;

    // Listen before attaching, so the first redirected connect already finds us.
    let listener = bind(listen)?;
    let health_listener = health::bind(args.health_listen).await.map_err(anyhow::Error::msg)?;
    let readiness = Arc::new(health::Readiness::default());

    let opts = datapath::Options {
        cgroup: cgroup.clone(),
        pin_dir: args.pin_dir.clone(),
        redirect: listen,
        exempt: vec![own_id],
    };
    let datapath = tokio::task::spawn_blocking(move || Datapath::start(&opts))
        .await
        .context("datapath start panicked")??;
    let datapath = Arc::new(datapath);
    readiness.programs_attached.store(true, Ordering::Release);
    tracing::info!(
        cgroup = %cgroup.display(),
        redirect = %listen,
        exempt_cgroup = %own.display(),
        pin_dir = %args.pin_dir.display(),
        links = datapath.links().len(),
        "kernel programs attached"
    );

    let attestor = Arc::new(Attestor::new(Arc::clone(&datapath), Arc::new(CgroupResolver::new(cgroup))));
    readiness.bindings_loaded.store(true, Ordering::Release);

    let mut metrics = Metrics::new();
    metrics.register_datapath(Arc::clone(&datapath));
    let metrics = Arc::new(metrics);
    tokio::spawn(health::serve(health_listener, Arc::clone(&readiness), Arc::clone(&metrics)));

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_stop().await;
        let _ = stop_tx.send(true);
    });
    tracing::info!(listen = %listen, health = %args.health_listen, "ready");
    server::serve(listener, attestor, Arc::new(Placeholder), Arc::clone(&metrics), server::Limits::default(), stop_rx).await;
    tracing::info!("stopping; the kernel programs stay attached, so pods' IMDS calls fail closed until we are back");
    Ok(())
}

async fn wait_for_stop() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

struct Placeholder;

impl server::Handler for Placeholder {
    async fn handle(
        &self,
        _caller: Arc<crate::attest::Attestation>,
        _req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
        let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"error":"invalid_request","error_description":"Identity not found"}"#,
        )));
        *resp.status_mut() = http::StatusCode::BAD_REQUEST;
        resp
    }
}
