//! The AzureAssignedIdentity the controller wants for one pod and one identity, and whether a
//! stored one already is it. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use kube::{Resource as _, ResourceExt as _};
use podid_api::crd::{
    AzureAssignedIdentity, AzureAssignedIdentitySpec, AzureIdentity, AzureIdentityBinding,
    NODE_LABEL, assignment_name, assignment_state, node_label_value,
};
use podid_api::matching::Selected;

use crate::{FIELD_MANAGER, MANAGED_BY_LABEL};

/// kubectl's copy of the whole manifest: embedding it would store every identity twice.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The assignment of `selected` to `pod`, without status (written separately on `/status`).
/// `None` when the pod lacks what an assignment needs: a name, a namespace, a UID and a node.
pub fn desired(pod: &Pod, selected: &Selected<'_>) -> Option<AzureAssignedIdentity> {
    let pod_name = pod.metadata.name.as_deref()?;
    let pod_namespace = pod.metadata.namespace.as_deref()?;
    let pod_uid = pod.metadata.uid.as_deref()?;
    let node = pod.spec.as_ref()?.node_name.as_deref()?;
    let identity = selected.identity;
    let identity_namespace = identity.metadata.namespace.as_deref().unwrap_or_default();
    let name = assignment_name(pod_name, pod_uid, identity_namespace, &identity.name_any());
    let labels = BTreeMap::from([
        (NODE_LABEL.to_owned(), node_label_value(node)),
        (MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned()),
    ]);
    Some(AzureAssignedIdentity {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(pod_namespace.to_owned()),
            labels: Some(labels),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: pod_name.to_owned(),
                uid: pod_uid.to_owned(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: AzureAssignedIdentitySpec {
            azure_identity_ref: Some(embedded_identity(identity)),
            azure_binding_ref: Some(embedded_binding(selected.binding)),
            pod: Some(pod_name.to_owned()),
            pod_namespace: Some(pod_namespace.to_owned()),
            pod_uid: Some(pod_uid.to_owned()),
            nodename: Some(node.to_owned()),
            replicas: None,
        },
        status: None,
    })
}

/// The metadata an embedded object keeps: name, namespace, uid and annotations. No
/// resourceVersion or managedFields, which change on every write and would make every
/// embedding stale.
fn embedded_meta(meta: &ObjectMeta) -> ObjectMeta {
    let annotations = meta
        .annotations
        .as_ref()
        .map(|a| {
            a.iter()
                .filter(|(k, _)| k.as_str() != LAST_APPLIED)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|a| !a.is_empty());
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        annotations,
        ..Default::default()
    }
}

/// The identity as an assignment embeds it (`azureIdentityRef`).
pub fn embedded_identity(identity: &AzureIdentity) -> AzureIdentity {
    AzureIdentity {
        metadata: embedded_meta(identity.meta()),
        spec: identity.spec.clone(),
        status: None,
    }
}

/// The binding as an assignment embeds it (`azureBindingRef`).
pub fn embedded_binding(binding: &AzureIdentityBinding) -> AzureIdentityBinding {
    AzureIdentityBinding {
        metadata: embedded_meta(binding.meta()),
        spec: binding.spec.clone(),
        status: None,
    }
}

/// How far a stored assignment is from the desired one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Currency {
    /// Labels, owner reference and spec are as desired.
    pub object: bool,
    /// `status.status` is `Assigned`.
    pub status: bool,
}

/// Compares what this controller writes; labels, owners or annotations that others added are
/// left alone, as server-side apply leaves them.
pub fn currency(stored: &AzureAssignedIdentity, desired: &AzureAssignedIdentity) -> Currency {
    let labels_ok = desired
        .labels()
        .iter()
        .all(|(k, v)| stored.labels().get(k) == Some(v));
    let owners_ok = desired.owner_references().iter().all(|want| {
        stored.owner_references().iter().any(|have| {
            have.uid == want.uid
                && have.name == want.name
                && have.kind == want.kind
                && have.api_version == want.api_version
        })
    });
    Currency {
        object: labels_ok && owners_ok && stored.spec == desired.spec,
        status: is_assigned(stored),
    }
}

/// Whether an assignment's `status.status` is `Assigned`.
pub fn is_assigned(assignment: &AzureAssignedIdentity) -> bool {
    assignment.status.as_ref().and_then(|s| s.status.as_deref()) == Some(assignment_state::ASSIGNED)
}

#[cfg(test)]
mod tests {
    use podid_api::crd::AzureAssignedIdentityStatus;

    use super::*;
    use crate::testing::{binding, identity, pod};

    #[test]
    fn desired_assignment_shape() {
        let pod = pod("rgapi", "web")
            .label("aadpodidbinding", "rgapi")
            .on_node("aks-1")
            .uid("u1")
            .build();
        let id = identity("rgapi", "rgapi")
            .client_id("00000000-0000-0000-0000-000000000001")
            .uid("iu")
            .annotation(LAST_APPLIED, "{}")
            .annotation("team", "a")
            .resource_version("42")
            .build();
        let b = binding("rgapi", "rgapi-binding", "rgapi", "rgapi")
            .uid("bu")
            .resource_version("7")
            .build();
        let aai = desired(
            &pod,
            &Selected {
                identity: &id,
                binding: &b,
            },
        )
        .unwrap();
        assert_eq!(
            aai.name_any(),
            assignment_name("web", "u1", "rgapi", "rgapi")
        );
        assert_eq!(aai.namespace().as_deref(), Some("rgapi"));
        assert_eq!(
            aai.labels().get("nodename").map(String::as_str),
            Some("aks-1")
        );
        assert_eq!(
            aai.labels().get(MANAGED_BY_LABEL).map(String::as_str),
            Some(FIELD_MANAGER)
        );
        let owner = &aai.owner_references()[0];
        assert_eq!(
            (
                owner.api_version.as_str(),
                owner.kind.as_str(),
                owner.name.as_str(),
                owner.uid.as_str()
            ),
            ("v1", "Pod", "web", "u1")
        );
        let embedded = aai.spec.azure_identity_ref.as_ref().unwrap();
        assert_eq!(
            embedded.metadata.resource_version, None,
            "no resourceVersion: writes stay idempotent"
        );
        assert_eq!(embedded.metadata.uid.as_deref(), Some("iu"));
        assert_eq!(
            embedded.annotations().keys().collect::<Vec<_>>(),
            ["team"],
            "kubectl's last-applied copy is not embedded"
        );
        assert_eq!(embedded.spec, id.spec);
        let embedded_binding = aai.spec.azure_binding_ref.as_ref().unwrap();
        assert_eq!(embedded_binding.metadata.resource_version, None);
        assert_eq!(embedded_binding.spec.selector.as_deref(), Some("rgapi"));
        assert_eq!(aai.spec.pod_uid.as_deref(), Some("u1"));
        assert_eq!(aai.spec.nodename.as_deref(), Some("aks-1"));
        assert_eq!(aai.status, None, "status goes on /status");

        let json = serde_json::to_value(&aai).unwrap();
        for key in [
            "azureIdentityRef",
            "azureBindingRef",
            "pod",
            "podNamespace",
            "podUID",
            "nodename",
        ] {
            assert!(
                json["spec"].get(key).is_some(),
                "spec.{key} missing in {json}"
            );
        }
        assert_eq!(json["spec"]["azureIdentityRef"]["kind"], "AzureIdentity");
        assert_eq!(
            json["spec"]["azureBindingRef"]["apiVersion"],
            "aadpodidentity.k8s.io/v1"
        );
    }

    #[test]
    fn long_node_names_are_hashed_in_the_label_only() {
        let node = "n".repeat(70);
        let pod = pod("ns", "p")
            .label("aadpodidbinding", "s")
            .on_node(&node)
            .uid("u")
            .build();
        let id = identity("ns", "i").build();
        let b = binding("ns", "b", "i", "s").build();
        let aai = desired(
            &pod,
            &Selected {
                identity: &id,
                binding: &b,
            },
        )
        .unwrap();
        assert_eq!(aai.labels()["nodename"], node_label_value(&node));
        assert_eq!(aai.spec.nodename.as_deref(), Some(node.as_str()));
    }

    #[test]
    fn unscheduled_or_uidless_pods_get_nothing() {
        let id = identity("ns", "i").build();
        let b = binding("ns", "b", "i", "s").build();
        let selected = Selected {
            identity: &id,
            binding: &b,
        };
        assert!(desired(&pod("ns", "p").uid("u").build(), &selected).is_none());
        assert!(desired(&pod("ns", "p").on_node("n").build(), &selected).is_none());
    }

    #[test]
    fn currency_ignores_what_others_added() {
        let pod = pod("ns", "p")
            .label("aadpodidbinding", "s")
            .on_node("n1")
            .uid("u")
            .build();
        let id = identity("ns", "i").build();
        let b = binding("ns", "b", "i", "s").build();
        let want = desired(
            &pod,
            &Selected {
                identity: &id,
                binding: &b,
            },
        )
        .unwrap();
        let mut stored = want.clone();
        stored.metadata.resource_version = Some("9".into());
        stored
            .metadata
            .labels
            .get_or_insert_default()
            .insert("extra".into(), "x".into());
        assert_eq!(
            currency(&stored, &want),
            Currency {
                object: true,
                status: false
            }
        );
        stored.status = Some(AzureAssignedIdentityStatus {
            status: Some("Assigned".into()),
            available_replicas: None,
        });
        assert_eq!(
            currency(&stored, &want),
            Currency {
                object: true,
                status: true
            }
        );

        let moved = desired(
            &pod.clone()
                .tap(|p| p.spec.as_mut().unwrap().node_name = Some("n2".into())),
            &Selected {
                identity: &id,
                binding: &b,
            },
        )
        .unwrap();
        assert!(
            !currency(&stored, &moved).object,
            "a new node is a new label and spec"
        );
        let mut no_owner = stored.clone();
        no_owner.metadata.owner_references = None;
        assert!(!currency(&no_owner, &want).object);
    }

    trait Tap: Sized {
        fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }
    }
    impl Tap for Pod {}
}
