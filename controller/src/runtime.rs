//! Wiring: the four watches feed the index and the queues, the lease decides who writes, the
//! workers reconcile. Every replica keeps warm caches; the queues open only once this replica
//! leads *and* every watch has listed, and then everything is reconciled at once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;
use kube::runtime::events::Reporter;
use kube::runtime::watcher;
use podid_api::crd::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, BINDING_LABEL};
use podid_api::matching::MatchPolicy;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, info_span, warn};

use crate::config::Settings;
use crate::health::{self, HealthError, HealthState};
use crate::index::{Affected, Index, ObjectKey};
use crate::lease::{Leadership, LeaseElector, LeaseError, LeaseMetrics};
use crate::metrics::{Metrics, Subject};
use crate::queue::WorkQueue;
use crate::reconcile::{ReconcileError, Reconciler, lock};
use crate::watch::{self, Change, Synced};
use crate::{FIELD_MANAGER, MANAGED_BY_LABEL};

const PODS: &str = "pods";
const BINDINGS: &str = "azureidentitybindings";
const IDENTITIES: &str = "azureidentities";
const ASSIGNMENTS: &str = "azureassignedidentities";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("the {task} task ended unexpectedly: {why}")]
    Task { task: &'static str, why: String },
}

struct Shared {
    index: Arc<Mutex<Index>>,
    pods: Arc<WorkQueue<ObjectKey>>,
    bindings: Arc<WorkQueue<ObjectKey>>,
    metrics: Metrics,
    synced: Synced,
    leadership: Leadership,
}

impl Shared {
    fn enqueue(&self, affected: Affected) {
        self.pods.extend(affected.pods);
        self.bindings.extend(affected.bindings);
    }
}

/// A read-only view of a running controller, for tests and the health listener.
#[derive(Debug, Clone)]
pub struct ControllerHandle {
    health: HealthState,
    leadership: Leadership,
}

impl ControllerHandle {
    /// The `/metrics` text.
    pub fn metrics_text(&self) -> String {
        self.health.metrics_text()
    }

    /// Whether every watch has listed (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.health.synced.is_synced()
    }

    /// Whether this replica holds the lease.
    pub fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }
}

/// The controller, built and then [`run`](Controller::run).
pub struct Controller {
    client: Client,
    settings: Settings,
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    lease_metrics: LeaseMetrics,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Controller {
    pub fn new(client: Client, settings: Settings) -> Self {
        let mut registry = Registry::with_prefix("podid_controller");
        let metrics = Metrics::register(&mut registry);
        let lease_metrics = LeaseMetrics::register(&mut registry);
        let policy = MatchPolicy {
            cluster_wide: settings.cluster_wide_bindings,
        };
        let shared = Arc::new(Shared {
            index: Arc::new(Mutex::new(Index::new(policy))),
            pods: Arc::new(WorkQueue::new(metrics.queue_depth.clone())),
            // the binding queue is tiny and short-lived; its depth is not worth a metric
            bindings: Arc::new(WorkQueue::new(Gauge::default())),
            metrics,
            synced: Synced::new(&[PODS, BINDINGS, IDENTITIES, ASSIGNMENTS]),
            leadership: Leadership::default(),
        });
        Self {
            client,
            settings,
            shared,
            registry: Arc::new(registry),
            lease_metrics,
        }
    }

    pub fn handle(&self) -> ControllerHandle {
        ControllerHandle {
            health: HealthState {
                registry: Arc::clone(&self.registry),
                synced: self.shared.synced.clone(),
            },
            leadership: self.shared.leadership.clone(),
        }
    }

    /// Runs until `shutdown` (then stops writing, gives the lease up, and returns `Ok`) or
    /// until the lease is lost (then stops writing at once and returns the error).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let mut tasks: JoinSet<&'static str> = JoinSet::new();
        if let Some(addr) = self.settings.health_addr {
            let listener = health::bind(addr).await?;
            info!(%addr, "serving /healthz, /readyz, /metrics");
            let state = self.handle().health;
            // served until the task set is shut down, after the lease is handled
            tasks.spawn(async move {
                health::serve(listener, state, CancellationToken::new()).await;
                "health"
            });
        }
        self.spawn_watches(&mut tasks);
        self.spawn_workers(&mut tasks);

        let release = CancellationToken::new();
        let elector = LeaseElector::new(
            self.client.clone(),
            self.settings.lease.clone(),
            self.shared.leadership.clone(),
            self.lease_metrics.clone(),
        );
        let mut lease = tokio::spawn(elector.run(release.clone()).instrument(info_span!("lease")));

        let outcome = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                info!("shutting down");
                Ok(())
            }
            ended = &mut lease => match ended {
                Ok(Ok(())) => Ok(()),
                Ok(Err(lost)) => Err(RunError::from(lost)),
                Err(join) => Err(RunError::Task { task: "lease", why: join.to_string() }),
            },
            Some(ended) = tasks.join_next() => Err(match ended {
                Ok(task) => RunError::Task { task, why: "returned".into() },
                Err(join) => RunError::Task { task: "worker", why: join.to_string() },
            }),
        };
        // stop writing first, then give the lease up, so no two replicas ever write at once
        tasks.shutdown().await;
        if !lease.is_finished() {
            release.cancel();
            if let Err(join) = lease.await {
                warn!(error = %join, "the lease task failed while releasing");
            }
        }
        outcome
    }

    fn spawn_watches(&self, tasks: &mut JoinSet<&'static str>) {
        let client = &self.client;
        let shared = &self.shared;

        let s = Arc::clone(shared);
        let pods: Api<Pod> = Api::all(client.clone());
        tasks.spawn(
            watch::run(
                PODS,
                pods,
                watcher::Config::default().labels(BINDING_LABEL),
                watch::trim_pod,
                shared.synced.clone(),
                shared.metrics.clone(),
                move |change| {
                    let affected = {
                        let mut index = lock(&s.index);
                        match change {
                            Change::Apply(pod) => index.apply_pod(pod),
                            Change::Delete(pod) => ObjectKey::of(&pod)
                                .map(|k| index.delete_pod(&k))
                                .unwrap_or_default(),
                            Change::Reset(all) => index.reset_pods(all),
                        }
                    };
                    s.enqueue(affected);
                },
            )
            .instrument(info_span!("watch", resource = PODS))
            .map_done(PODS),
        );

        let s = Arc::clone(shared);
        let bindings: Api<AzureIdentityBinding> = Api::all(client.clone());
        tasks.spawn(
            watch::run(
                BINDINGS,
                bindings,
                watcher::Config::default(),
                watch::trim_managed_fields,
                shared.synced.clone(),
                shared.metrics.clone(),
                move |change| {
                    let affected = {
                        let mut index = lock(&s.index);
                        match change {
                            Change::Apply(b) => index.apply_binding(b),
                            Change::Delete(b) => ObjectKey::of(&b)
                                .map(|k| index.delete_binding(&k))
                                .unwrap_or_default(),
                            Change::Reset(all) => index.reset_bindings(all),
                        }
                    };
                    s.enqueue(affected);
                },
            )
            .instrument(info_span!("watch", resource = BINDINGS))
            .map_done(BINDINGS),
        );

        let s = Arc::clone(shared);
        let identities: Api<AzureIdentity> = Api::all(client.clone());
        tasks.spawn(
            watch::run(
                IDENTITIES,
                identities,
                watcher::Config::default(),
                watch::trim_managed_fields,
                shared.synced.clone(),
                shared.metrics.clone(),
                move |change| {
                    let affected = {
                        let mut index = lock(&s.index);
                        match change {
                            Change::Apply(i) => index.apply_identity(i),
                            Change::Delete(i) => ObjectKey::of(&i)
                                .map(|k| index.delete_identity(&k))
                                .unwrap_or_default(),
                            Change::Reset(all) => index.reset_identities(all),
                        }
                    };
                    s.enqueue(affected);
                },
            )
            .instrument(info_span!("watch", resource = IDENTITIES))
            .map_done(IDENTITIES),
        );

        let s = Arc::clone(shared);
        let assignments: Api<AzureAssignedIdentity> = Api::all(client.clone());
        tasks.spawn(
            watch::run(
                ASSIGNMENTS,
                assignments,
                watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={FIELD_MANAGER}")),
                watch::trim_managed_fields,
                shared.synced.clone(),
                shared.metrics.clone(),
                move |change| {
                    let (affected, count) = {
                        let mut index = lock(&s.index);
                        let affected = match change {
                            Change::Apply(a) => index.apply_assignment(a),
                            Change::Delete(a) => index.delete_assignment(&a),
                            Change::Reset(all) => index.reset_assignments(all),
                        };
                        (affected, index.assignment_count())
                    };
                    s.metrics
                        .assignments
                        .set(i64::try_from(count).unwrap_or(i64::MAX));
                    s.enqueue(affected);
                },
            )
            .instrument(info_span!("watch", resource = ASSIGNMENTS))
            .map_done(ASSIGNMENTS),
        );
    }

    fn spawn_workers(&self, tasks: &mut JoinSet<&'static str>) {
        let shared = &self.shared;
        let reconciler = Reconciler::new(
            self.client.clone(),
            Arc::clone(&shared.index),
            shared.metrics.clone(),
            shared.leadership.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance: Some(self.settings.lease.holder.clone()),
            },
        );

        let s = Arc::clone(shared);
        tasks.spawn(async move {
            open_queues_when_leading(&s).await;
            "activation"
        });

        for _ in 0..self.settings.workers.max(1) {
            let s = Arc::clone(shared);
            let reconciler = reconciler.clone();
            tasks.spawn(async move {
                loop {
                    let key = s.pods.next().await;
                    let started = Instant::now();
                    let result = reconciler
                        .reconcile_pod(&key)
                        .instrument(info_span!("reconcile", pod = %key))
                        .await;
                    let seconds = started.elapsed().as_secs_f64();
                    match result {
                        Ok(()) => {
                            s.metrics.reconciled(Subject::Pod, true, Some(seconds));
                            s.pods.done(&key);
                        }
                        // leadership is gone: the process is stopping
                        Err(ReconcileError::NotLeader { .. }) => s.pods.done(&key),
                        Err(error) => {
                            s.metrics.reconciled(Subject::Pod, false, Some(seconds));
                            let delay = s.pods.retry(key.clone());
                            warn!(pod = %key, %error, retry_in = ?delay, "reconcile failed");
                        }
                    }
                }
            });
        }

        let s = Arc::clone(shared);
        tasks.spawn(async move {
            let mut reported = HashSet::new();
            loop {
                let key = s.bindings.next().await;
                match reconciler.reconcile_binding(&key, &mut reported).await {
                    Ok(()) => {
                        s.metrics.reconciled(Subject::Binding, true, None);
                        s.bindings.done(&key);
                    }
                    Err(ReconcileError::NotLeader { .. }) => s.bindings.done(&key),
                    Err(error) => {
                        s.metrics.reconciled(Subject::Binding, false, None);
                        let delay = s.bindings.retry(key.clone());
                        warn!(binding = %key, %error, retry_in = ?delay, "binding reconcile failed");
                    }
                }
            }
        });
    }
}

/// Opens the queues once every watch has listed and this replica leads, then reconciles
/// everything known; closes them if leadership goes (the process then stops anyway).
async fn open_queues_when_leading(shared: &Shared) {
    shared.synced.wait().await;
    let mut leading = shared.leadership.subscribe();
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return std::future::pending().await;
        }
        shared.pods.activate();
        shared.bindings.activate();
        let (pods, bindings) = {
            let index = lock(&shared.index);
            (index.all_pod_keys(), index.all_binding_keys())
        };
        info!(
            pods = pods.len(),
            bindings = bindings.len(),
            "leading with synced caches: reconciling everything"
        );
        shared.pods.extend(pods);
        shared.bindings.extend(bindings);
        if leading.wait_for(|l| !*l).await.is_err() {
            return std::future::pending().await;
        }
        shared.pods.deactivate();
        shared.bindings.deactivate();
    }
}

/// Names a watch task for the join set.
trait MapDone: std::future::Future<Output = ()> + Sized {
    fn map_done(self, name: &'static str) -> impl std::future::Future<Output = &'static str> {
        async move {
            self.await;
            name
        }
    }
}

impl<F: std::future::Future<Output = ()>> MapDone for F {}
