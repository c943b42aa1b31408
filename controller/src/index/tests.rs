use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use podid_api::crd::{
    AzureAssignedIdentity, AzureAssignedIdentityStatus, AzureIdentity, AzureIdentityBinding,
    assignment_name,
};

use super::*;
use crate::testing::{PodBuilder, binding, identity, pod};

const NAMESPACED: MatchPolicy = MatchPolicy {
    cluster_wide: false,
};
const CLUSTER_WIDE: MatchPolicy = MatchPolicy { cluster_wide: true };

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

fn labelled(ns: &str, name: &str, selector: &str) -> PodBuilder {
    pod(ns, name)
        .label(BINDING_LABEL, selector)
        .on_node("n1")
        .uid(&format!("{name}-uid"))
}

/// What a plan says, in a form a table can hold: `identity ns/name <- binding ns/name @ node`.
fn summary(plan: &PodPlan) -> Vec<String> {
    plan.desired
        .iter()
        .map(|a| {
            let id = a.spec.azure_identity_ref.as_ref().unwrap();
            let b = a.spec.azure_binding_ref.as_ref().unwrap();
            format!(
                "{}/{} <- {}/{} @ {}",
                id.namespace().unwrap(),
                id.name_any(),
                b.namespace().unwrap(),
                b.name_any(),
                a.spec.nodename.as_deref().unwrap()
            )
        })
        .collect()
}

fn reason_of(plan: &PodPlan) -> Option<&'static str> {
    match &plan.readiness {
        None => None,
        Some(Readiness::Ready { .. }) => Some(reason::IDENTITIES_ASSIGNED),
        Some(Readiness::NotReady { reason, .. }) => Some(reason),
    }
}

struct World {
    index: Index,
}

impl World {
    fn new(policy: MatchPolicy) -> Self {
        Self {
            index: Index::new(policy),
        }
    }
    fn identity(&mut self, id: AzureIdentity) -> Affected {
        self.index.apply_identity(Arc::new(id))
    }
    fn binding(&mut self, b: AzureIdentityBinding) -> Affected {
        self.index.apply_binding(Arc::new(b))
    }
    fn pod(&mut self, p: Pod) -> Affected {
        self.index.apply_pod(Arc::new(p))
    }
    fn plan(&self, ns: &str, name: &str) -> PodPlan {
        self.index.plan(&key(ns, name))
    }
    /// Stores the desired assignments as a server would after our writes, status included.
    fn write_desired(&mut self, ns: &str, name: &str) {
        for mut aai in self.plan(ns, name).desired {
            aai.metadata.resource_version = Some("1".into());
            aai.status = Some(AzureAssignedIdentityStatus {
                status: Some("Assigned".into()),
                available_replicas: None,
            });
            assert!(
                self.index.apply_assignment(Arc::new(aai)).is_empty(),
                "our own write is a no-op"
            );
        }
    }
}

fn pods(keys: &[(&str, &str)]) -> BTreeSet<ObjectKey> {
    keys.iter().map(|(ns, n)| key(ns, n)).collect()
}

/// The matching rules, one row per case: policy, identities, bindings, the pod, and what it gets.
#[test]
fn matching_table() {
    struct Case {
        name: &'static str,
        policy: MatchPolicy,
        identities: Vec<AzureIdentity>,
        bindings: Vec<AzureIdentityBinding>,
        pod: Pod,
        want: Vec<&'static str>,
        reason: Option<&'static str>,
    }
    let cases = vec![
        Case {
            name: "seeds example: rgapi/rgapi, selector rgapi",
            policy: NAMESPACED,
            identities: vec![identity("rgapi", "rgapi").build()],
            bindings: vec![binding("rgapi", "rgapi-binding", "rgapi", "rgapi").build()],
            pod: labelled("rgapi", "web", "rgapi").build(),
            want: vec!["rgapi/rgapi <- rgapi/rgapi-binding @ n1"],
            reason: Some(reason::IDENTITIES_ASSIGNED),
        },
        Case {
            name: "other namespace's binding ignored when namespaced",
            policy: NAMESPACED,
            identities: vec![identity("a", "id").build()],
            bindings: vec![binding("a", "b", "id", "sel").build()],
            pod: labelled("other", "p", "sel").build(),
            want: vec![],
            reason: Some(reason::NO_MATCHING_BINDING),
        },
        Case {
            name: "other namespace's binding honoured cluster-wide",
            policy: CLUSTER_WIDE,
            identities: vec![identity("a", "id").build()],
            bindings: vec![binding("a", "b", "id", "sel").build()],
            pod: labelled("other", "p", "sel").build(),
            want: vec!["a/id <- a/b @ n1"],
            reason: Some(reason::IDENTITIES_ASSIGNED),
        },
        Case {
            name: "Behavior: namespaced stays home even cluster-wide",
            policy: CLUSTER_WIDE,
            identities: vec![identity("a", "id").namespaced_only().build()],
            bindings: vec![binding("a", "b", "id", "sel").build()],
            pod: labelled("other", "p", "sel").build(),
            want: vec![],
            reason: Some(reason::NO_MATCHING_BINDING),
        },
        Case {
            name: "Behavior: namespaced serves its own namespace",
            policy: CLUSTER_WIDE,
            identities: vec![identity("a", "id").namespaced_only().build()],
            bindings: vec![binding("a", "b", "id", "sel").build()],
            pod: labelled("a", "p", "sel").build(),
            want: vec!["a/id <- a/b @ n1"],
            reason: Some(reason::IDENTITIES_ASSIGNED),
        },
        Case {
            name: "missing identity",
            policy: NAMESPACED,
            identities: vec![],
            bindings: vec![binding("ns", "b", "absent", "sel").build()],
            pod: labelled("ns", "p", "sel").build(),
            want: vec![],
            reason: Some(reason::IDENTITY_NOT_FOUND),
        },
        Case {
            name: "unscheduled pod gets nothing yet",
            policy: NAMESPACED,
            identities: vec![identity("ns", "id").build()],
            bindings: vec![binding("ns", "b", "id", "sel").build()],
            pod: pod("ns", "p").label(BINDING_LABEL, "sel").uid("u").build(),
            want: vec![],
            reason: None,
        },
        Case {
            name: "succeeded pod gets nothing",
            policy: NAMESPACED,
            identities: vec![identity("ns", "id").build()],
            bindings: vec![binding("ns", "b", "id", "sel").build()],
            pod: labelled("ns", "p", "sel").phase("Succeeded").build(),
            want: vec![],
            reason: None,
        },
        Case {
            name: "failed pod gets nothing",
            policy: NAMESPACED,
            identities: vec![identity("ns", "id").build()],
            bindings: vec![binding("ns", "b", "id", "sel").build()],
            pod: labelled("ns", "p", "sel").phase("Failed").build(),
            want: vec![],
            reason: None,
        },
        Case {
            name: "terminating running pod keeps its identity",
            policy: NAMESPACED,
            identities: vec![identity("ns", "id").build()],
            bindings: vec![binding("ns", "b", "id", "sel").build()],
            pod: labelled("ns", "p", "sel")
                .phase("Running")
                .terminating()
                .build(),
            want: vec!["ns/id <- ns/b @ n1"],
            reason: Some(reason::IDENTITIES_ASSIGNED),
        },
        Case {
            name: "duplicate bindings: one assignment, heaviest binding embedded",
            policy: NAMESPACED,
            identities: vec![identity("ns", "id").build()],
            bindings: vec![
                binding("ns", "a-light", "id", "sel").weight(1).build(),
                binding("ns", "z-heavy", "id", "sel").weight(3).build(),
                binding("ns", "m-heavy", "id", "sel").weight(3).build(),
            ],
            pod: labelled("ns", "p", "sel").build(),
            want: vec!["ns/id <- ns/m-heavy @ n1"],
            reason: Some(reason::IDENTITIES_ASSIGNED),
        },
        Case {
            name: "identities ordered by weight, then name",
            policy: NAMESPACED,
            identities: vec![
                identity("ns", "b").build(),
                identity("ns", "a").build(),
                identity("ns", "c").build(),
            ],
            bindings: vec![
                binding("ns", "1", "b", "sel").build(),
                binding("ns", "2", "a", "sel").build(),
                binding("ns", "3", "c", "sel").weight(7).build(),
            ],
            pod: labelled("ns", "p", "sel").build(),
            want: vec![
                "ns/c <- ns/3 @ n1",
                "ns/a <- ns/2 @ n1",
                "ns/b <- ns/1 @ n1",
            ],
            reason: Some(reason::IDENTITIES_ASSIGNED),
        },
        Case {
            name: "selector is exact",
            policy: NAMESPACED,
            identities: vec![identity("ns", "id").build()],
            bindings: vec![binding("ns", "b", "id", "sel").build()],
            pod: labelled("ns", "p", "sel-2").build(),
            want: vec![],
            reason: Some(reason::NO_MATCHING_BINDING),
        },
    ];
    for case in cases {
        // every order of arrival gives the same answer
        for order in 0..3 {
            let mut world = World::new(case.policy);
            let pod_key = ObjectKey::of(&case.pod).unwrap();
            type Step<'a> = Box<dyn Fn(&mut World) + 'a>;
            let steps: Vec<Step> = vec![
                Box::new(|w: &mut World| {
                    case.identities
                        .iter()
                        .for_each(|i| drop(w.identity(i.clone())))
                }),
                Box::new(|w: &mut World| {
                    case.bindings
                        .iter()
                        .for_each(|b| drop(w.binding(b.clone())))
                }),
                Box::new(|w: &mut World| drop(w.pod(case.pod.clone()))),
            ];
            for i in 0..3 {
                steps[(i + order) % 3](&mut world);
            }
            let plan = world.index.plan(&pod_key);
            assert_eq!(summary(&plan), case.want, "{} (order {order})", case.name);
            assert_eq!(
                reason_of(&plan),
                case.reason,
                "{} (order {order})",
                case.name
            );
        }
    }
}

#[test]
fn arrival_order_affects_the_right_pods() {
    let mut w = World::new(NAMESPACED);
    assert_eq!(
        w.pod(labelled("ns", "p", "sel").build()).pods,
        pods(&[("ns", "p")])
    );
    w.pod(labelled("other", "q", "sel").build());
    let affected = w.binding(binding("ns", "b", "id", "sel").build());
    assert_eq!(
        affected.pods,
        pods(&[("ns", "p")]),
        "namespaced: only the binding's namespace"
    );
    assert_eq!(affected.bindings, pods(&[("ns", "b")]));
    assert_eq!(
        w.index.binding_state(&key("ns", "b")),
        BindingState::IdentityMissing {
            identity: Some("id".into())
        }
    );
    let affected = w.identity(identity("ns", "id").build());
    assert_eq!(affected.pods, pods(&[("ns", "p")]));
    assert_eq!(affected.bindings, pods(&[("ns", "b")]));
    assert_eq!(
        w.index.binding_state(&key("ns", "b")),
        BindingState::IdentityPresent
    );
    assert_eq!(summary(&w.plan("ns", "p")), ["ns/id <- ns/b @ n1"]);

    let mut cw = World::new(CLUSTER_WIDE);
    cw.pod(labelled("ns", "p", "sel").build());
    cw.pod(labelled("other", "q", "sel").build());
    assert_eq!(
        cw.binding(binding("ns", "b", "id", "sel").build()).pods,
        pods(&[("ns", "p"), ("other", "q")])
    );
}

#[test]
fn pod_name_reused_with_a_new_uid() {
    let mut w = World::new(NAMESPACED);
    w.identity(identity("ns", "id").build());
    w.binding(binding("ns", "b", "id", "sel").build());
    w.pod(labelled("ns", "p", "sel").uid("old").build());
    w.write_desired("ns", "p");
    let old_name = assignment_name("p", "old", "ns", "id");
    assert_eq!(w.plan("ns", "p").existing[0].name_any(), old_name);

    assert_eq!(
        w.pod(labelled("ns", "p", "sel").uid("new").build()).pods,
        pods(&[("ns", "p")])
    );
    let plan = w.plan("ns", "p");
    assert_eq!(
        plan.desired[0].name_any(),
        assignment_name("p", "new", "ns", "id")
    );
    assert_eq!(plan.desired[0].spec.pod_uid.as_deref(), Some("new"));
    assert_eq!(
        plan.existing.len(),
        1,
        "the old UID's assignment is still there, to be deleted"
    );
    assert_ne!(plan.existing[0].name_any(), plan.desired[0].name_any());
}

#[test]
fn label_added_changed_removed() {
    let mut w = World::new(NAMESPACED);
    w.identity(identity("ns", "a").build());
    w.identity(identity("ns", "b").build());
    w.binding(binding("ns", "ba", "a", "sel-a").build());
    w.binding(binding("ns", "bb", "b", "sel-b").build());

    // without the label the pod is not in the watch at all; with it, it is
    assert_eq!(
        w.pod(labelled("ns", "p", "sel-a").build()).pods,
        pods(&[("ns", "p")])
    );
    assert_eq!(summary(&w.plan("ns", "p")), ["ns/a <- ns/ba @ n1"]);
    w.write_desired("ns", "p");

    assert_eq!(
        w.pod(labelled("ns", "p", "sel-b").build()).pods,
        pods(&[("ns", "p")]),
        "label changed"
    );
    let plan = w.plan("ns", "p");
    assert_eq!(summary(&plan), ["ns/b <- ns/bb @ n1"]);
    assert_eq!(
        plan.existing.len(),
        1,
        "a's assignment is still stored, to be deleted"
    );
    // a binding change for the old label no longer reaches the pod
    assert!(
        w.binding(binding("ns", "ba", "a", "sel-a").weight(3).build())
            .pods
            .is_empty()
    );

    // a pod that drops the label leaves the watch as DELETED
    assert_eq!(
        w.index.delete_pod(&key("ns", "p")).pods,
        pods(&[("ns", "p")])
    );
    let plan = w.plan("ns", "p");
    assert!(plan.pod.is_none() && plan.desired.is_empty() && plan.readiness.is_none());
    assert_eq!(plan.existing.len(), 1, "its assignment is deleted next");
    assert!(
        w.binding(binding("ns", "bb", "b", "sel-b").weight(3).build())
            .pods
            .is_empty()
    );
}

#[test]
fn departed_pod_with_ready_condition_is_checked_once() {
    let mut w = World::new(NAMESPACED);
    w.pod(
        labelled("ns", "p", "sel")
            .condition(IDENTITY_READY_CONDITION, "True", "IdentitiesAssigned", "")
            .build(),
    );
    w.index.delete_pod(&key("ns", "p"));
    assert_eq!(w.plan("ns", "p").departed_uid.as_deref(), Some("p-uid"));
    assert!(w.index.all_pod_keys().contains(&key("ns", "p")));
    w.index.forget_departed(&key("ns", "p"), "p-uid");
    assert_eq!(w.plan("ns", "p").departed_uid, None);

    // a pod being deleted, or one without our condition, needs no check
    w.pod(
        labelled("ns", "q", "sel")
            .terminating()
            .condition(IDENTITY_READY_CONDITION, "True", "", "")
            .build(),
    );
    w.index.delete_pod(&key("ns", "q"));
    assert_eq!(w.plan("ns", "q").departed_uid, None);
    w.pod(labelled("ns", "r", "sel").build());
    w.index.delete_pod(&key("ns", "r"));
    assert_eq!(w.plan("ns", "r").departed_uid, None);

    // coming back into the watch cancels the check
    w.pod(
        labelled("ns", "s", "sel")
            .condition(IDENTITY_READY_CONDITION, "True", "", "")
            .build(),
    );
    w.index.delete_pod(&key("ns", "s"));
    w.pod(labelled("ns", "s", "sel").build());
    assert_eq!(w.plan("ns", "s").departed_uid, None);
}

#[test]
fn identity_spec_changed_updates_the_embedded_copy() {
    let mut w = World::new(NAMESPACED);
    w.identity(identity("ns", "id").client_id("one").build());
    w.binding(binding("ns", "b", "id", "sel").build());
    w.pod(labelled("ns", "p", "sel").build());
    w.write_desired("ns", "p");

    // a resourceVersion-only change is nothing
    assert!(
        w.identity(
            identity("ns", "id")
                .client_id("one")
                .resource_version("9")
                .build()
        )
        .is_empty()
    );

    let affected = w.identity(identity("ns", "id").client_id("two").build());
    assert_eq!(affected.pods, pods(&[("ns", "p")]));
    let plan = w.plan("ns", "p");
    let embedded = plan.desired[0].spec.azure_identity_ref.as_ref().unwrap();
    assert_eq!(embedded.spec.client_id.as_deref(), Some("two"));
    assert!(
        !assignment::currency(&plan.existing[0], &plan.desired[0]).object,
        "stored copy is stale"
    );
    assert_eq!(
        plan.existing[0].name_any(),
        plan.desired[0].name_any(),
        "same name: updated in place"
    );
}

#[test]
fn binding_deleted_and_identity_deleted() {
    let mut w = World::new(NAMESPACED);
    w.identity(identity("ns", "id").build());
    w.binding(binding("ns", "b", "id", "sel").build());
    w.pod(labelled("ns", "p", "sel").build());
    w.write_desired("ns", "p");

    let affected = w.index.delete_binding(&key("ns", "b"));
    assert_eq!(affected.pods, pods(&[("ns", "p")]));
    assert_eq!(w.index.binding_state(&key("ns", "b")), BindingState::Gone);
    let plan = w.plan("ns", "p");
    assert!(plan.desired.is_empty());
    assert_eq!(reason_of(&plan), Some(reason::NO_MATCHING_BINDING));

    w.binding(binding("ns", "b", "id", "sel").build());
    w.write_desired("ns", "p");
    let affected = w.index.delete_identity(&key("ns", "id"));
    assert_eq!(affected.pods, pods(&[("ns", "p")]));
    assert_eq!(affected.bindings, pods(&[("ns", "b")]));
    assert_eq!(
        reason_of(&w.plan("ns", "p")),
        Some(reason::IDENTITY_NOT_FOUND)
    );
}

#[test]
fn pod_rescheduled_to_another_node() {
    let mut w = World::new(NAMESPACED);
    w.identity(identity("ns", "id").build());
    w.binding(binding("ns", "b", "id", "sel").build());
    w.pod(labelled("ns", "p", "sel").build());
    w.write_desired("ns", "p");
    let moved = pod("ns", "p")
        .label(BINDING_LABEL, "sel")
        .on_node("n2")
        .uid("p-uid")
        .build();
    assert_eq!(w.pod(moved).pods, pods(&[("ns", "p")]));
    let plan = w.plan("ns", "p");
    assert_eq!(summary(&plan), ["ns/id <- ns/b @ n2"]);
    assert_eq!(plan.desired[0].labels()["nodename"], "n2");
    assert_eq!(
        plan.existing[0].name_any(),
        plan.desired[0].name_any(),
        "same name, updated in place"
    );
}

#[test]
fn status_only_changes_affect_nothing() {
    let mut w = World::new(NAMESPACED);
    w.identity(identity("ns", "id").build());
    w.binding(binding("ns", "b", "id", "sel").build());
    w.pod(labelled("ns", "p", "sel").build());
    assert!(
        w.pod(
            labelled("ns", "p", "sel")
                .resource_version("5")
                .phase("Running")
                .build()
        )
        .is_empty()
    );
    assert!(
        w.pod(
            labelled("ns", "p", "sel")
                .condition(IDENTITY_READY_CONDITION, "True", "x", "y")
                .build()
        )
        .is_empty(),
        "our own condition write comes back as a no-op"
    );
    assert_eq!(
        w.pod(labelled("ns", "p", "sel").phase("Succeeded").build())
            .pods,
        pods(&[("ns", "p")])
    );
}

#[test]
fn assignments_written_by_others_or_deleted_by_others_are_repaired() {
    let mut w = World::new(NAMESPACED);
    w.identity(identity("ns", "id").build());
    w.binding(binding("ns", "b", "id", "sel").build());
    w.pod(labelled("ns", "p", "sel").build());
    let want = w.plan("ns", "p").desired[0].clone();

    // just written, status not yet: no reconcile
    assert!(w.index.apply_assignment(Arc::new(want.clone())).is_empty());
    // someone set another state
    let mut unassigned = want.clone();
    unassigned.status = Some(AzureAssignedIdentityStatus {
        status: Some("Unassigned".into()),
        available_replicas: None,
    });
    assert_eq!(
        w.index.apply_assignment(Arc::new(unassigned)).pods,
        pods(&[("ns", "p")])
    );
    // someone edited the spec
    let mut edited = want.clone();
    edited.spec.nodename = Some("elsewhere".into());
    assert_eq!(
        w.index.apply_assignment(Arc::new(edited)).pods,
        pods(&[("ns", "p")])
    );
    assert_eq!(w.index.assignment_count(), 1);
    // someone deleted it
    assert_eq!(w.index.delete_assignment(&want).pods, pods(&[("ns", "p")]));
    assert_eq!(w.index.assignment_count(), 0);

    // a stray managed assignment whose pod is unknown is reconciled (to be deleted)
    let mut stray: AzureAssignedIdentity = want.clone();
    stray.metadata.name = Some("stray".into());
    stray.spec.pod = Some("ghost".into());
    assert_eq!(
        w.index.apply_assignment(Arc::new(stray.clone())).pods,
        pods(&[("ns", "ghost")])
    );
    assert!(w.index.all_pod_keys().contains(&key("ns", "ghost")));
    assert!(
        w.index.delete_assignment(&stray).is_empty(),
        "deleting what is not wanted is a no-op"
    );
}

#[test]
fn resets_replay_the_difference() {
    let mut w = World::new(NAMESPACED);
    w.identity(identity("ns", "id").build());
    w.binding(binding("ns", "b", "id", "sel").build());
    w.pod(labelled("ns", "p", "sel").build());
    w.pod(labelled("ns", "q", "sel").build());
    w.write_desired("ns", "p");
    w.write_desired("ns", "q");

    // a relist that no longer holds q, and holds p unchanged
    let affected = w
        .index
        .reset_pods([Arc::new(labelled("ns", "p", "sel").build())]);
    assert_eq!(affected.pods, pods(&[("ns", "q")]));
    // a relist of assignments that lost p's (deleted while we were not watching)
    let affected = w.index.reset_assignments(Vec::new());
    assert_eq!(affected.pods, pods(&[("ns", "p")]));
    assert_eq!(w.index.assignment_count(), 0);
    // an identity relist without the identity
    let affected = w.index.reset_identities(Vec::new());
    assert_eq!(affected.pods, pods(&[("ns", "p")]));
    let affected = w.index.reset_bindings(Vec::new());
    assert_eq!(affected.bindings, pods(&[("ns", "b")]));
}

#[test]
fn readiness_messages_name_what_is_missing() {
    let mut w = World::new(NAMESPACED);
    w.binding(binding("ns", "b", "kv", "sel").build());
    w.pod(labelled("ns", "p", "sel").build());
    let readiness = w.plan("ns", "p").readiness.unwrap();
    let (status, reason, message) = readiness.condition();
    assert_eq!((status, reason), ("False", reason::IDENTITY_NOT_FOUND));
    assert_eq!(
        message,
        "binding ns/b names AzureIdentity ns/kv, which does not exist"
    );

    w.pod(labelled("ns", "p", "other").build());
    let readiness = w.plan("ns", "p").readiness.unwrap();
    let (_, reason, message) = readiness.condition();
    assert_eq!(reason, reason::NO_MATCHING_BINDING);
    assert_eq!(
        message,
        "no AzureIdentityBinding in namespace ns has selector \"other\""
    );

    w.identity(identity("ns", "kv").build());
    w.pod(labelled("ns", "p", "sel").build());
    let readiness = w.plan("ns", "p").readiness.unwrap();
    let (status, reason, message) = readiness.condition();
    assert_eq!(
        (status, reason, message.as_str()),
        (
            "True",
            reason::IDENTITIES_ASSIGNED,
            "assigned AzureIdentity ns/kv"
        )
    );
}
