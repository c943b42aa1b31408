//! The local demo (issue 6 §1) end to end: the `podid-demo` binary that `./demo.sh` runs, as a
//! process of its own, non-interactive. One full run must show rgapi's token in pod rgapi and no
//! token in the pod without binding; one run is stopped with SIGINT while the SDK runs in the
//! pod. Either way, every network namespace, process and temp dir the demo had created while it
//! ran must be gone once it exits. Run as root, with the SDK venv of `.ci/run`.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use podid_tests::bins;
use podid_tests::demo::{EXAMPLE, UNBOUND_POD};
use serde_json::Value;

/// A whole run once its build step is done (the test builds the binaries first, so that step
/// only finds them up to date, but it may wait for the cargo lock of other builds).
const RUN_WITHIN: Duration = Duration::from_secs(60);
/// For the build step: cargo's no-op checks, and any wait for the shared target dir's lock.
const BUILD_WITHIN: Duration = Duration::from_secs(600);
/// From SIGINT to exit, cleanup included.
const STOP_WITHIN: Duration = Duration::from_secs(20);

/// One demo at a time: two would share the machine's two cores with the SDKs.
static SERIAL: Mutex<()> = Mutex::new(());

/// rgapi's client id, as the example's AzureIdentity gives it.
fn rgapi_client_id() -> String {
    let path = bins::workspace_root().join(EXAMPLE).join("identity.yaml");
    let identity: Value = serde_saphyr::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    identity["spec"]["clientID"].as_str().unwrap().to_owned()
}

/// What a running demo had created at one moment.
#[derive(Debug, Default)]
struct Snapshot {
    netns: Vec<String>,
    /// Descendants of the demo: (pid, start time in clock ticks since boot, command line).
    processes: Vec<(u32, u64, String)>,
    node_dir: Option<PathBuf>,
    /// Whether the node dir existed at that moment.
    node_dir_existed: bool,
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// (parent, start time) of `pid`.
fn parent_and_start(pid: u32) -> Option<(u32, u64)> {
    let fields = stat_fields(pid)?;
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}

fn descendants(root: u32) -> Vec<(u32, u64, String)> {
    let table: HashMap<u32, (u32, u64)> = all_pids()
        .into_iter()
        .filter_map(|pid| parent_and_start(pid).map(|v| (pid, v)))
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, (ppid, start)) in &table {
            if *ppid == parent {
                found.push((*pid, *start, cmdline(*pid)));
                frontier.push(*pid);
            }
        }
    }
    found
}

fn netns_of(pid: u32) -> Vec<String> {
    let prefix = format!("pdt{pid}-");
    fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// A running `podid-demo` whose stdout lines arrive on a channel.
struct Demo {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: thread::JoinHandle<String>,
    started: Instant,
}

impl Demo {
    fn start() -> Self {
        // Built before the clock starts; the demo's own build step then finds them up to date.
        for binary in [
            bins::plugin(),
            bins::tokend(),
            bins::controller(),
            bins::installer(),
        ] {
            binary.unwrap_or_else(|e| panic!("{e:#}"));
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_podid-demo"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("demo| {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr_pipe = child.stderr.take().unwrap();
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text);
            text
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            stderr,
            started: Instant::now(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads lines until the build step is over, then restarts the clock.
    fn wait_built(&mut self) {
        self.wait_line("[ 3/13]", BUILD_WITHIN);
        self.started = Instant::now();
    }

    /// Reads lines until one contains `marker`; fails past `within` (from the start, or from
    /// the end of the build step after [`wait_built`](Self::wait_built)).
    fn wait_line(&mut self, marker: &str, within: Duration) -> String {
        loop {
            let left = within.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(marker) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "no line with {marker:?} within {within:?}; output:\n{}",
                        self.seen.join("\n")
                    );
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "the demo ended before printing {marker:?}; output:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// What the demo has created right now.
    fn snapshot(&self) -> Snapshot {
        let node_dir = self
            .seen
            .iter()
            .find_map(|l| {
                l.split("node dirs (CNI bin and conf, tokend state, logs) under ")
                    .nth(1)
            })
            .map(|d| PathBuf::from(d.trim()));
        Snapshot {
            netns: netns_of(self.pid()),
            processes: descendants(self.pid()),
            node_dir_existed: node_dir.as_ref().is_some_and(|d| d.is_dir()),
            node_dir,
        }
    }

    /// Waits for the exit (killing the demo past `within` from now); returns the status and the
    /// whole stdout.
    fn finish(mut self, within: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the demo did not exit within {within:?}; output:\n{}",
                    self.seen.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        self.seen.extend(self.lines.iter());
        let stderr = self.stderr.join().unwrap_or_default();
        eprintln!("demo stderr: {stderr}");
        (status, self.seen.join("\n"))
    }
}

/// Everything `during` saw is gone: its netns, its processes (same pid and start time), its
/// node dir, and any process naming the node dir.
fn assert_cleaned_up(during: &Snapshot, demo_pid: u32) {
    let netns_left: Vec<&String> = during
        .netns
        .iter()
        .filter(|n| std::path::Path::new("/run/netns").join(n).exists())
        .collect();
    assert!(
        netns_left.is_empty(),
        "network namespaces left: {netns_left:?}"
    );
    assert!(
        netns_of(demo_pid).is_empty(),
        "network namespaces of the demo left: {:?}",
        netns_of(demo_pid)
    );
    let alive: Vec<&(u32, u64, String)> = during
        .processes
        .iter()
        .filter(|(pid, start, _)| parent_and_start(*pid).is_some_and(|(_, s)| s == *start))
        .collect();
    assert!(
        alive.is_empty(),
        "processes the demo started still run: {alive:?}"
    );
    let dir = during
        .node_dir
        .as_ref()
        .expect("the demo printed its node dir");
    assert!(!dir.exists(), "{} is still there", dir.display());
    let naming: Vec<(u32, String)> = all_pids()
        .into_iter()
        .map(|pid| (pid, cmdline(pid)))
        .filter(|(_, cmd)| cmd.contains(&*dir.to_string_lossy()))
        .collect();
    assert!(
        naming.is_empty(),
        "processes still use {}: {naming:?}",
        dir.display()
    );
}

/// The whole demo: the pod labelled `aadpodidbinding: rgapi` gets a token for rgapi's client id
/// with the management audience, the pod without binding gets none ("Identity not found"),
/// every step reports ok with its duration, and afterwards nothing it created remains.
#[test]
fn the_demo_shows_the_pods_token_and_cleans_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let client_id = rgapi_client_id();
    let mut demo = Demo::start();
    let pid = demo.pid();
    demo.wait_built();
    // While the SDK runs in pod rgapi, the node, the cloud and the pod exist.
    demo.wait_line("In pod rgapi:", RUN_WITHIN);
    let during = demo.snapshot();
    let (status, out) = demo.finish(RUN_WITHIN);

    assert!(status.success(), "the demo failed ({status}):\n{out}");
    assert!(
        during.netns.len() >= 3,
        "node, cloud and pod netns while the pod ran: {:?}",
        during.netns
    );
    let commands: Vec<&str> = during
        .processes
        .iter()
        .map(|(_, _, c)| c.as_str())
        .collect();
    for daemon in ["podid-tokend", "podid-controller", "podid-install"] {
        assert!(
            commands.iter().any(|c| c.contains(daemon)),
            "{daemon} was not running while the pod ran: {commands:#?}"
        );
    }
    assert!(
        during.node_dir_existed,
        "the node dir while the pod ran: {during:?}"
    );

    assert!(
        out.contains(&format!(
            "TOKEN for identity rgapi/rgapi: client id {client_id}"
        )),
        "no token for rgapi's client id {client_id}:\n{out}"
    );
    assert!(
        out.contains("audience    https://management.azure.com\n"),
        "{out}"
    );
    assert!(out.contains("pod created -> token: "), "{out}");
    let refusal = out
        .lines()
        .find(|l| l.contains("NO TOKEN"))
        .unwrap_or_else(|| panic!("no \"NO TOKEN\" line for pod {UNBOUND_POD}:\n{out}"));
    assert!(refusal.contains("Identity not found"), "{refusal}");
    assert!(
        out.contains(&format!("pod rgapi/{UNBOUND_POD} got no token")),
        "{out}"
    );
    let steps = out
        .lines()
        .filter(|l| l.trim_start().starts_with("ok ("))
        .count();
    assert_eq!(steps, 13, "every step reports ok with its duration:\n{out}");
    assert!(!out.contains("FAILED"), "{out}");
    assert!(out.contains("What was simulated:"), "{out}");
    assert!(
        out.contains(
            "Cleanup checked: no network namespace, process or temp dir of this run remains."
        ),
        "{out}"
    );
    assert_cleaned_up(&during, pid);
}

/// SIGINT while Python's DefaultAzureCredential runs in pod rgapi: the demo stops within
/// [`STOP_WITHIN`], exits 130, says it was interrupted, and leaves nothing behind: not the SDK
/// process, not the daemons, not a netns or its temp dir.
#[test]
fn sigint_mid_run_cleans_up_everything() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut demo = Demo::start();
    let pid = demo.pid();
    demo.wait_built();
    demo.wait_line("In pod rgapi:", RUN_WITHIN);
    // Catch the SDK process itself running, if it is still starting up.
    let wait_sdk = Instant::now();
    let mut during = demo.snapshot();
    while !during
        .processes
        .iter()
        .any(|(_, _, c)| c.contains("get_token.py"))
        && wait_sdk.elapsed() < Duration::from_secs(5)
    {
        thread::sleep(Duration::from_millis(10));
        during = demo.snapshot();
    }
    kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
    let stopped = Instant::now();
    let (status, out) = demo.finish(STOP_WITHIN);

    assert_eq!(status.code(), Some(130), "exit status after SIGINT:\n{out}");
    assert!(stopped.elapsed() < STOP_WITHIN);
    assert!(out.contains("Interrupted after"), "{out}");
    assert!(
        out.contains(
            "Cleanup checked: no network namespace, process or temp dir of this run remains."
        ),
        "{out}"
    );
    assert!(
        during.netns.len() >= 3 && during.processes.len() >= 3 && during.node_dir_existed,
        "the node was up when the signal came: {during:?}"
    );
    assert_cleaned_up(&during, pid);
}
