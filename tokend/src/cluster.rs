//! tokend's view of the cluster: this node's pods and AzureAssignedIdentities (filtered by the
//! API server), and the small cluster-wide sets of AzureIdentities, AzureIdentityBindings and
//! AzurePodIdentityExceptions.
//!
//! [`ClusterIndex`] is the pure part: fed whole objects by `apply`/`delete`/`reset`, it keeps
//! only what the identity step reads, indexed the way it reads it (pods by UID, assignments by
//! pod UID, bindings by selector). [`Cluster`] wraps it for sharing: a lock, and a change
//! counter every waiting request subscribes to, so waits end on the change that settles them.
//! [`run`] is the thin shell: one kube `watcher` per kind, relists applied atomically.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::{self, Debug};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use podid_api::crd::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
    BINDING_LABEL, IdentityKind, NODE_LABEL, assignment_state, node_label_value,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The five watched kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pods,
    Assignments,
    Identities,
    Bindings,
    Exceptions,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Pods,
        Kind::Assignments,
        Kind::Identities,
        Kind::Bindings,
        Kind::Exceptions,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Assignments => "azureassignedidentities",
            Kind::Identities => "azureidentities",
            Kind::Bindings => "azureidentitybindings",
            Kind::Exceptions => "azurepodidentityexceptions",
        }
    }
}

/// A namespaced object's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    fn of<K: Resource>(obj: &K) -> Self {
        Self::new(
            obj.meta().namespace.as_deref().unwrap_or_default(),
            obj.meta().name.as_deref().unwrap_or_default(),
        )
    }
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// SHA-256 of an AzureIdentity's spec as JSON: a changed spec is another identity to the
/// token cache, so no token of the old spec is ever served for the new one.
pub type Fingerprint = [u8; 32];

/// An AzureIdentity (live, or as an assignment embeds it) with its spec's fingerprint.
#[derive(Debug)]
pub struct IdentityRecord {
    pub identity: AzureIdentity,
    pub key: ObjKey,
    pub fingerprint: Fingerprint,
}

impl IdentityRecord {
    pub fn new(identity: AzureIdentity) -> Self {
        let key = ObjKey::of(&identity);
        let fingerprint = match serde_json::to_vec(&identity.spec) {
            Ok(json) => Sha256::digest(&json).into(),
            // A spec that cannot be encoded cannot be told from another one: never share.
            Err(_) => Sha256::digest(identity.metadata.uid.as_deref().unwrap_or_default()).into(),
        };
        Self {
            identity,
            key,
            fingerprint,
        }
    }

    pub fn kind(&self) -> Option<IdentityKind> {
        self.identity.spec.type_.kind()
    }
}

/// What the identity step reads of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName` (the API server defaults it to `default`).
    pub service_account: String,
    /// Succeeded or Failed: the controller assigns it nothing more.
    pub terminal: bool,
}

impl PodInfo {
    fn of(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        Some(Self {
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            uid: meta.uid.clone().filter(|u| !u.is_empty())?,
            labels: meta.labels.clone().unwrap_or_default(),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            terminal: matches!(phase, Some("Succeeded" | "Failed")),
        })
    }

    /// The `aadpodidbinding` label.
    pub fn binding_label(&self) -> Option<&str> {
        self.labels.get(BINDING_LABEL).map(String::as_str)
    }
}

/// What the identity step reads of an AzureAssignedIdentity.
#[derive(Debug)]
pub struct AssignmentInfo {
    pub key: ObjKey,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    /// `status.status` is `Assigned`.
    pub assigned: bool,
    /// The embedded AzureIdentity; an assignment without one serves nothing.
    pub identity: Option<Arc<IdentityRecord>>,
    /// The embedded binding (its weight orders the pod's identities); empty when absent.
    pub binding: Arc<AzureIdentityBinding>,
}

impl AssignmentInfo {
    fn of(assignment: &AzureAssignedIdentity) -> Self {
        let spec = &assignment.spec;
        Self {
            key: ObjKey::of(assignment),
            pod_namespace: spec.pod_namespace.clone(),
            pod_name: spec.pod.clone(),
            pod_uid: spec.pod_uid.clone().filter(|u| !u.is_empty()),
            assigned: assignment.status.as_ref().and_then(|s| s.status.as_deref())
                == Some(assignment_state::ASSIGNED),
            identity: spec
                .azure_identity_ref
                .clone()
                .map(|identity| Arc::new(IdentityRecord::new(identity))),
            binding: Arc::new(spec.azure_binding_ref.clone().unwrap_or_default()),
        }
    }

    /// Whether this assignment gives `pod` its identity now: `Assigned`, with an identity,
    /// for exactly this pod (namespace, name and UID).
    pub fn serves(&self, pod: &PodInfo) -> bool {
        self.assigned
            && self.identity.is_some()
            && self.pod_namespace.as_deref() == Some(pod.namespace.as_str())
            && self.pod_name.as_deref() == Some(pod.name.as_str())
            && self.pod_uid.as_deref() == Some(pod.uid.as_str())
    }
}

/// The cache identity of an identity serving a pod: the AzureIdentity, its spec, and for a
/// federated identity the pod (its assertion is bound to the pod).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    pub identity: ObjKey,
    pub fingerprint: Fingerprint,
    pub pod_uid: Option<String>,
}

impl IdentityKey {
    pub fn new(record: &IdentityRecord, pod_uid: &str) -> Self {
        Self {
            identity: record.key.clone(),
            fingerprint: record.fingerprint,
            pod_uid: (record.kind() == Some(IdentityKind::Federated)).then(|| pod_uid.to_owned()),
        }
    }

    /// The key of the identity itself, whatever pod it serves (its object id is the same).
    pub fn without_pod(&self) -> Self {
        Self {
            pod_uid: None,
            ..self.clone()
        }
    }
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.identity, f)
    }
}

/// The indexed objects. Cloning is cheap (the objects are shared): a clone is a view to lay
/// fresher objects over ([`fresher_view`]).
#[derive(Debug, Default, Clone)]
pub struct ClusterIndex {
    pods: HashMap<String, Arc<PodInfo>>,
    assignments: HashMap<ObjKey, Arc<AssignmentInfo>>,
    assignments_by_pod: HashMap<String, BTreeSet<ObjKey>>,
    identities: HashMap<ObjKey, Arc<IdentityRecord>>,
    bindings: HashMap<ObjKey, Arc<AzureIdentityBinding>>,
    bindings_by_selector: HashMap<String, BTreeSet<ObjKey>>,
    exceptions: HashMap<String, BTreeMap<String, BTreeMap<String, String>>>,
    listed: BTreeSet<Kind>,
}

impl ClusterIndex {
    /// Whether every watch has completed its first list: before that, "not found" means
    /// nothing.
    pub fn synced(&self) -> bool {
        self.listed.len() == Kind::ALL.len()
    }

    /// The watches still waiting for their first list.
    pub fn pending(&self) -> Vec<&'static str> {
        Kind::ALL
            .iter()
            .filter(|k| !self.listed.contains(k))
            .map(|k| k.name())
            .collect()
    }

    fn mark_listed(&mut self, kind: Kind) {
        self.listed.insert(kind);
    }

    /// The pod with this UID on this node.
    pub fn pod(&self, uid: &str) -> Option<&Arc<PodInfo>> {
        self.pods.get(uid)
    }

    /// The assignments naming the pod with this UID (any status).
    pub fn assignments_of(&self, pod_uid: &str) -> impl Iterator<Item = &Arc<AssignmentInfo>> {
        self.assignments_by_pod
            .get(pod_uid)
            .into_iter()
            .flatten()
            .filter_map(|key| self.assignments.get(key))
    }

    /// The live AzureIdentity `namespace/name`.
    pub fn identity(&self, namespace: &str, name: &str) -> Option<&Arc<IdentityRecord>> {
        self.identities.get(&ObjKey::new(namespace, name))
    }

    /// The bindings whose selector is `label`.
    pub fn bindings_with_selector<'a>(
        &'a self,
        label: &str,
    ) -> impl Iterator<Item = &'a AzureIdentityBinding> + 'a {
        self.bindings_by_selector
            .get(label)
            .into_iter()
            .flatten()
            .filter_map(|key| self.bindings.get(key))
            .map(Arc::as_ref)
    }

    /// Whether an AzurePodIdentityException of the pod's namespace selects it: all of its
    /// `podLabels` on the pod with the same values. An exception without labels selects no
    /// pod (fail closed: it would hand the node's identity to a whole namespace).
    pub fn excepted(&self, pod: &PodInfo) -> bool {
        self.exceptions.get(&pod.namespace).is_some_and(|by_name| {
            by_name.values().any(|labels| {
                !labels.is_empty()
                    && labels
                        .iter()
                        .all(|(k, v)| pod.labels.get(k).is_some_and(|have| have == v))
            })
        })
    }

    /// The identity keys of every `Assigned` assignment of this node: the tokens worth
    /// keeping.
    pub fn live_identity_keys(&self) -> BTreeSet<IdentityKey> {
        self.assignments
            .values()
            .filter(|a| a.assigned)
            .filter_map(|a| {
                let identity = a.identity.as_ref()?;
                Some(IdentityKey::new(identity, a.pod_uid.as_deref()?))
            })
            .collect()
    }

    /// The keys (without a pod) of every live AzureIdentity.
    pub fn identity_keys(&self) -> impl Iterator<Item = IdentityKey> + '_ {
        self.identities.values().map(|record| IdentityKey {
            identity: record.key.clone(),
            fingerprint: record.fingerprint,
            pod_uid: None,
        })
    }

    /// Objects held, by kind.
    pub fn counts(&self) -> [(Kind, usize); 5] {
        [
            (Kind::Pods, self.pods.len()),
            (Kind::Assignments, self.assignments.len()),
            (Kind::Identities, self.identities.len()),
            (Kind::Bindings, self.bindings.len()),
            (
                Kind::Exceptions,
                self.exceptions.values().map(BTreeMap::len).sum(),
            ),
        ]
    }
}

/// An object kind the index keeps.
pub trait Indexed:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const KIND: Kind;
    fn apply(&self, index: &mut ClusterIndex);
    fn delete(&self, index: &mut ClusterIndex);
    fn clear(index: &mut ClusterIndex);

    /// Replaces every object of this kind (a (re)list).
    fn reset(objects: &[Self], index: &mut ClusterIndex) {
        Self::clear(index);
        for object in objects {
            object.apply(index);
        }
        index.mark_listed(Self::KIND);
    }
}

impl Indexed for Pod {
    const KIND: Kind = Kind::Pods;

    fn apply(&self, index: &mut ClusterIndex) {
        if let Some(info) = PodInfo::of(self) {
            index.pods.insert(info.uid.clone(), Arc::new(info));
        }
    }

    fn delete(&self, index: &mut ClusterIndex) {
        if let Some(uid) = self.metadata.uid.as_deref() {
            index.pods.remove(uid);
        }
    }

    fn clear(index: &mut ClusterIndex) {
        index.pods.clear();
    }
}

impl Indexed for AzureAssignedIdentity {
    const KIND: Kind = Kind::Assignments;

    fn apply(&self, index: &mut ClusterIndex) {
        self.delete(index);
        let info = AssignmentInfo::of(self);
        if let Some(uid) = &info.pod_uid {
            index
                .assignments_by_pod
                .entry(uid.clone())
                .or_default()
                .insert(info.key.clone());
        }
        index.assignments.insert(info.key.clone(), Arc::new(info));
    }

    fn delete(&self, index: &mut ClusterIndex) {
        let key = ObjKey::of(self);
        let Some(old) = index.assignments.remove(&key) else {
            return;
        };
        if let Some(uid) = &old.pod_uid
            && let Some(keys) = index.assignments_by_pod.get_mut(uid)
        {
            keys.remove(&key);
            if keys.is_empty() {
                index.assignments_by_pod.remove(uid);
            }
        }
    }

    fn clear(index: &mut ClusterIndex) {
        index.assignments.clear();
        index.assignments_by_pod.clear();
    }
}

impl Indexed for AzureIdentity {
    const KIND: Kind = Kind::Identities;

    fn apply(&self, index: &mut ClusterIndex) {
        let record = IdentityRecord::new(self.clone());
        index
            .identities
            .insert(record.key.clone(), Arc::new(record));
    }

    fn delete(&self, index: &mut ClusterIndex) {
        index.identities.remove(&ObjKey::of(self));
    }

    fn clear(index: &mut ClusterIndex) {
        index.identities.clear();
    }
}

impl Indexed for AzureIdentityBinding {
    const KIND: Kind = Kind::Bindings;

    fn apply(&self, index: &mut ClusterIndex) {
        self.delete(index);
        let key = ObjKey::of(self);
        if let Some(selector) = &self.spec.selector {
            index
                .bindings_by_selector
                .entry(selector.clone())
                .or_default()
                .insert(key.clone());
        }
        index.bindings.insert(key, Arc::new(self.clone()));
    }

    fn delete(&self, index: &mut ClusterIndex) {
        let key = ObjKey::of(self);
        let Some(old) = index.bindings.remove(&key) else {
            return;
        };
        if let Some(selector) = &old.spec.selector
            && let Some(keys) = index.bindings_by_selector.get_mut(selector)
        {
            keys.remove(&key);
            if keys.is_empty() {
                index.bindings_by_selector.remove(selector);
            }
        }
    }

    fn clear(index: &mut ClusterIndex) {
        index.bindings.clear();
        index.bindings_by_selector.clear();
    }
}

impl Indexed for AzurePodIdentityException {
    const KIND: Kind = Kind::Exceptions;

    fn apply(&self, index: &mut ClusterIndex) {
        let key = ObjKey::of(self);
        index
            .exceptions
            .entry(key.namespace)
            .or_default()
            .insert(key.name, self.spec.pod_labels.clone());
    }

    fn delete(&self, index: &mut ClusterIndex) {
        let key = ObjKey::of(self);
        if let Some(by_name) = index.exceptions.get_mut(&key.namespace) {
            by_name.remove(&key.name);
            if by_name.is_empty() {
                index.exceptions.remove(&key.namespace);
            }
        }
    }

    fn clear(index: &mut ClusterIndex) {
        index.exceptions.clear();
    }
}

/// The shared index and its change counter.
#[derive(Debug)]
pub struct Cluster {
    index: RwLock<ClusterIndex>,
    changes: watch::Sender<u64>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            index: RwLock::default(),
            changes: watch::Sender::new(0),
        }
    }
}

impl Cluster {
    /// Reads the index; never hold the guard across an await.
    pub fn read(&self) -> RwLockReadGuard<'_, ClusterIndex> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The change counter: it moves after every change of the index, so a decision made from
    /// the index after reading it is current while the counter stays the same.
    pub fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    /// A receiver that sees every later change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Changes the index and wakes everyone waiting for a change.
    pub fn update(&self, change: impl FnOnce(&mut ClusterIndex)) {
        {
            let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
            change(&mut index);
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

/// The metrics of the watches.
#[derive(Debug, Clone, Default)]
pub struct ClusterMetrics {
    objects: Family<ResourceLabels, Gauge>,
    watch_errors: Family<ResourceLabels, Counter>,
    synced: Gauge,
}

impl ClusterMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "kube_objects",
            "Objects held from the Kubernetes watches, by resource",
            metrics.objects.clone(),
        );
        registry.register(
            "kube_watch_errors",
            "Failed Kubernetes watch or list attempts (retried with backoff), by resource",
            metrics.watch_errors.clone(),
        );
        registry.register(
            "kube_synced",
            "1 once every Kubernetes watch has listed",
            metrics.synced.clone(),
        );
        for kind in Kind::ALL {
            let labels = ResourceLabels {
                resource: kind.name(),
            };
            metrics.objects.get_or_create(&labels).set(0);
            metrics.watch_errors.get_or_create(&labels).inc_by(0);
        }
        metrics
    }

    fn observe(&self, index: &ClusterIndex) {
        for (kind, count) in index.counts() {
            self.objects
                .get_or_create(&ResourceLabels {
                    resource: kind.name(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        self.synced.set(i64::from(index.synced()));
    }
}

/// `index` with the identities, bindings and exceptions the API server holds *now* laid over
/// it: what the watches will show once their events arrive. The watches of different kinds
/// are separate streams, so an object created just before a pod may reach tokend after the
/// pod does; a "not found" is only said once this fresher view agrees.
pub async fn fresher_view(
    client: &Client,
    index: &ClusterIndex,
    namespace: &str,
) -> Result<ClusterIndex, kube::Error> {
    let params = kube::api::ListParams::default();
    let identities = Api::<AzureIdentity>::all(client.clone());
    let bindings = Api::<AzureIdentityBinding>::all(client.clone());
    let exceptions = Api::<AzurePodIdentityException>::namespaced(client.clone(), namespace);
    let (identities, bindings, exceptions) = futures::try_join!(
        identities.list(&params),
        bindings.list(&params),
        exceptions.list(&params),
    )?;
    let mut view = index.clone();
    for identity in &identities.items {
        identity.apply(&mut view);
    }
    for binding in &bindings.items {
        binding.apply(&mut view);
    }
    for exception in &exceptions.items {
        exception.apply(&mut view);
    }
    Ok(view)
}

/// Runs the five watches until `shutdown`: this node's pods (`spec.nodeName`) and
/// assignments (label `nodename`, both filtered by the API server), and every identity,
/// binding and exception. Each retries with backoff forever; /readyz waits for their first
/// lists.
pub async fn run(
    client: Client,
    node: &str,
    cluster: Arc<Cluster>,
    metrics: ClusterMetrics,
    shutdown: CancellationToken,
) {
    let pods = watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .any_semantic();
    let assignments = watcher::Config::default()
        .labels(&format!("{NODE_LABEL}={}", node_label_value(node)))
        .any_semantic();
    let all = watcher::Config::default().any_semantic();
    let watches = futures::future::join5(
        watch(Api::<Pod>::all(client.clone()), pods, &cluster, &metrics),
        watch(
            Api::<AzureAssignedIdentity>::all(client.clone()),
            assignments,
            &cluster,
            &metrics,
        ),
        watch(
            Api::<AzureIdentity>::all(client.clone()),
            all.clone(),
            &cluster,
            &metrics,
        ),
        watch(
            Api::<AzureIdentityBinding>::all(client.clone()),
            all.clone(),
            &cluster,
            &metrics,
        ),
        watch(
            Api::<AzurePodIdentityException>::all(client),
            all,
            &cluster,
            &metrics,
        ),
    );
    tokio::select! {
        _ = watches => {}
        () = shutdown.cancelled() => {}
    }
}

/// One watch: applies each change to the index, a relist as one atomic reset.
async fn watch<K: Indexed>(
    api: Api<K>,
    config: watcher::Config,
    cluster: &Cluster,
    metrics: &ClusterMetrics,
) {
    let resource = K::KIND.name();
    let stream = watcher::watcher(api, config)
        .default_backoff()
        .modify(|obj: &mut K| obj.meta_mut().managed_fields = None);
    let mut stream = std::pin::pin!(stream);
    let mut relist: Vec<K> = Vec::new();
    let mut listed = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Apply(obj)) => cluster.update(|index| obj.apply(index)),
            Ok(Event::Delete(obj)) => cluster.update(|index| obj.delete(index)),
            Ok(Event::Init) => relist.clear(),
            Ok(Event::InitApply(obj)) => relist.push(obj),
            Ok(Event::InitDone) => {
                let objects = std::mem::take(&mut relist);
                cluster.update(|index| K::reset(&objects, index));
                if !listed {
                    listed = true;
                    info!(resource, objects = objects.len(), "listed");
                    let index = cluster.read();
                    if index.synced() {
                        info!("every Kubernetes watch has listed");
                    }
                }
            }
            Err(error) => {
                metrics
                    .watch_errors
                    .get_or_create(&ResourceLabels { resource })
                    .inc();
                warn!(resource, %error, "watch failed; retrying with backoff");
            }
        }
        metrics.observe(&cluster.read());
    }
}

#[cfg(test)]
pub mod testing {
    //! Builders for the objects the index keeps.

    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
    use kube::api::ObjectMeta;
    use podid_api::crd::{
        AzureAssignedIdentity, AzureAssignedIdentitySpec, AzureAssignedIdentityStatus,
        AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec,
        AzurePodIdentityException, AzurePodIdentityExceptionSpec, BEHAVIOR_ANNOTATION,
        BINDING_LABEL, IdentityType, assignment_state,
    };

    fn meta(namespace: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    /// `pod("ns", "name").uid("u").label("aadpodidbinding", "sel").build()`
    #[derive(Debug, Clone)]
    pub struct PodBuilder(Pod);

    pub fn pod(namespace: &str, name: &str) -> PodBuilder {
        let mut p = Pod {
            metadata: meta(namespace, name),
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                ..Default::default()
            }),
        };
        p.metadata.uid = Some(format!("uid-{name}"));
        PodBuilder(p)
    }

    impl PodBuilder {
        pub fn uid(mut self, uid: &str) -> Self {
            self.0.metadata.uid = Some(uid.into());
            self
        }
        pub fn label(mut self, key: &str, value: &str) -> Self {
            self.0
                .metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .insert(key.into(), value.into());
            self
        }
        pub fn binding(self, selector: &str) -> Self {
            self.label(BINDING_LABEL, selector)
        }
        pub fn phase(mut self, phase: &str) -> Self {
            self.0.status.as_mut().unwrap().phase = Some(phase.into());
            self
        }
        pub fn service_account(mut self, name: &str) -> Self {
            self.0.spec.as_mut().unwrap().service_account_name = Some(name.into());
            self
        }
        pub fn build(self) -> Pod {
            self.0
        }
    }

    pub fn identity(namespace: &str, name: &str, client_id: &str) -> AzureIdentity {
        AzureIdentity {
            metadata: meta(namespace, name),
            spec: AzureIdentitySpec {
                type_: IdentityType::USER_ASSIGNED_MSI,
                client_id: Some(client_id.into()),
                resource_id: Some(format!(
                    "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
                )),
                ..Default::default()
            },
            status: None,
        }
    }

    pub fn federated(mut identity: AzureIdentity) -> AzureIdentity {
        identity.spec.type_ = IdentityType::FEDERATED;
        identity.spec.resource_id = None;
        identity.spec.tenant_id = Some("tenant".into());
        identity
    }

    pub fn namespaced_only(mut identity: AzureIdentity) -> AzureIdentity {
        identity
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(BEHAVIOR_ANNOTATION.into(), "namespaced".into());
        identity
    }

    pub fn binding(
        namespace: &str,
        name: &str,
        identity: &str,
        selector: &str,
        weight: Option<i64>,
    ) -> AzureIdentityBinding {
        AzureIdentityBinding {
            metadata: meta(namespace, name),
            spec: AzureIdentityBindingSpec {
                azure_identity: Some(identity.into()),
                selector: Some(selector.into()),
                weight,
            },
            status: None,
        }
    }

    /// The assignment of `identity` (through `binding`) to `pod`, `Assigned`.
    pub fn assignment(
        pod: &Pod,
        identity: &AzureIdentity,
        binding: &AzureIdentityBinding,
    ) -> AzureAssignedIdentity {
        let pod_ns = pod.metadata.namespace.clone().unwrap();
        let pod_name = pod.metadata.name.clone().unwrap();
        let identity_name = identity.metadata.name.clone().unwrap();
        AzureAssignedIdentity {
            metadata: meta(&pod_ns, &format!("{pod_name}-{identity_name}")),
            spec: AzureAssignedIdentitySpec {
                azure_identity_ref: Some(identity.clone()),
                azure_binding_ref: Some(binding.clone()),
                pod: Some(pod_name),
                pod_namespace: Some(pod_ns),
                pod_uid: pod.metadata.uid.clone(),
                nodename: Some("node-1".into()),
                replicas: None,
            },
            status: Some(AzureAssignedIdentityStatus {
                status: Some(assignment_state::ASSIGNED.into()),
                available_replicas: None,
            }),
        }
    }

    pub fn with_status(
        mut assignment: AzureAssignedIdentity,
        status: &str,
    ) -> AzureAssignedIdentity {
        assignment.status.as_mut().unwrap().status = Some(status.into());
        assignment
    }

    pub fn exception(
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> AzurePodIdentityException {
        AzurePodIdentityException {
            metadata: meta(namespace, name),
            spec: AzurePodIdentityExceptionSpec {
                pod_labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            },
            status: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn synced_index() -> ClusterIndex {
        let mut index = ClusterIndex::default();
        Pod::reset(&[], &mut index);
        AzureAssignedIdentity::reset(&[], &mut index);
        AzureIdentity::reset(&[], &mut index);
        AzureIdentityBinding::reset(&[], &mut index);
        AzurePodIdentityException::reset(&[], &mut index);
        index
    }

    #[test]
    fn synced_once_every_kind_listed() {
        let mut index = ClusterIndex::default();
        assert!(!index.synced());
        assert_eq!(index.pending().len(), 5);
        Pod::reset(&[], &mut index);
        AzureIdentity::reset(&[], &mut index);
        assert_eq!(
            index.pending(),
            [
                "azureassignedidentities",
                "azureidentitybindings",
                "azurepodidentityexceptions"
            ]
        );
        assert!(synced_index().synced());
    }

    #[test]
    fn pods_by_uid_and_relists_replace() {
        let mut index = synced_index();
        let p = pod("ns", "web")
            .uid("u1")
            .binding("sel")
            .service_account("sa")
            .build();
        p.apply(&mut index);
        let info = index.pod("u1").unwrap();
        assert_eq!(info.binding_label(), Some("sel"));
        assert_eq!(info.service_account, "sa");
        assert!(!info.terminal);
        let done = pod("ns", "job").uid("u2").phase("Succeeded").build();
        done.apply(&mut index);
        assert!(index.pod("u2").unwrap().terminal);
        assert_eq!(index.pod("u2").unwrap().service_account, "default");
        Pod::reset(std::slice::from_ref(&done), &mut index);
        assert!(
            index.pod("u1").is_none(),
            "a relist drops what it no longer lists"
        );
        done.delete(&mut index);
        assert!(index.pod("u2").is_none());
    }

    #[test]
    fn assignments_are_indexed_by_pod_uid() {
        let mut index = synced_index();
        let p = pod("ns", "web").uid("u1").build();
        let id = identity("ns", "id", "c1");
        let b = binding("ns", "b", "id", "sel", None);
        let a = assignment(&p, &id, &b);
        a.apply(&mut index);
        let info = PodInfo::of(&p).unwrap();
        let found: Vec<_> = index.assignments_of("u1").collect();
        assert_eq!(found.len(), 1);
        assert!(found[0].serves(&info));
        // Re-applied with another status: still one, not serving.
        with_status(a.clone(), assignment_state::CREATED).apply(&mut index);
        let found: Vec<_> = index.assignments_of("u1").collect();
        assert_eq!(found.len(), 1);
        assert!(!found[0].serves(&info));
        a.delete(&mut index);
        assert_eq!(index.assignments_of("u1").count(), 0);
    }

    #[test]
    fn an_assignment_serves_only_its_exact_pod() {
        let p = pod("ns", "web").uid("u1").build();
        let a = AssignmentInfo::of(&assignment(
            &p,
            &identity("ns", "id", "c"),
            &binding("ns", "b", "id", "s", None),
        ));
        let info = PodInfo::of(&p).unwrap();
        assert!(a.serves(&info));
        let recreated = PodInfo::of(&pod("ns", "web").uid("u2").build()).unwrap();
        assert!(!a.serves(&recreated), "a recreated pod never inherits");
        let other_ns = PodInfo::of(&pod("other", "web").uid("u1").build()).unwrap();
        assert!(!a.serves(&other_ns));
    }

    #[test]
    fn bindings_by_selector_follow_changes() {
        let mut index = synced_index();
        let b = binding("ns", "b", "id", "one", None);
        b.apply(&mut index);
        assert_eq!(index.bindings_with_selector("one").count(), 1);
        binding("ns", "b", "id", "two", None).apply(&mut index);
        assert_eq!(index.bindings_with_selector("one").count(), 0);
        assert_eq!(index.bindings_with_selector("two").count(), 1);
        b.delete(&mut index);
        assert_eq!(index.bindings_with_selector("two").count(), 0);
    }

    #[test]
    fn exceptions_need_every_label_of_the_pods_namespace() {
        let mut index = synced_index();
        exception("kube-system", "e", &[("app", "csi"), ("tier", "node")]).apply(&mut index);
        exception("kube-system", "empty", &[]).apply(&mut index);
        let both = PodInfo::of(
            &pod("kube-system", "csi")
                .label("app", "csi")
                .label("tier", "node")
                .build(),
        )
        .unwrap();
        assert!(index.excepted(&both));
        let one = PodInfo::of(&pod("kube-system", "x").label("app", "csi").build()).unwrap();
        assert!(!index.excepted(&one), "every label is needed");
        let other_ns = PodInfo::of(
            &pod("default", "csi")
                .label("app", "csi")
                .label("tier", "node")
                .build(),
        )
        .unwrap();
        assert!(!index.excepted(&other_ns), "exceptions are per namespace");
        let wrong_value = PodInfo::of(
            &pod("kube-system", "y")
                .label("app", "CSI")
                .label("tier", "node")
                .build(),
        )
        .unwrap();
        assert!(!index.excepted(&wrong_value));
        exception("kube-system", "e", &[]).delete(&mut index);
        assert!(!index.excepted(&both));
    }

    #[test]
    fn fingerprints_follow_the_spec() {
        let a = IdentityRecord::new(identity("ns", "id", "c1"));
        let same = IdentityRecord::new(identity("ns", "id", "c1"));
        let changed = IdentityRecord::new(identity("ns", "id", "c2"));
        assert_eq!(a.fingerprint, same.fingerprint);
        assert_ne!(a.fingerprint, changed.fingerprint);
    }

    #[test]
    fn live_keys_are_assigned_identities_federated_per_pod() {
        let mut index = synced_index();
        let p1 = pod("ns", "a").uid("u1").build();
        let p2 = pod("ns", "b").uid("u2").build();
        let msi = identity("ns", "msi", "c1");
        let fed = federated(identity("ns", "fed", "c2"));
        let b = binding("ns", "b", "msi", "s", None);
        for p in [&p1, &p2] {
            assignment(p, &msi, &b).apply(&mut index);
            assignment(p, &fed, &b).apply(&mut index);
        }
        with_status(
            assignment(
                &pod("ns", "c").uid("u3").build(),
                &identity("ns", "other", "c3"),
                &b,
            ),
            "Created",
        )
        .apply(&mut index);
        let keys = index.live_identity_keys();
        let shown: Vec<(String, Option<String>)> = keys
            .iter()
            .map(|k| (k.to_string(), k.pod_uid.clone()))
            .collect();
        assert_eq!(
            shown,
            [
                ("ns/fed".to_owned(), Some("u1".to_owned())),
                ("ns/fed".to_owned(), Some("u2".to_owned())),
                ("ns/msi".to_owned(), None),
            ]
        );
    }

    #[tokio::test]
    async fn updates_wake_subscribers() {
        let cluster = Cluster::default();
        let mut changes = cluster.subscribe();
        changes.borrow_and_update();
        cluster.update(|index| Pod::reset(&[], index));
        tokio::time::timeout(std::time::Duration::from_secs(5), changes.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cluster.read().pending().len(), 4);
    }
}
