//! The watches: each one a kube `watcher` with backoff, trimmed, reflected into a store, and
//! fed to a callback as [`Change`]s whose objects are the store's own `Arc`s (the index holds
//! no second copy). A (re)list is one [`Change::Reset`] with everything the store holds.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt as _, watcher};
use podid_api::crd::BINDING_LABEL;
use serde::de::DeserializeOwned;
use tokio::sync::watch as channel;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// One change from a watch.
#[derive(Debug)]
pub enum Change<K> {
    Apply(Arc<K>),
    Delete(K),
    /// The watch (re)listed: these are all the objects now.
    Reset(Vec<Arc<K>>),
}

/// Which watches have completed their first list. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Synced {
    pending: Arc<channel::Sender<BTreeSet<&'static str>>>,
}

impl Synced {
    pub fn new(resources: &[&'static str]) -> Self {
        Self {
            pending: Arc::new(channel::Sender::new(resources.iter().copied().collect())),
        }
    }

    pub fn mark(&self, resource: &'static str) {
        self.pending.send_if_modified(|p| p.remove(resource));
    }

    /// The watches still waiting for their first list.
    pub fn pending(&self) -> Vec<&'static str> {
        self.pending.borrow().iter().copied().collect()
    }

    pub fn is_synced(&self) -> bool {
        self.pending.borrow().is_empty()
    }

    /// Returns once every watch has listed.
    pub async fn wait(&self) {
        let mut rx = self.pending.subscribe();
        // the sender lives in self, so the channel cannot close while we wait
        let _ = rx.wait_for(BTreeSet::is_empty).await;
    }
}

/// Keeps what the controller reads of a pod: name, namespace, uid, resourceVersion, the
/// binding label, deletionTimestamp, `spec.nodeName`, `status.phase` and `status.conditions`
/// (the condition write sends the whole list back). The rest would only cost memory.
pub fn trim_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|k, _| k == BINDING_LABEL);
    }
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        ..Default::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        conditions: status.conditions,
        ..Default::default()
    });
}

/// Drops managedFields, which nothing here reads.
pub fn trim_managed_fields<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// Runs one watch forever (the watcher retries with backoff), calling `apply` for each change.
pub async fn run<K, F>(
    resource: &'static str,
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    synced: Synced,
    metrics: Metrics,
    mut apply: F,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    F: FnMut(Change<K>),
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut listed = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(obj)) => {
                metrics.watch_event(resource, "apply");
                let shared = store
                    .get(&ObjectRef::from_obj(&obj))
                    .unwrap_or_else(|| Arc::new(obj));
                apply(Change::Apply(shared));
            }
            Ok(watcher::Event::Delete(obj)) => {
                metrics.watch_event(resource, "delete");
                apply(Change::Delete(obj));
            }
            Ok(watcher::Event::InitDone) => {
                metrics.watch_event(resource, "list");
                let all = store.state();
                if !listed {
                    info!(resource, objects = all.len(), "listed");
                    listed = true;
                }
                apply(Change::Reset(all));
                synced.mark(resource);
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(error) => {
                metrics.watch_failed(resource);
                warn!(resource, %error, "watch failed; retrying with backoff");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, PodCondition};

    use super::*;
    use crate::testing::pod;

    #[test]
    fn trimmed_pods_keep_what_the_controller_reads() {
        let mut p = pod("ns", "p")
            .label(BINDING_LABEL, "sel")
            .label("app", "web")
            .on_node("n1")
            .uid("u")
            .phase("Running")
            .resource_version("7")
            .condition("Ready", "True", "", "")
            .build();
        p.spec.as_mut().unwrap().containers = vec![Container {
            name: "c".into(),
            ..Default::default()
        }];
        p.metadata.annotations = Some([("a".to_owned(), "b".to_owned())].into());
        trim_pod(&mut p);
        assert_eq!(p.metadata.labels.as_ref().unwrap().len(), 1);
        assert_eq!(p.metadata.uid.as_deref(), Some("u"));
        assert_eq!(p.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(p.metadata.annotations, None);
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert!(spec.containers.is_empty());
        let status = p.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let conditions: &Vec<PodCondition> = status.conditions.as_ref().unwrap();
        assert_eq!(conditions[0].type_, "Ready");
    }

    #[tokio::test]
    async fn synced_waits_for_every_resource() {
        let synced = Synced::new(&["pods", "bindings"]);
        assert_eq!(synced.pending(), ["bindings", "pods"]);
        synced.mark("pods");
        assert!(!synced.is_synced());
        let waiter = {
            let synced = synced.clone();
            tokio::spawn(async move { synced.wait().await })
        };
        synced.mark("bindings");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(synced.is_synced());
    }
}
