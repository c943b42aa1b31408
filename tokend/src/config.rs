//! Command line: every flag has an environment fallback `PODID_<FLAG>`, and every value is
//! checked while parsing, so a bad one stops tokend with a message naming flag and value.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, ValueEnum};
use podid_api::defaults;
use reqwest::Url;

/// Longest unix socket path the kernel accepts (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Longest interval accepted for the periodic tasks: a day.
const MAX_INTERVAL_SECS: u64 = 86_400;
/// Longest wait a pod request may be held for (`--pod-wait`, `--assignment-wait`).
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Longest Kubernetes node name (a DNS subdomain).
const MAX_NODE_NAME: usize = 253;

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What the pod listeners answer on `/metadata/instance…` and `/metadata/versions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InstanceMetadata {
    /// Forward to the node's IMDS and relay its answer (aad-pod-identity's default).
    Proxy,
    /// 403 "Request blocked by podid-tokend" (aad-pod-identity's --block-instance-metadata).
    Block,
    /// 404, as for any other path tokend does not serve.
    Deny,
}

/// podid-tokend: the node token daemon. It keeps one IMDS listener inside every registered
/// pod's network namespace and serves each pod the Azure identities assigned to it. Log
/// level: `PODID_LOG` (RUST_LOG syntax, default `info`).
#[derive(Debug, Clone, Parser)]
#[command(name = "podid-tokend", version)]
pub struct Config {
    /// This node's name: tokend watches only this node's pods and AzureAssignedIdentities.
    #[arg(long, env = "PODID_NODE_NAME", value_name = "NAME", value_parser = node_name)]
    pub node_name: String,

    /// Kubeconfig to use; default: the in-cluster config, else the default kubeconfig.
    #[arg(long, env = "PODID_KUBECONFIG", value_name = "PATH", value_parser = existing_file)]
    pub kubeconfig: Option<PathBuf>,

    /// Let a binding in any namespace select pods in any namespace, as podid-controller does
    /// with the same flag; identities annotated `aadpodidentity.k8s.io/Behavior: namespaced`
    /// stay namespaced.
    #[arg(
        long,
        env = "PODID_CLUSTER_WIDE_BINDINGS",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub cluster_wide_bindings: bool,

    /// How long a token request is held while its pod is not yet in tokend's pod watch
    /// (`5`, `5s` or `500ms`); then 404 with Retry-After.
    #[arg(long, env = "PODID_POD_WAIT", value_name = "DURATION", default_value = "5s", value_parser = wait)]
    pub pod_wait: Duration,

    /// How long a token request is held for an identity the pod's bindings will bring but
    /// whose assignment is not there yet; then 404 with Retry-After.
    #[arg(long, env = "PODID_ASSIGNMENT_WAIT", value_name = "DURATION", default_value = "20s", value_parser = wait)]
    pub assignment_wait: Duration,

    /// What pods get on /metadata/instance and /metadata/versions.
    #[arg(long, env = "PODID_INSTANCE_METADATA", value_enum, default_value_t = InstanceMetadata::Proxy)]
    pub instance_metadata: InstanceMetadata,

    /// Token requests per second one pod may make (token bucket refill rate).
    #[arg(long, env = "PODID_POD_RPS", value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub pod_rps: u32,

    /// Requests one pod may make at once above its rate (token bucket size).
    #[arg(long, env = "PODID_POD_BURST", value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub pod_burst: u32,

    /// Requests of one pod in progress at once.
    #[arg(long, env = "PODID_POD_INFLIGHT", value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub pod_inflight: u32,

    /// Pod connections open at once on all listeners together (each pod may hold 64); at the
    /// cap a new connection is closed at once.
    #[arg(long, env = "PODID_MAX_CONNECTIONS", value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_connections: u32,

    /// Calls to Entra ID and the node's IMDS in progress at once, node-wide.
    #[arg(long, env = "PODID_UPSTREAM_INFLIGHT", value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub upstream_inflight: u32,

    /// Entra ID authority host for identities without `adEndpoint` (sovereign or private
    /// clouds); must be https.
    #[arg(long, env = "PODID_AUTHORITY_HOST", value_name = "URL", default_value = "https://login.microsoftonline.com", value_parser = authority_host)]
    pub authority_host: Url,

    /// PEM file of extra CA certificates trusted for Entra ID, on top of the system roots.
    #[arg(long, env = "PODID_CA_FILE", value_name = "PATH", value_parser = existing_file)]
    pub ca_file: Option<PathBuf>,

    /// The node's own instance metadata service: tokens of type-0 identities and of
    /// exception pods, and the instance metadata proxy.
    #[arg(long, env = "PODID_IMDS_ENDPOINT", value_name = "URL", default_value = "http://169.254.169.254", value_parser = imds_endpoint)]
    pub imds_endpoint: Url,

    /// Tokens kept in the cache (one per identity and resource, per pod for type 3).
    #[arg(long, env = "PODID_TOKEN_CACHE_SIZE", value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub token_cache_size: u32,

    /// Unix socket the CNI plugin talks to.
    #[arg(long, env = "PODID_SOCKET", value_name = "PATH", default_value = defaults::SOCKET, value_parser = socket_path)]
    pub socket: PathBuf,

    /// State dir: accepted records (pods/), the plugin's spool (pending/), the listener-port file.
    #[arg(long, env = "PODID_STATE_DIR", value_name = "DIR", default_value = defaults::STATE_DIR, value_parser = state_dir)]
    pub state_dir: PathBuf,

    /// Port of the IMDS listener bound on 127.0.0.1 inside each new pod's netns.
    #[arg(long, env = "PODID_LISTENER_PORT", value_name = "PORT", default_value_t = defaults::LISTENER_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub listener_port: u16,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "PODID_HEALTH_ADDR", value_name = "ADDR", default_value = defaults::TOKEND_HEALTH_ADDR)]
    pub health_addr: SocketAddr,

    /// Seconds between checks that drop records whose netns is gone or replaced.
    #[arg(long, env = "PODID_NETNS_CHECK_INTERVAL", value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_INTERVAL_SECS))]
    pub netns_check_interval: u64,

    /// Seconds between rescans of the spool, in addition to watching it.
    #[arg(long, env = "PODID_SPOOL_RESCAN_INTERVAL", value_name = "SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=MAX_INTERVAL_SECS))]
    pub spool_rescan_interval: u64,

    /// Log format on stderr.
    #[arg(long, env = "PODID_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    pub fn netns_check_interval(&self) -> Duration {
        Duration::from_secs(self.netns_check_interval)
    }

    pub fn spool_rescan_interval(&self) -> Duration {
        Duration::from_secs(self.spool_rescan_interval)
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

fn existing_file(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    if path.is_file() {
        Ok(path)
    } else {
        Err("no such file".into())
    }
}

/// `<n>` or `<n>s` seconds, or `<n>ms` milliseconds, at most [`MAX_WAIT`].
fn wait(value: &str) -> Result<Duration, String> {
    let (digits, unit) = match value.strip_suffix("ms") {
        Some(digits) => (digits, 1),
        None => (value.strip_suffix('s').unwrap_or(value), 1000),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| "expected a duration such as 5, 5s or 500ms".to_owned())?;
    let duration = Duration::from_millis(n.saturating_mul(unit));
    if duration > MAX_WAIT {
        return Err(format!("at most {}s", MAX_WAIT.as_secs()));
    }
    Ok(duration)
}

fn url(value: &str) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| format!("not a URL: {e}"))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the URL must not have a query or a fragment".into());
    }
    if url.path() != "/" {
        return Err("the URL must not have a path".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("the URL must not carry credentials".into());
    }
    Ok(url)
}

fn authority_host(value: &str) -> Result<Url, String> {
    let url = url(value)?;
    if url.scheme() != "https" {
        return Err("the authority host must use https".into());
    }
    Ok(url)
}

fn imds_endpoint(value: &str) -> Result<Url, String> {
    let url = url(value)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("the endpoint must be http or https".into());
    }
    Ok(url)
}

fn socket_path(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err("the socket path must be absolute".into());
    }
    if path.file_name().is_none() || value.ends_with('/') {
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

fn state_dir(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err("the state dir must be an absolute path".into());
    }
    if path.parent().is_none() {
        return Err("the state dir cannot be the root directory".into());
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `args` after a valid `--node-name`, unless they set one.
    fn parse(args: &[&str]) -> Result<Config, String> {
        let node: &[&str] = if args.contains(&"--node-name") {
            &[]
        } else {
            &["--node-name", "node-1"]
        };
        let args = std::iter::once("podid-tokend")
            .chain(node.iter().copied())
            .chain(args.iter().copied());
        Config::try_parse_from(args).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_designs() {
        // Only holds when the environment does not set PODID_* (as in CI).
        if std::env::vars().any(|(k, _)| k.starts_with("PODID_")) {
            return;
        }
        let config = parse(&[]).unwrap();
        assert_eq!(config.socket, PathBuf::from("/var/run/podid/tokend.sock"));
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/podid"));
        assert_eq!(config.listener_port, 2579);
        assert_eq!(config.health_addr, "0.0.0.0:2580".parse().unwrap());
        assert_eq!(config.netns_check_interval(), Duration::from_secs(30));
        assert_eq!(config.spool_rescan_interval(), Duration::from_secs(5));
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.node_name, "node-1");
        assert_eq!(config.kubeconfig, None);
        assert!(!config.cluster_wide_bindings);
        assert_eq!(config.pod_wait, Duration::from_secs(5));
        assert_eq!(config.assignment_wait, Duration::from_secs(20));
        assert_eq!(config.instance_metadata, InstanceMetadata::Proxy);
        assert_eq!(
            (config.pod_rps, config.pod_burst, config.pod_inflight),
            (50, 100, 16)
        );
        assert_eq!(config.upstream_inflight, 64);
        assert_eq!(config.max_connections, 1024);
        assert_eq!(
            config.authority_host.as_str(),
            "https://login.microsoftonline.com/"
        );
        assert_eq!(config.ca_file, None);
        assert_eq!(config.imds_endpoint.as_str(), "http://169.254.169.254/");
        assert_eq!(config.token_cache_size, 4096);
    }

    #[test]
    fn identity_flags() {
        let ca = tempfile::NamedTempFile::new().unwrap();
        let ca_path = ca.path().to_str().unwrap();
        let config = parse(&[
            "--cluster-wide-bindings",
            "--pod-wait",
            "500ms",
            "--assignment-wait",
            "3",
            "--instance-metadata",
            "block",
            "--pod-rps",
            "5",
            "--pod-burst",
            "7",
            "--pod-inflight",
            "2",
            "--upstream-inflight",
            "9",
            "--max-connections",
            "33",
            "--authority-host",
            "https://login.microsoftonline.us",
            "--ca-file",
            ca_path,
            "--imds-endpoint",
            "http://127.0.0.1:8080",
            "--token-cache-size",
            "10",
            "--kubeconfig",
            ca_path,
        ])
        .unwrap();
        assert!(config.cluster_wide_bindings);
        assert_eq!(config.pod_wait, Duration::from_millis(500));
        assert_eq!(config.assignment_wait, Duration::from_secs(3));
        assert_eq!(config.instance_metadata, InstanceMetadata::Block);
        assert_eq!(
            (config.pod_rps, config.pod_burst, config.pod_inflight),
            (5, 7, 2)
        );
        assert_eq!(config.upstream_inflight, 9);
        assert_eq!(config.max_connections, 33);
        assert_eq!(
            config.authority_host.host_str(),
            Some("login.microsoftonline.us")
        );
        assert_eq!(config.ca_file.as_deref(), Some(ca.path()));
        assert_eq!(config.imds_endpoint.port(), Some(8080));
        assert_eq!(config.token_cache_size, 10);
        let off = parse(&["--cluster-wide-bindings", "false"]).unwrap();
        assert!(!off.cluster_wide_bindings);
    }

    #[test]
    fn node_name_is_required() {
        let message = Config::try_parse_from(["podid-tokend"])
            .unwrap_err()
            .to_string();
        assert!(message.contains("--node-name"), "{message}");
    }

    #[test]
    fn flags() {
        let config = parse(&[
            "--socket",
            "/tmp/x/t.sock",
            "--state-dir",
            "/tmp/state",
            "--listener-port",
            "3000",
            "--health-addr",
            "127.0.0.1:9999",
            "--netns-check-interval",
            "1",
            "--spool-rescan-interval",
            "2",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(config.socket, PathBuf::from("/tmp/x/t.sock"));
        assert_eq!(config.listener_port, 3000);
        assert_eq!(config.netns_check_interval(), Duration::from_secs(1));
        assert_eq!(config.spool_rescan_interval(), Duration::from_secs(2));
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn bad_values_name_the_flag_and_the_value() {
        let long_socket = format!("/{}", "s".repeat(120));
        for (flag, value) in [
            ("--listener-port", "0"),
            ("--listener-port", "70000"),
            ("--listener-port", "x"),
            ("--socket", "relative.sock"),
            ("--socket", "/run/podid/"),
            ("--socket", long_socket.as_str()),
            ("--state-dir", "var/lib/podid"),
            ("--state-dir", "/"),
            ("--health-addr", "localhost"),
            ("--health-addr", "1.2.3.4"),
            ("--netns-check-interval", "0"),
            ("--spool-rescan-interval", "0"),
            ("--spool-rescan-interval", "100000"),
            ("--log-format", "xml"),
            ("--node-name", "Node_1"),
            ("--node-name", "-node"),
            ("--kubeconfig", "/nonexistent/kubeconfig"),
            ("--ca-file", "/nonexistent/ca.pem"),
            ("--pod-wait", "soon"),
            ("--pod-wait", "601"),
            ("--assignment-wait", "1.5s"),
            ("--instance-metadata", "allow"),
            ("--pod-rps", "0"),
            ("--pod-burst", "0"),
            ("--pod-inflight", "0"),
            ("--upstream-inflight", "0"),
            ("--authority-host", "http://login.microsoftonline.com"),
            (
                "--authority-host",
                "https://login.microsoftonline.com/tenant",
            ),
            ("--authority-host", "login"),
            ("--imds-endpoint", "ftp://169.254.169.254"),
            ("--imds-endpoint", "http://169.254.169.254/metadata"),
            ("--token-cache-size", "0"),
        ] {
            let message = parse(&[flag, value]).unwrap_err();
            assert!(message.contains(flag), "{flag} {value}: {message}");
            assert!(message.contains(value), "{flag} {value}: {message}");
        }
    }
}
