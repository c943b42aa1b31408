//! Network namespaces for tests: created with `ip netns add`, always deleted on drop (also when
//! a test panics), entered only on dedicated threads.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Prefix of every netns this harness creates; followed by the creating process id.
const PREFIX: &str = "pdt";

/// A named network namespace owned by the test that created it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates `pdt<pid>-<n>-<tag>`; the name is unique across parallel tests and processes.
    pub fn new(tag: &str) -> Result<Self> {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(remove_stale);
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{PREFIX}{}-{}-{tag}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Self::create(&name)
    }

    /// Creates a namespace with exactly this name (to re-create a deleted one).
    pub fn create(name: &str) -> Result<Self> {
        run("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
            path: Path::new("/run/netns").join(name),
        };
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what a runtime passes as `CNI_NETNS`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `(st_dev, st_ino)` of the namespace, as the plugin records it.
    pub fn identity(&self) -> Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let meta =
            std::fs::metadata(&self.path).with_context(|| self.path.display().to_string())?;
        Ok((meta.dev(), meta.ino()))
    }

    /// Runs `f` on a fresh thread that entered this namespace. Sockets created and processes
    /// spawned by `f` belong to it; the calling thread never changes namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.path, f)
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        Command::new("ip")
            .args(&full)
            .output()
            .with_context(|| format!("ip {}", full.join(" ")))
    }

    /// Like [`exec`](Self::exec), failing unless the command succeeds; returns its stdout.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.exec(program, args)?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} in {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Deletes the namespace now (a vanished netns, as after a pod's sandbox is gone).
    pub fn delete(self) {
        drop(self);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `f` on a fresh thread that entered the namespace at `path`.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Deletes namespaces left by earlier test processes that were killed before their drops ran.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// Runs a command, failing with its stderr unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("{program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
