//! `nmi-agent run`: wires the parts together in data-flow order. This is the edge where errors become messages.

mod refusals;
mod signals;
pub mod startup_taint;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context, bail};

use crate::{
    attest::{
        Attestor,
        cgroupfs::{self, CgroupResolver},
    },
    cli::RunArgs,
    datapath::{self, Datapath},
    identity::{
        BindingSource, NoSecretStore,
        file::{self, FileSource},
        kube::{KubeConfig, KubeSecrets, KubeSource},
    },
    imds, server,
    telemetry::{
        self, health,
        metrics::Metrics,
        readiness::{self, Readiness},
    },
};

/// Where bindings come from, decided (and its input checked) before anything else.
enum Mode {
    /// `--bindings FILE`, loaded.
    Standalone(Arc<FileSource>),
    /// The Kubernetes API, watching this node's pods.
    Kubernetes { node_name: String },
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(args))
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
    let cgroup = match (&args.intercept.cgroup, &mode) {
        (Some(dir), _) => dir.clone(),
        (None, Mode::Standalone(_)) => bail!(
            "--cgroup is required in standalone mode (--bindings): name the subtree to intercept"
        ),
        (None, Mode::Kubernetes { .. }) => cgroupfs::kubepods(&mount)?,
    };
    let cgroup = cgroupfs::check_under_mount(&cgroup, &mount)?;
    let listen = args.intercept.listen_addr()?;
    let own = cgroupfs::own_cgroup(&mount, &cgroup)?;
    let own_id = cgroupfs::cgroup_id(&own)?;

    // Listen before attaching, so the first redirected connect already finds us.
    // The health address is bound later and retried while it is taken: it must never stop the token service.
    // A restarted agent runs in a new cgroup, and the pinned programs' bind guard lets only exempt cgroups take the
    // agent's port: exempt ours first.
    let pin_dir = args.intercept.pin_dir.clone();
    let agents = CgroupResolver::new(cgroup.clone());
    tokio::task::spawn_blocking(move || {
        datapath::exempt_in_pinned(&pin_dir, own_id, |id| agents.path_of(id).is_some())
    })
    .await
    .context("exempting our cgroup panicked")??;
    let listener = server::bind(listen)?;
    let readiness = Arc::new(Readiness::default());

    // Bindings before the kernel: a bad bindings file or an unreachable API configuration fails before anything is
    // attached.
    let config = imds::Config {
        imds_url: args.imds_url.clone(),
        max_upstream_per_caller: usize::from(args.max_upstream_per_caller),
        forward_instance_metadata: args.forward_instance_metadata,
        authority_host: args.authority_host.clone(),
        ..imds::Config::default()
    };
    // Kubernetes mode: the client and node the startup taint is removed from once the agent serves.
    let mut untaint: Option<(kube::Client, String)> = None;
    let (source, service, on_hangup): (_, _, Box<dyn FnMut() + Send>) = match mode {
        Mode::Standalone(file) => {
            for warning in file.warnings() {
                tracing::warn!(%warning, "bindings file");
            }
            file.spawn_reloader(file::DEFAULT_POLL);
            let source = BindingSource::File(Arc::clone(&file));
            let service = imds::Service::new(config, source.clone(), NoSecretStore)?;
            (source, service, Box::new(reload_on_hangup(file)))
        }
        Mode::Kubernetes { node_name } => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            if !args.startup_taint.is_empty() {
                untaint = Some((client.clone(), node_name.clone()));
            }
            let kube_config = KubeConfig {
                cluster_wide: args.cluster_wide_bindings,
                source_check: args.check_source_address,
                node_ips: args
                    .intercept
                    .node_ip
                    .into_iter()
                    .chain([IpAddr::V4(*listen.ip())])
                    .collect(),
                ..KubeConfig::new(node_name)
            };
            let source =
                BindingSource::Kube(Arc::new(KubeSource::start(client.clone(), kube_config)?));
            let service = if args.service_principals {
                imds::Service::new(config, source.clone(), KubeSecrets::new(client))?
            } else {
                imds::Service::new(config, source.clone(), NoSecretStore)?
            };
            let ignore = || tracing::info!("SIGHUP: nothing to reload in Kubernetes mode");
            (source, service, Box::new(ignore))
        }
    };
    let opts = datapath::Options {
        cgroup: cgroup.clone(),
        pin_dir: args.intercept.pin_dir.clone(),
        redirect: listen,
        exempt: vec![own_id],
        // Without it (Linux < 5.14) the bind guard stays off; everything else works.
        netns_cookie: datapath::netns_cookie(&listener).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no network namespace cookie (needs Linux >= 5.14): binds to the agent's port are not guarded");
            0
        }),
        health: match args.health_listen {
            SocketAddr::V4(health) => Some(health),
            SocketAddr::V6(health) => {
                tracing::warn!(%health, "an IPv6 --health-listen is not guarded: a hostNetwork pod could hold it while the agent restarts; prefer an IPv4 address");
                None
            }
        },
        imds_device: args.intercept.imds_device.clone(),
        max_sockets_per_cgroup: args.intercept.max_sockets_per_cgroup,
    };
    let mut datapath = tokio::task::spawn_blocking(move || Datapath::start(&opts))
        .await
        .context("datapath start panicked")??;
    if let Some(log) = datapath.take_kernel_log() {
        tokio::spawn(datapath::forward_kernel_log(log));
    }
    let datapath = Arc::new(datapath);
    readiness.programs_attached.store(true, Ordering::Release);
    tracing::info!(
        cgroup = %cgroup.display(),
        redirect = %listen,
        exempt_cgroup = %own.display(),
        pin_dir = %args.intercept.pin_dir.display(),
        links = datapath.links().len(),
        "kernel programs attached"
    );
    match datapath.forward_guard() {
        datapath::ForwardGuard::Tcx { device } => {
            tracing::info!(%device, "forwarding guard on the IMDS device (TCX link)")
        }
        datapath::ForwardGuard::Filter { device } => {
            tracing::info!(%device, "forwarding guard on the IMDS device (clsact filter)")
        }
        datapath::ForwardGuard::Nowhere(why) => {
            tracing::warn!(reason = why, "no forwarding guard")
        }
    }

    let cgroups = Arc::new(CgroupResolver::new(cgroup));
    refusals::spawn(Arc::clone(&datapath), Arc::clone(&cgroups));
    let attestor = Arc::new(Attestor::new(Arc::clone(&datapath), cgroups));

    let mut metrics = Metrics::new();
    metrics.register_kernel(datapath);
    let metrics = Arc::new(metrics);
    health::start(
        args.health_listen,
        Arc::clone(&readiness),
        Arc::clone(&metrics),
    )
    .await;

    let service = Arc::new(service.with_metrics(Arc::clone(&metrics)));
    service.spawn_refresher();
    service.spawn_binding_watch(source.bound_client_ids());
    let bound = source.bound_client_ids();
    readiness::track_bindings(
        move || source.ready(),
        bound,
        Arc::clone(&readiness),
        Arc::clone(&metrics),
    );

    let stop = signals::spawn(on_hangup);
    readiness::watch_upstream(&args.imds_url, Arc::clone(&readiness))?;
    if let Some((client, node)) = untaint {
        tokio::spawn(startup_taint::remove_when_serving(
            client,
            node,
            args.startup_taint.clone(),
            Arc::clone(&readiness),
        ));
    }
    tokio::spawn(readiness::announce_ready(
        Arc::clone(&readiness),
        listen,
        args.health_listen,
    ));
    server::serve(
        listener,
        attestor,
        service,
        metrics,
        server::Limits {
            max_connections_per_caller: usize::from(args.max_connections_per_caller),
            ..server::Limits::default()
        },
        stop,
    )
    .await;
    tracing::info!(
        "stopping; the kernel programs stay attached, so pods' IMDS calls fail closed until we are back"
    );
    Ok(())
}

/// What SIGHUP does in standalone mode: read the bindings file again (a bad one is logged and the old table stays).
fn reload_on_hangup(file: Arc<FileSource>) -> impl FnMut() + Send + 'static {
    move || {
        tracing::info!(file = %file.path().display(), "SIGHUP: reloading bindings file");
        let _ = file.reload();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hangup_hook_of_standalone_mode_reloads_the_bindings_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bindings.yaml");
        let identity =
            "identities:\n  - name: a\n    clientID: \"11111111-1111-1111-1111-111111111111\"\n";
        std::fs::write(&path, format!("{identity}bindings:\n")).expect("write");
        let file = Arc::new(FileSource::load(&path).expect("load"));
        assert_eq!(file.current().binding_count(), 0);

        std::fs::write(
            &path,
            format!("{identity}bindings:\n  - cgroup: x\n    identity: a\n"),
        )
        .expect("rewrite");
        let mut on_hangup = reload_on_hangup(Arc::clone(&file));
        on_hangup();
        assert_eq!(file.current().binding_count(), 1, "SIGHUP did not reload");
    }
}
