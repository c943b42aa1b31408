//! Defaults and file names shared by the plugin, tokend and the installer (DESIGN.md
//! "Names shared by the parts" and "Plugin config").

use std::path::{Path, PathBuf};

/// tokend's unix socket, answered by the plugin's `socket` key and tokend's `--socket`.
pub const SOCKET: &str = "/var/run/podid/tokend.sock";
/// tokend's state dir; the plugin's spool lives under it.
pub const STATE_DIR: &str = "/var/lib/podid";
/// Port of the per-pod listener inside each pod netns.
pub const LISTENER_PORT: u16 = 2579;
/// tokend's health, readiness and metrics address.
pub const TOKEND_HEALTH_ADDR: &str = "0.0.0.0:2580";
/// The metadata address every Azure SDK calls.
pub const METADATA_ADDRESS: &str = "169.254.169.254";
/// The metadata port every Azure SDK calls.
pub const METADATA_PORT: u16 = 80;
/// How long the plugin waits for tokend during ADD.
pub const TIMEOUT_MS: u64 = 2000;
/// Where the plugin logs (stdout belongs to the CNI result).
pub const LOG_FILE: &str = "/var/log/podid/cni.log";
/// Namespaces whose pods start without tokend (spooled), so the cluster can come up.
pub const FAIL_OPEN_NAMESPACES: &[&str] = &["kube-system"];

/// Name of the nf_tables table the plugin installs in every pod netns.
pub const NFT_TABLE: &str = "podid";
/// Name of its one chain.
pub const NFT_CHAIN: &str = "output";

/// Directory (under the state dir) where the plugin spools records tokend did not take in time.
pub const PENDING_DIR: &str = "pending";
/// Directory (under the state dir) where tokend keeps every record it accepted.
pub const PODS_DIR: &str = "pods";
/// File (under the state dir) where tokend announces its listener port.
pub const LISTENER_PORT_FILE: &str = "listener-port";

/// `<state dir>/pending`.
pub fn pending_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(PENDING_DIR)
}

/// `<state dir>/pods`.
pub fn pods_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(PODS_DIR)
}

/// `<state dir>/listener-port`.
pub fn listener_port_file(state_dir: &Path) -> PathBuf {
    state_dir.join(LISTENER_PORT_FILE)
}

/// Reads the contents of the listener-port file: a decimal port, surrounding whitespace allowed.
pub fn parse_listener_port(contents: &str) -> Option<u16> {
    contents.trim().parse::<u16>().ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_port_file_contents() {
        assert_eq!(parse_listener_port("2579\n"), Some(2579));
        assert_eq!(parse_listener_port(" 8080 "), Some(8080));
        assert_eq!(parse_listener_port("0"), None);
        assert_eq!(parse_listener_port(""), None);
        assert_eq!(parse_listener_port("70000"), None);
        assert_eq!(parse_listener_port("25x"), None);
    }
}
