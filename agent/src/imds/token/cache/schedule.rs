//! When a cached token is served, refreshed ahead of time, and dropped: pure arithmetic over epoch milliseconds, and
//! the clock it is read against.
//!
//! - Served while fresh: until a margin before `expires_on`, the smaller of `refresh_margin` and 10 % of its lifetime,
//!   but at least `min_reuse` after it was fetched (IMDS may hand back a token already close to expiry), and never
//!   past one second before its real expiry.
//! - Due for a background refresh (if used recently) from `refresh_ahead` before expiry, the smaller of that and
//!   25 % of the lifetime, and never later than the margin.
//! - Expired (dropped by the sweep) at `expires_on`.

use std::time::Duration;

use super::config::CacheConfig;

/// Milliseconds since the Unix epoch; a trait so tests can move time.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, ms)
    }
}

/// A duration in whole milliseconds, saturating.
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The three moments of one cached token, in epoch milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Served while `now < stale_at`.
    pub stale_at: u64,
    /// Refreshed in the background from here on, if used recently.
    pub refresh_at: u64,
    /// When the token is fully expired; the sweep drops entries past this.
    pub expires_at: u64,
}

impl Schedule {
    /// The schedule of a token expiring at `expires_on` and valid from `not_before` (epoch seconds, as tokens say),
    /// fetched at `now` (epoch milliseconds).
    pub fn new(expires_on: u64, not_before: u64, now: u64, config: &CacheConfig) -> Schedule {
        let expires_at = expires_on.saturating_mul(1000);
        // The lifetime as issued when the token says when that was; else what is left of it now.
        let issued = not_before.saturating_mul(1000).min(now);
        let lifetime = expires_at.saturating_sub(issued);
        let margin = ms(config.refresh_margin).min(lifetime / 10);
        let ahead = ms(config.refresh_ahead).min(lifetime / 4).max(margin);
        let stale_at = expires_at
            .saturating_sub(margin)
            .max(now.saturating_add(ms(config.min_reuse)))
            // Never past the real expiry, whatever the floor above says.
            .min(expires_at.saturating_sub(1000));
        Schedule {
            stale_at,
            refresh_at: expires_at.saturating_sub(ahead),
            expires_at,
        }
    }

    /// May still be served.
    pub fn is_fresh(&self, now: u64) -> bool {
        now < self.stale_at
    }

    /// Inside the refresh-ahead window (or past it).
    pub fn is_refresh_due(&self, now: u64) -> bool {
        now >= self.refresh_at
    }

    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }
}
