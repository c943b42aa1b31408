//! `podid-install` as it runs on a node: the release binary inside a network namespace of its
//! own (where its host guard goes), with temp CNI bin, conf and state dirs. Nothing touches the
//! machine's own netns, `/etc/cni`, `/opt/cni` or `/var/lib/podid`. Run as root.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node as NodeObject, Taint};
use kube::Api;
use kube::api::{Patch, PatchParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use podid_tests::bins;
use podid_tests::cloud::Cloud;
use podid_tests::http::{self, Request};
use podid_tests::netns::Netns;
use podid_tests::node::{Node, wait_for};
use podid_tests::runtime::Runtime;
use serde_json::{Value, json};
use tempfile::TempDir;

/// The bound the tests allow for what the installer targets within 1 s.
const WAIT: Duration = Duration::from_secs(5);
const HEALTH: &str = "127.0.0.1:2584";
const TAINT_KEY: &str = "podid.io/agent-not-ready";

fn fixture(name: &str) -> String {
    let path = bins::workspace_root()
        .join("install/tests/fixtures")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The plugin entry the installer writes for [`Installer::start`]'s flags.
fn entry(state: &Path) -> Value {
    json!({
        "type": "podid",
        "socket": "/var/run/podid/tokend.sock",
        "timeoutMs": 2000,
        "failurePolicy": "Fail",
        "failOpenNamespaces": ["kube-system"],
        "stateDir": state,
        "logFile": "/var/log/podid/cni.log",
    })
}

/// `original` with `entry` appended to its plugins, as ordered JSON text.
fn chained_json(original: &str, entry: &Value) -> String {
    let mut value: Value = serde_json::from_str(original).unwrap();
    value["plugins"].as_array_mut().unwrap().push(entry.clone());
    value.to_string()
}

fn ordered(text: &str) -> Option<String> {
    serde_json::from_str::<Value>(text)
        .ok()
        .map(|v| v.to_string())
}

/// One installer in a netns, with its dirs.
struct Installer {
    child: Option<Child>,
    dir: TempDir,
    netns_path: PathBuf,
    netns_name: String,
    /// The netns, when the installer has one of its own (deleted last).
    _netns: Option<Netns>,
}

impl Installer {
    /// A fresh netns (lo up) and dirs.
    fn new(tag: &str) -> Self {
        let netns = Netns::new(tag).unwrap();
        netns.exec_ok("ip", &["link", "set", "lo", "up"]).unwrap();
        let mut inst = Self::on(&netns);
        inst._netns = Some(netns);
        inst
    }

    /// Dirs for an installer running in `netns` (a simulated node's, owned by the node).
    fn on(netns: &Netns) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("podid-install-")
            .tempdir()
            .unwrap();
        for sub in ["bin", "conf", "state"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        Self {
            child: None,
            dir,
            netns_path: netns.path().to_owned(),
            netns_name: netns.name().to_owned(),
            _netns: None,
        }
    }

    /// Runs `f` on a thread inside the installer's netns.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        podid_tests::netns::in_netns(&self.netns_path, f).unwrap()
    }

    /// Runs a command inside the installer's netns; its stdout when it succeeds.
    fn exec(&self, program: &str, args: &[&str]) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns_name, program])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("install.log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn put(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.conf().join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn command(&self, extra: &[&str]) -> Command {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut command = Command::new(bins::installer().unwrap());
        command
            .args(["--cni-bin-dir", &self.bin().display().to_string()])
            .args(["--cni-conf-dir", &self.conf().display().to_string()])
            .args([
                "--install-state-dir",
                &self.state().join("install").display().to_string(),
            ])
            .args([
                "--plugin-binary",
                &bins::plugin().unwrap().display().to_string(),
            ])
            .args(["--health-addr", HEALTH]);
        if !extra.contains(&"--state-dir") {
            command.args(["--state-dir", &self.state().display().to_string()]);
        }
        command
            .args(extra)
            .env_clear()
            .env("PODID_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        command
    }

    /// Starts the installer inside the netns.
    fn start(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "already running");
        let mut command = self.command(extra);
        self.child = Some(self.run(|| command.spawn()).unwrap());
    }

    /// Runs the installer to completion inside the netns (`--uninstall`).
    fn run_once(&self, extra: &[&str]) -> ExitStatus {
        let mut command = self.command(extra);
        self.run(|| command.status()).unwrap()
    }

    fn readyz(&self) -> Option<(u16, String)> {
        self.run(|| http::tcp(HEALTH, &Request::get("/readyz")))
            .ok()
            .map(|r| (r.status, r.text()))
    }

    fn wait_ready(&self) {
        let ready = wait_for(Duration::from_secs(30), "the installer to be ready", || {
            self.readyz().filter(|(status, _)| *status == 200)
        });
        if let Err(e) = ready {
            panic!("{e}: {:?}\nlog:\n{}", self.readyz(), self.log());
        }
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn guard(&self) -> Option<String> {
        self.exec("nft", &["list", "table", "ip", "podid-guard"])
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const GUARD_LISTING: &str = "table ip podid-guard {
\tcomment \"podid host guard: pods never reach the node's IMDS; kept on exit\"
\tchain forward {
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tip daddr 169.254.169.254 counter packets 0 bytes 0 drop
\t}
}
";

#[test]
fn installs_chains_guards_and_leaves_everything_on_sigterm_until_uninstall() {
    let mut inst = Installer::new("inst");
    let original = fixture("10-azure.conflist");
    let broken = fixture("00-broken.conflist");
    let azure = inst.put("10-azure.conflist", &original, 0o600);
    inst.put("00-broken.conflist", &broken, 0o644);
    inst.start(&["--remove-taint=false"]);
    inst.wait_ready();

    let want = chained_json(&original, &entry(&inst.state()));
    assert_eq!(ordered(&fs::read_to_string(&azure).unwrap()).unwrap(), want);
    assert_eq!(fs::metadata(&azure).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(
        fs::read_to_string(inst.conf().join("00-broken.conflist")).unwrap(),
        broken
    );
    let log = inst.log();
    assert!(
        log.contains("skipping an invalid network config") && log.contains("00-broken.conflist"),
        "{log}"
    );
    let plugin = inst.bin().join("podid");
    assert_eq!(
        fs::read(&plugin).unwrap(),
        fs::read(bins::plugin().unwrap()).unwrap()
    );
    assert_eq!(fs::metadata(&plugin).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(inst.guard().as_deref(), Some(GUARD_LISTING));

    // A deleted binary comes back.
    fs::remove_file(&plugin).unwrap();
    wait_for(WAIT, "the plugin binary back", || {
        plugin.exists().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", inst.log()));

    // SIGTERM: exit 0, everything stays.
    let chained = fs::read(&azure).unwrap();
    let meta = fs::metadata(&azure).unwrap();
    assert!(inst.stop().success(), "{}", inst.log());
    assert!(inst.log().contains("stay in place"), "{}", inst.log());
    assert_eq!(fs::read(&azure).unwrap(), chained);
    assert!(plugin.exists());
    assert_eq!(inst.guard().as_deref(), Some(GUARD_LISTING));

    // A restart (rolling update) changes nothing: same inodes, same mtimes.
    let binary = fs::metadata(&plugin).unwrap();
    inst.start(&["--remove-taint=false"]);
    inst.wait_ready();
    assert_unchanged(&azure, &meta);
    assert_unchanged(&plugin, &binary);
    assert!(inst.stop().success());

    // --uninstall: the original bytes back, the binary and the guard kept.
    let status = inst.run_once(&["--uninstall"]);
    assert!(status.success(), "{}", inst.log());
    assert_eq!(fs::read_to_string(&azure).unwrap(), original);
    assert_eq!(fs::metadata(&azure).unwrap().mode() & 0o7777, 0o600);
    assert!(
        plugin.exists(),
        "the binary stays for the DEL of existing pods"
    );
    assert_eq!(inst.guard().as_deref(), Some(GUARD_LISTING));
    assert!(inst.log().contains("uninstalled"), "{}", inst.log());
}

/// Fails unless `path` is still the very file `before` describes: not rewritten, not replaced.
fn assert_unchanged(path: &Path, before: &fs::Metadata) {
    let now = fs::metadata(path).unwrap();
    assert_eq!(
        (now.ino(), now.mtime(), now.mtime_nsec(), now.len()),
        (
            before.ino(),
            before.mtime(),
            before.mtime_nsec(),
            before.len()
        ),
        "{} was written again",
        path.display()
    );
}

#[test]
fn a_1_0_0_conflist_is_chained_once_and_restored_by_uninstall() {
    let mut inst = Installer::new("inst100");
    let original = fixture("10-containerd-net.conflist");
    let path = inst.put("10-containerd-net.conflist", &original, 0o644);
    inst.start(&["--remove-taint=false"]);
    inst.wait_ready();
    let chained = fs::read_to_string(&path).unwrap();
    assert_eq!(
        ordered(&chained).unwrap(),
        chained_json(&original, &entry(&inst.state()))
    );
    assert!(chained.starts_with("{\n \"cniVersion\": \"1.0.0\",\n \"name\": \"containerd-net\","));
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o644);
    let meta = fs::metadata(&path).unwrap();
    assert!(inst.stop().success());
    inst.start(&["--remove-taint=false"]);
    inst.wait_ready();
    assert_unchanged(&path, &meta);
    assert!(inst.stop().success());
    assert!(inst.run_once(&["--uninstall"]).success(), "{}", inst.log());
    assert_eq!(fs::read_to_string(&path).unwrap(), original);
    // Uninstalling again finds nothing to do and changes nothing.
    let meta = fs::metadata(&path).unwrap();
    assert!(inst.run_once(&["--uninstall"]).success(), "{}", inst.log());
    assert_unchanged(&path, &meta);
    assert!(
        inst.log().contains("no network config holds podid"),
        "{}",
        inst.log()
    );
}

#[test]
fn a_lone_conf_is_converted_and_restored_by_uninstall() {
    let mut inst = Installer::new("instconf");
    let original = fixture("10-bridge.conf");
    inst.put("10-bridge.conf", &original, 0o644);
    inst.start(&["--remove-taint=false"]);
    inst.wait_ready();
    let meta = fs::metadata(inst.conf().join("10-bridge.conflist")).unwrap();
    assert!(inst.stop().success());
    inst.start(&["--remove-taint=false"]);
    inst.wait_ready();
    assert_unchanged(&inst.conf().join("10-bridge.conflist"), &meta);
    let list = fs::read_to_string(inst.conf().join("10-bridge.conflist")).unwrap();
    let value: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(value["cniVersion"], "0.3.1");
    assert_eq!(value["name"], "containerd-net");
    assert_eq!(
        value["plugins"],
        json!([
            serde_json::from_str::<Value>(&original).unwrap(),
            entry(&inst.state())
        ])
    );
    assert!(!inst.conf().join("10-bridge.conf").exists());
    assert!(inst.stop().success());
    assert!(inst.run_once(&["--uninstall"]).success(), "{}", inst.log());
    assert_eq!(
        fs::read_to_string(inst.conf().join("10-bridge.conf")).unwrap(),
        original
    );
    assert!(!inst.conf().join("10-bridge.conflist").exists());
}

/// How the primary's owner rewrites its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// AKS's azure-cni installer (dropgz): rename the file aside, then O_TRUNC-create it and
    /// write it in pieces.
    Dropgz,
    /// azure-cns: write a temp file, rename it over.
    Cns,
}

/// The writer's content for rewrite `i`: the AKS list, made distinct per rewrite.
fn rewrite_content(i: usize) -> String {
    fixture("10-azure.conflist").replace("169.254.20.10", &format!("169.254.20.{}", 10 + i))
}

/// Rewrites `path` as its owner would, mode 600 as AgentBaker leaves it.
fn rewrite(path: &Path, content: &str, style: Style) {
    match style {
        Style::Dropgz => {
            fs::rename(path, path.with_extension("conflist.old")).unwrap();
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .unwrap();
            let bytes = content.as_bytes();
            for piece in bytes.chunks(bytes.len().div_ceil(4)) {
                file.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Style::Cns => {
            let tmp = path.with_extension("conflist.tmp");
            fs::write(&tmp, content).unwrap();
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).unwrap();
            fs::rename(&tmp, path).unwrap();
        }
    }
}

/// One version the owner wrote: its text, and as ordered JSON without and with our entry.
#[derive(Debug)]
struct Version {
    text: String,
    theirs: String,
    chained: String,
}

/// Every version the owner has written so far.
type Written = Arc<Mutex<Vec<Version>>>;

fn record(written: &Written, text: &str, ours: &Value) {
    written.lock().unwrap().push(Version {
        text: text.to_owned(),
        theirs: ordered(text).unwrap(),
        chained: chained_json(text, ours),
    });
}

/// What the reader saw.
#[derive(Debug, Default)]
struct Reads {
    total: usize,
    /// Reads of a file the owner was still writing (a prefix of a version).
    partial: usize,
    /// Complete reads of an owner's version without our entry.
    theirs: usize,
    /// Complete reads of an owner's version with our entry last.
    ours: usize,
    /// Anything else: a partial read holding our entry, or content nobody wrote.
    violations: Vec<String>,
}

impl Reads {
    fn violation(&mut self, what: String) {
        if self.violations.len() < 5 {
            self.violations.push(what);
        }
    }
}

/// Reads `path` in a loop until `stop`. Every read must be an owner's version, that version
/// with our entry appended, or (the owner mid-write) a prefix of a version without our entry.
fn reader(path: PathBuf, stop: Arc<AtomicBool>, written: Written) -> JoinHandle<Reads> {
    std::thread::spawn(move || {
        let mut reads = Reads::default();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_micros(200));
            // absent between dropgz's rename aside and its create
            let Ok(bytes) = fs::read(&path) else {
                continue;
            };
            reads.total += 1;
            let text = String::from_utf8_lossy(&bytes);
            let written = written.lock().unwrap();
            match ordered(&text) {
                Some(json) if written.iter().any(|v| v.theirs == json) => reads.theirs += 1,
                Some(json) if written.iter().any(|v| v.chained == json) => reads.ours += 1,
                Some(_) => reads.violation(format!("complete content nobody wrote: {text:?}")),
                None if text.contains("\"podid\"") => {
                    reads.violation(format!("partial content with our entry: {text:?}"))
                }
                None if written.iter().any(|v| v.text.starts_with(text.as_ref())) => {
                    reads.partial += 1
                }
                None => reads.violation(format!("partial content nobody wrote: {text:?}")),
            }
        }
        reads
    })
}

#[test]
fn every_rewrite_is_chained_again_and_never_half_written_by_us() {
    const REWRITES: usize = 30;
    let mut inst = Installer::new("rewrite");
    let ours = entry(&inst.state());
    let written: Written = Arc::default();
    record(&written, &rewrite_content(0), &ours);
    let path = inst.put("10-azure.conflist", &rewrite_content(0), 0o600);
    // A long rescan interval: promptness must come from inotify, not from the timer.
    inst.start(&["--remove-taint=false", "--rescan-interval", "600s"]);
    inst.wait_ready();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = reader(path.clone(), Arc::clone(&stop), Arc::clone(&written));
    let mut latencies = Vec::new();
    for i in 1..=REWRITES {
        let style = if i % 2 == 0 {
            Style::Dropgz
        } else {
            Style::Cns
        };
        let content = rewrite_content(i);
        record(&written, &content, &ours);
        rewrite(&path, &content, style);
        let done = Instant::now();
        let want = chained_json(&content, &ours);
        let waited = wait_for(
            WAIT,
            &format!("rewrite {i} ({style:?}) chained again"),
            || {
                fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| ordered(&t))
                    .filter(|t| *t == want)
            },
        );
        if let Err(e) = waited {
            panic!("{e}: {:?}\nlog:\n{}", fs::read_to_string(&path), inst.log());
        }
        latencies.push(done.elapsed());
        assert_eq!(
            fs::metadata(&path).unwrap().mode() & 0o7777,
            0o600,
            "rewrite {i} ({style:?}): the owner's mode kept"
        );
    }
    // The owner stopped: our entry stays, nothing else is written.
    let last = fs::metadata(&path).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let reads = reads.join().unwrap();
    assert!(reads.violations.is_empty(), "{:?}", reads.violations);
    assert!(reads.ours > 0 && reads.total > 100, "{reads:?}");
    let now = fs::metadata(&path).unwrap();
    assert_eq!(
        (now.ino(), now.mtime_nsec()),
        (last.ino(), last.mtime_nsec())
    );
    latencies.sort();
    eprintln!(
        "re-chain after rewrite: p50 {:?}, max {:?}; reads: {reads:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    );
    let names: Vec<String> = fs::read_dir(inst.conf())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".podid-tmp-")),
        "{names:?}"
    );
    // The installer logged each re-chain.
    let rechained = inst
        .log()
        .matches("chained podid into the primary network config")
        .count();
    assert!(
        rechained >= REWRITES,
        "{rechained} re-chains logged for {REWRITES} rewrites"
    );
}

/// Answers every HTTP request on `listener` with 200 "imds", until `stop`.
fn mock_imds(listener: std::net::TcpListener, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nimds",
            );
        }
    })
}

/// Connects to the metadata address from the calling thread's netns and asks once.
fn ask_imds() -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&Cloud::imds_addr(), Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(
        b"GET /metadata/instance HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n",
    )?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    Ok(out)
}

/// A pod netns behind the node: a veth, an address in the node's pod subnet, a default route
/// through the node.
fn pod_behind(node: &Node) -> Netns {
    let pod = Netns::new("guardpod").unwrap();
    let prefix = node.subnet.trim_end_matches(".0/24");
    let (gateway, address) = (format!("{prefix}.1"), format!("{prefix}.2"));
    let ip = |ns: &Netns, args: &str| {
        ns.exec_ok("ip", &args.split(' ').collect::<Vec<_>>())
            .unwrap();
    };
    ip(
        &node.netns,
        &format!(
            "link add vpod type veth peer name eth0 netns {}",
            pod.name()
        ),
    );
    ip(&node.netns, &format!("addr add {gateway}/24 dev vpod"));
    ip(&node.netns, "link set vpod up");
    ip(&pod, "link set lo up");
    ip(&pod, &format!("addr add {address}/24 dev eth0"));
    ip(&pod, "link set eth0 up");
    ip(&pod, &format!("route add default via {gateway}"));
    pod
}

#[test]
fn the_guard_stops_a_pod_without_its_table_and_never_the_node() {
    let node = Node::new("guard").unwrap();
    let cloud = Cloud::attach(&node).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let imds = mock_imds(cloud.listen(Cloud::imds_addr()).unwrap(), Arc::clone(&stop));
    let pod = pod_behind(&node);
    // The pod had a podid table and deleted it (it would need NET_ADMIN); now it has none.
    pod.exec_ok("nft", &["add", "table", "ip", "podid"])
        .unwrap();
    pod.exec_ok("nft", &["delete", "table", "ip", "podid"])
        .unwrap();
    assert_eq!(pod.exec_ok("nft", &["list", "ruleset"]).unwrap().trim(), "");

    // Before the guard: the route works, from the pod and from the node.
    let from_pod = pod.run(ask_imds).unwrap();
    assert!(
        from_pod.as_ref().is_ok_and(|a| a.ends_with("imds")),
        "{from_pod:?}"
    );
    assert!(node.netns.run(ask_imds).unwrap().unwrap().ends_with("imds"));

    let mut inst = Installer::on(&node.netns);
    inst.put("10-azure.conflist", &fixture("10-azure.conflist"), 0o600);
    inst.start(&["--remove-taint=false", "--guard-interval", "1s"]);
    inst.wait_ready();

    let blocked = pod.run(ask_imds).unwrap();
    assert!(
        blocked
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
        "the pod must be dropped (a timeout, not a refusal): {blocked:?}"
    );
    assert!(
        node.netns.run(ask_imds).unwrap().unwrap().ends_with("imds"),
        "the node's own processes go on the output path, which the guard leaves alone"
    );
    let listing = inst.guard().unwrap();
    assert!(
        !listing.contains("packets 0 bytes 0"),
        "the drop counted the pod's SYNs:\n{listing}"
    );

    // Someone deletes the guard: it is back within the bound, and the pod blocked again.
    node.netns
        .exec_ok("nft", &["delete", "table", "ip", "podid-guard"])
        .unwrap();
    wait_for(WAIT, "the guard back", || inst.guard())
        .unwrap_or_else(|e| panic!("{e}\n{}", inst.log()));
    assert!(pod.run(ask_imds).unwrap().is_err());
    // Someone adds an accept rule to it: replaced by the guard alone.
    node.netns
        .exec_ok(
            "nft",
            &["insert", "rule", "ip", "podid-guard", "forward", "accept"],
        )
        .unwrap();
    wait_for(WAIT, "the guard restored", || {
        inst.guard().filter(|l| {
            l.starts_with(&GUARD_LISTING[..GUARD_LISTING.find("ip daddr").unwrap()])
                && !l.contains("\t\taccept")
        })
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", inst.log()));
    assert!(
        inst.log()
            .contains("the host guard was missing or changed; put it back")
    );
    assert!(inst.stop().success());
    assert!(inst.guard().is_some(), "the guard stays after exit");
    stop.store(true, Ordering::Relaxed);
    imds.join().unwrap();
    drop(cloud);
}

/// A stand-in tokend on `socket`: `GET /v1/status` answers 503 until `ready`, then 200.
struct StubTokend {
    ready: Arc<AtomicBool>,
    asked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StubTokend {
    fn start(socket: &Path) -> Self {
        let listener = UnixListener::bind(socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (ready, asked, stop) = (Arc::clone(&ready), Arc::clone(&asked), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut stream, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut request = Vec::new();
                    let mut buf = [0u8; 512];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    assert!(request.starts_with(b"GET /v1/status HTTP/1.1\r\n"));
                    asked.fetch_add(1, Ordering::Relaxed);
                    let (status, body) = if ready.load(Ordering::Relaxed) {
                        ("200 OK", r#"{"ready":true,"pods":0,"listenerPort":2579}"#)
                    } else {
                        (
                            "503 Service Unavailable",
                            r#"{"ready":false,"pods":0,"listenerPort":2579}"#,
                        )
                    };
                    let _ = stream.write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    );
                }
            })
        };
        Self {
            ready,
            asked,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for StubTokend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn taint(key: &str, effect: &str, value: Option<&str>) -> Taint {
    Taint {
        key: key.into(),
        effect: effect.into(),
        value: value.map(Into::into),
        time_added: None,
    }
}

fn taints_of(node: &Node) -> Vec<(String, String)> {
    let nodes: Api<NodeObject> = Api::all(node.client());
    let object = node.block_on(nodes.get(&node.name)).unwrap();
    object
        .spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.key, t.effect))
        .collect()
}

#[test]
fn the_taint_goes_once_tokend_is_ready_and_only_ours() {
    let node = Node::new("taint").unwrap();
    let nodes: Api<NodeObject> = Api::all(node.client());
    let taints = [
        taint("example.com/dedicated", "NoSchedule", Some("ml")),
        taint(TAINT_KEY, "NoSchedule", None),
        taint(TAINT_KEY, "NoExecute", None),
    ];
    node.block_on(nodes.patch(
        &node.name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"taints": taints}})),
    ))
    .unwrap();
    let mut inst = Installer::on(&node.netns);
    inst.put("10-azure.conflist", &fixture("10-azure.conflist"), 0o600);
    let socket = inst.dir.path().join("tokend.sock");
    let tokend = StubTokend::start(&socket);
    let socket = socket.display().to_string();
    let kubeconfig = node.kubeconfig().display().to_string();
    let flags = [
        "--node-name",
        node.name.as_str(),
        "--kubeconfig",
        kubeconfig.as_str(),
        "--tokend-socket",
        socket.as_str(),
    ];
    inst.start(&flags);

    // Protected, but tokend not ready: the taint stays.
    wait_for(Duration::from_secs(30), "the installer waiting for tokend", || {
        inst.readyz()
            .filter(|(status, body)| {
                *status == 503
                    && body.contains("binary: ok\nchained: ok\nguard: ok\ntaint: waiting for tokend to report ready")
            })
            .filter(|_| tokend.asked.load(Ordering::Relaxed) >= 2)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", inst.readyz(), inst.log()));
    let all: Vec<(String, String)> = taints
        .iter()
        .map(|t| (t.key.clone(), t.effect.clone()))
        .collect();
    assert_eq!(taints_of(&node), all, "not before tokend is ready");

    tokend.ready.store(true, Ordering::Relaxed);
    wait_for(WAIT, "our taint gone", || {
        (taints_of(&node) == [all[0].clone(), all[2].clone()]).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", taints_of(&node), inst.log()));
    inst.wait_ready();
    let object = node.block_on(nodes.get(&node.name)).unwrap();
    let kept = object.spec.unwrap().taints.unwrap();
    assert_eq!(
        kept[0], taints[0],
        "the other taints are left exactly as they were"
    );
    assert_eq!(kept[1], taints[2]);

    // A restart finds no taint: fine, ready again.
    assert!(inst.stop().success());
    inst.start(&flags);
    inst.wait_ready();
    assert!(
        inst.log()
            .contains("the node does not carry the startup taint"),
        "{}",
        inst.log()
    );
}

#[test]
fn a_new_node_takes_pods_once_the_real_tokend_is_ready_and_the_chain_it_wrote_works() {
    let node = Node::new("newnode").unwrap();
    let nodes: Api<NodeObject> = Api::all(node.client());
    // The node pool's startup taint, as `--node-taints podid.io/agent-not-ready=true:NoSchedule`
    // puts it on a new node.
    node.block_on(nodes.patch(
        &node.name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"taints": [taint(TAINT_KEY, "NoSchedule", Some("true"))]}})),
    ))
    .unwrap();
    let mut inst = Installer::on(&node.netns);
    // The primary plugin's installer wrote its list: Debian's bridge, cniVersion 1.0.0.
    let primary =
        json!({"cniVersion": "1.0.0", "name": "podid-test", "plugins": [node.bridge_entry()]});
    let path = inst.put(
        "10-bridge.conflist",
        &serde_json::to_string_pretty(&primary).unwrap(),
        0o644,
    );
    let (socket, state, cni_log, kubeconfig) = (
        node.socket().display().to_string(),
        node.state_dir().display().to_string(),
        node.cni_log().display().to_string(),
        node.kubeconfig().display().to_string(),
    );
    inst.start(&[
        "--node-name",
        &node.name,
        "--kubeconfig",
        &kubeconfig,
        "--socket",
        &socket,
        "--state-dir",
        &state,
        "--log-file",
        &cni_log,
    ]);

    // Chained and guarded, but tokend is not running: the taint stays.
    wait_for(Duration::from_secs(30), "the installer waiting for tokend", || {
        inst.readyz().filter(|(status, body)| {
            *status == 503
                && body.starts_with("binary: ok\nchained: ok\nguard: ok\ntaint: tokend: connecting to tokend at")
        })
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", inst.readyz(), inst.log()));
    std::thread::sleep(Duration::from_secs(1));
    let ours = vec![(TAINT_KEY.to_owned(), "NoSchedule".to_owned())];
    assert_eq!(taints_of(&node), ours, "no pods before tokend is up");

    node.start_tokend().unwrap();
    wait_for(WAIT, "the startup taint gone", || {
        taints_of(&node).is_empty().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", taints_of(&node), inst.log()));
    inst.wait_ready();

    // The chain exactly as the installer left it, run like containerd would, with the plugin
    // binary the installer copied: the pod gets its redirect, and tokend answers it.
    let chained: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let mut want = primary.clone();
    want["plugins"].as_array_mut().unwrap().push(json!({
        "type": "podid",
        "socket": socket,
        "timeoutMs": 2000,
        "failurePolicy": "Fail",
        "failOpenNamespaces": ["kube-system"],
        "stateDir": state,
        "logFile": cni_log,
    }));
    assert_eq!(chained, want);
    let runtime = Runtime::new(
        chained,
        vec![inst.bin(), bins::DEBIAN_CNI_DIR.into()],
        node.netns.path(),
    );
    let pod = node.pod("team-a", "api-0").unwrap();
    let outputs = runtime.add(&pod.attachment).unwrap();
    assert_eq!(outputs.len(), 2);
    assert!(
        pod.ruleset().unwrap().contains("table ip podid"),
        "{:?}",
        pod.ruleset()
    );
    let answer = pod.token_request().unwrap();
    assert_eq!(
        (answer.status, answer.json().unwrap()),
        (
            400,
            json!({"error": "invalid_request", "error_description": "Identity not found"})
        ),
        "a pod with no binding is told so by tokend, not by the node's IMDS"
    );
    runtime.del(&pod.attachment).unwrap();
    assert!(inst.stop().success(), "{}", inst.log());
}
