//! Per-caller shares of the front door: how many connections one caller (one cgroup: a container of a pod, or a
//! hostNetwork pod) may hold at once, so that one pod opening thousands of connections cannot take the slots every
//! other pod needs. HTTP/1.1 serves one request at a time per connection, so this also bounds a caller's requests in
//! flight.
//!
//! A plain counter per cgroup id under a mutex: the lock is held for one map operation per connection, and an entry
//! lives only while its caller holds a connection, so memory is bounded by the global connection limit.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

/// The connections each caller holds, and the most one may.
#[derive(Debug)]
pub struct CallerSlots {
    per_caller: usize,
    held: Mutex<HashMap<u64, usize>>,
}

/// One connection's share; given back when dropped.
#[derive(Debug)]
pub struct CallerSlot {
    slots: Arc<CallerSlots>,
    caller: u64,
}

impl CallerSlots {
    pub fn new(per_caller: usize) -> Arc<Self> {
        Arc::new(CallerSlots {
            per_caller,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection of `caller`, or `None` when it already holds its share.
    pub fn try_acquire(self: &Arc<Self>, caller: u64) -> Option<CallerSlot> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(caller).or_insert(0);
        if *count >= self.per_caller {
            return None;
        }
        *count += 1;
        Some(CallerSlot {
            slots: Arc::clone(self),
            caller,
        })
    }

    /// Connections `caller` holds now.
    #[cfg(test)]
    pub fn held_by(&self, caller: u64) -> usize {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(&caller).copied().unwrap_or(0)
    }

    /// Callers holding at least one connection (what the map costs).
    #[cfg(test)]
    pub fn callers(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut held = self
            .slots
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.caller) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_gets_its_own_share_and_slots_come_back() {
        let slots = CallerSlots::new(2);
        let a1 = slots.try_acquire(1).expect("first");
        let a2 = slots.try_acquire(1).expect("second");
        assert!(slots.try_acquire(1).is_none(), "a third is over the share");
        let b = slots
            .try_acquire(2)
            .expect("another caller is not affected");
        assert_eq!((slots.held_by(1), slots.held_by(2)), (2, 1));
        drop(a1);
        let a3 = slots
            .try_acquire(1)
            .expect("a slot given back can be taken again");
        drop((a2, a3, b));
        assert_eq!(
            slots.callers(),
            0,
            "no entry outlives its caller's connections"
        );
    }
}
