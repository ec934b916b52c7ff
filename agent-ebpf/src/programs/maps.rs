//! The maps, all pinned by name so that they outlive the agent (fail closed) and a restarted agent adopts them.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_get_current_cgroup_id,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};

use super::REJECT;
use crate::abi::{
    CGROUP_REFUSALS_MAX, CGROUP_SOCKETS_MAX, CONNS_MAX, CgroupRefusals, ConnKey, ConnRecord,
    Counter, EXEMPT_MAX, RedirectConfig, Refusal, SOCKETS_MAX, over_cap,
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

/// Live redirected sockets per cgroup: one for each `NMI_SOCKETS` entry of that cgroup. Every path that files an
/// entry goes through [`file_socket`], every path that drops one through [`drop_socket`], so the two stay in step.
#[map]
pub static NMI_CGROUP_SOCKETS: LruHashMap<u64, i64> = LruHashMap::pinned(CGROUP_SOCKETS_MAX, 0);

#[map]
pub static NMI_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

/// Refused connects and binds per cgroup, by reason: what the agent's rate-limited summaries are made of, so that a
/// refusal costs no log record (a pod refused in a loop cannot flood the log ring buffer).
#[map]
pub static NMI_CGROUP_REFUSALS: LruHashMap<u64, CgroupRefusals> =
    LruHashMap::pinned(CGROUP_REFUSALS_MAX, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = NMI_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Counts a refusal of `cgroup_id`'s connect or bind (node-wide and for the cgroup) and returns the verdict.
#[inline(always)]
pub fn refuse(reason: Refusal, cgroup_id: u64) -> i32 {
    if reason.is_refused_connect() {
        count(Counter::Refused);
    }
    count(reason.counter());
    if let Some(counts) = entry_or_zero(&NMI_CGROUP_REFUSALS, cgroup_id) {
        // SAFETY: `counts` points at a live map value; the index is a constant below the array's length, so the
        // pointer stays inside it.
        let slot = unsafe {
            core::ptr::addr_of_mut!((*counts).by_reason)
                .cast::<i64>()
                .add(reason as usize)
        };
        atomic_add(slot, 1);
    }
    REJECT
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

/// Why a socket's record was not filed.
pub enum FileError {
    /// Its cgroup already holds `cap` live redirected sockets.
    OverCap,
    /// A map refused the entry.
    Map,
}

/// Files `record` for socket `cookie` and counts it against its cgroup, unless the cgroup already holds `cap` live
/// redirected sockets (0: no cap). A record the socket filed before (a second connect after a failed one) is dropped
/// first, so each socket counts once, against the cgroup of its latest record.
#[inline(always)]
pub fn file_socket(cookie: u64, record: &ConnRecord, cap: u32) -> Result<(), FileError> {
    drop_socket(cookie);
    let Some(count) = entry_or_zero(&NMI_CGROUP_SOCKETS, record.cgroup_id) else {
        return Err(FileError::Map);
    };
    // Read, then add: concurrent connects of one cgroup may pass the check together and overshoot the cap by at most
    // one per CPU; an exact check would need the fetching atomics (BPF v3), which this object does not assume.
    // SAFETY: a valid, aligned map value that lives as long as the entry; a torn read cannot happen for an aligned i64.
    if over_cap(unsafe { count.read_volatile() }, cap) {
        return Err(FileError::OverCap);
    }
    atomic_add(count, 1);
    if NMI_SOCKETS.insert(cookie, record, 0).is_err() {
        release(count);
        return Err(FileError::Map);
    }
    Ok(())
}

/// Drops socket `cookie`'s record, if it still has one, and uncounts it. Only the caller whose delete succeeds
/// uncounts, so a close seen twice (sock_ops and sock_release) uncounts once.
#[inline(always)]
pub fn drop_socket(cookie: u64) {
    let Some(record) = socket_record(cookie) else {
        return;
    };
    if NMI_SOCKETS.remove(cookie).is_err() {
        return;
    }
    if let Some(count) = NMI_CGROUP_SOCKETS.get_ptr_mut(record.cgroup_id) {
        release(count);
    }
}

/// The entry under `key`, created zeroed (`V::default()`) when it is missing.
#[inline(always)]
fn entry_or_zero<V: Default>(map: &LruHashMap<u64, V>, key: u64) -> Option<*mut V> {
    // Fails when the entry exists (or another CPU created it first); the lookup below finds that one.
    let _ = map.insert(key, V::default(), BPF_NOEXIST.into());
    map.get_ptr_mut(key)
}

/// Uncounts one socket. No floor: with two sockets closing at once, a read-then-decrement could take a count of one
/// below zero twice over; a count may go negative instead (see `abi::over_cap`).
#[inline(always)]
fn release(count: *mut i64) {
    atomic_add(count, -1);
}

/// `*value += delta` as one atomic instruction (BPF_ATOMIC | BPF_ADD, the old XADD), which every CPU's concurrent
/// connects and closes of one cgroup can run at once without losing an update.
#[inline(always)]
fn atomic_add(value: *mut i64, delta: i64) {
    // SAFETY: `value` points at a live, aligned 8-byte map value (from `get_ptr_mut`); the instruction touches
    // nothing else. Two's complement: the same instruction adds signed and unsigned values.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({0} + 0) += {1}",
            in(reg) value,
            in(reg) delta,
            options(nostack),
        );
    }
}
