//! Taking entries out: the least recently used past capacity, expired ones, and those of identities no longer bound
//! (whose fetches in flight are disowned too, so their results are not cached).

use super::{key::CacheKey, state::State};

/// Evicts least recently used entries until at most `capacity` (at least one) remain. Returns how many went.
pub fn evict_lru(state: &mut State, capacity: usize) -> u64 {
    let mut evicted = 0;
    while state.entries.len() > capacity.max(1) {
        // O(n), but only when a fetch completes with the cache full; fetches are rare next to hits.
        let Some(oldest) = state
            .entries
            .iter()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        state.entries.remove(&oldest);
        evicted += 1;
    }
    evicted
}

/// Drops the entries whose token has expired at `now`.
pub fn drop_expired(state: &mut State, now: u64) {
    state.entries.retain(|_, e| !e.schedule.is_expired(now));
}

/// Keeps only entries and flights whose key `keep` accepts. Returns the entries dropped.
pub fn retain_keys(state: &mut State, keep: impl Fn(&CacheKey) -> bool) -> usize {
    let before = state.entries.len();
    state.entries.retain(|key, _| keep(key));
    state.flights.retain(|key, _| keep(key));
    before - state.entries.len()
}
