//! Reading what the kernel programs record: the redirected connections (for attestation), the event counters and the
//! map occupancy (for metrics), the refusals per cgroup (for the agent's refusal summaries).

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
};
use nmi_agent_ebpf::abi::{self, CgroupRefusals, ConnKey, ConnRecord, Counter};

use super::{Datapath, DatapathError, load::take_map};
use crate::telemetry::metrics::{KernelCounter, KernelStats};

/// Looks a redirected connection up by its 4-tuple.
pub trait ConnLookup {
    fn lookup(&self, key: &ConnKey) -> Result<Option<ConnRecord>, String>;
}

impl<T: ConnLookup> ConnLookup for std::sync::Arc<T> {
    fn lookup(&self, key: &ConnKey) -> Result<Option<ConnRecord>, String> {
        T::lookup(self, key)
    }
}

/// The maps the agent reads, taken out of the loaded object.
pub(super) struct Maps {
    conns: HashMap<MapData, ConnKey, ConnRecord>,
    counters: PerCpuArray<MapData, u64>,
    refusals: HashMap<MapData, u64, CgroupRefusals>,
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(Maps {
            conns: take_map(ebpf, abi::MAP_CONNS)?,
            counters: take_map(ebpf, abi::MAP_COUNTERS)?,
            refusals: take_map(ebpf, abi::MAP_CGROUP_REFUSALS)?,
        })
    }
}

impl Datapath {
    /// Kernel-side counters, summed over CPUs.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let total = self
                    .maps
                    .counters
                    .get(&(c as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (c, total)
            })
            .collect()
    }

    /// Every cgroup the kernel remembers refusing, with its refusals since then by reason (indexed by
    /// [`abi::Refusal`]): at most [`abi::CGROUP_REFUSALS_MAX`] entries. One the kernel adds or evicts meanwhile may
    /// or may not be listed.
    pub fn cgroup_refusals(&self) -> Vec<(u64, CgroupRefusals)> {
        self.maps.refusals.iter().filter_map(Result::ok).collect()
    }

    /// Number of connections currently recorded by sockops.
    pub fn tracked_connections(&self) -> usize {
        self.maps.conns.keys().filter(Result::is_ok).count()
    }
}

impl ConnLookup for Datapath {
    fn lookup(&self, key: &ConnKey) -> Result<Option<ConnRecord>, String> {
        match self.maps.conns.get(key, 0) {
            Ok(record) => Ok(Some(record)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl KernelStats for Datapath {
    fn counters(&self) -> Vec<KernelCounter> {
        Datapath::counters(self)
            .into_iter()
            .map(|(counter, value)| KernelCounter {
                name: counter.name(),
                help: counter.help(),
                value,
            })
            .collect()
    }

    fn tracked_connections(&self) -> usize {
        Datapath::tracked_connections(self)
    }
}
