//! The local demo (`./demo.sh`, the README's first command): one simulated node on this machine,
//! run step by step with each step's duration. The harness plays the kubelet, the scheduler and
//! the container runtime; podid's four binaries run for real as processes; the seeds' example
//! `conf/examples/rgapi` is applied as an operator would; Python `azure-identity`'s
//! `DefaultAzureCredential` runs unmodified inside the pod's network namespace.
//!
//! Everything it creates (network namespaces, processes, temp dirs) is owned by values whose
//! `Drop` removes it, so an error or a Ctrl-C (see [`Cancel`]) cleans up as well as a full run.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node as NodeObject, Pod as PodObject, Taint};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use podid_api::crd::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding};
use serde_json::{Value, json};

use crate::bins::{self, workspace_root};
use crate::cloud::{CLOUD_SIDE, Cloud};
use crate::http::{self, Request};
use crate::mocks::entra::EntraMock;
use crate::mocks::imds::{ImdsMock, ManagedIdentity};
use crate::netns::Netns;
use crate::node::{Node, Pod, container_id};
use crate::objects;
use crate::runtime::{Attachment, Runtime};
use crate::sdk::{self, Call, Outcome, Sdk};
use crate::world::{CloudMocks, ENTRA_HOST};

/// The example the demo applies, relative to the workspace root.
pub const EXAMPLE: &str = "conf/examples/rgapi";
/// The node's startup taint, removed by podid-install once the node is protected.
pub const STARTUP_TAINT: &str = "podid.io/agent-not-ready";
/// The second pod: same namespace, no `aadpodidbinding` label.
pub const UNBOUND_POD: &str = "no-identity";
/// Where the primary network's config goes in the node's conf dir.
const PRIMARY_CONFLIST: &str = "10-bridge.conflist";
const CONTROLLER_HEALTH: &str = "127.0.0.1:2582";
const INSTALLER_HEALTH: &str = "127.0.0.1:2584";
/// How long the demo waits for a daemon to report ready or for the controller to act.
const READY_WAIT: Duration = Duration::from_secs(30);
const STEPS: usize = 13;

/// Set once by the signal thread (SIGINT or SIGTERM); every wait of the demo checks it.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Interrupted)` once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            return Err(Interrupted.into());
        }
        Ok(())
    }

    /// Sleeps `d` unless cancelled meanwhile.
    fn sleep(&self, d: Duration) -> Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.check()?;
            std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
        }
        self.check()
    }

    /// Polls `f` every 50 ms until it returns `Some`, the demo is cancelled, or `timeout`.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let start = Instant::now();
        loop {
            self.check()?;
            if let Some(v) = f()? {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            self.sleep(Duration::from_millis(50))?;
        }
    }
}

/// The demo stopped because of SIGINT or SIGTERM.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// True when `e` is (or wraps) [`Interrupted`].
pub fn is_interrupted(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<Interrupted>().is_some())
}

/// Live progress on stdout: one header per step, indented details, the step's duration.
#[derive(Debug)]
pub struct Progress<W: Write> {
    out: W,
    cancel: Cancel,
    step: usize,
    started: Instant,
}

impl<W: Write> Progress<W> {
    /// Progress on `out`; a step that ends once `cancel` is set is reported as interrupted,
    /// whatever the error (a process that got the forwarded signal fails its step).
    pub fn new(out: W, cancel: &Cancel) -> Self {
        Self {
            out,
            cancel: cancel.clone(),
            step: 0,
            started: Instant::now(),
        }
    }

    pub fn line(&mut self, text: impl fmt::Display) {
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
    }

    pub fn detail(&mut self, text: impl fmt::Display) {
        for line in text.to_string().lines() {
            self.line(format_args!("        {line}"));
        }
    }

    /// Runs one step: prints its title, then `ok (<duration>)` or what went wrong.
    pub fn step<T>(&mut self, title: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.step += 1;
        let n = self.step;
        self.line(format_args!("[{n:>2}/{STEPS}] {title}"));
        let started = Instant::now();
        let result = f(self);
        let took = seconds(started.elapsed());
        let result = match result {
            // The cause (a process that got the forwarded signal) is noise then.
            Err(_) if self.cancel.is_cancelled() => Err(Interrupted.into()),
            other => other,
        };
        match &result {
            Ok(_) => self.line(format_args!("        ok ({took})")),
            Err(e) if is_interrupted(e) => self.line(format_args!("        interrupted ({took})")),
            Err(e) => self.line(format_args!("        FAILED after {took}: {e:#}")),
        }
        result
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// `1.23 s`.
pub fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// What a finished run saw, for the caller and the closing lines.
#[derive(Debug, Clone)]
pub struct Report {
    pub client_id: String,
    pub unbound_pod_refused: bool,
}

/// Runs the whole demo; everything it created is removed when this returns, also on error
/// and on cancellation (then the error is [`Interrupted`]). The node's temp dir goes into
/// `node_dir` as soon as it exists, for the caller's check that it is gone.
pub fn run<W: Write>(
    cancel: &Cancel,
    p: &mut Progress<W>,
    node_dir: &mut Option<PathBuf>,
) -> Result<Report> {
    p.line("podid local demo: one simulated Kubernetes node on this machine.");
    p.line("Simulated: the API server, the kubelet, the scheduler, the container runtime, the");
    p.line(
        "VM's IMDS and Entra ID. Real: podid's four binaries, Debian's CNI plugins, Linux netns",
    );
    p.line(
        "and nftables, and Python azure-identity in the pod. Summary at the end; Ctrl-C cleans up.",
    );
    p.line("");

    p.step("Check this machine", |p| check_machine(p))?;
    cancel.check()?;
    p.step(
        "Build podid's binaries (cargo build --release, the plugin static)",
        |p| {
            for (name, path) in [
                ("podid (CNI plugin)", bins::plugin()?),
                ("podid-tokend", bins::tokend()?),
                ("podid-controller", bins::controller()?),
                ("podid-install", bins::installer()?),
            ] {
                cancel.check()?;
                p.detail(format_args!("{name:<20} {}", path.display()));
            }
            Ok(())
        },
    )?;
    cancel.check()?;
    let mut sim = p.step(
        "Node: network namespace, fake Kubernetes API server, Node object with the startup taint",
        |p| Sim::node(p),
    )?;
    *node_dir = Some(sim.node.dir().to_path_buf());
    let result = sim.demonstrate(cancel, p);
    match result {
        // The explicit teardown reports each part; on failure `Drop` does the same silently.
        Ok(report) => p
            .step(
                "Tear down: pods through CNI DEL, daemons, namespaces, temp dirs",
                |p| {
                    sim.teardown(p);
                    Ok(())
                },
            )
            .map(|()| report),
        Err(e) => {
            drop(sim);
            Err(e)
        }
    }
}

fn check_machine<W: Write>(p: &mut Progress<W>) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("run as root: the demo creates network namespaces and nftables tables");
    }
    for tool in ["ip", "nft", "unshare", "nsenter", "sysctl"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join(tool))
            .find(|p| p.is_file());
        if found.is_none() {
            bail!("{tool} is not on PATH: apt-get install nftables iproute2 util-linux procps");
        }
    }
    let bridge = bins::debian_plugin("bridge")?;
    bins::debian_plugin("host-local")?;
    p.detail(format_args!(
        "root, ip, nft, Debian's CNI plugins in {}",
        bridge.parent().unwrap_or(Path::new("")).display()
    ));
    let python = sdk::python()?;
    p.detail(format_args!(
        "Python azure-identity (pinned in tests/sdk/python/requirements.txt) in {}",
        python
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new(""))
            .display()
    ));
    Ok(())
}

/// A daemon the demo started: stopped with SIGTERM (then SIGKILL) when dropped.
#[derive(Debug)]
struct Daemon {
    name: &'static str,
    pid: u32,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Spawns `command` inside `netns`, its output appended to `log`.
    fn spawn_in(
        netns: &Netns,
        name: &'static str,
        mut command: Command,
        log: PathBuf,
    ) -> Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = netns
            .run(|| command.spawn())?
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name,
            pid: child.id(),
            child: Some(child),
            log,
        })
    }

    /// Fails with the log's tail when the daemon has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{} exited ({status}); its log:\n{}",
                self.name,
                tail.join("\n")
            );
        }
        Ok(())
    }

    /// SIGTERM, up to 5 s to exit, then SIGKILL.
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A pod the harness started: its API object and its sandbox.
#[derive(Debug)]
struct SimPod {
    namespace: String,
    name: String,
    uid: String,
    created: Instant,
    /// The sandbox, once the kubelet part created it.
    sandbox: Option<Pod>,
}

/// The simulated node and everything around it. Fields drop in order: pods, daemons, mocks,
/// the cloud netns, then the node (tokend, API server, node netns, temp dirs).
#[derive(Debug)]
struct Sim {
    pods: Vec<SimPod>,
    chain: Option<Runtime>,
    installer: Option<Daemon>,
    controller: Option<Daemon>,
    imds: Option<ImdsMock>,
    entra: Option<EntraMock>,
    cloud: Option<Cloud>,
    node: Node,
}

impl Sim {
    fn node<W: Write>(p: &mut Progress<W>) -> Result<Self> {
        let node = Node::new("demo")?;
        let nodes: Api<NodeObject> = Api::all(node.client());
        let taint = Taint {
            key: STARTUP_TAINT.into(),
            value: Some("true".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        };
        node.block_on(nodes.patch(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": [taint]}})),
        ))
        .context("tainting the node")?;
        // podid-install puts the plugin there (Node::new pre-installs it for the test suites).
        fs::remove_file(node.dir().join("bin/podid"))?;
        p.detail(format_args!(
            "node {} in netns {} (pods on bridge {}, subnet {})",
            node.name,
            node.netns.name(),
            node.bridge,
            node.subnet
        ));
        p.detail(format_args!(
            "fake API server {} in this process, reached from the node at 127.0.0.1:6443",
            node.api().url()
        ));
        p.detail(format_args!(
            "node dirs (CNI bin and conf, tokend state, logs) under {}",
            node.dir().display()
        ));
        p.detail(format_args!("taint {STARTUP_TAINT}=true:NoSchedule: no pod lands here before podid protects the node"));
        Ok(Self {
            pods: Vec::new(),
            chain: None,
            installer: None,
            controller: None,
            imds: None,
            entra: None,
            cloud: None,
            node,
        })
    }

    fn demonstrate<W: Write>(&mut self, cancel: &Cancel, p: &mut Progress<W>) -> Result<Report> {
        cancel.check()?;
        p.step(
            "Cloud: mock node IMDS and mock Entra ID in their own netns, routed from the node",
            |p| self.cloud(p),
        )?;
        cancel.check()?;
        p.step(
            "podid-controller (Deployment replica, here a process in the node netns)",
            |p| self.controller(cancel, p),
        )?;
        cancel.check()?;
        p.step(
            "Primary network: Debian's bridge + host-local conflist in the node's conf dir",
            |p| self.primary_conflist(p),
        )?;
        cancel.check()?;
        p.step(
            "podid-tokend (DaemonSet, host network: the node netns)",
            |p| self.tokend(cancel, p),
        )?;
        cancel.check()?;
        p.step(
            "podid-install: plugin into the bin dir, podid chained into the conflist, host guard, taint removed",
            |p| self.installer(cancel, p),
        )?;
        cancel.check()?;
        let identity = p.step(&format!("Operator: kubectl apply -k {EXAMPLE}"), |p| {
            self.apply_example(p)
        })?;
        let client_id = identity.spec.client_id.clone().unwrap_or_default();
        cancel.check()?;
        let first = p.step(
            "Kubelet: schedule pod rgapi/rgapi, create its sandbox through the CNI chain [bridge, podid]",
            |p| {
                let pod = self.pods.iter().find(|x| x.name == "rgapi").context("pod rgapi was not applied")?;
                let (namespace, name) = (pod.namespace.clone(), pod.name.clone());
                self.start_sandbox(cancel, p, &namespace, &name)
            },
        )?;
        cancel.check()?;
        p.step(
            "In pod rgapi: Python azure-identity DefaultAzureCredential().get_token(\"https://management.azure.com/.default\")",
            |p| self.token_for_rgapi(cancel, p, first, &identity),
        )?;
        cancel.check()?;
        let refused = p.step(
            &format!("A second pod rgapi/{UNBOUND_POD} without aadpodidbinding label: DefaultAzureCredential again"),
            |p| self.no_token_without_binding(cancel, p),
        )?;
        Ok(Report {
            client_id,
            unbound_pod_refused: refused,
        })
    }

    fn cloud<W: Write>(&mut self, p: &mut Progress<W>) -> Result<()> {
        let cloud = Cloud::attach(&self.node)?;
        let cloud_ns = cloud.netns.name().to_owned();
        let mocks = CloudMocks::start(&self.node, &cloud);
        self.cloud = Some(cloud);
        let CloudMocks {
            imds,
            entra,
            vm,
            system: _,
            ca,
        } = mocks?;
        let ca = ca.display().to_string();
        let authority = format!("https://{ENTRA_HOST}");
        self.node.set_tokend_args(&[
            "--authority-host",
            authority.as_str(),
            "--ca-file",
            ca.as_str(),
        ]);
        p.detail(format_args!(
            "netns {cloud_ns}: IMDS at {} (VM {}), Entra ID at https://{ENTRA_HOST} ({}, test CA)",
            imds.url(),
            vm.name,
            CLOUD_SIDE
        ));
        p.detail("as on Azure, IMDS is off the node: a route, so pod traffic to it is forwarded (what the host guard drops)");
        self.imds = Some(imds);
        self.entra = Some(entra);
        Ok(())
    }

    fn controller<W: Write>(&mut self, cancel: &Cancel, p: &mut Progress<W>) -> Result<()> {
        let mut command = Command::new(bins::controller()?);
        command
            .args([
                "--kubeconfig",
                &self.node.kubeconfig().display().to_string(),
            ])
            .args(["--health-addr", CONTROLLER_HEALTH])
            .args(["--holder-identity", "podid-controller-demo-0"])
            .args(["--lease-namespace", "podid-system"])
            .env_clear()
            .env("PODID_LOG", "info");
        let daemon = Daemon::spawn_in(
            &self.node.netns,
            "podid-controller",
            command,
            self.node.dir().join("log/controller.log"),
        )?;
        p.detail(format_args!(
            "pid {}, log {}",
            daemon.pid,
            daemon.log.display()
        ));
        let controller = self.controller.insert(daemon);
        let netns = &self.node.netns;
        cancel.wait_for(READY_WAIT, "podid-controller's /readyz", || {
            controller.check_running()?;
            Ok(readyz(netns, CONTROLLER_HEALTH).filter(|(status, _)| *status == 200))
        })?;
        p.detail("ready: caches synced, holds the Lease podid-system/podid-controller");
        Ok(())
    }

    fn primary_conflist<W: Write>(&mut self, p: &mut Progress<W>) -> Result<()> {
        let conflist = json!({
            "cniVersion": "0.3.0",
            "name": "demo-bridge",
            "plugins": [self.node.bridge_entry()],
        });
        let path = self.node.dir().join("conf").join(PRIMARY_CONFLIST);
        fs::write(&path, serde_json::to_string_pretty(&conflist)? + "\n")?;
        p.detail(format_args!(
            "{} (cniVersion 0.3.0, as AKS's 10-azure.conflist; written as the primary network's own installer would)",
            path.display()
        ));
        Ok(())
    }

    fn tokend<W: Write>(&mut self, cancel: &Cancel, p: &mut Progress<W>) -> Result<()> {
        self.node.spawn_tokend()?;
        let socket = self.node.socket();
        cancel
            .wait_for(READY_WAIT, "tokend to report ready", || {
                Ok(http::unix(&socket, &Request::get("/v1/status"))
                    .ok()
                    .filter(|r| r.status == 200))
            })
            .with_context(|| format!("tokend's log:\n{}", self.node.tokend_log()))?;
        p.detail(format_args!(
            "socket {}, listener port {} in each pod netns, log {}",
            socket.display(),
            self.node.listener_port,
            self.node.dir().join("log/tokend.log").display()
        ));
        Ok(())
    }

    fn installer<W: Write>(&mut self, cancel: &Cancel, p: &mut Progress<W>) -> Result<()> {
        let dir = self.node.dir();
        let path = |sub: &str| dir.join(sub).display().to_string();
        let mut command = Command::new(bins::installer()?);
        command
            .args(["--cni-bin-dir", &path("bin")])
            .args(["--cni-conf-dir", &path("conf")])
            .args(["--plugin-binary", &bins::plugin()?.display().to_string()])
            .args(["--node-name", &self.node.name])
            .args([
                "--kubeconfig",
                &self.node.kubeconfig().display().to_string(),
            ])
            .args(["--health-addr", INSTALLER_HEALTH])
            .args(["--socket", &self.node.socket().display().to_string()])
            .args(["--state-dir", &self.node.state_dir().display().to_string()])
            .args(["--install-state-dir", &path("state/install")])
            .args(["--log-file", &self.node.cni_log().display().to_string()])
            .env_clear()
            .env("PODID_LOG", "info");
        let daemon = Daemon::spawn_in(
            &self.node.netns,
            "podid-install",
            command,
            dir.join("log/install.log"),
        )?;
        p.detail(format_args!(
            "pid {}, log {}",
            daemon.pid,
            daemon.log.display()
        ));
        let installer = self.installer.insert(daemon);
        let netns = &self.node.netns;
        let body = cancel.wait_for(READY_WAIT, "podid-install's /readyz", || {
            installer.check_running()?;
            Ok(readyz(netns, INSTALLER_HEALTH)
                .filter(|(status, _)| *status == 200)
                .map(|(_, body)| body))
        })?;
        p.detail(format_args!(
            "/readyz: {}",
            body.split_whitespace().collect::<Vec<_>>().join(" ")
        ));

        let (file, conflist) = load_conflist(&dir.join("conf"))?;
        let types: Vec<&str> = conflist["plugins"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["type"].as_str()).collect())
            .unwrap_or_default();
        p.detail(format_args!("{} now chains {types:?}", file.display()));
        if types.last() != Some(&"podid") {
            bail!(
                "podid-install reported ready but {} chains {types:?}",
                file.display()
            );
        }
        let guard = netns.exec_ok("nft", &["list", "table", "ip", "podid-guard"])?;
        let rule = guard
            .lines()
            .find(|l| l.contains("169.254.169.254"))
            .map(str::trim)
            .unwrap_or("(no rule)");
        p.detail(format_args!("host guard in the node netns: {rule}"));
        let taints = node_taints(&self.node)?;
        if taints.iter().any(|t| t == STARTUP_TAINT) {
            bail!("the startup taint is still on the node: {taints:?}");
        }
        p.detail(format_args!(
            "taint {STARTUP_TAINT} removed from node {}",
            self.node.name
        ));
        // The runtime reads the conf dir as a container runtime does: the first config by name.
        self.chain = Some(Runtime::new(
            conflist,
            self.node.cni_path(),
            self.node.netns.path(),
        ));
        Ok(())
    }

    /// `kubectl apply -k conf/examples/rgapi`: the kustomization's resources, in its order.
    fn apply_example<W: Write>(&mut self, p: &mut Progress<W>) -> Result<AzureIdentity> {
        let dir = workspace_root().join(EXAMPLE);
        let objects = example_objects(&dir)?;
        let mut identity = None;
        for object in objects {
            let kind = object["kind"].as_str().unwrap_or_default().to_owned();
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            match kind.as_str() {
                "Namespace" => p.detail(format_args!(
                    "namespace/{name}: nothing to create (the fake API server keeps no Namespace objects)"
                )),
                "AzureIdentity" => {
                    let object: AzureIdentity = serde_json::from_value(object)?;
                    // What the walk-through's `az vmss identity assign` did beforehand.
                    let attached = ManagedIdentity::new(
                        object.spec.client_id.as_deref().context("the identity has no clientID")?,
                        &random_guid()?,
                        object.spec.resource_id.as_deref().unwrap_or_default(),
                    );
                    self.imds.as_ref().context("no mock IMDS")?.attach(attached.clone());
                    p.detail(format_args!(
                        "(az vmss identity assign, simulated: the mock IMDS now has {name} attached, object id {})",
                        attached.object_id
                    ));
                    let created = self.node.create(&object)?;
                    p.detail(format_args!(
                        "azureidentity.aadpodidentity.k8s.io/{name} created (type 0, clientID {})",
                        created.spec.client_id.as_deref().unwrap_or_default()
                    ));
                    identity = Some(created);
                }
                "AzureIdentityBinding" => {
                    let object: AzureIdentityBinding = serde_json::from_value(object)?;
                    let created = self.node.create(&object)?;
                    p.detail(format_args!(
                        "azureidentitybinding.aadpodidentity.k8s.io/{name} created (selector {:?})",
                        created.spec.selector.as_deref().unwrap_or_default()
                    ));
                }
                "Pod" => {
                    let object: PodObject = serde_json::from_value(object)?;
                    let namespace = object.metadata.namespace.clone().unwrap_or_else(|| "default".into());
                    let pod = self.create_pod(&object)?;
                    p.detail(format_args!(
                        "pod/{name} created in namespace {namespace}, labels {:?}, not scheduled yet",
                        object.metadata.labels.unwrap_or_default()
                    ));
                    self.pods.push(pod);
                }
                other => bail!("{EXAMPLE}: no support for kind {other}"),
            }
        }
        identity.with_context(|| format!("{EXAMPLE} holds no AzureIdentity"))
    }

    /// Creates the Pod object (unscheduled); its sandbox comes with [`start_sandbox`].
    ///
    /// [`start_sandbox`]: Self::start_sandbox
    fn create_pod(&self, object: &PodObject) -> Result<SimPod> {
        let created = Instant::now();
        let stored = self.node.create(object)?;
        let namespace = stored.metadata.namespace.clone().unwrap_or_default();
        let name = stored.metadata.name.clone().unwrap_or_default();
        let uid = stored
            .metadata
            .uid
            .clone()
            .context("the API server set no uid")?;
        Ok(SimPod {
            namespace,
            name,
            uid,
            created,
            sandbox: None,
        })
    }

    /// The scheduler's and the kubelet's part: `spec.nodeName` once the node is untainted, then
    /// the sandbox through the conflist, as containerd runs it.
    fn start_sandbox<W: Write>(
        &mut self,
        cancel: &Cancel,
        p: &mut Progress<W>,
        namespace: &str,
        name: &str,
    ) -> Result<usize> {
        let index = self
            .pods
            .iter()
            .position(|x| x.namespace == namespace && x.name == name)
            .with_context(|| format!("no pod {namespace}/{name}"))?;
        cancel.wait_for(READY_WAIT, "the node to lose its startup taint", || {
            Ok((!node_taints(&self.node)?.iter().any(|t| t == STARTUP_TAINT)).then_some(()))
        })?;
        let pods: Api<PodObject> = Api::namespaced(self.node.client(), namespace);
        self.node.block_on(pods.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": self.node.name}})),
        ))?;
        p.detail(format_args!(
            "scheduled: spec.nodeName = {}",
            self.node.name
        ));
        let chain = self.chain.as_ref().context("no CNI chain yet")?;
        let pod = &mut self.pods[index];
        let netns = Netns::new(&format!("pod-{name}"))?;
        let attachment = Attachment::pod(&container_id(), netns.path(), namespace, name, &pod.uid);
        let sandbox = pod.sandbox.insert(Pod {
            netns,
            attachment,
            uid: pod.uid.clone(),
        });
        let started = Instant::now();
        let outputs = chain
            .add(&sandbox.attachment)
            .map_err(|e| anyhow::anyhow!("CNI ADD: {e}"))?;
        let result: Value = outputs
            .last()
            .map(|o| serde_json::from_slice(&o.stdout))
            .transpose()?
            .unwrap_or_default();
        let ip = result["ips"][0]["address"].as_str().unwrap_or("?");
        p.detail(format_args!(
            "sandbox netns {}, container id {}…",
            sandbox.netns.name(),
            &sandbox.container_id()[..12]
        ));
        p.detail(format_args!(
            "CNI ADD [bridge, podid] in {}: eth0 {ip}",
            seconds(started.elapsed())
        ));
        let ruleset = sandbox.ruleset()?;
        let redirect = ruleset
            .lines()
            .find(|l| l.contains("redirect"))
            .map(str::trim)
            .context("no redirect in the pod's nftables ruleset")?;
        p.detail(format_args!("in the pod, table ip podid: {redirect}"));
        Ok(index)
    }

    fn token_for_rgapi<W: Write>(
        &mut self,
        cancel: &Cancel,
        p: &mut Progress<W>,
        index: usize,
        identity: &AzureIdentity,
    ) -> Result<()> {
        let pod = &self.pods[index];
        let sandbox = pod.sandbox.as_ref().context("no sandbox")?;
        p.detail("the pod's container (az login --identity) is not run; its application is this SDK call");
        let call = Call::default_credential(Sdk::Python);
        cancel.check()?;
        let outcome = call.run_in(sandbox.netns.path())?;
        cancel.check()?;
        let since_created = pod.created.elapsed();
        if !outcome.ok() {
            bail!(
                "DefaultAzureCredential got no token: {}: {}\n{}",
                outcome.error(),
                outcome.message(),
                outcome.stderr
            );
        }
        let claims = &outcome.printed["claims"];
        let client_id = identity.spec.client_id.as_deref().unwrap_or_default();
        if claims["appid"] != client_id {
            bail!(
                "the token is for appid {}, not rgapi's client id {client_id}",
                claims["appid"]
            );
        }
        let expires_on = outcome.printed["expires_on"].as_i64().unwrap_or_default();
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
        p.detail(format_args!(
            "TOKEN for identity rgapi/rgapi: client id {}",
            claims["appid"].as_str().unwrap_or_default()
        ));
        p.detail(format_args!(
            "  object id   {}",
            claims["oid"].as_str().unwrap_or_default()
        ));
        p.detail(format_args!(
            "  resource id {}",
            claims["xms_mirid"].as_str().unwrap_or_default()
        ));
        p.detail(format_args!(
            "  audience    {}",
            claims["aud"].as_str().unwrap_or_default()
        ));
        p.detail(format_args!(
            "  tenant      {}",
            claims["tid"].as_str().unwrap_or_default()
        ));
        p.detail(format_args!(
            "  expires     {} (in {})",
            utc(expires_on),
            hours_minutes(expires_on - now)
        ));
        p.detail(format_args!(
            "  pod created -> token: {} (get_token itself {:.2} s, the Python process {})",
            seconds(since_created),
            outcome.seconds(),
            seconds(outcome.wall)
        ));
        p.detail(format_args!(
            "  token SHA-256 {} (the token itself is never printed)",
            outcome.token_sha256()
        ));
        for a in self.assignments_of(&pod.uid, &pod.namespace)? {
            p.detail(format_args!(
                "AzureAssignedIdentity {}/{} written by podid-controller: status {}",
                pod.namespace,
                a.metadata.name.unwrap_or_default(),
                a.status.and_then(|s| s.status).unwrap_or_default()
            ));
        }
        for line in tokend_answers(&self.node.tokend_log()).iter().take(3) {
            p.detail(format_args!("tokend: {line}"));
        }
        Ok(())
    }

    fn no_token_without_binding<W: Write>(
        &mut self,
        cancel: &Cancel,
        p: &mut Progress<W>,
    ) -> Result<bool> {
        let object = objects::pod("rgapi", UNBOUND_POD).build();
        let pod = self.create_pod(&object)?;
        p.detail(format_args!(
            "pod/{UNBOUND_POD} created in namespace rgapi, no labels"
        ));
        self.pods.push(pod);
        let index = self.start_sandbox(cancel, p, "rgapi", UNBOUND_POD)?;
        cancel.check()?;
        let pod = &self.pods[index];
        let sandbox = pod.sandbox.as_ref().context("no sandbox")?;
        let outcome: Outcome =
            Call::default_credential(Sdk::Python).run_in(sandbox.netns.path())?;
        cancel.check()?;
        if outcome.ok() {
            bail!(
                "a pod without binding got a token: {}",
                outcome.printed["claims"]
            );
        }
        let message = outcome.message();
        let imds_said = message
            .lines()
            .find(|l| l.contains("ManagedIdentityCredential"))
            .unwrap_or(message);
        p.detail(format_args!(
            "NO TOKEN: {} after {} ({})",
            outcome.error(),
            seconds(outcome.wall),
            imds_said.trim()
        ));
        let refused = message.contains("Identity not found");
        if !refused {
            bail!(
                "DefaultAzureCredential failed, but not with IMDS's \"Identity not found\": {message}"
            );
        }
        p.detail("tokend answered 400 Identity not found at once, so the credential chain moved on; the node's own identity was never reachable");
        let assignments = self.assignments_of(&pod.uid, "rgapi")?;
        p.detail(format_args!(
            "AzureAssignedIdentities for this pod: {}",
            assignments.len()
        ));
        Ok(refused)
    }

    fn assignments_of(&self, uid: &str, namespace: &str) -> Result<Vec<AzureAssignedIdentity>> {
        let api: Api<AzureAssignedIdentity> = Api::namespaced(self.node.client(), namespace);
        let list = self.node.block_on(api.list(&ListParams::default()))?;
        Ok(list
            .items
            .into_iter()
            .filter(|a| a.spec.pod_uid.as_deref() == Some(uid))
            .collect())
    }

    /// The orderly teardown, reporting each part; `Drop` removes whatever is left.
    fn teardown<W: Write>(mut self, p: &mut Progress<W>) {
        for pod in self.pods.drain(..).rev() {
            let mut done = Vec::new();
            if let (Some(chain), Some(sandbox)) = (&self.chain, &pod.sandbox) {
                done.push(chain.del(&sandbox.attachment).map_or_else(
                    |e| format!("CNI DEL failed: {e}"),
                    |()| "CNI DEL [podid, bridge] ok".into(),
                ));
            }
            done.push(
                self.node
                    .delete::<PodObject>(&pod.namespace, &pod.name)
                    .map_or_else(
                        |e| format!("delete failed: {e:#}"),
                        |()| "Pod deleted".into(),
                    ),
            );
            if let Some(sandbox) = pod.sandbox {
                done.push(format!("netns {} removed", sandbox.netns.name()));
            }
            p.detail(format_args!(
                "pod {}/{}: {}",
                pod.namespace,
                pod.name,
                done.join(", ")
            ));
        }
        for daemon in [self.installer.take(), self.controller.take()]
            .into_iter()
            .flatten()
        {
            let mut daemon = daemon;
            let status = daemon.stop();
            p.detail(format_args!(
                "{} (pid {}) stopped: {}",
                daemon.name,
                daemon.pid,
                status.map_or_else(|| "gone".into(), |s| s.to_string())
            ));
        }
        let _ = self.node.kill_tokend();
        p.detail("podid-tokend stopped");
        if let Some(imds) = self.imds.take() {
            self.node.block_on(imds.shutdown());
        }
        if let Some(entra) = self.entra.take() {
            self.node.block_on(entra.shutdown());
        }
        if let Some(cloud) = self.cloud.take() {
            let name = cloud.netns.name().to_owned();
            drop(cloud);
            p.detail(format_args!("mocks stopped, cloud netns {name} removed"));
        }
        let (netns, dir) = (
            self.node.netns.name().to_owned(),
            self.node.dir().display().to_string(),
        );
        drop(self);
        p.detail(format_args!(
            "fake API server stopped, node netns {netns} and {dir} removed"
        ));
    }
}

/// `(status, body)` of `GET /readyz` at `addr` inside `netns`, `None` when nothing answers.
fn readyz(netns: &Netns, addr: &str) -> Option<(u16, String)> {
    netns
        .run(|| http::tcp(addr, &Request::get("/readyz")))
        .ok()?
        .ok()
        .map(|r| (r.status, r.text()))
}

fn node_taints(node: &Node) -> Result<Vec<String>> {
    let nodes: Api<NodeObject> = Api::all(node.client());
    let object = node.block_on(nodes.get(&node.name))?;
    Ok(object
        .spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| t.key)
        .collect())
}

/// The network config a runtime would use: libcni's order (`.conf`, `.conflist`, `.json` by
/// name), the first that is a list.
pub fn load_conflist(dir: &Path) -> Result<(PathBuf, Value)> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let hidden = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
            !hidden && matches!(ext, "conf" | "conflist" | "json")
        })
        .collect();
    files.sort();
    for file in files {
        let Ok(value) = serde_json::from_slice::<Value>(&fs::read(&file)?) else {
            continue;
        };
        if value["plugins"].is_array() && value["name"].is_string() {
            return Ok((file, value));
        }
    }
    bail!("no network config list in {}", dir.display())
}

/// The objects of a kustomization dir, in the order of its `resources`.
pub fn example_objects(dir: &Path) -> Result<Vec<Value>> {
    let file = dir.join("kustomization.yaml");
    let kustomization: Value = serde_saphyr::from_str(&fs::read_to_string(&file)?)
        .with_context(|| file.display().to_string())?;
    let resources = kustomization["resources"]
        .as_array()
        .with_context(|| format!("{}: no resources", file.display()))?;
    let mut objects = Vec::new();
    for resource in resources {
        let path = dir.join(resource.as_str().context("a resource that is no string")?);
        let text = fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).with_context(|| path.display().to_string())?;
        objects.extend(docs.into_iter().filter(|d| !d.is_null()));
    }
    Ok(objects)
}

/// tokend's `imds request answered` lines, shortened to their fields.
fn tokend_answers(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("imds request answered"))
        .map(|l| {
            let l = l.find("imds request answered").map_or(l, |i| &l[i..]);
            l.replace("imds request answered", "answered")
                .trim()
                .to_owned()
        })
        .collect()
}

/// A random GUID (the kernel's).
fn random_guid() -> Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/random/uuid")?
        .trim()
        .to_owned())
}

/// `2026-01-02 03:04:05 UTC` from Unix seconds.
pub fn utc(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (year, month, day) = podid_api::time::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn hours_minutes(secs: i64) -> String {
    format!("{} h {:02} min", secs / 3600, secs % 3600 / 60)
}

/// What was real and what was simulated, for the closing lines.
pub const SUMMARY: &str = "\
What ran for real:
  - podid's four binaries, release builds: the podid CNI plugin (static, exec'd by the chain),
    podid-tokend, podid-controller and podid-install, each its own process
  - Debian's bridge and host-local CNI plugins as the primary network, Linux network namespaces,
    veth pairs, a bridge and nf_tables (the pod's redirect of 169.254.169.254:80, the host guard)
  - Python azure-identity's DefaultAzureCredential, unmodified, inside each pod's network namespace
  - the manifests of conf/examples/rgapi (the seeds' AKS pod-identity walk-through)
What was simulated:
  - the Kubernetes API server: podid's fake API server in this process (no auth, RBAC, admission,
    Namespace objects or OpenAPI validation)
  - the kubelet, the scheduler and the container runtime: this program creates the Pod objects,
    sets spec.nodeName, and runs the conflist like libcni; no container runs (a pod is a netns)
  - the node: a network namespace of this machine, not a VM; the daemons run there, not in pods
  - the VM's IMDS and Entra ID: mocks in a \"cloud\" netns routed from the node; tokens are signed
    by a test key and are valid nowhere; `az vmss identity assign` is the mock IMDS being told
    that rgapi is attached; rgapi is type 0, so its tokens come from the mock IMDS (Entra ID
    would serve service-principal and federated identities)";

/// Network namespaces, direct child processes and the node dir this process still has.
pub fn leftovers(node_dir: Option<&Path>) -> Vec<String> {
    let mut left = Vec::new();
    let prefix = format!("pdt{}-", std::process::id());
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                left.push(format!("network namespace {name}"));
            }
        }
    }
    for pid in children_of(std::process::id()) {
        left.push(format!("process {pid}"));
    }
    if let Some(dir) = node_dir
        && dir.exists()
    {
        left.push(format!("directory {}", dir.display()));
    }
    left
}

/// Pids whose parent is `parent`, from `/proc`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| parent_of(*pid) == Some(parent))
        .collect()
}

/// The parent pid from `/proc/<pid>/stat` (after the command name, which may hold spaces).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_767_323_045), "2026-01-02 03:04:05 UTC");
    }

    #[test]
    fn the_example_is_the_seeds_walk_through() {
        let objects = example_objects(&workspace_root().join(EXAMPLE)).unwrap();
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            ["Namespace", "AzureIdentity", "AzureIdentityBinding", "Pod"]
        );
        assert_eq!(objects[3]["metadata"]["labels"]["aadpodidbinding"], "rgapi");
    }

    #[test]
    fn the_runtime_takes_the_first_list_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let list = |name: &str| json!({"cniVersion": "0.3.0", "name": name, "plugins": [{"type": "bridge"}]});
        fs::write(dir.path().join("20-b.conflist"), list("b").to_string()).unwrap();
        fs::write(dir.path().join("10-a.conflist"), list("a").to_string()).unwrap();
        fs::write(dir.path().join(".podid-tmp-1"), list("tmp").to_string()).unwrap();
        fs::write(dir.path().join("05-broken.conflist"), "{").unwrap();
        let (file, value) = load_conflist(dir.path()).unwrap();
        assert_eq!(file, dir.path().join("10-a.conflist"));
        assert_eq!(value["name"], "a");
    }
}
