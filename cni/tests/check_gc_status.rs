//! CHECK, GC and STATUS (CNI 0.4 and 1.1 commands) against the fake tokend.

mod common;

use std::fs;
use std::time::Duration;

use common::{
    K8S_ARGS, Netns, Setup, attachment_env, azure_vnet_result, is_root, podid,
    stdin_with_prev_result,
};
use serde_json::{Value, json};

#[test]
fn check_passes_after_add_and_names_what_was_tampered_with() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let tokend = setup.tokend(2610);
    let ns = Netns::new();
    let stdin = stdin_with_prev_result(&setup.conf("1.0.0", json!({})), &azure_vnet_result());
    podid(
        &attachment_env("ADD", "cid-check", &ns.path, K8S_ARGS),
        &stdin,
    )
    .assert_ok();
    let check = attachment_env("CHECK", "cid-check", &ns.path, K8S_ARGS);
    assert_eq!(podid(&check, &stdin).assert_ok().stdout, "");

    // A second rule, e.g. one a pod with NET_ADMIN added.
    ns.nft("add rule ip podid output tcp dport 81 redirect to :9");
    let error = podid(&check, &stdin).error();
    assert_eq!(error["code"], 104);
    assert!(
        error["msg"].as_str().unwrap().contains("2 rules"),
        "{error}"
    );

    // The rule now points elsewhere.
    ns.nft("flush chain ip podid output");
    ns.nft("add rule ip podid output ip daddr 169.254.169.254 tcp dport 80 redirect to :2999");
    let error = podid(&check, &stdin).error();
    assert_eq!(error["code"], 104);
    let msg = error["msg"].as_str().unwrap();
    assert!(msg.contains(":2999") && msg.contains(":2610"), "{msg}");

    ns.nft("delete table ip podid");
    let error = podid(&check, &stdin).error();
    assert_eq!(error["code"], 104);
    assert!(
        error["msg"].as_str().unwrap().contains("does not exist"),
        "{error}"
    );

    // Re-created by someone else, without podid's tag.
    ns.nft("add table ip podid");
    let error = podid(&check, &stdin).error();
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains("no container id comment"),
        "{error}"
    );

    tokend.state.lock().unwrap().pods.clear();
    let error = podid(&check, &stdin).error();
    assert_eq!(error["code"], 103);

    let no_prev = setup.conf("1.0.0", json!({})).to_string();
    assert_eq!(podid(&check, &no_prev).code(), 7);
}

#[test]
fn check_without_tokend_is_code_11() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let ns = Netns::new();
    let stdin = stdin_with_prev_result(
        &setup.conf("0.4.0", json!({"timeoutMs": 200})),
        &azure_vnet_result(),
    );
    let error = podid(&attachment_env("CHECK", "cid", &ns.path, ""), &stdin).error();
    assert_eq!(error["code"], 11);
    assert_eq!(error["cniVersion"], "0.4.0");
}

#[test]
fn status_is_strict_only_when_no_pod_could_start_without_tokend() {
    let setup = Setup::new();
    let env = [("CNI_COMMAND", "STATUS")];
    let strict = setup
        .conf("1.1.0", json!({"failOpenNamespaces": [], "timeoutMs": 200}))
        .to_string();
    let lenient = setup.conf("1.1.0", json!({"timeoutMs": 200})).to_string();
    let ignore = setup
        .conf(
            "1.1.0",
            json!({"failurePolicy": "Ignore", "failOpenNamespaces": [], "timeoutMs": 200}),
        )
        .to_string();

    let error = podid(&env, &strict).error();
    assert_eq!(error["code"], 50);
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .starts_with("podid-tokend is not ready"),
        "{error}"
    );
    assert_eq!(podid(&env, &lenient).assert_ok().stdout, "");
    assert_eq!(podid(&env, &ignore).assert_ok().stdout, "");

    let tokend = setup.tokend(2579);
    assert_eq!(podid(&env, &strict).assert_ok().stdout, "");
    tokend.state.lock().unwrap().ready = false;
    assert_eq!(podid(&env, &strict).code(), 50);
    assert_eq!(podid(&env, &lenient).assert_ok().stdout, "");
    tokend.answer_all(
        200,
        r#"{"ready":true,"pods":0,"listenerPort":2579}"#,
        Duration::from_secs(2),
    );
    assert_eq!(podid(&env, &strict).code(), 50);
}

fn record(container_id: &str, ifname: &str, network: Option<&str>) -> Value {
    let mut record = json!({
        "containerId": container_id,
        "ifname": ifname,
        "netns": format!("/run/netns/{container_id}"),
        "netnsInode": 1,
        "netnsDev": 2,
        "ips": [],
    });
    if let Some(network) = network {
        record["network"] = network.into();
    }
    record
}

#[test]
fn gc_collects_only_stale_attachments_of_its_network() {
    let setup = Setup::new();
    let tokend = setup.tokend(2579);
    tokend.insert(record("live", "eth0", Some("azure")));
    tokend.insert(record("live", "net1", Some("azure")));
    tokend.insert(record("gone", "eth0", Some("azure")));
    tokend.insert(record("legacy", "eth0", None));
    tokend.insert(record("other", "eth0", Some("multus-net")));

    let pending = setup.state_dir.join("pending");
    fs::create_dir_all(&pending).unwrap();
    for (name, content) in [
        ("live-eth0.json", record("live", "eth0", Some("azure"))),
        ("gone2-eth0.json", record("gone2", "eth0", Some("azure"))),
        (
            "other2-eth0.json",
            record("other2", "eth0", Some("multus-net")),
        ),
    ] {
        let mut bound = content;
        bound["listenerPort"] = 2579.into();
        fs::write(pending.join(name), bound.to_string()).unwrap();
    }
    fs::write(pending.join("garbage.json"), "{").unwrap();

    let stdin = setup
        .conf(
            "1.1.0",
            json!({
                "cni.dev/valid-attachments": [{"containerID": "live", "ifname": "eth0"}],
                "cni.dev/attachments": [{"containerID": "live", "ifname": "net1"}],
            }),
        )
        .to_string();
    let run = podid(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/nonexistent")],
        &stdin,
    );
    assert_eq!(run.assert_ok().stdout, "");

    let left: Vec<(String, String)> = tokend.state.lock().unwrap().pods.keys().cloned().collect();
    let expected: Vec<(String, String)> = [("live", "eth0"), ("live", "net1"), ("other", "eth0")]
        .iter()
        .map(|(c, i)| ((*c).to_owned(), (*i).to_owned()))
        .collect();
    assert_eq!(left, expected);
    let mut files: Vec<String> = fs::read_dir(&pending)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["garbage.json", "live-eth0.json", "other2-eth0.json"]
    );
}

#[test]
fn gc_without_tokend_cleans_the_spool_and_reports_code_11() {
    let setup = Setup::new();
    let pending = setup.state_dir.join("pending");
    fs::create_dir_all(&pending).unwrap();
    let mut stale = record("gone", "eth0", Some("azure"));
    stale["listenerPort"] = 2579.into();
    fs::write(pending.join("gone-eth0.json"), stale.to_string()).unwrap();
    let stdin = setup
        .conf(
            "1.1.0",
            json!({"cni.dev/valid-attachments": null, "timeoutMs": 200}),
        )
        .to_string();
    let error = podid(&[("CNI_COMMAND", "GC")], &stdin).error();
    assert_eq!(error["code"], 11);
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains("removed stale spool files"),
        "{error}"
    );
    assert!(!pending.join("gone-eth0.json").exists());
}

#[test]
fn gc_rejects_malformed_attachments() {
    let setup = Setup::new();
    for extra in [
        json!({"cni.dev/valid-attachments": [{"containerID": "a"}]}),
        json!({"cni.dev/valid-attachments": "a"}),
        json!({}),
    ] {
        let stdin = setup.conf("1.1.0", extra.clone()).to_string();
        let error = podid(&[("CNI_COMMAND", "GC")], &stdin).error();
        assert_eq!(error["code"], 7, "{extra}: {error}");
        assert!(
            error["msg"].as_str().unwrap().contains("cni.dev/"),
            "{error}"
        );
    }
}
