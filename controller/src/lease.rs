//! Leader election on one `coordination.k8s.io/v1` Lease, kubert style: a pure [`decide`] and a
//! thin shell whose every write is preconditioned on the resourceVersion it read (a 409 means
//! someone else won). Timings (DESIGN.md "Names shared by the parts"): lease 15 s, the holder
//! renews every 5 s and gives up after 10 s without a successful renewal, a standby retries
//! every 2 s and takes over once `renewTime + leaseDurationSeconds` has passed.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The lease's timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// `leaseDurationSeconds`: how long a renewal holds the lease.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// The holder gives up (stops writing, exits) this long after its last successful renewal.
    pub renew_deadline: Duration,
    /// How often a standby looks at the lease.
    pub retry_every: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
            retry_every: Duration::from_secs(2),
        }
    }
}

/// Which Lease, and who we are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// Stable per replica (the pod name): a restarted replica renews its own lease.
    pub holder: String,
    pub timings: LeaseTimings,
}

/// What to do about the lease as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Absent, released, or expired: take it.
    Acquire,
    /// Ours: renew it.
    Renew,
    /// Held by `holder` until `expires`.
    Follow { holder: String, expires: Timestamp },
}

/// The pure rule. `lease` is `None` when the Lease object does not exist. A lease without a
/// renewTime or duration, or with an empty holder, is free; one whose `renewTime +
/// leaseDurationSeconds` is before `now` has expired.
pub fn decide(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let (Some(renewed), Some(seconds)) = (spec.renew_time.as_ref(), spec.lease_duration_seconds)
    else {
        return Decision::Acquire;
    };
    let expires = renewed
        .0
        .checked_add(SignedDuration::from_secs(i64::from(seconds.max(0))))
        .unwrap_or(Timestamp::MAX);
    if expires < now {
        Decision::Acquire
    } else {
        Decision::Follow {
            holder: holder.to_owned(),
            expires,
        }
    }
}

/// The spec we write when taking or renewing the lease.
fn claimed_spec(
    previous: Option<&LeaseSpec>,
    me: &str,
    now: Timestamp,
    timings: &LeaseTimings,
) -> LeaseSpec {
    let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(me);
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.to_owned()),
        acquire_time: if ours {
            previous
                .and_then(|p| p.acquire_time.clone())
                .or(Some(MicroTime(now)))
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_duration_seconds: Some(i32::try_from(timings.duration.as_secs()).unwrap_or(i32::MAX)),
        lease_transitions: Some(if ours || previous.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..previous.cloned().unwrap_or_default()
    }
}

/// Errors of the lease shell.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lost lease {namespace}/{name}: {why}")]
    Lost {
        namespace: String,
        name: String,
        why: String,
    },
}

/// The leader flag, read by every writer before each write.
#[derive(Debug, Clone)]
pub struct Leadership {
    tx: watch::Sender<bool>,
}

impl Default for Leadership {
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(false),
        }
    }
}

impl Leadership {
    pub fn is_leader(&self) -> bool {
        *self.tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    fn set(&self, leader: bool) {
        self.tx
            .send_if_modified(|v| std::mem::replace(v, leader) != leader);
    }
}

/// The lease's metrics.
#[derive(Debug, Clone, Default)]
pub struct LeaseMetrics {
    leader: Gauge,
    acquisitions: Counter,
    renewal_failures: Counter,
}

impl LeaseMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "leader",
            "1 while this replica holds the lease and may write",
            m.leader.clone(),
        );
        registry.register(
            "lease_acquisitions",
            "Times this replica took the lease",
            m.acquisitions.clone(),
        );
        registry.register(
            "lease_renewal_failures",
            "Lease renewals that failed (the holder gives up after 10 s of them)",
            m.renewal_failures.clone(),
        );
        m
    }
}

/// The lease shell.
#[derive(Debug)]
pub struct LeaseElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    leadership: Leadership,
    metrics: LeaseMetrics,
}

enum Attempt {
    Held(Box<Lease>),
    Follow,
}

impl LeaseElector {
    pub fn new(
        client: kube::Client,
        settings: LeaseSettings,
        leadership: Leadership,
        metrics: LeaseMetrics,
    ) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            leadership,
            metrics,
        }
    }

    fn lost(&self, why: impl Into<String>) -> LeaseError {
        LeaseError::Lost {
            namespace: self.settings.namespace.clone(),
            name: self.settings.name.clone(),
            why: why.into(),
        }
    }

    /// Follows until it holds the lease, then renews it. Returns `Ok` when `release` is
    /// cancelled (after giving a held lease up), `Err` when a held lease is lost: the caller
    /// must stop writing and exit, which the flag has already told every writer.
    pub async fn run(self, release: CancellationToken) -> Result<(), LeaseError> {
        let (held, renewed_at) = tokio::select! {
            () = release.cancelled() => return Ok(()),
            held = self.follow() => held,
        };
        self.metrics.acquisitions.inc();
        self.metrics.leader.set(1);
        self.leadership.set(true);
        info!(lease = %self.settings.name, holder = %self.settings.holder, "lease acquired: leading");
        let result = self.lead(held, renewed_at, &release).await;
        self.leadership.set(false);
        self.metrics.leader.set(0);
        result
    }

    /// Polls every `retry_every` until the lease is ours; returns it with the instant its
    /// renewTime was taken (no later than this).
    async fn follow(&self) -> (Lease, Instant) {
        let mut last_holder = String::new();
        loop {
            let started = Instant::now();
            match self.try_acquire(&mut last_holder).await {
                Ok(Attempt::Held(lease)) => return (*lease, started),
                Ok(Attempt::Follow) => {}
                Err(error) => {
                    warn!(lease = %self.settings.name, %error, "reading the lease failed; retrying")
                }
            }
            tokio::time::sleep(self.settings.timings.retry_every).await;
        }
    }

    async fn try_acquire(&self, last_holder: &mut String) -> Result<Attempt, kube::Error> {
        let me = self.settings.holder.as_str();
        let Some(current) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(claimed_spec(
                    None,
                    me,
                    Timestamp::now(),
                    &self.settings.timings,
                )),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => Ok(Attempt::Held(Box::new(created))),
                Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(Attempt::Follow),
                Err(e) => Err(e),
            };
        };
        match decide(current.spec.as_ref(), me, Timestamp::now()) {
            Decision::Follow { holder, expires } => {
                if *last_holder != holder {
                    info!(lease = %self.settings.name, %holder, %expires, "standing by");
                    *last_holder = holder;
                }
                Ok(Attempt::Follow)
            }
            Decision::Acquire | Decision::Renew => match self.write(&current).await {
                Ok(lease) => Ok(Attempt::Held(Box::new(lease))),
                Err(kube::Error::Api(s)) if s.is_conflict() => {
                    debug!(lease = %self.settings.name, "another replica took the lease first");
                    Ok(Attempt::Follow)
                }
                Err(e) => Err(e),
            },
        }
    }

    /// Claims or renews on top of `current`, preconditioned on its resourceVersion.
    async fn write(&self, current: &Lease) -> Result<Lease, kube::Error> {
        let mut next = current.clone();
        next.metadata.managed_fields = None;
        next.spec = Some(claimed_spec(
            current.spec.as_ref(),
            &self.settings.holder,
            Timestamp::now(),
            &self.settings.timings,
        ));
        self.api
            .replace(&self.settings.name, &PostParams::default(), &next)
            .await
    }

    /// Renews every `renew_every`; gives up `renew_deadline` after the last good renewal.
    async fn lead(
        &self,
        mut held: Lease,
        mut renewed_at: Instant,
        release: &CancellationToken,
    ) -> Result<(), LeaseError> {
        let timings = self.settings.timings;
        let mut next_try = renewed_at + timings.renew_every;
        loop {
            tokio::select! {
                () = release.cancelled() => {
                    self.release(&held).await;
                    return Ok(());
                }
                () = tokio::time::sleep_until(next_try.into()) => {}
            }
            let deadline = renewed_at + timings.renew_deadline;
            let Some(left) = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            else {
                self.leadership.set(false);
                return Err(self.lost(format!(
                    "no successful renewal for {:?}",
                    timings.renew_deadline
                )));
            };
            let started = Instant::now();
            match tokio::time::timeout(left, self.write(&held)).await {
                Ok(Ok(lease)) => {
                    held = lease;
                    renewed_at = started;
                    next_try = renewed_at + timings.renew_every;
                }
                Ok(Err(kube::Error::Api(s))) if s.is_conflict() => {
                    // someone wrote the lease: still ours only if it still names us
                    match self.api.get_opt(&self.settings.name).await {
                        Ok(Some(current))
                            if decide(
                                current.spec.as_ref(),
                                &self.settings.holder,
                                Timestamp::now(),
                            ) == Decision::Renew =>
                        {
                            held = current;
                            next_try = Instant::now();
                        }
                        Ok(Some(current)) => {
                            self.leadership.set(false);
                            let holder = current
                                .spec
                                .and_then(|s| s.holder_identity)
                                .unwrap_or_default();
                            return Err(self.lost(format!("now held by {holder:?}")));
                        }
                        Ok(None) => {
                            self.leadership.set(false);
                            return Err(self.lost("the Lease object was deleted"));
                        }
                        Err(error) => {
                            self.metrics.renewal_failures.inc();
                            warn!(lease = %self.settings.name, %error, "reading the lease after a conflict failed");
                            next_try = Instant::now() + timings.retry_every.min(left);
                        }
                    }
                }
                Ok(Err(error)) => {
                    self.metrics.renewal_failures.inc();
                    warn!(lease = %self.settings.name, %error, "renewing the lease failed; retrying");
                    next_try = Instant::now() + Duration::from_millis(500).min(left);
                }
                Err(_elapsed) => {
                    self.metrics.renewal_failures.inc();
                    self.leadership.set(false);
                    return Err(self.lost(format!(
                        "no successful renewal for {:?}",
                        timings.renew_deadline
                    )));
                }
            }
        }
    }

    /// Gives the lease up so a standby takes over at its next look instead of at expiry.
    async fn release(&self, held: &Lease) {
        self.leadership.set(false);
        let mut next = held.clone();
        next.metadata.managed_fields = None;
        if let Some(spec) = next.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = Some(MicroTime(Timestamp::now()));
        }
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => info!(lease = %self.settings.name, "lease released"),
            Err(error) => {
                warn!(lease = %self.settings.name, %error, "releasing the lease failed; it expires on its own")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    fn spec(holder: Option<&str>, renewed: Option<i64>, duration: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: renewed.map(|s| MicroTime(at(s))),
            lease_duration_seconds: duration,
            ..Default::default()
        }
    }

    #[test]
    fn decide_table() {
        let cases: Vec<(&str, Option<LeaseSpec>, i64, Decision)> = vec![
            ("no lease object", None, 0, Decision::Acquire),
            (
                "released (no holder)",
                Some(spec(None, Some(0), Some(15))),
                1,
                Decision::Acquire,
            ),
            (
                "released (empty holder)",
                Some(spec(Some(""), Some(0), Some(15))),
                1,
                Decision::Acquire,
            ),
            (
                "ours",
                Some(spec(Some("me"), Some(0), Some(15))),
                1,
                Decision::Renew,
            ),
            (
                "ours even expired (restarted replica)",
                Some(spec(Some("me"), Some(0), Some(15))),
                100,
                Decision::Renew,
            ),
            (
                "theirs, fresh",
                Some(spec(Some("other"), Some(0), Some(15))),
                10,
                Decision::Follow {
                    holder: "other".into(),
                    expires: at(15),
                },
            ),
            (
                "theirs, exactly at expiry still held",
                Some(spec(Some("other"), Some(0), Some(15))),
                15,
                Decision::Follow {
                    holder: "other".into(),
                    expires: at(15),
                },
            ),
            (
                "theirs, expired",
                Some(spec(Some("other"), Some(0), Some(15))),
                16,
                Decision::Acquire,
            ),
            (
                "theirs, never renewed",
                Some(spec(Some("other"), None, Some(15))),
                0,
                Decision::Acquire,
            ),
            (
                "theirs, no duration",
                Some(spec(Some("other"), Some(0), None)),
                0,
                Decision::Acquire,
            ),
        ];
        for (name, lease, now, want) in cases {
            assert_eq!(decide(lease.as_ref(), "me", at(now)), want, "{name}");
        }
    }

    #[test]
    fn claims_count_transitions_and_keep_acquire_time_on_renewal() {
        let timings = LeaseTimings::default();
        let first = claimed_spec(None, "a", at(0), &timings);
        assert_eq!(first.holder_identity.as_deref(), Some("a"));
        assert_eq!(first.lease_duration_seconds, Some(15));
        assert_eq!(first.lease_transitions, Some(0));
        let renewed = claimed_spec(Some(&first), "a", at(5), &timings);
        assert_eq!(renewed.acquire_time, first.acquire_time);
        assert_eq!(renewed.renew_time, Some(MicroTime(at(5))));
        assert_eq!(renewed.lease_transitions, Some(0));
        let taken = claimed_spec(Some(&renewed), "b", at(30), &timings);
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(30))));
        assert_eq!(taken.lease_transitions, Some(1));
    }

    #[test]
    fn standby_takes_over_within_lease_plus_retry() {
        // the holder's last renewal at 0; a standby looking every 2 s from any phase
        let timings = LeaseTimings::default();
        let lease = spec(Some("holder"), Some(0), Some(15));
        for phase_ms in (0..2000).step_by(250) {
            let mut t_ms = phase_ms;
            while decide(
                Some(&lease),
                "standby",
                Timestamp::from_millisecond(at(0).as_millisecond() + t_ms).unwrap(),
            ) != Decision::Acquire
            {
                t_ms += timings.retry_every.as_millis() as i64;
            }
            assert!(
                t_ms <= (timings.duration + timings.retry_every).as_millis() as i64,
                "took over at {t_ms} ms"
            );
        }
        assert!(
            timings.renew_deadline < timings.duration,
            "the holder gives up before a standby may take over"
        );
    }
}
