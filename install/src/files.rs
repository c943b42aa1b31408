//! The installer's file writes: the atomic replace that keeps mode, owner and group (AKS writes
//! its conflist 600), only when the file is still the one that was read; reading a file with a
//! stable fingerprint; removing temp files a crash left behind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
use podid_api::fsutil::{TEMP_PREFIX, is_temp_file};

/// Largest config file read (containerd refuses larger ones too).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// What identifies one version of a file: replaced (inode), rewritten (size, mtime) or touched
/// in its metadata (ctime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Fingerprint {
    pub fn of(meta: &fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The same file with the same contents: inode, size and mtime (a rename of the file
    /// changes its ctime, not its contents).
    pub fn same_version(&self, other: &Self) -> bool {
        (self.dev, self.ino, self.len, self.mtime_ns)
            == (other.dev, other.ino, other.len, other.mtime_ns)
    }

    /// The fingerprint of what `path` names now (following symlinks), `None` when nothing.
    pub fn current(path: &Path) -> io::Result<Option<Self>> {
        match fs::metadata(path) {
            Ok(meta) => Ok(Some(Self::of(&meta))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Who owns a file and how it may be read: what a replacement must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Ownership {
    pub fn of(meta: &fs::Metadata) -> Self {
        Self {
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }
}

/// A file read in one piece: the same fingerprint before and after the read.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub bytes: Vec<u8>,
    pub fingerprint: Fingerprint,
    pub ownership: Ownership,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    /// Written to while being read: look again.
    #[error("{path}: changed while being read")]
    Changing { path: PathBuf },
}

/// Reads `path` (a regular file after following symlinks), checking nobody wrote it meanwhile.
pub fn read_snapshot(path: &Path) -> Result<Snapshot, ReadError> {
    let io = |source| ReadError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let before = file.metadata().map_err(io)?;
    if !before.is_file() {
        return Err(ReadError::NotAFile {
            path: path.to_owned(),
        });
    }
    if before.len() > MAX_CONFIG_BYTES {
        return Err(ReadError::TooLarge {
            path: path.to_owned(),
        });
    }
    let mut bytes = Vec::with_capacity(before.len() as usize);
    Read::by_ref(&mut file)
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let after = file.metadata().map_err(io)?;
    let fingerprint = Fingerprint::of(&after);
    if Fingerprint::of(&before) != fingerprint || bytes.len() as u64 != after.len() {
        return Err(ReadError::Changing {
            path: path.to_owned(),
        });
    }
    Ok(Snapshot {
        bytes,
        fingerprint,
        ownership: Ownership::of(&after),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Someone replaced or rewrote the file after it was read: nothing was written.
    #[error("{path} changed after it was read; not written")]
    Conflict { path: PathBuf },
}

/// A fresh temp name in `dir`: hidden, with no `.conf`/`.conflist`/`.json` extension and not
/// named like a plugin, so neither a runtime nor libcni's plugin lookup can take it.
pub fn temp_path(dir: &Path) -> PathBuf {
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

/// Replaces `path` with `contents` atomically and durably (temp file in the same dir, fsync,
/// rename, fsync of the dir), with exactly `ownership`. `expected` says what `path` must be for
/// the write to land; otherwise nothing is written and the answer is [`WriteError::Conflict`].
pub fn replace(
    path: &Path,
    contents: &[u8],
    ownership: Ownership,
    expected: Expect,
) -> Result<(), WriteError> {
    let dir = parent(path);
    let tmp = temp_path(dir);
    let io = |source| WriteError::Io {
        path: path.to_owned(),
        source,
    };
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(contents).map_err(io)?;
        // chown before chmod: chown clears set-id bits the mode may ask for
        nix::unistd::fchown(
            &file,
            Some(ownership.uid.into()),
            Some(ownership.gid.into()),
        )
        .map_err(|e| io(e.into()))?;
        file.set_permissions(fs::Permissions::from_mode(ownership.mode))
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        let conflict = || WriteError::Conflict {
            path: path.to_owned(),
        };
        match expected {
            Expect::Fingerprint(want) => {
                if Fingerprint::current(path).map_err(io)? != Some(want) {
                    return Err(conflict());
                }
                exchange_if_unchanged(&tmp, path, want, ownership)?;
            }
            Expect::Absent => {
                match renameat2(
                    AT_FDCWD,
                    &tmp,
                    AT_FDCWD,
                    path,
                    RenameFlags::RENAME_NOREPLACE,
                ) {
                    Ok(()) => {}
                    Err(Errno::EEXIST) => return Err(conflict()),
                    // a filesystem without RENAME_NOREPLACE: check, then rename
                    Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
                        if fs::symlink_metadata(path).is_ok() {
                            return Err(conflict());
                        }
                        fs::rename(&tmp, path).map_err(io)?;
                    }
                    Err(e) => return Err(io(e.into())),
                }
            }
            Expect::Any => fs::rename(&tmp, path).map_err(io)?,
        }
        sync_dir(dir).map_err(io)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Puts `tmp` in place of `path` only if `path` still is the version that was read, with no
/// window between the check and the swap: `RENAME_EXCHANGE` swaps the two names, then the file
/// swapped out is checked; a file that is not the one read (dropgz renamed it aside and began
/// writing a new one in pieces) is swapped back, so a writer's half-written file is never
/// replaced. On success `tmp` is gone; on a conflict it holds ours and the caller removes it.
fn exchange_if_unchanged(
    tmp: &Path,
    path: &Path,
    want: Fingerprint,
    ownership: Ownership,
) -> Result<(), WriteError> {
    let io = |source: io::Error| WriteError::Io {
        path: path.to_owned(),
        source,
    };
    let conflict = || WriteError::Conflict {
        path: path.to_owned(),
    };
    match renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => {}
        // renamed away since the check: whatever comes next is someone else's
        Err(Errno::ENOENT) => return Err(conflict()),
        // a filesystem without RENAME_EXCHANGE: the check above is all there is
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            return fs::rename(tmp, path).map_err(io);
        }
        Err(e) => return Err(io(e.into())),
    }
    let displaced = fs::symlink_metadata(tmp).map_err(io)?;
    if Fingerprint::of(&displaced).same_version(&want) && Ownership::of(&displaced) == ownership {
        fs::remove_file(tmp).map_err(io)?;
        return Ok(());
    }
    // Not the version read: theirs goes back, ours is left at `tmp` for the caller to remove.
    match renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => {}
        // `path` (ours) was renamed away in between: theirs back under the name, unless a
        // newer file took it, which then stays
        Err(Errno::ENOENT) => {
            match renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RenameFlags::RENAME_NOREPLACE) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(io(e.into())),
            }
        }
        Err(e) => return Err(io(e.into())),
    }
    Err(conflict())
}

/// What the target of [`replace`] must be just before the rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Exactly the version that was read.
    Fingerprint(Fingerprint),
    /// Nothing: a file we create.
    Absent,
    /// Whatever is there (a file of ours).
    Any,
}

/// Removes `path` if it still is the version that was read; `Ok(false)` when it changed.
pub fn remove_if_unchanged(path: &Path, expected: Fingerprint) -> Result<bool, WriteError> {
    let io = |source| WriteError::Io {
        path: path.to_owned(),
        source,
    };
    if Fingerprint::current(path).map_err(io)? != Some(expected) {
        return Ok(false);
    }
    fs::remove_file(path).map_err(io)?;
    sync_dir(parent(path)).map_err(io)?;
    Ok(true)
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Removes temp files (ours, by name) left in `dir` by a process that died mid-write.
pub fn remove_stale_temps(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if is_temp_file(&entry.file_name().to_string_lossy()) && entry.file_type()?.is_file() {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed.push(entry.path()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replace_keeps_the_mode_and_checks_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-azure.conflist");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let read = read_snapshot(&path).unwrap();
        assert_eq!(read.ownership.mode, 0o600);
        replace(
            &path,
            b"new",
            read.ownership,
            Expect::Fingerprint(read.fingerprint),
        )
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600);
        // The fingerprint read before is stale now: a second replace based on it must not land.
        let err = replace(
            &path,
            b"stale",
            read.ownership,
            Expect::Fingerprint(read.fingerprint),
        )
        .unwrap_err();
        assert!(matches!(err, WriteError::Conflict { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert!(matches!(
            replace(&path, b"x", read.ownership, Expect::Absent),
            Err(WriteError::Conflict { .. })
        ));
        assert_eq!(names(dir.path()), ["10-azure.conflist"]);
    }

    #[test]
    fn a_file_replaced_after_the_check_is_swapped_back_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-azure.conflist");
        fs::write(&path, b"{\"old\": true}").unwrap();
        let read = read_snapshot(&path).unwrap();
        // dropgz between our check and our rename: the old file aside, a new one half-written.
        fs::rename(&path, dir.path().join("10-azure.conflist.old")).unwrap();
        fs::write(&path, b"{\"new\": ").unwrap();
        let tmp = temp_path(dir.path());
        fs::write(&tmp, b"ours").unwrap();
        let err = exchange_if_unchanged(&tmp, &path, read.fingerprint, read.ownership).unwrap_err();
        assert!(matches!(err, WriteError::Conflict { .. }), "{err}");
        assert_eq!(
            fs::read(&path).unwrap(),
            b"{\"new\": ",
            "the writer's file is back"
        );
        assert_eq!(
            fs::read(&tmp).unwrap(),
            b"ours",
            "ours is left for the caller to remove"
        );
        // The same bytes but chmodded since the read: not the version read either.
        fs::write(&path, b"{\"old\": true}").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let read = read_snapshot(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            exchange_if_unchanged(&tmp, &path, read.fingerprint, read.ownership),
            Err(WriteError::Conflict { .. })
        ));
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        // The version read: swapped in, and the displaced file gone.
        let read = read_snapshot(&path).unwrap();
        exchange_if_unchanged(&tmp, &path, read.fingerprint, read.ownership).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"ours");
        assert!(!tmp.exists());
        // The target renamed away meanwhile: nothing is written under its name.
        let read = read_snapshot(&path).unwrap();
        fs::rename(&path, dir.path().join("aside")).unwrap();
        fs::write(&tmp, b"again").unwrap();
        assert!(matches!(
            exchange_if_unchanged(&tmp, &path, read.fingerprint, read.ownership),
            Err(WriteError::Conflict { .. })
        ));
        assert!(!path.exists());
    }

    #[test]
    fn owner_and_group_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.conflist");
        fs::write(&path, b"old").unwrap();
        let ownership = Ownership {
            mode: 0o640,
            uid: 4242,
            gid: 4343,
        };
        // Needs root (CI and the test machines run as root); elsewhere chown fails loudly.
        if nix::unistd::geteuid().is_root() {
            replace(&path, b"new", ownership, Expect::Any).unwrap();
            assert_eq!(Ownership::of(&fs::metadata(&path).unwrap()), ownership);
        }
    }

    #[test]
    fn stale_temps_go_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(temp_path(dir.path()), b"half").unwrap();
        fs::write(dir.path().join("10-azure.conflist"), b"{}").unwrap();
        fs::write(dir.path().join(".hidden"), b"x").unwrap();
        assert_eq!(remove_stale_temps(dir.path()).unwrap().len(), 1);
        assert_eq!(names(dir.path()), [".hidden", "10-azure.conflist"]);
        assert!(
            remove_stale_temps(&dir.path().join("missing"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn removal_only_of_the_version_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.conf");
        fs::write(&path, b"one").unwrap();
        let read = read_snapshot(&path).unwrap();
        fs::write(&path, b"two!").unwrap();
        assert!(!remove_if_unchanged(&path, read.fingerprint).unwrap());
        let read = read_snapshot(&path).unwrap();
        assert!(remove_if_unchanged(&path, read.fingerprint).unwrap());
        assert!(!path.exists());
    }
}
