//! Which identities a pod's `aadpodidbinding` label brings: the matching rules of DESIGN.md
//! ("CRDs", "Default identity"), shared by the controller, which writes the assignments, and
//! tokend, which must know which identities a pod's label *will* bring before they are written.
//!
//! Pure: the caller hands in the bindings it knows and a lookup for identities.

use std::cmp::Ordering;

use kube::{Resource as _, ResourceExt as _};

use crate::crd::{AzureIdentity, AzureIdentityBinding};

/// How bindings reach across namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MatchPolicy {
    /// `--cluster-wide-bindings`: a binding in any namespace selects pods in any namespace,
    /// except for identities annotated `Behavior: namespaced`.
    pub cluster_wide: bool,
}

/// One identity a pod gets, with the binding that brings it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Selected<'a> {
    pub identity: &'a AzureIdentity,
    pub binding: &'a AzureIdentityBinding,
}

/// What a pod's label brings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection<'a> {
    /// The pod's identities, one per identity, in default-identity order: binding weight
    /// (highest first), then identity name, then identity namespace.
    pub identities: Vec<Selected<'a>>,
    /// Bindings that select the pod but name an AzureIdentity that does not exist.
    pub missing_identity: Vec<&'a AzureIdentityBinding>,
}

impl Selection<'_> {
    /// Whether any binding selected the pod at all (with or without an existing identity).
    pub fn any_binding(&self) -> bool {
        !self.identities.is_empty() || !self.missing_identity.is_empty()
    }
}

/// A binding's weight; an absent weight is 0.
pub fn weight(binding: &AzureIdentityBinding) -> i64 {
    binding.spec.weight.unwrap_or(0)
}

/// A binding's namespace; the API server always sets one for these namespaced kinds.
fn namespace_of<K: kube::Resource>(obj: &K) -> &str {
    obj.meta().namespace.as_deref().unwrap_or("")
}

impl MatchPolicy {
    /// Whether `binding` selects a pod of `pod_namespace` labelled `label`, before the
    /// identity's own `Behavior: namespaced` rule: the selector equals the label exactly, and
    /// the namespaces agree unless matching is cluster-wide.
    pub fn binding_selects(
        &self,
        binding: &AzureIdentityBinding,
        pod_namespace: &str,
        label: &str,
    ) -> bool {
        binding.spec.selector.as_deref() == Some(label)
            && (self.cluster_wide || namespace_of(binding) == pod_namespace)
    }

    /// Whether `identity` (the one `binding` names) may serve a pod of `pod_namespace`:
    /// an identity annotated `Behavior: namespaced` serves only pods of its own namespace.
    pub fn identity_serves(&self, identity: &AzureIdentity, pod_namespace: &str) -> bool {
        let same_namespace = namespace_of(identity) == pod_namespace;
        same_namespace || (self.cluster_wide && !identity.forces_namespaced())
    }

    /// The identities a pod of `pod_namespace` labelled `label` gets. `bindings` may hold any
    /// bindings (those that do not select the pod are skipped); `identity(namespace, name)`
    /// looks an AzureIdentity up. When two bindings name one identity, the one with the
    /// highest weight, then the lowest name, is the one embedded.
    pub fn select<'a, B, F>(
        &self,
        pod_namespace: &str,
        label: &str,
        bindings: B,
        identity: F,
    ) -> Selection<'a>
    where
        B: IntoIterator<Item = &'a AzureIdentityBinding>,
        F: Fn(&str, &str) -> Option<&'a AzureIdentity>,
    {
        let mut selection = Selection::default();
        for binding in bindings {
            if !self.binding_selects(binding, pod_namespace, label) {
                continue;
            }
            let found = binding
                .spec
                .azure_identity
                .as_deref()
                .and_then(|name| identity(namespace_of(binding), name));
            let Some(found) = found else {
                selection.missing_identity.push(binding);
                continue;
            };
            if !self.identity_serves(found, pod_namespace) {
                continue;
            }
            let same = selection
                .identities
                .iter_mut()
                .find(|s| same_object(s.identity, found));
            match same {
                Some(existing)
                    if preferred_binding(binding, existing.binding) == Ordering::Less =>
                {
                    existing.binding = binding;
                }
                Some(_) => {}
                None => selection.identities.push(Selected {
                    identity: found,
                    binding,
                }),
            }
        }
        selection.identities.sort_by(default_order);
        selection.missing_identity.sort_by(|a, b| {
            (namespace_of(*a), a.name_any()).cmp(&(namespace_of(*b), b.name_any()))
        });
        selection
    }
}

fn same_object<K: kube::Resource>(a: &K, b: &K) -> bool {
    a.meta().name == b.meta().name && a.meta().namespace == b.meta().namespace
}

/// `Less` when `a` is the binding to embed rather than `b`: higher weight, then lower name.
pub fn preferred_binding(a: &AzureIdentityBinding, b: &AzureIdentityBinding) -> Ordering {
    weight(b)
        .cmp(&weight(a))
        .then_with(|| a.meta().name.cmp(&b.meta().name))
        .then_with(|| namespace_of(a).cmp(namespace_of(b)))
}

/// The order of a pod's identities; the first is its default identity (DESIGN.md "Default
/// identity"): the highest binding weight, ties to the lowest identity name.
pub fn default_order(a: &Selected<'_>, b: &Selected<'_>) -> Ordering {
    weight(b.binding)
        .cmp(&weight(a.binding))
        .then_with(|| a.identity.meta().name.cmp(&b.identity.meta().name))
        .then_with(|| namespace_of(a.identity).cmp(namespace_of(b.identity)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::api::ObjectMeta;

    use super::*;
    use crate::crd::{AzureIdentityBindingSpec, AzureIdentitySpec, BEHAVIOR_ANNOTATION};

    fn identity(ns: &str, name: &str) -> AzureIdentity {
        AzureIdentity {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: AzureIdentitySpec::default(),
            status: None,
        }
    }

    fn namespaced_only(mut id: AzureIdentity) -> AzureIdentity {
        id.metadata.annotations = Some(BTreeMap::from([(
            BEHAVIOR_ANNOTATION.to_owned(),
            "namespaced".to_owned(),
        )]));
        id
    }

    fn binding(
        ns: &str,
        name: &str,
        identity: &str,
        selector: &str,
        weight: Option<i64>,
    ) -> AzureIdentityBinding {
        AzureIdentityBinding {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: AzureIdentityBindingSpec {
                azure_identity: Some(identity.into()),
                selector: Some(selector.into()),
                weight,
            },
            status: None,
        }
    }

    struct World {
        identities: Vec<AzureIdentity>,
        bindings: Vec<AzureIdentityBinding>,
    }

    impl World {
        /// `(identity ns/name, binding ns/name)` for each selected identity, in order.
        fn select(
            &self,
            policy: MatchPolicy,
            ns: &str,
            label: &str,
        ) -> (Vec<(String, String)>, Vec<String>) {
            let s = policy.select(ns, label, &self.bindings, |ns, name| {
                self.identities
                    .iter()
                    .find(|i| i.metadata.namespace.as_deref() == Some(ns) && i.name_any() == name)
            });
            (
                s.identities
                    .iter()
                    .map(|s| {
                        (
                            format!("{}/{}", namespace_of(s.identity), s.identity.name_any()),
                            format!("{}/{}", namespace_of(s.binding), s.binding.name_any()),
                        )
                    })
                    .collect(),
                s.missing_identity
                    .iter()
                    .map(|b| format!("{}/{}", namespace_of(*b), b.name_any()))
                    .collect(),
            )
        }
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    const NAMESPACED: MatchPolicy = MatchPolicy {
        cluster_wide: false,
    };
    const CLUSTER_WIDE: MatchPolicy = MatchPolicy { cluster_wide: true };

    #[test]
    fn exact_selector_in_the_pods_namespace() {
        let world = World {
            identities: vec![identity("rgapi", "rgapi")],
            bindings: vec![
                binding("rgapi", "rgapi-binding", "rgapi", "rgapi", None),
                binding("rgapi", "prefix", "rgapi", "rga", None),
            ],
        };
        assert_eq!(
            world.select(NAMESPACED, "rgapi", "rgapi"),
            (pairs(&[("rgapi/rgapi", "rgapi/rgapi-binding")]), vec![])
        );
        assert_eq!(
            world.select(NAMESPACED, "rgapi", "RGAPI"),
            (vec![], vec![]),
            "exact, case-sensitive"
        );
        assert_eq!(world.select(NAMESPACED, "other", "rgapi"), (vec![], vec![]));
    }

    #[test]
    fn cluster_wide_reaches_across_namespaces_except_namespaced_identities() {
        let world = World {
            identities: vec![
                identity("a", "open"),
                namespaced_only(identity("a", "closed")),
            ],
            bindings: vec![
                binding("a", "to-open", "open", "sel", None),
                binding("a", "to-closed", "closed", "sel", None),
            ],
        };
        assert_eq!(world.select(NAMESPACED, "b", "sel"), (vec![], vec![]));
        assert_eq!(
            world.select(CLUSTER_WIDE, "b", "sel"),
            (pairs(&[("a/open", "a/to-open")]), vec![]),
            "the namespaced identity stays in its namespace"
        );
        assert_eq!(
            world.select(CLUSTER_WIDE, "a", "sel"),
            (
                pairs(&[("a/closed", "a/to-closed"), ("a/open", "a/to-open")]),
                vec![]
            )
        );
    }

    #[test]
    fn missing_identity_is_reported_not_selected() {
        let world = World {
            identities: vec![identity("ns", "present")],
            bindings: vec![
                binding("ns", "b1", "absent", "sel", None),
                binding("ns", "b2", "present", "sel", None),
            ],
        };
        assert_eq!(
            world.select(NAMESPACED, "ns", "sel"),
            (pairs(&[("ns/present", "ns/b2")]), vec!["ns/b1".to_owned()])
        );
        let s = NAMESPACED.select("ns", "sel", &world.bindings[..1], |_, _| None);
        assert!(s.any_binding());
        assert!(s.identities.is_empty());
    }

    #[test]
    fn duplicate_bindings_embed_the_heaviest_then_lowest_name() {
        let world = World {
            identities: vec![identity("ns", "id")],
            bindings: vec![
                binding("ns", "c", "id", "sel", Some(1)),
                binding("ns", "b", "id", "sel", Some(5)),
                binding("ns", "a", "id", "sel", Some(1)),
            ],
        };
        assert_eq!(
            world.select(NAMESPACED, "ns", "sel"),
            (pairs(&[("ns/id", "ns/b")]), vec![])
        );
        let tie = World {
            identities: vec![identity("ns", "id")],
            bindings: vec![
                binding("ns", "z", "id", "sel", None),
                binding("ns", "m", "id", "sel", Some(0)),
            ],
        };
        assert_eq!(
            tie.select(NAMESPACED, "ns", "sel"),
            (pairs(&[("ns/id", "ns/m")]), vec![])
        );
    }

    #[test]
    fn identities_ordered_by_weight_then_name() {
        let world = World {
            identities: vec![
                identity("ns", "b"),
                identity("ns", "a"),
                identity("ns", "heavy"),
                identity("ns", "neg"),
            ],
            bindings: vec![
                binding("ns", "1", "b", "sel", None),
                binding("ns", "2", "a", "sel", None),
                binding("ns", "3", "heavy", "sel", Some(10)),
                binding("ns", "4", "neg", "sel", Some(-1)),
            ],
        };
        let (selected, _) = world.select(NAMESPACED, "ns", "sel");
        let names: Vec<&str> = selected.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(names, ["ns/heavy", "ns/a", "ns/b", "ns/neg"]);
    }

    #[test]
    fn binding_without_identity_name_or_selector() {
        let mut no_identity = binding("ns", "b", "x", "sel", None);
        no_identity.spec.azure_identity = None;
        let mut no_selector = binding("ns", "c", "x", "sel", None);
        no_selector.spec.selector = None;
        let world = World {
            identities: vec![identity("ns", "x")],
            bindings: vec![no_identity, no_selector],
        };
        assert_eq!(
            world.select(NAMESPACED, "ns", "sel"),
            (vec![], vec!["ns/b".to_owned()])
        );
    }
}
