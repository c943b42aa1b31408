//! Flags (each with a `PODID_<FLAG>` environment fallback), validated once at start into
//! [`Settings`]; an invalid value stops the installer with a message naming flag and value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, ValueEnum};
use podid_api::defaults;
use serde_json::json;
use tracing_subscriber::EnvFilter;

use crate::conflist::{Entry, PLUGIN_TYPE};

/// The environment variable holding the log filter (`info`, `podid_install=debug`, ...).
pub const LOG_ENV: &str = "PODID_LOG";
/// The longest interval a timer flag takes.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// The plugin's own bound on `timeoutMs`.
const MAX_TIMEOUT_MS: u64 = 60_000;
/// Kubernetes' limit on a node name.
const MAX_NODE_NAME: usize = 253;
/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The plugin's `failurePolicy`, spelled as in the conflist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailurePolicy {
    #[value(name = "Fail")]
    Fail,
    #[value(name = "Ignore")]
    Ignore,
}

impl FailurePolicy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Fail => "Fail",
            Self::Ignore => "Ignore",
        }
    }
}

/// A comma-separated list of namespace names; empty for none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespaces(pub Vec<String>);

/// The command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "podid-install",
    version,
    about = "Installs the podid CNI plugin on this node, keeps it chained in the primary conflist, installs the host guard and removes the node's startup taint when ready"
)]
pub struct Args {
    /// Where the runtime looks for CNI plugin binaries.
    #[arg(long, env = "PODID_CNI_BIN_DIR", value_name = "DIR", default_value = "/opt/cni/bin", value_parser = absolute_path)]
    pub cni_bin_dir: PathBuf,
    /// Where the runtime reads network configs.
    #[arg(long, env = "PODID_CNI_CONF_DIR", value_name = "DIR", default_value = "/etc/cni/net.d", value_parser = absolute_path)]
    pub cni_conf_dir: PathBuf,
    /// The plugin binary to install; default: `podid` next to this installer.
    #[arg(long, env = "PODID_PLUGIN_BINARY", value_name = "PATH", value_parser = absolute_path)]
    pub plugin_binary: Option<PathBuf>,
    /// This node's name, whose startup taint is removed when the node is ready.
    #[arg(long, env = "PODID_NODE_NAME", value_name = "NAME", value_parser = node_name)]
    pub node_name: Option<String>,
    /// Kubeconfig to use; default: in-cluster config, else the default kubeconfig.
    #[arg(long, env = "PODID_KUBECONFIG", value_name = "PATH", value_parser = existing_file)]
    pub kubeconfig: Option<PathBuf>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "PODID_HEALTH_ADDR",
        value_name = "ADDR",
        default_value = "0.0.0.0:2584"
    )]
    pub health_addr: SocketAddr,
    /// Remove podid's entry from the conflists and exit (explicit uninstall only; the binary and
    /// the host guard stay).
    #[arg(
        long,
        env = "PODID_UNINSTALL",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub uninstall: bool,
    /// Plugin entry `socket`: tokend's unix socket as the plugin reaches it on the node.
    #[arg(long, env = "PODID_SOCKET", value_name = "PATH", default_value = defaults::SOCKET, value_parser = socket_path)]
    pub socket: PathBuf,
    /// Plugin entry `stateDir`.
    #[arg(long, env = "PODID_STATE_DIR", value_name = "DIR", default_value = defaults::STATE_DIR, value_parser = absolute_path)]
    pub state_dir: PathBuf,
    /// Plugin entry `timeoutMs`: how long ADD waits for tokend.
    #[arg(long, env = "PODID_TIMEOUT_MS", value_name = "MS", default_value_t = defaults::TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
    pub timeout_ms: u64,
    /// Plugin entry `failurePolicy`.
    #[arg(long, env = "PODID_FAILURE_POLICY", value_enum, default_value_t = FailurePolicy::Fail)]
    pub failure_policy: FailurePolicy,
    /// Plugin entry `failOpenNamespaces`, comma-separated; empty for none.
    #[arg(long, env = "PODID_FAIL_OPEN_NAMESPACES", value_name = "NS,...", default_value = "kube-system", value_parser = namespaces)]
    pub fail_open_namespaces: Namespaces,
    /// Plugin entry `logFile`.
    #[arg(long, env = "PODID_LOG_FILE", value_name = "PATH", default_value = defaults::LOG_FILE, value_parser = absolute_path)]
    pub log_file: PathBuf,
    /// Where the installer asks tokend whether it is ready; default: --socket.
    #[arg(long, env = "PODID_TOKEND_SOCKET", value_name = "PATH", value_parser = socket_path)]
    pub tokend_socket: Option<PathBuf>,
    /// Where the installer keeps the originals of the .conf files it converted; default:
    /// <--state-dir>/install.
    #[arg(long, env = "PODID_INSTALL_STATE_DIR", value_name = "DIR", value_parser = absolute_path)]
    pub install_state_dir: Option<PathBuf>,
    /// How often the conf and bin dirs are rescanned besides inotify (`10s`, `500ms`).
    #[arg(long, env = "PODID_RESCAN_INTERVAL", value_name = "DURATION", default_value = "5s", value_parser = interval)]
    pub rescan_interval: Duration,
    /// How often the host guard is checked besides nftables change notifications.
    #[arg(long, env = "PODID_GUARD_INTERVAL", value_name = "DURATION", default_value = "10s", value_parser = interval)]
    pub guard_interval: Duration,
    /// Remove the node taint podid.io/agent-not-ready:NoSchedule when ready (needs --node-name
    /// and API access); `false` leaves the taint alone.
    #[arg(
        long,
        env = "PODID_REMOVE_TAINT",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value_t = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub remove_taint: bool,
    /// Log format.
    #[arg(long, env = "PODID_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "--plugin-binary: not given, and the installer's own path (to find `podid` next to it) is unknown"
    )]
    NoPluginBinary,
    #[error("--plugin-binary {path:?}: no such file")]
    PluginBinary { path: PathBuf },
    #[error(
        "--node-name: required to remove the node taint; pass --remove-taint=false to leave the taint alone"
    )]
    NoNodeName,
    #[error("{flag} {path:?}: {why}")]
    Path {
        flag: &'static str,
        path: PathBuf,
        why: &'static str,
    },
    #[error("{LOG_ENV}={value:?}: {why}")]
    LogFilter { value: String, why: String },
}

/// Taint removal: whose, and how to reach the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaintSettings {
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
    pub tokend_socket: PathBuf,
}

/// What the installer runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub plugin_binary: PathBuf,
    pub install_state_dir: PathBuf,
    pub entry: Entry,
    pub health_addr: SocketAddr,
    pub rescan_interval: Duration,
    pub guard_interval: Duration,
    /// `None`: the taint is left alone.
    pub taint: Option<TaintSettings>,
    pub uninstall: bool,
}

impl Args {
    /// Validates the flags; `exe` is the installer's own path (the plugin's default place).
    pub fn settings(&self, exe: Option<&Path>) -> Result<Settings, ConfigError> {
        let plugin_binary = match (&self.plugin_binary, exe.and_then(Path::parent)) {
            (Some(path), _) => path.clone(),
            (None, Some(dir)) => dir.join(PLUGIN_TYPE),
            (None, None) => return Err(ConfigError::NoPluginBinary),
        };
        if !self.uninstall && !plugin_binary.is_file() {
            return Err(ConfigError::PluginBinary {
                path: plugin_binary,
            });
        }
        if self.cni_bin_dir == self.cni_conf_dir {
            return Err(ConfigError::Path {
                flag: "--cni-conf-dir",
                path: self.cni_conf_dir.clone(),
                why: "must differ from --cni-bin-dir",
            });
        }
        let taint = match (self.remove_taint && !self.uninstall, &self.node_name) {
            (false, _) => None,
            (true, None) => return Err(ConfigError::NoNodeName),
            (true, Some(node_name)) => Some(TaintSettings {
                node_name: node_name.clone(),
                kubeconfig: self.kubeconfig.clone(),
                tokend_socket: self
                    .tokend_socket
                    .clone()
                    .unwrap_or_else(|| self.socket.clone()),
            }),
        };
        Ok(Settings {
            bin_dir: self.cni_bin_dir.clone(),
            conf_dir: self.cni_conf_dir.clone(),
            plugin_binary,
            install_state_dir: self
                .install_state_dir
                .clone()
                .unwrap_or_else(|| self.state_dir.join("install")),
            entry: self.entry(),
            health_addr: self.health_addr,
            rescan_interval: self.rescan_interval,
            guard_interval: self.guard_interval,
            taint,
            uninstall: self.uninstall,
        })
    }

    /// The plugin entry: every key written out, in DESIGN.md's order.
    pub fn entry(&self) -> Entry {
        // Every path flag was checked to be UTF-8 by its parser.
        let text = |p: &Path| p.to_string_lossy().into_owned();
        Entry::new([
            ("socket", json!(text(&self.socket))),
            ("timeoutMs", json!(self.timeout_ms)),
            ("failurePolicy", json!(self.failure_policy.as_str())),
            ("failOpenNamespaces", json!(self.fail_open_namespaces.0)),
            ("stateDir", json!(text(&self.state_dir))),
            ("logFile", json!(text(&self.log_file))),
        ])
    }
}

/// The log filter from `PODID_LOG`'s value (`None`: `info`).
pub fn log_filter(value: Option<&str>) -> Result<EnvFilter, ConfigError> {
    let value = value.unwrap_or("info");
    EnvFilter::try_new(value).map_err(|e| ConfigError::LogFilter {
        value: value.to_owned(),
        why: e.to_string(),
    })
}

fn absolute_path(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err("must be an absolute path".into());
    }
    if path.parent().is_none() {
        return Err("cannot be the root directory".into());
    }
    Ok(path)
}

fn socket_path(value: &str) -> Result<PathBuf, String> {
    let path = absolute_path(value)?;
    if value.ends_with('/') {
        return Err("the socket path must name a file".into());
    }
    if value.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "the socket path is {} bytes long; unix sockets allow at most {MAX_SOCKET_PATH}",
            value.len()
        ));
    }
    Ok(path)
}

fn existing_file(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    if path.is_file() {
        Ok(path)
    } else {
        Err("no such file".into())
    }
}

fn node_name(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.len() <= MAX_NODE_NAME
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value
            .split('.')
            .all(|label| !label.is_empty() && !label.starts_with('-') && !label.ends_with('-'));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "a node name is a DNS subdomain: at most {MAX_NODE_NAME} lower-case letters, digits, '-' and '.'"
        ))
    }
}

fn namespaces(value: &str) -> Result<Namespaces, String> {
    let mut names = Vec::new();
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let valid = name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !valid {
            return Err(format!(
                "{name:?} is not a namespace name (at most 63 lower-case letters, digits and '-')"
            ));
        }
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    Ok(Namespaces(names))
}

/// `<n>` or `<n>s` seconds, or `<n>ms` milliseconds; at least 10 ms, at most an hour.
fn interval(value: &str) -> Result<Duration, String> {
    let (digits, unit) = match value.strip_suffix("ms") {
        Some(digits) => (digits, 1),
        None => (value.strip_suffix('s').unwrap_or(value), 1000),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| "expected a duration such as 10, 10s or 500ms".to_owned())?;
    let duration = Duration::from_millis(n.saturating_mul(unit));
    if duration < Duration::from_millis(10) || duration > MAX_INTERVAL {
        return Err(format!("must be from 10ms to {}s", MAX_INTERVAL.as_secs()));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("podid-install").chain(args.iter().copied()))
    }

    fn exe(dir: &Path) -> PathBuf {
        std::fs::write(dir.join("podid"), b"x").unwrap();
        dir.join("podid-install")
    }

    #[test]
    fn defaults() {
        let dir = tempfile::tempdir().unwrap();
        let exe = exe(dir.path());
        let args = parse(&["--node-name", "aks-nodepool1-1234-vmss000000"]).unwrap();
        let s = args.settings(Some(&exe)).unwrap();
        assert_eq!(s.bin_dir, Path::new("/opt/cni/bin"));
        assert_eq!(s.conf_dir, Path::new("/etc/cni/net.d"));
        assert_eq!(s.plugin_binary, dir.path().join("podid"));
        assert_eq!(s.install_state_dir, Path::new("/var/lib/podid/install"));
        assert_eq!(s.health_addr, "0.0.0.0:2584".parse().unwrap());
        assert_eq!(s.rescan_interval, Duration::from_secs(5));
        assert_eq!(s.guard_interval, Duration::from_secs(10));
        assert!(!s.uninstall);
        assert_eq!(
            s.taint,
            Some(TaintSettings {
                node_name: "aks-nodepool1-1234-vmss000000".into(),
                kubeconfig: None,
                tokend_socket: defaults::SOCKET.into(),
            })
        );
        assert_eq!(
            s.entry.as_value(),
            json!({
                "type": "podid",
                "socket": "/var/run/podid/tokend.sock",
                "timeoutMs": 2000,
                "failurePolicy": "Fail",
                "failOpenNamespaces": ["kube-system"],
                "stateDir": "/var/lib/podid",
                "logFile": "/var/log/podid/cni.log"
            })
        );
        let keys: Vec<String> = match s.entry.as_value() {
            Value::Object(map) => map.keys().cloned().collect(),
            _ => unreachable!(),
        };
        assert_eq!(
            keys,
            [
                "type",
                "socket",
                "timeoutMs",
                "failurePolicy",
                "failOpenNamespaces",
                "stateDir",
                "logFile"
            ]
        );
    }

    #[test]
    fn plugin_keys_from_flags() {
        let dir = tempfile::tempdir().unwrap();
        let exe = exe(dir.path());
        let args = parse(&[
            "--socket",
            "/run/p/t.sock",
            "--state-dir",
            "/srv/podid",
            "--timeout-ms",
            "500",
            "--failure-policy",
            "Ignore",
            "--fail-open-namespaces",
            "kube-system, monitoring,kube-system",
            "--log-file",
            "/tmp/cni.log",
            "--remove-taint=false",
            "--tokend-socket",
            "/host/run/t.sock",
            "--guard-interval",
            "250ms",
        ])
        .unwrap();
        let s = args.settings(Some(&exe)).unwrap();
        assert_eq!(
            s.entry.as_value(),
            json!({
                "type": "podid",
                "socket": "/run/p/t.sock",
                "timeoutMs": 500,
                "failurePolicy": "Ignore",
                "failOpenNamespaces": ["kube-system", "monitoring"],
                "stateDir": "/srv/podid",
                "logFile": "/tmp/cni.log"
            })
        );
        assert_eq!(s.taint, None, "--remove-taint=false needs no node name");
        assert_eq!(s.install_state_dir, Path::new("/srv/podid/install"));
        assert_eq!(s.guard_interval, Duration::from_millis(250));
        let none = parse(&["--fail-open-namespaces", "", "--remove-taint=false"]).unwrap();
        assert_eq!(none.fail_open_namespaces, Namespaces(vec![]));
        assert!(parse(&["--uninstall"]).unwrap().uninstall);
    }

    #[test]
    fn bad_values_name_the_flag_and_value() {
        for (args, flag, value) in [
            (&["--timeout-ms", "0"][..], "--timeout-ms", "0"),
            (&["--timeout-ms", "60001"], "--timeout-ms", "60001"),
            (&["--failure-policy", "fail"], "--failure-policy", "fail"),
            (
                &["--fail-open-namespaces", "Kube_System"],
                "--fail-open-namespaces",
                "Kube_System",
            ),
            (&["--socket", "relative.sock"], "--socket", "relative.sock"),
            (&["--cni-conf-dir", "etc/cni"], "--cni-conf-dir", "etc/cni"),
            (&["--node-name", "Node_1"], "--node-name", "Node_1"),
            (&["--guard-interval", "1h"], "--guard-interval", "1h"),
            (&["--rescan-interval", "5ms"], "--rescan-interval", "5ms"),
            (
                &["--kubeconfig", "/nonexistent/kubeconfig"],
                "--kubeconfig",
                "/nonexistent/kubeconfig",
            ),
            (&["--health-addr", "nowhere"], "--health-addr", "nowhere"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(flag) && err.contains(value), "{args:?}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let exe = exe(dir.path());
        assert_eq!(
            parse(&[]).unwrap().settings(Some(&exe)),
            Err(ConfigError::NoNodeName)
        );
        assert!(
            parse(&["--uninstall"])
                .unwrap()
                .settings(Some(&exe))
                .is_ok()
        );
        assert_eq!(
            parse(&["--remove-taint=false"]).unwrap().settings(None),
            Err(ConfigError::NoPluginBinary)
        );
        let missing = parse(&[
            "--remove-taint=false",
            "--plugin-binary",
            "/nonexistent/podid",
        ])
        .unwrap()
        .settings(Some(&exe))
        .unwrap_err()
        .to_string();
        assert_eq!(
            missing,
            "--plugin-binary \"/nonexistent/podid\": no such file"
        );
        let same = parse(&["--remove-taint=false", "--cni-conf-dir", "/opt/cni/bin"])
            .unwrap()
            .settings(Some(&exe))
            .unwrap_err()
            .to_string();
        assert!(
            same.starts_with("--cni-conf-dir \"/opt/cni/bin\""),
            "{same}"
        );
    }

    #[test]
    fn log_filters() {
        assert!(log_filter(None).is_ok());
        let err = log_filter(Some("podid_install=loud"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("PODID_LOG=\"podid_install=loud\""), "{err}");
    }
}
