//! Builders and bounded waits shared by the fake API server's test files.

#![allow(dead_code)] // each test file uses its own subset

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::{Client, Resource, ResourceExt};
use podid_tests::fakeapi::FakeApiServer;
use serde_json::Value;

/// Long enough for a loaded CI machine; every wait ends as soon as its condition holds.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn server() -> FakeApiServer {
    FakeApiServer::start()
        .await
        .expect("the fake API server starts")
}

/// A pod under construction: `pod("ns", "name").label("app", "web").on_node("n1").build()`.
#[derive(Debug, Clone)]
pub struct PodBuilder(Pod);

pub fn pod(ns: &str, name: &str) -> PodBuilder {
    PodBuilder(Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.k8s.io/pause:3.10".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
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

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    pub fn on_node(mut self, node: &str) -> Self {
        self.0.spec.get_or_insert_with(Default::default).node_name = Some(node.into());
        self
    }

    pub fn service_account(mut self, sa: &str) -> Self {
        self.0
            .spec
            .get_or_insert_with(Default::default)
            .service_account_name = Some(sa.into());
        self
    }

    pub fn finalizer(mut self, finalizer: &str) -> Self {
        self.0
            .metadata
            .finalizers
            .get_or_insert_with(Vec::new)
            .push(finalizer.into());
        self
    }

    pub fn build(self) -> Pod {
        self.0
    }
}

/// The four podid CRDs, by kind.
pub fn crd(kind: &str) -> ApiResource {
    let plural = match kind {
        "AzureIdentity" => "azureidentities",
        "AzureIdentityBinding" => "azureidentitybindings",
        "AzureAssignedIdentity" => "azureassignedidentities",
        "AzurePodIdentityException" => "azurepodidentityexceptions",
        other => panic!("not a podid CRD: {other}"),
    };
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("aadpodidentity.k8s.io", "v1", kind),
        plural,
    )
}

pub fn crd_api(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &crd(kind))
}

/// A custom object with `data` (spec, status...) merged into it.
pub fn custom(kind: &str, ns: &str, name: &str, data: Value) -> DynamicObject {
    DynamicObject::new(name, &crd(kind)).within(ns).data(data)
}

/// An owner reference to `owner`, as a controller sets it.
pub fn owner_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    owner
        .controller_owner_ref(&())
        .expect("the owner has a name and uid")
}

pub fn owner_ref_dynamic(owner: &DynamicObject, kind: &str) -> OwnerReference {
    owner
        .controller_owner_ref(&crd(kind))
        .expect("the owner has a name and uid")
}

pub fn rv<K: Resource>(obj: &K) -> u64 {
    obj.resource_version()
        .expect("stored objects carry a resourceVersion")
        .parse()
        .expect("numeric resourceVersion")
}

/// Polls `check` until it returns `Some`, failing the test after `WAIT`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next item of a stream, failing the test after `WAIT`.
pub async fn next<S: futures::Stream + Unpin>(stream: &mut S, what: &str) -> Option<S::Item> {
    use futures::StreamExt as _;
    tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The API error status of a failed call.
pub fn api_error<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> Box<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

pub fn names<K: ResourceExt>(items: &[K]) -> Vec<String> {
    let mut names: Vec<String> = items.iter().map(ResourceExt::name_any).collect();
    names.sort();
    names
}
