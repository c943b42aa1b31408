//! The binaries under test, built once per test process in release mode: the plugin as the
//! static binary that ships to `/opt/cni/bin`, tokend as it runs in its container.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// Where Debian's `containernetworking-plugins` installs `bridge`, `host-local`, `tuning`.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

/// The static `podid` plugin binary.
pub fn plugin() -> Result<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| build_static_plugin().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The `podid-tokend` binary.
pub fn tokend() -> Result<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| build_release("podid-tokend", "podid-tokend").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The `podid-controller` binary.
pub fn controller() -> Result<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| {
        build_release("podid-controller", "podid-controller").map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The `podid-install` binary.
pub fn installer() -> Result<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| {
        build_release("podid-install", "podid-install").map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The `fake-apiserver` binary of this crate (the fake Kubernetes API server as a process).
pub fn fake_apiserver() -> Result<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| {
        build_release("podid-tests", "fake-apiserver").map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The `mock-azure` binary of this crate (mock Entra ID and node IMDS as a process).
pub fn mock_azure() -> Result<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| build_release("podid-tests", "mock-azure").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A Debian CNI plugin by type (`bridge`, `host-local`, `tuning`).
pub fn debian_plugin(name: &str) -> Result<PathBuf> {
    let path = Path::new(DEBIAN_CNI_DIR).join(name);
    if !path.exists() {
        bail!(
            "{} is missing: install Debian's containernetworking-plugins (.ci/run does)",
            path.display()
        );
    }
    Ok(path)
}

/// Cargo with the environment of a shell, not of a test: cargo gives test processes
/// `LD_LIBRARY_PATH`, `CARGO_PKG_*` and more, and a nested build that saw them would rebuild
/// dependencies whose build scripts watch such variables, then the outer build would rebuild
/// them back.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).env_clear();
    for key in [
        "PATH",
        "HOME",
        "TMPDIR",
        "CARGO_HOME",
        "CARGO_TARGET_DIR",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
    ] {
        if let Some(value) = std::env::var_os(key) {
            cmd.env(key, value);
        }
    }
    cmd
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `bin` of `package`, built in release mode (a no-op when it is up to date).
pub fn build_release(package: &str, bin: &str) -> Result<PathBuf> {
    let status = cargo()
        .args(["build", "--quiet", "--release", "-p", package, "--bin", bin])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p {package} failed");
    }
    Ok(target_dir().join("release").join(bin))
}

/// Built for the host triple named explicitly, so `+crt-static` applies to the plugin and not to
/// build scripts: a static-pie with no shared-library dependency, as AKS hosts need.
fn build_static_plugin() -> Result<PathBuf> {
    let triple = host_triple()?;
    let status = cargo()
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "podid-cni",
            "--bin",
            "podid",
            "--target",
            &triple,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .context("running cargo build for the static plugin")?;
    if !status.success() {
        bail!("static build of the podid plugin failed");
    }
    Ok(target_dir().join(&triple).join("release").join("podid"))
}

fn host_triple() -> Result<String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .context("rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV printed no host triple")
}
