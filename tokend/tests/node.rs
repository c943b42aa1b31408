//! Root integration tests: the real podid-tokend in a throwaway node netns, pods in netns of
//! their own, the API over the unix socket and IMDS from inside the pods.

mod support;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use support::{Netns, Node, PORT, eventually, record, root};

const TOKEN: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F";
const METADATA: &[(&str, &str)] = &[("Metadata", "true")];

#[test]
fn imds_answers_on_the_pod_listener() {
    if !root() {
        return;
    }
    let node = Node::new();
    let tokend = node.start(&["--instance-metadata", "deny"]);
    let pod = Netns::new();
    let put = tokend.put(&record("c1", "eth0", &pod));
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.json()["listenerPort"], PORT);

    let probe = pod
        .get(PORT, "/metadata/identity/oauth2/token", &[])
        .unwrap();
    assert_eq!(probe.status, 400);
    assert_eq!(
        probe.header("content-type").as_deref(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        probe.json()["error_description"],
        "Required metadata header not specified"
    );
    assert!(!probe.body.contains("Identity not found"));

    let token = pod.get(PORT, TOKEN, METADATA).unwrap();
    assert_eq!(token.status, 400);
    assert_eq!(token.json()["error"], "invalid_request");
    assert_eq!(token.json()["error_description"], "Identity not found");

    let capitalised = pod.get(PORT, TOKEN, &[("Metadata", "True")]).unwrap();
    assert_eq!(
        capitalised.json()["error_description"],
        "Identity not found"
    );
    let double_slash = pod
        .get(
            PORT,
            &format!("/{}", TOKEN.replacen("/metadata", "/Metadata", 1)),
            METADATA,
        )
        .unwrap();
    assert_eq!(
        double_slash.json()["error_description"],
        "Identity not found"
    );

    let platform = pod
        .get(
            PORT,
            "/metadata/identity/getplatformmetadata?cred-api-version=2.0",
            &[],
        )
        .unwrap();
    assert_eq!(platform.status, 404);
    assert_eq!(platform.json()["error"], "not_found");

    let post = pod.request(PORT, "POST", TOKEN, &[]).unwrap();
    assert_eq!(post.status, 405);
    assert_eq!(post.json()["error"], "method_not_allowed");

    let forwarded = pod
        .get(
            PORT,
            TOKEN,
            &[("Metadata", "true"), ("X-Forwarded-For", "10.0.0.1")],
        )
        .unwrap();
    assert_eq!(forwarded.status, 400);
    let instance = pod
        .get(PORT, "/metadata/instance?api-version=2021-02-01", METADATA)
        .unwrap();
    assert_eq!(instance.status, 404);

    let state = tokend.pod("c1", "eth0").unwrap();
    assert_eq!(state["requests"], 8);
    assert_eq!(state["listenerBound"], true);
    assert_eq!(state["podName"], "pod-c1");
    assert_eq!(
        node.metric("podid_tokend_imds_requests_total{code_class=\"4xx\"}"),
        8.0
    );
    assert_eq!(node.metric("podid_tokend_listeners"), 1.0);
    assert_eq!(node.metric("podid_tokend_pods"), 1.0);
}

#[test]
fn requests_are_counted_per_pod() {
    if !root() {
        return;
    }
    let node = Node::new();
    let tokend = node.start(&[]);
    let (a, b) = (Netns::new(), Netns::new());
    assert_eq!(tokend.put(&record("a1", "eth0", &a)).status, 200);
    assert_eq!(tokend.put(&record("b1", "eth0", &b)).status, 200);
    for _ in 0..3 {
        a.get(PORT, TOKEN, METADATA).unwrap();
    }
    b.get(PORT, TOKEN, METADATA).unwrap();
    assert_eq!(tokend.pod("a1", "eth0").unwrap()["requests"], 3);
    assert_eq!(tokend.pod("b1", "eth0").unwrap()["requests"], 1);
    let pods = tokend.pods();
    let keys: Vec<_> = pods
        .iter()
        .map(|p| p["containerId"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["a1", "b1"], "sorted by key");
}

#[test]
fn put_is_idempotent_and_delete_closes_the_listener() {
    if !root() {
        return;
    }
    let node = Node::new();
    let tokend = node.start(&[]);
    let pod = Netns::new();
    let r = record("c2", "eth0", &pod);
    assert_eq!(tokend.put(&r).json()["listenerPort"], PORT);
    assert_eq!(tokend.put(&r).json()["listenerPort"], PORT);
    assert_eq!(tokend.pods().len(), 1);

    let stored: podid_api::BoundPod =
        serde_json::from_slice(&fs::read(node.pods_file("c2", "eth0")).unwrap()).unwrap();
    assert_eq!(stored.record, r);
    assert_eq!(stored.listener_port, PORT);
    let mode = fs::metadata(node.pods_file("c2", "eth0"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // An idle keep-alive connection goes with the listener.
    let mut idle = pod.connect(PORT).unwrap();
    let deleted = tokend.delete("c2", "eth0");
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json(), serde_json::json!({}));
    assert!(
        pod.refuses(PORT),
        "the listener is closed once DELETE answered"
    );
    let mut buf = [0u8; 8];
    assert!(matches!(idle.read(&mut buf), Ok(0) | Err(_)));
    assert!(!node.pods_file("c2", "eth0").exists());
    assert!(tokend.pod("c2", "eth0").is_none());
    let again = tokend.delete("c2", "eth0");
    assert_eq!(again.status, 404);
    assert!(again.json()["error"].as_str().unwrap().contains("c2/eth0"));
    assert_eq!(node.metric("podid_tokend_listeners"), 0.0);
}

#[test]
fn keys_of_one_netns_share_a_listener_until_the_last_delete() {
    if !root() {
        return;
    }
    let node = Node::new();
    let tokend = node.start(&[]);
    let pod = Netns::new();
    assert_eq!(
        tokend.put(&record("c3", "eth0", &pod)).json()["listenerPort"],
        PORT
    );
    assert_eq!(
        tokend.put(&record("c3", "net1", &pod)).json()["listenerPort"],
        PORT
    );
    assert_eq!(node.metric("podid_tokend_listeners"), 1.0);
    pod.get(PORT, TOKEN, METADATA).unwrap();
    assert_eq!(tokend.pod("c3", "eth0").unwrap()["requests"], 1);
    assert_eq!(tokend.pod("c3", "net1").unwrap()["requests"], 1);

    assert_eq!(tokend.delete("c3", "eth0").status, 200);
    assert_eq!(
        pod.get(PORT, TOKEN, METADATA).unwrap().status,
        400,
        "still served"
    );
    assert_eq!(tokend.delete("c3", "net1").status, 200);
    assert!(pod.refuses(PORT));
}

#[test]
fn same_key_in_a_new_netns_replaces_the_listener() {
    if !root() {
        return;
    }
    let node = Node::new();
    let tokend = node.start(&[]);
    let (old, new) = (Netns::new(), Netns::new());
    assert_eq!(tokend.put(&record("c4", "eth0", &old)).status, 200);
    assert_eq!(tokend.put(&record("c4", "eth0", &new)).status, 200);
    assert!(old.refuses(PORT));
    assert_eq!(new.get(PORT, TOKEN, METADATA).unwrap().status, 400);
    let pods = tokend.pods();
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0]["netns"], new.path());
}

#[test]
fn bad_registrations_are_refused_with_precise_errors() {
    if !root() {
        return;
    }
    let node = Node::new();
    let tokend = node.start(&[]);
    let pod = Netns::new();
    let good = record("c5", "eth0", &pod);

    let mut proc_path = good.clone();
    proc_path.netns = format!("/proc/{}/ns/net", std::process::id());
    let r = tokend.put(&proc_path);
    assert_eq!(r.status, 404, "{}", r.body);
    let message = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        message.contains("/var/run/netns") && message.contains("/run/netns"),
        "{message}"
    );

    let mut missing = good.clone();
    missing.netns = "/run/netns/podid-td-does-not-exist".into();
    let r = tokend.put(&missing);
    assert_eq!(r.status, 404);
    assert!(r.body.contains("does not exist"), "{}", r.body);

    let mut other_inode = good.clone();
    other_inode.netns_inode += 1;
    let r = tokend.put(&other_inode);
    assert_eq!(r.status, 404);
    assert!(
        r.body.contains("now names another network namespace"),
        "{}",
        r.body
    );

    let mut bad_ip = good.clone();
    bad_ip.ips = vec!["10.0.0.1".into()];
    let r = tokend.put(&bad_ip);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("10.0.0.1"), "{}", r.body);

    let body = serde_json::to_string(&good).unwrap();
    let r = tokend
        .api("PUT", "/v1/pods/other/eth0", Some(&body))
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("other/eth0") && r.body.contains("c5/eth0"),
        "{}",
        r.body
    );
    let r = tokend
        .api("PUT", "/v1/pods/c5/eth0", Some("{not json"))
        .unwrap();
    assert_eq!(r.status, 400);
    let r = tokend.api("PUT", "/v1/pods/-c5/eth0", Some(&body)).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("-c5"), "{}", r.body);
    // Refused on the declared length, before a byte of the body is read.
    let r = tokend
        .api_raw("PUT /v1/pods/c5/eth0 HTTP/1.1\r\nHost: t\r\nContent-Length: 70000\r\n\r\n")
        .unwrap();
    assert_eq!(r.status, 413);
    assert!(r.body.contains("65536"), "{}", r.body);
    let r = tokend.api("GET", "/v2/anything", None).unwrap();
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string());
    let r = tokend.api("POST", "/v1/pods/c5/eth0", Some(&body)).unwrap();
    assert_eq!(r.status, 405);
    assert!(r.header("allow").is_some());
    let r = tokend.api("DELETE", "/v1/status", None).unwrap();
    assert_eq!(r.status, 405);

    assert!(tokend.pods().is_empty(), "nothing was registered");
    assert!(pod.refuses(PORT), "nothing was bound");
    assert_eq!(
        node.metric("podid_tokend_registrations_total{op=\"put\",result=\"rejected\"}"),
        5.0
    );
}

#[test]
fn status_health_and_files() {
    if !root() {
        return;
    }
    let node = Node::new();
    let tokend = node.start(&["--listener-port", "2590"]);
    let status = tokend.api("GET", "/v1/status", None).unwrap();
    assert_eq!(status.status, 200);
    assert_eq!(
        status.json(),
        serde_json::json!({"ready": true, "pods": 0, "listenerPort": 2590})
    );
    assert_eq!(node.health("/healthz").body, "ok");
    eventually("ready once the Kubernetes watches listed", || {
        node.health("/readyz").status == 200
    });
    assert_eq!(node.health("/nope").status, 404);
    let metrics = node.health("/metrics").body;
    for name in [
        "podid_tokend_pods",
        "podid_tokend_listeners",
        "podid_tokend_imds_requests_total{code_class=\"2xx\"}",
        "podid_tokend_registrations_total{op=\"adopt\",result=\"error\"}",
        "podid_tokend_records_dropped_total{reason=\"netns_changed\"}",
        "podid_tokend_imds_request_duration_seconds_bucket",
        "podid_tokend_token_cache_lookups_total{result=\"hit\"}",
        "podid_tokend_upstream_calls_total{type=\"2\"}",
        "podid_tokend_rate_limited_total{reason=\"rate\"}",
        "podid_tokend_waits_total{kind=\"assignment\",result=\"timeout\"}",
        "podid_tokend_kube_synced",
    ] {
        assert!(metrics.contains(name), "{name} missing in\n{metrics}");
    }
    assert_eq!(
        fs::read_to_string(node.state.join("listener-port")).unwrap(),
        "2590\n"
    );
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&node.state), 0o700);
    assert_eq!(mode(&node.state.join("pods")), 0o700);
    assert_eq!(mode(&node.state.join("pending")), 0o700);
    assert_eq!(mode(node.socket.parent().unwrap()), 0o700);
    assert_eq!(mode(&node.socket), 0o600);
    let pod = Netns::new();
    assert_eq!(
        tokend.put(&record("c6", "eth0", &pod)).json()["listenerPort"],
        2590
    );
}

#[test]
fn a_restart_rebuilds_listeners_and_drops_replaced_netns() {
    if !root() {
        return;
    }
    let node = Node::new();
    let (kept, replaced, gone) = (Netns::new(), Netns::new(), Netns::new());
    let mut first = node.start(&[]);
    for (cid, pod) in [("k1", &kept), ("r1", &replaced), ("g1", &gone)] {
        assert_eq!(first.put(&record(cid, "eth0", pod)).status, 200);
    }
    first.kill9();
    assert!(
        node.socket.exists(),
        "a crash leaves the socket file behind"
    );
    replaced.recreate();
    gone.delete();

    let second = node.start(&[]);
    assert_eq!(kept.get(PORT, TOKEN, METADATA).unwrap().status, 400);
    let pods = second.pods();
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0]["containerId"], "k1");
    assert_eq!(pods[0]["listenerBound"], true);
    assert!(replaced.refuses(PORT), "a re-created netns is never bound");
    assert!(!node.pods_file("r1", "eth0").exists());
    assert!(!node.pods_file("g1", "eth0").exists());
    assert!(node.pods_file("k1", "eth0").exists());
    assert_eq!(
        node.metric("podid_tokend_records_dropped_total{reason=\"netns_changed\"}"),
        1.0
    );
    assert_eq!(
        node.metric("podid_tokend_records_dropped_total{reason=\"netns_gone\"}"),
        1.0
    );
}

#[test]
fn a_restart_keeps_the_recorded_port_and_sigterm_keeps_everything() {
    if !root() {
        return;
    }
    let node = Node::new();
    let pod = Netns::new();
    let mut first = node.start(&["--listener-port", "2591"]);
    assert_eq!(
        first.put(&record("p1", "eth0", &pod)).json()["listenerPort"],
        2591
    );
    let status = first.terminate();
    assert!(
        status.success(),
        "SIGTERM exits 0: {status}\n{}",
        first.log()
    );
    assert!(node.pods_file("p1", "eth0").exists(), "records are kept");
    assert!(pod.refuses(2591));

    // A changed --listener-port applies to new pods only.
    let second = node.start(&["--listener-port", "2592"]);
    assert_eq!(pod.get(2591, TOKEN, METADATA).unwrap().status, 400);
    assert_eq!(second.pod("p1", "eth0").unwrap()["listenerPort"], 2591);
    let other = Netns::new();
    assert_eq!(
        second.put(&record("p2", "eth0", &other)).json()["listenerPort"],
        2592
    );
    // A new key in the old pod's netns shares its listener, whatever the flag says now.
    assert_eq!(
        second.put(&record("p1", "net1", &pod)).json()["listenerPort"],
        2591
    );
}

#[test]
fn netns_gone_or_replaced_while_running_is_dropped() {
    if !root() {
        return;
    }
    let node = Node::new();
    let tokend = node.start(&["--netns-check-interval", "1"]);
    let (gone, replaced) = (Netns::new(), Netns::new());
    assert_eq!(tokend.put(&record("n1", "eth0", &gone)).status, 200);
    assert_eq!(tokend.put(&record("n2", "eth0", &replaced)).status, 200);
    gone.delete();
    replaced.recreate();
    eventually("both records dropped", || tokend.pods().is_empty());
    assert!(replaced.refuses(PORT));
    assert!(!node.pods_file("n1", "eth0").exists());
    assert!(!node.pods_file("n2", "eth0").exists());
    assert_eq!(node.metric("podid_tokend_listeners"), 0.0);
}

#[test]
fn pending_records_are_adopted_at_start_on_their_own_port() {
    if !root() {
        return;
    }
    let node = Node::new();
    let (pod, gone) = (Netns::new(), Netns::new());
    node.spool(&record("s1", "eth0", &pod), 2601);
    node.spool(&record("s2", "eth0", &gone), 2601);
    gone.delete();
    node.spool(&record("z1", "eth0", &pod), 0);
    fs::write(node.pending_file("bad", "eth0"), b"{\"containerId\":").unwrap();
    fs::write(node.state.join("pending/.podid-tmp-1-2-3"), b"partial").unwrap();
    fs::create_dir_all(node.state.join("pods")).unwrap();
    fs::write(node.pods_file("broken", "eth0"), b"[]").unwrap();

    let tokend = node.start(&["--spool-rescan-interval", "1"]);
    assert_eq!(pod.get(2601, TOKEN, METADATA).unwrap().status, 400);
    let state = tokend.pod("s1", "eth0").unwrap();
    assert_eq!(state["listenerPort"], 2601);
    assert_eq!(state["listenerBound"], true);
    assert!(!node.pending_file("s1", "eth0").exists());
    assert!(
        !node.pending_file("s2", "eth0").exists(),
        "a gone netns's record is deleted"
    );
    assert!(node.pods_file("s1", "eth0").exists());
    assert!(tokend.pod("s2", "eth0").is_none());
    assert!(
        node.state.join("pending/.podid-tmp-1-2-3").exists(),
        "temp files are not ours"
    );
    // Records that parse but cannot be served, and tokend's own unparsable files, are kept
    // aside at once.
    assert!(node.state.join("pending/z1-eth0.json.invalid").exists());
    assert_eq!(
        fs::read(node.state.join("pods/broken-eth0.json.invalid")).unwrap(),
        b"[]"
    );
    assert!(!node.pods_file("broken", "eth0").exists());
    // A young unparsable file may still be being written; once old, it is set aside.
    let invalid = node.state.join("pending/bad-eth0.json.invalid");
    eventually("the unparsable record set aside", || invalid.exists());
    assert_eq!(fs::read(&invalid).unwrap(), b"{\"containerId\":");
    assert_eq!(
        node.metric("podid_tokend_records_dropped_total{reason=\"invalid\"}"),
        3.0
    );
}

#[test]
fn pending_records_are_adopted_while_running() {
    if !root() {
        return;
    }
    let node = Node::new();
    // A long rescan interval: only the inotify watch can be this quick.
    let tokend = node.start(&["--spool-rescan-interval", "3600"]);
    let (pod, known) = (Netns::new(), Netns::new());
    node.spool(&record("w1", "eth0", &pod), PORT);
    eventually("the spooled pod registered", || {
        tokend.pod("w1", "eth0").is_some()
    });
    assert_eq!(pod.get(PORT, TOKEN, METADATA).unwrap().status, 400);
    assert!(!node.pending_file("w1", "eth0").exists());
    assert!(node.pods_file("w1", "eth0").exists());

    // A record tokend already has: the spooled copy just goes away.
    assert_eq!(tokend.put(&record("w2", "eth0", &known)).status, 200);
    node.spool(&record("w2", "eth0", &known), PORT);
    eventually("the duplicate spool file removed", || {
        !node.pending_file("w2", "eth0").exists()
    });
    assert_eq!(tokend.pods().len(), 2);
    assert_eq!(node.metric("podid_tokend_listeners"), 2.0);
    assert_eq!(
        node.metric("podid_tokend_registrations_total{op=\"adopt\",result=\"ok\"}"),
        2.0
    );
}

#[test]
fn a_delete_removes_a_spooled_record_too() {
    if !root() {
        return;
    }
    let node = Node::new();
    let tokend = node.start(&["--spool-rescan-interval", "3600"]);
    // A spool file that does not parse yet is left for its writer for a grace period; a
    // DELETE of its key in that window removes it and answers 200.
    fs::write(node.pending_file("d1", "eth0"), b"").unwrap();
    let deleted = tokend.delete("d1", "eth0");
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert!(!node.pending_file("d1", "eth0").exists());
    assert_eq!(tokend.delete("d1", "eth0").status, 404);
}

#[test]
fn a_pod_that_took_the_port_is_retried_not_dropped() {
    if !root() {
        return;
    }
    let node = Node::new();
    let pod = Netns::new();
    let r = record("t1", "eth0", &pod);

    let mut first = node.start(&[]);
    let squatter = pod.occupy(PORT);
    let refused = first.put(&r);
    assert_eq!(refused.status, 500, "{}", refused.body);
    assert!(refused.body.contains("127.0.0.1:2579"), "{}", refused.body);
    drop(squatter);
    assert_eq!(first.put(&r).status, 200);
    first.kill9();

    // The pod's own process takes the port while tokend is down.
    let squatter = pod.occupy(PORT);
    let second = node.start(&[]);
    let state = second.pod("t1", "eth0").unwrap();
    assert_eq!(state["listenerBound"], false, "registered, not bound");
    drop(squatter);
    eventually("the listener bound on retry", || {
        second.pod("t1", "eth0").unwrap()["listenerBound"] == true
    });
    assert_eq!(pod.get(PORT, TOKEN, METADATA).unwrap().status, 400);
}

#[test]
fn stale_socket_files_are_replaced_but_other_files_are_not() {
    if !root() {
        return;
    }
    let node = Node::new();
    fs::create_dir_all(node.socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&node.socket).unwrap());
    assert!(node.socket.exists());
    let mut tokend = node.start(&[]);
    assert_eq!(tokend.terminate().code(), Some(0));

    fs::remove_file(&node.socket).unwrap();
    fs::write(&node.socket, b"not a socket").unwrap();
    let mut refused = node.spawn(&[]);
    let status = refused.wait_exit();
    assert!(!status.success());
    let log = refused.log();
    assert!(
        log.contains("not a socket") && log.contains("--socket"),
        "{log}"
    );
    assert_eq!(fs::read(&node.socket).unwrap(), b"not a socket");
}

#[test]
fn a_second_tokend_on_the_same_state_dir_is_refused() {
    if !root() {
        return;
    }
    let node = Node::new();
    let first = node.start(&[]);
    let other_socket = node.dir.path().join("other.sock");
    let mut second = node.spawn_with(&[
        "--socket".into(),
        other_socket.display().to_string(),
        "--state-dir".into(),
        node.state.display().to_string(),
        "--health-addr".into(),
        "127.0.0.1:2581".into(),
    ]);
    let status = second.wait_exit();
    assert!(!status.success());
    let log = second.log();
    assert!(log.contains("another podid-tokend"), "{log}");
    assert!(!other_socket.exists());
    assert_eq!(first.api("GET", "/v1/status", None).unwrap().status, 200);
}

#[test]
fn invalid_flags_stop_the_program_naming_flag_and_value() {
    let out = Command::new(env!("CARGO_BIN_EXE_podid-tokend"))
        .args(["--listener-port", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--listener-port") && stderr.contains("'0'"),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_podid-tokend"))
        .env("PODID_SPOOL_RESCAN_INTERVAL", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--spool-rescan-interval") && stderr.contains("'0'"),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_podid-tokend"))
        .env("PODID_LOG", "info,podid=loud")
        .args(["--node-name", "node-1"])
        .args(["--state-dir", "/nonexistent-podid-test/never-created"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PODID_LOG"), "{stderr}");
}
