//! The node data path, for real: pod sandboxes created through a CNI chain of Debian's
//! `bridge` + `host-local` and our `podid`, with a real `podid-tokend`, each test on its own
//! simulated node (network namespace, temp dirs). Run as root.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use podid_tests::http::Request;
use podid_tests::netns::{self, Netns};
use podid_tests::node::{Node, PluginSettings, Pod, wait_for};
use podid_tests::runtime::{Attachment, ExecOutput, exec_in};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

/// Runs the node's `podid` binary directly, as a runtime would for one command.
fn invoke(node: &Node, command: &str, env: &[(&str, &str)], stdin: &[u8]) -> ExecOutput {
    let mut all = vec![
        ("CNI_COMMAND".to_string(), command.to_string()),
        (
            "CNI_PATH".to_string(),
            node.dir().join("bin").display().to_string(),
        ),
    ];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    exec_in(
        node.netns.path(),
        &node.dir().join("bin/podid"),
        &all,
        stdin,
    )
    .unwrap()
}

fn error_code(out: &ExecOutput) -> u64 {
    assert_ne!(
        out.status,
        0,
        "expected a failure, stdout {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "error is not JSON on stdout ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    err["code"].as_u64().expect("error JSON has a code")
}

/// The plugin's own config as the runtime would pass it, at `version`, with `extra` keys.
fn podid_config(node: &Node, version: &str, settings: &PluginSettings, extra: Value) -> Value {
    let mut config = node.podid_entry(settings);
    config["cniVersion"] = json!(version);
    config["name"] = json!("podid-test");
    for (k, v) in extra.as_object().into_iter().flatten() {
        config[k] = v.clone();
    }
    config
}

/// The `ip podid` table of a pod, `None` when it has none.
fn podid_table(pod: &Pod) -> Option<String> {
    let out = pod
        .netns
        .exec("nft", &["list", "table", "ip", "podid"])
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn listening_on(ns: Option<&Netns>, port: u16) -> bool {
    let filter = format!("sport = :{port}");
    let out = match ns {
        Some(ns) => ns.exec_ok("ss", &["-Hltn", &filter]).unwrap(),
        None => netns::run("ss", &["-Hltn", &filter]).unwrap(),
    };
    !out.trim().is_empty()
}

/// Connecting to the pod's own listener address from inside the pod.
fn pod_listener_refuses(pod: &Pod, port: u16) -> bool {
    pod.netns
        .run(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_err())
        .unwrap()
}

fn assert_identity_not_found(pod: &Pod) {
    let resp = pod.token_request().unwrap();
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert_eq!(
        resp.json().unwrap(),
        json!({"error": "invalid_request", "error_description": "Identity not found"})
    );
}

fn chain_serves_each_pod_on_its_own_listener(version: &str) {
    let node = Node::new("chain").unwrap();
    node.start_tokend().unwrap();
    let rt = node.chain(version);
    let a = node.pod("team-a", "api-0").unwrap();
    let b = node.pod("team-b", "web-0").unwrap();

    for pod in [&a, &b] {
        let outputs = rt.add(&pod.attachment).unwrap();
        assert_eq!(outputs.len(), 2);
        let bridge: Value = serde_json::from_slice(&outputs[0].stdout).unwrap();
        let podid: Value = serde_json::from_slice(&outputs[1].stdout).unwrap();
        assert_eq!(
            podid, bridge,
            "podid must pass bridge's result through unchanged"
        );
        assert_eq!(podid["cniVersion"], json!(version));

        let state = node
            .tokend_pod(pod.container_id())
            .unwrap()
            .expect("tokend knows the pod");
        assert!(state.listener_bound);
        assert_eq!(state.requests, 0);
        assert_eq!(state.bound.listener_port, node.listener_port);
        let ips: Vec<String> = bridge["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ip| ip["address"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(state.bound.record.ips, ips);
        assert_eq!(
            state.bound.record.netns,
            pod.netns.path().display().to_string()
        );
        assert_eq!(state.bound.record.network.as_deref(), Some("podid-test"));

        let table = podid_table(pod).expect("the pod has an ip podid table");
        assert!(
            table.contains(&format!("comment \"{}\"", pod.container_id())),
            "{table}"
        );
        assert!(
            table.contains(&format!(
                "ip daddr 169.254.169.254 tcp dport 80 redirect to :{}",
                node.listener_port
            )),
            "{table}"
        );
        assert!(
            table.contains("type nat hook output priority -100; policy accept;"),
            "{table}"
        );
    }
    let rec = node
        .tokend_pod(a.container_id())
        .unwrap()
        .unwrap()
        .bound
        .record;
    assert_eq!(rec.pod_namespace.as_deref(), Some("team-a"));
    assert_eq!(rec.pod_name.as_deref(), Some("api-0"));

    // A plain HTTP client in each pod reaches tokend's IMDS answer for that pod.
    assert_identity_not_found(&a);
    let probe = a
        .imds(&Request::get(
            "/metadata/identity/oauth2/token?api-version=2018-02-01",
        ))
        .unwrap();
    assert_eq!(probe.status, 400);
    assert_eq!(
        probe.json().unwrap()["error_description"],
        "Required metadata header not specified"
    );
    assert_eq!(
        probe.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_identity_not_found(&b);
    assert_eq!(
        node.tokend_pod(a.container_id()).unwrap().unwrap().requests,
        2
    );
    assert_eq!(
        node.tokend_pod(b.container_id()).unwrap().unwrap().requests,
        1
    );

    // The machine's own netns and the node netns gain no rule and no listener.
    let host_tables = netns::run("nft", &["list", "tables"]).unwrap();
    assert!(
        !host_tables.contains("podid"),
        "host netns has {host_tables}"
    );
    let node_tables = node.netns.exec_ok("nft", &["list", "tables"]).unwrap();
    assert!(
        !node_tables.contains("podid"),
        "node netns has {node_tables}"
    );
    assert!(!listening_on(None, node.listener_port));
    assert!(!listening_on(Some(&node.netns), node.listener_port));
    assert!(listening_on(Some(&a.netns), node.listener_port));

    for pod in [&a, &b] {
        rt.del(&pod.attachment).unwrap();
        assert!(node.tokend_pod(pod.container_id()).unwrap().is_none());
        assert!(podid_table(pod).is_none(), "DEL removes the pod's table");
        assert!(
            pod_listener_refuses(pod, node.listener_port),
            "DEL closes the listener"
        );
    }
}

#[test]
fn chain_at_0_3_0_as_aks_ships_it() {
    chain_serves_each_pod_on_its_own_listener("0.3.0");
}

#[test]
fn chain_at_1_0_0() {
    chain_serves_each_pod_on_its_own_listener("1.0.0");
}

#[test]
fn azure_vnet_result_passes_through_byte_for_byte() {
    let node = Node::new("azvnet").unwrap();
    node.start_tokend().unwrap();
    let pod = node.pod("rgapi", "api-0").unwrap();
    // What azure-vnet leaves in a pod in transparent mode: eth0 with the pod IP and a default route.
    for cmd in [
        "link add eth0 type veth peer name vpeer0",
        "link set vpeer0 up",
        "link set eth0 up",
        "addr add 10.240.0.37/16 dev eth0",
        "route add default via 10.240.0.1 dev eth0 onlink",
    ] {
        pod.netns
            .exec_ok("ip", &cmd.split(' ').collect::<Vec<_>>())
            .unwrap();
    }
    let fixture = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/azure-vnet-0.3.0-result.json"),
    )
    .unwrap();
    let fixture = fixture.trim();
    let config = podid_config(&node, "0.3.0", &PluginSettings::default(), json!({}));
    let mut stdin = serde_json::to_string(&config).unwrap();
    stdin.pop();
    stdin.push_str(&format!(",\"prevResult\":{fixture}}}"));
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=rgapi;K8S_POD_NAME=api-0;K8S_POD_UID={}",
        pod.uid
    );
    let netns = pod.netns.path().display().to_string();
    let env = [
        ("CNI_CONTAINERID", pod.container_id()),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args.as_str()),
    ];
    let out = invoke(&node, "ADD", &env, stdin.as_bytes());
    assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), fixture);
    let rec = node
        .tokend_pod(pod.container_id())
        .unwrap()
        .unwrap()
        .bound
        .record;
    assert_eq!(rec.ips, ["10.240.0.37/16"]);
    assert_identity_not_found(&pod);
}

#[test]
fn pods_from_runtimes_without_kubernetes_args_still_get_a_listener() {
    let node = Node::new("podman").unwrap();
    node.start_tokend().unwrap();
    let rt = node.chain("1.0.0");
    let netns = Netns::new("podman").unwrap();
    let pod = Pod {
        attachment: Attachment::bare(&podid_tests::node::container_id(), netns.path()),
        netns,
        uid: String::new(),
    };
    rt.add(&pod.attachment).unwrap();
    let rec = node
        .tokend_pod(pod.container_id())
        .unwrap()
        .unwrap()
        .bound
        .record;
    assert_eq!(
        (rec.pod_namespace, rec.pod_name, rec.pod_uid),
        (None, None, None)
    );
    assert_identity_not_found(&pod);
    rt.del(&pod.attachment).unwrap();
}

#[test]
fn del_never_fails() {
    let node = Node::new("del").unwrap();
    node.start_tokend().unwrap();
    let rt = node.chain("0.3.0");
    let config = serde_json::to_vec(&podid_config(
        &node,
        "0.3.0",
        &PluginSettings::default(),
        json!({}),
    ))
    .unwrap();
    let del = |cid: &str, netns: Option<&Path>| {
        let netns = netns.map(|p| p.display().to_string());
        let mut env = vec![("CNI_CONTAINERID", cid), ("CNI_IFNAME", "eth0")];
        if let Some(n) = &netns {
            env.push(("CNI_NETNS", n.as_str()));
        }
        let out = invoke(&node, "DEL", &env, &config);
        assert_eq!(
            out.status,
            0,
            "DEL failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(out.stdout.is_empty(), "DEL prints nothing");
    };

    // No CNI_NETNS (and, at 0.3.0, never a prevResult): deregisters all the same.
    let pod = node.pod("apps", "no-netns").unwrap();
    rt.add(&pod.attachment).unwrap();
    del(pod.container_id(), None);
    assert!(node.tokend_pod(pod.container_id()).unwrap().is_none());

    // A vanished netns.
    let pod = node.pod("apps", "vanished").unwrap();
    rt.add(&pod.attachment).unwrap();
    let (cid, path) = (pod.container_id().to_owned(), pod.netns.path().to_owned());
    drop(pod);
    del(&cid, Some(&path));
    assert!(node.tokend_pod(&cid).unwrap().is_none());

    // Twice in a row, through the runtime.
    let pod = node.pod("apps", "twice").unwrap();
    rt.add(&pod.attachment).unwrap();
    rt.del(&pod.attachment).unwrap();
    rt.del(&pod.attachment).unwrap();

    // ADD never ran.
    let pod = node.pod("apps", "never-added").unwrap();
    del(pod.container_id(), Some(pod.netns.path()));

    // A table of another container in the same netns is left alone (PID/IP reuse guard).
    let owner = node.pod("apps", "owner").unwrap();
    rt.add(&owner.attachment).unwrap();
    del("someoneelse0123", Some(owner.netns.path()));
    assert!(
        podid_table(&owner).is_some(),
        "DEL removed a table it did not create"
    );
    assert!(node.tokend_pod(owner.container_id()).unwrap().is_some());

    // tokend down: DEL still succeeds and removes the table.
    node.kill_tokend().unwrap();
    rt.del(&owner.attachment).unwrap();
    assert!(podid_table(&owner).is_none());
    del(owner.container_id(), Some(owner.netns.path()));
    let log = std::fs::read_to_string(node.cni_log()).unwrap();
    assert!(log.contains("DEL"), "the plugin logs to its logFile: {log}");
}

#[test]
fn gc_deregisters_every_attachment_not_valid() {
    let node = Node::new("gc").unwrap();
    node.start_tokend().unwrap();
    let rt = node.chain("1.0.0");
    let pods: Vec<Pod> = (0..3)
        .map(|i| node.pod("apps", &format!("gc-{i}")).unwrap())
        .collect();
    for pod in &pods {
        rt.add(&pod.attachment).unwrap();
    }
    let entry = |pod: &Pod| json!({"containerID": pod.container_id(), "ifname": "eth0"});
    let gc = |extra: Value| {
        let config = podid_config(&node, "1.1.0", &PluginSettings::default(), extra);
        invoke(&node, "GC", &[], &serde_json::to_vec(&config).unwrap())
    };
    // The legacy key of the 1.1.0 tag alone.
    let out = gc(json!({"cni.dev/attachments": [entry(&pods[0]), entry(&pods[1])]}));
    assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(node.tokend_pod(pods[2].container_id()).unwrap().is_none());
    assert!(node.tokend_pod(pods[1].container_id()).unwrap().is_some());
    // The corrected key alone.
    let out = gc(json!({"cni.dev/valid-attachments": [entry(&pods[0])]}));
    assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(node.tokend_pod(pods[1].container_id()).unwrap().is_none());
    assert!(node.tokend_pod(pods[0].container_id()).unwrap().is_some());
    assert_identity_not_found(&pods[0]);
}

#[test]
fn status_reports_tokend_down_only_under_a_strict_policy() {
    let node = Node::new("status").unwrap();
    let strict = PluginSettings {
        fail_open_namespaces: vec![],
        ..PluginSettings::default()
    };
    let status = |settings: &PluginSettings| {
        let config = podid_config(&node, "1.1.0", settings, json!({}));
        invoke(&node, "STATUS", &[], &serde_json::to_vec(&config).unwrap())
    };
    assert_eq!(error_code(&status(&strict)), 50);
    let lenient = status(&PluginSettings::default());
    assert_eq!(
        lenient.status, 0,
        "with fail-open namespaces STATUS must not block the node"
    );
    node.start_tokend().unwrap();
    let up = status(&strict);
    assert_eq!(up.status, 0, "{}", String::from_utf8_lossy(&up.stdout));
    assert!(up.stdout.is_empty());
}

#[test]
fn fail_policy_refuses_the_pod_while_tokend_is_down() {
    let node = Node::new("failpol").unwrap();
    let rt = node.chain("0.3.0");
    let pod = node.pod("apps", "api-0").unwrap();
    let err = rt.add(&pod.attachment).unwrap_err();
    assert_eq!(err.plugin, "podid");
    assert_eq!(err.code, Some(11), "{err}");
    assert!(
        err.msg.contains(&node.socket().display().to_string())
            || err.details.contains(&node.socket().display().to_string()),
        "{err}"
    );
    // The runtime follows a failed ADD with DEL, which must succeed.
    rt.del(&pod.attachment).unwrap();
    let spooled = std::fs::read_dir(node.pending_dir())
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(spooled, 0, "Fail policy never spools");
}

#[test]
fn ignore_policy_spools_and_tokend_adopts_at_start() {
    let node = Node::new("ignore").unwrap();
    let settings = PluginSettings {
        failure_policy: "Ignore",
        ..PluginSettings::default()
    };
    let rt = node.chain_with("0.3.0", &settings);
    let pod = node.pod("apps", "api-0").unwrap();
    rt.add(&pod.attachment).unwrap();
    // No tokend ever announced a port on this node: the spool and redirect use 2579.
    let spooled: podid_api::BoundPod = serde_json::from_slice(
        &std::fs::read(
            node.pending_dir()
                .join(format!("{}-eth0.json", pod.container_id())),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(spooled.listener_port, 2579);
    assert_eq!(spooled.record.pod_name.as_deref(), Some("api-0"));
    assert!(podid_table(&pod).unwrap().contains("redirect to :2579"));
    // Fail closed meanwhile: connection refused, never anything else.
    assert!(pod.token_request().is_err());

    node.start_tokend().unwrap();
    wait_for(WAIT, "the spool to be adopted", || {
        (std::fs::read_dir(node.pending_dir()).unwrap().count() == 0).then_some(())
    })
    .unwrap();
    let state = node
        .tokend_pod(pod.container_id())
        .unwrap()
        .expect("adopted");
    assert_eq!(
        state.bound.listener_port, 2579,
        "adopted on the port its redirect points to"
    );
    assert_identity_not_found(&pod);
    rt.del(&pod.attachment).unwrap();
}

#[test]
fn fail_open_namespace_pod_created_while_tokend_is_down_is_adopted_at_start() {
    let node = Node::new("failopen").unwrap();
    // tokend ran once on this node, so it announced its port, then went away.
    node.start_tokend().unwrap();
    node.kill_tokend().unwrap();
    let rt = node.chain("1.0.0");
    let system = node.pod("kube-system", "coredns-0").unwrap();
    let app = node.pod("apps", "api-0").unwrap();
    rt.add(&system.attachment).unwrap();
    assert_eq!(rt.add(&app.attachment).unwrap_err().code, Some(11));
    rt.del(&app.attachment).unwrap();
    assert!(
        podid_table(&system)
            .unwrap()
            .contains(&format!("redirect to :{}", node.listener_port)),
        "the spooled pod is redirected to the port tokend last announced"
    );

    node.start_tokend().unwrap();
    wait_for(WAIT, "the kube-system pod to be adopted", || {
        node.tokend_pod(system.container_id()).ok().flatten()
    })
    .unwrap();
    assert_identity_not_found(&system);
    rt.check(&system.attachment).unwrap();
}

#[test]
fn pod_spooled_while_tokend_is_stalled_is_adopted_without_a_restart() {
    let node = Node::new("stall").unwrap();
    node.start_tokend().unwrap();
    let settings = PluginSettings {
        timeout_ms: 300,
        ..PluginSettings::default()
    };
    let rt = node.chain_with("1.0.0", &settings);
    let pod = node.pod("kube-system", "metrics-0").unwrap();
    node.signal_tokend(Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let added = rt.add(&pod.attachment);
    let took = started.elapsed();
    let spooled = std::fs::read_dir(node.pending_dir()).unwrap().count();
    node.signal_tokend(Signal::SIGCONT).unwrap();
    added.unwrap();
    assert!(
        took >= Duration::from_millis(300),
        "ADD returned before its timeout: {took:?}"
    );
    assert_eq!(spooled, 1);
    wait_for(WAIT, "the stalled tokend to adopt the spooled pod", || {
        let empty = std::fs::read_dir(node.pending_dir()).unwrap().count() == 0;
        let known = node.tokend_pod(pod.container_id()).ok().flatten().is_some();
        (empty && known).then_some(())
    })
    .unwrap();
    assert_identity_not_found(&pod);
    rt.check(&pod.attachment).unwrap();
}

#[test]
fn kill_9_and_restart_loses_no_pod() {
    let node = Node::new("kill9").unwrap();
    node.start_tokend().unwrap();
    let rt = node.chain("0.3.0");
    let pods: Vec<Pod> = (0..5)
        .map(|i| node.pod("apps", &format!("p-{i}")).unwrap())
        .collect();
    for pod in &pods {
        rt.add(&pod.attachment).unwrap();
    }
    node.kill_tokend().unwrap();
    // Fail closed while it is gone.
    assert!(pods[0].token_request().is_err());
    node.start_tokend().unwrap();
    let known = node.tokend_pods().unwrap();
    assert_eq!(known.len(), pods.len());
    assert!(known.iter().all(|p| p.listener_bound));
    for pod in &pods {
        assert_identity_not_found(pod);
    }
    for pod in &pods {
        rt.del(&pod.attachment).unwrap();
    }
    assert!(node.tokend_pods().unwrap().is_empty());
}

#[test]
fn record_whose_netns_path_now_names_another_netns_is_not_bound() {
    let node = Node::new("reuse").unwrap();
    node.start_tokend().unwrap();
    let rt = node.chain("0.3.0");
    let pod = node.pod("apps", "api-0").unwrap();
    rt.add(&pod.attachment).unwrap();
    let old = pod.netns.identity().unwrap();
    node.kill_tokend().unwrap();
    let name = pod.netns.name().to_owned();
    drop(pod.netns);
    let impostor = Netns::create(&name).unwrap();
    impostor
        .exec_ok("ip", &["link", "set", "lo", "up"])
        .unwrap();
    assert_ne!(impostor.identity().unwrap(), old);

    node.start_tokend().unwrap();
    assert!(
        node.tokend_pod(&pod.attachment.container_id)
            .unwrap()
            .is_none()
    );
    assert!(
        !listening_on(Some(&impostor), node.listener_port),
        "bound in another netns"
    );
}

#[test]
fn check_verifies_the_table_the_rule_and_the_registration() {
    let node = Node::new("check").unwrap();
    node.start_tokend().unwrap();
    let rt = node.chain("1.0.0");
    let pod = node.pod("apps", "api-0").unwrap();
    let outputs = rt.add(&pod.attachment).unwrap();
    rt.check(&pod.attachment).unwrap();
    // A redirect that no longer matches.
    pod.netns
        .exec_ok("nft", &["flush", "chain", "ip", "podid", "output"])
        .unwrap();
    let err = rt.check(&pod.attachment).unwrap_err();
    assert_eq!(
        (err.plugin.as_str(), err.code),
        ("podid", Some(104)),
        "{err}"
    );
    // A retried ADD of the plugin repairs it, and is idempotent: one table, one rule.
    let mut config = podid_config(&node, "1.0.0", &PluginSettings::default(), json!({}));
    config["prevResult"] = serde_json::from_slice(&outputs[0].stdout).unwrap();
    let netns = pod.netns.path().display().to_string();
    let env = [
        ("CNI_CONTAINERID", pod.container_id()),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    for _ in 0..2 {
        let out = invoke(&node, "ADD", &env, &serde_json::to_vec(&config).unwrap());
        assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stdout));
    }
    rt.check(&pod.attachment).unwrap();
    assert_eq!(pod.ruleset().unwrap().matches("redirect to").count(), 1);
    // tokend no longer knows the pod.
    let del = podid_tests::http::unix(
        &node.socket(),
        &Request::new("DELETE", &format!("/v1/pods/{}/eth0", pod.container_id())),
    )
    .unwrap();
    assert_eq!(del.status, 200);
    let err = rt.check(&pod.attachment).unwrap_err();
    assert_eq!(err.code, Some(103), "{err}");
}

#[test]
fn concurrent_add_and_del_for_different_pods() {
    let node = Node::new("conc").unwrap();
    node.start_tokend().unwrap();
    let rt = node.chain("1.0.0");
    std::thread::scope(|s| {
        for t in 0..4 {
            let (node, rt) = (&node, &rt);
            s.spawn(move || {
                for i in 0..3 {
                    let pod = node.pod("apps", &format!("c-{t}-{i}")).unwrap();
                    rt.add(&pod.attachment).unwrap();
                    assert_identity_not_found(&pod);
                    assert_eq!(
                        node.tokend_pod(pod.container_id())
                            .unwrap()
                            .unwrap()
                            .requests,
                        1
                    );
                    rt.del(&pod.attachment).unwrap();
                }
            });
        }
    });
    assert!(node.tokend_pods().unwrap().is_empty());
}

#[test]
fn plugin_binary_is_static() {
    use object::elf;
    use object::read::elf::{Dyn, ElfFile64, ProgramHeader};
    let path = podid_tests::bins::plugin().unwrap();
    let data = std::fs::read(&path).unwrap();
    let file = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
    let endian = file.endian();
    let mut needed = 0;
    for ph in file.elf_program_headers() {
        assert_ne!(
            ph.p_type(endian),
            elf::PT_INTERP,
            "{} asks for a dynamic loader",
            path.display()
        );
        if let Ok(Some(dynamic)) = ph.dynamic(endian, &*data) {
            needed += dynamic
                .iter()
                .filter(|d| d.tag(endian) == elf::DT_NEEDED)
                .count();
        }
    }
    assert_eq!(needed, 0, "{} needs shared libraries", path.display());
}
