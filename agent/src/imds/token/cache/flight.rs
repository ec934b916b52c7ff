//! Single-flight: concurrent misses for one key share one fetch. The fetch runs in its own task, so a caller that
//! gives up (an SDK timeout) does not cancel it for the others, and its result still lands in the cache, unless the
//! key was purged meanwhile.

use std::sync::{Arc, atomic::Ordering};

use tokio::sync::watch;

use super::{
    evict::evict_lru,
    key::CacheKey,
    schedule::Schedule,
    state::{Entry, Flight, FlightResult, Shared, State},
};
use crate::{identity::Identity, imds::token::source::Token};

/// Starts one fetch for `key`, registered so that concurrent misses join it. Needs a Tokio runtime.
pub fn start(
    shared: &Arc<Shared>,
    state: &mut State,
    key: CacheKey,
    identity: Arc<Identity>,
) -> watch::Receiver<Option<FlightResult>> {
    let (tx, rx) = watch::channel(None);
    state.flights.insert(key.clone(), Flight { rx: rx.clone() });
    let guard = FlightGuard {
        shared: Arc::clone(shared),
        key,
        rx: rx.clone(),
    };
    tokio::spawn(async move {
        let shared = Arc::clone(&guard.shared);
        let result = shared.source.fetch(&identity, &guard.key.resource).await;
        shared.counters.fetches.fetch_add(1, Ordering::Relaxed);
        let result = match result {
            Ok(token) => Ok(Arc::new(token)),
            Err(e) => Err(Arc::new(e)),
        };
        guard.complete(&identity, &result);
        // No receiver left (every caller gave up) is fine: the token is cached all the same.
        let _ = tx.send(Some(result));
    });
    rx
}

/// Ends a flight: on completion it caches the token (if the flight is still registered, i.e. not purged) and
/// unregisters it; if the task dies first (panic, runtime shutdown), dropping it unregisters the flight so the next
/// request starts a new one instead of waiting on a dead channel.
struct FlightGuard {
    shared: Arc<Shared>,
    key: CacheKey,
    rx: watch::Receiver<Option<FlightResult>>,
}

impl FlightGuard {
    fn complete(&self, identity: &Arc<Identity>, result: &FlightResult) {
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        if !self.unregister(state) {
            return;
        }
        if let Ok(token) = result {
            land(&self.shared, state, self.key.clone(), identity, token);
        }
    }

    /// Removes this flight from the map if it is still the registered one for its key.
    fn unregister(&self, state: &mut State) -> bool {
        let ours = state
            .flights
            .get(&self.key)
            .is_some_and(|f| f.rx.same_channel(&self.rx));
        if ours {
            state.flights.remove(&self.key);
        }
        ours
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        self.unregister(&mut state);
    }
}

/// Caches a fetched token under `key`, keeping what the previous entry knew about its use, then evicts down to
/// capacity.
fn land(
    shared: &Shared,
    state: &mut State,
    key: CacheKey,
    identity: &Arc<Identity>,
    token: &Arc<Token>,
) {
    let now = shared.clock.now_ms();
    let schedule = Schedule::new(token.expires_on, token.not_before, now, &shared.config);
    let previous = state.entries.remove(&key);
    state.entries.insert(
        key,
        Entry {
            token: Arc::clone(token),
            identity: Arc::clone(identity),
            schedule,
            last_used: previous.as_ref().map_or(now, |p| p.last_used),
            refresh_not_before: previous.map_or(0, |p| p.refresh_not_before),
        },
    );
    let evicted = evict_lru(state, shared.config.capacity);
    shared
        .counters
        .evictions
        .fetch_add(evicted, Ordering::Relaxed);
}
