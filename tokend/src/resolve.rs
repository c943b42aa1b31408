//! Which identity answers a pod's token request, as a pure function of the cluster index
//! (DESIGN.md "Selector spellings", "Default identity", "What tokend answers when it does not
//! know yet"):
//!
//! - the watches have not listed, or the pod (by UID, with the listener's namespace and name)
//!   is not in the pod watch: [`Resolution::PodUnknown`] (the caller waits, then 404);
//! - an AzurePodIdentityException of the pod's namespace selects it: the node's identity;
//! - the pod's identities are its *current* ones (`Assigned` assignments for exactly this
//!   namespace, name and UID) and its *coming* ones (what its `aadpodidbinding` label brings
//!   by the bindings and identities, as the controller matches them, not assigned yet), in
//!   default order (binding weight, then identity name);
//! - a selector matching a current identity is served; one only a coming identity matches
//!   waits for its assignment; the default (no selector) is the first identity in that order,
//!   served if current, waited for if coming; anything else is "Identity not found" at once.
//!
//! Object ids are not in the CRDs: they are learned from the `oid` claim of tokens tokend got
//! for each identity ([`Resolution::LearnObjectIds`] asks the caller to fetch some first).

use std::cmp::Ordering;
use std::sync::Arc;

use podid_api::crd::AzureIdentityBinding;
use podid_api::matching::{MatchPolicy, Selected, default_order};

use crate::cluster::{ClusterIndex, IdentityKey, IdentityRecord, PodInfo};
use crate::imds::Selector;
use crate::registry::PodRef;

/// An identity chosen to serve a pod.
#[derive(Debug, Clone)]
pub struct Target {
    /// The identity as the assignment embeds it: what the controller assigned.
    pub identity: Arc<IdentityRecord>,
    /// Its key in the token cache.
    pub key: IdentityKey,
    pub pod: Arc<PodInfo>,
}

/// Why a request names no identity of the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotFound {
    /// The pod has no `aadpodidbinding` label (or is finished) and no assignment.
    Unlabelled,
    /// Its label brings no identity: no binding in reach, or the bindings name identities
    /// that do not exist.
    Unbound,
    /// None of its current or coming identities has the requested id.
    Unmatched,
}

/// The decision for one request.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// The watches have not listed yet, or the pod is not in the pod watch: wait.
    PodUnknown,
    /// An exception selects the pod: the node's own identity.
    NodeIdentity,
    /// Serve this identity.
    Serve(Target),
    /// Learn the object ids of these current identities (a token each), then decide again.
    LearnObjectIds(Vec<Target>),
    /// An identity the pod's bindings bring will serve, once its assignment is there.
    AwaitAssignment { identity: String },
    /// `400 Identity not found`.
    NotFound(NotFound),
}

/// One identity of the pod, current or coming.
struct Candidate<'a> {
    identity: &'a Arc<IdentityRecord>,
    binding: &'a AzureIdentityBinding,
    current: bool,
}

impl Candidate<'_> {
    fn order(&self, other: &Self) -> Ordering {
        default_order(
            &Selected {
                identity: &self.identity.identity,
                binding: self.binding,
            },
            &Selected {
                identity: &other.identity.identity,
                binding: other.binding,
            },
        )
    }
}

/// Whether a candidate has the id a selector names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    Yes,
    No,
    /// An object id tokend has not learned yet.
    Unknown,
}

fn matches(
    selector: &Selector,
    identity: &IdentityRecord,
    object_id: &impl Fn(&IdentityKey) -> Option<String>,
    key: &IdentityKey,
) -> Match {
    let spec = &identity.identity.spec;
    let found = match selector {
        Selector::ClientId(_) => spec
            .client_id
            .as_deref()
            .is_some_and(|id| selector.names(id)),
        Selector::ResourceId(_) => spec
            .resource_id
            .as_deref()
            .is_some_and(|id| selector.names(id)),
        Selector::ObjectId(_) => match object_id(&key.without_pod()) {
            Some(oid) => selector.names(&oid),
            None => return Match::Unknown,
        },
    };
    if found { Match::Yes } else { Match::No }
}

/// Decides how to answer `pod`'s request with `selector`. `object_id` looks up the object id
/// learned for an identity (keys without a pod).
pub fn resolve(
    index: &ClusterIndex,
    policy: MatchPolicy,
    pod: &PodRef,
    selector: Option<&Selector>,
    object_id: impl Fn(&IdentityKey) -> Option<String>,
) -> Resolution {
    if !index.synced() {
        return Resolution::PodUnknown;
    }
    let Some(info) = index
        .pod(&pod.uid)
        .filter(|p| p.namespace == pod.namespace && p.name == pod.name)
    else {
        return Resolution::PodUnknown;
    };
    if index.excepted(info) {
        return Resolution::NodeIdentity;
    }

    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    for assignment in index.assignments_of(&info.uid) {
        let Some(identity) = assignment
            .identity
            .as_ref()
            .filter(|_| assignment.serves(info))
        else {
            continue;
        };
        if !candidates.iter().any(|c| c.identity.key == identity.key) {
            candidates.push(Candidate {
                identity,
                binding: &assignment.binding,
                current: true,
            });
        }
    }
    let label = info.binding_label().filter(|_| !info.terminal);
    if let Some(label) = label {
        let selection = policy.select(
            &info.namespace,
            label,
            index.bindings_with_selector(label),
            |namespace, name| index.identity(namespace, name).map(|r| &r.identity),
        );
        for selected in &selection.identities {
            let Some(record) = index.identity(
                selected
                    .identity
                    .metadata
                    .namespace
                    .as_deref()
                    .unwrap_or_default(),
                selected
                    .identity
                    .metadata
                    .name
                    .as_deref()
                    .unwrap_or_default(),
            ) else {
                continue;
            };
            if !candidates.iter().any(|c| c.identity.key == record.key) {
                candidates.push(Candidate {
                    identity: record,
                    binding: selected.binding,
                    current: false,
                });
            }
        }
    }
    if candidates.is_empty() {
        return Resolution::NotFound(match label {
            None => NotFound::Unlabelled,
            Some(_) => NotFound::Unbound,
        });
    }
    candidates.sort_by(Candidate::order);

    let target = |c: &Candidate<'_>| Target {
        identity: Arc::clone(c.identity),
        key: IdentityKey::new(c.identity, &info.uid),
        pod: Arc::clone(info),
    };
    let await_assignment = |c: &Candidate<'_>| Resolution::AwaitAssignment {
        identity: c.identity.key.to_string(),
    };

    let Some(selector) = selector else {
        let default = &candidates[0];
        return if default.current {
            Resolution::Serve(target(default))
        } else {
            await_assignment(default)
        };
    };

    let judged: Vec<(&Candidate<'_>, Match)> = candidates
        .iter()
        .map(|c| {
            let key = IdentityKey::new(c.identity, &info.uid);
            (c, matches(selector, c.identity, &object_id, &key))
        })
        .collect();
    if let Some((c, _)) = judged.iter().find(|(c, m)| c.current && *m == Match::Yes) {
        return Resolution::Serve(target(c));
    }
    let unlearned: Vec<Target> = judged
        .iter()
        .filter(|(c, m)| c.current && *m == Match::Unknown)
        .map(|(c, _)| target(c))
        .collect();
    if !unlearned.is_empty() {
        return Resolution::LearnObjectIds(unlearned);
    }
    match judged.iter().find(|(c, m)| !c.current && *m != Match::No) {
        Some((c, _)) => await_assignment(c),
        None => Resolution::NotFound(NotFound::Unmatched),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use k8s_openapi::api::core::v1::Pod;
    use podid_api::crd::{
        AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
        assignment_state,
    };

    use super::*;
    use crate::cluster::Indexed;
    use crate::cluster::testing::*;

    const NAMESPACED: MatchPolicy = MatchPolicy {
        cluster_wide: false,
    };
    const CLUSTER_WIDE: MatchPolicy = MatchPolicy { cluster_wide: true };

    /// An index with every watch listed, and the object ids learned so far.
    struct World {
        index: ClusterIndex,
        oids: HashMap<String, String>,
    }

    impl World {
        fn new() -> Self {
            let mut index = ClusterIndex::default();
            Pod::reset(&[], &mut index);
            AzureAssignedIdentity::reset(&[], &mut index);
            AzureIdentity::reset(&[], &mut index);
            AzureIdentityBinding::reset(&[], &mut index);
            AzurePodIdentityException::reset(&[], &mut index);
            Self {
                index,
                oids: HashMap::new(),
            }
        }

        fn with(mut self, obj: &impl Indexed) -> Self {
            obj.apply(&mut self.index);
            self
        }

        fn learned(mut self, identity: &str, oid: &str) -> Self {
            self.oids.insert(identity.into(), oid.into());
            self
        }

        fn resolve(&self, policy: MatchPolicy, pod: &Pod, selector: Option<Selector>) -> String {
            let pod_ref = PodRef {
                namespace: pod.metadata.namespace.clone().unwrap(),
                name: pod.metadata.name.clone().unwrap(),
                uid: pod.metadata.uid.clone().unwrap(),
            };
            let oids = &self.oids;
            let resolution = resolve(&self.index, policy, &pod_ref, selector.as_ref(), |key| {
                assert!(key.pod_uid.is_none(), "object ids are per identity");
                oids.get(&key.to_string()).cloned()
            });
            match resolution {
                Resolution::PodUnknown => "wait pod".into(),
                Resolution::NodeIdentity => "node identity".into(),
                Resolution::Serve(t) => {
                    format!(
                        "serve {}{}",
                        t.key,
                        t.key
                            .pod_uid
                            .as_ref()
                            .map(|u| format!(" for {u}"))
                            .unwrap_or_default()
                    )
                }
                Resolution::LearnObjectIds(targets) => format!(
                    "learn {}",
                    targets
                        .iter()
                        .map(|t| t.key.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Resolution::AwaitAssignment { identity } => format!("wait assignment {identity}"),
                Resolution::NotFound(why) => format!("not found {why:?}"),
            }
        }
    }

    fn client(id: &str) -> Option<Selector> {
        Some(Selector::ClientId(id.into()))
    }
    fn object(id: &str) -> Option<Selector> {
        Some(Selector::ObjectId(id.into()))
    }
    fn resource(id: &str) -> Option<Selector> {
        Some(Selector::ResourceId(id.into()))
    }

    /// One pod `ns/web` labelled `sel`, identity `ns/id` (client `c-1`) bound and assigned.
    fn assigned() -> (World, Pod) {
        let p = pod("ns", "web").uid("u1").binding("sel").build();
        let id = identity("ns", "id", "C-1");
        let b = binding("ns", "b", "id", "sel", None);
        let world = World::new()
            .with(&p)
            .with(&id)
            .with(&b)
            .with(&assignment(&p, &id, &b));
        (world, p)
    }

    #[test]
    fn unknown_pod_waits_never_not_found() {
        let (world, _) = assigned();
        let stranger = pod("ns", "other").uid("u9").binding("sel").build();
        assert_eq!(world.resolve(NAMESPACED, &stranger, None), "wait pod");
        // The listener's namespace and name must be the watched pod's too.
        let renamed = pod("ns", "renamed").uid("u1").build();
        assert_eq!(world.resolve(NAMESPACED, &renamed, None), "wait pod");
        // Before every watch has listed, nothing is "not found".
        let mut index = ClusterIndex::default();
        let p = pod("ns", "web").uid("u1").build();
        p.apply(&mut index);
        Pod::reset(std::slice::from_ref(&p), &mut index);
        let world = World {
            index,
            oids: HashMap::new(),
        };
        assert_eq!(world.resolve(NAMESPACED, &p, None), "wait pod");
    }

    #[test]
    fn assigned_identity_is_served_by_default_and_by_every_spelling() {
        let (world, p) = assigned();
        let world = world.learned("ns/id", "OID-1");
        let rid = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id";
        for selector in [
            None,
            client("C-1"),
            client("c-1"),
            resource(rid),
            resource(&format!("  {}  ", rid.to_uppercase())),
            object("oid-1"),
        ] {
            assert_eq!(
                world.resolve(NAMESPACED, &p, selector.clone()),
                "serve ns/id",
                "{selector:?}"
            );
        }
    }

    #[test]
    fn unknown_selectors_are_not_found_at_once() {
        let (world, p) = assigned();
        let world = world.learned("ns/id", "oid-1");
        for selector in [
            client("c-2"),
            resource("/subscriptions/s/other"),
            object("oid-2"),
        ] {
            assert_eq!(
                world.resolve(NAMESPACED, &p, selector.clone()),
                "not found Unmatched",
                "{selector:?}"
            );
        }
    }

    #[test]
    fn object_ids_are_learned_before_deciding() {
        let (world, p) = assigned();
        assert_eq!(
            world.resolve(NAMESPACED, &p, object("oid-1")),
            "learn ns/id"
        );
        let world = world.learned("ns/id", "oid-1");
        assert_eq!(
            world.resolve(NAMESPACED, &p, object("OID-1")),
            "serve ns/id"
        );
        assert_eq!(
            world.resolve(NAMESPACED, &p, object("oid-9")),
            "not found Unmatched"
        );
    }

    #[test]
    fn a_recreated_pod_never_inherits_a_stale_assignment() {
        let (world, old) = assigned();
        let recreated = pod("ns", "web").uid("u2").binding("sel").build();
        let world = World {
            index: {
                let mut index = world.index;
                old.delete(&mut index);
                recreated.apply(&mut index);
                index
            },
            oids: world.oids,
        };
        // The old assignment (UID u1) is still there; the new pod waits for its own.
        assert_eq!(
            world.resolve(NAMESPACED, &recreated, None),
            "wait assignment ns/id"
        );
        assert_eq!(
            world.resolve(NAMESPACED, &recreated, client("c-1")),
            "wait assignment ns/id"
        );
        // The old pod's listener (UID u1) is no longer a pod of this node.
        assert_eq!(world.resolve(NAMESPACED, &old, None), "wait pod");
    }

    #[test]
    fn only_assigned_assignments_serve() {
        let p = pod("ns", "web").uid("u1").binding("sel").build();
        let id = identity("ns", "id", "c-1");
        let b = binding("ns", "b", "id", "sel", None);
        for status in [assignment_state::CREATED, assignment_state::UNASSIGNED] {
            let world = World::new()
                .with(&p)
                .with(&id)
                .with(&b)
                .with(&with_status(assignment(&p, &id, &b), status));
            assert_eq!(
                world.resolve(NAMESPACED, &p, None),
                "wait assignment ns/id",
                "{status}"
            );
        }
    }

    #[test]
    fn coming_identities_are_waited_for() {
        let p = pod("ns", "web").uid("u1").binding("sel").build();
        let id = identity("ns", "id", "c-1");
        let b = binding("ns", "b", "id", "sel", None);
        let world = World::new().with(&p).with(&id).with(&b);
        assert_eq!(world.resolve(NAMESPACED, &p, None), "wait assignment ns/id");
        assert_eq!(
            world.resolve(NAMESPACED, &p, client("C-1")),
            "wait assignment ns/id"
        );
        // An object id nobody has learned may be the coming identity's: wait.
        assert_eq!(
            world.resolve(NAMESPACED, &p, object("x")),
            "wait assignment ns/id"
        );
        // Once learned (from another pod), a different one is not found at once.
        let world = world.learned("ns/id", "oid-1");
        assert_eq!(
            world.resolve(NAMESPACED, &p, object("x")),
            "not found Unmatched"
        );
        assert_eq!(
            world.resolve(NAMESPACED, &p, object("OID-1")),
            "wait assignment ns/id"
        );
        assert_eq!(
            world.resolve(NAMESPACED, &p, client("c-2")),
            "not found Unmatched"
        );
    }

    #[test]
    fn no_label_or_no_binding_is_not_found_at_once() {
        let (world, _) = assigned();
        let bare = pod("ns", "bare").uid("u5").build();
        let unbound = pod("ns", "lonely").uid("u6").binding("nothing").build();
        let world = world.with(&bare).with(&unbound);
        assert_eq!(
            world.resolve(NAMESPACED, &bare, None),
            "not found Unlabelled"
        );
        assert_eq!(
            world.resolve(NAMESPACED, &unbound, None),
            "not found Unbound"
        );
        assert_eq!(
            world.resolve(NAMESPACED, &unbound, client("c-1")),
            "not found Unbound"
        );
        // A binding naming an identity that does not exist brings nothing either.
        let dangling = binding("ns", "d", "missing", "nothing", None);
        let world = world.with(&dangling);
        assert_eq!(
            world.resolve(NAMESPACED, &unbound, None),
            "not found Unbound"
        );
        // A finished pod gets nothing more.
        let done = pod("ns", "done")
            .uid("u7")
            .binding("sel")
            .phase("Succeeded")
            .build();
        let world = world.with(&done);
        assert_eq!(
            world.resolve(NAMESPACED, &done, None),
            "not found Unlabelled"
        );
    }

    #[test]
    fn another_namespaces_binding_is_not_in_reach_unless_cluster_wide() {
        let p = pod("ns", "web").uid("u1").binding("sel").build();
        let id = identity("other", "id", "c-1");
        let b = binding("other", "b", "id", "sel", None);
        let world = World::new().with(&p).with(&id).with(&b);
        assert_eq!(world.resolve(NAMESPACED, &p, None), "not found Unbound");
        assert_eq!(
            world.resolve(CLUSTER_WIDE, &p, None),
            "wait assignment other/id"
        );
        let world = world.with(&namespaced_only(id));
        assert_eq!(
            world.resolve(CLUSTER_WIDE, &p, None),
            "not found Unbound",
            "Behavior: namespaced stays in its namespace"
        );
    }

    #[test]
    fn default_identity_by_weight_then_name() {
        let p = pod("ns", "web").uid("u1").binding("sel").build();
        let a = identity("ns", "a", "c-a");
        let b = identity("ns", "b", "c-b");
        let heavy = identity("ns", "z-heavy", "c-z");
        let ba = binding("ns", "ba", "a", "sel", None);
        let bb = binding("ns", "bb", "b", "sel", None);
        let bz = binding("ns", "bz", "z-heavy", "sel", Some(5));
        let world = World::new()
            .with(&p)
            .with(&a)
            .with(&b)
            .with(&ba)
            .with(&bb)
            .with(&assignment(&p, &a, &ba))
            .with(&assignment(&p, &b, &bb));
        assert_eq!(
            world.resolve(NAMESPACED, &p, None),
            "serve ns/a",
            "lowest name"
        );
        assert_eq!(world.resolve(NAMESPACED, &p, client("c-b")), "serve ns/b");
        // A heavier identity coming: it is the default, so the default waits for it...
        let world = world.with(&heavy).with(&bz);
        assert_eq!(
            world.resolve(NAMESPACED, &p, None),
            "wait assignment ns/z-heavy"
        );
        // ... while selectors of current identities are served at once.
        assert_eq!(world.resolve(NAMESPACED, &p, client("c-a")), "serve ns/a");
        let world = world.with(&assignment(&p, &heavy, &bz));
        assert_eq!(world.resolve(NAMESPACED, &p, None), "serve ns/z-heavy");
    }

    #[test]
    fn a_current_assignment_serves_even_when_its_binding_is_gone() {
        let (mut world, p) = assigned();
        binding("ns", "b", "id", "sel", None).delete(&mut world.index);
        assert_eq!(world.resolve(NAMESPACED, &p, None), "serve ns/id");
    }

    #[test]
    fn exceptions_get_the_node_identity() {
        let (world, _) = assigned();
        let csi = pod("kube-system", "csi")
            .uid("u8")
            .label("app", "csi")
            .build();
        let world = world
            .with(&csi)
            .with(&exception("kube-system", "e", &[("app", "csi")]));
        assert_eq!(world.resolve(NAMESPACED, &csi, None), "node identity");
        assert_eq!(
            world.resolve(NAMESPACED, &csi, client("x")),
            "node identity"
        );
        let plain = pod("kube-system", "plain").uid("u9").build();
        let world = world.with(&plain);
        assert_eq!(
            world.resolve(NAMESPACED, &plain, None),
            "not found Unlabelled"
        );
    }

    #[test]
    fn federated_identities_are_cached_per_pod() {
        let p = pod("ns", "web").uid("u1").binding("sel").build();
        let id = federated(identity("ns", "fed", "c-f"));
        let b = binding("ns", "b", "fed", "sel", None);
        let world = World::new()
            .with(&p)
            .with(&id)
            .with(&b)
            .with(&assignment(&p, &id, &b));
        assert_eq!(world.resolve(NAMESPACED, &p, None), "serve ns/fed for u1");
    }
}
