//! A whole node with every part as its own process, as it runs for real: the `fake-apiserver`
//! binary (the cluster's API, bridged into the node netns at `127.0.0.1:6443`), `mock-azure` in
//! the cloud netns (IMDS on `169.254.169.254:80` routed from the node, Entra ID by name through
//! the node's hosts file), `podid-install` keeping podid chained into the node's primary conflist
//! and the host guard in place, `podid-tokend`, and two `podid-controller` replicas electing a
//! leader. The harness plays the kubelet: it creates the Pod (scheduled here), then runs the CNI
//! chain for its sandbox from the conflist on disk, as the runtime reads it at that moment.
//!
//! Every token answer a pod gets through [`System::token`] is recorded, and
//! [`System::verify_run`] checks the whole run: no answer carries the node's own identity unless
//! an AzurePodIdentityException selects the pod, and no process log holds a token, a secret or
//! an assertion. Every process is killed and every netns and dir removed on drop.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node as NodeObject, Pod as PodObject, Secret, Taint};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use podid_api::crd::{AzureAssignedIdentity, AzurePodIdentityException};
use podid_api::wire::{PodList, PodState};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::bins;
use crate::bridge::TcpBridge;
use crate::cloud::{CLOUD_SIDE, Cloud};
use crate::http::{self, Request, Response};
use crate::mocks::imds::{InstanceMetadata, ManagedIdentity};
use crate::mocks::jwt::decode_claims;
use crate::netns::Netns;
use crate::node::{API_ADDR, IMDS_ADDR, container_id, wait_for};
use crate::objects::PodBuilder;
use crate::runtime::{Attachment, Runtime};

/// The tenant of every identity.
pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The mock Entra ID's name, resolved by tokend through the node's hosts file.
pub const ENTRA_HOST: &str = "login.mock.test";
/// The startup taint podid-install removes once the node is protected.
pub const STARTUP_TAINT: &str = "podid.io/agent-not-ready";
/// Where the controllers keep their Lease.
pub const LEASE_NAMESPACE: &str = "podid-system";
pub const LEASE_NAME: &str = "podid-controller";
/// The two controller replicas, by `--holder-identity`.
pub const CONTROLLERS: [&str; 2] = ["controller-a", "controller-b"];
/// The ARM audience, what most requests ask for.
pub const ARM: &str = "https://management.azure.com/";

const TOKEND: &str = "podid-tokend";
const INSTALLER: &str = "podid-install";
const API_SERVER: &str = "fake-apiserver";
const MOCK_AZURE: &str = "mock-azure";
const TOKEND_HEALTH: &str = "127.0.0.1:2580";
const INSTALL_HEALTH: &str = "127.0.0.1:2584";
const PRIMARY: &str = "10-bridge.conflist";
/// How long a daemon gets to come up on a loaded 2-core machine.
const START_WAIT: Duration = Duration::from_secs(60);

/// A service principal registered with the mock Entra ID.
#[derive(Debug, Clone, Default)]
pub struct EntraApp {
    pub client_id: String,
    pub object_id: Option<String>,
    pub secrets: Vec<String>,
    /// Certificates (DER) whose assertions the app accepts.
    pub certificates: Vec<Vec<u8>>,
    /// Federated credentials: (issuer, subject).
    pub federated: Vec<(String, String)>,
}

/// What the cloud knows before the node starts: `mock-azure` is a process configured once.
#[derive(Debug, Clone, Default)]
pub struct Azure {
    /// User-assigned identities attached to the node pool (served by the node's IMDS).
    pub identities: Vec<ManagedIdentity>,
    pub apps: Vec<EntraApp>,
}

/// One process of the node, killed and reaped on drop.
#[derive(Debug)]
struct Daemon {
    child: Child,
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid() as i32), signal)?;
        Ok(())
    }

    fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pod sandbox the harness created as the kubelet.
#[derive(Debug)]
pub struct SysPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub netns: Netns,
    pub attachment: Attachment,
    /// The chain exactly as the runtime read it from the conf dir for this sandbox.
    pub runtime: Runtime,
    /// When the harness started creating the Pod in the API.
    pub created: Instant,
    /// When the runtime read the conflist.
    pub chain_read: Instant,
    /// Whether that conflist held podid.
    pub chained: bool,
    /// ADD attempts that failed with code 11 (tokend busy) before one succeeded.
    pub add_retries: u32,
}

impl SysPod {
    /// `nft list ruleset` inside the pod.
    pub fn ruleset(&self) -> Result<String> {
        self.netns.exec_ok("nft", &["list", "ruleset"])
    }
}

/// One token answer of the run, or the failure to get one.
#[derive(Debug, Clone)]
pub struct Answer {
    pub namespace: String,
    pub pod: String,
    pub labels: BTreeMap<String, String>,
    /// `None`: no HTTP answer (refused, timed out).
    pub status: Option<u16>,
    pub body: String,
}

/// What [`System::verify_run`] looked at.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub answers: usize,
    pub tokens: usize,
    /// Tokens of the node's identity, each to a pod an exception selects.
    pub node_tokens: usize,
    pub logs: usize,
    pub log_bytes: usize,
    pub needles: usize,
}

#[derive(Debug, Default)]
struct Record {
    answers: Vec<Answer>,
    /// Secret values the cloud or the cluster was configured with.
    secrets: Vec<Vec<u8>>,
}

/// The node and everything around it, each part a process.
pub struct System {
    /// The Node's name (`spec.nodeName` of its pods).
    pub name: String,
    pub vm: InstanceMetadata,
    /// The node's system-assigned identity: only exception pods may get its tokens.
    pub node_identity: ManagedIdentity,
    pub listener_port: u16,
    bridge: String,
    subnet: String,
    daemons: Mutex<BTreeMap<String, Daemon>>,
    record: Mutex<Record>,
    client: kube::Client,
    rt: tokio::runtime::Runtime,
    _api_bridge: TcpBridge,
    pub cloud: Cloud,
    pub netns: Netns,
    dir: TempDir,
}

impl std::fmt::Debug for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("System")
            .field("name", &self.name)
            .field("netns", &self.netns)
            .field("cloud", &self.cloud)
            .field("dir", &self.dir)
            .field("daemons", &self.daemons)
            .finish_non_exhaustive()
    }
}

static SYSTEMS: AtomicU32 = AtomicU32::new(0);

impl System {
    /// Starts the API server, the cloud, the installer, tokend and both controllers, and waits
    /// until the node is protected and untainted and a controller leads.
    pub fn start(tag: &str, azure: &Azure) -> Result<Self> {
        let n = SYSTEMS.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() + n) % 200;
        let netns = Netns::new(&format!("sys-{tag}"))?;
        netns.exec_ok("ip", &["link", "set", "lo", "up"])?;
        let dir = tempfile::Builder::new().prefix("podid-sys-").tempdir()?;
        for sub in [
            "bin", "conf", "ipam", "state", "run", "log", "install", "cloud",
        ] {
            fs::create_dir_all(dir.path().join(sub))?;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut daemons = BTreeMap::new();

        // The cluster's API server, reached by the node's daemons at 127.0.0.1:6443.
        let api_log = dir.path().join(format!("log/{API_SERVER}.log"));
        let mut command = Command::new(bins::fake_apiserver()?);
        command.args(["--port", "0", "--kubeconfig"]);
        command.arg(dir.path().join("api.kubeconfig"));
        daemons.insert(API_SERVER.to_owned(), spawn(command, None, None, &api_log)?);
        let url = wait_for_line(&api_log, "listening on ", START_WAIT)?;
        let addr: SocketAddr = url
            .trim()
            .trim_start_matches("http://")
            .parse()
            .with_context(|| format!("the API server's address in {url:?}"))?;
        let api_bridge = TcpBridge::into_netns(&netns, API_ADDR.parse()?, addr)?;
        fs::write(
            dir.path().join("kubeconfig"),
            crate::fakeapi::kubeconfig(&format!("http://{API_ADDR}")),
        )?;
        let client = {
            let _guard = rt.enter();
            kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse()?))?
        };

        let subnet = format!("10.{}.0.0/16", 150 + id % 50);
        let cloud = Cloud::attach_to(&netns, &subnet)?;
        let vm = InstanceMetadata::default();
        let node_identity = ManagedIdentity::system_assigned(&vm);

        let system = Self {
            name: format!("node-{tag}-{n}"),
            vm,
            node_identity,
            listener_port: 4000 + (id + n) as u16 % 1000,
            bridge: format!("psys{}", n % 10000),
            subnet,
            daemons: Mutex::new(daemons),
            record: Mutex::default(),
            client,
            rt,
            _api_bridge: api_bridge,
            cloud,
            netns,
            dir,
        };
        system.create_node()?;
        system.start_cloud(azure)?;
        system.write_primary()?;
        system.start_installer()?;
        system.start_tokend()?;
        system.wait_tokend_ready(START_WAIT)?;
        for name in CONTROLLERS {
            system.start_controller(name)?;
        }
        system.wait_installer_ready()?;
        wait_for(START_WAIT, "a controller to lead", || {
            system.lease_holder().ok().flatten()
        })
        .with_context(|| system.logs_tail())?;
        system.describe();
        Ok(system)
    }

    fn describe(&self) {
        eprintln!(
            "system {}: node netns {}, cloud netns {}, dir {}",
            self.name,
            self.netns.name(),
            self.cloud.netns.name(),
            self.dir.path().display()
        );
    }

    /// The Node object, carrying the startup taint as a new node of a podid pool does.
    fn create_node(&self) -> Result<()> {
        let nodes: Api<NodeObject> = Api::all(self.client());
        let mut object = NodeObject {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..ObjectMeta::default()
            },
            ..NodeObject::default()
        };
        object.spec.get_or_insert_default().taints = Some(vec![Taint {
            key: STARTUP_TAINT.into(),
            effect: "NoSchedule".into(),
            value: Some("true".into()),
            time_added: None,
        }]);
        self.block_on(nodes.create(&PostParams::default(), &object))?;
        Ok(())
    }

    /// `mock-azure` in the cloud netns: IMDS on 169.254.169.254:80, Entra ID on 198.51.100.2:443.
    fn start_cloud(&self, azure: &Azure) -> Result<()> {
        let cloud_dir = self.dir.path().join("cloud");
        let mut apps = Vec::new();
        let mut secrets = Vec::new();
        for app in &azure.apps {
            let mut certificates = Vec::new();
            for (i, der) in app.certificates.iter().enumerate() {
                let file = format!("{}-{i}.der", app.client_id);
                fs::write(cloud_dir.join(&file), der)?;
                certificates.push(file);
            }
            secrets.extend(app.secrets.iter().map(|s| s.as_bytes().to_vec()));
            let mut entry = json!({
                "tenant": TENANT,
                "client_id": app.client_id,
                "secrets": app.secrets,
                "certificates": certificates,
                "federated": app.federated.iter()
                    .map(|(issuer, subject)| json!({"issuer": issuer, "subject": subject}))
                    .collect::<Vec<_>>(),
            });
            if let Some(oid) = &app.object_id {
                entry["object_id"] = json!(oid);
            }
            apps.push(entry);
        }
        let config = json!({
            "entra": {
                "listen": Cloud::entra_addr(),
                "host": ENTRA_HOST,
                "apps": apps,
            },
            "imds": {
                "listen": Cloud::imds_addr(),
                "tenant": TENANT,
                "system_identity": self.node_identity,
                "identities": azure.identities,
                "instance": self.vm,
            }
        });
        let config_path = cloud_dir.join("mock-azure.json");
        fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        self.record.lock().unwrap().secrets.extend(secrets);
        let log = self.log_path(MOCK_AZURE);
        let mut command = Command::new(bins::mock_azure()?);
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--ca-file")
            .arg(self.ca_file());
        self.insert(
            MOCK_AZURE,
            spawn(command, Some(&self.cloud.netns), None, &log)?,
        );
        wait_for_line(&log, "entra listening on ", START_WAIT)?;
        wait_for_line(&log, "imds listening on ", START_WAIT)?;
        let hosts = self.dir.path().join("hosts");
        fs::write(
            &hosts,
            format!("127.0.0.1 localhost\n{CLOUD_SIDE} {ENTRA_HOST}\n"),
        )?;
        Ok(())
    }

    /// The primary network config, as the primary plugin's own installer writes it before
    /// podid is there: Debian's `bridge` at cniVersion 0.3.0, as AKS ships its list.
    pub fn primary(&self) -> Value {
        json!({
            "cniVersion": "0.3.0",
            "name": "podid-test",
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "subnet": self.subnet,
                    "dataDir": self.dir.path().join("ipam"),
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            }]
        })
    }

    fn write_primary(&self) -> Result<()> {
        fs::write(
            self.primary_path(),
            serde_json::to_vec_pretty(&self.primary())?,
        )?;
        Ok(())
    }

    /// `<conf dir>/10-bridge.conflist`.
    pub fn primary_path(&self) -> PathBuf {
        self.dir.path().join("conf").join(PRIMARY)
    }

    /// Rewrites the primary as AKS's azure-cni installer (dropgz) does, without podid: renames
    /// the file aside, then creates it with `O_TRUNC` and writes it in pieces.
    pub fn rewrite_primary_dropgz(&self) -> Result<()> {
        let path = self.primary_path();
        fs::rename(&path, path.with_extension("conflist.old"))?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        let bytes = serde_json::to_vec_pretty(&self.primary())?;
        for piece in bytes.chunks(bytes.len().div_ceil(4)) {
            file.write_all(piece)?;
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// The primary as a runtime would load it now: `None` while it is absent or half-written.
    pub fn read_primary(&self) -> Option<Value> {
        let text = fs::read(self.primary_path()).ok()?;
        let value: Value = serde_json::from_slice(&text).ok()?;
        value["plugins"].is_array().then_some(value)
    }

    /// Whether `conflist` chains podid.
    pub fn is_chained(conflist: &Value) -> bool {
        conflist["plugins"]
            .as_array()
            .is_some_and(|p| p.iter().any(|e| e["type"] == "podid"))
    }

    fn start_installer(&self) -> Result<()> {
        let d = self.dir.path();
        let mut command = Command::new(bins::installer()?);
        command
            .arg("--cni-bin-dir")
            .arg(d.join("bin"))
            .arg("--cni-conf-dir")
            .arg(d.join("conf"))
            .arg("--plugin-binary")
            .arg(bins::plugin()?)
            .args(["--node-name", &self.name])
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["--health-addr", INSTALL_HEALTH])
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--log-file")
            .arg(self.cni_log())
            .arg("--install-state-dir")
            .arg(d.join("install"));
        let daemon = spawn(command, Some(&self.netns), None, &self.log_path(INSTALLER))?;
        self.insert(INSTALLER, daemon);
        Ok(())
    }

    fn wait_installer_ready(&self) -> Result<()> {
        wait_for(START_WAIT, "podid-install ready", || {
            self.netns
                .run(|| http::tcp(INSTALL_HEALTH, &Request::get("/readyz")))
                .ok()
                .and_then(Result::ok)
                .filter(|r| r.status == 200)
        })
        .with_context(|| self.logs_tail())?;
        wait_for(START_WAIT, "the startup taint removed", || {
            let nodes: Api<NodeObject> = Api::all(self.client());
            let node = self.block_on(nodes.get(&self.name)).ok()?;
            let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
            taints.iter().all(|t| t.key != STARTUP_TAINT).then_some(())
        })
        .with_context(|| self.logs_tail())?;
        Ok(())
    }

    /// Starts tokend in the node netns (hostNetwork), with the node's hosts file, without waiting.
    pub fn start_tokend(&self) -> Result<()> {
        let mut command = Command::new(bins::tokend()?);
        command
            .args(["--node-name", &self.name])
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--listener-port", &self.listener_port.to_string()])
            .args(["--health-addr", TOKEND_HEALTH])
            .args(["--authority-host", &format!("https://{ENTRA_HOST}")])
            .arg("--ca-file")
            .arg(self.ca_file());
        let hosts = self.dir.path().join("hosts");
        let daemon = spawn(
            command,
            Some(&self.netns),
            Some(&hosts),
            &self.log_path(TOKEND),
        )?;
        let mut daemons = self.daemons.lock().unwrap();
        if daemons.contains_key(TOKEND) {
            bail!("tokend already runs");
        }
        daemons.insert(TOKEND.to_owned(), daemon);
        Ok(())
    }

    /// Waits until tokend answers `GET /v1/status` with 200.
    pub fn wait_tokend_ready(&self, timeout: Duration) -> Result<()> {
        wait_for(timeout, "tokend ready", || {
            http::unix(&self.socket(), &Request::get("/v1/status"))
                .ok()
                .filter(|r| r.status == 200)
        })
        .map(|_| ())
        .with_context(|| self.logs_tail())
    }

    /// `kill -9` tokend and reap it.
    pub fn kill_tokend(&self) -> Result<()> {
        self.kill_daemon(TOKEND)
    }

    /// tokend's process id.
    pub fn tokend_pid(&self) -> Result<u32> {
        self.pid(TOKEND)
    }

    /// tokend's resident set size, in KiB (`VmRSS`).
    pub fn tokend_rss_kib(&self) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.tokend_pid()?))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in tokend's /proc status")
    }

    /// tokend's view of every pod it serves.
    pub fn tokend_pods(&self) -> Result<Vec<PodState>> {
        let resp = http::unix(&self.socket(), &Request::get("/v1/pods"))?;
        if resp.status != 200 {
            bail!("GET /v1/pods: {} {}", resp.status, resp.text());
        }
        Ok(serde_json::from_slice::<PodList>(&resp.body)?.pods)
    }

    /// Starts the controller replica `holder` (one of [`CONTROLLERS`]) in the node netns.
    pub fn start_controller(&self, holder: &str) -> Result<()> {
        let index = CONTROLLERS
            .iter()
            .position(|c| *c == holder)
            .with_context(|| format!("no controller replica {holder}"))?;
        let mut command = Command::new(bins::controller()?);
        command
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["--holder-identity", holder])
            .args(["--health-addr", &controller_health(index)])
            .args(["--lease-namespace", LEASE_NAMESPACE])
            .args(["--lease-name", LEASE_NAME]);
        let daemon = spawn(command, Some(&self.netns), None, &self.log_path(holder))?;
        self.insert(holder, daemon);
        Ok(())
    }

    /// `kill -9` the controller replica `holder` and reap it.
    pub fn kill_controller(&self, holder: &str) -> Result<()> {
        self.kill_daemon(holder)
    }

    /// The controller replica's `/metrics`.
    pub fn controller_metrics(&self, holder: &str) -> Result<String> {
        let index = CONTROLLERS
            .iter()
            .position(|c| *c == holder)
            .with_context(|| format!("no controller replica {holder}"))?;
        let addr = controller_health(index);
        let resp = self
            .netns
            .run(|| http::tcp(&addr, &Request::get("/metrics")))??;
        Ok(resp.text())
    }

    /// The Lease's current holder.
    pub fn lease_holder(&self) -> Result<Option<String>> {
        let leases: Api<Lease> = Api::namespaced(self.client(), LEASE_NAMESPACE);
        let lease = self.block_on(leases.get_opt(LEASE_NAME))?;
        Ok(lease
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty()))
    }

    /// Sends `signal` to one of the node's processes (`podid-install`, `podid-tokend`, a
    /// controller replica).
    pub fn signal(&self, daemon: &str, signal: Signal) -> Result<()> {
        let daemons = self.daemons.lock().unwrap();
        daemons
            .get(daemon)
            .with_context(|| format!("{daemon} is not running"))?
            .signal(signal)
    }

    /// The installer's process name, for [`signal`](Self::signal).
    pub fn installer(&self) -> &'static str {
        INSTALLER
    }

    fn pid(&self, daemon: &str) -> Result<u32> {
        let daemons = self.daemons.lock().unwrap();
        Ok(daemons
            .get(daemon)
            .with_context(|| format!("{daemon} is not running"))?
            .pid())
    }

    fn kill_daemon(&self, daemon: &str) -> Result<()> {
        let taken = self.daemons.lock().unwrap().remove(daemon);
        taken
            .with_context(|| format!("{daemon} is not running"))?
            .kill()
    }

    fn insert(&self, name: &str, daemon: Daemon) {
        self.daemons.lock().unwrap().insert(name.to_owned(), daemon);
    }

    /// A client of the API server, for the test's own reads and writes (kubectl).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Creates the namespaced `obj` and returns it as stored.
    pub fn create<K>(&self, obj: &K) -> Result<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        self.block_on(crate::objects::create(self.client(), obj))
    }

    /// Creates a Secret and remembers its values for the log scan.
    pub fn create_secret(&self, secret: &Secret) -> Result<Secret> {
        {
            let mut record = self.record.lock().unwrap();
            for value in secret.data.iter().flat_map(|d| d.values()) {
                record.secrets.push(value.0.clone());
            }
        }
        self.create(secret)
    }

    /// Remembers a secret value handed to the node another way (a certificate's password).
    pub fn remember_secret(&self, value: &str) {
        self.record
            .lock()
            .unwrap()
            .secrets
            .push(value.as_bytes().to_vec());
    }

    pub fn delete<K>(&self, namespace: &str, name: &str) -> Result<()>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        self.block_on(crate::objects::delete::<K>(self.client(), namespace, name))
    }

    /// Every AzureAssignedIdentity in the cluster.
    pub fn assignments(&self) -> Result<Vec<AzureAssignedIdentity>> {
        let api: Api<AzureAssignedIdentity> = Api::all(self.client());
        Ok(self.block_on(api.list(&ListParams::default()))?.items)
    }

    /// The kubelet: the Pod is created in the API scheduled on this node, its sandbox netns is
    /// made, the conflist is read from the conf dir as it is at that moment, and ADD runs
    /// through it (retried, as the kubelet retries a sandbox, when podid answers code 11).
    pub fn start_pod(&self, pod: PodBuilder) -> Result<SysPod> {
        let created = Instant::now();
        let object: PodObject = self.create(&pod.on_node(&self.name).build())?;
        let namespace = object.metadata.namespace.clone().unwrap_or_default();
        let name = object.metadata.name.clone().unwrap_or_default();
        let uid = object
            .metadata
            .uid
            .clone()
            .context("the API server set no uid")?;
        let labels = object.metadata.labels.clone().unwrap_or_default();
        let netns = Netns::new("spod")?;
        let conflist = wait_for(
            Duration::from_secs(5),
            "a complete primary conflist",
            || self.read_primary(),
        )?;
        let chain_read = Instant::now();
        let chained = Self::is_chained(&conflist);
        let runtime = Runtime::new(conflist, self.cni_path(), self.netns.path());
        let attachment = Attachment::pod(&container_id(), netns.path(), &namespace, &name, &uid);
        let mut add_retries = 0;
        loop {
            match runtime.add(&attachment) {
                Ok(_) => break,
                Err(e) if e.code == Some(11) && add_retries < 5 => {
                    add_retries += 1;
                    let _ = runtime.del(&attachment);
                }
                Err(e) => bail!("ADD of {namespace}/{name}: {e}"),
            }
        }
        Ok(SysPod {
            namespace,
            name,
            uid,
            labels,
            netns,
            attachment,
            runtime,
            created,
            chain_read,
            chained,
            add_retries,
        })
    }

    /// Tears the pod's sandbox down through its chain and deletes the Pod, as the kubelet does.
    pub fn delete_pod(&self, pod: &SysPod) -> Result<()> {
        pod.runtime
            .del(&pod.attachment)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        self.delete::<PodObject>(&pod.namespace, &pod.name)
    }

    /// `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=<resource>[&extra]`
    /// with `Metadata: true` from inside the pod, recorded for [`verify_run`](Self::verify_run).
    /// `Err` when no HTTP answer came (refused, or nothing within `connect_timeout`).
    pub fn token(
        &self,
        pod: &SysPod,
        resource: &str,
        extra: &str,
        connect_timeout: Duration,
    ) -> Result<Response> {
        let resource: String = form_urlencoded::byte_serialize(resource.as_bytes()).collect();
        let mut target =
            format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}");
        if !extra.is_empty() {
            target.push('&');
            target.push_str(extra);
        }
        let req = Request::get(&target).header("Metadata", "true");
        let result = pod.netns.run(|| -> Result<Response> {
            let addr: SocketAddr = IMDS_ADDR.parse()?;
            let stream = TcpStream::connect_timeout(&addr, connect_timeout)
                .with_context(|| format!("connect {IMDS_ADDR}"))?;
            // tokend holds a request for a coming assignment up to --assignment-wait (20 s)
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            req.send(stream, IMDS_ADDR)
        })?;
        self.record.lock().unwrap().answers.push(Answer {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            labels: pod.labels.clone(),
            status: result.as_ref().ok().map(|r| r.status),
            body: result.as_ref().map(Response::text).unwrap_or_default(),
        });
        result
    }

    /// Every answer recorded so far.
    pub fn answers(&self) -> Vec<Answer> {
        self.record.lock().unwrap().answers.clone()
    }

    /// Checks the whole run: (1) every token answer against the node's own identity (client
    /// id, and the token's `oid` and `xms_mirid`): only a pod an AzurePodIdentityException of its
    /// namespace selects may hold one; (2) every process log (the API server, the mocks, the
    /// installer, tokend, both controllers, the plugin) for every token answered, every secret
    /// configured (as is and base64-encoded) and anything JWT-shaped (access tokens, client and
    /// service-account assertions).
    pub fn verify_run(&self) -> Result<RunReport> {
        let exceptions: Api<AzurePodIdentityException> = Api::all(self.client());
        let exceptions = self
            .block_on(exceptions.list(&ListParams::default()))?
            .items;
        let selected = |answer: &Answer| {
            exceptions.iter().any(|e| {
                e.metadata.namespace.as_deref() == Some(answer.namespace.as_str())
                    && !e.spec.pod_labels.is_empty()
                    && e.spec
                        .pod_labels
                        .iter()
                        .all(|(k, v)| answer.labels.get(k) == Some(v))
            })
        };
        let (answers, secrets) = {
            let record = self.record.lock().unwrap();
            (record.answers.clone(), record.secrets.clone())
        };
        let node = &self.node_identity;
        let mut report = RunReport {
            answers: answers.len(),
            ..RunReport::default()
        };
        let mut problems = Vec::new();
        let mut tokens = Vec::new();
        for answer in &answers {
            if answer.status != Some(200) {
                continue;
            }
            let body: Value = serde_json::from_str(&answer.body)
                .with_context(|| format!("a 200 that is not JSON: {}", answer.body))?;
            let token = body["access_token"].as_str().unwrap_or_default().to_owned();
            let claims = decode_claims(&token).unwrap_or(Value::Null);
            let is_node = body["client_id"]
                .as_str()
                .is_some_and(|c| c.eq_ignore_ascii_case(&node.client_id))
                || claims["oid"].as_str() == Some(node.object_id.as_str())
                || claims["xms_mirid"]
                    .as_str()
                    .is_some_and(|r| r.eq_ignore_ascii_case(&node.resource_id));
            if is_node {
                report.node_tokens += 1;
                if !selected(answer) {
                    problems.push(format!(
                        "{}/{} (labels {:?}) got the node's identity: {}",
                        answer.namespace, answer.pod, answer.labels, answer.body
                    ));
                }
            }
            if !token.is_empty() {
                tokens.push(token);
            }
        }
        report.tokens = tokens.len();
        tokens.sort();
        tokens.dedup();
        let mut needles: Vec<(String, String)> = tokens
            .into_iter()
            .map(|t| ("an access token".to_owned(), t))
            .collect();
        let b64 = base64::engine::general_purpose::STANDARD;
        for secret in secrets.iter().filter(|s| s.len() >= 6) {
            if let Ok(text) = std::str::from_utf8(secret) {
                needles.push(("a secret".into(), text.to_owned()));
            }
            needles.push(("a secret, base64".into(), b64.encode(secret)));
        }
        report.needles = needles.len();
        for entry in fs::read_dir(self.dir.path().join("log"))? {
            let path = entry?.path();
            let text = String::from_utf8_lossy(&fs::read(&path)?).into_owned();
            report.logs += 1;
            report.log_bytes += text.len();
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            for (what, needle) in &needles {
                if let Some(at) = text.find(needle.as_str()) {
                    problems.push(format!("{file} holds {what} at byte {at}"));
                }
            }
            if let Some(at) = find_jwt(&text) {
                problems.push(format!(
                    "{file} holds a JWT-shaped value at byte {at}: {}",
                    &text[at..(at + 60).min(text.len())]
                ));
            }
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("\n"));
        }
        Ok(report)
    }

    /// The last lines of every process log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        let Ok(entries) = fs::read_dir(self.dir.path().join("log")) else {
            return out;
        };
        for entry in entries.flatten() {
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "--- {} ---\n{}\n",
                entry.file_name().to_string_lossy(),
                lines[lines.len().saturating_sub(30)..].join("\n")
            ));
        }
        out
    }

    /// A process's log (`podid-tokend`, `podid-install`, `controller-a`, ...).
    pub fn log(&self, daemon: &str) -> String {
        fs::read_to_string(self.log_path(daemon)).unwrap_or_default()
    }

    fn log_path(&self, daemon: &str) -> PathBuf {
        self.dir.path().join(format!("log/{daemon}.log"))
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/tokend.sock")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn cni_log(&self) -> PathBuf {
        self.dir.path().join("log/cni.log")
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("cloud/entra-ca.pem")
    }

    /// `CNI_PATH`: the node's bin dir (where podid-install put the plugin), then Debian's.
    fn cni_path(&self) -> Vec<PathBuf> {
        vec![self.dir.path().join("bin"), bins::DEBIAN_CNI_DIR.into()]
    }
}

impl Drop for System {
    fn drop(&mut self) {
        // processes first (tokend holds listeners in pod netns), then the bridge, netns and dir
        let mut daemons = std::mem::take(self.daemons.get_mut().unwrap_or_else(|e| e.into_inner()));
        for name in [
            INSTALLER,
            TOKEND,
            CONTROLLERS[0],
            CONTROLLERS[1],
            MOCK_AZURE,
            API_SERVER,
        ] {
            drop(daemons.remove(name));
        }
        drop(daemons);
    }
}

fn controller_health(index: usize) -> String {
    format!("127.0.0.1:{}", 2582 + index)
}

/// Spawns `command` with its stdout and stderr appended to `log`, inside `netns` when given;
/// with `hosts`, in a private mount namespace with that file bound over `/etc/hosts` (a
/// hostNetwork container's view of the node's hosts file). The child's pid is the program's.
fn spawn(
    command: Command,
    netns: Option<&Netns>,
    hosts: Option<&Path>,
    log: &Path,
) -> Result<Daemon> {
    let file = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut command = match (hosts, netns) {
        (Some(hosts), Some(netns)) => {
            // unshare gives a mount namespace that still receives new netns mounts (slave), sh
            // binds the hosts file, nsenter enters the node netns; each execs the next
            let mut wrapped = Command::new("unshare");
            wrapped
                .args(["--mount", "--propagation", "slave", "--", "sh", "-c"])
                .arg(r#"mount --bind "$1" /etc/hosts && ns="$2" && shift 2 && exec nsenter --net="$ns" -- "$@""#)
                .arg("sh")
                .arg(hosts)
                .arg(netns.path())
                .arg(command.get_program())
                .args(command.get_args());
            wrapped
        }
        (Some(_), None) => bail!("a hosts file needs a netns"),
        (None, _) => command,
    };
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PODID_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let child = match netns {
        Some(netns) if hosts.is_none() => netns.run(|| command.spawn())??,
        _ => command.spawn()?,
    };
    Ok(Daemon { child })
}

/// Waits until `log` has a line containing `marker`; returns what follows the marker.
fn wait_for_line(log: &Path, marker: &str, timeout: Duration) -> Result<String> {
    wait_for(timeout, marker, || {
        let text = fs::read_to_string(log).ok()?;
        text.lines()
            .find_map(|l| l.split_once(marker).map(|(_, rest)| rest.to_owned()))
    })
    .with_context(|| {
        format!(
            "{}:\n{}",
            log.display(),
            fs::read_to_string(log).unwrap_or_default()
        )
    })
}

/// The byte offset of the first JWT-shaped value (`eyJ…` `.` `eyJ…`: a base64url JSON header
/// and claims) in `text`.
pub fn find_jwt(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let b64url = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    let mut from = 0;
    while let Some(pos) = text[from..].find("eyJ") {
        let start = from + pos;
        let mut i = start;
        while i < bytes.len() && b64url(bytes[i]) {
            i += 1;
        }
        if i - start >= 10 && bytes.get(i) == Some(&b'.') && text[i + 1..].starts_with("eyJ") {
            return Some(start);
        }
        from = start + 3;
    }
    None
}

/// The first token of a pod, polled until it is a 200 or `timeout` passes; with the time it
/// took from `since`.
pub fn first_token(
    system: &System,
    pod: &SysPod,
    since: Instant,
    timeout: Duration,
) -> Result<(Response, Duration)> {
    let deadline = Instant::now() + timeout;
    loop {
        let resp = system.token(pod, ARM, "", Duration::from_secs(2));
        match resp {
            Ok(r) if r.status == 200 => return Ok((r, since.elapsed())),
            Ok(r) if Instant::now() > deadline => {
                bail!(
                    "{}/{}: still {} {}",
                    pod.namespace,
                    pod.name,
                    r.status,
                    r.text()
                )
            }
            Err(e) if Instant::now() > deadline => {
                bail!("{}/{}: {e:#}", pod.namespace, pod.name)
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A random version-4 GUID (client and object ids of test apps).
pub fn guid() -> String {
    let hex = random_hex(16);
    format!(
        "{}-{}-4{}-8{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// `bytes` random bytes as lower-case hex (secret values nobody could guess or log by chance).
pub fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom as _;
    let mut b = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The sum of every series of the metric `name` in an OpenMetrics text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| series.split_once('{').map_or(*series, |(m, _)| m) == name)
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

/// The value of the metric `name` with exactly `labels` in an OpenMetrics text, 0 when absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let mut have: Vec<&str> = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|s| !s.is_empty())
                .collect();
            have.sort_unstable();
            let mut want: Vec<&str> = want.iter().map(String::as_str).collect();
            want.sort_unstable();
            metric == name && have == want
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_shapes_are_found_and_nothing_else() {
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJ4In0.c2ln";
        assert_eq!(find_jwt(&format!("token {token} served")), Some(6));
        assert_eq!(
            find_jwt("eyJ alone, eyJhbGciOiJSUzI1NiJ9 without claims"),
            None
        );
        assert_eq!(find_jwt("nothing here"), None);
    }

    #[test]
    fn metrics_are_read_by_name_and_labels() {
        let text =
            "# TYPE a counter\na_total{kind=\"x\",op=\"apply\"} 3\na_total{kind=\"y\"} 4\nb 1\n";
        assert_eq!(
            metric(text, "a_total", &[("op", "apply"), ("kind", "x")]),
            3.0
        );
        assert_eq!(metric(text, "b", &[]), 1.0);
        assert_eq!(metric(text, "c", &[]), 0.0);
    }
}
