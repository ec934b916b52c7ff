//! The maps, all pinned by name so that they outlive the agent (fail closed) and a restarted agent adopts them.

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id,
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
    // SAFETY: the returned reference is only tested for presence, never read, so a concurrent update cannot matter.
    unsafe { NMI_EXEMPT.get(cgroup_id).is_some() }
}

/// The record connect4 filed for a socket, by its cookie.
#[inline(always)]
pub fn socket_record(cookie: u64) -> Option<ConnRecord> {
    // SAFETY: copied out at once; a concurrent update or LRU eviction can only make the copy stale, not invalid.
    unsafe { NMI_SOCKETS.get(cookie) }.copied()
}

/// The calling task's cgroup, or `None` when that cgroup is exempt (the agent's own) and its call is not ours to judge.
#[inline(always)]
pub fn intercepted_caller() -> Option<u64> {
    // SAFETY: a helper without arguments, available to every program type these hooks use.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if is_exempt(cgroup_id) {
        None
    } else {
        Some(cgroup_id)
    }
}
