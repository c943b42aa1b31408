//! The four custom resources of aad-pod-identity (group `aadpodidentity.k8s.io`, version `v1`),
//! with its JSON field names letter for letter, plus `type: 3` (federated) and `podUID`.
//!
//! Every field is named explicitly: a `rename_all = "camelCase"` derive would produce
//! `resourceId`, `podUid` and `nodeName` and silently drop what users' YAML says. Every scalar is
//! optional so that a manifest round-trips with exactly the fields it had.

// Several `printcolumn(... type_ = "string" ...)` arguments read as repeated attributes to clippy.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;
use std::fmt;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The API group of every podid resource.
pub const GROUP: &str = "aadpodidentity.k8s.io";
/// The pod label that names a binding's selector.
pub const BINDING_LABEL: &str = "aadpodidbinding";
/// The label of an assignment that names its node (`nodename=<node>`, hashed when too long).
pub const NODE_LABEL: &str = "nodename";
/// Annotation that forces namespaced matching for one identity.
pub const BEHAVIOR_ANNOTATION: &str = "aadpodidentity.k8s.io/Behavior";
/// The value of [`BEHAVIOR_ANNOTATION`] that forces namespaced matching.
pub const BEHAVIOR_NAMESPACED: &str = "namespaced";
/// The pod condition the controller sets once a pod's assignments are written.
pub const IDENTITY_READY_CONDITION: &str = "aadpodidentity.k8s.io/IdentityReady";

/// `AzureIdentity.spec.type`: an integer, as in aad-pod-identity. Unknown values are kept (and
/// served by nothing) rather than failing the whole list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct IdentityType(pub i64);

/// What an [`IdentityType`] means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    /// 0: a user-assigned managed identity attached to the node pool; tokens from the node's IMDS.
    UserAssignedMsi,
    /// 1: a service principal with a client secret.
    ServicePrincipal,
    /// 2: a service principal with a PKCS#12 certificate.
    ServicePrincipalCertificate,
    /// 3: federated workload identity: a pod-bound service-account token as client assertion.
    Federated,
}

impl IdentityType {
    pub const USER_ASSIGNED_MSI: Self = Self(0);
    pub const SERVICE_PRINCIPAL: Self = Self(1);
    pub const SERVICE_PRINCIPAL_CERTIFICATE: Self = Self(2);
    pub const FEDERATED: Self = Self(3);

    pub fn kind(self) -> Option<IdentityKind> {
        match self.0 {
            0 => Some(IdentityKind::UserAssignedMsi),
            1 => Some(IdentityKind::ServicePrincipal),
            2 => Some(IdentityKind::ServicePrincipalCertificate),
            3 => Some(IdentityKind::Federated),
            _ => None,
        }
    }
}

impl fmt::Display for IdentityType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A reference to a Secret (`clientPassword`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct SecretReference {
    #[serde(rename = "name", default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "namespace", default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// An identity on Azure and how to get its tokens.
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentity",
    doc = "An identity on Azure and how to get its tokens.",
    derive = "PartialEq",
    derive = "Default",
    plural = "azureidentities",
    namespaced,
    status = "AzureIdentityStatus",
    printcolumn(name = "Type", type_ = "integer", json_path = ".spec.type"),
    printcolumn(name = "ClientID", type_ = "string", json_path = ".spec.clientID"),
    printcolumn(
        name = "ResourceID",
        type_ = "string",
        json_path = ".spec.resourceID",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct AzureIdentitySpec {
    /// 0 user-assigned managed identity, 1 service principal with secret, 2 service principal
    /// with certificate, 3 federated workload identity.
    #[serde(rename = "type", default)]
    pub type_: IdentityType,
    /// User-assigned managed identity resource id.
    #[serde(
        rename = "resourceID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub resource_id: Option<String>,
    /// Client (application) id; every type uses it.
    #[serde(rename = "clientID", default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The Secret holding a service principal's secret (type 1) or PKCS#12 certificate (type 2).
    #[serde(
        rename = "clientPassword",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub client_password: Option<SecretReference>,
    /// The service principal's tenant.
    #[serde(rename = "tenantID", default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Additional tenants of a multi-tenant service principal.
    #[serde(
        rename = "auxiliaryTenantIDs",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auxiliary_tenant_ids: Option<Vec<String>>,
    /// Azure AD resource id (sovereign clouds).
    #[serde(
        rename = "adResourceID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ad_resource_id: Option<String>,
    /// Azure AD endpoint (authority host) for this identity.
    #[serde(
        rename = "adEndpoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ad_endpoint: Option<String>,
    #[serde(rename = "replicas", default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
}

/// Status of an AzureIdentity.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct AzureIdentityStatus {
    #[serde(
        rename = "availableReplicas",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub available_replicas: Option<i32>,
}

/// Which pods (by the `aadpodidbinding` label) get which identity.
#[derive(
    CustomResource, Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentityBinding",
    doc = "Which pods, by their aadpodidbinding label, get an AzureIdentity.",
    derive = "PartialEq",
    derive = "Default",
    plural = "azureidentitybindings",
    namespaced,
    status = "AzureIdentityBindingStatus",
    printcolumn(
        name = "AzureIdentity",
        type_ = "string",
        json_path = ".spec.azureIdentity"
    ),
    printcolumn(name = "Selector", type_ = "string", json_path = ".spec.selector"),
    printcolumn(name = "Weight", type_ = "integer", json_path = ".spec.weight"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct AzureIdentityBindingSpec {
    /// Name of the AzureIdentity, in the binding's namespace.
    #[serde(
        rename = "azureIdentity",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub azure_identity: Option<String>,
    /// Equals the pod label `aadpodidbinding` exactly.
    #[serde(rename = "selector", default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The binding with the highest weight gives a pod its default identity.
    #[serde(rename = "weight", default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

/// Status of an AzureIdentityBinding.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct AzureIdentityBindingStatus {
    #[serde(
        rename = "availableReplicas",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub available_replicas: Option<i32>,
}

/// One pod ↔ identity assignment, written by the controller, read by tokend.
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureAssignedIdentity",
    doc = "One pod-identity assignment, written by podid-controller and served by podid-tokend.",
    derive = "PartialEq",
    derive = "Default",
    plural = "azureassignedidentities",
    namespaced,
    status = "AzureAssignedIdentityStatus",
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.pod"),
    printcolumn(
        name = "Identity",
        type_ = "string",
        json_path = ".spec.azureIdentityRef.metadata.name"
    ),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodename"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.status"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct AzureAssignedIdentitySpec {
    /// The AzureIdentity, embedded whole.
    #[serde(
        rename = "azureIdentityRef",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "embedded_resource")]
    pub azure_identity_ref: Option<AzureIdentity>,
    /// The AzureIdentityBinding that matched, embedded whole.
    #[serde(
        rename = "azureBindingRef",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "embedded_resource")]
    pub azure_binding_ref: Option<AzureIdentityBinding>,
    #[serde(rename = "pod", default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(
        rename = "podNamespace",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub pod_namespace: Option<String>,
    /// The pod's UID: a pod recreated under the same name never inherits this assignment.
    #[serde(rename = "podUID", default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(rename = "nodename", default, skip_serializing_if = "Option::is_none")]
    pub nodename: Option<String>,
    #[serde(rename = "replicas", default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
}

/// The states of an assignment; tokend serves only `Assigned`.
pub mod assignment_state {
    pub const CREATED: &str = "Created";
    pub const ASSIGNED: &str = "Assigned";
    pub const UNASSIGNED: &str = "Unassigned";
}

/// Status of an AzureAssignedIdentity.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct AzureAssignedIdentityStatus {
    /// Created, Assigned or Unassigned; tokend serves only Assigned.
    #[serde(rename = "status", default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(
        rename = "availableReplicas",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub available_replicas: Option<i32>,
}

/// Pods of its namespace carrying all these labels are served with the node's own identity.
#[derive(
    CustomResource, Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzurePodIdentityException",
    doc = "Pods of this namespace carrying all podLabels are served with the node's own identity.",
    derive = "PartialEq",
    derive = "Default",
    plural = "azurepodidentityexceptions",
    namespaced,
    status = "AzurePodIdentityExceptionStatus",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct AzurePodIdentityExceptionSpec {
    #[serde(rename = "podLabels", default)]
    pub pod_labels: BTreeMap<String, String>,
}

/// Status of an AzurePodIdentityException.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct AzurePodIdentityExceptionStatus {
    #[serde(rename = "status", default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// A whole object embedded in a spec: kept as written, metadata included.
fn embedded_resource(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-embedded-resource": true,
        "x-kubernetes-preserve-unknown-fields": true
    })
}

impl AzureIdentity {
    /// Whether the `Behavior: namespaced` annotation pins this identity to its namespace.
    pub fn forces_namespaced(&self) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(BEHAVIOR_ANNOTATION))
            .is_some_and(|v| v.eq_ignore_ascii_case(BEHAVIOR_NAMESPACED))
    }
}

/// The CRD manifests as `(file name, YAML)`, in a fixed order; `crdgen` writes them to
/// `conf/crds`, and a test fails when the committed files differ.
pub fn manifests() -> Vec<(String, String)> {
    use kube::CustomResourceExt;
    [
        AzureIdentity::crd(),
        AzureIdentityBinding::crd(),
        AzureAssignedIdentity::crd(),
        AzurePodIdentityException::crd(),
    ]
    .into_iter()
    .map(|crd| {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let yaml = serde_saphyr::to_string(&crd).expect("a CRD serializes to YAML");
        (
            format!("{name}.yaml"),
            format!("# Generated by crdgen from api/src/crd.rs; do not edit.\n---\n{yaml}"),
        )
    })
    .collect()
}

/// Longest name a Kubernetes object may have.
const MAX_NAME: usize = 253;
/// Longest value a label may have.
const MAX_LABEL_VALUE: usize = 63;

/// The name of the assignment of identity `identity_namespace/identity_name` to pod
/// `pod_name` (UID `pod_uid`): `<pod>-<identity>-<h>`, `<h>` the first 8 hex characters of
/// SHA-256(`<podUID>/<identity namespace>/<identity name>`), so that `api-reader`+`kv` and
/// `api`+`reader-kv` never collide; `<pod>-<identity>` is cut to fit 253 characters.
pub fn assignment_name(
    pod_name: &str,
    pod_uid: &str,
    identity_namespace: &str,
    identity_name: &str,
) -> String {
    let digest = Sha256::digest(format!("{pod_uid}/{identity_namespace}/{identity_name}"));
    let hash: String = hex(&digest)[..8].to_owned();
    let mut stem = format!("{pod_name}-{identity_name}");
    let room = MAX_NAME - 1 - hash.len();
    if stem.len() > room {
        stem.truncate(room);
        // A name must end with an alphanumeric character before the hash's dash.
        while stem.ends_with(['-', '.']) {
            stem.pop();
        }
    }
    format!("{stem}-{hash}")
}

/// The value of the `nodename` label for `node`: the name itself, or `h-` and 40 hex characters
/// of its SHA-256 when it is too long for a label value.
pub fn node_label_value(node: &str) -> String {
    if node.len() <= MAX_LABEL_VALUE {
        node.to_owned()
    } else {
        format!("h-{}", &hex(&Sha256::digest(node))[..40])
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_names_do_not_collide_and_fit() {
        let a = assignment_name("api-reader", "uid-1", "ns", "kv");
        let b = assignment_name("api", "uid-1", "ns", "reader-kv");
        assert!(a.starts_with("api-reader-kv-"));
        assert!(b.starts_with("api-reader-kv-"));
        assert_ne!(a, b);
        assert_eq!(a.len(), "api-reader-kv-".len() + 8);
        // Same inputs, same name; another UID, another name.
        assert_eq!(a, assignment_name("api-reader", "uid-1", "ns", "kv"));
        assert_ne!(a, assignment_name("api-reader", "uid-2", "ns", "kv"));
        let long = assignment_name(&"p".repeat(200), "u", "ns", &"i".repeat(200));
        assert_eq!(long.len(), 253);
        let dashy = assignment_name(&"p".repeat(243), "u", "ns", "x");
        assert!(!dashy.contains("--"), "{dashy}");
    }

    #[test]
    fn node_label_values() {
        assert_eq!(
            node_label_value("aks-nodepool1-123-vmss000000"),
            "aks-nodepool1-123-vmss000000"
        );
        let long = "n".repeat(64);
        let value = node_label_value(&long);
        assert_eq!(value.len(), 42);
        assert!(value.starts_with("h-"));
        assert_eq!(value, node_label_value(&long));
    }

    #[test]
    fn committed_crd_yaml_is_generated() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/crds");
        for (name, yaml) in manifests() {
            let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
            assert!(
                committed == yaml,
                "conf/crds/{name} is stale: run `cargo run -p podid-api --features crds --bin crdgen`"
            );
        }
    }

    #[test]
    fn identity_types() {
        assert_eq!(IdentityType(0).kind(), Some(IdentityKind::UserAssignedMsi));
        assert_eq!(IdentityType(3).kind(), Some(IdentityKind::Federated));
        assert_eq!(IdentityType(9).kind(), None);
        let spec: AzureIdentitySpec = serde_json::from_str(r#"{"type": 9}"#).unwrap();
        assert_eq!(spec.type_, IdentityType(9));
    }
}
