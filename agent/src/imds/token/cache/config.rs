//! Cache tuning: the bounds that the schedule, the refresher and eviction work within.

use std::time::Duration;

/// Cache tuning. See the cache module's documentation for what each bound does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Entries kept at most.
    pub capacity: usize,
    /// Stop serving a token this long before it expires (capped at 10 % of its lifetime).
    pub refresh_margin: Duration,
    /// Start refreshing a recently used token this long before it expires (capped at 25 % of its lifetime).
    pub refresh_ahead: Duration,
    /// "Recently used", for background refresh.
    pub refresh_if_used_within: Duration,
    /// After a background refresh, the earliest time for another one of the same entry. This also stops a loop when
    /// IMDS hands back its own cached token, unchanged, to a refresh.
    pub refresh_backoff: Duration,
    /// A freshly fetched token is served for at least this long even if it is already inside the margin (IMDS may
    /// return a token close to expiry); otherwise each request would fetch again.
    pub min_reuse: Duration,
    /// How often [`super::TokenCache::run_refresher`] sweeps.
    pub sweep_interval: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            capacity: 4096,
            refresh_margin: Duration::from_secs(5 * 60),
            refresh_ahead: Duration::from_secs(15 * 60),
            refresh_if_used_within: Duration::from_secs(30 * 60),
            refresh_backoff: Duration::from_secs(60),
            min_reuse: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(30),
        }
    }
}
