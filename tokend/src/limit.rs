//! Per-pod request limits, so one noisy pod cannot starve the node: a token bucket per pod
//! netns (`--pod-rps` refill, `--pod-burst` size) and a bound on its requests in progress
//! (`--pod-inflight`). [`Bucket`] is the pure rule; [`PodLimiter`] keeps one per netns and
//! forgets the idle ones (a full bucket and nothing in progress is the same as none).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::netns::NetnsId;

/// Buckets kept before the first sweep of idle ones.
const SWEEP_FLOOR: usize = 1024;

/// The limits of one pod.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Tokens added per second.
    pub rps: f64,
    /// Bucket size.
    pub burst: f64,
    /// Requests in progress at once.
    pub inflight: u32,
}

/// A token bucket and the requests in progress of one pod.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
    inflight: u32,
}

impl Bucket {
    /// A full bucket.
    pub fn new(limits: &Limits, now: Instant) -> Self {
        Self {
            tokens: limits.burst,
            last: now,
            inflight: 0,
        }
    }

    fn refill(&mut self, limits: &Limits, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limits.rps).min(limits.burst);
        self.last = now;
    }

    /// Admits one request at `now`, or says why not.
    pub fn admit(&mut self, limits: &Limits, now: Instant) -> Result<(), Refusal> {
        if self.inflight >= limits.inflight {
            return Err(Refusal::InFlight);
        }
        self.refill(limits, now);
        if self.tokens < 1.0 {
            let wait = (1.0 - self.tokens) / limits.rps;
            return Err(Refusal::Rate {
                retry_after: Duration::from_secs_f64(wait),
            });
        }
        self.tokens -= 1.0;
        self.inflight += 1;
        Ok(())
    }

    /// One admitted request finished.
    pub fn release(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// Whether the bucket is back to a fresh one's state (full, nothing in progress).
    fn idle(&mut self, limits: &Limits, now: Instant) -> bool {
        self.refill(limits, now);
        self.inflight == 0 && self.tokens >= limits.burst
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// The bucket is empty; a token comes after `retry_after`.
    Rate { retry_after: Duration },
    /// Too many requests of this pod in progress.
    InFlight,
}

impl Refusal {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Self::Rate { retry_after } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                secs.max(1)
            }
            Self::InFlight => 1,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Requests refused with 429, by reason.
#[derive(Debug, Clone, Default)]
pub struct LimitMetrics {
    refused: Family<ReasonLabels, Counter>,
}

impl LimitMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "rate_limited",
            "Requests answered 429: the pod's rate, its requests in progress, or the node's upstream calls in progress",
            metrics.refused.clone(),
        );
        for reason in ["rate", "inflight", "upstream"] {
            metrics
                .refused
                .get_or_create(&ReasonLabels { reason })
                .inc_by(0);
        }
        metrics
    }

    fn count(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A request refused because the node's upstream calls were all in use.
    pub fn upstream_busy(&self) {
        self.count("upstream");
    }
}

#[derive(Debug)]
struct Buckets {
    by_netns: HashMap<NetnsId, Bucket>,
    sweep_at: usize,
}

/// The limits of every pod.
#[derive(Debug)]
pub struct PodLimiter {
    limits: Limits,
    buckets: Mutex<Buckets>,
    metrics: LimitMetrics,
}

/// An admitted request; dropping it ends it.
#[derive(Debug)]
pub struct Admission {
    limiter: Arc<PodLimiter>,
    netns: NetnsId,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut buckets = self.limiter.lock();
        if let Some(bucket) = buckets.by_netns.get_mut(&self.netns) {
            bucket.release();
        }
    }
}

impl PodLimiter {
    pub fn new(limits: Limits, metrics: LimitMetrics) -> Arc<Self> {
        Arc::new(Self {
            limits,
            buckets: Mutex::new(Buckets {
                by_netns: HashMap::new(),
                sweep_at: SWEEP_FLOOR,
            }),
            metrics,
        })
    }

    pub fn metrics(&self) -> &LimitMetrics {
        &self.metrics
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits one request of the pod in `netns`, or refuses it.
    pub fn admit(self: &Arc<Self>, netns: NetnsId) -> Result<Admission, Refusal> {
        self.admit_at(netns, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, netns: NetnsId, now: Instant) -> Result<Admission, Refusal> {
        self.take(netns, now, false).map(|()| Admission {
            limiter: Arc::clone(self),
            netns,
        })
    }

    /// Admits one request of the pod in `netns` that is answered at once (it counts against
    /// the pod's rate and needs a free in-progress place, which it gives back at once).
    pub fn admit_instant(&self, netns: NetnsId) -> Result<(), Refusal> {
        self.take(netns, Instant::now(), true)
    }

    fn take(&self, netns: NetnsId, now: Instant, done: bool) -> Result<(), Refusal> {
        let mut buckets = self.lock();
        if buckets.by_netns.len() >= buckets.sweep_at {
            let limits = self.limits;
            buckets.by_netns.retain(|_, b| !b.idle(&limits, now));
            buckets.sweep_at = (buckets.by_netns.len() * 2).max(SWEEP_FLOOR);
        }
        let limits = self.limits;
        let bucket = buckets
            .by_netns
            .entry(netns)
            .or_insert_with(|| Bucket::new(&limits, now));
        match bucket.admit(&limits, now) {
            Ok(()) => {
                if done {
                    bucket.release();
                }
                Ok(())
            }
            Err(refusal) => {
                self.metrics.count(match refusal {
                    Refusal::Rate { .. } => "rate",
                    Refusal::InFlight => "inflight",
                });
                Err(refusal)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        rps: 2.0,
        burst: 3.0,
        inflight: 2,
    };

    #[test]
    fn an_instant_admission_counts_against_the_rate_and_holds_no_place() {
        let limiter = PodLimiter::new(LIMITS, LimitMetrics::default());
        let netns = NetnsId { dev: 1, ino: 9 };
        let held = limiter.admit(netns).unwrap();
        // One place of two is held: instant ones pass and leave it so, until the bucket
        // (3) is empty.
        limiter.admit_instant(netns).unwrap();
        limiter.admit_instant(netns).unwrap();
        assert!(matches!(
            limiter.admit_instant(netns),
            Err(Refusal::Rate { .. })
        ));
        drop(held);
        let limiter = PodLimiter::new(LIMITS, LimitMetrics::default());
        let (_a, _b) = (limiter.admit(netns).unwrap(), limiter.admit(netns).unwrap());
        assert_eq!(limiter.admit_instant(netns), Err(Refusal::InFlight));
    }

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(&LIMITS, t0);
        for _ in 0..3 {
            bucket.admit(&LIMITS, t0).unwrap();
            bucket.release();
        }
        let refused = bucket.admit(&LIMITS, t0).unwrap_err();
        assert_eq!(
            refused,
            Refusal::Rate {
                retry_after: Duration::from_millis(500)
            }
        );
        assert_eq!(refused.retry_after_secs(), 1, "whole seconds, at least one");
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        bucket.admit(&LIMITS, t1).unwrap();
        bucket.release();
        assert!(bucket.admit(&LIMITS, t1).is_err());
        // The bucket never holds more than its burst.
        let later = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            bucket.admit(&LIMITS, later).unwrap();
            bucket.release();
        }
        assert!(bucket.admit(&LIMITS, later).is_err());
    }

    #[test]
    fn retry_after_rounds_up() {
        let slow = Limits {
            rps: 0.25,
            burst: 1.0,
            inflight: 1,
        };
        let t0 = Instant::now();
        let mut bucket = Bucket::new(&slow, t0);
        bucket.admit(&slow, t0).unwrap();
        bucket.release();
        let refused = bucket
            .admit(&slow, t0 + Duration::from_millis(100))
            .unwrap_err();
        assert_eq!(refused.retry_after_secs(), 4);
    }

    #[test]
    fn requests_in_progress_are_bounded_without_spending_tokens() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(&LIMITS, t0);
        bucket.admit(&LIMITS, t0).unwrap();
        bucket.admit(&LIMITS, t0).unwrap();
        assert_eq!(bucket.admit(&LIMITS, t0), Err(Refusal::InFlight));
        assert_eq!(Refusal::InFlight.retry_after_secs(), 1);
        bucket.release();
        bucket.admit(&LIMITS, t0).unwrap();
    }

    #[test]
    fn pods_are_limited_separately_and_admissions_release_on_drop() {
        let limiter = PodLimiter::new(LIMITS, LimitMetrics::default());
        let (a, b) = (NetnsId { dev: 1, ino: 1 }, NetnsId { dev: 1, ino: 2 });
        let t0 = Instant::now();
        let first = limiter.admit_at(a, t0).unwrap();
        let second = limiter.admit_at(a, t0).unwrap();
        assert_eq!(limiter.admit_at(a, t0).unwrap_err(), Refusal::InFlight);
        let _other = limiter
            .admit_at(b, t0)
            .expect("another pod is not affected");
        drop(first);
        let third = limiter.admit_at(a, t0).unwrap();
        drop((second, third));
        assert!(matches!(
            limiter.admit_at(a, t0).unwrap_err(),
            Refusal::Rate { .. }
        ));
    }

    #[test]
    fn idle_buckets_are_forgotten() {
        let limiter = PodLimiter::new(LIMITS, LimitMetrics::default());
        let t0 = Instant::now();
        let busy = NetnsId { dev: 9, ino: 9 };
        let held = limiter.admit_at(busy, t0).unwrap();
        for ino in 0..SWEEP_FLOOR as u64 - 1 {
            drop(limiter.admit_at(NetnsId { dev: 1, ino }, t0).unwrap());
        }
        // A second later every other bucket is full again and idle: swept.
        limiter
            .admit_at(NetnsId { dev: 2, ino: 0 }, t0 + Duration::from_secs(1))
            .map(drop)
            .unwrap();
        let buckets = limiter.lock();
        assert!(buckets.by_netns.len() <= 2, "{}", buckets.by_netns.len());
        assert!(
            buckets.by_netns.contains_key(&busy),
            "a pod with a request in progress stays"
        );
        drop(buckets);
        drop(held);
    }
}
