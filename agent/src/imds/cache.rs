//! Token cache per (identity client id, resource).
//!
//! - Single-flight: concurrent misses for one key share one fetch. The fetch runs in its own task, so a caller that
//!   gives up (an SDK timeout) does not cancel it for the others, and its result still lands in the cache.
//! - A token is served until a margin before `expires_on` (the smaller of `refresh_margin` and 10 % of its lifetime),
//!   then fetched again in the foreground.
//! - Entries used recently are refreshed in the background from `refresh_ahead` before expiry (the smaller of that
//!   and 25 % of the lifetime): on a hit inside that window, and by [`TokenCache::sweep`] for entries not hit since.
//! - Errors are not cached. A failed background refresh keeps the old token, which is still valid, and is not
//!   retried for `refresh_backoff`.
//! - Bounded: past `capacity` entries, the least recently used is evicted.
//! - [`TokenCache::purge_identity`] drops an identity's entries and disowns its fetches in flight, for when a binding
//!   goes away.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;

use super::{
    response::Token,
    source::{FetchError, TokenSource},
};
use crate::identity::{Identity, IdentityKind};

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
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Cache tuning. See the module documentation for what each bound does.
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
    /// How often [`TokenCache::run_refresher`] sweeps.
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

type Key = (String, String);
type FlightResult = Result<Arc<Token>, Arc<FetchError>>;

struct Entry {
    token: Arc<Token>,
    identity: Arc<Identity>,
    /// Served while `now < stale_at`.
    stale_at: u64,
    /// Refreshed in the background from here on, if used recently.
    refresh_at: u64,
    /// When the token is fully expired; the sweep drops entries past this.
    expires_at: u64,
    last_used: u64,
    /// No background refresh before this.
    refresh_not_before: u64,
}

struct Flight {
    rx: watch::Receiver<Option<FlightResult>>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    flights: HashMap<Key, Flight>,
}

struct Shared {
    config: CacheConfig,
    source: Arc<dyn TokenSource>,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    fetches: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

/// The token cache. Cheap to clone (shared state).
#[derive(Clone)]
pub struct TokenCache {
    shared: Arc<Shared>,
}

fn key(identity: &Identity, resource: &str) -> Key {
    // Resources are kept exactly, since `aud` is what was asked.
    (credential(identity), resource.to_owned())
}

/// Everything a fetched token depends on: the client id (a GUID, compared case-insensitively) and, for a service
/// principal, its tenant and the Secret it is fetched with. Two AzureIdentities that share a client id but not a
/// secret (say, in two namespaces) must never share a token: the secret is what proves the right to it.
fn credential(identity: &Identity) -> String {
    let client = identity.client_id.to_ascii_lowercase();
    match &identity.kind {
        IdentityKind::UserAssigned => client,
        IdentityKind::ServicePrincipal { tenant_id, secret } => format!(
            "{client}|sp|{}|{}/{}/{}",
            tenant_id.to_ascii_lowercase(),
            secret.namespace,
            secret.name,
            secret.key
        ),
    }
}

/// The client id part of a [`credential`].
fn client_of(credential: &str) -> &str {
    credential.split('|').next().unwrap_or(credential)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
            shared: Arc::new(Shared {
                config,
                source,
                clock,
                state: Mutex::new(State::default()),
                fetches: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                evictions: AtomicU64::new(0),
            }),
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
        let key = key(identity, resource);
        let now = self.shared.clock.now_ms();
        let mut rx = {
            let mut guard = self.shared.lock();
            let state = &mut *guard;
            if let Some(entry) = state.entries.get_mut(&key).filter(|e| now < e.stale_at) {
                entry.last_used = now;
                let token = Arc::clone(&entry.token);
                if now >= entry.refresh_at
                    && now >= entry.refresh_not_before
                    && !state.flights.contains_key(&key)
                {
                    entry.refresh_not_before =
                        now.saturating_add(ms(self.shared.config.refresh_backoff));
                    let identity = Arc::clone(&entry.identity);
                    self.start_flight(state, key, identity);
                }
                self.shared.hits.fetch_add(1, Ordering::Relaxed);
                return Ok((token, CacheOutcome::Hit));
            }
            self.shared.misses.fetch_add(1, Ordering::Relaxed);
            match state.flights.get(&key) {
                Some(flight) => flight.rx.clone(),
                None => self.start_flight(state, key.clone(), Arc::clone(identity)),
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

    /// Starts one fetch for `key`, registered so that concurrent misses join it.
    fn start_flight(
        &self,
        state: &mut State,
        key: Key,
        identity: Arc<Identity>,
    ) -> watch::Receiver<Option<FlightResult>> {
        let (tx, rx) = watch::channel(None);
        state.flights.insert(key.clone(), Flight { rx: rx.clone() });
        let guard = FlightGuard {
            shared: Arc::clone(&self.shared),
            key,
            rx: rx.clone(),
        };
        tokio::spawn(async move {
            let shared = Arc::clone(&guard.shared);
            let result = shared.source.fetch(&identity, &guard.key.1).await;
            shared.fetches.fetch_add(1, Ordering::Relaxed);
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

    /// Drops every entry for `client_id` and disowns its fetches in flight (their results are handed to the callers
    /// already waiting, who were authorised when they asked, but not cached). Returns the entries dropped.
    pub fn purge_identity(&self, client_id: &str) -> usize {
        let mut state = self.shared.lock();
        let before = state.entries.len();
        state
            .entries
            .retain(|(id, _), _| !client_of(id).eq_ignore_ascii_case(client_id));
        state
            .flights
            .retain(|(id, _), _| !client_of(id).eq_ignore_ascii_case(client_id));
        before - state.entries.len()
    }

    /// Keeps only the entries of identities in `keep` (lower-case client ids, as
    /// `identity::Source::bound_client_ids` publishes them) and disowns the other identities' fetches in flight.
    /// Returns the entries dropped.
    pub fn retain_client_ids(&self, keep: &BTreeSet<String>) -> usize {
        let bound = |id: &str| keep.contains(id) || keep.iter().any(|k| k.eq_ignore_ascii_case(id));
        let mut state = self.shared.lock();
        let before = state.entries.len();
        state.entries.retain(|(id, _), _| bound(client_of(id)));
        state.flights.retain(|(id, _), _| bound(client_of(id)));
        before - state.entries.len()
    }

    /// One maintenance pass: drops expired entries and starts background refreshes for entries used recently that are
    /// inside their refresh window. Returns the number of refreshes started.
    pub fn sweep(&self) -> usize {
        let now = self.shared.clock.now_ms();
        let recent = ms(self.shared.config.refresh_if_used_within);
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        state.entries.retain(|_, e| now < e.expires_at);
        let mut due = Vec::new();
        for (key, entry) in state.entries.iter_mut() {
            let used_recently = now.saturating_sub(entry.last_used) <= recent;
            if used_recently
                && now >= entry.refresh_at
                && now >= entry.refresh_not_before
                && !state.flights.contains_key(key)
            {
                entry.refresh_not_before =
                    now.saturating_add(ms(self.shared.config.refresh_backoff));
                due.push((key.clone(), Arc::clone(&entry.identity)));
            }
        }
        let started = due.len();
        for (key, identity) in due {
            self.start_flight(state, key, identity);
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
        CacheStats {
            entries: state.entries.len(),
            in_flight: state.flights.len(),
            fetches: self.shared.fetches.load(Ordering::Relaxed),
            hits: self.shared.hits.load(Ordering::Relaxed),
            misses: self.shared.misses.load(Ordering::Relaxed),
            evictions: self.shared.evictions.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    /// The state lock is only held for map operations, never across an await, so poisoning would mean a panic inside
    /// one of those; the maps are still consistent then, so keep serving.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn insert(&self, state: &mut State, key: Key, identity: &Arc<Identity>, token: &Arc<Token>) {
        let now = self.clock.now_ms();
        let expires_at = token.expires_on.saturating_mul(1000);
        // The lifetime as issued when the token says when that was; else what is left of it now.
        let issued = token.not_before.saturating_mul(1000).min(now);
        let lifetime = expires_at.saturating_sub(issued);
        let margin = ms(self.config.refresh_margin).min(lifetime / 10);
        let ahead = ms(self.config.refresh_ahead).min(lifetime / 4).max(margin);
        let stale_at = expires_at
            .saturating_sub(margin)
            .max(now.saturating_add(ms(self.config.min_reuse)))
            // Never past the real expiry, whatever the floor above says.
            .min(expires_at.saturating_sub(1000));
        let previous = state.entries.remove(&key);
        state.entries.insert(
            key,
            Entry {
                token: Arc::clone(token),
                identity: Arc::clone(identity),
                stale_at,
                refresh_at: expires_at.saturating_sub(ahead),
                expires_at,
                last_used: previous.as_ref().map_or(now, |p| p.last_used),
                refresh_not_before: previous.map_or(0, |p| p.refresh_not_before),
            },
        );
        while state.entries.len() > self.config.capacity.max(1) {
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
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Ends a flight: on completion it caches the token (if the flight is still registered, i.e. not purged) and
/// unregisters it; if the task dies first (panic, runtime shutdown), dropping it unregisters the flight so the next
/// request starts a new one instead of waiting on a dead channel.
struct FlightGuard {
    shared: Arc<Shared>,
    key: Key,
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
            self.shared.insert(state, self.key.clone(), identity, token);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretRef;
    use crate::imds::upstream::BoxFuture;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    struct ManualClock(AtomicU64);
    impl Clock for ManualClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }
    impl ManualClock {
        fn advance(&self, d: Duration) {
            self.0.fetch_add(ms(d), Ordering::SeqCst);
        }
    }

    const T0: u64 = 1_700_000_000;

    /// Counts fetches; tokens were issued `age` seconds before the clock's now and live `lifetime` seconds; can be made
    /// to fail or to be slow.
    struct CountingSource {
        clock: Arc<ManualClock>,
        calls: AtomicUsize,
        lifetime: u64,
        age: u64,
        delay: Duration,
        fail: AtomicBool,
    }

    impl TokenSource for CountingSource {
        fn fetch<'a>(
            &'a self,
            identity: &'a Identity,
            resource: &'a str,
        ) -> BoxFuture<'a, Result<Token, FetchError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                if !self.delay.is_zero() {
                    tokio::time::sleep(self.delay).await;
                }
                if self.fail.load(Ordering::SeqCst) {
                    return Err(FetchError::Internal("scripted failure".into()));
                }
                let issued = self.clock.now_ms() / 1000 - self.age;
                Ok(Token {
                    access_token: format!("{}|{resource}|{n}", identity.client_id),
                    client_id: identity.client_id.clone(),
                    expires_on: issued + self.lifetime,
                    not_before: issued,
                    ext_expires_on: issued + self.lifetime,
                    token_type: "Bearer".into(),
                })
            })
        }
    }

    fn setup(
        lifetime: u64,
        delay: Duration,
        config: CacheConfig,
    ) -> (TokenCache, Arc<CountingSource>, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock(AtomicU64::new(T0 * 1000)));
        let source = Arc::new(CountingSource {
            clock: Arc::clone(&clock),
            calls: AtomicUsize::new(0),
            lifetime,
            age: 0,
            delay,
            fail: AtomicBool::new(false),
        });
        let cache = TokenCache::with_clock(config, source.clone(), clock.clone());
        (cache, source, clock)
    }

    fn id(client_id: &str) -> Arc<Identity> {
        Arc::new(Identity {
            name: client_id.into(),
            namespace: None,
            client_id: client_id.into(),
            resource_id: None,
            object_id: None,
            kind: IdentityKind::UserAssigned,
        })
    }

    /// Lets spawned flight tasks run to completion (they have no delay in these tests).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn five_hundred_concurrent_misses_make_one_fetch() {
        let (cache, source, _) = setup(3600, Duration::from_millis(200), CacheConfig::default());
        let a = id("aaaa");
        let tasks: Vec<_> = (0..500)
            .map(|_| {
                let (cache, a) = (cache.clone(), Arc::clone(&a));
                tokio::spawn(async move { cache.get(&a, "https://r/").await })
            })
            .collect();
        let mut tokens = Vec::new();
        for task in tasks {
            let (token, outcome) = task.await.expect("task").expect("token");
            assert_eq!(outcome, CacheOutcome::Miss);
            tokens.push(token);
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        assert!(tokens.iter().all(|t| t.access_token == "aaaa|https://r/|1"));
        // And the next one is a hit.
        let (_, outcome) = cache.get(&a, "https://r/").await.expect("token");
        assert_eq!(outcome, CacheOutcome::Hit);
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        let stats = cache.stats();
        assert_eq!(
            (
                stats.entries,
                stats.in_flight,
                stats.fetches,
                stats.hits,
                stats.misses
            ),
            (1, 0, 1, 1, 500)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_failures_share_one_fetch_and_are_not_cached() {
        let (cache, source, _) = setup(3600, Duration::from_millis(100), CacheConfig::default());
        source.fail.store(true, Ordering::SeqCst);
        let a = id("aaaa");
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (cache, a) = (cache.clone(), Arc::clone(&a));
                tokio::spawn(async move { cache.get(&a, "r").await })
            })
            .collect();
        for task in tasks {
            assert!(task.await.expect("task").is_err());
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        source.fail.store(false, Ordering::SeqCst);
        let (token, outcome) = cache.get(&a, "r").await.expect("the error was not cached");
        assert_eq!(
            (outcome, source.calls.load(Ordering::SeqCst)),
            (CacheOutcome::Miss, 2)
        );
        assert!(token.access_token.ends_with("|2"));
    }

    #[tokio::test]
    async fn keys_are_identity_and_resource() {
        let (cache, source, _) = setup(3600, Duration::ZERO, CacheConfig::default());
        let (a, b) = (id("aaaa"), id("bbbb"));
        cache.get(&a, "r1").await.expect("token");
        cache.get(&a, "r2").await.expect("token");
        cache.get(&b, "r1").await.expect("token");
        assert_eq!(source.calls.load(Ordering::SeqCst), 3);
        // Client ids compare case-insensitively; resources exactly (a trailing slash changes `aud`).
        assert_eq!(
            cache.get(&id("AAAA"), "r1").await.expect("token").1,
            CacheOutcome::Hit
        );
        assert_eq!(
            cache.get(&a, "r1/").await.expect("token").1,
            CacheOutcome::Miss
        );
    }

    #[tokio::test]
    async fn service_principals_sharing_a_client_id_but_not_a_secret_never_share_a_token() {
        let (cache, source, _) = setup(3600, Duration::ZERO, CacheConfig::default());
        let sp = |namespace: &str| {
            Arc::new(Identity {
                kind: IdentityKind::ServicePrincipal {
                    tenant_id: "tenant".into(),
                    secret: SecretRef {
                        namespace: namespace.into(),
                        name: "sp-secret".into(),
                        key: "clientSecret".into(),
                    },
                },
                ..(*id("aaaa")).clone()
            })
        };
        cache.get(&sp("team-a"), "r").await.expect("token");
        // Namespace b names the same client id with its own (say, junk) secret: it must fetch, not reuse a's token.
        let (_, outcome) = cache.get(&sp("team-b"), "r").await.expect("token");
        assert_eq!(outcome, CacheOutcome::Miss);
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        // Purging by client id still reaches both.
        assert_eq!(cache.purge_identity("AAAA"), 2);
    }

    #[tokio::test]
    async fn served_until_the_margin_then_fetched_again() {
        // 24 h token: the margin is 5 min.
        let (cache, source, clock) = setup(86_400, Duration::ZERO, CacheConfig::default());
        let a = id("aaaa");
        cache.get(&a, "r").await.expect("token");
        clock.advance(Duration::from_secs(86_400 - 301));
        let (token, outcome) = cache.get(&a, "r").await.expect("token");
        assert_eq!(
            (outcome, token.access_token.as_str()),
            (CacheOutcome::Hit, "aaaa|r|1")
        );
        settle().await;
        // That hit was inside the refresh-ahead window: one background refresh ran.
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        let (token, outcome) = cache.get(&a, "r").await.expect("token");
        assert_eq!(
            (outcome, token.access_token.as_str()),
            (CacheOutcome::Hit, "aaaa|r|2")
        );
    }

    #[tokio::test]
    async fn stale_tokens_are_not_served() {
        let config = CacheConfig {
            refresh_ahead: Duration::from_secs(1),
            ..CacheConfig::default()
        };
        // 1 h token: margin min(5 min, 6 min) = 5 min; refresh-ahead pinned to the margin, so no background refresh.
        let (cache, source, clock) = setup(3600, Duration::ZERO, config);
        let a = id("aaaa");
        cache.get(&a, "r").await.expect("token");
        clock.advance(Duration::from_secs(3600 - 299));
        let (token, outcome) = cache.get(&a, "r").await.expect("token");
        assert_eq!(
            (outcome, token.access_token.as_str()),
            (CacheOutcome::Miss, "aaaa|r|2")
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn short_lived_tokens_use_ten_percent_of_their_lifetime() {
        let (cache, source, clock) = setup(600, Duration::ZERO, CacheConfig::default());
        let a = id("aaaa");
        cache.get(&a, "r").await.expect("token");
        // Margin: 10 % of 600 s = 60 s, not 5 min.
        clock.advance(Duration::from_secs(539));
        assert_eq!(
            cache.get(&a, "r").await.expect("token").1,
            CacheOutcome::Hit
        );
        settle().await;
        let calls = source.calls.load(Ordering::SeqCst);
        assert_eq!(
            calls, 2,
            "inside the refresh-ahead window (25 % = 150 s): refreshed in the background"
        );
        clock.advance(Duration::from_secs(600));
        assert_eq!(
            cache.get(&a, "r").await.expect("token").1,
            CacheOutcome::Miss
        );
    }

    #[tokio::test]
    async fn a_token_already_near_expiry_is_reused_briefly() {
        // IMDS may hand back its own cached token with little life left (here 200 s of a 24 h token, inside the 5 min
        // margin): serve it for `min_reuse` rather than fetching on every request.
        let clock = Arc::new(ManualClock(AtomicU64::new(T0 * 1000)));
        let source = Arc::new(CountingSource {
            clock: Arc::clone(&clock),
            calls: AtomicUsize::new(0),
            lifetime: 86_400,
            age: 86_200,
            delay: Duration::ZERO,
            fail: AtomicBool::new(false),
        });
        let cache = TokenCache::with_clock(CacheConfig::default(), source.clone(), clock.clone());
        let a = id("aaaa");
        assert_eq!(
            cache.get(&a, "r").await.expect("token").1,
            CacheOutcome::Miss
        );
        for _ in 0..10 {
            assert_eq!(
                cache.get(&a, "r").await.expect("token").1,
                CacheOutcome::Hit
            );
            settle().await;
        }
        // One background refresh (the token is inside its refresh window), then the backoff holds.
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        clock.advance(Duration::from_secs(31));
        assert_eq!(
            cache.get(&a, "r").await.expect("token").1,
            CacheOutcome::Miss
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn sweep_refreshes_recently_used_entries_only_and_drops_expired_ones() {
        let (cache, source, clock) = setup(3600, Duration::ZERO, CacheConfig::default());
        let (a, b) = (id("aaaa"), id("bbbb"));
        cache.get(&a, "r").await.expect("token");
        clock.advance(Duration::from_secs(20 * 60));
        cache.get(&b, "r").await.expect("token");
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        // a: issued at 0 and last used then; b: issued and used at 20 min. Refresh window: last 15 min (25 % = 15 min).
        clock.advance(Duration::from_secs(30 * 60 + 1));
        // a is in its window but was last used 50 min ago; b is not in its window yet.
        assert_eq!(cache.sweep(), 0);
        cache.get(&a, "r").await.expect("token");
        settle().await;
        assert_eq!(
            source.calls.load(Ordering::SeqCst),
            3,
            "a hit in the window refreshes"
        );
        clock.advance(Duration::from_secs(15 * 60));
        // Now b (issued at 20 min, expiring at 80 min, now 65 min + 1 s) is in its window and used 45 min ago: not
        // recent. a was refreshed at 50 min and used then: recent, but not in its window.
        assert_eq!(cache.sweep(), 0);
        cache.get(&b, "r").await.expect("token");
        clock.advance(Duration::from_secs(60));
        // b was used just now and is in its window; its hit already refreshed it in the background.
        settle().await;
        assert_eq!(source.calls.load(Ordering::SeqCst), 4);
        // Far in the future everything expired: the sweep drops it all.
        clock.advance(Duration::from_secs(10 * 3600));
        assert_eq!(cache.sweep(), 0);
        assert_eq!(cache.stats().entries, 0);
    }

    #[tokio::test]
    async fn sweep_starts_refreshes_for_entries_used_recently() {
        let (cache, source, clock) = setup(3600, Duration::ZERO, CacheConfig::default());
        let a = id("aaaa");
        cache.get(&a, "r").await.expect("token");
        clock.advance(Duration::from_secs(40 * 60));
        cache.get(&a, "r").await.expect("token"); // used at 40 min, before the window (45 min)
        settle().await;
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(6 * 60));
        assert_eq!(cache.sweep(), 1);
        settle().await;
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        // Backoff: the refreshed token moved the window, and a second sweep right away starts nothing.
        assert_eq!(cache.sweep(), 0);
        assert_eq!(
            cache.get(&a, "r").await.expect("token").0.access_token,
            "aaaa|r|2"
        );
    }

    #[tokio::test]
    async fn failed_background_refresh_keeps_the_old_token_and_backs_off() {
        let (cache, source, clock) = setup(3600, Duration::ZERO, CacheConfig::default());
        let a = id("aaaa");
        cache.get(&a, "r").await.expect("token");
        source.fail.store(true, Ordering::SeqCst);
        clock.advance(Duration::from_secs(50 * 60));
        let (token, outcome) = cache.get(&a, "r").await.expect("old token still served");
        assert_eq!(
            (outcome, token.access_token.as_str()),
            (CacheOutcome::Hit, "aaaa|r|1")
        );
        settle().await;
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        // Within the backoff, hits do not start another refresh.
        clock.advance(Duration::from_secs(30));
        cache.get(&a, "r").await.expect("token");
        settle().await;
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        clock.advance(Duration::from_secs(31));
        cache.get(&a, "r").await.expect("token");
        settle().await;
        assert_eq!(source.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn purge_drops_an_identity_and_disowns_its_flights() {
        let (cache, source, _) = setup(3600, Duration::ZERO, CacheConfig::default());
        let (a, b) = (id("aaaa"), id("bbbb"));
        cache.get(&a, "r1").await.expect("token");
        cache.get(&a, "r2").await.expect("token");
        cache.get(&b, "r1").await.expect("token");
        assert_eq!(cache.purge_identity("AAAA"), 2);
        assert_eq!(cache.stats().entries, 1);
        assert_eq!(
            cache.get(&a, "r1").await.expect("token").1,
            CacheOutcome::Miss
        );
        assert_eq!(
            cache.get(&b, "r1").await.expect("token").1,
            CacheOutcome::Hit
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purge_during_a_flight_does_not_cache_its_result() {
        let (cache, source, _) = setup(3600, Duration::from_millis(200), CacheConfig::default());
        let a = id("aaaa");
        let waiter = {
            let (cache, a) = (cache.clone(), Arc::clone(&a));
            tokio::spawn(async move { cache.get(&a, "r").await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        cache.purge_identity("aaaa");
        assert!(
            waiter.await.expect("task").is_ok(),
            "the waiting caller still gets its answer"
        );
        assert_eq!(cache.stats().entries, 0, "but it is not cached");
        assert_eq!(
            cache.get(&a, "r").await.expect("token").1,
            CacheOutcome::Miss
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn bounded_with_lru_eviction() {
        let config = CacheConfig {
            capacity: 3,
            ..CacheConfig::default()
        };
        let (cache, source, clock) = setup(3600, Duration::ZERO, config);
        let ids: Vec<_> = ["a", "b", "c", "d"].into_iter().map(id).collect();
        for i in &ids[..3] {
            cache.get(i, "r").await.expect("token");
            clock.advance(Duration::from_secs(1));
        }
        // Touch a, so b is the least recently used.
        assert_eq!(
            cache.get(&ids[0], "r").await.expect("token").1,
            CacheOutcome::Hit
        );
        clock.advance(Duration::from_secs(1));
        cache.get(&ids[3], "r").await.expect("token");
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.evictions), (3, 1));
        assert_eq!(
            cache.get(&ids[0], "r").await.expect("token").1,
            CacheOutcome::Hit
        );
        assert_eq!(
            cache.get(&ids[2], "r").await.expect("token").1,
            CacheOutcome::Hit
        );
        assert_eq!(
            cache.get(&ids[1], "r").await.expect("token").1,
            CacheOutcome::Miss
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn retain_keeps_only_bound_identities() {
        let (cache, _, _) = setup(3600, Duration::ZERO, CacheConfig::default());
        for client_id in ["aaaa", "BBBB", "cccc"] {
            cache.get(&id(client_id), "r").await.expect("token");
        }
        let keep = BTreeSet::from(["aaaa".to_owned(), "bbbb".to_owned()]);
        assert_eq!(cache.retain_client_ids(&keep), 1);
        assert_eq!(
            cache.get(&id("bbbb"), "r").await.expect("token").1,
            CacheOutcome::Hit
        );
        assert_eq!(
            cache.get(&id("cccc"), "r").await.expect("token").1,
            CacheOutcome::Miss
        );
        assert_eq!(cache.retain_client_ids(&BTreeSet::new()), 3);
    }

    struct PanickingSource;
    impl TokenSource for PanickingSource {
        fn fetch<'a>(
            &'a self,
            _: &'a Identity,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Token, FetchError>> {
            Box::pin(async { panic!("source bug") })
        }
    }

    #[tokio::test]
    async fn a_dead_flight_is_reported_and_unregistered() {
        let cache = TokenCache::new(CacheConfig::default(), Arc::new(PanickingSource));
        let a = id("aaaa");
        let err = cache.get(&a, "r").await.expect_err("no token");
        assert!(matches!(*err, FetchError::Internal(_)));
        assert_eq!(cache.stats().in_flight, 0);
        assert!(
            cache.get(&a, "r").await.is_err(),
            "a new flight, not a wait on the dead one"
        );
    }
}
