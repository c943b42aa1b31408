//! ADD against a real network namespace and a fake tokend; nft is the oracle.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    K8S_ARGS, Netns, Setup, attachment_env, azure_vnet_result, expected_table, fixture,
    host_has_podid_table, is_root, podid, stdin_with_prev_result,
};
use serde_json::{Value, json};

#[test]
fn add_registers_installs_the_redirect_and_passes_the_result_through() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let tokend = setup.tokend(2600);
    let ns = Netns::new();
    assert!(!ns.lo_is_up(), "a fresh netns has lo down");
    let prev = azure_vnet_result();
    let stdin = stdin_with_prev_result(&setup.conf("0.3.0", json!({})), &prev);

    let run = podid(
        &attachment_env("ADD", "cid-add-1", &ns.path, K8S_ARGS),
        &stdin,
    );
    run.assert_ok();
    assert_eq!(run.stdout, prev, "prevResult is printed byte for byte");
    assert_eq!(
        ns.podid_table().as_deref(),
        Some(expected_table("cid-add-1", "169.254.169.254", 2600).as_str())
    );
    assert!(ns.lo_is_up());
    assert!(!host_has_podid_table());

    let requests = tokend.requests();
    assert_eq!(requests.len(), 1);
    let (method, path, body) = &requests[0];
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("PUT", "/v1/pods/cid-add-1/eth0")
    );
    let record: Value = serde_json::from_str(body).unwrap();
    let meta = fs::metadata(&ns.path).unwrap();
    assert_eq!(
        record,
        json!({
            "containerId": "cid-add-1",
            "ifname": "eth0",
            "netns": ns.path,
            "netnsInode": meta.ino(),
            "netnsDev": meta.dev(),
            "podNamespace": "rgapi",
            "podName": "api-0",
            "podUid": "5f0c2a6e",
            "ips": ["10.224.0.42/16"],
            "network": "azure",
        })
    );
    let log = setup.log();
    assert!(
        log.contains("command=ADD containerId=cid-add-1 ifname=eth0 pod=rgapi/api-0"),
        "{log}"
    );
    assert!(log.contains("outcome=ok duration_ms="), "{log}");
}

#[test]
fn add_twice_leaves_one_table_and_one_rule() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let _tokend = setup.tokend(2579);
    let ns = Netns::new();
    let stdin = stdin_with_prev_result(&setup.conf("0.3.0", json!({})), &azure_vnet_result());
    for _ in 0..2 {
        podid(&attachment_env("ADD", "cid-twice", &ns.path, ""), &stdin).assert_ok();
    }
    let ruleset = ns.ruleset();
    let items = ruleset["nftables"].as_array().unwrap();
    let count = |kind: &str| items.iter().filter(|i| i.get(kind).is_some()).count();
    assert_eq!(
        (count("table"), count("chain"), count("rule")),
        (1, 1, 1),
        "{ruleset}"
    );
    assert!(!host_has_podid_table());
    let rule = items.iter().find_map(|i| i.get("rule")).unwrap();
    assert_eq!(
        rule["expr"].as_array().unwrap().last().unwrap(),
        &json!({"redirect": {"port": 2579}})
    );
}

#[test]
fn add_without_pod_args_still_works() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let tokend = setup.tokend(2579);
    let ns = Netns::new();
    let stdin =
        stdin_with_prev_result(&setup.conf("1.0.0", json!({})), r#"{"cniVersion":"1.0.0"}"#);
    let env: Vec<_> = attachment_env("ADD", "podman1", &ns.path, "")
        .into_iter()
        .filter(|(k, _)| *k != "CNI_ARGS")
        .collect();
    podid(&env, &stdin).assert_ok();
    let record: Value = serde_json::from_str(&tokend.requests()[0].2).unwrap();
    assert!(record.get("podName").is_none() && record.get("podNamespace").is_none());
    assert_eq!(record["ips"], json!([]));
    assert!(ns.podid_table().is_some());
}

#[test]
fn result_versions() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let _tokend = setup.tokend(2579);
    let ns = Netns::new();
    let env = attachment_env("ADD", "cid-versions", &ns.path, K8S_ARGS);

    // A 1.1.0 result with fields podid does not know comes back byte for byte.
    let future = fixture("result-1.1.0.json");
    let stdin = stdin_with_prev_result(&setup.conf("1.1.0", json!({})), &future);
    assert_eq!(podid(&env, &stdin).assert_ok().stdout, future);

    // A real bridge 0.3.0 result under a 0.4.0 request: only cniVersion changes.
    let bridge = fixture("bridge-0.3.0.json");
    let stdin = stdin_with_prev_result(&setup.conf("0.4.0", json!({})), &bridge);
    let run = podid(&env, &stdin);
    let got: Value = serde_json::from_str(&run.assert_ok().stdout).unwrap();
    let mut expected: Value = serde_json::from_str(&bridge).unwrap();
    expected["cniVersion"] = "0.4.0".into();
    assert_eq!(got, expected);
}

#[test]
fn the_redirect_reaches_the_listener() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let _tokend = setup.tokend(2650);
    let ns = Netns::new();
    ns.add_default_route();
    let stdin = stdin_with_prev_result(&setup.conf("0.3.0", json!({})), &azure_vnet_result());
    podid(
        &attachment_env("ADD", "cid-e2e", &ns.path, K8S_ARGS),
        &stdin,
    )
    .assert_ok();

    let reply = ns.run(|| {
        let listener = TcpListener::bind("127.0.0.1:2650").unwrap();
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(b"from the pod listener").unwrap();
        });
        let imds: SocketAddr = "169.254.169.254:80".parse().unwrap();
        let mut conn = TcpStream::connect_timeout(&imds, Duration::from_secs(2)).unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        server.join().unwrap();
        reply
    });
    assert_eq!(reply, "from the pod listener");
}

#[test]
fn fail_policy_without_tokend_is_code_11() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let ns = Netns::new();
    let stdin = stdin_with_prev_result(
        &setup.conf("0.3.0", json!({"timeoutMs": 300})),
        &azure_vnet_result(),
    );
    let error = podid(
        &attachment_env("ADD", "cid-fail", &ns.path, K8S_ARGS),
        &stdin,
    )
    .error();
    assert_eq!(error["code"], 11);
    let msg = error["msg"].as_str().unwrap();
    assert!(
        msg.contains(&setup.socket.display().to_string()) && msg.contains("300 ms"),
        "{msg}"
    );
    assert_eq!(ns.podid_table(), None);
    assert!(!setup.spool_file("cid-fail", "eth0").exists());
}

#[test]
fn slow_or_failing_tokend_is_code_11_within_the_budget() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let tokend = setup.tokend(2579);
    let ns = Netns::new();
    let stdin = stdin_with_prev_result(
        &setup.conf("0.3.0", json!({"timeoutMs": 300})),
        &azure_vnet_result(),
    );
    let env = attachment_env("ADD", "cid-slow", &ns.path, K8S_ARGS);

    tokend.answer_all(200, r#"{"listenerPort":2579}"#, Duration::from_secs(3));
    let started = Instant::now();
    assert_eq!(podid(&env, &stdin).code(), 11);
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "{:?}",
        started.elapsed()
    );

    tokend.answer_all(503, r#"{"error":"starting up"}"#, Duration::ZERO);
    let error = podid(&env, &stdin).error();
    assert_eq!(error["code"], 11);
    assert!(
        error["msg"].as_str().unwrap().contains("starting up"),
        "{error}"
    );

    tokend.answer_all(200, "not json", Duration::ZERO);
    assert_eq!(podid(&env, &stdin).code(), 11);
    assert_eq!(ns.podid_table(), None);
}

#[test]
fn ignore_policy_spools_and_redirects_to_the_announced_port() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let ns = Netns::new();
    let stdin = stdin_with_prev_result(
        &setup.conf(
            "0.3.0",
            json!({"failurePolicy": "Ignore", "failOpenNamespaces": [], "timeoutMs": 200}),
        ),
        &azure_vnet_result(),
    );
    let env = attachment_env("ADD", "cid-ignore", &ns.path, K8S_ARGS);

    // No announcement: the default port.
    assert_eq!(podid(&env, &stdin).assert_ok().stdout, azure_vnet_result());
    let spooled: Value =
        serde_json::from_slice(&fs::read(setup.spool_file("cid-ignore", "eth0")).unwrap()).unwrap();
    assert_eq!(spooled["listenerPort"], 2579);
    assert_eq!(spooled["podName"], "api-0");
    assert_eq!(spooled["network"], "azure");
    assert_eq!(
        ns.podid_table().as_deref(),
        Some(expected_table("cid-ignore", "169.254.169.254", 2579).as_str())
    );
    let mode = fs::metadata(setup.state_dir.join("pending"))
        .unwrap()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);

    fs::write(setup.state_dir.join("listener-port"), "3100\n").unwrap();
    podid(&env, &stdin).assert_ok();
    let spooled: Value =
        serde_json::from_slice(&fs::read(setup.spool_file("cid-ignore", "eth0")).unwrap()).unwrap();
    assert_eq!(spooled["listenerPort"], 3100);
    assert_eq!(
        ns.podid_table().as_deref(),
        Some(expected_table("cid-ignore", "169.254.169.254", 3100).as_str())
    );
    assert!(setup.log().contains("pod record spooled"));
}

#[test]
fn fail_open_namespaces_spool_only_their_pods() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let ns = Netns::new();
    let stdin = stdin_with_prev_result(
        &setup.conf("0.3.0", json!({"timeoutMs": 200})),
        &azure_vnet_result(),
    );
    let system = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-0";
    podid(
        &attachment_env("ADD", "cid-system", &ns.path, system),
        &stdin,
    )
    .assert_ok();
    assert!(setup.spool_file("cid-system", "eth0").exists());
    assert!(ns.podid_table().is_some());

    let other = Netns::new();
    let error = podid(
        &attachment_env("ADD", "cid-user", &other.path, K8S_ARGS),
        &stdin,
    )
    .error();
    assert_eq!(error["code"], 11);
    assert!(!setup.spool_file("cid-user", "eth0").exists());
}

#[test]
fn tokend_rejection_is_code_100_whatever_the_policy() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let tokend = setup.tokend(2579);
    let ns = Netns::new();
    let stdin = stdin_with_prev_result(
        &setup.conf("0.3.0", json!({"failurePolicy": "Ignore"})),
        &azure_vnet_result(),
    );
    for (status, message) in [
        (400, "podName \"a\\nb\" is invalid"),
        (
            404,
            "netns /proc/1/ns/net is not supported: only named namespaces are",
        ),
    ] {
        tokend.answer_all(
            status,
            &json!({ "error": message }).to_string(),
            Duration::ZERO,
        );
        let error = podid(
            &attachment_env("ADD", "cid-rejected", &ns.path, K8S_ARGS),
            &stdin,
        )
        .error();
        assert_eq!(error["code"], 100);
        assert!(error["msg"].as_str().unwrap().contains(message), "{error}");
        assert!(
            error["details"]
                .as_str()
                .unwrap()
                .contains(&status.to_string()),
            "{error}"
        );
        assert_eq!(ns.podid_table(), None);
        assert!(!setup.spool_file("cid-rejected", "eth0").exists());
    }
}

#[test]
fn unusable_netns_is_code_101() {
    let setup = Setup::new();
    let stdin = stdin_with_prev_result(&setup.conf("0.3.0", json!({})), &azure_vnet_result());
    let error = podid(
        &attachment_env("ADD", "cid-nons", "/run/netns/podid-cni-does-not-exist", ""),
        &stdin,
    )
    .error();
    assert_eq!(error["code"], 101);
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains("/run/netns/podid-cni-does-not-exist")
    );
}

#[test]
fn concurrent_adds_in_many_pods() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let _tokend = setup.tokend(2700);
    let namespaces: Vec<Netns> = (0..8).map(|_| Netns::new()).collect();
    let stdin = stdin_with_prev_result(&setup.conf("0.3.0", json!({})), &azure_vnet_result());
    thread::scope(|s| {
        for (i, ns) in namespaces.iter().enumerate() {
            let stdin = &stdin;
            s.spawn(move || {
                let cid = format!("cid-par-{i}");
                podid(&attachment_env("ADD", &cid, &ns.path, K8S_ARGS), stdin).assert_ok();
            });
        }
    });
    for (i, ns) in namespaces.iter().enumerate() {
        assert_eq!(
            ns.podid_table().as_deref(),
            Some(expected_table(&format!("cid-par-{i}"), "169.254.169.254", 2700).as_str())
        );
    }
    assert!(!host_has_podid_table());
    let log = setup.log();
    let done = log
        .lines()
        .filter(|l| l.contains("msg=done outcome=ok"))
        .count();
    assert_eq!(done, 8, "{log}");
    assert!(
        log.lines()
            .all(|l| l.starts_with("20") && l.contains(" command=ADD ")),
        "{log}"
    );
}

#[test]
fn metadata_address_is_configurable() {
    if !is_root() {
        return;
    }
    let setup = Setup::new();
    let _tokend = setup.tokend(2579);
    let ns = Netns::new();
    let stdin = stdin_with_prev_result(
        &setup.conf("0.3.0", json!({"metadataAddress": "10.20.30.40"})),
        &azure_vnet_result(),
    );
    podid(&attachment_env("ADD", "cid-addr", &ns.path, ""), &stdin).assert_ok();
    assert_eq!(
        ns.podid_table().as_deref(),
        Some(expected_table("cid-addr", "10.20.30.40", 2579).as_str())
    );
}
