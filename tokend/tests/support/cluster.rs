//! Objects in a node's fake API server, built the way the controller and users write them:
//! pods scheduled on the node, identities of every type, bindings, assignments (`Assigned`),
//! exceptions, Secrets and service accounts.

use std::collections::BTreeMap;
use std::fmt::Debug;

use k8s_openapi::ByteString;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Pod, PodSpec, Secret, ServiceAccount};
use kube::Resource;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use podid_api::PodRecord;
use podid_api::crd::{
    AzureAssignedIdentity, AzureAssignedIdentitySpec, AzureIdentity, AzureIdentityBinding,
    AzureIdentityBindingSpec, AzureIdentitySpec, AzurePodIdentityException,
    AzurePodIdentityExceptionSpec, BINDING_LABEL, IdentityType, NODE_LABEL, SecretReference,
    assignment_name, assignment_state, node_label_value,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{NODE_NAME, Netns, Node};

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

/// An AzureIdentity of `type_` with a client id (and, for type 0, a resource id).
pub fn identity(namespace: &str, name: &str, type_: i64, client_id: &str) -> AzureIdentity {
    AzureIdentity {
        metadata: meta(namespace, name),
        spec: AzureIdentitySpec {
            type_: IdentityType(type_),
            client_id: Some(client_id.into()),
            resource_id: (type_ == 0).then(|| msi_resource_id(name)),
            ..Default::default()
        },
        status: None,
    }
}

/// The ARM id of a user-assigned identity `name` in the tests' subscription.
pub fn msi_resource_id(name: &str) -> String {
    format!(
        "/subscriptions/9b8f3c1e-5a2d-4e7f-8c6b-1d0a9e3f5b72/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

/// A service principal identity (type 1 or 2) in `tenant` whose credential is in Secret
/// `secret` of the identity's namespace.
pub fn service_principal(
    namespace: &str,
    name: &str,
    type_: i64,
    tenant: &str,
    client_id: &str,
    secret: &str,
) -> AzureIdentity {
    let mut id = identity(namespace, name, type_, client_id);
    id.spec.tenant_id = Some(tenant.into());
    id.spec.client_password = Some(SecretReference {
        name: Some(secret.into()),
        namespace: Some(namespace.into()),
    });
    id
}

/// A federated identity (type 3) in `tenant`.
pub fn federated(namespace: &str, name: &str, tenant: &str, client_id: &str) -> AzureIdentity {
    let mut id = identity(namespace, name, 3, client_id);
    id.spec.tenant_id = Some(tenant.into());
    id
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

/// A Secret with these data entries.
pub fn secret(namespace: &str, name: &str, data: &[(&str, &[u8])]) -> Secret {
    Secret {
        metadata: meta(namespace, name),
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// The pod record the plugin would send for `pod` in `netns`.
pub fn pod_record(pod: &Pod, container_id: &str, netns: &Netns) -> PodRecord {
    let mut record = super::record(container_id, "eth0", netns);
    record.pod_namespace = pod.metadata.namespace.clone();
    record.pod_name = pod.metadata.name.clone();
    record.pod_uid = pod.metadata.uid.clone();
    record
}

impl Node {
    /// A client of the fake API server (its worker runs on the node's runtime).
    pub fn client(&self) -> kube::Client {
        let _runtime = self.rt.enter();
        self.api.client()
    }

    /// Creates `obj` in its namespace and returns it as stored.
    pub fn create<K>(&self, obj: &K) -> K
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + Debug,
    {
        let namespace = obj.meta().namespace.clone().unwrap();
        let api: Api<K> = Api::namespaced(self.client(), &namespace);
        self.rt
            .block_on(api.create(&PostParams::default(), obj))
            .unwrap_or_else(|e| panic!("create {obj:?}: {e}"))
    }

    /// Deletes `namespace/name`.
    pub fn delete<K>(&self, namespace: &str, name: &str)
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + Debug,
    {
        let api: Api<K> = Api::namespaced(self.client(), namespace);
        self.rt
            .block_on(api.delete(name, &DeleteParams::default()))
            .unwrap_or_else(|e| panic!("delete {namespace}/{name}: {e}"));
    }

    /// Creates a pod scheduled on this node, labelled `aadpodidbinding=<label>` and with
    /// `labels`, running as service account `default`; returns it with its UID.
    pub fn pod(
        &self,
        namespace: &str,
        name: &str,
        label: Option<&str>,
        labels: &[(&str, &str)],
    ) -> Pod {
        let mut all: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if let Some(label) = label {
            all.insert(BINDING_LABEL.into(), label.into());
        }
        let pod = Pod {
            metadata: ObjectMeta {
                labels: Some(all),
                ..meta(namespace, name)
            },
            spec: Some(PodSpec {
                node_name: Some(NODE_NAME.into()),
                service_account_name: Some("default".into()),
                ..Default::default()
            }),
            status: None,
        };
        self.create(&pod)
    }

    /// Writes the assignment of `identity` (through `binding`) to `pod` as podid-controller
    /// does, with status `Assigned`.
    pub fn assign(
        &self,
        pod: &Pod,
        identity: &AzureIdentity,
        binding: &AzureIdentityBinding,
    ) -> AzureAssignedIdentity {
        let pod_namespace = pod.metadata.namespace.clone().unwrap();
        let pod_name = pod.metadata.name.clone().unwrap();
        let pod_uid = pod.metadata.uid.clone().unwrap();
        let identity_name = identity.metadata.name.clone().unwrap();
        let identity_namespace = identity.metadata.namespace.clone().unwrap();
        let name = assignment_name(&pod_name, &pod_uid, &identity_namespace, &identity_name);
        let mut embedded_identity = identity.clone();
        embedded_identity.metadata = meta(&identity_namespace, &identity_name);
        let mut embedded_binding = binding.clone();
        embedded_binding.metadata = meta(
            binding.metadata.namespace.as_deref().unwrap(),
            binding.metadata.name.as_deref().unwrap(),
        );
        let assignment = AzureAssignedIdentity {
            metadata: ObjectMeta {
                labels: Some([(NODE_LABEL.to_owned(), node_label_value(NODE_NAME))].into()),
                ..meta(&pod_namespace, &name)
            },
            spec: AzureAssignedIdentitySpec {
                azure_identity_ref: Some(embedded_identity),
                azure_binding_ref: Some(embedded_binding),
                pod: Some(pod_name),
                pod_namespace: Some(pod_namespace.clone()),
                pod_uid: Some(pod_uid),
                nodename: Some(NODE_NAME.into()),
                replicas: None,
            },
            status: None,
        };
        self.create(&assignment);
        self.set_assignment_status(&pod_namespace, &name, assignment_state::ASSIGNED)
    }

    /// Sets `status.status` of an assignment.
    pub fn set_assignment_status(
        &self,
        namespace: &str,
        name: &str,
        status: &str,
    ) -> AzureAssignedIdentity {
        let api: Api<AzureAssignedIdentity> = Api::namespaced(self.client(), namespace);
        let patch = serde_json::json!({"status": {"status": status}});
        self.rt
            .block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)))
            .unwrap()
    }

    /// Creates service account `name` in `namespace`.
    pub fn service_account(&self, namespace: &str, name: &str) -> ServiceAccount {
        self.create(&ServiceAccount {
            metadata: meta(namespace, name),
            ..Default::default()
        })
    }
}
