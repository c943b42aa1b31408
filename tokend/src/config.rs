//! Command line: every flag has an environment fallback `PODID_<FLAG>`, and every value is
//! checked while parsing, so a bad one stops tokend with a message naming flag and value.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use podid_api::defaults;

/// Longest unix socket path the kernel accepts (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Longest interval accepted for the periodic tasks: a day.
const MAX_INTERVAL_SECS: u64 = 86_400;

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// podid-tokend: the node token daemon. It keeps one IMDS listener inside every registered
/// pod's network namespace. Log level: `PODID_LOG` (RUST_LOG syntax, default `info`).
#[derive(Debug, Clone, Parser)]
#[command(name = "podid-tokend", version)]
pub struct Config {
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

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::try_parse_from(std::iter::once("podid-tokend").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
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
        ] {
            let message = parse(&[flag, value]).unwrap_err();
            assert!(message.contains(flag), "{flag} {value}: {message}");
            assert!(message.contains(value), "{flag} {value}: {message}");
        }
    }
}
