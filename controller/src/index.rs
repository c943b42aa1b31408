//! The pure index: fed by apply/delete/reset of pods, bindings, identities and the managed
//! assignments, it answers which pods (and bindings) a change affects, and for one pod what its
//! assignments and its IdentityReady condition should be. No client, no clock.
//!
//! Rules (DESIGN.md "CRDs", "Default identity"; matching itself is `podid_api::matching`):
//! only scheduled pods (`spec.nodeName`) that are not Succeeded/Failed get identities (a
//! terminating pod keeps them until it is gone); a binding whose identity does not exist gives
//! nothing and is reported by [`Index::binding_state`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::{Resource, ResourceExt as _};
use podid_api::crd::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, BINDING_LABEL,
    IDENTITY_READY_CONDITION,
};
use podid_api::matching::{MatchPolicy, Selection};

use crate::assignment::{self, embedded_binding, embedded_identity};

/// The reasons of the IdentityReady condition (and of the pod Events that go with it).
pub mod reason {
    /// All of the pod's assignments are written.
    pub const IDENTITIES_ASSIGNED: &str = "IdentitiesAssigned";
    /// No binding's selector equals the pod's label (in reach of the pod's namespace).
    pub const NO_MATCHING_BINDING: &str = "NoMatchingBinding";
    /// Bindings select the pod, but the identities they name do not exist.
    pub const IDENTITY_NOT_FOUND: &str = "IdentityNotFound";
    /// The pod lost its `aadpodidbinding` label.
    pub const NO_BINDING_LABEL: &str = "NoBindingLabel";
}

/// `namespace/name` of a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The key of a stored object; `None` for an object without namespace or name, which the
    /// API server never sends for these namespaced kinds.
    pub fn of<K: Resource>(obj: &K) -> Option<Self> {
        Some(Self {
            namespace: obj.meta().namespace.clone()?,
            name: obj.meta().name.clone()?,
        })
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a change affects: pods to reconcile, bindings whose identity may have come or gone.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Affected {
    pub pods: BTreeSet<ObjectKey>,
    pub bindings: BTreeSet<ObjectKey>,
}

impl Affected {
    fn pod(key: ObjectKey) -> Self {
        Self {
            pods: BTreeSet::from([key]),
            bindings: BTreeSet::new(),
        }
    }

    fn merge(&mut self, other: Affected) {
        self.pods.extend(other.pods);
        self.bindings.extend(other.bindings);
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.bindings.is_empty()
    }
}

/// The facts of a pod that decide its assignments; other changes (status, our own condition,
/// annotations) affect nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodFacts {
    uid: Option<String>,
    label: Option<String>,
    node: Option<String>,
    terminal: bool,
}

impl PodFacts {
    fn of(pod: &Pod) -> Self {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        Self {
            uid: pod.metadata.uid.clone(),
            label: pod.labels().get(BINDING_LABEL).cloned(),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            terminal: matches!(phase, Some("Succeeded" | "Failed")),
        }
    }

    fn eligible(&self) -> bool {
        self.node.is_some() && !self.terminal && self.label.is_some()
    }
}

#[derive(Debug)]
struct IndexedPod {
    pod: Arc<Pod>,
    facts: PodFacts,
}

/// The IdentityReady condition a pod should carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// True: these identities (`namespace/name`, default first) are assigned.
    Ready { identities: Vec<String> },
    /// False, with a reason from [`reason`] and a message saying why.
    NotReady {
        reason: &'static str,
        message: String,
    },
}

impl Readiness {
    /// `(status, reason, message)` of the condition.
    pub fn condition(&self) -> (&'static str, &str, String) {
        match self {
            Self::Ready { identities } => (
                "True",
                reason::IDENTITIES_ASSIGNED,
                format!("assigned AzureIdentity {}", identities.join(", ")),
            ),
            Self::NotReady { reason, message } => ("False", reason, message.clone()),
        }
    }
}

/// What one pod should have, and what it has.
#[derive(Debug, Clone)]
pub struct PodPlan {
    pub key: ObjectKey,
    /// The pod as last seen in the label-selected watch; `None` once it left it.
    pub pod: Option<Arc<Pod>>,
    /// The assignments it should have, in default-identity order, without status.
    pub desired: Vec<AzureAssignedIdentity>,
    /// The managed assignments that name this pod now.
    pub existing: Vec<Arc<AzureAssignedIdentity>>,
    /// The condition to set; `None` for pods that get none (gone, unscheduled, terminal).
    pub readiness: Option<Readiness>,
    /// The UID of a pod that left the label watch while IdentityReady was True: it may still
    /// exist without its label, and then its condition must turn False.
    pub departed_uid: Option<String>,
}

/// Whether a binding's identity exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingState {
    Gone,
    IdentityPresent,
    /// The binding names `identity` (in its namespace), which does not exist; `None` when it
    /// names none at all.
    IdentityMissing {
        identity: Option<String>,
    },
}

/// The index itself.
#[derive(Debug, Default)]
pub struct Index {
    policy: MatchPolicy,
    pods: HashMap<ObjectKey, IndexedPod>,
    /// label value → pods carrying it, in every namespace.
    pods_by_label: HashMap<String, BTreeSet<ObjectKey>>,
    bindings: HashMap<ObjectKey, Arc<AzureIdentityBinding>>,
    bindings_by_selector: HashMap<String, BTreeSet<ObjectKey>>,
    /// identity key (the binding's namespace, its `azureIdentity`) → bindings naming it.
    bindings_by_identity: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    identities: HashMap<ObjectKey, Arc<AzureIdentity>>,
    /// pod key → managed assignments naming that pod, by assignment name.
    assignments: HashMap<ObjectKey, BTreeMap<String, Arc<AzureAssignedIdentity>>>,
    assignment_count: usize,
    departed: HashMap<ObjectKey, String>,
}

fn identity_key_of(binding: &AzureIdentityBinding) -> ObjectKey {
    ObjectKey::new(
        binding.meta().namespace.as_deref().unwrap_or_default(),
        binding.spec.azure_identity.as_deref().unwrap_or_default(),
    )
}

/// The pod an assignment belongs to: its namespace and `spec.pod` (else its Pod owner). An
/// assignment naming no pod maps to an empty name, which no pod has, so it is deleted.
pub fn assignment_pod_key(aai: &AzureAssignedIdentity) -> ObjectKey {
    let name = aai.spec.pod.clone().or_else(|| {
        aai.owner_references()
            .iter()
            .find(|o| o.kind == "Pod")
            .map(|o| o.name.clone())
    });
    ObjectKey {
        namespace: aai.namespace().unwrap_or_default(),
        name: name.unwrap_or_default(),
    }
}

fn had_ready_condition(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == IDENTITY_READY_CONDITION && c.status == "True")
        })
}

fn remove_from<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, BTreeSet<ObjectKey>>,
    at: &K,
    key: &ObjectKey,
) {
    if let Some(set) = map.get_mut(at) {
        set.remove(key);
        if set.is_empty() {
            map.remove(at);
        }
    }
}

impl Index {
    pub fn new(policy: MatchPolicy) -> Self {
        Self {
            policy,
            ..Default::default()
        }
    }

    pub fn policy(&self) -> MatchPolicy {
        self.policy
    }

    // ---- pods ----

    /// A pod from the label-selected watch was added or changed.
    pub fn apply_pod(&mut self, pod: Arc<Pod>) -> Affected {
        let Some(key) = ObjectKey::of(pod.as_ref()) else {
            return Affected::default();
        };
        self.departed.remove(&key);
        let facts = PodFacts::of(&pod);
        let old = self.pods.insert(
            key.clone(),
            IndexedPod {
                pod,
                facts: facts.clone(),
            },
        );
        match old {
            Some(old) if old.facts == facts => Affected::default(),
            Some(old) => {
                if old.facts.label != facts.label {
                    if let Some(label) = &old.facts.label {
                        remove_from(&mut self.pods_by_label, label, &key);
                    }
                    self.index_pod_label(&key, &facts);
                }
                Affected::pod(key)
            }
            None => {
                self.index_pod_label(&key, &facts);
                Affected::pod(key)
            }
        }
    }

    fn index_pod_label(&mut self, key: &ObjectKey, facts: &PodFacts) {
        if let Some(label) = &facts.label {
            self.pods_by_label
                .entry(label.clone())
                .or_default()
                .insert(key.clone());
        }
    }

    /// A pod left the label-selected watch: deleted, or its label removed.
    pub fn delete_pod(&mut self, key: &ObjectKey) -> Affected {
        let Some(old) = self.pods.remove(key) else {
            return Affected::default();
        };
        if let Some(label) = &old.facts.label {
            remove_from(&mut self.pods_by_label, label, key);
        }
        let departing =
            had_ready_condition(&old.pod) && old.pod.metadata.deletion_timestamp.is_none();
        if let (true, Some(uid)) = (departing, &old.facts.uid) {
            self.departed.insert(key.clone(), uid.clone());
        }
        Affected::pod(key.clone())
    }

    /// The pod watch (re)listed: `pods` is everything it holds now.
    pub fn reset_pods(&mut self, pods: impl IntoIterator<Item = Arc<Pod>>) -> Affected {
        let mut affected = Affected::default();
        let mut seen = BTreeSet::new();
        for pod in pods {
            if let Some(key) = ObjectKey::of(pod.as_ref()) {
                seen.insert(key);
            }
            affected.merge(self.apply_pod(pod));
        }
        let gone: Vec<ObjectKey> = self
            .pods
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            affected.merge(self.delete_pod(&key));
        }
        affected
    }

    /// The reconcile of a departed pod is done; `uid` guards against a newer departure.
    pub fn forget_departed(&mut self, key: &ObjectKey, uid: &str) {
        if self.departed.get(key).is_some_and(|u| u == uid) {
            self.departed.remove(key);
        }
    }

    /// Pods carrying `selector` that a binding of `binding_namespace` can reach.
    fn pods_selected(
        &self,
        selector: Option<&str>,
        binding_namespace: &str,
    ) -> impl Iterator<Item = &ObjectKey> {
        let cluster_wide = self.policy.cluster_wide;
        selector
            .and_then(|s| self.pods_by_label.get(s))
            .into_iter()
            .flatten()
            .filter(move |k| cluster_wide || k.namespace == binding_namespace)
    }

    // ---- bindings ----

    pub fn apply_binding(&mut self, binding: Arc<AzureIdentityBinding>) -> Affected {
        let Some(key) = ObjectKey::of(binding.as_ref()) else {
            return Affected::default();
        };
        let old = self.bindings.insert(key.clone(), Arc::clone(&binding));
        let mut affected = Affected::default();
        if let Some(old) = &old {
            // a status or resourceVersion change alone changes no assignment
            if embedded_binding(old) == embedded_binding(&binding) {
                return affected;
            }
            self.unindex_binding(&key, old);
            affected.pods.extend(
                self.pods_selected(old.spec.selector.as_deref(), &key.namespace)
                    .cloned(),
            );
        }
        if let Some(selector) = &binding.spec.selector {
            self.bindings_by_selector
                .entry(selector.clone())
                .or_default()
                .insert(key.clone());
        }
        self.bindings_by_identity
            .entry(identity_key_of(&binding))
            .or_default()
            .insert(key.clone());
        affected.pods.extend(
            self.pods_selected(binding.spec.selector.as_deref(), &key.namespace)
                .cloned(),
        );
        affected.bindings.insert(key);
        affected
    }

    fn unindex_binding(&mut self, key: &ObjectKey, binding: &AzureIdentityBinding) {
        if let Some(selector) = &binding.spec.selector {
            remove_from(&mut self.bindings_by_selector, selector, key);
        }
        remove_from(
            &mut self.bindings_by_identity,
            &identity_key_of(binding),
            key,
        );
    }

    pub fn delete_binding(&mut self, key: &ObjectKey) -> Affected {
        let Some(old) = self.bindings.remove(key) else {
            return Affected::default();
        };
        self.unindex_binding(key, &old);
        let mut affected = Affected::default();
        affected.pods.extend(
            self.pods_selected(old.spec.selector.as_deref(), &key.namespace)
                .cloned(),
        );
        affected.bindings.insert(key.clone());
        affected
    }

    pub fn reset_bindings(
        &mut self,
        bindings: impl IntoIterator<Item = Arc<AzureIdentityBinding>>,
    ) -> Affected {
        let mut affected = Affected::default();
        let mut seen = BTreeSet::new();
        for binding in bindings {
            if let Some(key) = ObjectKey::of(binding.as_ref()) {
                seen.insert(key);
            }
            affected.merge(self.apply_binding(binding));
        }
        let gone: Vec<ObjectKey> = self
            .bindings
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            affected.merge(self.delete_binding(&key));
        }
        affected
    }

    pub fn binding(&self, key: &ObjectKey) -> Option<Arc<AzureIdentityBinding>> {
        self.bindings.get(key).cloned()
    }

    /// Whether the binding at `key` exists and whether its identity does.
    pub fn binding_state(&self, key: &ObjectKey) -> BindingState {
        let Some(binding) = self.bindings.get(key) else {
            return BindingState::Gone;
        };
        match &binding.spec.azure_identity {
            Some(name)
                if self
                    .identities
                    .contains_key(&ObjectKey::new(&key.namespace, name)) =>
            {
                BindingState::IdentityPresent
            }
            name => BindingState::IdentityMissing {
                identity: name.clone(),
            },
        }
    }

    // ---- identities ----

    /// Pods and bindings that an identity at `key` touches.
    fn identity_reach(&self, key: &ObjectKey) -> Affected {
        let mut affected = Affected::default();
        for binding_key in self.bindings_by_identity.get(key).into_iter().flatten() {
            if let Some(binding) = self.bindings.get(binding_key) {
                affected.pods.extend(
                    self.pods_selected(binding.spec.selector.as_deref(), &binding_key.namespace)
                        .cloned(),
                );
            }
            affected.bindings.insert(binding_key.clone());
        }
        affected
    }

    pub fn apply_identity(&mut self, identity: Arc<AzureIdentity>) -> Affected {
        let Some(key) = ObjectKey::of(identity.as_ref()) else {
            return Affected::default();
        };
        let old = self.identities.insert(key.clone(), Arc::clone(&identity));
        if old.is_some_and(|old| embedded_identity(&old) == embedded_identity(&identity)) {
            return Affected::default();
        }
        self.identity_reach(&key)
    }

    pub fn delete_identity(&mut self, key: &ObjectKey) -> Affected {
        if self.identities.remove(key).is_none() {
            return Affected::default();
        }
        self.identity_reach(key)
    }

    pub fn reset_identities(
        &mut self,
        identities: impl IntoIterator<Item = Arc<AzureIdentity>>,
    ) -> Affected {
        let mut affected = Affected::default();
        let mut seen = BTreeSet::new();
        for identity in identities {
            if let Some(key) = ObjectKey::of(identity.as_ref()) {
                seen.insert(key);
            }
            affected.merge(self.apply_identity(identity));
        }
        let gone: Vec<ObjectKey> = self
            .identities
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            affected.merge(self.delete_identity(&key));
        }
        affected
    }

    // ---- managed assignments ----

    /// A managed assignment was written (by us or anyone). Its pod is affected only when the
    /// assignment is not what the pod should have: our own writes come back as no-ops. A
    /// status not yet written is not a difference (our `/status` write follows the object's).
    pub fn apply_assignment(&mut self, aai: Arc<AzureAssignedIdentity>) -> Affected {
        let pod_key = assignment_pod_key(&aai);
        let name = aai.name_any();
        let as_desired = self.desired_for(&pod_key).0.iter().any(|want| {
            want.name_any() == name && {
                let currency = assignment::currency(&aai, want);
                currency.object
                    && (currency.status
                        || aai
                            .status
                            .as_ref()
                            .and_then(|s| s.status.as_ref())
                            .is_none())
            }
        });
        let slot = self.assignments.entry(pod_key.clone()).or_default();
        if slot.insert(name, aai).is_none() {
            self.assignment_count += 1;
        }
        if as_desired {
            Affected::default()
        } else {
            Affected::pod(pod_key)
        }
    }

    /// A managed assignment is gone. Its pod is affected only when it still wants it (someone
    /// else deleted it): our own deletes come back as no-ops.
    pub fn delete_assignment(&mut self, aai: &AzureAssignedIdentity) -> Affected {
        let pod_key = assignment_pod_key(aai);
        let name = aai.name_any();
        if let Some(slot) = self.assignments.get_mut(&pod_key) {
            if slot.remove(&name).is_some() {
                self.assignment_count -= 1;
            }
            if slot.is_empty() {
                self.assignments.remove(&pod_key);
            }
        }
        if self
            .desired_for(&pod_key)
            .0
            .iter()
            .any(|want| want.name_any() == name)
        {
            Affected::pod(pod_key)
        } else {
            Affected::default()
        }
    }

    pub fn reset_assignments(
        &mut self,
        assignments: impl IntoIterator<Item = Arc<AzureAssignedIdentity>>,
    ) -> Affected {
        let old = std::mem::take(&mut self.assignments);
        self.assignment_count = 0;
        let mut affected = Affected::default();
        let mut seen = BTreeSet::new();
        for aai in assignments {
            seen.insert((assignment_pod_key(&aai), aai.name_any()));
            affected.merge(self.apply_assignment(aai));
        }
        for (pod_key, slot) in old {
            for (name, aai) in slot {
                if !seen.contains(&(pod_key.clone(), name))
                    && self
                        .desired_for(&pod_key)
                        .0
                        .iter()
                        .any(|w| w.metadata.name == aai.metadata.name)
                {
                    affected.pods.insert(pod_key.clone());
                }
            }
        }
        affected
    }

    /// How many managed assignments the index holds.
    pub fn assignment_count(&self) -> usize {
        self.assignment_count
    }

    // ---- answers ----

    fn selection_for<'a>(&'a self, namespace: &str, label: &str) -> Selection<'a> {
        let candidates = self
            .bindings_by_selector
            .get(label)
            .into_iter()
            .flatten()
            .filter_map(|k| self.bindings.get(k))
            .map(Arc::as_ref);
        self.policy
            .select(namespace, label, candidates, |ns, name| {
                self.identities
                    .get(&ObjectKey::new(ns, name))
                    .map(Arc::as_ref)
            })
    }

    /// The assignments and condition the pod at `key` should have.
    fn desired_for(&self, key: &ObjectKey) -> (Vec<AzureAssignedIdentity>, Option<Readiness>) {
        let Some(indexed) = self.pods.get(key) else {
            return (Vec::new(), None);
        };
        let (true, Some(label)) = (indexed.facts.eligible(), indexed.facts.label.as_deref()) else {
            return (Vec::new(), None);
        };
        let selection = self.selection_for(&key.namespace, label);
        let desired: Vec<AzureAssignedIdentity> = selection
            .identities
            .iter()
            .filter_map(|s| assignment::desired(&indexed.pod, s))
            .collect();
        let readiness = if !desired.is_empty() {
            Readiness::Ready {
                identities: selection
                    .identities
                    .iter()
                    .map(|s| {
                        format!(
                            "{}/{}",
                            s.identity.namespace().unwrap_or_default(),
                            s.identity.name_any()
                        )
                    })
                    .collect(),
            }
        } else if !selection.missing_identity.is_empty() {
            let missing: Vec<String> = selection
                .missing_identity
                .iter()
                .map(|b| {
                    let ns = b.namespace().unwrap_or_default();
                    match &b.spec.azure_identity {
                        Some(id) => format!(
                            "binding {ns}/{} names AzureIdentity {ns}/{id}, which does not exist",
                            b.name_any()
                        ),
                        None => format!("binding {ns}/{} names no AzureIdentity", b.name_any()),
                    }
                })
                .collect();
            Readiness::NotReady {
                reason: reason::IDENTITY_NOT_FOUND,
                message: missing.join("; "),
            }
        } else {
            let reach = if self.policy.cluster_wide {
                String::new()
            } else {
                format!(" in namespace {}", key.namespace)
            };
            Readiness::NotReady {
                reason: reason::NO_MATCHING_BINDING,
                message: format!("no AzureIdentityBinding{reach} has selector {label:?}"),
            }
        };
        (desired, Some(readiness))
    }

    /// Everything the reconcile of `key` needs.
    pub fn plan(&self, key: &ObjectKey) -> PodPlan {
        let (desired, readiness) = self.desired_for(key);
        PodPlan {
            key: key.clone(),
            pod: self.pods.get(key).map(|p| Arc::clone(&p.pod)),
            desired,
            existing: self
                .assignments
                .get(key)
                .map(|slot| slot.values().cloned().collect())
                .unwrap_or_default(),
            readiness,
            departed_uid: self.departed.get(key).cloned(),
        }
    }

    /// Every pod key worth a reconcile: known pods, pods named by managed assignments, and
    /// pods that departed the watch. A new leader reconciles them all.
    pub fn all_pod_keys(&self) -> BTreeSet<ObjectKey> {
        self.pods
            .keys()
            .chain(self.assignments.keys())
            .chain(self.departed.keys())
            .cloned()
            .collect()
    }

    pub fn all_binding_keys(&self) -> BTreeSet<ObjectKey> {
        self.bindings.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests;
