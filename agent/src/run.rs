//! `nmi-agent run`: wires the parts together in data-flow order. This is the edge where errors become messages.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    attest::{
        Attestation, Attestor,
        cgroupfs::{self, CgroupResolver},
    },
    cli::{DEFAULT_PORT, RunArgs},
    datapath::{self, Datapath},
    identity::{
        BindingSource, NoSecretStore, Resolve,
        file::{self, FileSource},
        kube::{KubeConfig, KubeSecrets, KubeSource},
    },
    imds, server,
    telemetry::{self, health, metrics::Metrics},
};

/// Where bindings come from, decided (and its input checked) before anything else.
enum Mode {
    /// `--bindings FILE`, loaded.
    Standalone(Arc<FileSource>),
    /// The Kubernetes API, watching this node's pods.
    Kubernetes { node_name: String },
}

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
        (None, None) => {
            bail!("no token service address: pass --listen IP:PORT (or set NODE_IP in Kubernetes)")
        }
    };
    let SocketAddr::V4(v4) = addr else {
        bail!("--listen {addr}: IMDS is IPv4-only, so the redirect target must be an IPv4 address");
    };
    if v4.ip().is_loopback() || v4.ip().is_unspecified() || v4.port() == 0 {
        bail!(
            "--listen {addr}: use the node's own IP and a fixed port; loopback or 0.0.0.0 is not reachable from pods"
        );
    }
    Ok(v4)
}

fn bind(addr: SocketAddrV4) -> anyhow::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4().context("creating the token listener socket")?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr.into()).with_context(|| {
        format!(
            "binding the token service to {addr} (is that the node's IP, and is the port free?)"
        )
    })?;
    Ok(socket.listen(LISTEN_BACKLOG)?)
}

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    // A bad bindings file is the most likely operator error: report it (with its line) before anything else.
    let mode = match (&args.bindings, &args.node_name) {
        (Some(path), _) => Mode::Standalone(Arc::new(
            FileSource::load(path.clone()).map_err(|e| anyhow::anyhow!("{e}"))?,
        )),
        (None, Some(node_name)) => Mode::Kubernetes {
            node_name: node_name.clone(),
        },
        (None, None) => bail!(
            "Kubernetes mode needs --node-name (or NODE_NAME from the downward API); for standalone mode pass --bindings"
        ),
    };
    let mount = cgroupfs::cgroup2_mount()?;
    let cgroup = match (&args.cgroup, &mode) {
        (Some(dir), _) => dir.clone(),
        (None, Mode::Standalone(_)) => bail!(
            "--cgroup is required in standalone mode (--bindings): name the subtree to intercept"
        ),
        (None, Mode::Kubernetes { .. }) => cgroupfs::kubepods(&mount)?,
    };
    let cgroup = cgroupfs::check_under_mount(&cgroup, &mount)?;
    let listen = listen_addr(&args)?;
    let own = cgroupfs::own_cgroup(&mount, &cgroup)?;
    let own_id = cgroupfs::cgroup_id(&own)?;

    // Listen before attaching, so the first redirected connect already finds us.
    let listener = bind(listen)?;
    let health_listener = health::bind(args.health_listen)
        .await
        .map_err(anyhow::Error::msg)?;
    let readiness = Arc::new(health::Readiness::default());

    // Bindings before the kernel: a bad bindings file or an unreachable API configuration fails before anything is
    // attached.
    let config = imds::Config {
        imds_url: args.imds_url.clone(),
        forward_instance_metadata: args.forward_instance_metadata,
        authority_host: args.authority_host.clone(),
        ..imds::Config::default()
    };
    let (source, service) = match mode {
        Mode::Standalone(file) => {
            for warning in file.warnings() {
                tracing::warn!(%warning, "bindings file");
            }
            file.spawn_reloader(file::DEFAULT_POLL);
            let source = BindingSource::File(file);
            let service = imds::Service::new(config, source.clone(), NoSecretStore)?;
            (source, service)
        }
        Mode::Kubernetes { node_name } => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            let kube_config = KubeConfig {
                cluster_wide: args.cluster_wide_bindings,
                ..KubeConfig::new(node_name)
            };
            let source =
                BindingSource::Kube(Arc::new(KubeSource::start(client.clone(), kube_config)?));
            let service = if args.service_principals {
                imds::Service::new(config, source.clone(), KubeSecrets::new(client))?
            } else {
                imds::Service::new(config, source.clone(), NoSecretStore)?
            };
            (source, service)
        }
    };
    let opts = datapath::Options {
        cgroup: cgroup.clone(),
        pin_dir: args.pin_dir.clone(),
        redirect: listen,
        exempt: vec![own_id],
        // Without it (Linux < 5.14) the bind guard stays off; everything else works.
        netns_cookie: datapath::netns_cookie(&listener).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no network namespace cookie (needs Linux >= 5.14): binds to the agent's port are not guarded");
            0
        }),
    };
    let datapath = tokio::task::spawn_blocking(move || Datapath::start(&opts))
        .await
        .context("datapath start panicked")??;
    let mut datapath = datapath;
    if let Some(log) = datapath.take_kernel_log() {
        tokio::spawn(datapath::forward_kernel_log(log));
    }
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

    let attestor = Arc::new(Attestor::new(
        Arc::clone(&datapath),
        Arc::new(CgroupResolver::new(cgroup)),
    ));

    let mut metrics = Metrics::new();
    metrics.register_datapath(Arc::clone(&datapath));
    let metrics = Arc::new(metrics);
    tokio::spawn(health::serve(
        health_listener,
        Arc::clone(&readiness),
        Arc::clone(&metrics),
    ));

    let service = Arc::new(service.with_metrics(Arc::clone(&metrics)));
    service.spawn_refresher();
    service.spawn_binding_watch(source.bound_client_ids());
    track_bindings(source.clone(), Arc::clone(&readiness), Arc::clone(&metrics));

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_stop().await;
        let _ = stop_tx.send(true);
    });
    watch_upstream(&args.imds_url, Arc::clone(&readiness))?;
    tokio::spawn(announce_ready(
        Arc::clone(&readiness),
        listen,
        args.health_listen,
    ));
    server::serve(
        listener,
        attestor,
        service,
        metrics,
        server::Limits::default(),
        stop_rx,
    )
    .await;
    tracing::info!(
        "stopping; the kernel programs stay attached, so pods' IMDS calls fail closed until we are back"
    );
    Ok(())
}

/// Marks bindings loaded once the source has them (Kubernetes: every reflector listed once), and keeps the bindings
/// gauge current.
fn track_bindings(source: BindingSource, readiness: Arc<health::Readiness>, metrics: Arc<Metrics>) {
    let mut bound = source.bound_client_ids();
    tokio::spawn(async move {
        loop {
            if source.ready() {
                readiness.bindings_loaded.store(true, Ordering::Release);
            }
            metrics
                .bindings_loaded
                .set(bound.borrow_and_update().len() as i64);
            tokio::select! {
                changed = bound.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(Duration::from_millis(200)), if !source.ready() => {},
            }
        }
    });
}

/// Logs `serving` once the token service can answer callers, and `ready` once everything `/readyz` checks is in
/// place; in between, says what is missing whenever that changes.
async fn announce_ready(
    readiness: Arc<health::Readiness>,
    listen: SocketAddrV4,
    health: SocketAddr,
) {
    let (mut serving, mut last_missing) = (false, Vec::new());
    loop {
        if !serving && readiness.serving() {
            serving = true;
            tracing::info!(listen = %listen, health = %health, "serving");
        }
        let missing = readiness.missing();
        if missing.is_empty() {
            tracing::info!(listen = %listen, health = %health, "ready");
            return;
        }
        if missing != last_missing {
            tracing::info!(missing = %missing.join("; "), "waiting to be ready");
            last_missing = missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How often `/readyz` re-checks that IMDS accepts connections; one TCP handshake, far below IMDS's rate limits.
const UPSTREAM_CHECK_EVERY: Duration = Duration::from_secs(10);
const UPSTREAM_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Keeps `readiness.upstream_reachable` current with a TCP connect to the IMDS address.
fn watch_upstream(imds_url: &str, readiness: Arc<health::Readiness>) -> anyhow::Result<()> {
    let uri: http::Uri = imds_url
        .parse()
        .with_context(|| format!("--imds-url {imds_url}"))?;
    let host = uri
        .host()
        .with_context(|| format!("--imds-url {imds_url} has no host"))?
        .to_owned();
    let addr = format!("{host}:{}", uri.port_u16().unwrap_or(80));
    tokio::spawn(async move {
        let mut was = None;
        loop {
            let connect = tokio::net::TcpStream::connect(&addr);
            let result = match tokio::time::timeout(UPSTREAM_CHECK_TIMEOUT, connect).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {UPSTREAM_CHECK_TIMEOUT:?}")),
            };
            let reachable = result.is_ok();
            readiness
                .upstream_reachable
                .store(reachable, Ordering::Release);
            if was != Some(reachable) {
                match result {
                    Ok(()) => tracing::info!(imds = %addr, "IMDS reachable"),
                    Err(e) => {
                        tracing::warn!(imds = %addr, error = %e, "IMDS not reachable; callers get 503 until it is")
                    }
                }
                was = Some(reachable);
            }
            tokio::time::sleep(UPSTREAM_CHECK_EVERY).await;
        }
    });
    Ok(())
}

async fn wait_for_stop() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    // SIGHUP's default action ends the process. The bindings file reloads on it (its reloader listens too); in
    // Kubernetes mode there is nothing to reload, and a stray `kill -HUP` must not take the node's agent down.
    let mut hup = signal(SignalKind::hangup()).ok();
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            Some(_) = async { hup.as_mut()?.recv().await } => {
                tracing::info!("SIGHUP: bindings are reloaded in standalone mode; nothing else to do");
            }
        }
    }
}

impl<R: Resolve + Send + Sync + 'static> server::Handler for imds::Service<R> {
    async fn handle(
        &self,
        caller: Arc<Attestation>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
        imds::Service::handle(self, &caller, req).await
    }
}
