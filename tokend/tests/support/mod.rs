//! Harness for the root integration tests: throwaway network namespaces, the real
//! podid-tokend binary run inside a "node" netns of its own, and tiny raw HTTP clients.
//!
//! Every node has a loopback fake Kubernetes API server in the test process, reached from the
//! node netns through a TCP bridge on the same port, so tokend runs with `--node-name node-1`
//! and a kubeconfig. [`Node::with_cloud`] adds a mock Entra ID (HTTPS, test CA) and a mock
//! node IMDS, bridged the same way.

#![allow(dead_code)] // Each test file uses its own part of the harness.

mod cluster;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use podid_api::{BoundPod, PodRecord};
use podid_tests::bridge::TcpBridge;
use podid_tests::fakeapi::FakeApiServer;
use podid_tests::mocks::entra::EntraMock;
use podid_tests::mocks::imds::{ImdsMock, ManagedIdentity};
use podid_tests::mocks::tls::TestCa;
use serde_json::Value;

#[allow(unused_imports)] // node.rs builds no objects.
pub use cluster::*;

/// Slack for anything asynchronous (spool adoption, periodic checks, start-up).
pub const WAIT: Duration = Duration::from_secs(10);
/// Port tokend binds inside every node netns for /healthz, /readyz, /metrics.
pub const HEALTH_PORT: u16 = 2580;
/// tokend's default listener port.
pub const PORT: u16 = 2579;

/// `ip netns add/del` of parallel tests must not race on the first mount of /run/netns.
static IP_LOCK: Mutex<()> = Mutex::new(());
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Whether the tests can run here; they need root for network namespaces.
pub fn root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipped: the podid-tokend integration tests need root");
    }
    root
}

fn ip(args: &[&str]) -> io::Result<()> {
    let _guard = IP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// A named network namespace `podid-td-<pid>-<n>` with `lo` up, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        let name = format!(
            "podid-td-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let netns = Self { name };
        netns.create();
        netns
    }

    fn create(&self) {
        ip(&["netns", "add", &self.name]).unwrap();
        ip(&["-n", &self.name, "link", "set", "lo", "up"]).unwrap();
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `(st_dev, st_ino)` of the namespace file.
    pub fn id(&self) -> (u64, u64) {
        let stat = nix::sys::stat::stat(self.path().as_str()).unwrap();
        #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
        (stat.st_dev as u64, stat.st_ino as u64)
    }

    /// Deletes the namespace, so its path is gone.
    pub fn delete(&self) {
        ip(&["netns", "del", &self.name]).unwrap();
    }

    /// Deletes and re-creates it under the same name: the path now names a new namespace.
    pub fn recreate(&self) {
        let before = self.id();
        self.delete();
        self.create();
        assert_ne!(before, self.id(), "the re-created netns has a new inode");
    }

    /// Runs `f` on a thread of its own inside this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = File::open(&path).unwrap();
                    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
                    f()
                })
                .join()
                .unwrap()
        })
    }

    /// Connects to `127.0.0.1:<port>` from inside this namespace.
    pub fn connect(&self, port: u16) -> io::Result<TcpStream> {
        self.run(|| {
            let stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(WAIT))?;
            Ok(stream)
        })
    }

    /// One HTTP/1.1 GET to the pod's listener, from inside the pod's netns.
    pub fn get(&self, port: u16, target: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
        self.request(port, "GET", target, headers)
    }

    pub fn request(
        &self,
        port: u16,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<Response> {
        self.run(|| http(port, method, target, headers))
    }

    /// Whether nothing listens on `127.0.0.1:<port>` in this namespace.
    pub fn refuses(&self, port: u16) -> bool {
        matches!(self.connect(port), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    }

    /// Takes `127.0.0.1:<port>` inside the namespace, as a pod's own process could.
    pub fn occupy(&self, port: u16) -> TcpListener {
        self.run(|| TcpListener::bind(("127.0.0.1", port)).unwrap())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Value of a header (names compare case-insensitively).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// One HTTP/1.1 request to `127.0.0.1:<port>` of the calling thread's netns.
pub fn http(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(WAIT * 3))?;
    let mut head =
        format!("{method} {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    exchange(&mut stream, head.as_bytes())
}

fn exchange(stream: &mut (impl Read + Write), request: &[u8]) -> io::Result<Response> {
    stream.write_all(request)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no HTTP answer: {text:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status line: {head:?}")))?;
    Ok(Response {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// A pod record for `container_id`/`ifname` in `netns`, with its current (dev, ino). It
/// names no pod UID (as from a runtime without `K8S_POD_UID`), so its listener matches no
/// identity and answers token requests "Identity not found" at once; identity tests use
/// [`pod_record`] of a pod they created.
pub fn record(container_id: &str, ifname: &str, netns: &Netns) -> PodRecord {
    let (dev, ino) = netns.id();
    PodRecord {
        container_id: container_id.into(),
        ifname: ifname.into(),
        netns: netns.path(),
        netns_inode: ino,
        netns_dev: dev,
        pod_namespace: Some("default".into()),
        pod_name: Some(format!("pod-{container_id}")),
        pod_uid: None,
        ips: vec!["10.244.1.7/24".into()],
        network: Some("podid-test".into()),
    }
}

/// Polls `check` until it holds or [`WAIT`] passes.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The name every test node has in Kubernetes.
pub const NODE_NAME: &str = "node-1";

/// The mock cloud of a node: Entra ID and the node's IMDS, bridged into the node netns.
#[derive(Debug)]
pub struct Cloud {
    pub entra: EntraMock,
    pub imds: ImdsMock,
    /// The node VM's own (system-assigned) identity.
    pub system: ManagedIdentity,
    pub ca_file: PathBuf,
    bridges: Vec<TcpBridge>,
}

impl Cloud {
    /// `--authority-host` for the mock Entra ID, as the node reaches it.
    pub fn authority_host(&self) -> String {
        format!("https://localhost:{}", self.entra.addr().port())
    }

    /// The v2 token URL of `tenant`, as tokend addresses it.
    pub fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.authority_host())
    }
}

/// A node: its own netns, state dir and socket path, a fake API server, maybe a mock cloud,
/// and the tokends started on it.
#[derive(Debug)]
pub struct Node {
    pub dir: tempfile::TempDir,
    pub netns: podid_tests::netns::Netns,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub kubeconfig: PathBuf,
    pub api: FakeApiServer,
    pub cloud: Option<Cloud>,
    api_bridge: Option<TcpBridge>,
    runs: AtomicUsize,
    // Last: the runtime serving the fake API server and the mocks goes after them.
    pub rt: tokio::runtime::Runtime,
}

/// A bridge listening on `target`'s port on 127.0.0.1 inside `netns`.
fn bridge(netns: &podid_tests::netns::Netns, target: SocketAddr) -> TcpBridge {
    let listen = SocketAddr::from(([127, 0, 0, 1], target.port()));
    TcpBridge::into_netns(netns, listen, target).unwrap()
}

impl Node {
    /// A node whose tokend talks to a fake API server (and to no cloud).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let api = rt.block_on(FakeApiServer::start()).unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let netns = podid_tests::netns::Netns::new("node").unwrap();
        netns.exec_ok("ip", &["link", "set", "lo", "up"]).unwrap();
        let api_bridge = Some(bridge(&netns, api.addr()));
        Self {
            socket: dir.path().join("run/podid/tokend.sock"),
            state: dir.path().join("state"),
            kubeconfig,
            api,
            cloud: None,
            api_bridge,
            netns,
            dir,
            runs: AtomicUsize::new(0),
            rt,
        }
    }

    /// A node with a mock Entra ID (test CA, reached as `localhost`) and a mock IMDS whose
    /// VM has a system-assigned identity.
    pub fn with_cloud() -> Self {
        let mut node = Self::new();
        let ca = std::sync::Arc::new(TestCa::generate().unwrap());
        let ca_file = node.dir.path().join("ca.pem");
        ca.write_pem(&ca_file).unwrap();
        let entra = node
            .rt
            .block_on(EntraMock::builder().host("localhost").ca(ca).start())
            .unwrap();
        let instance = podid_tests::mocks::imds::InstanceMetadata::default();
        let system = ManagedIdentity::system_assigned(&instance);
        let imds = node
            .rt
            .block_on(ImdsMock::builder().system_identity(system.clone()).start())
            .unwrap();
        let bridges = vec![
            bridge(&node.netns, entra.addr()),
            bridge(&node.netns, imds.addr()),
        ];
        node.cloud = Some(Cloud {
            entra,
            imds,
            system,
            ca_file,
            bridges,
        });
        node
    }

    pub fn cloud(&self) -> &Cloud {
        self.cloud
            .as_ref()
            .expect("a node made with Node::with_cloud")
    }

    /// Cuts the node off the API server (connections in progress included stay open).
    pub fn disconnect_api(&mut self) {
        self.api_bridge = None;
    }

    /// The flags that connect tokend to this node's cluster and cloud.
    fn cluster_args(&self) -> Vec<String> {
        let mut args = vec![
            "--node-name".to_owned(),
            NODE_NAME.to_owned(),
            "--kubeconfig".to_owned(),
            self.kubeconfig.display().to_string(),
        ];
        if let Some(cloud) = &self.cloud {
            args.extend([
                "--imds-endpoint".to_owned(),
                format!("http://127.0.0.1:{}", cloud.imds.addr().port()),
                "--authority-host".to_owned(),
                cloud.authority_host(),
                "--ca-file".to_owned(),
                cloud.ca_file.display().to_string(),
            ]);
        }
        args
    }

    pub fn pods_file(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.state
            .join(format!("pods/{container_id}-{ifname}.json"))
    }

    pub fn pending_file(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.state
            .join(format!("pending/{container_id}-{ifname}.json"))
    }

    /// Spools a record as the plugin does: atomic write into `pending/`.
    pub fn spool(&self, record: &PodRecord, listener_port: u16) {
        let path = self.pending_file(&record.container_id, &record.ifname);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let json = serde_json::to_vec(&BoundPod {
            record: record.clone(),
            listener_port,
        })
        .unwrap();
        podid_api::fsutil::write_atomic(
            &path,
            &json,
            0o600,
            podid_api::fsutil::Durability::ProcessCrash,
        )
        .unwrap();
    }

    /// Starts tokend on this node with the default flags plus `extra`, without waiting.
    pub fn spawn(&self, extra: &[&str]) -> Tokend {
        let mut args: Vec<String> = vec![
            "--socket".into(),
            self.socket.display().to_string(),
            "--state-dir".into(),
            self.state.display().to_string(),
            "--health-addr".into(),
            format!("127.0.0.1:{HEALTH_PORT}"),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        self.spawn_with(&args)
    }

    /// Starts tokend in the node netns with the cluster flags and `args`, without waiting; it
    /// logs at `debug` unless `PODID_TEST_LOG` names another filter.
    pub fn spawn_with(&self, args: &[String]) -> Tokend {
        let mut args_with_cluster = self.cluster_args();
        args_with_cluster.extend(args.iter().cloned());
        let args = &args_with_cluster;
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.path().join(format!("tokend-{run}.log"));
        let stderr = File::create(&log).unwrap();
        let child = self
            .netns
            .run(|| {
                Command::new(env!("CARGO_BIN_EXE_podid-tokend"))
                    .args(args)
                    .env(
                        "PODID_LOG",
                        std::env::var("PODID_TEST_LOG").unwrap_or_else(|_| "debug".into()),
                    )
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(stderr)
                    .spawn()
                    .unwrap()
            })
            .unwrap();
        Tokend {
            child,
            log,
            socket: self.socket.clone(),
        }
    }

    /// Starts tokend and waits until `/v1/status` says ready.
    pub fn start(&self, extra: &[&str]) -> Tokend {
        let mut tokend = self.spawn(extra);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = tokend.child.try_wait() {
                panic!("tokend exited with {status}:\n{}", tokend.log());
            }
            if tokend
                .api("GET", "/v1/status", None)
                .is_ok_and(|r| r.status == 200)
            {
                return tokend;
            }
            assert!(
                Instant::now() < deadline,
                "tokend not ready:\n{}",
                tokend.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the health address, from inside the node netns.
    pub fn health(&self, path: &str) -> Response {
        self.netns
            .run(|| http(HEALTH_PORT, "GET", path, &[]))
            .unwrap()
            .unwrap()
    }

    /// The value of one metric sample line (`name{labels}`), 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let metrics = self.health("/metrics").body;
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

/// A running podid-tokend, killed on drop.
#[derive(Debug)]
pub struct Tokend {
    pub child: Child,
    log: PathBuf,
    socket: PathBuf,
}

impl Tokend {
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request to the API socket.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> io::Result<Response> {
        let body = body.unwrap_or("");
        self.api_raw(&format!(
            "{method} {path} HTTP/1.1\r\nHost: tokend\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    }

    /// Sends `request` as is to the API socket.
    pub fn api_raw(&self, request: &str) -> io::Result<Response> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(WAIT))?;
        exchange(&mut stream, request.as_bytes())
    }

    /// `PUT /v1/pods/{cid}/{ifname}` with `record`.
    pub fn put(&self, record: &PodRecord) -> Response {
        let path = record.key().api_path();
        self.api("PUT", &path, Some(&serde_json::to_string(record).unwrap()))
            .unwrap()
    }

    pub fn delete(&self, container_id: &str, ifname: &str) -> Response {
        self.api("DELETE", &format!("/v1/pods/{container_id}/{ifname}"), None)
            .unwrap()
    }

    /// `GET /v1/pods/{cid}/{ifname}`: the PodState, or None on 404.
    pub fn pod(&self, container_id: &str, ifname: &str) -> Option<Value> {
        let r = self
            .api("GET", &format!("/v1/pods/{container_id}/{ifname}"), None)
            .unwrap();
        match r.status {
            200 => Some(r.json()),
            404 => None,
            other => panic!("GET pod: {other} {}", r.body),
        }
    }

    pub fn pods(&self) -> Vec<Value> {
        let r = self.api("GET", "/v1/pods", None).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["pods"].as_array().unwrap().clone()
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        self.child.wait().unwrap();
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit()
    }

    /// Waits (bounded) for the process to exit on its own.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tokend did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tokend {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
