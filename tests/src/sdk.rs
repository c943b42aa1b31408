//! The real Azure SDKs that end-to-end tests run inside pod network namespaces: Python
//! `azure-identity` from the venv `.ci/run` creates at `<workspace>/target/sdk/venv`, and
//! `@azure/identity` for Node.js from `tests/sdk/node/node_modules` (`npm ci`). Each run is a
//! fresh process with a clean environment (no `AZURE_*`, no proxy, `HOME` and `PATH` in an empty
//! temp dir, so `DefaultAzureCredential` finds no Azure CLI, PowerShell or azd), and its driver
//! prints one JSON line: the token's claims and SHA-256, never the token.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::bins::workspace_root;
use crate::netns::in_netns;

/// How long one SDK process may run before it is killed and the run fails.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(120);

/// What `.ci/run` does to install the SDKs, for the message when they are missing.
const INSTALL_STEPS: &str = "run .ci/run's SDK steps from the workspace root: \
    `python3 -m venv target/sdk/venv && target/sdk/venv/bin/pip install -r tests/sdk/python/requirements.txt` \
    and `(cd tests/sdk/node && npm ci)`";

/// Which SDK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sdk {
    Python,
    /// Python's `azure.identity.aio` credentials (their own IMDS client, not MSAL's).
    PythonAsync,
    Node,
}

impl fmt::Display for Sdk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sdk::Python => "python",
            Sdk::PythonAsync => "python-aio",
            Sdk::Node => "node",
        })
    }
}

/// Which credential class the application uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// `ManagedIdentityCredential`.
    Managed,
    /// `DefaultAzureCredential`.
    Default,
}

/// One `get_token` call, as an application in a pod makes it.
#[derive(Debug, Clone)]
pub struct Call {
    pub sdk: Sdk,
    pub credential: Credential,
    /// `ManagedIdentityCredential(client_id=…)`.
    pub client_id: Option<String>,
    /// `ManagedIdentityCredential(identity_config={"resource_id": …})` / `{ resourceId }`.
    pub resource_id: Option<String>,
    pub scope: String,
    /// Environment variables the application has (on top of the clean environment).
    pub env: Vec<(String, String)>,
}

impl Call {
    pub fn new(sdk: Sdk, credential: Credential) -> Self {
        Self {
            sdk,
            credential,
            client_id: None,
            resource_id: None,
            scope: "https://management.azure.com/.default".into(),
            env: Vec::new(),
        }
    }

    pub fn managed(sdk: Sdk) -> Self {
        Self::new(sdk, Credential::Managed)
    }

    pub fn default_credential(sdk: Sdk) -> Self {
        Self::new(sdk, Credential::Default)
    }

    pub fn client_id(mut self, client_id: &str) -> Self {
        self.client_id = Some(client_id.into());
        self
    }

    pub fn resource_id(mut self, resource_id: &str) -> Self {
        self.resource_id = Some(resource_id.into());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The resource the SDK asks IMDS for: the scope without `/.default`.
    pub fn resource(&self) -> &str {
        self.scope.strip_suffix("/.default").unwrap_or(&self.scope)
    }

    /// Runs the call in the network namespace at `netns` and returns what the driver printed.
    pub fn run_in(&self, netns: &Path) -> Result<Outcome> {
        let mut command = self.command()?;
        let home = tempfile::Builder::new()
            .prefix("podid-sdk-home-")
            .tempdir()?;
        let path = home.path().join("bin");
        std::fs::create_dir_all(&path)?;
        command
            .env_clear()
            .env("HOME", home.path())
            .env("TMPDIR", home.path())
            .env("PATH", &path)
            .env("LANG", "C.UTF-8")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let child = in_netns(netns, || command.spawn())?
            .with_context(|| format!("starting {} in {}", self, netns.display()))?;
        let (status, stdout, stderr) =
            wait_with_timeout(child, PROCESS_TIMEOUT).with_context(|| format!("running {self}"))?;
        let wall = started.elapsed();
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'));
        let Some(line) = line else {
            bail!("{self} printed no result (exit {status:?}); stdout: {stdout}; stderr: {stderr}");
        };
        let printed: Value = serde_json::from_str(line)
            .with_context(|| format!("{self} printed {line:?}; stderr: {stderr}"))?;
        Ok(Outcome {
            call: self.to_string(),
            printed,
            wall,
            stderr,
        })
    }

    fn command(&self) -> Result<Command> {
        let credential = match self.credential {
            Credential::Managed => "mi",
            Credential::Default => "dac",
        };
        let mut args: Vec<String> = vec!["--credential".into(), credential.into()];
        if let Some(id) = &self.client_id {
            args.extend(["--client-id".into(), id.clone()]);
        }
        if let Some(id) = &self.resource_id {
            args.extend(["--resource-id".into(), id.clone()]);
        }
        args.extend(["--scope".into(), self.scope.clone()]);
        let mut command = match self.sdk {
            Sdk::Python | Sdk::PythonAsync => {
                let mut c = Command::new(python()?);
                c.arg(python_driver());
                if self.sdk == Sdk::PythonAsync {
                    c.arg("--async");
                }
                c
            }
            Sdk::Node => {
                let mut c = Command::new(node()?);
                c.arg(node_driver());
                c
            }
        };
        command.args(&args);
        Ok(command)
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let credential = match self.credential {
            Credential::Managed => "ManagedIdentityCredential",
            Credential::Default => "DefaultAzureCredential",
        };
        write!(f, "{} {credential}", self.sdk)?;
        if let Some(id) = &self.client_id {
            write!(f, " client_id={id}")?;
        }
        if let Some(id) = &self.resource_id {
            write!(f, " resource_id={id}")?;
        }
        for (k, v) in &self.env {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

/// What one SDK run printed.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The call, for messages.
    pub call: String,
    /// The driver's JSON line: `ok`, `claims` or `error` and `message`, `seconds`.
    pub printed: Value,
    /// From spawning the process to its exit (interpreter start included).
    pub wall: Duration,
    pub stderr: String,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.printed["ok"] == true
    }

    /// The token's claims; fails the test with the SDK's error when it got none.
    pub fn claims(&self) -> &Value {
        assert!(
            self.ok(),
            "{} got no token: {} (stderr: {})",
            self.call,
            self.printed,
            self.stderr
        );
        &self.printed["claims"]
    }

    /// SHA-256 of the token (hex).
    pub fn token_sha256(&self) -> &str {
        self.printed["sha256"].as_str().unwrap_or_default()
    }

    /// The exception class (Python) or error name (Node.js) of a failed run.
    pub fn error(&self) -> &str {
        self.printed["error"].as_str().unwrap_or_default()
    }

    pub fn message(&self) -> &str {
        self.printed["message"].as_str().unwrap_or_default()
    }

    /// The time `get_token` took as the driver measured it (no interpreter start).
    pub fn seconds(&self) -> f64 {
        self.printed["seconds"].as_f64().unwrap_or(f64::NAN)
    }
}

/// Waits for `child`, killing it after `timeout`; returns its status, stdout and stderr.
fn wait_with_timeout(
    mut child: Child,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String, String)> {
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            bail!("killed after {timeout:?}; stderr: {stderr}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok((status, stdout, stderr))
}

/// Fails with what to run when either SDK is not installed as pinned.
pub fn check_installed() -> Result<()> {
    python()?;
    node()?;
    Ok(())
}

/// The venv's Python, after checking that it holds every package `requirements.txt` pins, at
/// its pinned version.
pub fn python() -> Result<PathBuf> {
    let venv = workspace_root().join("target/sdk/venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        bail!(
            "the Python SDK venv is missing ({} does not exist): {INSTALL_STEPS}",
            python.display()
        );
    }
    let requirements = workspace_root().join("tests/sdk/python/requirements.txt");
    let text = std::fs::read_to_string(&requirements)
        .with_context(|| requirements.display().to_string())?;
    let lib = venv.join("lib");
    let installed: Vec<String> = std::fs::read_dir(&lib)
        .with_context(|| format!("{}: {INSTALL_STEPS}", lib.display()))?
        .flatten()
        .filter_map(|python| std::fs::read_dir(python.path().join("site-packages")).ok())
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().to_lowercase())
        .collect();
    for line in text.lines().map(str::trim) {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some((name, version)) = line.split_once("==") else {
            continue;
        };
        // pip names the metadata dir after the normalised project name.
        let dist_info = format!(
            "{}-{version}.dist-info",
            name.to_lowercase().replace(['-', '.'], "_")
        );
        if !installed.contains(&dist_info) {
            bail!(
                "{name}=={version} (pinned in {}) is not installed in {}: {INSTALL_STEPS}",
                requirements.display(),
                venv.display()
            );
        }
    }
    Ok(python)
}

pub fn python_driver() -> PathBuf {
    workspace_root().join("tests/sdk/python/get_token.py")
}

/// `node` from `PATH`, after checking that `node_modules` holds the pinned `@azure/identity`.
pub fn node() -> Result<PathBuf> {
    let dir = workspace_root().join("tests/sdk/node");
    let package = dir.join("package.json");
    let pins: Value = serde_json::from_str(
        &std::fs::read_to_string(&package).with_context(|| package.display().to_string())?,
    )?;
    let version = pins["dependencies"]["@azure/identity"]
        .as_str()
        .with_context(|| format!("{} pins no @azure/identity", package.display()))?;
    let manifest = dir.join("node_modules/@azure/identity/package.json");
    let installed: Value = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .with_context(|| {
            format!(
                "the Node.js SDK is missing ({} not found): {INSTALL_STEPS}",
                manifest.display()
            )
        })?;
    if installed["version"] != version {
        bail!(
            "@azure/identity {} is installed, {version} is pinned: {INSTALL_STEPS}",
            installed["version"]
        );
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("node"))
        .find(|p| p.is_file())
        .context("node is not on PATH: install Node.js (npm ci in .ci/run needs it too)")
}

pub fn node_driver() -> PathBuf {
    workspace_root().join("tests/sdk/node/get-token.mjs")
}
