//! The boot guard (docs/boot.md). `nmi-agent guard` attaches the kernel programs before the kubelet starts a pod, so
//! that from a node's first instant pods' IMDS connects fail closed (connection refused) until `run` adopts the pins;
//! `install-guard` puts the systemd unit that runs it at every boot on the host (`unit.rs`), and `uninstall` takes
//! that unit away again.

mod unit;

use std::{
    fs,
    path::{Component, Path, PathBuf},
};

use anyhow::{Context, bail};

use crate::{
    attest::cgroupfs,
    cli::{GuardArgs, InstallGuardArgs, InterceptArgs},
    datapath::{self, Guarded},
    telemetry::{self, LogFormat},
};

pub use unit::{
    BINARY, GuardCommand, Installed, UNIT_DIR, UNIT_NAME, UnitError, install, remove, render,
};

/// `nmi-agent guard`: intercept the cgroup (creating it if the kubelet has not yet), redirect to the agent's
/// address, and exit.
pub fn guard(args: &GuardArgs) -> anyhow::Result<()> {
    telemetry::init_logging(LogFormat::Text);
    let mount = cgroupfs::cgroup2_mount()?;
    let cgroup = intercepted_cgroup(&args.intercept, &mount, true)?;
    let listen = args.intercept.listen_addr()?;
    let opts = datapath::Options {
        cgroup: cgroup.clone(),
        pin_dir: args.intercept.pin_dir.clone(),
        redirect: listen,
        // The agent's own cgroup does not exist yet; `run` exempts it in the pinned maps before it binds its port.
        exempt: Vec::new(),
        // The bind guard is on from boot: no hostNetwork pod can take the agent's port and answer pods' redirected
        // requests before the agent runs. The guard runs in the node's network namespace, where the agent listens.
        netns_cookie: node_netns_cookie(),
        health: None,
        imds_device: args.intercept.imds_device.clone(),
        max_sockets_per_cgroup: args.intercept.max_sockets_per_cgroup,
    };
    match datapath::guard(&opts)? {
        Guarded::Attached(links) => println!(
            "nmi-agent guard: {} links pinned under {}: IMDS connects from {} go to {listen} and are refused until \
             the agent serves",
            links.len(),
            opts.pin_dir.display(),
            cgroup.display()
        ),
        Guarded::AlreadyPinned(links) => println!(
            "nmi-agent guard: every program is pinned already ({} links under {}); left as it is",
            links.len(),
            opts.pin_dir.display()
        ),
    }
    Ok(())
}

/// `nmi-agent install-guard`: the unit runs the guard with the values this process resolves now, while the kubelet
/// runs and its pods cgroup exists, so that at boot nothing has to be guessed.
pub fn install_guard(args: &InstallGuardArgs) -> anyhow::Result<()> {
    let mount = cgroupfs::cgroup2_mount()?;
    let command = GuardCommand {
        cgroup: intercepted_cgroup(&args.intercept, &mount, false)?,
        listen: args.intercept.listen_addr()?,
        pin_dir: args.intercept.pin_dir.clone(),
        imds_device: args.intercept.imds_device.clone(),
    };
    let exe = std::env::current_exe().context("finding this binary to copy it to the host")?;
    let installed = install(&args.host_root, &exe, &command, args.kubelet_dependency)?;
    for path in &installed.paths {
        println!("wrote {}", path.display());
    }
    println!(
        "the guard runs at the next boot, before the kubelet: {}",
        installed.exec_start
    );
    Ok(())
}

/// The cgroup `--cgroup` names (else the kubelet's pods cgroup), checked to be under the cgroup v2 mount. With
/// `create`, a missing one is made as the kubelet's cgroupfs driver makes it: a plain mkdir (docs/boot.md says why
/// the systemd driver adopts it).
fn intercepted_cgroup(args: &InterceptArgs, mount: &Path, create: bool) -> anyhow::Result<PathBuf> {
    let dir = match &args.cgroup {
        Some(dir) => dir.clone(),
        None => cgroupfs::kubepods(mount).context(
            "before the kubelet runs there is no pods cgroup to find: pass --cgroup with the path it will have \
             (install-guard writes it into the unit)",
        )?,
    };
    if create && !dir.exists() {
        create_cgroup(&dir, mount)?;
    }
    let dir = cgroupfs::check_under_mount(&dir, mount)?;
    if dir == mount {
        bail!(
            "--cgroup {}: the guard never intercepts the root cgroup (the kubelet and the container runtime live \
             there); pass the kubelet's pods cgroup",
            dir.display()
        );
    }
    Ok(dir)
}

fn create_cgroup(dir: &Path, mount: &Path) -> anyhow::Result<()> {
    let plain = dir
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !(dir.is_absolute() && plain && dir.starts_with(mount) && dir != mount) {
        bail!(
            "--cgroup {}: not a directory under the cgroup v2 mount {}; pass an absolute path below it",
            dir.display(),
            mount.display()
        );
    }
    fs::create_dir_all(dir)
        .with_context(|| format!("creating the intercepted cgroup {}", dir.display()))?;
    tracing::info!(cgroup = %dir.display(), "created the intercepted cgroup before the kubelet");
    Ok(())
}

#[cfg(test)]
mod tests;

/// The cookie of the network namespace the guard runs in (the node's), for the bind guard; 0 (no bind guard until
/// `run` configures it) on kernels before 5.14.
fn node_netns_cookie() -> u64 {
    let cookie = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .and_then(|socket| datapath::netns_cookie(&socket));
    cookie.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no network namespace cookie (needs Linux >= 5.14): the agent's port is not guarded until it runs");
        0
    })
}
