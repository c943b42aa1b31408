//! tokend's state dir: the lock that keeps a second tokend out, the listener-port announcement,
//! the accepted records under `pods/` and the plugin's spool under `pending/`.

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use podid_api::fsutil::{Durability, is_temp_file, write_atomic};
use podid_api::{BoundPod, PodKey, defaults};

/// Name of the lock file under the state dir.
pub const LOCK_FILE: &str = "tokend.lock";
/// Suffix given to a record file that does not parse, so it is kept for a human to look at.
pub const INVALID_SUFFIX: &str = ".invalid";
/// Largest record file tokend reads; a real one is well under 2 KiB.
const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// A spool file younger than this that does not parse may still be being written by a
/// non-atomic writer: it is left for a later scan instead of being set aside.
pub const FRESH_GRACE: Duration = Duration::from_secs(2);
/// Mode of every directory tokend creates.
const DIR_MODE: u32 = 0o700;
/// Mode of record files: root-only, like the rest of the state dir.
const RECORD_MODE: u32 = 0o600;
/// Mode of the listener-port file, which the plugin reads.
const PORT_FILE_MODE: u32 = 0o644;

/// Errors of the state dir; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot open lock file {path}: {source}")]
    OpenLock { path: PathBuf, source: io::Error },
    #[error("another podid-tokend{holder} holds {path}; only one may use a state dir")]
    Locked { path: PathBuf, holder: String },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("cannot list {path}: {source}")]
    List { path: PathBuf, source: io::Error },
    #[error("cannot rename {path} to {to}: {source}")]
    Rename {
        path: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
}

/// What reading one record file gave.
#[derive(Debug)]
pub enum ReadOutcome {
    /// The file went away before it could be read (deleted or adopted meanwhile).
    Missing,
    Record(BoundPod),
    /// It does not parse; the reason names the problem.
    Invalid(String),
    /// It does not parse yet but was modified within [`FRESH_GRACE`].
    Fresh,
}

/// The state dir, locked for this process for as long as the value lives.
#[derive(Debug)]
pub struct StateDir {
    root: PathBuf,
    pods: PathBuf,
    pending: PathBuf,
    _lock: Flock<File>,
}

impl StateDir {
    /// Creates the state dir and its subdirectories (0700) and takes the exclusive lock.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        create_dir(root)?;
        let lock = lock(&root.join(LOCK_FILE))?;
        let pods = defaults::pods_dir(root);
        let pending = defaults::pending_dir(root);
        create_dir(&pods)?;
        create_dir(&pending)?;
        Ok(Self {
            root: root.to_owned(),
            pods,
            pending,
            _lock: lock,
        })
    }

    pub fn pods_dir(&self) -> &Path {
        &self.pods
    }

    pub fn pending_dir(&self) -> &Path {
        &self.pending
    }

    /// Announces the listener port to the plugin (`<state>/listener-port`).
    pub fn write_listener_port(&self, port: u16) -> Result<(), StoreError> {
        let path = defaults::listener_port_file(&self.root);
        write_atomic(
            &path,
            format!("{port}\n").as_bytes(),
            PORT_FILE_MODE,
            Durability::ProcessCrash,
        )
        .map_err(|source| StoreError::Write { path, source })
    }

    /// `pods/<containerId>-<ifname>.json`.
    pub fn record_path(&self, key: &PodKey) -> PathBuf {
        self.pods.join(key.file_name())
    }

    /// `pending/<containerId>-<ifname>.json`.
    pub fn pending_path(&self, key: &PodKey) -> PathBuf {
        self.pending.join(key.file_name())
    }

    /// Persists an accepted record. Pod netns do not survive a reboot, so no fsync.
    pub fn save(&self, bound: &BoundPod) -> Result<(), StoreError> {
        let path = self.record_path(&bound.record.key());
        let mut json = serde_json::to_vec(bound).map_err(|e| StoreError::Write {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        json.push(b'\n');
        write_atomic(&path, &json, RECORD_MODE, Durability::ProcessCrash)
            .map_err(|source| StoreError::Write { path, source })
    }

    /// Recreates the spool directory if something removed it.
    pub fn ensure_pending_dir(&self) -> Result<(), StoreError> {
        create_dir(&self.pending)
    }
}

/// Creates `path` and missing parents with mode 0700; an existing directory is kept as is.
pub fn create_dir(path: &Path) -> Result<(), StoreError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(|source| StoreError::CreateDir {
            path: path.to_owned(),
            source,
        })
}

fn lock(path: &Path) -> Result<Flock<File>, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(RECORD_MODE)
        .open(path)
        .map_err(|source| StoreError::OpenLock {
            path: path.to_owned(),
            source,
        })?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let holder = match file.read_to_string(&mut pid) {
                Ok(_) if !pid.trim().is_empty() => format!(" (pid {})", pid.trim()),
                _ => String::new(),
            };
            return Err(StoreError::Locked {
                path: path.to_owned(),
                holder,
            });
        }
        Err((_, errno)) => {
            return Err(StoreError::Lock {
                path: path.to_owned(),
                source: errno.into(),
            });
        }
    };
    // The pid only helps the error message of a second tokend; failing to write it is harmless.
    let _ = lock
        .set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| writeln!(lock, "{}", std::process::id()));
    Ok(lock)
}

/// Record files in `dir` (`*.json`, not temp files), sorted by name.
pub fn list_records(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let entries = fs::read_dir(dir).map_err(|source| StoreError::List {
        path: dir.to_owned(),
        source,
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| StoreError::List {
            path: dir.to_owned(),
            source,
        })?;
        if entry.file_name().to_str().is_some_and(is_record_name) {
            paths.push(entry.path());
        }
    }
    paths.sort();
    Ok(paths)
}

/// Whether a directory entry name is a record file tokend should read.
pub fn is_record_name(name: &str) -> bool {
    name.ends_with(".json") && name.len() > ".json".len() && !is_temp_file(name)
}

/// Reads one record file. `grace` leaves young unparsable files alone (spool only).
pub fn read_record(path: &Path, grace: Option<Duration>) -> ReadOutcome {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return ReadOutcome::Missing,
        Err(e) => return ReadOutcome::Invalid(format!("cannot open: {e}")),
    };
    let metadata = match file.metadata() {
        Ok(metadata) => metadata,
        Err(e) => return ReadOutcome::Invalid(format!("cannot stat: {e}")),
    };
    if !metadata.is_file() {
        return ReadOutcome::Invalid("not a regular file".into());
    }
    if metadata.len() > MAX_RECORD_BYTES {
        return ReadOutcome::Invalid(format!(
            "{} bytes long; at most {MAX_RECORD_BYTES} are read",
            metadata.len()
        ));
    }
    let mut bytes = Vec::new();
    if let Err(e) = (&mut file).take(MAX_RECORD_BYTES).read_to_end(&mut bytes) {
        return ReadOutcome::Invalid(format!("cannot read: {e}"));
    }
    match serde_json::from_slice::<BoundPod>(&bytes) {
        Ok(bound) => ReadOutcome::Record(bound),
        Err(e) => {
            let young = grace.is_some_and(|grace| {
                metadata
                    .modified()
                    .ok()
                    .and_then(|m| SystemTime::now().duration_since(m).ok())
                    .is_none_or(|age| age < grace)
            });
            if young {
                ReadOutcome::Fresh
            } else {
                ReadOutcome::Invalid(format!("not a pod record: {e}"))
            }
        }
    }
}

/// Renames `path` to `<path>.invalid` so it is kept but never read again; returns the new path.
pub fn set_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let mut name = path.file_name().map(OsString::from).unwrap_or_default();
    name.push(INVALID_SUFFIX);
    let to = path.with_file_name(name);
    fs::rename(path, &to).map_err(|source| StoreError::Rename {
        path: path.to_owned(),
        to: to.clone(),
        source,
    })?;
    Ok(to)
}

/// Removes `path`; returns whether it existed.
pub fn remove_file(path: &Path) -> Result<bool, StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(StoreError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podid_api::PodRecord;
    use std::os::unix::fs::PermissionsExt;

    fn bound(cid: &str) -> BoundPod {
        BoundPod {
            record: PodRecord {
                container_id: cid.into(),
                ifname: "eth0".into(),
                netns: "/run/netns/x".into(),
                netns_inode: 7,
                netns_dev: 4,
                pod_namespace: None,
                pod_name: None,
                pod_uid: None,
                ips: vec!["10.0.0.1/24".into()],
                network: None,
            },
            listener_port: 2579,
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn open_creates_private_dirs_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("a/state");
        let state = StateDir::open(&root).unwrap();
        for path in [&root, &root.join("pods"), &root.join("pending")] {
            assert_eq!(mode(path), 0o700, "{}", path.display());
        }
        let err = StateDir::open(&root).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Locked { .. }), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(state);
        assert!(
            StateDir::open(&root).is_ok(),
            "the lock goes with the value"
        );
    }

    #[test]
    fn listener_port_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        state.write_listener_port(2600).unwrap();
        let path = dir.path().join("listener-port");
        assert_eq!(fs::read_to_string(&path).unwrap(), "2600\n");
        assert_eq!(mode(&path), 0o644);
    }

    #[test]
    fn save_read_remove() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let b = bound("abc");
        state.save(&b).unwrap();
        let path = state.record_path(&b.record.key());
        assert_eq!(path, dir.path().join("pods/abc-eth0.json"));
        assert_eq!(mode(&path), 0o600);
        match read_record(&path, None) {
            ReadOutcome::Record(back) => assert_eq!(back, b),
            other => panic!("{other:?}"),
        }
        assert_eq!(list_records(state.pods_dir()).unwrap(), vec![path.clone()]);
        assert!(remove_file(&path).unwrap());
        assert!(!remove_file(&path).unwrap());
        assert!(matches!(read_record(&path, None), ReadOutcome::Missing));
    }

    #[test]
    fn listing_skips_temp_files_and_other_names() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "b-eth0.json",
            "a-eth0.json",
            ".podid-tmp-1-2-3",
            "x.json.invalid",
            "notes.txt",
            ".json",
        ] {
            fs::write(dir.path().join(name), b"{}").unwrap();
        }
        let names: Vec<_> = list_records(dir.path())
            .unwrap()
            .into_iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a-eth0.json", "b-eth0.json"]);
        assert!(!is_record_name(".podid-tmp-9.json"));
    }

    #[test]
    fn invalid_files_are_set_aside_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad-eth0.json");
        fs::write(&path, b"{\"containerId\": 3}").unwrap();
        let reason = match read_record(&path, None) {
            ReadOutcome::Invalid(reason) => reason,
            other => panic!("{other:?}"),
        };
        assert!(reason.contains("not a pod record"), "{reason}");
        let to = set_aside(&path).unwrap();
        assert_eq!(to, dir.path().join("bad-eth0.json.invalid"));
        assert_eq!(fs::read(&to).unwrap(), b"{\"containerId\": 3}");
        assert!(!path.exists());
    }

    #[test]
    fn young_unparsable_spool_files_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("half-eth0.json");
        fs::write(&path, b"{\"containerId\":").unwrap();
        assert!(matches!(
            read_record(&path, Some(Duration::from_secs(60))),
            ReadOutcome::Fresh
        ));
        assert!(matches!(
            read_record(&path, Some(Duration::ZERO)),
            ReadOutcome::Invalid(_)
        ));
    }

    #[test]
    fn oversized_and_non_regular_files_are_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big-eth0.json");
        fs::write(&big, vec![b' '; MAX_RECORD_BYTES as usize + 1]).unwrap();
        assert!(
            matches!(read_record(&big, None), ReadOutcome::Invalid(r) if r.contains("bytes long"))
        );
        let sub = dir.path().join("dir-eth0.json");
        fs::create_dir(&sub).unwrap();
        assert!(
            matches!(read_record(&sub, None), ReadOutcome::Invalid(r) if r.contains("regular"))
        );
    }
}
