//! podid-controller in-process against the fake API server, through the real `kube::Client`:
//! the aad-pod-identity YAML of the seeds' example, arrival orders, deletions, relabels, edits,
//! rescheduling, colliding names, recreated pods, the IdentityReady condition and the Events,
//! namespaced and cluster-wide matching, idempotence across a restart, /healthz, /readyz,
//! /metrics.

mod controller_support;

use std::time::Duration;

use controller_support::*;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use podid_api::crd::{AzureIdentity, AzureIdentityBinding, BINDING_LABEL, assignment_name};
use serde_json::json;

fn uid(pod: &Pod) -> String {
    pod.uid().expect("a created pod has a uid")
}

#[tokio::test]
async fn seeds_example_rgapi_yaml() {
    let server = server().await;
    let client = server.client();
    let fixtures = podid_tests::bins::workspace_root().join("tests/fixtures/aad-pod-identity");
    let read = |f: &str| std::fs::read_to_string(fixtures.join(f)).expect("fixture");
    let identity: AzureIdentity =
        serde_saphyr::from_str(&read("seeds-rgapi-identity.yaml")).expect("identity YAML");
    let binding: AzureIdentityBinding =
        serde_saphyr::from_str(&read("seeds-rgapi-binding.yaml")).expect("binding YAML");
    let identity = create(&client, &identity).await;
    create(&client, &binding).await;
    let controller = start(&server).await;

    let pod = create(
        &client,
        &pod("rgapi", "rgapi-app", "rgapi", "aks-nodepool1-vmss000000"),
    )
    .await;
    let name = assignment_name("rgapi-app", &uid(&pod), "rgapi", "rgapi");
    let aai = wait_assigned(&client, "rgapi", std::slice::from_ref(&name))
        .await
        .remove(0);

    assert_eq!(aai.namespace().as_deref(), Some("rgapi"));
    assert_eq!(
        aai.labels().get("nodename").map(String::as_str),
        Some("aks-nodepool1-vmss000000")
    );
    assert_eq!(
        aai.labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("podid-controller")
    );
    let owner = &aai.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.clone()),
        ("Pod", "rgapi-app", uid(&pod))
    );
    assert_eq!(aai.spec.pod.as_deref(), Some("rgapi-app"));
    assert_eq!(aai.spec.pod_namespace.as_deref(), Some("rgapi"));
    assert_eq!(aai.spec.pod_uid, Some(uid(&pod)));
    assert_eq!(
        aai.spec.nodename.as_deref(),
        Some("aks-nodepool1-vmss000000")
    );
    let embedded = aai
        .spec
        .azure_identity_ref
        .as_ref()
        .expect("identity embedded");
    assert_eq!(
        embedded.spec, identity.spec,
        "type 0, resourceID and clientID as written"
    );
    assert_eq!(embedded.metadata.uid, identity.metadata.uid);
    assert!(
        embedded.forces_namespaced(),
        "the Behavior annotation travels with the identity"
    );
    assert_eq!(embedded.metadata.resource_version, None);
    let embedded_binding = aai
        .spec
        .azure_binding_ref
        .as_ref()
        .expect("binding embedded");
    assert_eq!(embedded_binding.name_any(), "rgapi-binding");
    assert_eq!(embedded_binding.spec.selector.as_deref(), Some("rgapi"));

    let condition =
        wait_condition(&client, "rgapi", "rgapi-app", "True", "IdentitiesAssigned").await;
    assert_eq!(
        condition.message.as_deref(),
        Some("assigned AzureIdentity rgapi/rgapi")
    );
    let events = eventually("the pod's IdentitiesAssigned event", || async {
        let events = events_about(&client, "rgapi", "Pod", "rgapi-app").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events[0].reason.as_deref(), Some("IdentitiesAssigned"));
    assert_eq!(events[0].type_.as_deref(), Some("Normal"));
    assert_eq!(
        events[0].reporting_controller.as_deref(),
        Some("podid-controller")
    );
    assert_eq!(events[0].reporting_instance.as_deref(), Some("replica-a"));
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn bindings_then_pods_then_pods_then_bindings() {
    let server = server().await;
    let client = server.client();
    let controller = start(&server).await;

    // bindings first
    create(&client, &identity("ns", "kv")).await;
    create(&client, &binding("ns", "kv-binding", "kv", "app")).await;
    let first = create(&client, &pod("ns", "first", "app", "n1")).await;
    wait_assigned(
        &client,
        "ns",
        &[assignment_name("first", &uid(&first), "ns", "kv")],
    )
    .await;

    // then a pod whose binding does not exist yet
    let second = create(&client, &pod("ns", "second", "later", "n1")).await;
    let condition = wait_condition(&client, "ns", "second", "False", "NoMatchingBinding").await;
    assert_eq!(
        condition.message.as_deref(),
        Some("no AzureIdentityBinding in namespace ns has selector \"later\"")
    );
    create(&client, &identity("ns", "db")).await;
    create(&client, &binding("ns", "db-binding", "db", "later")).await;
    wait_assigned(
        &client,
        "ns",
        &[
            assignment_name("first", &uid(&first), "ns", "kv"),
            assignment_name("second", &uid(&second), "ns", "db"),
        ],
    )
    .await;
    wait_condition(&client, "ns", "second", "True", "IdentitiesAssigned").await;
    let events = events_about(&client, "ns", "Pod", "second").await;
    let reasons: Vec<&str> = events.iter().filter_map(|e| e.reason.as_deref()).collect();
    assert!(
        reasons.contains(&"NoMatchingBinding") && reasons.contains(&"IdentitiesAssigned"),
        "{reasons:?}"
    );
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn pod_deletion_and_unlabelling_remove_assignments() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("ns", "kv")).await;
    create(&client, &binding("ns", "b", "kv", "app")).await;
    let controller = start(&server).await;
    let gone = create(&client, &pod("ns", "gone", "app", "n1")).await;
    let unlabelled = create(&client, &pod("ns", "unlabelled", "app", "n1")).await;
    wait_assigned(
        &client,
        "ns",
        &[
            assignment_name("gone", &uid(&gone), "ns", "kv"),
            assignment_name("unlabelled", &uid(&unlabelled), "ns", "kv"),
        ],
    )
    .await;
    wait_condition(&client, "ns", "unlabelled", "True", "IdentitiesAssigned").await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
    pods.delete("gone", &DeleteParams::default())
        .await
        .expect("delete");
    // the label removed: the pod leaves the label-selected watch as DELETED
    pods.patch(
        "unlabelled",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {BINDING_LABEL: null}}})),
    )
    .await
    .expect("unlabel");
    wait_assigned(&client, "ns", &[]).await;
    let condition = wait_condition(&client, "ns", "unlabelled", "False", "NoBindingLabel").await;
    assert_eq!(
        condition.message.as_deref(),
        Some("the pod has no aadpodidbinding label")
    );
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn relabel_moves_the_pod_to_the_new_identity() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("ns", "a")).await;
    create(&client, &identity("ns", "b")).await;
    create(&client, &binding("ns", "ba", "a", "sel-a")).await;
    create(&client, &binding("ns", "bb", "b", "sel-b")).await;
    let controller = start(&server).await;
    let p = create(&client, &pod("ns", "p", "sel-a", "n1")).await;
    wait_assigned(&client, "ns", &[assignment_name("p", &uid(&p), "ns", "a")]).await;

    Api::<Pod>::namespaced(client.clone(), "ns")
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {BINDING_LABEL: "sel-b"}}})),
        )
        .await
        .expect("relabel");
    let items = wait_assigned(&client, "ns", &[assignment_name("p", &uid(&p), "ns", "b")]).await;
    assert_eq!(
        items[0].spec.azure_binding_ref.as_ref().unwrap().name_any(),
        "bb"
    );
    let condition = wait_condition(&client, "ns", "p", "True", "IdentitiesAssigned").await;
    assert_eq!(
        condition.message.as_deref(),
        Some("assigned AzureIdentity ns/b")
    );
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn identity_edit_updates_the_embedded_copy_in_place() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("ns", "kv")).await;
    create(&client, &binding("ns", "b", "kv", "app")).await;
    let controller = start(&server).await;
    let p = create(&client, &pod("ns", "p", "app", "n1")).await;
    let name = assignment_name("p", &uid(&p), "ns", "kv");
    let before = wait_assigned(&client, "ns", std::slice::from_ref(&name))
        .await
        .remove(0);

    Api::<AzureIdentity>::namespaced(client.clone(), "ns")
        .patch(
            "kv",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"clientID": "rotated"}})),
        )
        .await
        .expect("edit identity");
    let after = eventually("the embedded identity to be updated", || async {
        assignments(&client, "ns")
            .get(&name)
            .await
            .ok()
            .filter(|a| {
                a.spec
                    .azure_identity_ref
                    .as_ref()
                    .and_then(|i| i.spec.client_id.as_deref())
                    == Some("rotated")
            })
    })
    .await;
    assert_eq!(
        after.uid(),
        before.uid(),
        "updated in place, not re-created"
    );
    assert!(is_assigned(&after));

    // a binding weight edit reaches the embedded binding too
    Api::<AzureIdentityBinding>::namespaced(client.clone(), "ns")
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"weight": 4}})),
        )
        .await
        .expect("edit binding");
    eventually("the embedded binding to be updated", || async {
        assignments(&client, "ns")
            .get(&name)
            .await
            .ok()
            .filter(|a| {
                a.spec
                    .azure_binding_ref
                    .as_ref()
                    .and_then(|b| b.spec.weight)
                    == Some(4)
            })
    })
    .await;
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn binding_deleted_removes_its_assignments() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("ns", "kv")).await;
    create(&client, &binding("ns", "b", "kv", "app")).await;
    let controller = start(&server).await;
    let p = create(&client, &pod("ns", "p", "app", "n1")).await;
    wait_assigned(&client, "ns", &[assignment_name("p", &uid(&p), "ns", "kv")]).await;
    Api::<AzureIdentityBinding>::namespaced(client.clone(), "ns")
        .delete("b", &DeleteParams::default())
        .await
        .expect("delete binding");
    wait_assigned(&client, "ns", &[]).await;
    wait_condition(&client, "ns", "p", "False", "NoMatchingBinding").await;
    controller.stop().await.expect("a clean stop");
}

/// A pod's `spec.nodeName` is immutable on a real server (a moved workload is a new pod); the
/// fake lets it change, and the controller then updates the assignment in place: same name
/// (it does not depend on the node), new `nodename` label and `spec.nodename`.
#[tokio::test]
async fn pod_rescheduled_updates_the_assignment_in_place() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("ns", "kv")).await;
    create(&client, &binding("ns", "b", "kv", "app")).await;
    let controller = start(&server).await;
    let p = create(&client, &pod("ns", "p", "app", "node-1")).await;
    let name = assignment_name("p", &uid(&p), "ns", "kv");
    let before = wait_assigned(&client, "ns", std::slice::from_ref(&name))
        .await
        .remove(0);
    Api::<Pod>::namespaced(client.clone(), "ns")
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "node-2"}})),
        )
        .await
        .expect("move");
    let after = eventually("the assignment to follow the pod", || async {
        assignments(&client, "ns")
            .get(&name)
            .await
            .ok()
            .filter(|a| a.spec.nodename.as_deref() == Some("node-2"))
    })
    .await;
    assert_eq!(
        after.labels().get("nodename").map(String::as_str),
        Some("node-2")
    );
    assert_eq!(after.uid(), before.uid());
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn names_that_would_collide_without_the_hash() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("ns", "kv")).await;
    create(&client, &identity("ns", "reader-kv")).await;
    create(&client, &binding("ns", "b1", "kv", "one")).await;
    create(&client, &binding("ns", "b2", "reader-kv", "two")).await;
    let controller = start(&server).await;
    let api_reader = create(&client, &pod("ns", "api-reader", "one", "n1")).await;
    let api = create(&client, &pod("ns", "api", "two", "n1")).await;
    let a = assignment_name("api-reader", &uid(&api_reader), "ns", "kv");
    let b = assignment_name("api", &uid(&api), "ns", "reader-kv");
    assert!(a.starts_with("api-reader-kv-") && b.starts_with("api-reader-kv-") && a != b);
    let items = wait_assigned(&client, "ns", &[a.clone(), b.clone()]).await;
    let by_pod: Vec<(String, String)> = items
        .iter()
        .map(|i| {
            (
                i.spec.pod.clone().unwrap(),
                i.spec.azure_identity_ref.as_ref().unwrap().name_any(),
            )
        })
        .collect();
    assert!(by_pod.contains(&("api-reader".into(), "kv".into())));
    assert!(by_pod.contains(&("api".into(), "reader-kv".into())));
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn pod_recreated_with_the_same_name_gets_a_new_assignment() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("ns", "kv")).await;
    create(&client, &binding("ns", "b", "kv", "app")).await;
    let controller = start(&server).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
    let old = create(&client, &pod("ns", "web-0", "app", "n1")).await;
    wait_assigned(
        &client,
        "ns",
        &[assignment_name("web-0", &uid(&old), "ns", "kv")],
    )
    .await;
    pods.delete("web-0", &DeleteParams::default())
        .await
        .expect("delete");
    let new = create(&client, &pod("ns", "web-0", "app", "n2")).await;
    assert_ne!(uid(&old), uid(&new));
    let items = wait_assigned(
        &client,
        "ns",
        &[assignment_name("web-0", &uid(&new), "ns", "kv")],
    )
    .await;
    assert_eq!(items[0].spec.pod_uid, Some(uid(&new)));
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn missing_identity_gives_one_binding_event_and_a_false_condition() {
    let server = server().await;
    let client = server.client();
    create(&client, &binding("ns", "orphan", "absent", "app")).await;
    let controller = start(&server).await;
    let p = create(&client, &pod("ns", "p", "app", "n1")).await;
    let condition = wait_condition(&client, "ns", "p", "False", "IdentityNotFound").await;
    assert_eq!(
        condition.message.as_deref(),
        Some("binding ns/orphan names AzureIdentity ns/absent, which does not exist")
    );
    let events = eventually("the binding's IdentityNotFound event", || async {
        let events = events_about(&client, "ns", "AzureIdentityBinding", "orphan").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events[0].reason.as_deref(), Some("IdentityNotFound"));
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    assert_eq!(
        events[0].note.as_deref(),
        Some("AzureIdentity ns/absent does not exist")
    );

    // more pods and a binding edit do not repeat it: it is emitted on change only
    create(&client, &pod("ns", "q", "app", "n1")).await;
    Api::<AzureIdentityBinding>::namespaced(client.clone(), "ns")
        .patch(
            "orphan",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"weight": 2}})),
        )
        .await
        .expect("edit binding");
    wait_condition(&client, "ns", "q", "False", "IdentityNotFound").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        events_about(&client, "ns", "AzureIdentityBinding", "orphan")
            .await
            .len(),
        1
    );

    // the identity appears: the pods get it
    create(&client, &identity("ns", "absent")).await;
    wait_condition(&client, "ns", "p", "True", "IdentitiesAssigned").await;
    wait_assigned(
        &client,
        "ns",
        &[
            assignment_name("p", &uid(&p), "ns", "absent"),
            assignment_name(
                "q",
                &Api::<Pod>::namespaced(client.clone(), "ns")
                    .get("q")
                    .await
                    .unwrap()
                    .uid()
                    .unwrap(),
                "ns",
                "absent",
            ),
        ],
    )
    .await;
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn namespaced_by_default() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("team-a", "kv")).await;
    create(&client, &binding("team-a", "b", "kv", "app")).await;
    let controller = start(&server).await;
    let home = create(&client, &pod("team-a", "home", "app", "n1")).await;
    create(&client, &pod("team-b", "away", "app", "n1")).await;
    wait_assigned(
        &client,
        "team-a",
        &[assignment_name("home", &uid(&home), "team-a", "kv")],
    )
    .await;
    wait_condition(&client, "team-b", "away", "False", "NoMatchingBinding").await;
    assert!(list_assignments(&client, "team-b").await.is_empty());
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn cluster_wide_except_behavior_namespaced() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("team-a", "shared")).await;
    create(&client, &namespaced_only(identity("team-a", "private"))).await;
    create(&client, &binding("team-a", "to-shared", "shared", "app")).await;
    create(&client, &binding("team-a", "to-private", "private", "app")).await;
    let controller = start_with(&server, settings("replica-a", true)).await;
    let home = create(&client, &pod("team-a", "home", "app", "n1")).await;
    let away = create(&client, &pod("team-b", "away", "app", "n1")).await;
    wait_assigned(
        &client,
        "team-a",
        &[
            assignment_name("home", &uid(&home), "team-a", "private"),
            assignment_name("home", &uid(&home), "team-a", "shared"),
        ],
    )
    .await;
    let items = wait_assigned(
        &client,
        "team-b",
        &[assignment_name("away", &uid(&away), "team-a", "shared")],
    )
    .await;
    assert_eq!(
        items[0]
            .spec
            .azure_binding_ref
            .as_ref()
            .unwrap()
            .namespace()
            .as_deref(),
        Some("team-a")
    );
    let condition = wait_condition(&client, "team-a", "home", "True", "IdentitiesAssigned").await;
    assert_eq!(
        condition.message.as_deref(),
        Some("assigned AzureIdentity team-a/private, team-a/shared"),
        "weight ties: by identity name"
    );
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn duplicate_bindings_and_weights() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("ns", "kv")).await;
    create(&client, &identity("ns", "db")).await;
    let mut light = binding("ns", "a-light", "kv", "app");
    light.spec.weight = Some(1);
    let mut heavy = binding("ns", "z-heavy", "kv", "app");
    heavy.spec.weight = Some(9);
    let mut db = binding("ns", "db", "db", "app");
    db.spec.weight = Some(5);
    create(&client, &light).await;
    create(&client, &heavy).await;
    create(&client, &db).await;
    let controller = start(&server).await;
    let p = create(&client, &pod("ns", "p", "app", "n1")).await;
    let items = wait_assigned(
        &client,
        "ns",
        &[
            assignment_name("p", &uid(&p), "ns", "kv"),
            assignment_name("p", &uid(&p), "ns", "db"),
        ],
    )
    .await;
    let kv = items
        .iter()
        .find(|a| a.spec.azure_identity_ref.as_ref().unwrap().name_any() == "kv")
        .unwrap();
    assert_eq!(
        kv.spec.azure_binding_ref.as_ref().unwrap().name_any(),
        "z-heavy",
        "one assignment, heaviest binding"
    );
    let condition = wait_condition(&client, "ns", "p", "True", "IdentitiesAssigned").await;
    assert_eq!(
        condition.message.as_deref(),
        Some("assigned AzureIdentity ns/kv, ns/db"),
        "by weight: kv (9) first"
    );
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn terminal_and_unscheduled_pods() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("ns", "kv")).await;
    create(&client, &binding("ns", "b", "kv", "app")).await;
    let controller = start(&server).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
    let mut pending = pod("ns", "pending", "app", "n1");
    pending.spec.as_mut().unwrap().node_name = None;
    create(&client, &pending).await;
    let done = create(&client, &pod("ns", "done", "app", "n1")).await;
    wait_assigned(
        &client,
        "ns",
        &[assignment_name("done", &uid(&done), "ns", "kv")],
    )
    .await;

    wait_condition(&client, "ns", "done", "True", "IdentitiesAssigned").await;
    assert!(
        identity_ready(&client, "ns", "pending").await.is_none(),
        "an unscheduled pod gets no assignment and no condition yet"
    );

    pods.patch_status(
        "done",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
    )
    .await
    .expect("finish");
    wait_assigned(&client, "ns", &[]).await;

    // scheduling the pending pod brings its assignment
    let scheduled = pods
        .patch(
            "pending",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "n3"}})),
        )
        .await
        .expect("schedule");
    wait_assigned(
        &client,
        "ns",
        &[assignment_name("pending", &uid(&scheduled), "ns", "kv")],
    )
    .await;
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn a_restart_rewrites_nothing_and_repairs_drift() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("ns", "kv")).await;
    create(&client, &binding("ns", "b", "kv", "app")).await;
    let first = start(&server).await;
    let mut names = Vec::new();
    for i in 0..5 {
        let p = create(&client, &pod("ns", &format!("p{i}"), "app", "n1")).await;
        names.push(assignment_name(&format!("p{i}"), &uid(&p), "ns", "kv"));
    }
    wait_assigned(&client, "ns", &names).await;
    for i in 0..5 {
        wait_condition(
            &client,
            "ns",
            &format!("p{i}"),
            "True",
            "IdentitiesAssigned",
        )
        .await;
    }
    first.stop().await.expect("a clean stop");
    let lease: k8s_openapi::api::coordination::v1::Lease =
        Api::namespaced(client.clone(), LEASE_NAMESPACE)
            .get(LEASE_NAME)
            .await
            .expect("the lease exists");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity),
        None,
        "released on shutdown"
    );

    // another replica takes the released lease at once and finds nothing to write
    let second = start_with(&server, settings("replica-b", false)).await;
    eventually("the new leader to reconcile every pod", || async {
        let text = second.metrics();
        (metric(
            &text,
            "podid_controller_reconciles_total",
            &[("subject", "pod"), ("result", "ok")],
        ) >= 5.0)
            .then_some(())
    })
    .await;
    assert_eq!(writes(&second.metrics()), 0.0, "{}", second.metrics());

    // drift: someone deletes an assignment and edits another; both are repaired
    let api = assignments(&client, "ns");
    api.delete(&names[0], &DeleteParams::default())
        .await
        .expect("delete");
    api.patch(
        &names[1],
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"nodename": "wrong"}})),
    )
    .await
    .expect("edit");
    eventually("the drift to be repaired", || async {
        let items = list_assignments(&client, "ns").await;
        (items.len() == 5
            && items
                .iter()
                .all(|a| a.spec.nodename.as_deref() == Some("n1") && is_assigned(a)))
        .then_some(())
    })
    .await;
    second.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn health_endpoints_and_metrics() {
    let server = server().await;
    let client = server.client();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut s = settings("replica-a", false);
    s.health_addr = Some(addr.parse().unwrap());
    create(&client, &identity("ns", "kv")).await;
    create(&client, &binding("ns", "b", "kv", "app")).await;
    let controller = start_with(&server, s).await;
    let p = create(&client, &pod("ns", "p", "app", "n1")).await;
    wait_assigned(&client, "ns", &[assignment_name("p", &uid(&p), "ns", "kv")]).await;
    wait_condition(&client, "ns", "p", "True", "IdentitiesAssigned").await;

    let get = |path: &'static str| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            podid_tests::http::tcp(&addr, &podid_tests::http::Request::get(path)).unwrap()
        })
    };
    assert_eq!(get("/healthz").await.unwrap().status, 200);
    assert_eq!(get("/readyz").await.unwrap().status, 200);
    assert_eq!(get("/nope").await.unwrap().status, 404);
    let metrics = get("/metrics").await.unwrap();
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = metrics.text();
    assert_eq!(metric(&text, "podid_controller_leader", &[]), 1.0);
    assert_eq!(metric(&text, "podid_controller_assignments", &[]), 1.0);
    assert_eq!(
        metric(
            &text,
            "podid_controller_writes_total",
            &[("kind", "assignment"), ("op", "apply")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "podid_controller_writes_total",
            &[("kind", "assignment_status"), ("op", "apply")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "podid_controller_writes_total",
            &[("kind", "pod_condition"), ("op", "patch")]
        ),
        1.0
    );
    assert!(metric(&text, "podid_controller_writes_total", &[("kind", "event")]) >= 1.0);
    assert!(
        metric(
            &text,
            "podid_controller_reconciles_total",
            &[("result", "ok")]
        ) >= 1.0
    );
    assert_eq!(metric(&text, "podid_controller_queue_depth", &[]), 0.0);
    for name in [
        "podid_controller_errors",
        "podid_controller_reconcile_duration_seconds",
        "podid_controller_lease_acquisitions",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    controller.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn pod_conditions_of_others_are_kept() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("ns", "kv")).await;
    create(&client, &binding("ns", "b", "kv", "app")).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
    let mut p = pod("ns", "p", "app", "n1");
    p = pods
        .create(&PostParams::default(), &p)
        .await
        .expect("create");
    pods.patch_status(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}
        ]}})),
    )
    .await
    .expect("kubelet's conditions");
    let controller = start(&server).await;
    wait_assigned(&client, "ns", &[assignment_name("p", &uid(&p), "ns", "kv")]).await;
    wait_condition(&client, "ns", "p", "True", "IdentitiesAssigned").await;
    let conditions = pods
        .get("p")
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions
        .unwrap();
    let types: Vec<&str> = conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(
        types,
        [
            "PodScheduled",
            "Ready",
            "aadpodidentity.k8s.io/IdentityReady"
        ]
    );
    controller.stop().await.expect("a clean stop");
}
