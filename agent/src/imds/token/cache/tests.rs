//! Tests of the token cache: single-flight, the schedule, refreshes, eviction, purges, and keys.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::future::BoxFuture;

use super::{
    key::CacheKey,
    schedule::{Schedule, ms},
    *,
};
use crate::{
    identity::{IdentityKind, SecretRef},
    imds::token::source::{FetchError, Token, TokenSource},
};

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

/// How `cache` serves `identity` and `resource`: from the cache or by a fetch.
async fn outcome(cache: &TokenCache, identity: &Arc<Identity>, resource: &str) -> CacheOutcome {
    cache.get(identity, resource).await.expect("token").1
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
    assert_eq!(outcome(&cache, &id("AAAA"), "r1").await, CacheOutcome::Hit);
    assert_eq!(outcome(&cache, &a, "r1/").await, CacheOutcome::Miss);
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
    assert_eq!(outcome(&cache, &a, "r").await, CacheOutcome::Hit);
    settle().await;
    let calls = source.calls.load(Ordering::SeqCst);
    assert_eq!(
        calls, 2,
        "inside the refresh-ahead window (25 % = 150 s): refreshed in the background"
    );
    clock.advance(Duration::from_secs(600));
    assert_eq!(outcome(&cache, &a, "r").await, CacheOutcome::Miss);
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
    assert_eq!(outcome(&cache, &a, "r").await, CacheOutcome::Miss);
    for _ in 0..10 {
        assert_eq!(outcome(&cache, &a, "r").await, CacheOutcome::Hit);
        settle().await;
    }
    // One background refresh (the token is inside its refresh window), then the backoff holds.
    assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    clock.advance(Duration::from_secs(31));
    assert_eq!(outcome(&cache, &a, "r").await, CacheOutcome::Miss);
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
    assert_eq!(outcome(&cache, &a, "r1").await, CacheOutcome::Miss);
    assert_eq!(outcome(&cache, &b, "r1").await, CacheOutcome::Hit);
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
    assert_eq!(outcome(&cache, &a, "r").await, CacheOutcome::Miss);
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
    assert_eq!(outcome(&cache, &ids[0], "r").await, CacheOutcome::Hit);
    clock.advance(Duration::from_secs(1));
    cache.get(&ids[3], "r").await.expect("token");
    let stats = cache.stats();
    assert_eq!((stats.entries, stats.evictions), (3, 1));
    assert_eq!(outcome(&cache, &ids[0], "r").await, CacheOutcome::Hit);
    assert_eq!(outcome(&cache, &ids[2], "r").await, CacheOutcome::Hit);
    assert_eq!(outcome(&cache, &ids[1], "r").await, CacheOutcome::Miss);
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
    assert_eq!(outcome(&cache, &id("bbbb"), "r").await, CacheOutcome::Hit);
    assert_eq!(outcome(&cache, &id("cccc"), "r").await, CacheOutcome::Miss);
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

/// The key the cache used to build, a joined string: kept here only to show that the pairs below really collided.
fn old_string_key(identity: &Identity, resource: &str) -> (String, String) {
    let client = identity.client_id.to_ascii_lowercase();
    let credential = match &identity.kind {
        IdentityKind::UserAssigned => client,
        IdentityKind::ServicePrincipal { tenant_id, secret } => format!(
            "{client}|sp|{}|{}/{}/{}",
            tenant_id.to_ascii_lowercase(),
            secret.namespace,
            secret.name,
            secret.key
        ),
    };
    (credential, resource.to_owned())
}

fn sp_with_secret(client_id: &str, namespace: &str, name: &str) -> Arc<Identity> {
    Arc::new(Identity {
        kind: IdentityKind::ServicePrincipal {
            tenant_id: "tenant".into(),
            secret: SecretRef {
                namespace: namespace.into(),
                name: name.into(),
                key: "secret".into(),
            },
        },
        ..(*id(client_id)).clone()
    })
}

#[test]
fn identities_whose_old_string_keys_collided_get_different_keys() {
    let sp = sp_with_secret("aaaa", "team-a", "sp-secret");
    // A managed identity whose client id spells out the service principal's old key (a Kubernetes AzureIdentity's
    // clientID is any string).
    let forged = id("aaaa|sp|tenant|team-a/sp-secret/secret");
    // Two Secrets whose namespace and name join to the same path.
    let (split_a, split_b) = (
        sp_with_secret("aaaa", "a/b", "c"),
        sp_with_secret("aaaa", "a", "b/c"),
    );
    for (one, other) in [(&sp, &forged), (&split_a, &split_b)] {
        assert_eq!(old_string_key(one, "r"), old_string_key(other, "r"));
        assert_ne!(CacheKey::new(one, "r"), CacheKey::new(other, "r"));
    }
    // Still one key per identity whatever the case of its ids.
    let upper = sp_with_secret("AAAA", "team-a", "sp-secret");
    assert_eq!(CacheKey::new(&sp, "r"), CacheKey::new(&upper, "r"));
}

#[tokio::test]
async fn a_forged_client_id_does_not_get_a_service_principals_token() {
    let (cache, source, _) = setup(3600, Duration::ZERO, CacheConfig::default());
    let sp = sp_with_secret("aaaa", "team-a", "sp-secret");
    cache.get(&sp, "r").await.expect("token");
    let forged = id("aaaa|sp|tenant|team-a/sp-secret/secret");
    let (token, outcome) = cache.get(&forged, "r").await.expect("token");
    assert_eq!(outcome, CacheOutcome::Miss);
    assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    // Fetched for the forged identity, not the service principal's token ("aaaa|r|1").
    assert_eq!(
        token.access_token,
        "aaaa|sp|tenant|team-a/sp-secret/secret|r|2"
    );
}

const H: i64 = 3600 * 1000;
const M: i64 = 60 * 1000;
const S: i64 = 1000;

#[test]
fn the_schedule_of_a_token_by_its_lifetime() {
    let now = T0 * 1000;
    let default = CacheConfig::default();
    let short_ahead = CacheConfig {
        refresh_ahead: Duration::from_secs(1),
        ..CacheConfig::default()
    };
    // (lifetime in s, issued how many s before now, config, [stale_at, refresh_at, expires_at] in ms from now)
    let cases: [(u64, i64, &CacheConfig, [i64; 3]); 7] = [
        // 24 h: the 5 min margin, refreshed from 15 min before expiry.
        (
            86_400,
            0,
            &default,
            [24 * H - 5 * M, 24 * H - 15 * M, 24 * H],
        ),
        // 1 h: 5 min is under 10 % of it, 15 min is 25 %.
        (3600, 0, &default, [55 * M, 45 * M, H]),
        // 10 min: 10 % and 25 % of the lifetime.
        (600, 0, &default, [9 * M, 10 * M - 150 * S, 10 * M]),
        // A refresh-ahead below the margin is pinned to the margin.
        (3600, 0, &short_ahead, [55 * M, 55 * M, H]),
        // Issued long ago with 200 s left: served for min_reuse.
        (
            86_400,
            86_400 - 200,
            &default,
            [30 * S, 200 * S - 15 * M, 200 * S],
        ),
        // 20 s left: min_reuse never reaches past the real expiry.
        (3600, 3600 - 20, &default, [19 * S, 20 * S - 15 * M, 20 * S]),
        // not_before in the future (clock skew): the lifetime counts from now.
        (500, -500, &default, [900 * S, 750 * S, 1000 * S]),
    ];
    for (lifetime, age, config, [stale, refresh, expires]) in cases {
        let not_before = T0.saturating_add_signed(-age);
        let at = |offset: i64| now.saturating_add_signed(offset);
        assert_eq!(
            Schedule::new(not_before + lifetime, not_before, now, config),
            Schedule {
                stale_at: at(stale),
                refresh_at: at(refresh),
                expires_at: at(expires),
            },
            "lifetime {lifetime} s, issued {age} s ago"
        );
    }
}

#[test]
fn fresh_due_and_expired_are_read_off_the_schedule() {
    let s = Schedule {
        stale_at: 300,
        refresh_at: 200,
        expires_at: 400,
    };
    // (now, fresh, refresh due, expired)
    for (now, fresh, due, expired) in [
        (0, true, false, false),
        (199, true, false, false),
        (200, true, true, false),
        (299, true, true, false),
        (300, false, true, false),
        (399, false, true, false),
        (400, false, true, true),
    ] {
        assert_eq!(
            (s.is_fresh(now), s.is_refresh_due(now), s.is_expired(now)),
            (fresh, due, expired),
            "at {now}"
        );
    }
}
