//! What the cache holds, behind one lock: the entries, the fetches in flight, and the counters for metrics.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, atomic::AtomicU64},
    time::Duration,
};

use tokio::sync::watch;

use super::{
    config::CacheConfig,
    key::CacheKey,
    schedule::{Clock, Schedule, ms},
};
use crate::{
    identity::Identity,
    imds::token::source::{FetchError, Token, TokenSource},
};

/// What every caller waiting on one fetch gets.
pub type FlightResult = Result<Arc<Token>, Arc<FetchError>>;

/// One cached token.
pub struct Entry {
    pub token: Arc<Token>,
    /// The identity it was fetched for, to fetch it again.
    pub identity: Arc<Identity>,
    pub schedule: Schedule,
    pub last_used: u64,
    /// No background refresh before this.
    pub refresh_not_before: u64,
}

impl Entry {
    /// Inside its refresh window and not backing off from the last refresh.
    pub fn wants_refresh(&self, now: u64) -> bool {
        self.schedule.is_refresh_due(now) && now >= self.refresh_not_before
    }

    /// Records that a refresh starts now: the next one waits for `backoff`.
    pub fn refreshing(&mut self, now: u64, backoff: Duration) {
        self.refresh_not_before = now.saturating_add(ms(backoff));
    }
}

/// A fetch in flight; callers that miss on its key wait on its channel.
pub struct Flight {
    pub rx: watch::Receiver<Option<FlightResult>>,
}

#[derive(Default)]
pub struct State {
    pub entries: HashMap<CacheKey, Entry>,
    pub flights: HashMap<CacheKey, Flight>,
}

/// Everything the cache's clones share.
pub struct Shared {
    pub config: CacheConfig,
    pub source: Arc<dyn TokenSource>,
    pub clock: Arc<dyn Clock>,
    state: Mutex<State>,
    pub counters: Counters,
}

/// For metrics ([`super::CacheStats`]).
#[derive(Default)]
pub struct Counters {
    pub fetches: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
}

impl Shared {
    pub fn new(config: CacheConfig, source: Arc<dyn TokenSource>, clock: Arc<dyn Clock>) -> Self {
        Shared {
            config,
            source,
            clock,
            state: Mutex::new(State::default()),
            counters: Counters::default(),
        }
    }

    /// The state lock is only held for map operations, never across an await, so poisoning would mean a panic inside
    /// one of those; the maps are still consistent then, so keep serving.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
