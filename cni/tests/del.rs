//! DEL never fails, and removes only what this container installed.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::{
    K8S_ARGS, Netns, Setup, attachment_env, azure_vnet_result, is_root, podid,
    stdin_with_prev_result,
};
use serde_json::json;

#[test]
fn del_removes_only_a_table_tagged_with_its_container_id() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let tokend = setup.tokend(2579);
    let ns = Netns::new();
    let add = stdin_with_prev_result(&setup.conf("0.4.0", json!({})), &azure_vnet_result());
    podid(
        &attachment_env("ADD", "cid-owner", &ns.path, K8S_ARGS),
        &add,
    )
    .assert_ok();

    let del = setup.conf("0.4.0", json!({})).to_string();
    let run = podid(
        &attachment_env("DEL", "cid-intruder", &ns.path, K8S_ARGS),
        &del,
    );
    assert_eq!(run.assert_ok().stdout, "");
    assert!(
        ns.podid_table().is_some(),
        "another container's DEL must not remove the table"
    );
    assert!(setup.log().contains("belongs to another container"));

    let del_with_prev =
        stdin_with_prev_result(&setup.conf("0.4.0", json!({})), &azure_vnet_result());
    let run = podid(
        &attachment_env("DEL", "cid-owner", &ns.path, K8S_ARGS),
        &del_with_prev,
    );
    assert_eq!(run.assert_ok().stdout, "");
    assert_eq!(ns.podid_table(), None);
    let deletes: Vec<_> = tokend
        .requests()
        .into_iter()
        .filter(|(method, _, _)| method == "DELETE")
        .map(|(_, path, _)| path)
        .collect();
    assert_eq!(
        deletes,
        ["/v1/pods/cid-intruder/eth0", "/v1/pods/cid-owner/eth0"]
    );
    assert!(tokend.state.lock().unwrap().pods.is_empty());
}

#[test]
fn del_leaves_a_table_without_comment_alone() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let ns = Netns::new();
    ns.nft("add table ip podid");
    let del = setup.conf("0.3.0", json!({})).to_string();
    podid(&attachment_env("DEL", "cid-x", &ns.path, ""), &del).assert_ok();
    assert!(ns.podid_table().is_some());
}

#[test]
fn del_succeeds_whatever_is_missing() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let stdin = setup.conf("0.3.0", json!({"timeoutMs": 200})).to_string();
    let vanished = Netns::new();
    let vanished_path = vanished.path.clone();
    drop(vanished);
    let untouched = Netns::new();
    let not_a_netns = setup.dir.path().join("plain-file");
    fs::write(&not_a_netns, b"x").unwrap();
    let not_a_netns = not_a_netns.display().to_string();

    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "no CNI_NETNS",
            vec![
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
            ],
        ),
        ("empty CNI_NETNS", attachment_env("DEL", "c2", "", "")),
        (
            "vanished netns",
            attachment_env("DEL", "c3", &vanished_path, K8S_ARGS),
        ),
        ("not a netns", attachment_env("DEL", "c4", &not_a_netns, "")),
        (
            "ADD never ran, tokend down",
            attachment_env("DEL", "c5", &untouched.path, K8S_ARGS),
        ),
        (
            "repeated",
            attachment_env("DEL", "c5", &untouched.path, K8S_ARGS),
        ),
    ];
    for (case, env) in cases {
        let run = podid(&env, &stdin);
        assert_eq!(run.status, Some(0), "{case}: {run:#?}");
        assert_eq!(run.stdout, "", "{case}");
    }
    // Unusable values of podid's own keys do not stop DEL either.
    let bad = setup
        .conf(
            "0.3.0",
            json!({"timeoutMs": "abc", "failurePolicy": "Maybe"}),
        )
        .to_string();
    let run = podid(&attachment_env("DEL", "c6", &untouched.path, ""), &bad);
    assert_eq!(run.assert_ok().stdout, "");
    assert!(setup.log().contains("DEL uses the default"));
}

#[test]
fn del_removes_the_spooled_record() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let ns = Netns::new();
    let add = stdin_with_prev_result(
        &setup.conf(
            "0.3.0",
            json!({"failurePolicy": "Ignore", "timeoutMs": 200}),
        ),
        &azure_vnet_result(),
    );
    podid(
        &attachment_env("ADD", "cid-spooled", &ns.path, K8S_ARGS),
        &add,
    )
    .assert_ok();
    let spool = setup.spool_file("cid-spooled", "eth0");
    assert!(spool.exists());
    let del = setup.conf("0.3.0", json!({"timeoutMs": 200})).to_string();
    podid(
        &attachment_env("DEL", "cid-spooled", &ns.path, K8S_ARGS),
        &del,
    )
    .assert_ok();
    assert!(!spool.exists());
    assert_eq!(ns.podid_table(), None);
}

#[test]
fn del_still_fails_on_unusable_input() {
    let setup = Setup::new();
    let env = attachment_env("DEL", "c", "", "");
    assert_eq!(podid(&env, "{").code(), 6);
    assert_eq!(
        podid(&env, r#"{"cniVersion":"0.2.0","name":"n"}"#).code(),
        1
    );
    let stdin = setup.conf("0.3.0", json!({})).to_string();
    assert_eq!(podid(&[("CNI_COMMAND", "DEL")], &stdin).code(), 4);
}

#[test]
fn del_gives_a_slow_tokend_at_most_a_second() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let tokend = setup.tokend(2579);
    tokend.answer_all(200, "{}", Duration::from_secs(5));
    let ns = Netns::new();
    let stdin = setup.conf("0.4.0", json!({"timeoutMs": 5000})).to_string();
    let started = Instant::now();
    let run = podid(
        &attachment_env("DEL", "cid-slow", &ns.path, K8S_ARGS),
        &stdin,
    );
    assert_eq!(run.assert_ok().stdout, "");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        setup.log().contains("no complete answer in time"),
        "{}",
        setup.log()
    );
}
