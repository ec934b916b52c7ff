//! What can go wrong while loading, attaching, pinning or reading the kernel programs, each with what to do about it.

use std::path::{Path, PathBuf};

use aya::programs::links::LinkError;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this nmi-agent binary was built without its eBPF object (plain `cargo build`); build it with `cargo xtask build`"
    )]
    NoObject,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "loading the eBPF object: {0} (needs root or CAP_BPF + CAP_NET_ADMIN, and a kernel >= 5.8 with BTF)"
    )]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("program {name}: taking its link: {source}")]
    Link {
        name: &'static str,
        source: LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "{what} {path}: {source}; if an earlier agent's pins are damaged, run `nmi-agent uninstall` on this node and start again"
    )]
    PinnedMap {
        what: &'static str,
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error(
        "the eBPF object has no {kind} named {name}; the binary and its object are out of step"
    )]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("{0}")]
    Bpffs(String),
    #[error("{0}; pass --imds-device to name the device that routes to IMDS")]
    ImdsRoute(#[from] super::imds_route::RouteError),
    #[error(
        "the route to 169.254.169.254 leaves through device index {index}, whose name could not be read: {source}; pass --imds-device"
    )]
    Device { index: u32, source: std::io::Error },
    #[error(
        "attaching the forwarding guard to {device}: no TCX link ({tcx}) and no clsact filter either ({source}); check that {device} exists in the agent's network namespace (--imds-device) and that the kernel has CONFIG_NET_CLS_BPF and CONFIG_NET_SCH_INGRESS"
    )]
    TcFilter {
        device: String,
        tcx: String,
        // Boxed: it is large, and this rare error must not grow every datapath Result.
        source: Box<aya::programs::ProgramError>,
    },
}

/// Wraps an I/O error on `path` with what was being done to it.
pub(crate) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DatapathError + 'a {
    move |source| DatapathError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}
