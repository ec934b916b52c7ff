//! The command line: a contract, documented in docs/configuration.md. Every flag also reads an `NMI_AGENT_*`
//! environment variable. What clap cannot check on its own is checked next to it (`listen.rs`).

mod listen;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand};

use crate::{identity::kube::SourceCheck, telemetry::LogFormat};

pub use listen::{ListenError, token_listen_addr};

/// Node identity agent: each pod gets its own Azure identity from an unchanged IMDS client, attested by the kernel.
#[derive(Debug, Parser)]
#[command(name = "nmi-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Intercept IMDS calls in the cgroup subtree and serve each caller the token of its own identity.
    Run(Box<RunArgs>),
    /// Attach the programs (or keep those already pinned) and exit without serving: pods' IMDS connects fail closed
    /// until `run` adopts the pins. Run at every boot, before the kubelet, by the unit `install-guard` writes.
    Guard(GuardArgs),
    /// Write the boot guard's systemd unit, its enable link and this binary into a host root (the DaemonSet's init
    /// container); `uninstall` removes them again.
    InstallGuard(InstallGuardArgs),
    /// Remove every pinned program and map, and the boot guard's unit: pods reach IMDS directly again. For operators
    /// removing the agent.
    Uninstall(UninstallArgs),
}

pub const DEFAULT_PORT: u16 = 2579;
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/nmi-agent";
/// The taint key deploy/, deploy/startup-taint-policy.yaml and the docs use.
pub const DEFAULT_STARTUP_TAINT: &str = "nmi-agent.io/not-ready";

/// What the kernel programs are attached to and where they send pods' connects: shared by `run`, `guard` and
/// `install-guard`, so the boot guard and the agent agree on every value and its default.
#[derive(Debug, Args)]
pub struct InterceptArgs {
    /// Intercepted cgroup v2 subtree. Kubernetes default: the kubelet's pods cgroup (kubepods.slice or kubepods), so
    /// node daemons keep the node's identity; required in standalone mode.
    #[arg(long, env = "NMI_AGENT_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// Token service address, also where intercepted connects are redirected. Never loopback: inside a pod's network
    /// namespace that is the pod itself. Kubernetes default: $NODE_IP:2579.
    #[arg(long, env = "NMI_AGENT_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// The node's IP (Kubernetes: from the downward API); used for the default --listen.
    #[arg(long, env = "NODE_IP")]
    pub node_ip: Option<IpAddr>,

    /// Where programs' links and maps are pinned (on a bpf filesystem; mounted at /sys/fs/bpf when missing).
    #[arg(long, env = "NMI_AGENT_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,

    /// The device whose egress drops packets the node forwards to IMDS (pods' hand-built frames, decapsulated
    /// tunnels). Default: the device the route to 169.254.169.254 leaves through.
    #[arg(long, env = "NMI_AGENT_IMDS_DEVICE")]
    pub imds_device: Option<String>,

    /// The most redirected IMDS sockets one cgroup may hold open at once; its next connect is refused (counted as
    /// `cgroup_cap_refused`). 0 turns the cap off.
    #[arg(long, env = "NMI_AGENT_MAX_SOCKETS_PER_CGROUP", default_value_t = nmi_agent_ebpf::abi::DEFAULT_SOCKETS_PER_CGROUP)]
    pub max_sockets_per_cgroup: u32,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub intercept: InterceptArgs,

    /// The real IMDS.
    #[arg(
        long,
        env = "NMI_AGENT_IMDS_URL",
        default_value = "http://169.254.169.254"
    )]
    pub imds_url: String,

    /// Standalone mode: a YAML file binding cgroups to identities. Without it: Kubernetes mode.
    #[arg(long, env = "NMI_AGENT_BINDINGS")]
    pub bindings: Option<PathBuf>,

    /// This node's name (Kubernetes mode): only pods scheduled here are watched.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Kubernetes mode: let an AzureIdentityBinding match pods in every namespace (aad-pod-identity's old default).
    /// Off by default: a binding and its identity serve only pods of their own namespace.
    #[arg(long, env = "NMI_AGENT_CLUSTER_WIDE_BINDINGS")]
    pub cluster_wide_bindings: bool,

    /// Kubernetes mode: whether a connection must come from the attested pod's own address (`status.podIPs`; the
    /// node's for hostNetwork pods). `audit` serves a mismatch but logs it: for CNIs that rewrite pod source addresses.
    #[arg(long, env = "NMI_AGENT_CHECK_SOURCE_ADDRESS", value_enum, default_value_t = SourceCheck::Enforce)]
    pub check_source_address: SourceCheck,

    /// Kubernetes mode: the taint new nodes register with (AKS: `--node-initialization-taints`) that the agent removes
    /// from its own node once it serves; workloads are not scheduled before. Empty: leave the node's taints alone.
    #[arg(long, env = "NMI_AGENT_STARTUP_TAINT", default_value = DEFAULT_STARTUP_TAINT)]
    pub startup_taint: String,

    /// Service-principal identities (AzureIdentity type 1): read their secrets from Kubernetes Secrets. Off by
    /// default, so the agent needs no access to Secrets unless you use them.
    #[arg(long, env = "NMI_AGENT_SERVICE_PRINCIPALS")]
    pub service_principals: bool,

    /// Entra ID authority host for service-principal identities.
    #[arg(
        long,
        env = "NMI_AGENT_AUTHORITY_HOST",
        default_value = "https://login.microsoftonline.com"
    )]
    pub authority_host: String,

    /// Forward `/metadata/instance*` and `/metadata/versions` to IMDS for attested callers.
    #[arg(long, env = "NMI_AGENT_FORWARD_INSTANCE_METADATA", default_value_t = true, action = clap::ArgAction::Set)]
    pub forward_instance_metadata: bool,

    /// Connections one caller (one cgroup: a container, or a hostNetwork pod) may hold to the token service at once;
    /// beyond it, 429 and the connection is closed. Also its limit of requests in flight (HTTP/1.1).
    #[arg(long, env = "NMI_AGENT_MAX_CONNECTIONS_PER_CALLER", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_connections_per_caller: u16,

    /// Requests one caller may have in flight to the real IMDS (token fetches and forwarded metadata) out of the node's
    /// budget of 5; its further requests wait for its own.
    #[arg(long, env = "NMI_AGENT_MAX_UPSTREAM_PER_CALLER", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=5))]
    pub max_upstream_per_caller: u16,

    /// `/healthz`, `/readyz` and `/metrics`.
    #[arg(
        long,
        env = "NMI_AGENT_HEALTH_LISTEN",
        default_value = "127.0.0.1:9102"
    )]
    pub health_listen: SocketAddr,

    /// Log format.
    #[arg(long, env = "NMI_AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Args)]
pub struct GuardArgs {
    #[command(flatten)]
    pub intercept: InterceptArgs,
}

/// Whether a failed boot guard keeps the kubelet from starting (docs/boot.md, "When the guard fails").
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KubeletDependency {
    /// `RequiredBy=kubelet.service`: no guard, no kubelet, no pods; the node stays NotReady until it is fixed.
    Required,
    /// `WantedBy=kubelet.service`: the kubelet starts anyway and pods run unguarded until the agent attaches.
    Wanted,
}

#[derive(Debug, Args)]
pub struct InstallGuardArgs {
    #[command(flatten)]
    pub intercept: InterceptArgs,

    /// Where the host's root filesystem is mounted (the DaemonSet mounts just /etc/systemd/system and
    /// /opt/nmi-agent under it).
    #[arg(long, env = "NMI_AGENT_HOST_ROOT", default_value = "/")]
    pub host_root: PathBuf,

    /// What a failed guard does to the kubelet.
    #[arg(long, env = "NMI_AGENT_GUARD_KUBELET", value_enum, default_value_t = KubeletDependency::Required)]
    pub kubelet_dependency: KubeletDependency,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[arg(long, env = "NMI_AGENT_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,

    /// Where the host's root filesystem is mounted: the boot guard's unit, its enable link and binary are removed
    /// from there (only files `install-guard` wrote).
    #[arg(long, env = "NMI_AGENT_HOST_ROOT", default_value = "/")]
    pub host_root: PathBuf,
}
