//! podid-controller's high availability: two real controller processes on one Lease (exactly
//! one writes; the leader killed with SIGKILL, the standby takes over within lease + retry,
//! nothing lost or duplicated, SIGTERM releases the lease and exits 0), in-process leaders that
//! lose their lease (taken by another holder, or unrenewable) and stop writing, and a bad flag.

mod controller_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use controller_support::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt as _};
use podid_api::crd::assignment_name;
use podid_controller::RunError;
use podid_controller::lease::{LeaseError, LeaseTimings};

/// Lease 15 s + standby retry 2 s, with slack for a loaded machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(25);

struct Replica {
    name: &'static str,
    child: Child,
    health: String,
}

impl Replica {
    fn start(binary: &Path, kubeconfig: &Path, dir: &Path, name: &'static str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let health = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
        let child = Command::new(binary)
            .args(["--kubeconfig", &kubeconfig.display().to_string()])
            .args(["--holder-identity", name, "--health-addr", &health])
            .args(["--lease-namespace", LEASE_NAMESPACE])
            .env("PODID_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the controller starts");
        Self {
            name,
            child,
            health,
        }
    }

    async fn get(&self, path: &'static str) -> Option<podid_tests::http::Response> {
        let addr = self.health.clone();
        tokio::task::spawn_blocking(move || {
            podid_tests::http::tcp(&addr, &podid_tests::http::Request::get(path)).ok()
        })
        .await
        .ok()
        .flatten()
    }

    async fn metrics(&self) -> String {
        self.get("/metrics")
            .await
            .map(|r| r.text())
            .unwrap_or_default()
    }

    async fn is_leader(&self) -> bool {
        metric(&self.metrics().await, "podid_controller_leader", &[]) == 1.0
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // a test that failed midway must not leave a controller running
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn new_pod(client: &Client, name: &str, node: &str) -> String {
    let p = create(client, &pod("ha", name, "app", node)).await;
    assignment_name(name, &p.uid().expect("uid"), "ha", "kv")
}

fn logs(dir: &Path) -> String {
    ["a", "b"]
        .iter()
        .map(|n| {
            format!(
                "--- {n}.log ---\n{}",
                std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_one_writer_and_a_takeover_after_sigkill() {
    let server = server().await;
    let client = server.client();
    let binary = podid_tests::bins::controller().expect("podid-controller builds");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");

    create(&client, &identity("ha", "kv")).await;
    create(&client, &binding("ha", "b", "kv", "app")).await;
    let mut expected = Vec::new();
    for i in 0..10 {
        expected.push(new_pod(&client, &format!("before-{i}"), &format!("node-{}", i % 3)).await);
    }

    let a = Replica::start(&binary, &kubeconfig, dir.path(), "a");
    let b = Replica::start(&binary, &kubeconfig, dir.path(), "b");
    for replica in [&a, &b] {
        eventually(&format!("replica {} ready", replica.name), || async {
            replica.get("/readyz").await.filter(|r| r.status == 200)
        })
        .await;
    }
    wait_assigned(&client, "ha", &expected).await;
    for i in 0..10 {
        wait_condition(
            &client,
            "ha",
            &format!("before-{i}"),
            "True",
            "IdentitiesAssigned",
        )
        .await;
    }

    // exactly one leads and writes; the standby has written nothing
    let (leader, standby) = if a.is_leader().await { (a, b) } else { (b, a) };
    assert!(leader.is_leader().await, "{}", logs(dir.path()));
    assert!(!standby.is_leader().await);
    let standby_metrics = standby.metrics().await;
    assert_eq!(
        writes(&standby_metrics),
        0.0,
        "the standby wrote:\n{standby_metrics}"
    );
    assert!(
        writes(&leader.metrics().await) >= 30.0,
        "10 assignments, 10 statuses, 10 conditions"
    );
    let lease: Lease = Api::namespaced(client.clone(), LEASE_NAMESPACE)
        .get(LEASE_NAME)
        .await
        .expect("lease");
    assert_eq!(
        lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some(leader.name)
    );

    // kill -9 the leader; pods created during the takeover are served after it
    let mut leader = leader;
    let killed_at = Instant::now();
    leader.child.kill().expect("SIGKILL");
    leader.child.wait().expect("reaped");
    for i in 0..5 {
        expected.push(new_pod(&client, &format!("during-{i}"), "node-0").await);
    }
    eventually_within(TAKEOVER_BOUND, "the standby to take over", || async {
        standby.is_leader().await.then_some(())
    })
    .await;
    let takeover = killed_at.elapsed();
    assert!(takeover <= TAKEOVER_BOUND, "took {takeover:?}");
    let items = wait_assigned(&client, "ha", &expected).await;
    let mut names: Vec<String> = items.iter().map(|i| i.name_any()).collect();
    names.dedup();
    assert_eq!(names.len(), 15, "every desired assignment exactly once");
    assert!(items.iter().all(is_assigned));
    for i in 0..5 {
        wait_condition(
            &client,
            "ha",
            &format!("during-{i}"),
            "True",
            "IdentitiesAssigned",
        )
        .await;
    }
    let new_leader_writes = metric(
        &standby.metrics().await,
        "podid_controller_writes_total",
        &[("kind", "assignment"), ("op", "apply")],
    );
    assert_eq!(
        new_leader_writes, 5.0,
        "the new leader rewrote nothing the old one had written"
    );
    eprintln!("takeover after SIGKILL: {takeover:?}");

    // SIGTERM: a clean exit that releases the lease
    let mut standby = standby;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(standby.child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = eventually("the controller to exit on SIGTERM", || {
        let status = standby.child.try_wait().expect("try_wait");
        async move { status }
    })
    .await;
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        logs(dir.path())
    );
    let lease: Lease = Api::namespaced(client.clone(), LEASE_NAMESPACE)
        .get(LEASE_NAME)
        .await
        .expect("lease");
    assert_eq!(lease.spec.and_then(|s| s.holder_identity), None, "released");
}

fn short_timings() -> LeaseTimings {
    LeaseTimings {
        duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(500),
        renew_deadline: Duration::from_secs(2),
        retry_every: Duration::from_millis(300),
    }
}

#[tokio::test]
async fn a_leader_whose_lease_is_taken_stops_writing_and_fails() {
    let server = server().await;
    let client = server.client();
    create(&client, &identity("ha", "kv")).await;
    create(&client, &binding("ha", "b", "kv", "app")).await;
    let mut s = settings("replica-a", false);
    s.lease.timings = short_timings();
    let controller = start_with(&server, s).await;
    let first = new_pod(&client, "first", "n1").await;
    wait_assigned(&client, "ha", std::slice::from_ref(&first)).await;

    // another holder writes the lease (as a replica that saw it expire would)
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let mut lease = leases.get(LEASE_NAME).await.expect("lease");
    let spec = lease.spec.as_mut().expect("spec");
    spec.holder_identity = Some("intruder".into());
    spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
    leases
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
        .expect("take the lease");

    let handle = controller.handle.clone();
    let ended = controller.ended(Duration::from_secs(10)).await;
    assert!(
        matches!(&ended, Err(RunError::Lease(LeaseError::Lost { why, .. })) if why.contains("intruder")),
        "{ended:?}"
    );
    assert!(!handle.is_leader());
    // nothing writes any more
    new_pod(&client, "after", "n1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(list_assignments(&client, "ha").await.len(), 1);
    let lease = leases.get(LEASE_NAME).await.expect("lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("intruder"),
        "not released: not ours"
    );
}

#[tokio::test]
async fn a_leader_that_cannot_renew_gives_up_within_the_deadline() {
    let server = server().await;
    let mut s = settings("replica-a", false);
    s.lease.timings = short_timings();
    let controller = start_with(&server, s).await;
    let handle = controller.handle.clone();
    let stopped = Instant::now();
    server.shutdown().await;
    let ended = controller.ended(Duration::from_secs(10)).await;
    assert!(
        matches!(ended, Err(RunError::Lease(LeaseError::Lost { .. }))),
        "{ended:?}"
    );
    assert!(!handle.is_leader());
    // renewals every 0.5 s, deadline 2 s after the last good one
    assert!(
        stopped.elapsed() <= Duration::from_secs(4),
        "gave up after {:?}",
        stopped.elapsed()
    );
}

#[tokio::test]
async fn a_standby_waits_for_expiry_then_takes_over() {
    let server = server().await;
    let client = server.client();
    // a lease held by a replica that stopped renewing a moment ago
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let now = k8s_openapi::jiff::Timestamp::now();
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(LEASE_NAME.into()),
            namespace: Some(LEASE_NAMESPACE.into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some("gone".into()),
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(3),
            lease_transitions: Some(4),
            ..Default::default()
        }),
    };
    leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("lease");
    create(&client, &identity("ha", "kv")).await;
    create(&client, &binding("ha", "b", "kv", "app")).await;
    let expected = new_pod(&client, "p", "n1").await;

    let mut s = settings("replica-b", false);
    s.lease.timings = short_timings();
    let started = Instant::now();
    let controller = start_with(&server, s).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2500),
        "took over before expiry: {waited:?}"
    );
    wait_assigned(&client, "ha", &[expected]).await;
    let lease = leases.get(LEASE_NAME).await.expect("lease");
    let spec = lease.spec.expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(5));
    controller.stop().await.expect("a clean stop");
}

#[test]
fn a_bad_flag_stops_the_binary_with_a_message_naming_it() {
    let binary = podid_tests::bins::controller().expect("podid-controller builds");
    let out = Command::new(&binary)
        .args(["--lease-name", "Not_A_Name", "--holder-identity", "x"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--lease-name") && stderr.contains("Not_A_Name"),
        "{stderr}"
    );
    let out = Command::new(&binary)
        .args(["--health-addr", "nowhere"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--health-addr") && stderr.contains("nowhere"),
        "{stderr}"
    );
}
