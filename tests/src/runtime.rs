//! A small CNI runtime that runs a conflist the way libcni does
//! (`containernetworking/cni:libcni/api.go`): ADD in order threading `prevResult`, DEL in
//! reverse with the cached result from 0.4.0 on, CHECK from 0.4.0, GC and STATUS from 1.1.0,
//! `name` and `cniVersion` of the list injected into every plugin, `K8S_POD_*` in `CNI_ARGS`.
//! Plugins run in the node's network namespace, as a runtime runs them in the host's.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::netns::in_netns;

/// One pod attachment: what a runtime knows when it calls the chain.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: Vec<(String, String)>,
}

impl Attachment {
    /// An attachment as containerd describes a Kubernetes pod sandbox.
    pub fn pod(container_id: &str, netns: &Path, namespace: &str, name: &str, uid: &str) -> Self {
        Self {
            container_id: container_id.into(),
            netns: Some(netns.into()),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), namespace.into()),
                ("K8S_POD_NAME".into(), name.into()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), container_id.into()),
                ("K8S_POD_UID".into(), uid.into()),
            ],
        }
    }

    /// An attachment from a runtime that passes no Kubernetes arguments (podman).
    pub fn bare(container_id: &str, netns: &Path) -> Self {
        Self {
            container_id: container_id.into(),
            netns: Some(netns.into()),
            ifname: "eth0".into(),
            args: Vec::new(),
        }
    }

    fn cni_args(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// A plugin's failure as a runtime sees it.
#[derive(Debug, Clone)]
pub struct CniError {
    pub plugin: String,
    pub command: String,
    /// The `code` of the error JSON on stdout, when the plugin printed one.
    pub code: Option<u64>,
    pub msg: String,
    pub details: String,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} failed: code {:?}: {}: {} (stderr: {})",
            self.plugin, self.command, self.code, self.msg, self.details, self.stderr
        )
    }
}

impl std::error::Error for CniError {}

/// Boxed: a runtime error carries the plugin's whole output.
pub type CniResult<T> = Result<T, Box<CniError>>;

/// What one plugin printed on success.
#[derive(Debug, Clone)]
pub struct PluginOutput {
    pub plugin: String,
    pub stdout: Vec<u8>,
}

/// The runtime for one conflist on one node.
#[derive(Debug)]
pub struct Runtime {
    conflist: Value,
    cni_path: Vec<PathBuf>,
    node_netns: PathBuf,
    /// libcni's result cache, keyed by (containerId, ifname).
    cache: Mutex<HashMap<(String, String), Value>>,
}

impl Runtime {
    pub fn new(conflist: Value, cni_path: Vec<PathBuf>, node_netns: &Path) -> Self {
        Self {
            conflist,
            cni_path,
            node_netns: node_netns.into(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn conflist(&self) -> &Value {
        &self.conflist
    }

    pub fn version(&self) -> &str {
        self.conflist["cniVersion"].as_str().unwrap_or("")
    }

    fn at_least(&self, version: &str) -> bool {
        version_tuple(self.version()) >= version_tuple(version)
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Runs ADD through the chain; returns every plugin's output, the last being the result.
    pub fn add(&self, att: &Attachment) -> CniResult<Vec<PluginOutput>> {
        let mut prev: Option<Value> = None;
        let mut outputs = Vec::new();
        for plugin in self.plugins() {
            let config = self.plugin_config(&plugin, prev.as_ref(), None);
            let stdout = self.exec(&plugin, "ADD", &config, Some(att))?;
            let result: Value = serde_json::from_slice(&stdout).map_err(|e| {
                Box::new(CniError {
                    plugin: plugin_type(&plugin),
                    command: "ADD".into(),
                    code: None,
                    msg: format!("result is not JSON: {e}"),
                    details: String::new(),
                    stdout: String::from_utf8_lossy(&stdout).into_owned(),
                    stderr: String::new(),
                })
            })?;
            prev = Some(result);
            outputs.push(PluginOutput {
                plugin: plugin_type(&plugin),
                stdout,
            });
        }
        if let Some(result) = prev {
            self.cache
                .lock()
                .unwrap()
                .insert((att.container_id.clone(), att.ifname.clone()), result);
        }
        Ok(outputs)
    }

    /// Runs DEL through the chain in reverse order.
    pub fn del(&self, att: &Attachment) -> CniResult<()> {
        let key = (att.container_id.clone(), att.ifname.clone());
        let cached = self.cache.lock().unwrap().get(&key).cloned();
        // libcni passes the cached result on DEL only from 0.4.0 on.
        let prev = cached.filter(|_| self.at_least("0.4.0"));
        for plugin in self.plugins().iter().rev() {
            let config = self.plugin_config(plugin, prev.as_ref(), None);
            self.exec(plugin, "DEL", &config, Some(att))?;
        }
        self.cache.lock().unwrap().remove(&key);
        Ok(())
    }

    /// Runs CHECK through the chain (0.4.0 and later, with the cached result).
    pub fn check(&self, att: &Attachment) -> CniResult<()> {
        let unsupported = |msg: &str| {
            Box::new(CniError {
                plugin: "runtime".into(),
                command: "CHECK".into(),
                code: None,
                msg: msg.into(),
                details: String::new(),
                stdout: String::new(),
                stderr: String::new(),
            })
        };
        if !self.at_least("0.4.0") {
            return Err(unsupported(
                "configuration version does not support the CHECK command",
            ));
        }
        let key = (att.container_id.clone(), att.ifname.clone());
        let cached = self
            .cache
            .lock()
            .unwrap()
            .get(&key)
            .cloned()
            .ok_or_else(|| unsupported("no cached result for this attachment"))?;
        for plugin in self.plugins() {
            let config = self.plugin_config(&plugin, Some(&cached), None);
            self.exec(&plugin, "CHECK", &config, Some(att))?;
        }
        Ok(())
    }

    /// GC: DEL of every cached attachment not in `valid`, then (1.1.0) GC to every plugin.
    pub fn gc(&self, valid: &[(&str, &str)]) -> CniResult<()> {
        let stale: Vec<(String, String)> = self
            .cache
            .lock()
            .unwrap()
            .keys()
            .filter(|(c, i)| !valid.iter().any(|(vc, vi)| vc == c && vi == i))
            .cloned()
            .collect();
        for (container_id, ifname) in stale {
            self.del(&Attachment {
                container_id,
                netns: None,
                ifname,
                args: Vec::new(),
            })?;
        }
        if !self.at_least("1.1.0") {
            return Ok(());
        }
        let attachments: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        for plugin in self.plugins() {
            let config = self.plugin_config(&plugin, None, Some(&attachments));
            self.exec(&plugin, "GC", &config, None)?;
        }
        Ok(())
    }

    /// STATUS to every plugin (1.1.0 and later; earlier versions report nothing).
    pub fn status(&self) -> CniResult<()> {
        if !self.at_least("1.1.0") {
            return Ok(());
        }
        for plugin in self.plugins() {
            let config = self.plugin_config(&plugin, None, None);
            self.exec(&plugin, "STATUS", &config, None)?;
        }
        Ok(())
    }

    /// The request configuration libcni derives for one plugin of the list.
    pub fn plugin_config(
        &self,
        plugin: &Value,
        prev: Option<&Value>,
        valid: Option<&[Value]>,
    ) -> Value {
        let mut config = plugin.clone();
        let obj = config.as_object_mut().expect("plugin entries are objects");
        obj.insert("name".into(), self.conflist["name"].clone());
        obj.insert("cniVersion".into(), self.conflist["cniVersion"].clone());
        obj.remove("capabilities");
        if let Some(prev) = prev {
            obj.insert("prevResult".into(), prev.clone());
        }
        if let Some(valid) = valid {
            obj.insert(
                "cni.dev/valid-attachments".into(),
                Value::Array(valid.to_vec()),
            );
            obj.insert("cni.dev/attachments".into(), Value::Array(valid.to_vec()));
        }
        config
    }

    /// Executes one plugin binary as a runtime does (stdin config, `CNI_*` env, node netns).
    pub fn exec(
        &self,
        plugin: &Value,
        command: &str,
        config: &Value,
        att: Option<&Attachment>,
    ) -> CniResult<Vec<u8>> {
        let kind = plugin_type(plugin);
        let fail = |msg: String| {
            Box::new(CniError {
                plugin: kind.clone(),
                command: command.into(),
                code: None,
                msg,
                details: String::new(),
                stdout: String::new(),
                stderr: String::new(),
            })
        };
        let binary = self.find(&kind).map_err(|e| fail(format!("{e:#}")))?;
        let mut env: Vec<(String, String)> = vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_PATH".into(), self.cni_path_var()),
        ];
        if let Some(att) = att {
            env.push(("CNI_CONTAINERID".into(), att.container_id.clone()));
            env.push(("CNI_IFNAME".into(), att.ifname.clone()));
            env.push(("CNI_ARGS".into(), att.cni_args()));
            if let Some(netns) = &att.netns {
                env.push(("CNI_NETNS".into(), netns.display().to_string()));
            }
        }
        let stdin = serde_json::to_vec(config).expect("configs serialize");
        let out =
            exec_in(&self.node_netns, &binary, &env, &stdin).map_err(|e| fail(format!("{e:#}")))?;
        if out.status == 0 {
            return Ok(out.stdout);
        }
        let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        Err(Box::new(CniError {
            plugin: kind,
            command: command.into(),
            code: parsed.as_ref().and_then(|v| v["code"].as_u64()),
            msg: parsed
                .as_ref()
                .and_then(|v| v["msg"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("exit status {}", out.status)),
            details: parsed
                .as_ref()
                .and_then(|v| v["details"].as_str().map(str::to_owned))
                .unwrap_or_default(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }))
    }

    fn cni_path_var(&self) -> String {
        self.cni_path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    fn find(&self, kind: &str) -> Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|dir| dir.join(kind))
            .find(|p| p.exists())
            .with_context(|| format!("failed to find plugin {kind:?} in path {:?}", self.cni_path))
    }
}

/// What a plugin process left behind.
#[derive(Debug)]
pub struct ExecOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `binary` with `env` and `stdin` inside the namespace at `netns`.
pub fn exec_in(
    netns: &Path,
    binary: &Path,
    env: &[(String, String)],
    stdin: &[u8],
) -> Result<ExecOutput> {
    in_netns(netns, || -> Result<ExecOutput> {
        let mut child = Command::new(binary)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", binary.display()))?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(stdin)
            .context("writing the plugin's stdin")?;
        let out = child.wait_with_output()?;
        let Some(status) = out.status.code() else {
            bail!("{} was killed by a signal", binary.display());
        };
        Ok(ExecOutput {
            status,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    })?
}

fn plugin_type(plugin: &Value) -> String {
    plugin["type"].as_str().unwrap_or("").to_owned()
}

fn version_tuple(v: &str) -> (u32, u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}
