//! The atomic file write every part uses for files another process reads: write a temp file
//! in the same directory, then rename it over the target, so a reader sees the old bytes or the
//! new ones, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of every temp file: a leading dot and no `.json`/`.conf` suffix, so no watcher or
/// CNI runtime mistakes it for a record or a network config.
pub const TEMP_PREFIX: &str = ".podid-tmp-";

/// Whether the write must survive a power loss, or only a crash of the writing process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file and its directory (config files that outlive a reboot).
    Durable,
    /// Rename only: enough for state that dies with the node anyway, such as pod records
    /// whose network namespaces do not survive a reboot.
    ProcessCrash,
}

/// Writes `contents` to `path` atomically with permission `mode`.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    durability: Durability,
) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = temp_path(dir);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        // The umask may have narrowed `mode`; the caller asked for exactly this mode.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        if durability == Durability::Durable {
            file.sync_all()?;
        }
        drop(file);
        fs::rename(&tmp, path)?;
        if durability == Durability::Durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Whether a directory entry is one of our temp files (left behind by a crash mid-write).
pub fn is_temp_file(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

fn temp_path(dir: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    dir.join(format!(
        "{TEMP_PREFIX}{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one", 0o600, Durability::ProcessCrash).unwrap();
        write_atomic(&path, b"two", 0o644, Durability::Durable).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["a.json"]);
    }

    #[test]
    fn failure_leaves_target_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("sub");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), b"x").unwrap();
        // Renaming a file over a non-empty directory fails.
        assert!(write_atomic(&target, b"new", 0o600, Durability::Durable).is_err());
        assert!(target.is_dir());
        let temps = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| is_temp_file(&e.as_ref().unwrap().file_name().to_string_lossy()))
            .count();
        assert_eq!(temps, 0);
    }
}
