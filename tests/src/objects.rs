//! Builders for the Kubernetes objects tests create: `pod("ns", "name").label(..).on_node(..)`,
//! `identity("ns", "name").user_assigned(client_id, resource_id)`, `binding(..)`, `exception(..)`.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Secret, ServiceAccount};
use kube::api::ObjectMeta;
use podid_api::crd::{
    AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec,
    AzurePodIdentityException, AzurePodIdentityExceptionSpec, BEHAVIOR_ANNOTATION,
    BEHAVIOR_NAMESPACED, BINDING_LABEL, IdentityType, SecretReference,
};

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.to_owned()),
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    }
}

/// A pod under construction.
#[derive(Debug, Clone)]
pub struct PodBuilder(Pod);

/// A pod with one container, not yet scheduled.
pub fn pod(namespace: &str, name: &str) -> PodBuilder {
    PodBuilder(Pod {
        metadata: meta(namespace, name),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.example/app:1".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    })
}

impl PodBuilder {
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    /// The `aadpodidbinding` label that binds the pod to bindings with this selector.
    pub fn binding(self, selector: &str) -> Self {
        self.label(BINDING_LABEL, selector)
    }

    /// Scheduled on `node` (`spec.nodeName`).
    pub fn on_node(mut self, node: &str) -> Self {
        self.spec().node_name = Some(node.into());
        self
    }

    pub fn service_account(mut self, name: &str) -> Self {
        self.spec().service_account_name = Some(name.into());
        self
    }

    fn spec(&mut self) -> &mut PodSpec {
        self.0.spec.get_or_insert_with(PodSpec::default)
    }

    pub fn build(self) -> Pod {
        self.0
    }
}

/// An AzureIdentity under construction.
#[derive(Debug, Clone)]
pub struct IdentityBuilder(AzureIdentity);

pub fn identity(namespace: &str, name: &str) -> IdentityBuilder {
    IdentityBuilder(AzureIdentity {
        metadata: meta(namespace, name),
        spec: AzureIdentitySpec::default(),
        status: None,
    })
}

impl IdentityBuilder {
    /// Type 0: a user-assigned managed identity attached to the node pool.
    pub fn user_assigned(mut self, client_id: &str, resource_id: &str) -> Self {
        self.0.spec.type_ = IdentityType::USER_ASSIGNED_MSI;
        self.0.spec.client_id = Some(client_id.into());
        self.0.spec.resource_id = Some(resource_id.into());
        self
    }

    /// Type 1 (secret) or 2 (certificate): a service principal whose credential is in a Secret.
    pub fn service_principal(
        mut self,
        kind: IdentityType,
        tenant: &str,
        client_id: &str,
        secret: (&str, &str),
    ) -> Self {
        self.0.spec.type_ = kind;
        self.0.spec.tenant_id = Some(tenant.into());
        self.0.spec.client_id = Some(client_id.into());
        self.0.spec.client_password = Some(SecretReference {
            name: Some(secret.1.into()),
            namespace: Some(secret.0.into()),
        });
        self
    }

    /// Type 3: federated workload identity.
    pub fn federated(mut self, tenant: &str, client_id: &str) -> Self {
        self.0.spec.type_ = IdentityType::FEDERATED;
        self.0.spec.tenant_id = Some(tenant.into());
        self.0.spec.client_id = Some(client_id.into());
        self
    }

    /// The identity's own Azure AD endpoint (authority host).
    pub fn ad_endpoint(mut self, endpoint: &str) -> Self {
        self.0.spec.ad_endpoint = Some(endpoint.into());
        self
    }

    /// `aadpodidentity.k8s.io/Behavior: namespaced`.
    pub fn namespaced(mut self) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(BEHAVIOR_ANNOTATION.into(), BEHAVIOR_NAMESPACED.into());
        self
    }

    pub fn build(self) -> AzureIdentity {
        self.0
    }
}

/// An AzureIdentityBinding of `identity` (same namespace) to pods labelled `selector`.
pub fn binding(
    namespace: &str,
    name: &str,
    identity: &str,
    selector: &str,
) -> AzureIdentityBinding {
    AzureIdentityBinding {
        metadata: meta(namespace, name),
        spec: AzureIdentityBindingSpec {
            azure_identity: Some(identity.into()),
            selector: Some(selector.into()),
            weight: None,
        },
        status: None,
    }
}

/// The same binding with a weight.
pub fn weighted(mut binding: AzureIdentityBinding, weight: i64) -> AzureIdentityBinding {
    binding.spec.weight = Some(weight);
    binding
}

/// An AzurePodIdentityException for pods of `namespace` carrying all `labels`.
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
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        },
        status: None,
    }
}

/// A Secret with `data`.
pub fn secret(namespace: &str, name: &str, data: &[(&str, &[u8])]) -> Secret {
    Secret {
        metadata: meta(namespace, name),
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).into(), ByteString(v.to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// A ServiceAccount.
pub fn service_account(namespace: &str, name: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(namespace, name),
        ..ServiceAccount::default()
    }
}

/// Creates the namespaced `obj` (in `default` when it names none) and returns it as stored.
pub async fn create<K>(client: kube::Client, obj: &K) -> anyhow::Result<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    use anyhow::Context as _;
    let namespace = obj
        .meta()
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let api: kube::Api<K> = kube::Api::namespaced(client, &namespace);
    api.create(&kube::api::PostParams::default(), obj)
        .await
        .with_context(|| format!("creating {namespace}/{:?}", obj.meta().name))
}

/// Deletes the namespaced object `namespace/name` of kind `K`.
pub async fn delete<K>(client: kube::Client, namespace: &str, name: &str) -> anyhow::Result<()>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    use anyhow::Context as _;
    let api: kube::Api<K> = kube::Api::namespaced(client, namespace);
    api.delete(name, &kube::api::DeleteParams::default())
        .await
        .with_context(|| format!("deleting {namespace}/{name}"))?;
    Ok(())
}
