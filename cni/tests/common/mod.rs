//! Harness of the plugin's root tests: throwaway network namespaces, a fake tokend on a unix
//! socket, and a runner that execs the built `podid` like a container runtime does.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{Value, json};

/// Whether the tests can create network namespaces; they are skipped (loudly) otherwise.
pub fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipping: the podid plugin tests need root (network namespaces, nftables)");
    }
    root
}

/// A named network namespace (`ip netns add`), deleted on drop, even when the test panics.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    pub path: String,
}

impl Netns {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "podid-cni-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ok("ip", &["netns", "add", &name]);
        let path = format!("/run/netns/{name}");
        Self { name, path }
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        output("ip", &all)
    }

    /// `nft list table ip podid`, whitespace collapsed; `None` when there is no such table.
    pub fn podid_table(&self) -> Option<String> {
        let out = self.exec("nft", &["list", "table", "ip", "podid"]);
        out.status
            .success()
            .then(|| collapse(&String::from_utf8_lossy(&out.stdout)))
    }

    /// `nft -j list ruleset`, parsed.
    pub fn ruleset(&self) -> Value {
        let out = self.exec("nft", &["-j", "list", "ruleset"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("nft -j prints JSON")
    }

    /// Runs an nft script inside the namespace.
    pub fn nft(&self, script: &str) {
        let out = self.exec("nft", &[script]);
        assert!(out.status.success(), "nft {script}: {out:?}");
    }

    pub fn lo_is_up(&self) -> bool {
        let out = output("ip", &["-n", &self.name, "-j", "link", "show", "lo"]);
        let links: Value = serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
        links[0]["flags"]
            .as_array()
            .is_some_and(|flags| flags.iter().any(|f| f == "UP"))
    }

    /// Gives the namespace a route out (a veth pair inside it), so a connect to the metadata
    /// address reaches the nat hook instead of failing with ENETUNREACH.
    pub fn add_default_route(&self) {
        let ip = |args: &[&str]| {
            let mut all = vec!["-n", &self.name];
            all.extend_from_slice(args);
            run_ok("ip", &all);
        };
        ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        ip(&["addr", "add", "10.99.0.2/24", "dev", "v0"]);
        ip(&["link", "set", "v0", "up"]);
        ip(&["link", "set", "v1", "up"]);
        ip(&["route", "add", "default", "via", "10.99.0.1"]);
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(&self.path).expect("open netns");
        thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("netns thread")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = output("ip", &["netns", "del", &self.name]);
    }
}

/// `table ip podid` as `nft list` prints it (nft 1.0.6 prints the priority as -100, later
/// versions as `dstnat`).
pub fn expected_table(container_id: &str, daddr: &str, port: u16) -> String {
    collapse(&format!(
        "table ip podid {{ comment \"{container_id}\" chain output {{ type nat hook output priority -100; policy accept; ip daddr {daddr} tcp dport 80 redirect to :{port} }} }}"
    ))
}

pub fn collapse(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("priority dstnat;", "priority -100;")
}

/// Whether the host netns has a podid table (it never may).
pub fn host_has_podid_table() -> bool {
    output("nft", &["list", "table", "ip", "podid"])
        .status
        .success()
}

/// How the fake tokend answers everything, when set.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
}

#[derive(Debug, Default)]
pub struct FakeState {
    /// Port answered to PUT.
    pub port: u16,
    pub ready: bool,
    /// Registered pods by `(containerId, ifname)`, as PodState JSON.
    pub pods: BTreeMap<(String, String), Value>,
    /// Every request: `(method, path, body)`.
    pub requests: Vec<(String, String, String)>,
    pub fixed: Option<Reply>,
}

/// A stateful fake of tokend's API on a unix socket.
pub struct FakeTokend {
    pub socket: PathBuf,
    pub state: Arc<Mutex<FakeState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeTokend {
    pub fn start(socket: &Path, port: u16) -> Self {
        let listener = UnixListener::bind(socket).expect("bind fake tokend");
        let state = Arc::new(Mutex::new(FakeState {
            port,
            ready: true,
            ..FakeState::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        let state = state.clone();
                        thread::spawn(move || serve(conn, &state));
                    }
                }
            })
        };
        Self {
            socket: socket.to_owned(),
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Answers every request with `status` and `body` after `delay`.
    pub fn answer_all(&self, status: u16, body: &str, delay: Duration) {
        self.state.lock().unwrap().fixed = Some(Reply {
            status,
            body: body.to_owned(),
            delay,
        });
    }

    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Registers a pod as if a PUT had bound it.
    pub fn insert(&self, record: Value) {
        let key = (
            record["containerId"].as_str().unwrap().to_owned(),
            record["ifname"].as_str().unwrap().to_owned(),
        );
        let mut state = self.state.lock().unwrap();
        let mut pod = record;
        pod["listenerPort"] = state.port.into();
        pod["listenerBound"] = true.into();
        pod["requests"] = 0.into();
        state.pods.insert(key, pod);
    }
}

impl Drop for FakeTokend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut conn: UnixStream, state: &Mutex<FakeState>) {
    let Some((method, path, body)) = read_request(&mut conn) else {
        return;
    };
    let (status, answer, delay) = {
        let mut state = state.lock().unwrap();
        state
            .requests
            .push((method.clone(), path.clone(), body.clone()));
        match &state.fixed {
            Some(reply) => (reply.status, reply.body.clone(), reply.delay),
            None => {
                let (status, answer) = route(&mut state, &method, &path, &body);
                (status, answer, Duration::ZERO)
            }
        }
    };
    thread::sleep(delay);
    let _ = write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    );
}

fn route(state: &mut FakeState, method: &str, path: &str, body: &str) -> (u16, String) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let not_found = || {
        (
            404,
            json!({"error": format!("{path} not found")}).to_string(),
        )
    };
    match (method, parts.as_slice()) {
        ("GET", ["v1", "status"]) => {
            let status =
                json!({"ready": state.ready, "pods": state.pods.len(), "listenerPort": state.port});
            (if state.ready { 200 } else { 503 }, status.to_string())
        }
        ("GET", ["v1", "pods"]) => {
            let pods: Vec<&Value> = state.pods.values().collect();
            (200, json!({ "pods": pods }).to_string())
        }
        (_, ["v1", "pods", cid, ifname]) => {
            let key = ((*cid).to_owned(), (*ifname).to_owned());
            match method {
                "PUT" => {
                    let Ok(mut pod) = serde_json::from_str::<Value>(body) else {
                        return (400, json!({"error": "invalid record"}).to_string());
                    };
                    pod["listenerPort"] = state.port.into();
                    pod["listenerBound"] = true.into();
                    pod["requests"] = 0.into();
                    state.pods.insert(key, pod);
                    (200, json!({"listenerPort": state.port}).to_string())
                }
                "GET" => match state.pods.get(&key) {
                    Some(pod) => (200, pod.to_string()),
                    None => not_found(),
                },
                "DELETE" => match state.pods.remove(&key) {
                    Some(_) => (200, "{}".to_owned()),
                    None => not_found(),
                },
                _ => (405, json!({"error": "method"}).to_string()),
            }
        }
        _ => not_found(),
    }
}

fn read_request(conn: &mut UnixStream) -> Option<(String, String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let read = conn.read(&mut chunk).ok()?;
        if read == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..read]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(head) = request.parse(&buf).ok()? {
            let length = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= head + length {
                return Some((
                    request.method?.to_owned(),
                    request.path?.to_owned(),
                    String::from_utf8_lossy(&buf[head..head + length]).into_owned(),
                ));
            }
        }
    }
}

/// One plugin setup: a temp dir holding tokend's socket, the state dir and the log.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log_file: PathBuf,
}

impl Setup {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self {
            socket: dir.path().join("run/tokend.sock"),
            state_dir: dir.path().join("state"),
            log_file: dir.path().join("log/cni.log"),
            dir,
        }
    }

    /// Starts a fake tokend answering PUT with `port`.
    pub fn tokend(&self, port: u16) -> FakeTokend {
        std::fs::create_dir_all(self.socket.parent().unwrap()).unwrap();
        FakeTokend::start(&self.socket, port)
    }

    /// The network config: podid's keys pointing into the temp dir, plus `extra`.
    pub fn conf(&self, cni_version: &str, extra: Value) -> Value {
        let mut conf = json!({
            "cniVersion": cni_version,
            "name": "azure",
            "type": "podid",
            "socket": self.socket,
            "stateDir": self.state_dir,
            "logFile": self.log_file,
            "timeoutMs": 1000,
        });
        for (key, value) in extra.as_object().cloned().unwrap_or_default() {
            conf[key] = value;
        }
        conf
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    pub fn spool_file(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.state_dir
            .join("pending")
            .join(format!("{container_id}-{ifname}.json"))
    }
}

/// What one plugin run printed and returned.
#[derive(Debug)]
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(self.status, Some(0), "{self:#?}");
        self
    }

    /// The CNI error on stdout; asserts exit status 1 and the error's shape.
    pub fn error(&self) -> Value {
        assert_eq!(self.status, Some(1), "{self:#?}");
        let error: Value = serde_json::from_str(&self.stdout).expect("error JSON on stdout");
        let keys: Vec<&String> = error.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["cniVersion", "code", "msg", "details"], "{error}");
        error
    }

    pub fn code(&self) -> u64 {
        self.error()["code"].as_u64().unwrap()
    }
}

/// Runs `podid` with exactly `env` (no inherited `CNI_*`) and `stdin`.
pub fn podid(env: &[(&str, &str)], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_podid"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn podid");
    // The plugin may exit before reading stdin (an unknown command): a broken pipe is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    Run {
        status: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The environment of a command on one attachment.
pub fn attachment_env<'a>(
    command: &'a str,
    container_id: &'a str,
    netns: &'a str,
    args: &'a str,
) -> Vec<(&'static str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container_id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
        ("CNI_PATH", "/nonexistent"),
    ]
}

pub const K8S_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=rgapi;K8S_POD_NAME=api-0;K8S_POD_UID=5f0c2a6e;K8S_POD_INFRA_CONTAINER_ID=";

/// A prevResult as azure-vnet prints it for a 0.3.0 conflist (reference/cni.md §2.5).
pub fn azure_vnet_result() -> String {
    fixture("azure-vnet-0.3.0.json")
}

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .expect("fixture")
    .trim_end()
    .to_owned()
}

/// Builds stdin with `prev_result` inserted verbatim, so its bytes reach the plugin unchanged.
pub fn stdin_with_prev_result(conf: &Value, prev_result: &str) -> String {
    let conf = conf.to_string();
    let body = conf.strip_suffix('}').expect("an object");
    format!("{body},\"prevResult\":{prev_result}}}")
}

fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn run_ok(program: &str, args: &[&str]) {
    let out = output(program, args);
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
}
