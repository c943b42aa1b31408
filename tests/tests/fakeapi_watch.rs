//! The fake API server's watch semantics through the real `kube::Client`, `watcher` and
//! `reflector`: replay from a version, 410 after compaction and the watcher's relist,
//! bookmarks, streaming lists, timeouts, selector transitions, slow watchers, concurrency.

mod fakeapi_support;

use std::collections::BTreeSet;
use std::time::Duration;

use fakeapi_support::*;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt};
use podid_tests::fakeapi::FakeApiServer;
use serde_json::{Value, json};

async fn create(pods: &Api<Pod>, p: PodBuilder) -> Pod {
    pods.create(&PostParams::default(), &p.build())
        .await
        .unwrap()
}

async fn relabel(pods: &Api<Pod>, name: &str, app: &str) -> Pod {
    pods.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": app}}})),
    )
    .await
    .unwrap()
}

/// The raw lines of a watch request that ends by its own `timeoutSeconds`.
async fn raw_watch(client: &Client, path_and_query: &str) -> Vec<Value> {
    let text = client
        .request_text(
            hyper::Request::get(path_and_query)
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn describe(event: &WatchEvent<Pod>) -> (String, String) {
    match event {
        WatchEvent::Added(p) => ("ADDED".into(), p.name_any()),
        WatchEvent::Modified(p) => ("MODIFIED".into(), p.name_any()),
        WatchEvent::Deleted(p) => ("DELETED".into(), p.name_any()),
        WatchEvent::Bookmark(_) => ("BOOKMARK".into(), String::new()),
        WatchEvent::Error(e) => ("ERROR".into(), e.message.clone()),
    }
}

#[tokio::test]
async fn watch_replays_every_change_after_a_version() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    create(&pods, pod("ns", "a")).await;
    let b = create(&pods, pod("ns", "b")).await;
    let from = b.resource_version().unwrap();
    create(&pods, pod("ns", "c")).await;
    relabel(&pods, "a", "web").await;
    pods.delete("b", &DeleteParams::default()).await.unwrap();
    Api::<Pod>::namespaced(server.client(), "elsewhere")
        .create(&PostParams::default(), &pod("elsewhere", "x").build())
        .await
        .unwrap();

    let mut stream = pods
        .watch(&WatchParams::default().timeout(5), &from)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    let mut versions = Vec::new();
    for _ in 0..3 {
        let event = next(&mut stream, "a replayed event")
            .await
            .unwrap()
            .unwrap();
        if let WatchEvent::Added(p) | WatchEvent::Modified(p) | WatchEvent::Deleted(p) = &event {
            versions.push(rv(p));
        }
        seen.push(describe(&event));
    }
    assert_eq!(
        seen,
        [
            ("ADDED".into(), "c".into()),
            ("MODIFIED".into(), "a".into()),
            ("DELETED".into(), "b".into())
        ]
    );
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "each event carries its own, increasing version: {versions:?}"
    );
    assert!(versions[0] > from.parse().unwrap());

    // then live
    create(&pods, pod("ns", "d")).await;
    let live = next(&mut stream, "a live event").await.unwrap().unwrap();
    assert_eq!(describe(&live), ("ADDED".into(), "d".into()));
}

#[tokio::test]
async fn watch_from_zero_sends_current_objects_then_live_changes() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    create(&pods, pod("ns", "a")).await;
    create(&pods, pod("ns", "b")).await;
    let mut stream = pods
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    let mut initial = BTreeSet::new();
    for _ in 0..2 {
        let (kind, name) = describe(
            &next(&mut stream, "a synthetic ADDED")
                .await
                .unwrap()
                .unwrap(),
        );
        assert_eq!(kind, "ADDED");
        initial.insert(name);
    }
    assert_eq!(initial, BTreeSet::from(["a".to_string(), "b".to_string()]));
    pods.delete("a", &DeleteParams::default()).await.unwrap();
    let deleted = next(&mut stream, "the live DELETED")
        .await
        .unwrap()
        .unwrap();
    let WatchEvent::Deleted(gone) = deleted else {
        panic!("expected DELETED, got {deleted:?}")
    };
    assert_eq!(
        rv(&gone),
        server.resource_version(),
        "a DELETED object carries the deletion's version"
    );
}

#[tokio::test]
async fn a_version_older_than_the_history_is_an_expired_error_event() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    let a = create(&pods, pod("ns", "a")).await;
    create(&pods, pod("ns", "b")).await;
    server.compact_history();

    let mut stream = pods
        .watch(&WatchParams::default(), &a.resource_version().unwrap())
        .await
        .unwrap()
        .boxed();
    match next(&mut stream, "the ERROR event").await {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(
                status.message.starts_with("too old resource version"),
                "{}",
                status.message
            );
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        next(&mut stream, "the end of the stream").await.is_none(),
        "the stream ends after the error"
    );

    // the current version is still fine after compaction
    let current = server.resource_version().to_string();
    let mut stream = pods
        .watch(&WatchParams::default(), &current)
        .await
        .unwrap()
        .boxed();
    create(&pods, pod("ns", "c")).await;
    assert_eq!(
        describe(&next(&mut stream, "a live event").await.unwrap().unwrap()),
        ("ADDED".into(), "c".into())
    );

    // a history limit compacts by itself
    let small = FakeApiServer::builder()
        .history_limit(2)
        .start()
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(small.client(), "ns");
    let first = create(&pods, pod("ns", "a")).await;
    for name in ["b", "c", "d"] {
        create(&pods, pod("ns", name)).await;
    }
    let lines = raw_watch(
        &small.client(),
        &format!(
            "/api/v1/namespaces/ns/pods?watch=1&resourceVersion={}",
            first.resource_version().unwrap()
        ),
    )
    .await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["type"], "ERROR");
    assert_eq!(lines[0]["object"]["code"], 410);
}

#[tokio::test]
async fn the_watcher_relists_after_a_410() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    create(&pods, pod("ns", "web-1").label("app", "web")).await;
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default()
        .labels("app=web")
        .disable_bookmarks();
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(
        watcher(pods.clone(), config)
            .reflect(writer)
            .for_each(move |event| {
                let _ = events_tx.send(event.map(|e| format!("{e:?}")).map_err(|e| e.to_string()));
                async {}
            }),
    );
    reader.wait_until_ready().await.unwrap();
    let lists_before = server.stats().verb("list");

    // writes the watch does not select move the version past it; then history goes and the stream ends
    for i in 0..3 {
        create(&pods, pod("ns", &format!("db-{i}")).label("app", "db")).await;
    }
    server.compact_history();
    server.close_watches();
    create(&pods, pod("ns", "web-2").label("app", "web")).await;

    let error = eventually("the watcher's 410", || {
        let got = events.try_recv().ok();
        async move { got.and_then(Result::err) }
    })
    .await;
    assert!(
        error.contains("410") || error.contains("too old"),
        "{error}"
    );
    eventually("the relisted store", || {
        let ready = reader.get(&ObjectRef::new("web-2").within("ns")).is_some();
        async move { ready.then_some(()) }
    })
    .await;
    assert_eq!(
        names(
            &reader
                .state()
                .iter()
                .map(|p| (**p).clone())
                .collect::<Vec<_>>()
        ),
        ["web-1", "web-2"]
    );
    assert!(
        server.stats().verb("list") > lists_before,
        "recovery was a relist"
    );
    task.abort();
}

#[tokio::test]
async fn a_closed_watch_resumes_from_its_version_without_relisting() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(
        watcher(pods.clone(), watcher::Config::default())
            .reflect(writer)
            .for_each(|_| async {}),
    );
    reader.wait_until_ready().await.unwrap();
    let lists = server.stats().verb("list");
    eventually("the watch to open", || {
        let open = server.stats().open_watches;
        async move { (open == 1).then_some(()) }
    })
    .await;
    server.close_watches();
    create(&pods, pod("ns", "after-restart")).await;
    eventually("the pod in the store", || {
        let found = reader
            .get(&ObjectRef::new("after-restart").within("ns"))
            .is_some();
        async move { found.then_some(()) }
    })
    .await;
    assert_eq!(server.stats().verb("list"), lists, "no relist");
    assert_eq!(server.stats().verb("watch"), 2, "one re-watch");
    task.abort();
}

#[tokio::test]
async fn bookmarks_carry_only_the_version() {
    let server = FakeApiServer::builder()
        .bookmark_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    create(&pods, pod("ns", "a")).await;
    let current = server.resource_version().to_string();
    let mut stream = pods
        .watch(&WatchParams::default(), &current)
        .await
        .unwrap()
        .boxed();
    // a change in another namespace moves the version this watch may bookmark
    Api::<Pod>::namespaced(server.client(), "other")
        .create(&PostParams::default(), &pod("other", "b").build())
        .await
        .unwrap();
    let target = server.resource_version().to_string();
    let bookmark = loop {
        match next(&mut stream, "a bookmark past the other namespace's write").await {
            Some(Ok(WatchEvent::Bookmark(bm))) if bm.metadata.resource_version == target => {
                break bm;
            }
            Some(Ok(WatchEvent::Bookmark(_))) => {}
            other => panic!("expected only bookmarks, got {other:?}"),
        }
    };
    assert_eq!(bookmark.types.kind, "Pod");

    let lines = raw_watch(&server.client(), &format!("/api/v1/namespaces/ns/pods?watch=true&allowWatchBookmarks=true&timeoutSeconds=1&resourceVersion={current}")).await;
    assert!(!lines.is_empty());
    for line in &lines {
        assert_eq!(line["type"], "BOOKMARK");
        assert_eq!(
            line["object"],
            json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": server.resource_version().to_string()}})
        );
    }
    let without = raw_watch(
        &server.client(),
        &format!(
            "/api/v1/namespaces/ns/pods?watch=true&timeoutSeconds=1&resourceVersion={current}"
        ),
    )
    .await;
    assert!(without.is_empty(), "no bookmarks unless allowed");
}

#[tokio::test]
async fn streaming_lists_end_with_the_initial_events_bookmark() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    for name in ["a", "b", "c"] {
        create(&pods, pod("ns", name)).await;
    }
    let lines = raw_watch(
        &server.client(),
        "/api/v1/namespaces/ns/pods?watch=true&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0&timeoutSeconds=1",
    )
    .await;
    let types: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["ADDED", "ADDED", "ADDED", "BOOKMARK"]);
    assert_eq!(
        lines[3]["object"]["metadata"]["annotations"],
        json!({"k8s.io/initial-events-end": "true"})
    );
    assert_eq!(
        lines[3]["object"]["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );

    let refused = api_error(server.client().request_text(hyper::Request::get("/api/v1/namespaces/ns/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan").body(Vec::new()).unwrap()).await);
    assert_eq!(
        refused.code, 422,
        "sendInitialEvents needs allowWatchBookmarks"
    );

    // kube's watcher in streaming-list mode
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(
        watcher(pods.clone(), watcher::Config::default().streaming_lists())
            .reflect(writer)
            .for_each(|_| async {}),
    );
    reader.wait_until_ready().await.unwrap();
    assert_eq!(reader.state().len(), 3);
    create(&pods, pod("ns", "d")).await;
    eventually("the live pod", || {
        let n = reader.state().len();
        async move { (n == 4).then_some(()) }
    })
    .await;
    assert_eq!(
        server.stats().verb("list"),
        0,
        "a streaming list lists nothing"
    );
    task.abort();
}

#[tokio::test]
async fn timeout_seconds_ends_the_stream() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    let started = tokio::time::Instant::now();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    assert!(next(&mut stream, "the end of the stream").await.is_none());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    eventually("the watch to be counted closed", || {
        let open = server.stats().open_watches;
        async move { (open == 0).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_relabelled_pod_leaves_and_rejoins_a_selecting_watch() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    create(&pods, pod("ns", "p").label("app", "web")).await;
    let key = ObjectRef::new("p").within("ns");

    let (reader, writer) = reflector::store();
    let task = tokio::spawn(
        watcher(pods.clone(), watcher::Config::default().labels("app=web"))
            .reflect(writer)
            .for_each(|_| async {}),
    );
    reader.wait_until_ready().await.unwrap();
    assert!(reader.get(&key).is_some());
    let from = server.resource_version().to_string();
    let mut raw = pods
        .watch(&WatchParams::default().labels("app=web"), &from)
        .await
        .unwrap()
        .boxed();

    let moved = relabel(&pods, "p", "db").await;
    eventually("the pod to leave the store", || {
        let gone = reader.get(&key).is_none();
        async move { gone.then_some(()) }
    })
    .await;
    match next(&mut raw, "DELETED").await.unwrap().unwrap() {
        WatchEvent::Deleted(last) => {
            assert_eq!(
                last.labels().get("app").map(String::as_str),
                Some("web"),
                "the previous object"
            );
            assert_eq!(
                last.resource_version(),
                moved.resource_version(),
                "at the new version"
            );
        }
        other => panic!("expected DELETED, got {other:?}"),
    }

    let back = relabel(&pods, "p", "web").await;
    eventually("the pod to rejoin the store", || {
        let found = reader.get(&key);
        let want = back.resource_version();
        async move { found.filter(|p| p.resource_version() == want).map(|_| ()) }
    })
    .await;
    let added = next(&mut raw, "ADDED").await.unwrap().unwrap();
    assert_eq!(describe(&added), ("ADDED".into(), "p".into()));
    task.abort();
}

#[tokio::test]
async fn field_selector_transitions_on_pod_phase_and_node() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    create(&pods, pod("ns", "p").on_node("n1")).await;
    create(&pods, pod("ns", "q").on_node("n2")).await;
    let from = server.resource_version().to_string();
    let mut running = pods
        .watch(
            &WatchParams::default().fields("status.phase=Running,spec.nodeName=n1"),
            &from,
        )
        .await
        .unwrap()
        .boxed();
    for name in ["q", "p"] {
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        describe(&next(&mut running, "ADDED").await.unwrap().unwrap()),
        ("ADDED".into(), "p".into())
    );
    pods.patch_status(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
    )
    .await
    .unwrap();
    assert_eq!(
        describe(&next(&mut running, "DELETED").await.unwrap().unwrap()),
        ("DELETED".into(), "p".into())
    );

    // the node daemon's pattern: a watcher narrowed to its node
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(
        watcher(
            pods.clone(),
            watcher::Config::default().fields("spec.nodeName=n2"),
        )
        .reflect(writer)
        .for_each(|_| async {}),
    );
    reader.wait_until_ready().await.unwrap();
    assert_eq!(
        names(
            &reader
                .state()
                .iter()
                .map(|p| (**p).clone())
                .collect::<Vec<_>>()
        ),
        ["q"]
    );
    task.abort();

    let bad = api_error(
        pods.watch(&WatchParams::default().fields("spec.image=x"), "0")
            .await
            .map(|_| ()),
    );
    assert_eq!(bad.code, 400);
}

#[tokio::test]
async fn custom_resources_watched_by_label() {
    let server = server().await;
    let client = server.client();
    let aais = crd_api(&client, "ns", "AzureAssignedIdentity");
    let writer = reflector::store::Writer::new(crd("AzureAssignedIdentity"));
    let reader = writer.as_reader();
    let api: kube::Api<kube::api::DynamicObject> =
        kube::Api::all_with(client.clone(), &crd("AzureAssignedIdentity"));
    let task = tokio::spawn(
        watcher(api, watcher::Config::default().labels("nodename=n1"))
            .reflect(writer)
            .for_each(|_| async {}),
    );
    reader.wait_until_ready().await.unwrap();
    let mut mine = custom(
        "AzureAssignedIdentity",
        "ns",
        "p-id",
        json!({"spec": {"nodename": "n1"}}),
    );
    mine.metadata.labels = Some([("nodename".to_string(), "n1".to_string())].into());
    aais.create(&PostParams::default(), &mine).await.unwrap();
    let mut other = custom(
        "AzureAssignedIdentity",
        "ns",
        "q-id",
        json!({"spec": {"nodename": "n2"}}),
    );
    other.metadata.labels = Some([("nodename".to_string(), "n2".to_string())].into());
    aais.create(&PostParams::default(), &other).await.unwrap();
    eventually("n1's assignment", || {
        let n = reader.state().len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    aais.patch(
        "q-id",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"nodename": "n1"}}})),
    )
    .await
    .unwrap();
    eventually("the moved assignment", || {
        let n = reader.state().len();
        async move { (n == 2).then_some(()) }
    })
    .await;
    aais.delete("p-id", &DeleteParams::default()).await.unwrap();
    eventually("the deletion", || {
        let n = reader.state().len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn a_slow_watcher_is_closed_without_blocking_writers_and_resumes() {
    let server = FakeApiServer::builder()
        .watch_buffer(16)
        .start()
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    let from = server.resource_version().to_string();
    let mut stalled = pods
        .watch(&WatchParams::default(), &from)
        .await
        .unwrap()
        .boxed();
    let padding = "x".repeat(64 * 1024);
    let total = 512;
    let writes = async {
        for i in 0..total {
            create(
                &pods,
                pod("ns", &format!("p-{i:03}")).annotation("padding", &padding),
            )
            .await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), writes)
        .await
        .expect("writers never wait for a watcher");

    let mut seen = BTreeSet::new();
    let mut last = from.clone();
    while let Some(event) = next(&mut stalled, "the stalled stream").await {
        if let Ok(WatchEvent::Added(p)) = event {
            last = p.resource_version().unwrap();
            seen.insert(p.name_any());
        }
    }
    assert!(
        seen.len() < total,
        "the server closed the lagging watch after {} events",
        seen.len()
    );

    // resuming from the last version received loses nothing
    let mut resumed = pods
        .watch(&WatchParams::default().timeout(5), &last)
        .await
        .unwrap()
        .boxed();
    while seen.len() < total {
        match next(&mut resumed, "the resumed stream").await {
            Some(Ok(WatchEvent::Added(p))) => {
                seen.insert(p.name_any());
            }
            other => panic!("expected ADDED, got {other:?}"),
        }
    }
    assert_eq!(seen.len(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_watchers_see_every_change_in_order() {
    let server = server().await;
    let client = server.client();
    let all: Api<Pod> = Api::all(client.clone());
    let from = server.resource_version().to_string();
    let mut watches = Vec::new();
    for _ in 0..3 {
        watches.push(
            all.watch(&WatchParams::default(), &from)
                .await
                .unwrap()
                .boxed(),
        );
    }
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(
        watcher(all.clone(), watcher::Config::default())
            .reflect(writer)
            .for_each(|_| async {}),
    );
    reader.wait_until_ready().await.unwrap();

    let writers: Vec<_> = (0..4)
        .map(|w| {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &format!("ns-{w}"));
            tokio::spawn(async move {
                for i in 0..250 {
                    create(&pods, pod(&format!("ns-{w}"), &format!("p-{i}"))).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    for mut watch in watches {
        let mut previous = 0;
        for _ in 0..1000 {
            let Some(Ok(WatchEvent::Added(p))) = next(&mut watch, "an ADDED").await else {
                panic!("expected ADDED")
            };
            let version = rv(&p);
            assert!(version > previous, "versions increase along a stream");
            previous = version;
        }
    }
    eventually("the reflector to hold every pod", || {
        let n = reader.state().len();
        async move { (n == 1000).then_some(()) }
    })
    .await;
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        1000
    );
    task.abort();
}

#[tokio::test]
async fn metadata_only_requests_get_partial_object_metadata() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    create(&pods, pod("ns", "a").label("app", "web")).await;
    let meta = pods.get_metadata("a").await.unwrap();
    assert_eq!(
        meta.types.as_ref().map(|t| t.kind.as_str()),
        Some("PartialObjectMetadata")
    );
    assert_eq!(
        meta.metadata.labels.unwrap().get("app").map(String::as_str),
        Some("web")
    );
    let list = pods.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);

    let (reader, writer) = reflector::store();
    let task = tokio::spawn(
        watcher(
            Api::<kube::core::PartialObjectMeta<Pod>>::namespaced(server.client(), "ns"),
            watcher::Config::default().labels("app=web"),
        )
        .reflect(writer)
        .for_each(|_| async {}),
    );
    reader.wait_until_ready().await.unwrap();
    create(&pods, pod("ns", "b").label("app", "web")).await;
    eventually("the second pod's metadata", || {
        let n = reader.state().len();
        async move { (n == 2).then_some(()) }
    })
    .await;
    task.abort();

    let request = hyper::Request::get("/api/v1/namespaces/ns/pods?watch=1&timeoutSeconds=1")
        .header(
            "accept",
            "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1",
        )
        .body(Vec::new())
        .unwrap();
    let text = server.client().request_text(request).await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for line in lines {
        assert_eq!(line["object"]["kind"], "PartialObjectMetadata");
        assert!(line["object"].get("spec").is_none());
    }
}
