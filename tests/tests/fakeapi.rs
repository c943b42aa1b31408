//! The fake API server's object semantics, exercised through the real `kube::Client` and
//! kube-runtime: CRUD, conflicts, every patch format, server-side apply ownership, status
//! subresources, generation, finalizers (with kube's finalizer helper under a `Controller`),
//! owner cascade, TokenRequest, discovery, pagination, events, and the binary.

mod fakeapi_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fakeapi_support::*;
use futures::StreamExt as _;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod, Secret, ServiceAccount, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as RecorderEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, Event as Finalizer, finalizer};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, CustomResource, Resource, ResourceExt};
use podid_tests::fakeapi::{FakeApiServer, decode_claims};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const STALE: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

#[tokio::test]
async fn create_get_list_replace_delete_pods() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns1");

    let created = pods
        .create(
            &PostParams::default(),
            &pod("ns1", "web-1").label("app", "web").build(),
        )
        .await
        .unwrap();
    assert!(created.uid().is_some());
    assert!(created.creation_timestamp().is_some());
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(rv(&created), server.resource_version());
    assert_eq!(
        created.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending"),
        "a new pod starts Pending"
    );
    assert_eq!(created.namespace().as_deref(), Some("ns1"));

    let got = pods.get("web-1").await.unwrap();
    assert_eq!(got.uid(), created.uid());

    pods.create(&PostParams::default(), &pod("ns1", "web-2").build())
        .await
        .unwrap();
    Api::<Pod>::namespaced(server.client(), "ns2")
        .create(&PostParams::default(), &pod("ns2", "web-1").build())
        .await
        .unwrap();
    let list = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(names(&list.items), ["web-1", "web-2"]);
    assert_eq!(
        list.metadata.resource_version,
        Some(server.resource_version().to_string())
    );
    let everywhere = Api::<Pod>::all(server.client())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(everywhere.items.len(), 3);

    let mut changed = got.clone();
    changed
        .metadata
        .labels
        .get_or_insert_default()
        .insert("tier".into(), "front".into());
    let replaced = pods
        .replace("web-1", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert!(rv(&replaced) > rv(&created));
    assert_eq!(
        replaced.labels().get("tier").map(String::as_str),
        Some("front")
    );
    assert_eq!(
        replaced.metadata.generation,
        Some(1),
        "a label is metadata: generation stays"
    );

    let deleted = pods
        .delete("web-1", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        deleted.is_right(),
        "an object without finalizers is gone at once: a Success status"
    );
    assert!(api_error(pods.get("web-1").await).is_not_found());
    let not_found = api_error(pods.get("nope").await);
    assert_eq!(
        (not_found.code, not_found.message.as_str()),
        (404, "pods \"nope\" not found")
    );
}

#[tokio::test]
async fn create_errors_and_generate_name() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    pods.create(&PostParams::default(), &pod("ns", "a").build())
        .await
        .unwrap();
    let exists = api_error(
        pods.create(&PostParams::default(), &pod("ns", "a").build())
            .await,
    );
    assert!(exists.is_already_exists());
    assert_eq!(exists.message, "pods \"a\" already exists");

    let mut generated = pod("ns", "").build();
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("worker-".into());
    let made = pods
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    let name = made.name_any();
    assert!(
        name.starts_with("worker-") && name.len() == "worker-".len() + 5,
        "{name}"
    );

    let wrong_ns = api_error(
        pods.create(&PostParams::default(), &pod("other", "b").build())
            .await,
    );
    assert_eq!(wrong_ns.code, 400);
    assert_eq!(
        wrong_ns.message,
        "the namespace of the provided object does not match the namespace sent on the request"
    );

    let bad_name = api_error(
        pods.create(&PostParams::default(), &pod("ns", "Bad_Name").build())
            .await,
    );
    assert_eq!((bad_name.code, bad_name.reason.as_str()), (422, "Invalid"));

    let dry = pods
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &pod("ns", "dry").build(),
        )
        .await
        .unwrap();
    assert_eq!(dry.name_any(), "dry");
    assert!(
        api_error(pods.get("dry").await).is_not_found(),
        "a dry run stores nothing"
    );
}

#[tokio::test]
async fn stale_resource_version_is_a_conflict_on_every_write() {
    let server = server().await;
    let leases: Api<Lease> = Api::namespaced(server.client(), "kube-system");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("podid-controller".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    let first = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut taken = first.clone();
    taken.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let second = leases
        .replace("podid-controller", &PostParams::default(), &taken)
        .await
        .unwrap();
    assert!(rv(&second) > rv(&first));

    // the loser still holds the first version
    let conflict = api_error(
        leases
            .replace("podid-controller", &PostParams::default(), &taken)
            .await,
    );
    assert!(conflict.is_conflict());
    assert_eq!(
        conflict.message,
        format!(
            "Operation cannot be fulfilled on leases.coordination.k8s.io \"podid-controller\": {STALE}"
        )
    );

    let stale = first.resource_version().unwrap();
    let merge = json!({"metadata": {"resourceVersion": stale}, "spec": {"holderIdentity": "c"}});
    assert!(
        api_error(
            leases
                .patch(
                    "podid-controller",
                    &PatchParams::default(),
                    &Patch::Merge(&merge)
                )
                .await
        )
        .is_conflict()
    );
    let apply = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"resourceVersion": stale}, "spec": {"holderIdentity": "c"}});
    let pp = PatchParams::apply("podid-controller").force();
    assert!(
        api_error(
            leases
                .patch("podid-controller", &pp, &Patch::Apply(&apply))
                .await
        )
        .is_conflict()
    );

    // the current version passes
    let current = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"resourceVersion": second.resource_version()}, "spec": {"holderIdentity": "c"}});
    let renewed = leases
        .patch("podid-controller", &pp, &Patch::Apply(&current))
        .await
        .unwrap();
    assert_eq!(renewed.spec.unwrap().holder_identity.as_deref(), Some("c"));

    // "0" means: create only if absent
    let create_only = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"resourceVersion": "0"}, "spec": {"holderIdentity": "d"}});
    assert!(
        api_error(
            leases
                .patch("podid-controller", &pp, &Patch::Apply(&create_only))
                .await
        )
        .is_conflict()
    );
    let fresh = leases
        .patch("other", &pp, &Patch::Apply(&create_only))
        .await
        .unwrap();
    assert_eq!(fresh.spec.unwrap().holder_identity.as_deref(), Some("d"));
}

#[tokio::test]
async fn merge_json_and_strategic_patches() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    pods.create(
        &PostParams::default(),
        &pod("ns", "p").label("a", "1").label("b", "2").build(),
    )
    .await
    .unwrap();

    let merged = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": null, "c": "3"}}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.labels().keys().collect::<Vec<_>>(), ["b", "c"]);

    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/labels/b", "value": "2"},
        {"op": "replace", "path": "/metadata/labels/b", "value": "two"},
        {"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}}
    ]))
    .unwrap();
    let patched = pods
        .patch("p", &PatchParams::default(), &Patch::Json::<()>(ops))
        .await
        .unwrap();
    assert_eq!(patched.labels().get("b").map(String::as_str), Some("two"));
    assert_eq!(
        patched.annotations().get("x").map(String::as_str),
        Some("y")
    );

    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/metadata/labels/b", "value": "2"}]))
            .unwrap();
    let failed = api_error(
        pods.patch("p", &PatchParams::default(), &Patch::Json::<()>(failing))
            .await,
    );
    assert_eq!((failed.code, failed.reason.as_str()), (422, "Invalid"));

    let strategic = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"s": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(strategic.labels().get("s").map(String::as_str), Some("1"));

    // custom resources refuse strategic merge, as any CRD does
    let ids = crd_api(&server.client(), "ns", "AzureIdentity");
    ids.create(
        &PostParams::default(),
        &custom("AzureIdentity", "ns", "id", json!({"spec": {"type": 0}})),
    )
    .await
    .unwrap();
    let refused = api_error(
        ids.patch(
            "id",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"type": 1}})),
        )
        .await,
    );
    assert_eq!(refused.code, 415);

    let missing = api_error(
        pods.patch("nope", &PatchParams::default(), &Patch::Merge(json!({})))
            .await,
    );
    assert!(missing.is_not_found());
}

#[tokio::test]
async fn json_patch_test_of_null_against_a_missing_path_passes() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    pods.create(&PostParams::default(), &pod("ns", "p").build())
        .await
        .unwrap();
    // exactly what kube's finalizer helper sends for an object without finalizers
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": ["podid.dev/cleanup"]}
    ]))
    .unwrap();
    let patched = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Json::<()>(ops.clone()),
        )
        .await
        .unwrap();
    assert_eq!(patched.finalizers(), ["podid.dev/cleanup"]);
    // now the path exists, so the same test fails like the real server's
    let again = api_error(
        pods.patch("p", &PatchParams::default(), &Patch::Json::<()>(ops))
            .await,
    );
    assert_eq!(again.code, 422);
}

#[tokio::test]
async fn server_side_apply_removes_only_the_fields_a_manager_dropped() {
    let server = server().await;
    let ids = crd_api(&server.client(), "ns", "AzureIdentity");
    let apply = |manager: &str| PatchParams::apply(manager).force();
    let doc = |labels: Value, spec: Value| json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity", "metadata": {"name": "id", "labels": labels}, "spec": spec});

    let created = ids
        .patch(
            "id",
            &apply("alpha"),
            &Patch::Apply(doc(
                json!({"a": "1", "b": "2"}),
                json!({"type": 0, "clientID": "c1", "resourceID": "r1"}),
            )),
        )
        .await
        .unwrap();
    assert_eq!(
        created.metadata.generation,
        Some(1),
        "apply to a missing object creates it"
    );

    ids.patch(
        "id",
        &apply("beta"),
        &Patch::Apply(doc(json!({"c": "3"}), json!({"adEndpoint": "e"}))),
    )
    .await
    .unwrap();
    ids.patch(
        "id",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"note": "by hand"}}})),
    )
    .await
    .unwrap();

    // alpha drops label b and spec.resourceID
    let after = ids
        .patch(
            "id",
            &apply("alpha"),
            &Patch::Apply(doc(json!({"a": "1"}), json!({"type": 0, "clientID": "c1"}))),
        )
        .await
        .unwrap();
    let labels = after.labels();
    assert_eq!(
        labels.keys().collect::<Vec<_>>(),
        ["a", "c"],
        "b removed, beta's c kept"
    );
    assert_eq!(
        after.annotations().get("note").map(String::as_str),
        Some("by hand"),
        "an update manager's field stays"
    );
    assert_eq!(
        after.data["spec"],
        json!({"type": 0, "clientID": "c1", "adEndpoint": "e"})
    );
    assert_eq!(
        after.metadata.generation,
        Some(3),
        "spec changed twice after creation"
    );

    let managers: Vec<(String, String)> = after
        .managed_fields()
        .iter()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managers.contains(&("alpha".into(), "Apply".into())),
        "{managers:?}"
    );
    assert!(
        managers.contains(&("beta".into(), "Apply".into())),
        "{managers:?}"
    );
    let alpha = after
        .managed_fields()
        .iter()
        .find(|m| m.manager.as_deref() == Some("alpha"))
        .unwrap();
    assert_eq!(
        alpha.fields_v1.as_ref().unwrap().0,
        json!({"f:metadata": {"f:labels": {"f:a": {}}}, "f:spec": {"f:clientID": {}, "f:type": {}}})
    );

    // a field co-owned with another manager stays when one of them drops it
    ids.patch(
        "id",
        &apply("beta"),
        &Patch::Apply(doc(json!({"c": "3", "a": "1"}), json!({"adEndpoint": "e"}))),
    )
    .await
    .unwrap();
    let dropped = ids
        .patch(
            "id",
            &apply("alpha"),
            &Patch::Apply(doc(json!({}), json!({"type": 0}))),
        )
        .await
        .unwrap();
    assert_eq!(dropped.labels().keys().collect::<Vec<_>>(), ["a", "c"]);
    assert_eq!(dropped.data["spec"], json!({"type": 0, "adEndpoint": "e"}));

    // re-applying the same configuration is a no-op: no new resourceVersion
    let same = ids
        .patch(
            "id",
            &apply("alpha"),
            &Patch::Apply(doc(json!({}), json!({"type": 0}))),
        )
        .await
        .unwrap();
    assert_eq!(same.resource_version(), dropped.resource_version());
}

#[tokio::test]
async fn apply_without_field_manager_is_refused_by_the_server() {
    let server = server().await;
    let request = hyper::Request::patch("/api/v1/namespaces/ns/pods/p")
        .header("content-type", "application/apply-patch+yaml")
        .body(br#"{"apiVersion":"v1","kind":"Pod"}"#.to_vec())
        .unwrap();
    let err = api_error(server.client().request_text(request).await);
    assert_eq!(err.code, 422);
    assert_eq!(
        err.message,
        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
    );
}

#[tokio::test]
async fn status_subresource_isolation_and_generation() {
    let server = server().await;
    let aais = crd_api(&server.client(), "ns", "AzureAssignedIdentity");
    let obj = custom(
        "AzureAssignedIdentity",
        "ns",
        "aai",
        json!({"spec": {"pod": "p", "nodename": "n1"}, "status": {"status": "Assigned"}}),
    );
    let created = aais.create(&PostParams::default(), &obj).await.unwrap();
    assert!(
        created.data.get("status").is_none(),
        "create ignores .status when there is a status subresource"
    );

    let status = aais
        .patch_status(
            "aai",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"status": "Created"}, "spec": {"pod": "ignored"}})),
        )
        .await
        .unwrap();
    assert_eq!(status.data["status"], json!({"status": "Created"}));
    assert_eq!(
        status.data["spec"]["pod"], "p",
        "a status write changes only .status"
    );
    assert_eq!(
        status.metadata.generation,
        Some(1),
        "status is not counted by generation"
    );

    let mut main = status.clone();
    main.data["status"] = json!({"status": "Unassigned"});
    main.data["spec"]["nodename"] = json!("n2");
    let replaced = aais
        .replace("aai", &PostParams::default(), &main)
        .await
        .unwrap();
    assert_eq!(
        replaced.data["status"],
        json!({"status": "Created"}),
        "a main write ignores .status"
    );
    assert_eq!(replaced.data["spec"]["nodename"], "n2");
    assert_eq!(replaced.metadata.generation, Some(2));

    let labelled = aais
        .patch(
            "aai",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        labelled.metadata.generation,
        Some(2),
        "metadata is not counted by generation"
    );

    let applied = aais
        .patch_status(
            "aai",
            &PatchParams::apply("podid-controller").force(),
            &Patch::Apply(json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureAssignedIdentity", "status": {"status": "Assigned"}})),
        )
        .await
        .unwrap();
    assert_eq!(applied.data["status"], json!({"status": "Assigned"}));
    let got = aais.get_status("aai").await.unwrap();
    assert_eq!(got.data["status"], json!({"status": "Assigned"}));

    // Pods and Nodes have status subresources too
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    pods.create(&PostParams::default(), &pod("ns", "p").build())
        .await
        .unwrap();
    let running = pods
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
    assert_eq!(running.status.unwrap().phase.as_deref(), Some("Running"));
    let mut spec_write = pods.get("p").await.unwrap();
    spec_write.status.as_mut().unwrap().phase = Some("Failed".into());
    let unchanged = pods
        .replace("p", &PostParams::default(), &spec_write)
        .await
        .unwrap();
    assert_eq!(unchanged.status.unwrap().phase.as_deref(), Some("Running"));
}

#[tokio::test]
async fn nodes_are_cluster_scoped_with_taints_in_spec() {
    let server = server().await;
    let nodes: Api<Node> = Api::all(server.client());
    let node = Node {
        metadata: ObjectMeta {
            name: Some("n1".into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "dedicated".into(),
                value: Some("gpu".into()),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: Some(Default::default()),
    };
    let created = nodes.create(&PostParams::default(), &node).await.unwrap();
    assert_eq!(created.namespace(), None);
    assert_eq!(created.spec.unwrap().taints.unwrap()[0].key, "dedicated");
    let cordoned = nodes.cordon("n1").await.unwrap();
    assert_eq!(cordoned.spec.unwrap().unschedulable, Some(true));
    let listed = nodes
        .list(&ListParams::default().fields("spec.unschedulable=true"))
        .await
        .unwrap();
    assert_eq!(names(&listed.items), ["n1"]);
    let ready = nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await
        .unwrap();
    assert_eq!(ready.status.unwrap().conditions.unwrap()[0].type_, "Ready");
}

#[tokio::test]
async fn finalizers_hold_deletion_until_emptied() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    pods.create(
        &PostParams::default(),
        &pod("ns", "p").finalizer("podid.dev/a").build(),
    )
    .await
    .unwrap();

    let kept = pods
        .delete("p", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("kept by its finalizer");
    assert!(kept.metadata.deletion_timestamp.is_some());
    assert_eq!(kept.metadata.deletion_grace_period_seconds, Some(0));
    assert_eq!(pods.get("p").await.unwrap().uid(), kept.uid());

    let added = api_error(
        pods.patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["podid.dev/a", "podid.dev/b"]}})),
        )
        .await,
    );
    assert_eq!(added.code, 422);
    assert!(
        added
            .message
            .contains("no new finalizers can be added if the object is being deleted"),
        "{}",
        added.message
    );

    let again = pods.delete("p", &DeleteParams::default()).await.unwrap();
    assert!(again.is_left(), "deleting again changes nothing");

    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(
        api_error(pods.get("p").await).is_not_found(),
        "emptying the finalizers completes the deletion"
    );
}

#[tokio::test]
async fn delete_preconditions() {
    let server = server().await;
    let secrets: Api<Secret> = Api::namespaced(server.client(), "ns");
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("s".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let created = secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let wrong_uid = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("nope".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let err = api_error(secrets.delete("s", &wrong_uid).await);
    assert!(err.is_conflict());
    assert!(
        err.message
            .contains("Precondition failed: UID in precondition: nope"),
        "{}",
        err.message
    );
    let wrong_rv = DeleteParams {
        preconditions: Some(Preconditions {
            uid: None,
            resource_version: Some("1000".into()),
        }),
        ..Default::default()
    };
    assert!(api_error(secrets.delete("s", &wrong_rv).await).is_conflict());
    let right = DeleteParams {
        preconditions: Some(Preconditions {
            uid: created.uid(),
            resource_version: created.resource_version(),
        }),
        ..Default::default()
    };
    secrets.delete("s", &right).await.unwrap();
}

#[tokio::test]
async fn owner_reference_cascade() {
    let server = server().await;
    let client = server.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
    let aais = crd_api(&client, "ns", "AzureAssignedIdentity");

    let owner = pods
        .create(&PostParams::default(), &pod("ns", "p").build())
        .await
        .unwrap();
    let mut child = custom(
        "AzureAssignedIdentity",
        "ns",
        "p-id",
        json!({"spec": {"pod": "p"}}),
    );
    child.metadata.owner_references = Some(vec![owner_ref(&owner)]);
    let child = aais.create(&PostParams::default(), &child).await.unwrap();
    let mut grandchild = custom(
        "AzureAssignedIdentity",
        "ns",
        "p-id-child",
        json!({"spec": {}}),
    );
    grandchild.metadata.owner_references =
        Some(vec![owner_ref_dynamic(&child, "AzureAssignedIdentity")]);
    aais.create(&PostParams::default(), &grandchild)
        .await
        .unwrap();
    let mut held = custom("AzureAssignedIdentity", "ns", "held", json!({"spec": {}}));
    held.metadata.owner_references = Some(vec![owner_ref(&owner)]);
    held.metadata.finalizers = Some(vec!["podid.dev/hold".into()]);
    aais.create(&PostParams::default(), &held).await.unwrap();

    pods.delete("p", &DeleteParams::default()).await.unwrap();
    assert!(api_error(aais.get("p-id").await).is_not_found());
    assert!(
        api_error(aais.get("p-id-child").await).is_not_found(),
        "the cascade is recursive"
    );
    let deleting = aais.get("held").await.unwrap();
    assert!(
        deleting.metadata.deletion_timestamp.is_some(),
        "a dependent with finalizers is marked, not removed"
    );

    // Orphan leaves the dependents without the reference
    let owner = pods
        .create(&PostParams::default(), &pod("ns", "q").build())
        .await
        .unwrap();
    let mut orphan = custom("AzureAssignedIdentity", "ns", "orphan", json!({"spec": {}}));
    orphan.metadata.owner_references = Some(vec![owner_ref(&owner)]);
    aais.create(&PostParams::default(), &orphan).await.unwrap();
    pods.delete("q", &DeleteParams::orphan()).await.unwrap();
    let survived = aais.get("orphan").await.unwrap();
    assert!(survived.owner_references().is_empty());

    // a dependent with a second live owner only loses the reference to the deleted one
    let first = pods
        .create(&PostParams::default(), &pod("ns", "r1").build())
        .await
        .unwrap();
    let second = pods
        .create(&PostParams::default(), &pod("ns", "r2").build())
        .await
        .unwrap();
    let mut shared = custom("AzureAssignedIdentity", "ns", "shared", json!({"spec": {}}));
    let mut second_ref = owner_ref(&second);
    second_ref.controller = None;
    shared.metadata.owner_references = Some(vec![owner_ref(&first), second_ref]);
    aais.create(&PostParams::default(), &shared).await.unwrap();
    pods.delete("r1", &DeleteParams::background())
        .await
        .unwrap();
    let still = aais.get("shared").await.unwrap();
    assert_eq!(still.owner_references().len(), 1);
    pods.delete(
        "r2",
        &DeleteParams {
            propagation_policy: Some(PropagationPolicy::Foreground),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(api_error(aais.get("shared").await).is_not_found());
}

#[tokio::test]
async fn token_request_returns_a_bound_jwt_shaped_token() {
    let server = server().await;
    let client = server.client();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "app");
    let sa = sas
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some("reader".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let pod = Api::<Pod>::namespaced(client.clone(), "app")
        .create(
            &PostParams::default(),
            &pod("app", "p").service_account("reader").build(),
        )
        .await
        .unwrap();
    let request = |uid: Option<String>, name: &str, expiration: Option<i64>| TokenRequest {
        metadata: ObjectMeta::default(),
        spec: TokenRequestSpec {
            audiences: vec!["api://AzureADTokenExchange".into()],
            bound_object_ref: Some(BoundObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                name: Some(name.into()),
                uid,
            }),
            expiration_seconds: expiration,
        },
        status: None,
    };

    let issued = sas
        .create_token_request(
            "reader",
            &PostParams::default(),
            &request(pod.uid(), "p", None),
        )
        .await
        .unwrap();
    let status = issued.status.expect("a token");
    assert_eq!(status.token.split('.').count(), 3);
    let claims = decode_claims(&status.token).expect("a JWT payload");
    assert_eq!(claims["sub"], "system:serviceaccount:app:reader");
    assert_eq!(claims["aud"], json!(["api://AzureADTokenExchange"]));
    assert_eq!(claims["kubernetes.io"]["namespace"], "app");
    assert_eq!(
        claims["kubernetes.io"]["pod"],
        json!({"name": "p", "uid": pod.uid()})
    );
    assert_eq!(
        claims["kubernetes.io"]["serviceaccount"],
        json!({"name": "reader", "uid": sa.uid()})
    );
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 3600, "default expiration");
    assert_eq!(claims["nbf"].as_i64(), Some(iat));
    assert_eq!(status.expiration_timestamp.0.as_second(), exp);

    let short = sas
        .create_token_request(
            "reader",
            &PostParams::default(),
            &request(None, "p", Some(900)),
        )
        .await
        .unwrap();
    let claims = decode_claims(&short.status.unwrap().token).unwrap();
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        900
    );

    let wrong_uid = api_error(
        sas.create_token_request(
            "reader",
            &PostParams::default(),
            &request(Some("other".into()), "p", None),
        )
        .await,
    );
    assert!(wrong_uid.is_conflict(), "{wrong_uid:?}");
    assert!(
        api_error(
            sas.create_token_request(
                "reader",
                &PostParams::default(),
                &request(None, "gone", None)
            )
            .await
        )
        .is_not_found()
    );
    assert!(
        api_error(
            sas.create_token_request("nobody", &PostParams::default(), &request(None, "p", None))
                .await
        )
        .is_not_found()
    );
    let too_short = api_error(
        sas.create_token_request(
            "reader",
            &PostParams::default(),
            &request(None, "p", Some(60)),
        )
        .await,
    );
    assert_eq!(too_short.code, 422);
}

#[tokio::test]
async fn discovery_finds_every_served_type() {
    let server = server().await;
    let client = server.client();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "33")
    );
    for discovery in [
        kube::Discovery::new(client.clone()).run().await.unwrap(),
        kube::Discovery::new(client.clone())
            .run_aggregated()
            .await
            .unwrap(),
    ] {
        let mut kinds: Vec<String> = discovery
            .groups()
            .flat_map(|g| g.recommended_resources())
            .map(|(ar, _)| format!("{}/{}", ar.group, ar.kind))
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                "/Event",
                "/Node",
                "/Pod",
                "/Secret",
                "/ServiceAccount",
                "aadpodidentity.k8s.io/AzureAssignedIdentity",
                "aadpodidentity.k8s.io/AzureIdentity",
                "aadpodidentity.k8s.io/AzureIdentityBinding",
                "aadpodidentity.k8s.io/AzurePodIdentityException",
                "coordination.k8s.io/Lease",
                "events.k8s.io/Event",
            ]
        );
        let (ar, caps) = discovery
            .resolve_gvk(&kube::api::GroupVersionKind::gvk("", "v1", "Pod"))
            .unwrap();
        assert_eq!(ar.plural, "pods");
        assert!(
            caps.subresources
                .iter()
                .any(|(sub, _)| sub.plural == "pods/status" || sub.plural == "status"),
            "{:?}",
            caps.subresources
        );
    }
}

#[tokio::test]
async fn lists_page_with_limit_and_continue() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    for i in 0..1203 {
        pods.create(
            &PostParams::default(),
            &pod("ns", &format!("p-{i:04}"))
                .label("even", if i % 2 == 0 { "yes" } else { "no" })
                .build(),
        )
        .await
        .unwrap();
    }
    let first = pods.list(&ListParams::default().limit(500)).await.unwrap();
    assert_eq!(first.items.len(), 500);
    assert_eq!(first.metadata.remaining_item_count, Some(703));
    let token = first.metadata.continue_.clone().expect("more pages");
    // a write between pages: pages after the first show the current state (no MVCC snapshot)
    pods.create(&PostParams::default(), &pod("ns", "p-9999").build())
        .await
        .unwrap();
    let second = pods
        .list(&ListParams::default().limit(500).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(
        second.metadata.resource_version, first.metadata.resource_version,
        "every page carries the first page's version"
    );
    let third = pods
        .list(
            &ListParams::default()
                .limit(500)
                .continue_token(second.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(third.items.len(), 204);
    assert!(third.metadata.continue_.is_none());
    let all: Vec<String> = [first.items, second.items, third.items]
        .concat()
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(all.len(), 1204);
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "pages are in key order with no overlap"
    );

    let even = pods
        .list(&ListParams::default().labels("even=yes").limit(100))
        .await
        .unwrap();
    assert_eq!(even.items.len(), 100);
    assert_eq!(
        even.metadata.remaining_item_count, None,
        "not counted under a selector"
    );

    // kube omits resourceVersion=0 when it pages, so ask by hand
    let raw = hyper::Request::get("/api/v1/namespaces/ns/pods?limit=10&resourceVersion=0")
        .body(Vec::new())
        .unwrap();
    let from_cache: Value =
        serde_json::from_str(&server.client().request_text(raw).await.unwrap()).unwrap();
    assert_eq!(
        from_cache["items"].as_array().map(Vec::len),
        Some(1204),
        "resourceVersion=0 is served whole"
    );
    assert!(from_cache["metadata"].get("continue").is_none());

    server.compact_history();
    pods.create(&PostParams::default(), &pod("ns", "late").build())
        .await
        .unwrap();
    let expired = api_error(
        pods.list(&ListParams::default().limit(500).continue_token(&token))
            .await,
    );
    assert_eq!((expired.code, expired.reason.as_str()), (410, "Expired"));

    // the real watcher pages with limit=500 and sees everything
    let (reader, writer) = kube::runtime::reflector::store();
    let stream = watcher(pods.clone(), watcher::Config::default()).reflect(writer);
    let task = tokio::spawn(stream.for_each(|_| async {}));
    reader.wait_until_ready().await.unwrap();
    assert_eq!(reader.state().len(), 1205);
    task.abort();
}

#[tokio::test]
async fn selectors_filter_lists_and_bad_ones_are_400() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    pods.create(
        &PostParams::default(),
        &pod("ns", "a").label("app", "web").on_node("n1").build(),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("ns", "b").label("app", "db").on_node("n2").build(),
    )
    .await
    .unwrap();
    pods.create(&PostParams::default(), &pod("ns", "c").build())
        .await
        .unwrap();
    let listed = |lp: ListParams| {
        let pods = pods.clone();
        async move { names(&pods.list(&lp).await.unwrap().items) }
    };
    assert_eq!(
        listed(ListParams::default().labels("app in (web,db)")).await,
        ["a", "b"]
    );
    assert_eq!(
        listed(ListParams::default().labels("app!=web")).await,
        ["b", "c"]
    );
    assert_eq!(listed(ListParams::default().labels("!app")).await, ["c"]);
    assert_eq!(
        listed(ListParams::default().fields("spec.nodeName=n1")).await,
        ["a"]
    );
    assert_eq!(
        listed(ListParams::default().fields("spec.nodeName!=n1,metadata.name!=c")).await,
        ["b"]
    );
    assert_eq!(
        listed(ListParams::default().fields("status.phase=Pending")).await,
        ["a", "b", "c"]
    );
    assert_eq!(
        listed(
            ListParams::default()
                .fields("metadata.namespace=ns")
                .labels("app")
        )
        .await,
        ["a", "b"]
    );

    let bad_label = api_error(pods.list(&ListParams::default().labels("app in web")).await);
    assert_eq!(bad_label.code, 400);
    let bad_field = api_error(
        pods.list(&ListParams::default().fields("spec.containers=x"))
            .await,
    );
    assert_eq!(bad_field.code, 400);
    assert!(
        bad_field
            .message
            .ends_with("field label not supported: spec.containers"),
        "{}",
        bad_field.message
    );
    let lease_field = api_error(
        Api::<Lease>::namespaced(server.client(), "ns")
            .list(&ListParams::default().fields("spec.nodeName=n1"))
            .await,
    );
    assert_eq!(lease_field.code, 400);
}

#[tokio::test]
async fn events_in_both_groups_and_the_recorder() {
    let server = server().await;
    let client = server.client();
    let pod = Api::<Pod>::namespaced(client.clone(), "ns")
        .create(&PostParams::default(), &pod("ns", "p").build())
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "podid-controller".into(),
            instance: None,
        },
    );
    let event = RecorderEvent {
        type_: EventType::Normal,
        reason: "IdentityAssigned".into(),
        note: Some("kv".into()),
        action: "Assign".into(),
        secondary: None,
    };
    recorder
        .publish(&event, &pod.object_ref(&()))
        .await
        .unwrap();
    recorder
        .publish(&event, &pod.object_ref(&()))
        .await
        .unwrap();
    let v1: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "ns");
    let listed = v1
        .list(&ListParams::default().fields("regarding.name=p"))
        .await
        .unwrap();
    assert_eq!(
        listed.items.len(),
        1,
        "the second publish patches the series"
    );
    assert_eq!(listed.items[0].series.as_ref().map(|s| s.count), Some(2));

    let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, "ns");
    let legacy = k8s_openapi::api::core::v1::Event {
        metadata: ObjectMeta {
            name: Some("p.1".into()),
            ..Default::default()
        },
        involved_object: pod.object_ref(&()),
        reason: Some("Scheduled".into()),
        ..Default::default()
    };
    core.create(&PostParams::default(), &legacy).await.unwrap();
    let found = core
        .list(&ListParams::default().fields("involvedObject.name=p,reason=Scheduled"))
        .await
        .unwrap();
    assert_eq!(names(&found.items), ["p.1"]);
}

#[tokio::test]
async fn request_counters_by_verb() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    pods.create(&PostParams::default(), &pod("ns", "p").build())
        .await
        .unwrap();
    pods.get("p").await.unwrap();
    pods.list(&ListParams::default()).await.unwrap();
    pods.patch("p", &PatchParams::default(), &Patch::Merge(json!({})))
        .await
        .unwrap();
    pods.delete("p", &DeleteParams::default()).await.unwrap();
    let stats = server.stats();
    assert_eq!(stats.requests, 5);
    for verb in ["create", "get", "list", "patch", "delete"] {
        assert_eq!(stats.verb(verb), 1, "{verb}");
    }
    assert_eq!(stats.verb("watch"), 0);
    let raw = server
        .client()
        .request_text(hyper::Request::get("/fake/stats").body(Vec::new()).unwrap())
        .await
        .unwrap();
    let json: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(json["requests"], 5, "reading the counters is not counted");
    assert_eq!(json["byVerb"]["create"], 1);
}

#[tokio::test]
async fn delete_collection_by_label() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    for (name, app) in [("a", "web"), ("b", "web"), ("c", "db")] {
        pods.create(
            &PostParams::default(),
            &pod("ns", name).label("app", app).build(),
        )
        .await
        .unwrap();
    }
    pods.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("app=web"),
    )
    .await
    .unwrap();
    assert_eq!(
        names(&pods.list(&ListParams::default()).await.unwrap().items),
        ["c"]
    );
}

// A local AzureIdentity type, to run kube's Controller and finalizer helper over a typed CRD.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentity",
    namespaced,
    status = "IdentityStatus"
)]
struct IdentitySpec {
    #[serde(rename = "type")]
    kind: i32,
    #[serde(rename = "clientID")]
    client_id: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
struct IdentityStatus {
    ready: bool,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct ReconcileError(#[from] kube::Error);

struct Context {
    client: Client,
    cleanups: AtomicUsize,
}

const FINALIZER: &str = "aadpodidentity.k8s.io/podid-test";

async fn reconcile(
    identity: Arc<AzureIdentity>,
    ctx: Arc<Context>,
) -> Result<Action, finalizer::Error<ReconcileError>> {
    let api: Api<AzureIdentity> =
        Api::namespaced(ctx.client.clone(), &identity.namespace().unwrap());
    finalizer(&api, FINALIZER, identity, |event| async {
        match event {
            Finalizer::Apply(identity) => {
                let status = json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity", "status": {"ready": true}});
                api.patch_status(&identity.name_any(), &PatchParams::apply("podid-test").force(), &Patch::Apply(status)).await?;
                Ok(Action::await_change())
            }
            Finalizer::Cleanup(_) => {
                ctx.cleanups.fetch_add(1, Ordering::SeqCst);
                Ok(Action::await_change())
            }
        }
    })
    .await
}

fn error_policy(
    _: Arc<AzureIdentity>,
    _: &finalizer::Error<ReconcileError>,
    _: Arc<Context>,
) -> Action {
    Action::requeue(Duration::from_millis(50))
}

#[tokio::test]
async fn controller_with_the_finalizer_helper() {
    let server = server().await;
    let client = server.client();
    let api: Api<AzureIdentity> = Api::namespaced(client.clone(), "ns");
    let ctx = Arc::new(Context {
        client: client.clone(),
        cleanups: AtomicUsize::new(0),
    });
    let controller = Controller::new(
        Api::<AzureIdentity>::all(client.clone()),
        watcher::Config::default(),
    )
    .run(reconcile, error_policy, Arc::clone(&ctx))
    .for_each(|_| async {});
    let task = tokio::spawn(controller);

    let identity = AzureIdentity::new(
        "kv-reader",
        IdentitySpec {
            kind: 0,
            client_id: "00000000-0000-0000-0000-000000000001".into(),
        },
    );
    api.create(&PostParams::default(), &identity).await.unwrap();
    let ready = eventually("the finalizer and the status", || {
        let api = api.clone();
        async move {
            let got = api.get("kv-reader").await.ok()?;
            (got.finalizers() == [FINALIZER] && got.status.as_ref().is_some_and(|s| s.ready))
                .then_some(got)
        }
    })
    .await;
    assert_eq!(ready.metadata.generation, Some(1));

    api.delete("kv-reader", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the cleanup and the removal", || {
        let api = api.clone();
        async move { matches!(api.get_opt("kv-reader").await, Ok(None)).then_some(()) }
    })
    .await;
    assert_eq!(ctx.cleanups.load(Ordering::SeqCst), 1);
    task.abort();
}

#[tokio::test]
async fn the_binary_writes_a_kubeconfig_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fake-apiserver"))
        .args(["--port", "0", "--kubeconfig"])
        .arg(&kubeconfig)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                .map(|_| line)
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    let url = ready
        .trim_end()
        .strip_prefix("listening on ")
        .expect("the ready line names the URL")
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(config.cluster_url.to_string().trim_end_matches('/'), url);
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    let leases: Api<Lease> = Api::default_namespaced(client.clone());
    leases
        .create(
            &PostParams::default(),
            &Lease {
                metadata: ObjectMeta {
                    name: Some("l".into()),
                    ..Default::default()
                },
                spec: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        leases.get("l").await.unwrap().namespace().as_deref(),
        Some("default")
    );
    let stats: Value = serde_json::from_str(
        &client
            .request_text(hyper::Request::get("/fake/stats").body(Vec::new()).unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stats["byVerb"]["create"], 1);
    assert_eq!(stats["byVerb"]["get"], 1);

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || child.wait()))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    client.apiserver_version().await.unwrap();
    server.shutdown().await;
    assert!(client.apiserver_version().await.is_err());
}
