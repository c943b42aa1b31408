//! A simulated node: its own network namespace holding the CNI chain's bridge and a real
//! `podid-tokend`, with temporary conf, bin, IPAM, state and log dirs, and a fake Kubernetes API
//! server of its own (in the test process, bridged into the node netns at `127.0.0.1:6443`).
//! The harness plays the kubelet: a pod is created in the API, scheduled on the node, then its
//! sandbox goes through the CNI chain. Nothing is created in the machine's own netns or under
//! its `/etc/cni`, `/opt/cni`, `/var/lib/podid`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node as NodeObject, Pod as PodObject};
use kube::api::{Api, ObjectMeta, PostParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use podid_api::wire::{PodList, PodState};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::bins;
use crate::bridge::TcpBridge;
use crate::fakeapi::FakeApiServer;
use crate::http::{self, Request, Response};
use crate::netns::Netns;
use crate::objects::{self, PodBuilder};
use crate::runtime::{Attachment, Runtime};

/// Where the node's daemons reach the Kubernetes API, inside the node netns.
pub const API_ADDR: &str = "127.0.0.1:6443";

/// The metadata endpoint as a pod calls it.
pub const IMDS_ADDR: &str = "169.254.169.254:80";
/// A well-formed token request, as `DefaultAzureCredential` sends it.
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F";

/// How the plugin entry of the node's conflist is set up.
#[derive(Debug, Clone)]
pub struct PluginSettings {
    pub timeout_ms: u64,
    pub failure_policy: &'static str,
    pub fail_open_namespaces: Vec<String>,
}

impl Default for PluginSettings {
    fn default() -> Self {
        Self {
            timeout_ms: 2000,
            failure_policy: "Fail",
            fail_open_namespaces: vec!["kube-system".into()],
        }
    }
}

/// One simulated node.
#[derive(Debug)]
pub struct Node {
    pub netns: Netns,
    dir: TempDir,
    /// The node's name in the API (`spec.nodeName` of its pods).
    pub name: String,
    pub listener_port: u16,
    pub bridge: String,
    pub subnet: String,
    tokend: Mutex<Option<Child>>,
    tokend_log: PathBuf,
    tokend_args: Mutex<Vec<String>>,
    hosts: Mutex<Option<PathBuf>>,
    /// Kept for its lifetime: it carries the daemons' API traffic into the node netns.
    _api_bridge: TcpBridge,
    api: Option<FakeApiServer>,
    rt: tokio::runtime::Runtime,
}

static NODES: AtomicU32 = AtomicU32::new(0);

impl Node {
    /// A node netns with `lo` up, temp dirs, the plugin installed in its bin dir, and its API
    /// server holding the Node object.
    pub fn new(tag: &str) -> Result<Self> {
        let n = NODES.fetch_add(1, Ordering::Relaxed);
        let netns = Netns::new(&format!("node-{tag}"))?;
        netns.exec_ok("ip", &["link", "set", "lo", "up"])?;
        let dir = tempfile::Builder::new().prefix("podid-node-").tempdir()?;
        for sub in ["bin", "conf", "ipam", "state", "run", "log"] {
            fs::create_dir_all(dir.path().join(sub))?;
        }
        fs::copy(bins::plugin()?, dir.path().join("bin/podid")).context("installing the plugin")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let api = rt.block_on(FakeApiServer::start())?;
        let api_bridge = TcpBridge::into_netns(&netns, API_ADDR.parse()?, api.addr())?;
        fs::write(
            dir.path().join("kubeconfig"),
            crate::fakeapi::kubeconfig(&format!("http://{API_ADDR}")),
        )?;
        let id = (std::process::id() + n) % 200;
        let node = Self {
            name: format!("node-{tag}-{n}"),
            listener_port: 3000 + (n % 1000) as u16,
            bridge: format!("pdbr{}", n % 10000),
            subnet: format!("10.{}.{}.0/24", 100 + id / 100, (id % 100) + n % 100),
            tokend: Mutex::new(None),
            tokend_log: dir.path().join("log/tokend.log"),
            tokend_args: Mutex::new(Vec::new()),
            hosts: Mutex::new(None),
            netns,
            dir,
            _api_bridge: api_bridge,
            api: Some(api),
            rt,
        };
        let nodes: Api<NodeObject> = Api::all(node.client());
        let object = NodeObject {
            metadata: ObjectMeta {
                name: Some(node.name.clone()),
                ..ObjectMeta::default()
            },
            ..NodeObject::default()
        };
        node.block_on(nodes.create(&PostParams::default(), &object))?;
        Ok(node)
    }

    /// The node's fake API server.
    pub fn api(&self) -> &FakeApiServer {
        self.api
            .as_ref()
            .expect("the API server lives as long as the node")
    }

    /// A client of the node's API server, for the test's own reads and writes.
    pub fn client(&self) -> kube::Client {
        let _guard = self.rt.enter();
        self.api().client()
    }

    /// Runs `f` on the node's async runtime (where its API server and mocks run).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The node's async runtime, for servers a test starts next to the API server.
    pub fn async_runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    /// Creates the namespaced `obj` in the node's API server and returns it as stored.
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

    /// Deletes the namespaced object `namespace/name` of kind `K` from the node's API server.
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

    /// The kubeconfig tokend and the controller use, pointing at [`API_ADDR`].
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/tokend.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn pending_dir(&self) -> PathBuf {
        podid_api::defaults::pending_dir(&self.state_dir())
    }

    pub fn cni_log(&self) -> PathBuf {
        self.dir.path().join("log/cni.log")
    }

    pub fn tokend_log(&self) -> String {
        fs::read_to_string(&self.tokend_log).unwrap_or_default()
    }

    /// `CNI_PATH`: the node's bin dir (our plugin, as in `/opt/cni/bin`) then Debian's plugins.
    pub fn cni_path(&self) -> Vec<PathBuf> {
        vec![self.dir.path().join("bin"), bins::DEBIAN_CNI_DIR.into()]
    }

    /// Debian's `bridge` with `host-local` IPAM and a default route through the bridge.
    pub fn bridge_entry(&self) -> Value {
        json!({
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
        })
    }

    /// Our plugin's entry, pointing at this node's tokend and dirs.
    pub fn podid_entry(&self, settings: &PluginSettings) -> Value {
        json!({
            "type": "podid",
            "socket": self.socket(),
            "stateDir": self.state_dir(),
            "logFile": self.cni_log(),
            "timeoutMs": settings.timeout_ms,
            "failurePolicy": settings.failure_policy,
            "failOpenNamespaces": settings.fail_open_namespaces,
        })
    }

    /// Debian's Go `tuning` plugin setting one sysctl in the pod netns.
    pub fn tuning_entry(&self) -> Value {
        json!({"type": "tuning", "sysctl": {"net.ipv4.conf.all.log_martians": "1"}})
    }

    /// A runtime for a conflist of `plugins` at `version`.
    pub fn runtime(&self, version: &str, plugins: Vec<Value>) -> Runtime {
        let conflist = json!({"cniVersion": version, "name": "podid-test", "plugins": plugins});
        let path = self.dir.path().join(format!("conf/{version}.conflist"));
        let _ = fs::write(
            path,
            serde_json::to_vec_pretty(&conflist).unwrap_or_default(),
        );
        Runtime::new(conflist, self.cni_path(), self.netns.path())
    }

    /// `[bridge, podid]` at `version` with default plugin settings.
    pub fn chain(&self, version: &str) -> Runtime {
        self.chain_with(version, &PluginSettings::default())
    }

    pub fn chain_with(&self, version: &str, settings: &PluginSettings) -> Runtime {
        self.runtime(
            version,
            vec![self.bridge_entry(), self.podid_entry(settings)],
        )
    }

    /// Starts tokend inside the node netns and waits until it reports ready.
    pub fn start_tokend(&self) -> Result<()> {
        self.spawn_tokend()?;
        self.wait_tokend_ready(Duration::from_secs(10))
    }

    /// Extra tokend flags for the next starts (rate limits, `--ca-file`, ...).
    pub fn set_tokend_args(&self, args: &[&str]) {
        *self.tokend_args.lock().unwrap() = args.iter().map(|a| (*a).to_owned()).collect();
    }

    /// The hosts file tokend sees (the node netns' own, as `ip netns exec` gives one): tokend
    /// then runs in a private mount namespace with it bound over `/etc/hosts`.
    pub fn set_hosts(&self, entries: &[(&str, std::net::IpAddr)]) -> Result<()> {
        let path = self.dir.path().join("hosts");
        let mut text = String::from("127.0.0.1 localhost\n");
        for (name, ip) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        fs::write(&path, text)?;
        *self.hosts.lock().unwrap() = Some(path);
        Ok(())
    }

    /// Starts tokend without waiting for it.
    pub fn spawn_tokend(&self) -> Result<()> {
        let mut slot = self.tokend.lock().unwrap();
        if slot.is_some() {
            bail!("tokend already runs on this node");
        }
        let binary = bins::tokend()?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.tokend_log)?;
        let mut args: Vec<String> = vec![
            "--node-name".into(),
            self.name.clone(),
            "--kubeconfig".into(),
            self.kubeconfig().display().to_string(),
            "--socket".into(),
            self.socket().display().to_string(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
            "--listener-port".into(),
            self.listener_port.to_string(),
            "--health-addr".into(),
            "127.0.0.1:2580".into(),
        ];
        args.extend(self.tokend_args.lock().unwrap().iter().cloned());
        let mut command = match self.hosts.lock().unwrap().as_ref() {
            // unshare gives a mount namespace that still receives the host's new netns mounts
            // (slave, as a container with HostToContainer propagation), sh binds the hosts file, nsenter enters
            // the node netns; each execs the next, so the child's pid is tokend's.
            Some(hosts) => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "slave", "--", "sh", "-c"])
                    .arg(r#"mount --bind "$1" /etc/hosts && ns="$2" && shift 2 && exec nsenter --net="$ns" -- "$@""#)
                    .arg("sh")
                    .arg(hosts)
                    .arg(self.netns.path())
                    .arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        command
            .args(&args)
            .env("PODID_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let hosts = self.hosts.lock().unwrap().is_some();
        let child = if hosts {
            command.spawn()?
        } else {
            self.netns.run(|| command.spawn())??
        };
        *slot = Some(child);
        Ok(())
    }

    pub fn wait_tokend_ready(&self, timeout: Duration) -> Result<()> {
        wait_for(timeout, "tokend to report ready", || {
            http::unix(&self.socket(), &Request::get("/v1/status"))
                .ok()
                .filter(|r| r.status == 200)
        })
        .map(|_| ())
        .with_context(|| format!("tokend log:\n{}", self.tokend_log()))
    }

    /// `kill -9` tokend and reap it.
    pub fn kill_tokend(&self) -> Result<()> {
        self.signal_tokend(Signal::SIGKILL)?;
        if let Some(mut child) = self.tokend.lock().unwrap().take() {
            child.wait()?;
        }
        Ok(())
    }

    /// Sends `signal` to the running tokend (SIGSTOP makes it up but not answering).
    pub fn signal_tokend(&self, signal: Signal) -> Result<()> {
        let slot = self.tokend.lock().unwrap();
        let child = slot.as_ref().context("tokend is not running")?;
        kill(Pid::from_raw(child.id() as i32), signal)?;
        Ok(())
    }

    /// tokend's view of every pod it serves.
    pub fn tokend_pods(&self) -> Result<Vec<PodState>> {
        let resp = http::unix(&self.socket(), &Request::get("/v1/pods"))?;
        if resp.status != 200 {
            bail!("GET /v1/pods: {} {}", resp.status, resp.text());
        }
        Ok(serde_json::from_slice::<PodList>(&resp.body)?.pods)
    }

    /// tokend's view of one attachment, `None` when it does not know it.
    pub fn tokend_pod(&self, container_id: &str) -> Result<Option<PodState>> {
        Ok(self
            .tokend_pods()?
            .into_iter()
            .find(|p| p.bound.record.container_id == container_id))
    }

    /// A pod scheduled on this node (created in the API first, as the kubelet would find it)
    /// and its sandbox netns with a containerd-style attachment (nothing runs yet).
    pub fn pod(&self, namespace: &str, name: &str) -> Result<Pod> {
        self.pod_from(objects::pod(namespace, name))
    }

    /// Like [`pod`](Self::pod), from a builder (labels, service account).
    pub fn pod_from(&self, pod: PodBuilder) -> Result<Pod> {
        let created: PodObject = self.create(&pod.on_node(&self.name).build())?;
        let namespace = created.metadata.namespace.clone().unwrap_or_default();
        let name = created.metadata.name.clone().unwrap_or_default();
        let uid = created
            .metadata
            .uid
            .clone()
            .context("the API server set no uid")?;
        let netns = Netns::new("pod")?;
        let attachment = Attachment::pod(&container_id(), netns.path(), &namespace, &name, &uid);
        Ok(Pod {
            netns,
            attachment,
            uid,
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.tokend.get_mut().ok().and_then(Option::take) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(api) = self.api.take() {
            self.rt.block_on(api.shutdown());
        }
    }
}

/// A pod sandbox: its netns and how the runtime describes it.
#[derive(Debug)]
pub struct Pod {
    pub netns: Netns,
    pub attachment: Attachment,
    /// The pod's UID in the API (`K8S_POD_UID`).
    pub uid: String,
}

impl Pod {
    pub fn container_id(&self) -> &str {
        &self.attachment.container_id
    }

    /// Sends `req` to `169.254.169.254:80` from inside the pod, like any program in it would.
    pub fn imds(&self, req: &Request) -> Result<Response> {
        self.netns.run(|| http::tcp(IMDS_ADDR, req))?
    }

    /// A well-formed token request with `Metadata: true`.
    pub fn token_request(&self) -> Result<Response> {
        self.imds(&Request::get(TOKEN_PATH).header("Metadata", "true"))
    }

    /// `nft list ruleset` inside the pod.
    pub fn ruleset(&self) -> Result<String> {
        self.netns.exec_ok("nft", &["list", "ruleset"])
    }
}

/// A 64-hex container id, unique in this process.
pub fn container_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:016x}{:08x}{:08x}{:032x}",
        nanos as u64,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// Polls `f` every 20 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
