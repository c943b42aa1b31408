//! Builders for the unit tests: `pod("ns", "name").label(..).on_node("n1").uid("u1").build()`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodSpec, PodStatus};
use kube::api::ObjectMeta;
use podid_api::crd::{
    AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec,
    BEHAVIOR_ANNOTATION,
};

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    }
}

#[derive(Debug, Clone)]
pub struct PodBuilder(Pod);

pub fn pod(ns: &str, name: &str) -> PodBuilder {
    PodBuilder(Pod {
        metadata: meta(ns, name),
        spec: Some(PodSpec::default()),
        status: None,
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

    pub fn on_node(mut self, node: &str) -> Self {
        self.0.spec.get_or_insert_with(Default::default).node_name = Some(node.into());
        self
    }

    pub fn uid(mut self, uid: &str) -> Self {
        self.0.metadata.uid = Some(uid.into());
        self
    }

    pub fn phase(mut self, phase: &str) -> Self {
        self.0.status.get_or_insert_with(PodStatus::default).phase = Some(phase.into());
        self
    }

    pub fn resource_version(mut self, rv: &str) -> Self {
        self.0.metadata.resource_version = Some(rv.into());
        self
    }

    pub fn condition(mut self, type_: &str, status: &str, reason: &str, message: &str) -> Self {
        self.0
            .status
            .get_or_insert_with(PodStatus::default)
            .conditions
            .get_or_insert_with(Vec::new)
            .push(PodCondition {
                type_: type_.into(),
                status: status.into(),
                reason: Some(reason.into()),
                message: Some(message.into()),
                ..Default::default()
            });
        self
    }

    pub fn terminating(mut self) -> Self {
        self.0.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        self
    }

    pub fn build(self) -> Pod {
        self.0
    }
}

#[derive(Debug, Clone)]
pub struct IdentityBuilder(AzureIdentity);

pub fn identity(ns: &str, name: &str) -> IdentityBuilder {
    IdentityBuilder(AzureIdentity {
        metadata: meta(ns, name),
        spec: AzureIdentitySpec::default(),
        status: None,
    })
}

impl IdentityBuilder {
    pub fn client_id(mut self, id: &str) -> Self {
        self.0.spec.client_id = Some(id.into());
        self
    }

    pub fn uid(mut self, uid: &str) -> Self {
        self.0.metadata.uid = Some(uid.into());
        self
    }

    pub fn resource_version(mut self, rv: &str) -> Self {
        self.0.metadata.resource_version = Some(rv.into());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    pub fn namespaced_only(self) -> Self {
        self.annotation(BEHAVIOR_ANNOTATION, "namespaced")
    }

    pub fn build(self) -> AzureIdentity {
        self.0
    }
}

#[derive(Debug, Clone)]
pub struct BindingBuilder(AzureIdentityBinding);

pub fn binding(ns: &str, name: &str, identity: &str, selector: &str) -> BindingBuilder {
    BindingBuilder(AzureIdentityBinding {
        metadata: meta(ns, name),
        spec: AzureIdentityBindingSpec {
            azure_identity: Some(identity.into()),
            selector: Some(selector.into()),
            weight: None,
        },
        status: None,
    })
}

impl BindingBuilder {
    pub fn weight(mut self, weight: i64) -> Self {
        self.0.spec.weight = Some(weight);
        self
    }

    pub fn uid(mut self, uid: &str) -> Self {
        self.0.metadata.uid = Some(uid.into());
        self
    }

    pub fn resource_version(mut self, rv: &str) -> Self {
        self.0.metadata.resource_version = Some(rv.into());
        self
    }

    pub fn build(self) -> AzureIdentityBinding {
        self.0
    }
}
