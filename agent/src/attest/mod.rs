//! Attestation: who is calling, as the kernel recorded it. An accepted connection's 4-tuple is looked up in the map
//! that `sockops` filled; no record means the connection was not redirected, and it is refused.

pub mod cgroupfs;

use std::{net::SocketAddrV4, path::PathBuf, sync::Arc};

use nmi_agent_ebpf::abi::{ConnKey, ConnRecord};

use crate::datapath::ConnLookup;
use cgroupfs::CgroupResolver;

/// A caller, attested by the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attestation {
    /// The client end of the connection (pod IP or node IP, and its source port).
    pub peer: SocketAddrV4,
    /// cgroup v2 id of the process that called connect.
    pub cgroup_id: u64,
    /// That cgroup's path relative to the intercepted root (leading `/`), if it still exists.
    pub cgroup: Option<PathBuf>,
    /// The process (tgid) that called connect.
    pub pid: u32,
    /// What the caller connected to before the redirect (169.254.169.254:80).
    pub original_dst: SocketAddrV4,
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error(
        "no redirect record for {peer} -> {local}: the connection did not come through the kernel redirect"
    )]
    NoRecord {
        peer: SocketAddrV4,
        local: SocketAddrV4,
    },
    #[error("the connection is not IPv4 ({0}); only redirected IPv4 connections are served")]
    NotIpv4(std::net::SocketAddr),
    #[error("reading the redirect map: {0}")]
    Map(String),
    #[error("reading the socket's addresses: {0}")]
    Socket(String),
}

impl AttestError {
    /// A fixed name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            AttestError::NoRecord { .. } => "no_record",
            AttestError::NotIpv4(_) => "not_ipv4",
            AttestError::Map(_) => "map_error",
            AttestError::Socket(_) => "socket_error",
        }
    }
}

/// Turns accepted connections into attestations.
pub struct Attestor<L> {
    conns: L,
    cgroups: Arc<CgroupResolver>,
}

impl<L: ConnLookup> Attestor<L> {
    pub fn new(conns: L, cgroups: Arc<CgroupResolver>) -> Self {
        Attestor { conns, cgroups }
    }

    pub fn cgroups(&self) -> &Arc<CgroupResolver> {
        &self.cgroups
    }

    /// Attests the peer of an accepted connection. `local` is the agent's side of it.
    pub fn attest(
        &self,
        peer: std::net::SocketAddr,
        local: std::net::SocketAddr,
    ) -> Result<Attestation, AttestError> {
        let (std::net::SocketAddr::V4(peer4), std::net::SocketAddr::V4(local4)) = (peer, local)
        else {
            return Err(AttestError::NotIpv4(peer));
        };
        let key = ConnKey::accepted(peer4, local4);
        let ConnRecord {
            cgroup_id,
            original,
            tgid,
            ..
        } = self
            .conns
            .lookup(&key)
            .map_err(AttestError::Map)?
            .ok_or(AttestError::NoRecord {
                peer: peer4,
                local: local4,
            })?;
        Ok(Attestation {
            peer: peer4,
            cgroup_id,
            cgroup: self.cgroups.path_of(cgroup_id),
            pid: tgid,
            original_dst: original.into(),
        })
    }
}
