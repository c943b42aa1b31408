//! Builders, a controller running in-process against the fake API server, and bounded waits
//! for the controller's integration tests.

#![allow(dead_code)] // each test file uses its own subset

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, PodCondition, PodSpec};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::{Client, Resource, ResourceExt as _};
use podid_api::crd::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec, BEHAVIOR_ANNOTATION, BINDING_LABEL, IDENTITY_READY_CONDITION, IdentityType,
};
use podid_controller::lease::{LeaseSettings, LeaseTimings};
use podid_controller::{Controller, ControllerHandle, RunError, Settings};
use podid_tests::fakeapi::FakeApiServer;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Long enough for a loaded CI machine; every wait ends as soon as its condition holds.
pub const WAIT: Duration = Duration::from_secs(15);
pub const LEASE_NAMESPACE: &str = "podid-system";
pub const LEASE_NAME: &str = "podid-controller";

pub async fn server() -> FakeApiServer {
    install_crypto_provider();
    FakeApiServer::start()
        .await
        .expect("the fake API server starts")
}

/// This crate links rustls with both ring and aws-lc-rs (through reqwest), so rustls cannot
/// pick a provider by itself; kube's client needs one chosen.
pub fn install_crypto_provider() {
    // an error means one is installed already, which is all we need
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A controller running in this process.
#[derive(Debug)]
pub struct Running {
    pub handle: ControllerHandle,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), RunError>>,
}

impl Running {
    /// Stops it as SIGTERM would and returns how `run` ended.
    pub async fn stop(self) -> Result<(), RunError> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the controller stops in time")
            .expect("the controller task does not panic")
    }

    /// Waits for `run` to end by itself (the lease lost).
    pub async fn ended(self, within: Duration) -> Result<(), RunError> {
        tokio::time::timeout(within, self.task)
            .await
            .expect("the controller stops in time")
            .expect("the controller task does not panic")
    }

    pub fn metrics(&self) -> String {
        self.handle.metrics_text()
    }
}

pub fn settings(holder: &str, cluster_wide: bool) -> Settings {
    let mut settings = Settings::new(LeaseSettings {
        name: LEASE_NAME.into(),
        namespace: LEASE_NAMESPACE.into(),
        holder: holder.into(),
        timings: LeaseTimings::default(),
    });
    settings.cluster_wide_bindings = cluster_wide;
    settings
}

/// Starts a controller with `settings` and waits until it leads with synced caches.
pub async fn start_with(server: &FakeApiServer, settings: Settings) -> Running {
    let controller = Controller::new(server.client(), settings);
    let handle = controller.handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(controller.run(shutdown.clone()));
    let h = handle.clone();
    eventually("the controller to lead with synced caches", || {
        let h = h.clone();
        async move { (h.is_ready() && h.is_leader()).then_some(()) }
    })
    .await;
    Running {
        handle,
        shutdown,
        task,
    }
}

pub async fn start(server: &FakeApiServer) -> Running {
    start_with(server, settings("replica-a", false)).await
}

/// Polls `check` until it returns `Some`, failing the test after `WAIT`.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(WAIT, what, check).await
}

pub async fn eventually_within<T, F, Fut>(wait: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {wait:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    }
}

pub fn identity(ns: &str, name: &str) -> AzureIdentity {
    AzureIdentity {
        metadata: meta(ns, name),
        spec: AzureIdentitySpec {
            type_: IdentityType::USER_ASSIGNED_MSI,
            client_id: Some(format!("client-{ns}-{name}")),
            resource_id: Some(format!(
                "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
            )),
            ..Default::default()
        },
        status: None,
    }
}

pub fn namespaced_only(mut identity: AzureIdentity) -> AzureIdentity {
    identity
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(BEHAVIOR_ANNOTATION.into(), "namespaced".into());
    identity
}

pub fn binding(ns: &str, name: &str, identity: &str, selector: &str) -> AzureIdentityBinding {
    AzureIdentityBinding {
        metadata: meta(ns, name),
        spec: AzureIdentityBindingSpec {
            azure_identity: Some(identity.into()),
            selector: Some(selector.into()),
            weight: None,
        },
        status: None,
    }
}

/// A scheduled pod labelled for `selector`.
pub fn pod(ns: &str, name: &str, selector: &str, node: &str) -> Pod {
    let mut pod = Pod {
        metadata: meta(ns, name),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.k8s.io/pause:3.10".into()),
                ..Default::default()
            }],
            node_name: Some(node.into()),
            ..Default::default()
        }),
        status: None,
    };
    pod.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(BINDING_LABEL.into(), selector.into());
    pod
}

pub async fn create<K>(client: &Client, obj: &K) -> K
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
{
    let ns = obj
        .meta()
        .namespace
        .clone()
        .expect("namespaced test object");
    Api::<K>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), obj)
        .await
        .unwrap_or_else(|e| panic!("creating {}/{}: {e}", ns, obj.name_any()))
}

pub fn assignments(client: &Client, ns: &str) -> Api<AzureAssignedIdentity> {
    Api::namespaced(client.clone(), ns)
}

pub async fn list_assignments(client: &Client, ns: &str) -> Vec<AzureAssignedIdentity> {
    let mut items = assignments(client, ns)
        .list(&ListParams::default())
        .await
        .expect("listing assignments")
        .items;
    items.sort_by_key(|a| a.name_any());
    items
}

pub fn is_assigned(a: &AzureAssignedIdentity) -> bool {
    a.status.as_ref().and_then(|s| s.status.as_deref()) == Some("Assigned")
}

/// Waits until `ns` holds exactly `names`, every one Assigned; returns them by name.
pub async fn wait_assigned(
    client: &Client,
    ns: &str,
    names: &[String],
) -> Vec<AzureAssignedIdentity> {
    let mut want: Vec<String> = names.to_vec();
    want.sort();
    let what = format!("assignments {want:?} Assigned in {ns}");
    eventually(&what, || async {
        let items = list_assignments(client, ns).await;
        let have: Vec<String> = items.iter().map(|a| a.name_any()).collect();
        (have == want && items.iter().all(is_assigned)).then_some(items)
    })
    .await
}

pub async fn identity_ready(client: &Client, ns: &str, pod: &str) -> Option<PodCondition> {
    let pod = Api::<Pod>::namespaced(client.clone(), ns)
        .get(pod)
        .await
        .ok()?;
    pod.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == IDENTITY_READY_CONDITION)
}

/// Waits for the pod's IdentityReady condition to have `status` and `reason`.
pub async fn wait_condition(
    client: &Client,
    ns: &str,
    pod: &str,
    status: &str,
    reason: &str,
) -> PodCondition {
    let what = format!("{ns}/{pod} {IDENTITY_READY_CONDITION}={status} ({reason})");
    eventually(&what, || async {
        identity_ready(client, ns, pod)
            .await
            .filter(|c| c.status == status && c.reason.as_deref() == Some(reason))
    })
    .await
}

/// events.k8s.io Events about `kind` `ns/name`.
pub async fn events_about(client: &Client, ns: &str, kind: &str, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("listing events")
        .items
        .into_iter()
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        })
        .collect()
}

/// The sum of every sample of metric `name` whose labels contain all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Every successful write the controller counted (assignments, statuses, conditions, events).
pub fn writes(text: &str) -> f64 {
    metric(text, "podid_controller_writes_total", &[])
}
