//! The fake API server at the podid benchmark's scale: 10,000 pods, 1,000 identities, 1,000
//! bindings and 10,000 assignments, written concurrently while four reflectors watch, then
//! 1,000 pods deleted with their assignments cascading. Slow in a debug build, so ignored by
//! default: `cargo test --release -p podid-tests --test fakeapi_scale -- --ignored --nocapture`.

mod fakeapi_support;

use std::time::{Duration, Instant};

use fakeapi_support::*;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;

const NAMESPACES: usize = 100;
const PODS_PER_NAMESPACE: usize = 100;
const IDENTITIES_PER_NAMESPACE: usize = 10;
const CONCURRENCY: usize = 32;

fn reflect_crd(
    client: &kube::Client,
    kind: &str,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<DynamicObject> {
    let writer = reflector::store::Writer::new(crd(kind));
    let reader = writer.as_reader();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &crd(kind));
    tasks.push(tokio::spawn(
        watcher(api, watcher::Config::default())
            .reflect(writer)
            .for_each(|_| async {}),
    ));
    reader
}

async fn wait_len<K: kube::Resource + Clone + 'static>(store: &Store<K>, n: usize, what: &str)
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    while store.state().len() != n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n}",
            store.state().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "scale check; run in release with --ignored"]
async fn benchmark_scale_with_watches() {
    let server = server().await;
    let client = server.client();
    let mut tasks = Vec::new();
    let (pods_reader, pods_writer) = reflector::store();
    let pods_all: Api<Pod> = Api::all(client.clone());
    tasks.push(tokio::spawn(
        watcher(
            pods_all,
            watcher::Config::default().labels("aadpodidbinding"),
        )
        .reflect(pods_writer)
        .for_each(|_| async {}),
    ));
    let identities = reflect_crd(&client, "AzureIdentity", &mut tasks);
    let bindings = reflect_crd(&client, "AzureIdentityBinding", &mut tasks);
    let assignments = reflect_crd(&client, "AzureAssignedIdentity", &mut tasks);

    let started = Instant::now();
    let config = futures::stream::iter(0..NAMESPACES * IDENTITIES_PER_NAMESPACE).map(|i| {
        let client = client.clone();
        async move {
            let ns = format!("ns-{}", i / IDENTITIES_PER_NAMESPACE);
            let name = format!("id-{}", i % IDENTITIES_PER_NAMESPACE);
            let id = custom(
                "AzureIdentity",
                &ns,
                &name,
                json!({"spec": {"type": 0, "clientID": format!("client-{i}")}}),
            );
            crd_api(&client, &ns, "AzureIdentity")
                .create(&PostParams::default(), &id)
                .await?;
            let binding = custom(
                "AzureIdentityBinding",
                &ns,
                &name,
                json!({"spec": {"azureIdentity": name, "selector": name}}),
            );
            crd_api(&client, &ns, "AzureIdentityBinding")
                .create(&PostParams::default(), &binding)
                .await
        }
    });
    config
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let configured = started.elapsed();

    let pods = futures::stream::iter(0..NAMESPACES * PODS_PER_NAMESPACE).map(|i| {
        let client = client.clone();
        async move {
            let ns = format!("ns-{}", i / PODS_PER_NAMESPACE);
            let p = pod(&ns, &format!("pod-{i}"))
                .label("aadpodidbinding", &format!("id-{}", i % IDENTITIES_PER_NAMESPACE))
                .on_node(&format!("node-{}", i % 100))
                .build();
            let created = Api::<Pod>::namespaced(client.clone(), &ns).create(&PostParams::default(), &p).await?;
            let mut aai = custom(
                "AzureAssignedIdentity",
                &ns,
                &format!("pod-{i}-id"),
                json!({"spec": {"pod": format!("pod-{i}"), "nodename": format!("node-{}", i % 100)}}),
            );
            aai.metadata.owner_references = Some(vec![owner_ref(&created)]);
            crd_api(&client, &ns, "AzureAssignedIdentity").create(&PostParams::default(), &aai).await
        }
    });
    pods.buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let written = started.elapsed();

    wait_len(&pods_reader, NAMESPACES * PODS_PER_NAMESPACE, "pods").await;
    wait_len(
        &identities,
        NAMESPACES * IDENTITIES_PER_NAMESPACE,
        "identities",
    )
    .await;
    wait_len(&bindings, NAMESPACES * IDENTITIES_PER_NAMESPACE, "bindings").await;
    wait_len(&assignments, NAMESPACES * PODS_PER_NAMESPACE, "assignments").await;
    let observed = started.elapsed();

    let deletions = futures::stream::iter(0..1000).map(|i| {
        let client = client.clone();
        async move {
            let ns = format!("ns-{}", i / PODS_PER_NAMESPACE);
            Api::<Pod>::namespaced(client, &ns)
                .delete(&format!("pod-{i}"), &DeleteParams::default())
                .await
        }
    });
    deletions
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    wait_len(
        &assignments,
        NAMESPACES * PODS_PER_NAMESPACE - 1000,
        "assignments after the cascade",
    )
    .await;
    let cascaded = started.elapsed();

    let stats = server.stats();
    eprintln!(
        "2,000 config objects in {configured:?}; 20,000 pods + assignments written by {written:?}; \
         all four reflectors complete at {observed:?}; 1,000 pod deletions cascaded by {cascaded:?}; \
         {} requests ({} creates, {} lists, {} watches), resourceVersion {}",
        stats.requests,
        stats.verb("create"),
        stats.verb("list"),
        stats.verb("watch"),
        stats.resource_version,
    );
    assert_eq!(stats.verb("list"), 4, "no watcher had to relist");
    for task in tasks {
        task.abort();
    }
}
