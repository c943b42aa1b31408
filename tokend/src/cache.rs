//! The token cache, keyed by (identity, resource) (reference/imds.md (a).10):
//!
//! - a token is served while more than [`SERVE_MARGIN`] seconds remain, with its real expiry;
//! - concurrent misses of one key make one upstream call (a *flight*, a spawned task whose
//!   result every waiter shares and which completes even if they all leave);
//! - a token past its refresh point ([`refresh_point`]) is still served, and one background
//!   flight refreshes it (tried again at most every [`REFRESH_RETRY`] seconds);
//! - `bypass_cache=true`, or `token_sha256_to_refresh` naming the cached token, forces a new
//!   flight (joining one that is already forced);
//! - at most `capacity` keys, least recently used first out (never one with a flight);
//! - [`TokenCache::retain`] drops the keys of identities no longer assigned, or whose spec
//!   changed (the spec's fingerprint is part of the key).
//!
//! The decisions are [`State::plan`] and [`State::complete`], plain functions of the state
//! and the time; the shell spawns the flights.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::cluster::IdentityKey;
use crate::token::{Token, unix_now};
use crate::upstream::UpstreamError;

/// A cached token is served while more than this many seconds remain.
pub const SERVE_MARGIN: i64 = 300;
/// A refresh ahead of expiry is tried at most this often per key (seconds).
pub const REFRESH_RETRY: i64 = 60;
/// A token is refreshed ahead once less than this remains (or half its lifetime, if more).
const REFRESH_AHEAD: i64 = 600;

/// What a token is cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub identity: IdentityKey,
    /// The request's `resource`, verbatim.
    pub resource: String,
}

/// How fresh the caller needs the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    /// The cached token while it is servable.
    Cached,
    /// `bypass_cache=true`: a new token from upstream.
    Fresh,
    /// `token_sha256_to_refresh`: a new token if the cached one has this SHA-256.
    RefreshIf(String),
}

impl Freshness {
    pub fn of(bypass_cache: bool, refresh_sha256: Option<&str>) -> Self {
        match (bypass_cache, refresh_sha256) {
            (true, _) => Self::Fresh,
            (false, Some(sha)) => Self::RefreshIf(sha.to_ascii_lowercase()),
            (false, None) => Self::Cached,
        }
    }
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    /// This request waited for an upstream call (its own or a shared one).
    Upstream,
}

/// A token for a request.
#[derive(Debug, Clone)]
pub struct Served {
    pub token: Arc<Token>,
    pub source: Source,
}

pub type FetchResult = Result<Arc<Token>, UpstreamError>;
/// An upstream call in progress, shared by everyone waiting for it.
pub type Flight = Shared<BoxFuture<'static, FetchResult>>;
/// Starts an upstream call; `true` asks upstream to bypass its own cache too.
pub type Fetch = Box<dyn FnOnce(bool) -> BoxFuture<'static, Result<Token, UpstreamError>> + Send>;

/// When a token should be refreshed ahead: half its lifetime before expiry, and at least
/// [`REFRESH_AHEAD`] seconds before.
pub fn refresh_point(token: &Token) -> i64 {
    token.expires_on - (token.lifetime() / 2).max(REFRESH_AHEAD)
}

fn servable(token: &Token, now: i64) -> bool {
    token.expires_on - now > SERVE_MARGIN
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    forced: bool,
    flight: Flight,
}

#[derive(Debug, Default)]
struct Entry {
    token: Option<Arc<Token>>,
    flight: Option<InFlight>,
    used: u64,
    refresh_tried: Option<i64>,
}

/// What [`State::plan`] decided.
#[derive(Debug)]
pub enum Plan {
    /// Serve this cached token (`refreshing`: a background refresh was started).
    Hit { token: Arc<Token>, refreshing: bool },
    /// Wait for this flight: `started` when this request started it.
    Wait { flight: Flight, started: bool },
}

/// The cache's state.
#[derive(Debug)]
pub struct State {
    entries: HashMap<CacheKey, Entry>,
    lru: BTreeMap<u64, CacheKey>,
    tick: u64,
    next_flight: u64,
    capacity: usize,
    evictions: u64,
}

impl State {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            next_flight: 0,
            capacity: capacity.max(1),
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Decides how to answer a request for `key` at `now`; `start(id, forced)` starts a
    /// flight when one is needed (an answer's or a background refresh's).
    pub fn plan(
        &mut self,
        key: &CacheKey,
        now: i64,
        freshness: &Freshness,
        start: impl FnOnce(u64, bool) -> Flight,
    ) -> Plan {
        let tick = self.touch(key);
        let entry = self.entries.entry(key.clone()).or_default();
        entry.used = tick;
        let forced = match freshness {
            Freshness::Cached => false,
            Freshness::Fresh => true,
            Freshness::RefreshIf(sha) => {
                entry.token.as_ref().is_some_and(|t| t.sha256_hex() == *sha)
            }
        };
        let cached = entry.token.clone().filter(|t| servable(t, now));
        let plan = match (forced, cached, &entry.flight) {
            (true, _, Some(f)) if f.forced => Plan::Wait {
                flight: f.flight.clone(),
                started: false,
            },
            (true, _, _) => Plan::Wait {
                flight: Self::launch(&mut self.next_flight, entry, true, start),
                started: true,
            },
            (false, Some(token), flight) => {
                let due = now >= refresh_point(&token)
                    && flight.is_none()
                    && entry
                        .refresh_tried
                        .is_none_or(|tried| now - tried >= REFRESH_RETRY);
                if due {
                    entry.refresh_tried = Some(now);
                    // Nobody waits for it: its task runs on its own and fills the entry.
                    let _refresh = Self::launch(&mut self.next_flight, entry, false, start);
                }
                Plan::Hit {
                    token,
                    refreshing: due,
                }
            }
            (false, None, Some(f)) => Plan::Wait {
                flight: f.flight.clone(),
                started: false,
            },
            (false, None, None) => Plan::Wait {
                flight: Self::launch(&mut self.next_flight, entry, false, start),
                started: true,
            },
        };
        self.evict(key);
        plan
    }

    fn launch(
        next: &mut u64,
        entry: &mut Entry,
        forced: bool,
        start: impl FnOnce(u64, bool) -> Flight,
    ) -> Flight {
        *next += 1;
        let flight = start(*next, forced);
        entry.flight = Some(InFlight {
            id: *next,
            forced,
            flight: flight.clone(),
        });
        flight
    }

    /// Records the result of flight `id` of `key`: its token is cached, unless the key was
    /// dropped or another flight replaced this one meanwhile.
    pub fn complete(&mut self, key: &CacheKey, id: u64, result: &FetchResult) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if entry.flight.as_ref().map(|f| f.id) != Some(id) {
            return;
        }
        entry.flight = None;
        if let Ok(token) = result {
            entry.token = Some(Arc::clone(token));
        }
    }

    /// Keeps only the keys whose identity `keep` accepts.
    pub fn retain(&mut self, keep: impl Fn(&IdentityKey) -> bool) -> usize {
        let before = self.entries.len();
        let lru = &mut self.lru;
        self.entries.retain(|key, entry| {
            let kept = keep(&key.identity);
            if !kept {
                lru.remove(&entry.used);
            }
            kept
        });
        before - self.entries.len()
    }

    /// Makes `key` the most recently used; returns its new tick.
    fn touch(&mut self, key: &CacheKey) -> u64 {
        let moved = self
            .entries
            .get(key)
            .and_then(|entry| self.lru.remove(&entry.used));
        self.tick += 1;
        self.lru
            .insert(self.tick, moved.unwrap_or_else(|| key.clone()));
        self.tick
    }

    /// Drops the least recently used keys without a flight until the cache fits.
    fn evict(&mut self, keep: &CacheKey) {
        while self.entries.len() > self.capacity {
            let victim = self
                .lru
                .iter()
                .find(|(_, key)| {
                    *key != keep && self.entries.get(*key).is_some_and(|e| e.flight.is_none())
                })
                .map(|(tick, key)| (*tick, key.clone()));
            let Some((tick, key)) = victim else {
                return;
            };
            self.lru.remove(&tick);
            self.entries.remove(&key);
            self.evictions += 1;
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    result: &'static str,
}

/// The cache's metrics.
#[derive(Debug, Clone, Default)]
pub struct CacheMetrics {
    lookups: Family<LookupLabels, Counter>,
    /// `lookups{result="hit"}`, resolved once for the hot path.
    hits: Counter,
    entries: Gauge,
    evictions: Counter,
    dropped: Counter,
}

impl CacheMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "token_cache_lookups",
            "Token cache lookups: hit, miss (started an upstream call), coalesced (joined one), refresh (served and refreshed ahead)",
            metrics.lookups.clone(),
        );
        registry.register(
            "token_cache_entries",
            "Keys in the token cache",
            metrics.entries.clone(),
        );
        registry.register(
            "token_cache_evictions",
            "Keys evicted because the cache was full",
            metrics.evictions.clone(),
        );
        registry.register(
            "token_cache_dropped",
            "Keys dropped because their identity is no longer assigned or its spec changed",
            metrics.dropped.clone(),
        );
        for result in ["hit", "miss", "coalesced", "refresh"] {
            metrics
                .lookups
                .get_or_create(&LookupLabels { result })
                .inc_by(0);
        }
        let hits = metrics
            .lookups
            .get_or_create(&LookupLabels { result: "hit" })
            .clone();
        Self { hits, ..metrics }
    }

    fn lookup(&self, result: &'static str) {
        self.lookups.get_or_create(&LookupLabels { result }).inc();
    }
}

/// The shared cache.
#[derive(Debug)]
pub struct TokenCache {
    state: Mutex<State>,
    metrics: CacheMetrics,
    /// Bumped whenever a cached token may have changed or gone (a flight completed, keys
    /// dropped or evicted): answers rendered from the cache are stale once it moves.
    generation: AtomicU64,
}

impl TokenCache {
    pub fn new(capacity: usize, metrics: CacheMetrics) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::new(capacity)),
            metrics,
            generation: AtomicU64::new(0),
        })
    }

    /// See the field: read it before looking a token up.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Counts a token served again without a lookup (a listener's memo of this same answer,
    /// valid while [`TokenCache::generation`] has not moved).
    pub fn count_repeat_hit(&self) {
        self.metrics.hits.inc();
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The token for `key`, from the cache or from `fetch` (called at most once, and only
    /// when this request starts an upstream call or a refresh ahead).
    pub async fn get(
        self: &Arc<Self>,
        key: CacheKey,
        freshness: Freshness,
        fetch: Fetch,
    ) -> Result<Served, UpstreamError> {
        self.get_at(key, freshness, fetch, unix_now()).await
    }

    async fn get_at(
        self: &Arc<Self>,
        key: CacheKey,
        freshness: Freshness,
        fetch: Fetch,
        now: i64,
    ) -> Result<Served, UpstreamError> {
        let plan = {
            let mut state = self.lock();
            let weak = Arc::downgrade(self);
            let flight_key = key.clone();
            let plan = state.plan(&key, now, &freshness, move |id, forced| {
                spawn_flight(weak, flight_key, id, forced, fetch)
            });
            let evicted = state.evictions;
            state.evictions = 0;
            if evicted > 0 {
                self.bump();
            }
            self.metrics.evictions.inc_by(evicted);
            self.metrics
                .entries
                .set(i64::try_from(state.len()).unwrap_or(i64::MAX));
            plan
        };
        match plan {
            Plan::Hit { token, refreshing } => {
                self.metrics
                    .lookup(if refreshing { "refresh" } else { "hit" });
                Ok(Served {
                    token,
                    source: Source::Cache,
                })
            }
            Plan::Wait { flight, started } => {
                self.metrics
                    .lookup(if started { "miss" } else { "coalesced" });
                flight.await.map(|token| Served {
                    token,
                    source: Source::Upstream,
                })
            }
        }
    }

    /// Drops every key whose identity `keep` rejects.
    pub fn retain(&self, keep: impl Fn(&IdentityKey) -> bool) {
        let mut state = self.lock();
        let dropped = state.retain(keep);
        if dropped > 0 {
            self.bump();
        }
        self.metrics.dropped.inc_by(dropped as u64);
        self.metrics
            .entries
            .set(i64::try_from(state.len()).unwrap_or(i64::MAX));
    }

    fn complete(&self, key: &CacheKey, id: u64, result: &FetchResult) {
        self.lock().complete(key, id, result);
        // After the state changed: a reader that saw the old generation also saw the old token.
        self.bump();
    }
}

/// Runs `fetch` as a task of its own, so the call completes (and is cached) even if every
/// request waiting for it goes away.
fn spawn_flight(
    cache: Weak<TokenCache>,
    key: CacheKey,
    id: u64,
    forced: bool,
    fetch: Fetch,
) -> Flight {
    let task = tokio::spawn(async move {
        let result = fetch(forced).await.map(Arc::new);
        if let Some(cache) = cache.upgrade() {
            cache.complete(&key, id, &result);
        }
        result
    });
    async move {
        task.await.unwrap_or_else(|e| {
            Err(UpstreamError::unavailable(format!(
                "the token fetch task failed: {e}"
            )))
        })
    }
    .boxed()
    .shared()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::*;
    use crate::cluster::ObjKey;

    const NOW: i64 = 1_700_000_000;

    fn key(identity: &str, resource: &str) -> CacheKey {
        CacheKey {
            identity: IdentityKey {
                identity: ObjKey::new("ns", identity),
                fingerprint: [0; 32],
                pod_uid: None,
            },
            resource: resource.into(),
        }
    }

    /// A fetcher that counts calls and hands out `tok-<n>` tokens of `lifetime` seconds,
    /// optionally held until `gate` is notified.
    #[derive(Clone)]
    struct Upstream {
        calls: Arc<AtomicUsize>,
        forced: Arc<AtomicUsize>,
        lifetime: i64,
        gate: Option<Arc<Notify>>,
        fail: bool,
    }

    impl Upstream {
        fn new(lifetime: i64) -> Self {
            Self {
                calls: Arc::default(),
                forced: Arc::default(),
                lifetime,
                gate: None,
                fail: false,
            }
        }

        fn fetch(&self) -> Fetch {
            let this = self.clone();
            Box::new(move |forced| {
                async move {
                    let n = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                    if forced {
                        this.forced.fetch_add(1, Ordering::SeqCst);
                    }
                    if let Some(gate) = &this.gate {
                        gate.notified().await;
                    }
                    if this.fail {
                        return Err(UpstreamError::unavailable("boom"));
                    }
                    Ok(Token::new(format!("tok-{n}"), NOW + this.lifetime, NOW))
                }
                .boxed()
            })
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    async fn get(
        cache: &Arc<TokenCache>,
        k: &CacheKey,
        freshness: Freshness,
        upstream: &Upstream,
        now: i64,
    ) -> Served {
        cache
            .get_at(k.clone(), freshness, upstream.fetch(), now)
            .await
            .unwrap()
    }

    fn cache(capacity: usize) -> Arc<TokenCache> {
        TokenCache::new(capacity, CacheMetrics::default())
    }

    /// Waits (bounded) until `check` holds; background flights complete on their own.
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !check() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn twenty_concurrent_misses_make_one_upstream_call() {
        let cache = cache(16);
        let mut upstream = Upstream::new(3600);
        let gate = Arc::new(Notify::new());
        upstream.gate = Some(Arc::clone(&gate));
        let k = key("id", "r");
        let mut waiters = Vec::new();
        for _ in 0..20 {
            let (cache, k, upstream) = (Arc::clone(&cache), k.clone(), upstream.clone());
            waiters.push(tokio::spawn(async move {
                get(&cache, &k, Freshness::Cached, &upstream, NOW).await
            }));
        }
        // Every waiter has planned once the flight's one call is in progress and held.
        eventually("the one call", || upstream.calls() == 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.notify_waiters();
        gate.notify_one();
        for waiter in waiters {
            let served = waiter.await.unwrap();
            assert_eq!(served.token.access_token(), "tok-1");
            assert_eq!(served.source, Source::Upstream);
        }
        assert_eq!(upstream.calls(), 1);
        let again = get(&cache, &k, Freshness::Cached, &upstream, NOW + 10).await;
        assert_eq!(again.source, Source::Cache);
        assert_eq!(upstream.calls(), 1);
    }

    #[tokio::test]
    async fn served_while_more_than_five_minutes_remain_with_real_expiry() {
        let cache = cache(16);
        let upstream = Upstream::new(3600);
        let k = key("id", "r");
        let first = get(&cache, &k, Freshness::Cached, &upstream, NOW).await;
        assert_eq!(first.token.expires_on, NOW + 3600);
        // 301 s left, but refresh-ahead is due: served, refreshed in the background once.
        let late = NOW + 3600 - SERVE_MARGIN - 1;
        let served = get(&cache, &k, Freshness::Cached, &upstream, late).await;
        assert_eq!(served.source, Source::Cache);
        assert_eq!(
            served.token.expires_on,
            NOW + 3600,
            "the real expiry, not re-stamped"
        );
        eventually("the background refresh", || upstream.calls() == 2).await;
        // 300 s left: never served; the request waits for a new call.
        let other = self::cache(16);
        let upstream = Upstream::new(3600);
        get(&other, &k, Freshness::Cached, &upstream, NOW).await;
        let expired = NOW + 3600 - SERVE_MARGIN;
        let served = get(&other, &k, Freshness::Cached, &upstream, expired).await;
        assert_eq!(served.source, Source::Upstream);
        assert_eq!(upstream.calls(), 2);
    }

    #[tokio::test]
    async fn refresh_ahead_runs_once_in_the_background_and_its_token_is_served() {
        let cache = cache(16);
        let upstream = Upstream::new(3600);
        let k = key("id", "r");
        get(&cache, &k, Freshness::Cached, &upstream, NOW).await;
        let before_point = refresh_point(&Token::new(String::new(), NOW + 3600, NOW)) - 1;
        assert_eq!(before_point, NOW + 1799);
        get(&cache, &k, Freshness::Cached, &upstream, before_point).await;
        assert_eq!(upstream.calls(), 1, "not due yet");
        let due = NOW + 1800;
        let served = get(&cache, &k, Freshness::Cached, &upstream, due).await;
        assert_eq!(
            served.token.access_token(),
            "tok-1",
            "served while refreshing"
        );
        eventually("the refresh", || upstream.calls() == 2).await;
        let k2 = k.clone();
        let cache2 = Arc::clone(&cache);
        eventually("the refreshed token cached", move || {
            cache2
                .lock()
                .entries
                .get(&k2)
                .is_some_and(|e| e.flight.is_none())
        })
        .await;
        // The refreshed token (tok-2, also NOW + 3600 here) is served; no second refresh
        // within REFRESH_RETRY.
        let served = get(&cache, &k, Freshness::Cached, &upstream, due + 1).await;
        assert_eq!(served.token.access_token(), "tok-2");
        assert_eq!(upstream.calls(), 2);
        get(
            &cache,
            &k,
            Freshness::Cached,
            &upstream,
            due + REFRESH_RETRY,
        )
        .await;
        eventually("a retried refresh", || upstream.calls() == 3).await;
    }

    #[test]
    fn refresh_points() {
        let hour = Token::new(String::new(), NOW + 3600, NOW);
        assert_eq!(refresh_point(&hour), NOW + 1800);
        let day = Token::new(String::new(), NOW + 86_400, NOW);
        assert_eq!(refresh_point(&day), NOW + 43_200);
        let short = Token::new(String::new(), NOW + 900, NOW);
        assert_eq!(refresh_point(&short), NOW + 300);
    }

    #[tokio::test]
    async fn bypass_cache_forces_a_call_and_coalesces_with_forced_ones() {
        let cache = cache(16);
        let upstream = Upstream::new(3600);
        let k = key("id", "r");
        get(&cache, &k, Freshness::Cached, &upstream, NOW).await;
        let fresh = get(&cache, &k, Freshness::Fresh, &upstream, NOW + 1).await;
        assert_eq!(fresh.source, Source::Upstream);
        assert_eq!(fresh.token.access_token(), "tok-2");
        assert_eq!(
            upstream.forced.load(Ordering::SeqCst),
            1,
            "upstream is told to bypass too"
        );
        let cached = get(&cache, &k, Freshness::Cached, &upstream, NOW + 2).await;
        assert_eq!(
            cached.token.access_token(),
            "tok-2",
            "the fresh token replaces the old"
        );
    }

    #[tokio::test]
    async fn token_sha256_to_refresh_forces_only_when_it_names_the_cached_token() {
        let cache = cache(16);
        let upstream = Upstream::new(3600);
        let k = key("id", "r");
        let first = get(&cache, &k, Freshness::Cached, &upstream, NOW).await;
        let other = Token::new("something else".into(), 0, 0).sha256_hex();
        let served = get(
            &cache,
            &k,
            Freshness::of(false, Some(&other)),
            &upstream,
            NOW + 1,
        )
        .await;
        assert_eq!(served.source, Source::Cache);
        assert_eq!(upstream.calls(), 1);
        let sha = first.token.sha256_hex().to_uppercase();
        let served = get(
            &cache,
            &k,
            Freshness::of(false, Some(&sha)),
            &upstream,
            NOW + 2,
        )
        .await;
        assert_eq!(served.source, Source::Upstream);
        assert_eq!(served.token.access_token(), "tok-2");
        assert_eq!(Freshness::of(true, Some("x")), Freshness::Fresh);
    }

    #[tokio::test]
    async fn failures_are_shared_and_not_cached() {
        let cache = cache(16);
        let mut upstream = Upstream::new(3600);
        upstream.fail = true;
        let k = key("id", "r");
        let failed = cache
            .get_at(k.clone(), Freshness::Cached, upstream.fetch(), NOW)
            .await;
        assert!(matches!(failed, Err(UpstreamError::Unavailable { .. })));
        upstream.fail = false;
        let served = get(&cache, &k, Freshness::Cached, &upstream, NOW).await;
        assert_eq!(served.token.access_token(), "tok-2");
    }

    #[tokio::test]
    async fn bounded_least_recently_used_first() {
        let cache = cache(2);
        let upstream = Upstream::new(3600);
        let (a, b, c) = (key("a", "r"), key("b", "r"), key("c", "r"));
        get(&cache, &a, Freshness::Cached, &upstream, NOW).await;
        get(&cache, &b, Freshness::Cached, &upstream, NOW).await;
        get(&cache, &a, Freshness::Cached, &upstream, NOW).await;
        get(&cache, &c, Freshness::Cached, &upstream, NOW).await;
        assert_eq!(cache.lock().len(), 2);
        assert_eq!(upstream.calls(), 3);
        assert_eq!(
            get(&cache, &a, Freshness::Cached, &upstream, NOW)
                .await
                .source,
            Source::Cache
        );
        assert_eq!(
            get(&cache, &b, Freshness::Cached, &upstream, NOW)
                .await
                .source,
            Source::Upstream,
            "b was the least recently used"
        );
        let state = cache.lock();
        assert_eq!(state.lru.len(), state.entries.len());
    }

    #[tokio::test]
    async fn keys_of_changed_or_unassigned_identities_are_dropped() {
        let cache = cache(16);
        let upstream = Upstream::new(3600);
        let old = key("id", "r");
        let mut changed = old.clone();
        changed.identity.fingerprint = [1; 32];
        get(&cache, &old, Freshness::Cached, &upstream, NOW).await;
        get(
            &cache,
            &key("other", "r"),
            Freshness::Cached,
            &upstream,
            NOW,
        )
        .await;
        // The spec changed: the new key misses, and the old one is dropped.
        assert_eq!(
            get(&cache, &changed, Freshness::Cached, &upstream, NOW)
                .await
                .source,
            Source::Upstream
        );
        cache.retain(|identity| *identity == changed.identity);
        assert_eq!(cache.lock().len(), 1);
        assert_eq!(cache.lock().lru.len(), 1);
        assert_eq!(
            get(&cache, &changed, Freshness::Cached, &upstream, NOW)
                .await
                .source,
            Source::Cache
        );
    }

    #[tokio::test]
    async fn a_flight_of_a_dropped_key_is_not_cached() {
        let cache = cache(16);
        let mut upstream = Upstream::new(3600);
        let gate = Arc::new(Notify::new());
        upstream.gate = Some(Arc::clone(&gate));
        let k = key("id", "r");
        let waiter = {
            let (cache, k, upstream) = (Arc::clone(&cache), k.clone(), upstream.clone());
            tokio::spawn(async move { get(&cache, &k, Freshness::Cached, &upstream, NOW).await })
        };
        eventually("the call", || upstream.calls() == 1).await;
        cache.retain(|_| false);
        gate.notify_one();
        let served = waiter.await.unwrap();
        assert_eq!(
            served.token.access_token(),
            "tok-1",
            "the waiter still gets it"
        );
        assert_eq!(cache.lock().len(), 0, "but it is not cached");
    }
}
