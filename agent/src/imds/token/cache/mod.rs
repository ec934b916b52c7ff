//! Token cache per (credential, resource).
//!
//! - Single-flight (`flight`): concurrent misses for one key share one fetch, which runs in its own task.
//! - The schedule (`schedule`): a token is served until a margin before `expires_on` (the smaller of `refresh_margin`
//!   and 10 % of its lifetime), then fetched again in the foreground. Entries used recently are refreshed in the
//!   background from `refresh_ahead` before expiry (the smaller of that and 25 % of the lifetime): on a hit inside
//!   that window, and by [`TokenCache::sweep`] for entries not hit since.
//! - Errors are not cached. A failed background refresh keeps the old token, which is still valid, and is not
//!   retried for `refresh_backoff`.
//! - Eviction (`evict`): past `capacity` entries, the least recently used goes. [`TokenCache::purge_identity`] drops
//!   an identity's entries and disowns its fetches in flight, for when a binding goes away.
//! - Keys (`key`) are structs of the credential and the resource, so no two identities can share one.

mod config;
mod evict;
mod flight;
mod key;
mod schedule;
mod state;

use std::{
    collections::BTreeSet,
    sync::{Arc, atomic::Ordering},
};

pub use config::CacheConfig;
pub use schedule::{Clock, SystemClock};

use self::{
    key::CacheKey,
    state::{Shared, State},
};
use super::source::{FetchError, Token, TokenSource};
use crate::identity::Identity;

/// How a request was served, for the audit line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
        }
    }
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub in_flight: usize,
    pub fetches: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// The token cache. Cheap to clone (shared state).
#[derive(Clone)]
pub struct TokenCache {
    shared: Arc<Shared>,
}

impl TokenCache {
    pub fn new(config: CacheConfig, source: Arc<dyn TokenSource>) -> Self {
        Self::with_clock(config, source, Arc::new(SystemClock))
    }

    pub fn with_clock(
        config: CacheConfig,
        source: Arc<dyn TokenSource>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        TokenCache {
            shared: Arc::new(Shared::new(config, source, clock)),
        }
    }

    /// Epoch seconds by the cache's clock, for computing `expires_in` at serve time.
    pub fn now_secs(&self) -> u64 {
        self.shared.clock.now_ms() / 1000
    }

    /// A token for `identity` and `resource`: from the cache, or from the one fetch in flight for that key. Needs a
    /// Tokio runtime (fetches run as tasks).
    pub async fn get(
        &self,
        identity: &Arc<Identity>,
        resource: &str,
    ) -> Result<(Arc<Token>, CacheOutcome), Arc<FetchError>> {
        let key = CacheKey::new(identity, resource);
        let now = self.shared.clock.now_ms();
        let counters = &self.shared.counters;
        let mut rx = {
            let mut guard = self.shared.lock();
            let state = &mut *guard;
            if let Some(entry) = state
                .entries
                .get_mut(&key)
                .filter(|e| e.schedule.is_fresh(now))
            {
                entry.last_used = now;
                let token = Arc::clone(&entry.token);
                if entry.wants_refresh(now) && !state.flights.contains_key(&key) {
                    entry.refreshing(now, self.shared.config.refresh_backoff);
                    let identity = Arc::clone(&entry.identity);
                    flight::start(&self.shared, state, key, identity);
                }
                counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok((token, CacheOutcome::Hit));
            }
            counters.misses.fetch_add(1, Ordering::Relaxed);
            match state.flights.get(&key) {
                Some(flight) => flight.rx.clone(),
                None => flight::start(&self.shared, state, key, Arc::clone(identity)),
            }
        };
        let result = match rx.wait_for(Option::is_some).await {
            Ok(value) => value.clone(),
            Err(_) => None,
        };
        match result {
            Some(Ok(token)) => Ok((token, CacheOutcome::Miss)),
            Some(Err(e)) => Err(e),
            // The flight task ended without a result; its guard has already removed it, so the next request retries.
            None => Err(Arc::new(FetchError::Internal(
                "the token fetch was abandoned".into(),
            ))),
        }
    }

    /// Drops every entry for `client_id` and disowns its fetches in flight (their results are handed to the callers
    /// already waiting, who were authorised when they asked, but not cached). Returns the entries dropped.
    pub fn purge_identity(&self, client_id: &str) -> usize {
        evict::retain_keys(&mut self.shared.lock(), |key| {
            !key.client_id().eq_ignore_ascii_case(client_id)
        })
    }

    /// Keeps only the entries of identities in `keep` (lower-case client ids, as
    /// `identity::BindingSource::bound_client_ids` publishes them) and disowns the other identities' fetches in
    /// flight. Returns the entries dropped.
    pub fn retain_client_ids(&self, keep: &BTreeSet<String>) -> usize {
        let bound = |id: &str| keep.contains(id) || keep.iter().any(|k| k.eq_ignore_ascii_case(id));
        evict::retain_keys(&mut self.shared.lock(), |key| bound(key.client_id()))
    }

    /// One maintenance pass: drops expired entries and starts background refreshes for entries used recently that are
    /// inside their refresh window. Returns the number of refreshes started.
    pub fn sweep(&self) -> usize {
        let now = self.shared.clock.now_ms();
        let recent = schedule::ms(self.shared.config.refresh_if_used_within);
        let mut guard = self.shared.lock();
        let state: &mut State = &mut guard;
        evict::drop_expired(state, now);
        let mut due = Vec::new();
        for (key, entry) in state.entries.iter_mut() {
            let used_recently = now.saturating_sub(entry.last_used) <= recent;
            if used_recently && entry.wants_refresh(now) && !state.flights.contains_key(key) {
                entry.refreshing(now, self.shared.config.refresh_backoff);
                due.push((key.clone(), Arc::clone(&entry.identity)));
            }
        }
        let started = due.len();
        for (key, identity) in due {
            flight::start(&self.shared, state, key, identity);
        }
        started
    }

    /// Sweeps every `sweep_interval`, forever. Spawn it once: `tokio::spawn(cache.clone().run_refresher())`.
    pub async fn run_refresher(self) {
        let mut tick = tokio::time::interval(self.shared.config.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let started = self.sweep();
            if started > 0 {
                tracing::debug!(started, "background token refreshes");
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        let state = self.shared.lock();
        let counters = &self.shared.counters;
        CacheStats {
            entries: state.entries.len(),
            in_flight: state.flights.len(),
            fetches: counters.fetches.load(Ordering::Relaxed),
            hits: counters.hits.load(Ordering::Relaxed),
            misses: counters.misses.load(Ordering::Relaxed),
            evictions: counters.evictions.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests;
