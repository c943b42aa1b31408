//! Applies a [`PodPlan`]: server-side apply of the assignments that differ from the cache (the
//! object, then its `/status`), delete of those no longer wanted, the IdentityReady condition
//! when it changes (with an Event on the pod), and the IdentityNotFound Event on a binding once
//! per change. Every write is checked against the leader flag just before it is sent.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::{ObjectReference, Pod, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource as _, ResourceExt as _};
use podid_api::crd::{
    AzureAssignedIdentity, BINDING_LABEL, IDENTITY_READY_CONDITION, assignment_state,
};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::FIELD_MANAGER;
use crate::assignment::{Currency, currency};
use crate::index::{BindingState, Index, ObjectKey, PodPlan, Readiness, reason};
use crate::lease::Leadership;
use crate::metrics::{Metrics, Write};

/// Attempts at the pod condition write before the reconcile fails (and is retried later).
const CONDITION_ATTEMPTS: usize = 5;
/// The Event action of everything this controller reports.
const EVENT_ACTION: &str = "AssignIdentity";

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("not the leader: {what} not written")]
    NotLeader { what: String },
    #[error("applying assignment {namespace}/{name}: {source}")]
    Apply {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("applying the status of assignment {namespace}/{name}: {source}")]
    ApplyStatus {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting assignment {namespace}/{name}: {source}")]
    Delete {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("setting {IDENTITY_READY_CONDITION} on pod {pod}: {source}")]
    Condition {
        pod: ObjectKey,
        #[source]
        source: kube::Error,
    },
    #[error(
        "setting {IDENTITY_READY_CONDITION} on pod {pod}: it changed under each of {CONDITION_ATTEMPTS} attempts"
    )]
    ConditionConflicts { pod: ObjectKey },
    #[error("reading pod {pod}: {source}")]
    ReadPod {
        pod: ObjectKey,
        #[source]
        source: kube::Error,
    },
    #[error("recording an Event on {regarding}: {source}")]
    Event {
        regarding: String,
        #[source]
        source: kube::Error,
    },
}

/// The writer; cheap to clone, one per worker.
#[derive(Clone)]
pub struct Reconciler {
    client: Client,
    index: Arc<Mutex<Index>>,
    metrics: Metrics,
    leadership: Leadership,
    reporter: Reporter,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("reporter", &self.reporter)
            .finish_non_exhaustive()
    }
}

/// Locks the index; a panic elsewhere while holding it leaves plain maps behind, still usable.
pub fn lock(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    index.lock().unwrap_or_else(|e| e.into_inner())
}

fn status_body(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": AzureAssignedIdentity::api_version(&()),
        "kind": AzureAssignedIdentity::kind(&()),
        "metadata": { "name": name },
        "status": { "status": assignment_state::ASSIGNED },
    })
}

fn find_condition(pod: &Pod) -> Option<&PodCondition> {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == IDENTITY_READY_CONDITION))
}

/// The pod's conditions with ours set: the others kept as they are, ours replaced (its
/// transition time kept when its status does not change).
pub fn conditions_with(
    pod: &Pod,
    status: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Vec<PodCondition> {
    let mut conditions = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let transition = find_condition(pod)
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    let ours = PodCondition {
        type_: IDENTITY_READY_CONDITION.to_owned(),
        status: status.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_transition_time: Some(transition),
        ..Default::default()
    };
    match conditions
        .iter_mut()
        .find(|c| c.type_ == IDENTITY_READY_CONDITION)
    {
        Some(slot) => *slot = ours,
        None => conditions.push(ours),
    }
    conditions
}

/// Whether the pod already carries this condition.
fn has_condition(pod: &Pod, status: &str, reason: &str, message: &str) -> bool {
    find_condition(pod).is_some_and(|c| {
        c.status == status
            && c.reason.as_deref() == Some(reason)
            && c.message.as_deref() == Some(message)
    })
}

impl Reconciler {
    pub fn new(
        client: Client,
        index: Arc<Mutex<Index>>,
        metrics: Metrics,
        leadership: Leadership,
        reporter: Reporter,
    ) -> Self {
        Self {
            client,
            index,
            metrics,
            leadership,
            reporter,
        }
    }

    fn guard(&self, what: impl FnOnce() -> String) -> Result<(), ReconcileError> {
        if self.leadership.is_leader() {
            Ok(())
        } else {
            Err(ReconcileError::NotLeader { what: what() })
        }
    }

    /// Brings the pod at `key` to its plan.
    pub async fn reconcile_pod(&self, key: &ObjectKey) -> Result<(), ReconcileError> {
        let plan = lock(&self.index).plan(key);
        let api: Api<AzureAssignedIdentity> = Api::namespaced(self.client.clone(), &key.namespace);
        self.write_assignments(&api, &plan).await?;
        self.delete_stale(&api, &plan).await?;
        match (&plan.pod, &plan.readiness) {
            (Some(pod), Some(readiness)) => {
                let (status, reason, message) = readiness.condition();
                let event_type = match readiness {
                    Readiness::Ready { .. } => EventType::Normal,
                    Readiness::NotReady { .. } => EventType::Warning,
                };
                self.ensure_condition(key, Arc::clone(pod), status, reason, &message, event_type)
                    .await?;
            }
            (None, _) => {
                if let Some(uid) = &plan.departed_uid {
                    self.departed(key, uid).await?;
                    lock(&self.index).forget_departed(key, uid);
                }
            }
            (Some(_), None) => {}
        }
        Ok(())
    }

    async fn write_assignments(
        &self,
        api: &Api<AzureAssignedIdentity>,
        plan: &PodPlan,
    ) -> Result<(), ReconcileError> {
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        for want in &plan.desired {
            let name = want.name_any();
            let have = plan
                .existing
                .iter()
                .find(|e| e.metadata.name.as_deref() == Some(name.as_str()))
                .map_or(
                    Currency {
                        object: false,
                        status: false,
                    },
                    |stored| currency(stored, want),
                );
            let identity = want
                .spec
                .azure_identity_ref
                .as_ref()
                .map(|i| format!("{}/{}", i.namespace().unwrap_or_default(), i.name_any()))
                .unwrap_or_default();
            if !have.object {
                self.guard(|| format!("assignment {}/{name}", plan.key.namespace))?;
                api.patch(&name, &apply, &Patch::Apply(want))
                    .await
                    .map_err(|source| {
                        self.metrics.write_failed(Write::AssignmentApply);
                        ReconcileError::Apply {
                            namespace: plan.key.namespace.clone(),
                            name: name.clone(),
                            source,
                        }
                    })?;
                self.metrics.wrote(Write::AssignmentApply);
            }
            if !have.status {
                self.guard(|| format!("status of assignment {}/{name}", plan.key.namespace))?;
                api.patch_status(&name, &apply, &Patch::Apply(status_body(&name)))
                    .await
                    .map_err(|source| {
                        self.metrics.write_failed(Write::AssignmentStatus);
                        ReconcileError::ApplyStatus {
                            namespace: plan.key.namespace.clone(),
                            name: name.clone(),
                            source,
                        }
                    })?;
                self.metrics.wrote(Write::AssignmentStatus);
            }
            if !have.object || !have.status {
                let node = want.spec.nodename.as_deref().unwrap_or_default();
                info!(pod = %plan.key, %identity, assignment = %name, %node, "assignment written");
            }
        }
        Ok(())
    }

    async fn delete_stale(
        &self,
        api: &Api<AzureAssignedIdentity>,
        plan: &PodPlan,
    ) -> Result<(), ReconcileError> {
        for stale in &plan.existing {
            let name = stale.name_any();
            if plan
                .desired
                .iter()
                .any(|w| w.metadata.name.as_deref() == Some(name.as_str()))
            {
                continue;
            }
            self.guard(|| format!("deletion of assignment {}/{name}", plan.key.namespace))?;
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => self.metrics.wrote(Write::AssignmentDelete),
                // gone already: the pod's deletion took it (owner reference), or someone else
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(source) => {
                    self.metrics.write_failed(Write::AssignmentDelete);
                    return Err(ReconcileError::Delete {
                        namespace: plan.key.namespace.clone(),
                        name,
                        source,
                    });
                }
            }
            info!(pod = %plan.key, assignment = %name, "assignment deleted");
        }
        Ok(())
    }

    /// Sets IdentityReady when it differs: the whole conditions list (others kept, ours
    /// replaced) as a merge patch on `/status`, preconditioned on the resourceVersion it was
    /// computed from; on a conflict it reads the pod again. Records an Event when written.
    async fn ensure_condition(
        &self,
        key: &ObjectKey,
        cached: Arc<Pod>,
        status: &str,
        reason: &str,
        message: &str,
        event_type: EventType,
    ) -> Result<(), ReconcileError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &key.namespace);
        let uid = cached.metadata.uid.clone();
        let mut pod = cached;
        for _ in 0..CONDITION_ATTEMPTS {
            if has_condition(&pod, status, reason, message) {
                return Ok(());
            }
            let conditions = conditions_with(&pod, status, reason, message, Timestamp::now());
            let mut body = json!({ "status": { "conditions": conditions } });
            if let Some(rv) = &pod.metadata.resource_version {
                body["metadata"] = json!({ "resourceVersion": rv });
            }
            self.guard(|| format!("condition of pod {key}"))?;
            match pods
                .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&body))
                .await
            {
                Ok(written) => {
                    self.metrics.wrote(Write::PodCondition);
                    info!(pod = %key, %status, %reason, "pod condition {IDENTITY_READY_CONDITION} set");
                    self.publish(written.object_ref(&()), event_type, reason, message)
                        .await;
                    return Ok(());
                }
                Err(kube::Error::Api(s)) if s.is_conflict() => {
                    debug!(pod = %key, "pod changed under the condition write; reading it again");
                    match pods.get_status(&key.name).await {
                        Ok(fresh) if fresh.metadata.uid == uid => pod = Arc::new(fresh),
                        // replaced by a pod of the same name: its own watch event reconciles it
                        Ok(_) => return Ok(()),
                        Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(()),
                        Err(source) => {
                            self.metrics.read_failed("pod");
                            return Err(ReconcileError::ReadPod {
                                pod: key.clone(),
                                source,
                            });
                        }
                    }
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(()),
                Err(source) => {
                    self.metrics.write_failed(Write::PodCondition);
                    return Err(ReconcileError::Condition {
                        pod: key.clone(),
                        source,
                    });
                }
            }
        }
        self.metrics.write_failed(Write::PodCondition);
        Err(ReconcileError::ConditionConflicts { pod: key.clone() })
    }

    /// A pod left the label watch while IdentityReady was True: deleted (nothing to do) or
    /// unlabelled (its condition turns False, since it has no identity any more).
    async fn departed(&self, key: &ObjectKey, uid: &str) -> Result<(), ReconcileError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &key.namespace);
        let pod = match pods.get_opt(&key.name).await {
            Ok(pod) => pod,
            Err(source) => {
                self.metrics.read_failed("pod");
                return Err(ReconcileError::ReadPod {
                    pod: key.clone(),
                    source,
                });
            }
        };
        let Some(pod) = pod else {
            return Ok(());
        };
        if pod.metadata.uid.as_deref() != Some(uid) || pod.labels().contains_key(BINDING_LABEL) {
            return Ok(());
        }
        let message = format!("the pod has no {BINDING_LABEL} label");
        self.ensure_condition(
            key,
            Arc::new(pod),
            "False",
            reason::NO_BINDING_LABEL,
            &message,
            EventType::Normal,
        )
        .await
    }

    /// Records an Event; a failure is counted and logged, never fatal to a reconcile whose
    /// writes are done.
    async fn publish(
        &self,
        regarding: ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
    ) {
        if let Err(error) = self.try_publish(regarding, type_, reason, note).await {
            warn!(%error, "event not recorded");
        }
    }

    async fn try_publish(
        &self,
        regarding: ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> Result<(), ReconcileError> {
        let what = format!(
            "{} {}/{}",
            regarding.kind.as_deref().unwrap_or_default(),
            regarding.namespace.as_deref().unwrap_or_default(),
            regarding.name.as_deref().unwrap_or_default()
        );
        self.guard(|| format!("event on {what}"))?;
        // a recorder per event: its series cache would grow with every pod, and each of our
        // events marks a change, not a repeat
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note.to_owned()),
            action: EVENT_ACTION.to_owned(),
            secondary: None,
        };
        match recorder.publish(&event, &regarding).await {
            Ok(()) => {
                self.metrics.wrote(Write::Event);
                Ok(())
            }
            Err(source) => {
                self.metrics.write_failed(Write::Event);
                Err(ReconcileError::Event {
                    regarding: what,
                    source,
                })
            }
        }
    }

    /// Reports a binding whose identity is missing, once per change: `reported` holds the
    /// bindings reported and still broken.
    pub async fn reconcile_binding(
        &self,
        key: &ObjectKey,
        reported: &mut HashSet<ObjectKey>,
    ) -> Result<(), ReconcileError> {
        let (state, binding) = {
            let index = lock(&self.index);
            (index.binding_state(key), index.binding(key))
        };
        match (state, binding) {
            (BindingState::IdentityMissing { identity }, Some(binding)) => {
                if reported.contains(key) {
                    return Ok(());
                }
                let note = match &identity {
                    Some(name) => format!("AzureIdentity {}/{name} does not exist", key.namespace),
                    None => "the binding names no AzureIdentity (spec.azureIdentity)".to_owned(),
                };
                warn!(binding = %key, identity = ?identity, "binding names a missing identity");
                self.try_publish(
                    binding.object_ref(&()),
                    EventType::Warning,
                    reason::IDENTITY_NOT_FOUND,
                    &note,
                )
                .await?;
                reported.insert(key.clone());
            }
            _ => {
                reported.remove(key);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::pod;

    #[test]
    fn conditions_keep_the_others_and_replace_ours() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let p = pod("ns", "p")
            .condition("Ready", "False", "ContainersNotReady", "")
            .condition(
                IDENTITY_READY_CONDITION,
                "False",
                "NoMatchingBinding",
                "none",
            )
            .condition("PodScheduled", "True", "", "")
            .build();
        let list = conditions_with(&p, "True", "IdentitiesAssigned", "assigned ns/a", t1);
        let types: Vec<&str> = list.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            types,
            ["Ready", IDENTITY_READY_CONDITION, "PodScheduled"],
            "order and others kept"
        );
        assert_eq!(list[1].status, "True");
        assert_eq!(
            list[1].last_transition_time,
            Some(Time(t1)),
            "a new status is a transition"
        );

        let mut p2 = p.clone();
        p2.status.as_mut().unwrap().conditions = Some(list);
        let again = conditions_with(&p2, "True", "IdentitiesAssigned", "assigned ns/a, ns/b", t0);
        assert_eq!(
            again[1].last_transition_time,
            Some(Time(t1)),
            "same status: transition time kept"
        );
        assert!(has_condition(
            &p2,
            "True",
            "IdentitiesAssigned",
            "assigned ns/a"
        ));
        assert!(!has_condition(
            &p2,
            "True",
            "IdentitiesAssigned",
            "assigned ns/a, ns/b"
        ));

        let bare = pod("ns", "q").build();
        let list = conditions_with(&bare, "False", "NoMatchingBinding", "m", t0);
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn status_body_is_a_complete_apply() {
        let body = status_body("a-b-12345678");
        assert_eq!(body["apiVersion"], "aadpodidentity.k8s.io/v1");
        assert_eq!(body["kind"], "AzureAssignedIdentity");
        assert_eq!(body["status"]["status"], "Assigned");
    }
}
