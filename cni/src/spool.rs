//! The spool: records of pods that started while tokend was unavailable, written to
//! `<stateDir>/pending/<containerId>-<ifname>.json` for tokend to adopt (DESIGN.md "Plugin
//! config"). Each attachment has its own file, written by atomic rename, so concurrent
//! plugin processes never share one.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use podid_api::defaults::{self, LISTENER_PORT};
use podid_api::fsutil::{self, Durability};
use podid_api::{BoundPod, PodKey};

/// The port tokend last announced in `<stateDir>/listener-port`, else the default 2579.
pub fn announced_listener_port(state_dir: &Path) -> u16 {
    fs::read_to_string(defaults::listener_port_file(state_dir))
        .ok()
        .and_then(|text| defaults::parse_listener_port(&text))
        .unwrap_or(LISTENER_PORT)
}

pub fn path(state_dir: &Path, key: &PodKey) -> PathBuf {
    defaults::pending_dir(state_dir).join(key.file_name())
}

/// Writes `pod` to its spool file (0600), creating the spool directory (0700) if needed.
pub fn write(state_dir: &Path, pod: &BoundPod) -> io::Result<PathBuf> {
    let dir = defaults::pending_dir(state_dir);
    DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    let path = dir.join(pod.record.key().file_name());
    let json = serde_json::to_vec(pod)?;
    fsutil::write_atomic(&path, &json, 0o600, Durability::ProcessCrash)?;
    Ok(path)
}

/// Removes the spool file of `key`; `Ok(false)` when there was none.
pub fn remove(state_dir: &Path, key: &PodKey) -> io::Result<bool> {
    match fs::remove_file(path(state_dir, key)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// One file of the spool.
#[derive(Debug)]
pub struct Entry {
    pub path: PathBuf,
    /// The record, or why the file could not be read as one.
    pub pod: Result<BoundPod, String>,
}

/// Every record file in the spool (temp files of writes in progress are skipped); an absent
/// spool directory is an empty spool.
pub fn list(state_dir: &Path) -> io::Result<Vec<Entry>> {
    let dir = defaults::pending_dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut spool = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if fsutil::is_temp_file(&name) || !name.ends_with(".json") {
            continue;
        }
        let path = entry.path();
        let pod = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()));
        spool.push(Entry { path, pod });
    }
    spool.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(spool)
}

#[cfg(test)]
mod tests {
    use super::*;
    use podid_api::PodRecord;
    use std::os::unix::fs::PermissionsExt;

    fn pod(container_id: &str) -> BoundPod {
        BoundPod {
            record: PodRecord {
                container_id: container_id.into(),
                ifname: "eth0".into(),
                netns: "/run/netns/x".into(),
                netns_inode: 1,
                netns_dev: 2,
                pod_namespace: Some("kube-system".into()),
                pod_name: Some("coredns-0".into()),
                pod_uid: None,
                ips: vec!["10.0.0.2/24".into()],
                network: Some("azure".into()),
            },
            listener_port: 2579,
        }
    }

    #[test]
    fn write_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert!(list(&state).unwrap().is_empty());
        let written = write(&state, &pod("abc")).unwrap();
        assert_eq!(written, state.join("pending/abc-eth0.json"));
        let pending_mode = fs::metadata(state.join("pending"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(pending_mode & 0o777, 0o700);
        assert_eq!(
            fs::metadata(&written).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::write(state.join("pending/garbage.json"), b"{").unwrap();
        fs::write(state.join("pending/.podid-tmp-1"), b"{").unwrap();
        let entries = list(&state).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].pod.as_ref().unwrap(), &pod("abc"));
        assert!(entries[1].pod.is_err());
        let key = PodKey::new("abc", "eth0");
        assert!(remove(&state, &key).unwrap());
        assert!(!remove(&state, &key).unwrap());
    }

    #[test]
    fn listener_port_announcement() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(announced_listener_port(dir.path()), 2579);
        fs::write(dir.path().join("listener-port"), "3100\n").unwrap();
        assert_eq!(announced_listener_port(dir.path()), 3100);
        fs::write(dir.path().join("listener-port"), "nope").unwrap();
        assert_eq!(announced_listener_port(dir.path()), 2579);
    }
}
