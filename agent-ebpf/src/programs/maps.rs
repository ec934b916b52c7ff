//! The maps, all pinned by name so that they outlive the agent (fail closed) and a restarted agent adopts them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};

use crate::abi::{
    CONNS_MAX, ConnKey, ConnRecord, Counter, EXEMPT_MAX, RedirectConfig, SOCKETS_MAX,
};

#[map]
pub static NMI_CONFIG: Array<RedirectConfig> = Array::pinned(1, 0);

#[map]
pub static NMI_EXEMPT: HashMap<u64, u32> = HashMap::pinned(EXEMPT_MAX, 0);

// LRU with the kernel's common list: eviction picks the oldest entry overall, not the oldest on one CPU.
#[map]
pub static NMI_SOCKETS: LruHashMap<u64, ConnRecord> = LruHashMap::pinned(SOCKETS_MAX, 0);

#[map]
pub static NMI_CONNS: LruHashMap<ConnKey, ConnRecord> = LruHashMap::pinned(CONNS_MAX, 0);

#[map]
pub static NMI_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = NMI_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn is_exempt(cgroup_id: u64) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { NMI_EXEMPT.get(&cgroup_id).is_some() }
}
