//! Flags (each with a `PODID_<FLAG>` environment fallback), validated once at start into
//! [`Settings`]; an invalid value stops the program with a message naming flag and value.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::lease::{LeaseSettings, LeaseTimings};

/// Where the in-cluster service-account namespace is mounted.
pub const SERVICE_ACCOUNT_NAMESPACE_FILE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// The lease namespace outside a cluster.
pub const DEFAULT_LEASE_NAMESPACE: &str = "podid-system";
/// Concurrent pod reconciles (each one's writes are sequential).
pub const DEFAULT_WORKERS: usize = 32;
/// The environment variable holding the log filter (`info`, `podid_controller=debug`, ...).
pub const LOG_ENV: &str = "PODID_LOG";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "podid-controller",
    version,
    about = "Writes AzureAssignedIdentity objects for pods labelled aadpodidbinding (managed mode)"
)]
pub struct Args {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "PODID_HEALTH_ADDR", default_value = "0.0.0.0:2582")]
    pub health_addr: SocketAddr,
    /// Kubeconfig to use; default: in-cluster config, else the default kubeconfig.
    #[arg(long, env = "PODID_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Let a binding in any namespace select pods in any namespace (as aad-pod-identity did);
    /// identities annotated `aadpodidentity.k8s.io/Behavior: namespaced` stay namespaced.
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
    /// Name of the coordination.k8s.io/v1 Lease the replicas elect a leader with.
    #[arg(long, env = "PODID_LEASE_NAME", default_value = "podid-controller")]
    pub lease_name: String,
    /// Namespace of the Lease; default: the service account's namespace in a cluster, else
    /// podid-system.
    #[arg(long, env = "PODID_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's name in the Lease; default: $POD_NAME, else the hostname. Must be stable
    /// per replica and differ between replicas.
    #[arg(long, env = "PODID_HOLDER_IDENTITY")]
    pub holder_identity: Option<String>,
    /// Log format.
    #[arg(long, env = "PODID_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// What the environment contributes to the defaults; read once by [`Environment::current`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    pub pod_name: Option<String>,
    pub hostname: Option<String>,
    pub service_account_namespace: Option<String>,
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

impl Environment {
    pub fn current() -> Self {
        Self {
            pod_name: non_empty(std::env::var("POD_NAME").ok()),
            hostname: non_empty(std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
                .or_else(|| non_empty(std::env::var("HOSTNAME").ok())),
            service_account_namespace: non_empty(
                std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE_FILE).ok(),
            ),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--lease-name {value:?}: {why}")]
    LeaseName { value: String, why: &'static str },
    #[error("--lease-namespace {value:?}: {why}")]
    LeaseNamespace { value: String, why: &'static str },
    #[error("--holder-identity {value:?}: must not be empty or contain whitespace")]
    HolderIdentity { value: String },
    #[error("--holder-identity: none given, and neither POD_NAME nor the hostname is set")]
    NoHolderIdentity,
    #[error("--kubeconfig {path:?}: no such file")]
    Kubeconfig { path: PathBuf },
    #[error("{LOG_ENV}={value:?}: {why}")]
    LogFilter { value: String, why: String },
}

/// What the controller runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub cluster_wide_bindings: bool,
    pub lease: LeaseSettings,
    /// `None`: no health listener (tests that read the handle instead).
    pub health_addr: Option<SocketAddr>,
    pub workers: usize,
}

impl Settings {
    /// Defaults around a lease: namespaced matching, no health listener.
    pub fn new(lease: LeaseSettings) -> Self {
        Self {
            cluster_wide_bindings: false,
            lease,
            health_addr: None,
            workers: DEFAULT_WORKERS,
        }
    }
}

/// Why `value` is not a DNS-1123 subdomain (object names), if it is not.
fn subdomain_error(value: &str) -> Option<&'static str> {
    if value.is_empty() || value.len() > 253 {
        return Some("must be 1 to 253 characters");
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Some("must hold only lowercase letters, digits, '-' and '.'");
    }
    if value
        .split('.')
        .any(|part| part.is_empty() || part.starts_with('-') || part.ends_with('-'))
    {
        return Some("each dot-separated part must start and end with a letter or digit");
    }
    None
}

/// Why `value` is not a DNS-1123 label (namespaces), if it is not.
fn label_error(value: &str) -> Option<&'static str> {
    if value.is_empty() || value.len() > 63 {
        return Some("must be 1 to 63 characters");
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Some("must hold only lowercase letters, digits and '-'");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Some("must start and end with a letter or digit");
    }
    None
}

impl Args {
    /// Validates the flags and fills the defaults from `env`.
    pub fn settings(&self, env: &Environment) -> Result<Settings, ConfigError> {
        if let Some(why) = subdomain_error(&self.lease_name) {
            return Err(ConfigError::LeaseName {
                value: self.lease_name.clone(),
                why,
            });
        }
        let namespace = self
            .lease_namespace
            .clone()
            .or_else(|| env.service_account_namespace.clone())
            .unwrap_or_else(|| DEFAULT_LEASE_NAMESPACE.to_owned());
        if let Some(why) = label_error(&namespace) {
            return Err(ConfigError::LeaseNamespace {
                value: namespace,
                why,
            });
        }
        let holder = match &self.holder_identity {
            Some(value) if value.is_empty() || value.chars().any(char::is_whitespace) => {
                return Err(ConfigError::HolderIdentity {
                    value: value.clone(),
                });
            }
            Some(value) => value.clone(),
            None => env
                .pod_name
                .clone()
                .or_else(|| env.hostname.clone())
                .ok_or(ConfigError::NoHolderIdentity)?,
        };
        if let Some(path) = self.kubeconfig.as_ref().filter(|p| !p.is_file()) {
            return Err(ConfigError::Kubeconfig { path: path.clone() });
        }
        Ok(Settings {
            cluster_wide_bindings: self.cluster_wide_bindings,
            lease: LeaseSettings {
                name: self.lease_name.clone(),
                namespace,
                holder,
                timings: LeaseTimings::default(),
            },
            health_addr: Some(self.health_addr),
            workers: DEFAULT_WORKERS,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("podid-controller").chain(args.iter().copied()))
    }

    fn env() -> Environment {
        Environment {
            pod_name: Some("podid-controller-7d9f-abcde".into()),
            hostname: Some("host".into()),
            service_account_namespace: None,
        }
    }

    #[test]
    fn defaults() {
        let args = parse(&[]).unwrap();
        let s = args.settings(&env()).unwrap();
        assert_eq!(s.health_addr, Some("0.0.0.0:2582".parse().unwrap()));
        assert!(!s.cluster_wide_bindings);
        assert_eq!(s.lease.name, "podid-controller");
        assert_eq!(s.lease.namespace, DEFAULT_LEASE_NAMESPACE);
        assert_eq!(
            s.lease.holder, "podid-controller-7d9f-abcde",
            "POD_NAME first"
        );
        assert_eq!(s.lease.timings, LeaseTimings::default());
        assert_eq!(args.log_format, LogFormat::Text);

        let in_cluster = Environment {
            pod_name: None,
            hostname: Some("host".into()),
            service_account_namespace: Some("kube-system".into()),
        };
        let s = args.settings(&in_cluster).unwrap();
        assert_eq!(s.lease.namespace, "kube-system");
        assert_eq!(s.lease.holder, "host", "then the hostname");
        assert_eq!(
            args.settings(&Environment::default()),
            Err(ConfigError::NoHolderIdentity)
        );
    }

    #[test]
    fn flags() {
        let args = parse(&[
            "--cluster-wide-bindings",
            "--lease-name",
            "my-lease",
            "--lease-namespace",
            "ops",
            "--holder-identity",
            "replica-a",
            "--health-addr",
            "127.0.0.1:9000",
            "--log-format",
            "json",
        ])
        .unwrap();
        let s = args.settings(&env()).unwrap();
        assert!(s.cluster_wide_bindings);
        assert_eq!(
            (
                s.lease.name.as_str(),
                s.lease.namespace.as_str(),
                s.lease.holder.as_str()
            ),
            ("my-lease", "ops", "replica-a")
        );
        assert_eq!(s.health_addr, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(args.log_format, LogFormat::Json);
        assert!(
            !parse(&["--cluster-wide-bindings=false"])
                .unwrap()
                .cluster_wide_bindings
        );
        assert!(
            parse(&["--cluster-wide-bindings=yes"])
                .unwrap()
                .cluster_wide_bindings
        );
    }

    #[test]
    fn bad_values_name_the_flag_and_value() {
        let err = parse(&["--health-addr", "nowhere"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--health-addr") && err.contains("nowhere"),
            "{err}"
        );
        let err = parse(&["--log-format", "xml"]).unwrap_err().to_string();
        assert!(err.contains("--log-format") && err.contains("xml"), "{err}");

        let bad = |flags: &[&str]| {
            parse(flags)
                .unwrap()
                .settings(&env())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            bad(&["--lease-name", "Lease_1"]),
            "--lease-name \"Lease_1\": must hold only lowercase letters, digits, '-' and '.'"
        );
        assert!(bad(&["--lease-name=-x"]).starts_with("--lease-name \"-x\""));
        assert_eq!(
            bad(&["--lease-namespace", "a.b"]),
            "--lease-namespace \"a.b\": must hold only lowercase letters, digits and '-'"
        );
        assert!(bad(&["--holder-identity", "a b"]).starts_with("--holder-identity \"a b\""));
        assert_eq!(
            bad(&["--kubeconfig", "/nonexistent/kubeconfig"]),
            "--kubeconfig \"/nonexistent/kubeconfig\": no such file"
        );
    }

    #[test]
    fn log_filters() {
        assert!(log_filter(None).is_ok());
        assert!(log_filter(Some("podid_controller=debug,kube=warn")).is_ok());
        let err = log_filter(Some("podid_controller=loud"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("PODID_LOG=\"podid_controller=loud\""),
            "{err}"
        );
    }
}
