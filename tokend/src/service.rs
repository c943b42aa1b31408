//! The token service behind every pod listener: per-pod limits, then the identity decision
//! ([`crate::resolve`]) with its event-driven waits, then the token from the cache or
//! upstream. Exception pods are passed to the node's IMDS; instance metadata follows
//! `--instance-metadata`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt as _;
use podid_api::matching::MatchPolicy;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cache::{CacheKey, Fetch, Freshness, Source, TokenCache};
use crate::cluster::{Cluster, IdentityKey, fresher_view};
use crate::config::InstanceMetadata;
use crate::imds::{
    Caller, Failure, Generation, ImdsBackend, MetadataRequest, Reply, TokenRequest, token_body,
};
use crate::limit::{PodLimiter, Refusal};
use crate::registry::{PodAttribution, PodRef};
use crate::resolve::{Resolution, Target, resolve};
use crate::token::unix_now;
use crate::upstream::{Upstream, UpstreamError};

/// The resource of the token fetched to learn an identity's object id.
pub const OBJECT_ID_RESOURCE: &str = "https://management.azure.com/";
/// Rounds of object-id learning one request may cause.
const MAX_LEARNING_ROUNDS: usize = 2;

/// What tokend waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitKind {
    Pod,
    Assignment,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WaitLabels {
    kind: &'static str,
    result: &'static str,
}

/// The service's metrics.
#[derive(Debug, Clone, Default)]
pub struct ServiceMetrics {
    waits: Family<WaitLabels, Counter>,
}

impl ServiceMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "waits",
            "Token requests held for their pod (kind=pod) or its assignment (kind=assignment), by how the wait ended",
            metrics.waits.clone(),
        );
        for kind in ["pod", "assignment"] {
            for result in ["settled", "timeout"] {
                metrics
                    .waits
                    .get_or_create(&WaitLabels { kind, result })
                    .inc_by(0);
            }
        }
        metrics
    }

    fn wait(&self, kind: WaitKind, timed_out: bool) {
        let kind = match kind {
            WaitKind::Pod => "pod",
            WaitKind::Assignment => "assignment",
        };
        let result = if timed_out { "timeout" } else { "settled" };
        self.waits.get_or_create(&WaitLabels { kind, result }).inc();
    }
}

/// Object ids learned from the `oid` claim of tokens, by identity (keys without a pod). An
/// empty value: tokens of that identity carry no `oid`.
#[derive(Debug, Default)]
pub struct ObjectIds(Mutex<HashMap<IdentityKey, String>>);

impl ObjectIds {
    fn get(&self, key: &IdentityKey) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    fn learn(&self, key: &IdentityKey, oid: Option<String>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.without_pod(), oid.unwrap_or_default());
    }

    fn retain(&self, keep: &BTreeSet<IdentityKey>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|key, _| keep.contains(key));
    }
}

/// The settings of the service.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub policy: MatchPolicy,
    pub pod_wait: Duration,
    pub assignment_wait: Duration,
    pub instance_metadata: InstanceMetadata,
}

/// The Kubernetes client (which has no `Debug`).
struct ApiClient(kube::Client);

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("kube::Client")
    }
}

/// The token service.
#[derive(Debug)]
pub struct TokenService {
    settings: Settings,
    cluster: Arc<Cluster>,
    cache: Arc<TokenCache>,
    limiter: Arc<PodLimiter>,
    upstream: Arc<Upstream>,
    object_ids: Arc<ObjectIds>,
    metrics: ServiceMetrics,
    /// Where "not found" is confirmed against a fresh read ([`fresher_view`]); none in unit
    /// tests, whose index is complete by construction.
    api: Option<ApiClient>,
    /// Pods (by UID) whose "not found" a fresh read confirmed: later ones need no read.
    confirmed: Mutex<HashSet<String>>,
}

impl TokenService {
    pub fn new(
        settings: Settings,
        cluster: Arc<Cluster>,
        cache: Arc<TokenCache>,
        limiter: Arc<PodLimiter>,
        upstream: Arc<Upstream>,
        metrics: ServiceMetrics,
    ) -> Self {
        Self {
            settings,
            cluster,
            cache,
            limiter,
            upstream,
            object_ids: Arc::default(),
            metrics,
            api: None,
            confirmed: Mutex::default(),
        }
    }

    /// Confirms every first "Identity not found" of a pod against the API server.
    pub fn with_api(mut self, client: kube::Client) -> Self {
        self.api = Some(ApiClient(client));
        self
    }

    /// Whether the API server holds objects the watches have not delivered yet that would
    /// give the pod an identity (or the node's, by an exception): then the caller waits for
    /// the watches instead of saying "not found". A failed read says "no": the watches are
    /// the source of truth, and an API server that cannot be read must not hold requests.
    async fn watches_lag(&self, pod: &PodRef, request: &TokenRequest) -> bool {
        let Some(ApiClient(client)) = &self.api else {
            return false;
        };
        if self
            .confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&pod.uid)
        {
            return false;
        }
        let index = self.cluster.read().clone();
        let view = match fresher_view(client, &index, &pod.namespace).await {
            Ok(view) => view,
            Err(error) => {
                warn!(pod = %pod, %error, "cannot read the API server to confirm \"Identity not found\"");
                return false;
            }
        };
        let again = resolve(
            &view,
            self.settings.policy,
            pod,
            request.selector.as_ref(),
            |key| self.object_ids.get(key),
        );
        if matches!(again, Resolution::NotFound(_)) {
            self.confirmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(pod.uid.clone());
            return false;
        }
        debug!(pod = %pod, "the watches lag behind the API server; waiting for them");
        true
    }

    /// Keeps the cache to the identities still assigned on this node (with their current
    /// specs) until `shutdown`, following every change of the cluster view.
    pub async fn prune(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.cluster.subscribe();
        loop {
            {
                let index = self.cluster.read();
                if index.synced() {
                    let live = index.live_identity_keys();
                    let mut known: BTreeSet<IdentityKey> =
                        live.iter().map(IdentityKey::without_pod).collect();
                    known.extend(index.identity_keys());
                    drop(index);
                    self.cache.retain(|key| live.contains(key));
                    self.object_ids.retain(&known);
                    let index = self.cluster.read();
                    self.confirmed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .retain(|uid| index.pod(uid).is_some());
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    }

    async fn serve(&self, pod: &PodRef, request: &TokenRequest) -> Reply {
        let started = Instant::now();
        let mut changes = self.cluster.subscribe();
        let mut waited: Option<WaitKind> = None;
        let mut learning_rounds = 0;
        // Whether a fresh read showed the watches behind (asked once per request).
        let mut lagging: Option<bool> = None;
        loop {
            changes.borrow_and_update();
            let resolution = {
                let index = self.cluster.read();
                resolve(
                    &index,
                    self.settings.policy,
                    pod,
                    request.selector.as_ref(),
                    |key| self.object_ids.get(key),
                )
            };
            let (kind, limit, failure) = match resolution {
                Resolution::PodUnknown => {
                    (WaitKind::Pod, self.settings.pod_wait, Failure::PodNotFound)
                }
                Resolution::AwaitAssignment { identity } => {
                    debug!(pod = %pod, identity = %identity, "waiting for the identity's assignment");
                    (
                        WaitKind::Assignment,
                        self.settings.assignment_wait,
                        Failure::AssignmentPending,
                    )
                }
                settled => {
                    if let Some(kind) = waited {
                        self.metrics.wait(kind, false);
                    }
                    match settled {
                        Resolution::NotFound(why) => {
                            if lagging.is_none() {
                                lagging = Some(self.watches_lag(pod, request).await);
                            }
                            if lagging != Some(true) {
                                debug!(pod = %pod, selector = ?request.selector, reason = ?why, "no identity of the pod matches");
                                return Reply::Failure(Failure::IdentityNotFound);
                            }
                            (
                                WaitKind::Assignment,
                                self.settings.assignment_wait,
                                Failure::AssignmentPending,
                            )
                        }
                        Resolution::NodeIdentity => return self.node_identity(pod, request).await,
                        Resolution::Serve(target) => return self.issue(&target, request).await,
                        Resolution::LearnObjectIds(targets)
                            if learning_rounds < MAX_LEARNING_ROUNDS =>
                        {
                            learning_rounds += 1;
                            if let Err(e) = self.learn_object_ids(&targets).await {
                                return self.upstream_failure(e);
                            }
                            waited = None;
                            continue;
                        }
                        _ => return Reply::Failure(Failure::IdentityNotFound),
                    }
                }
            };
            waited = Some(kind);
            let deadline = started + limit;
            let changed = tokio::time::timeout_at(deadline, changes.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                self.metrics.wait(kind, true);
                info!(
                    pod = %pod,
                    waited_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
                    reason = match kind {
                        WaitKind::Pod => "pod not in the pod watch",
                        WaitKind::Assignment => "assignment not there",
                    },
                    "gave up waiting"
                );
                return Reply::Failure(failure);
            }
        }
    }

    fn fetch(&self, target: &Target, resource: &str) -> Fetch {
        let upstream = Arc::clone(&self.upstream);
        let object_ids = Arc::clone(&self.object_ids);
        let identity = Arc::clone(&target.identity);
        let pod = Arc::clone(&target.pod);
        let key = target.key.clone();
        let resource = resource.to_owned();
        Box::new(move |forced| {
            async move {
                let token = upstream.token(&identity, &pod, &resource, forced).await?;
                object_ids.learn(&key, token.object_id());
                Ok(token)
            }
            .boxed()
        })
    }

    async fn issue(&self, target: &Target, request: &TokenRequest) -> Reply {
        let key = CacheKey {
            identity: target.key.clone(),
            resource: request.resource.clone(),
        };
        let freshness = Freshness::of(request.bypass_cache, request.refresh_sha256.as_deref());
        let served = match self
            .cache
            .get(key, freshness, self.fetch(target, &request.resource))
            .await
        {
            Ok(served) => served,
            Err(e) => return self.upstream_failure(e),
        };
        let pod = &target.pod;
        let cached = served.source == Source::Cache;
        if cached {
            debug!(pod = %format!("{}/{}", pod.namespace, pod.name), identity = %target.key, "matched pod with identity (cached token)");
        } else {
            info!(pod = %format!("{}/{}", pod.namespace, pod.name), identity = %target.key, resource = %request.resource, "matched pod with identity");
        }
        let spec = &target.identity.identity.spec;
        let client_id = spec
            .client_id
            .as_deref()
            .filter(|c| !c.is_empty())
            .or(served.token.client_id.as_deref())
            .unwrap_or_default();
        let rendered_at = unix_now();
        Reply::Token {
            body: token_body(&served.token, client_id, &request.resource, rendered_at).into(),
            cached,
            rendered_at,
        }
    }

    /// Fetches a token (for [`OBJECT_ID_RESOURCE`], through the cache) of each identity whose
    /// object id is unknown; the fetch records the `oid` claim.
    async fn learn_object_ids(&self, targets: &[Target]) -> Result<(), UpstreamError> {
        let fetches = targets.iter().map(|target| {
            let key = CacheKey {
                identity: target.key.clone(),
                resource: OBJECT_ID_RESOURCE.to_owned(),
            };
            let fetch = self.fetch(target, OBJECT_ID_RESOURCE);
            async move {
                let served = self.cache.get(key, Freshness::Cached, fetch).await?;
                // A cached token's oid was recorded when it was fetched, unless that entry
                // outlived the learned ids (pruned): record it again.
                self.object_ids.learn(&target.key, served.token.object_id());
                Ok::<(), UpstreamError>(())
            }
        });
        let results = futures::future::join_all(fetches).await;
        results.into_iter().collect()
    }

    async fn node_identity(&self, pod: &PodRef, request: &TokenRequest) -> Reply {
        info!(pod = %pod, "matched pod with the node's identity (AzurePodIdentityException)");
        match self.upstream.node_token(request).await {
            Ok(relayed) => Reply::Relay(relayed),
            Err(e) => self.upstream_failure(e),
        }
    }

    fn upstream_failure(&self, error: UpstreamError) -> Reply {
        if error == UpstreamError::Busy {
            self.limiter.metrics().upstream_busy();
        }
        Reply::Failure(Failure::Upstream(error))
    }
}

fn refusal(refusal: Refusal) -> Failure {
    match refusal {
        Refusal::Rate { .. } => Failure::RateLimited {
            retry_after: refusal.retry_after_secs(),
        },
        Refusal::InFlight => Failure::TooManyInFlight,
    }
}

#[async_trait]
impl ImdsBackend for TokenService {
    async fn token(&self, caller: &Caller, request: TokenRequest) -> Reply {
        let _admission = match self.limiter.admit(caller.netns) {
            Ok(admission) => admission,
            Err(refused) => return Reply::Failure(refusal(refused)),
        };
        match &*caller.pod {
            PodAttribution::Pod(pod) => self.serve(pod, &request).await,
            PodAttribution::Unnamed => {
                debug!(netns = %caller.netns, "the listener's records name no pod: no identity");
                Reply::Failure(Failure::IdentityNotFound)
            }
            PodAttribution::Conflicting => {
                info!(netns = %caller.netns, "the listener's records name different pods: no identity");
                Reply::Failure(Failure::IdentityNotFound)
            }
        }
    }

    fn generation(&self) -> Option<Generation> {
        Some(Generation {
            cluster: self.cluster.generation(),
            cache: self.cache.generation(),
        })
    }

    fn admit_repeat(&self, caller: &Caller) -> Result<(), Reply> {
        match self.limiter.admit_instant(caller.netns) {
            Ok(()) => {
                self.cache.count_repeat_hit();
                Ok(())
            }
            Err(refused) => Err(Reply::Failure(refusal(refused))),
        }
    }

    async fn metadata(&self, caller: &Caller, request: MetadataRequest) -> Reply {
        match self.settings.instance_metadata {
            InstanceMetadata::Block => Reply::Failure(Failure::InstanceMetadataBlocked),
            InstanceMetadata::Deny => Reply::Failure(Failure::InstanceMetadataDenied),
            InstanceMetadata::Proxy => {
                let _admission = match self.limiter.admit(caller.netns) {
                    Ok(admission) => admission,
                    Err(refused) => return Reply::Failure(refusal(refused)),
                };
                match self.upstream.instance_metadata(&request).await {
                    Ok(relayed) => Reply::Relay(relayed),
                    Err(e) => self.upstream_failure(e),
                }
            }
        }
    }
}
