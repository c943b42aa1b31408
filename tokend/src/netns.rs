//! Pod network namespaces: their identity (device, inode) and the one operation tokend does
//! inside them, binding the loopback listener. Every `setns` of tokend lives here, on a
//! dedicated thread that exits afterwards; no tokio worker ever changes namespace.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::stat::FileStat;
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};

/// How long a bind in a pod netns may take before tokend gives up on it (a wedged open of a
/// namespace file must not hold the registry forever).
const BIND_TIMEOUT: Duration = Duration::from_secs(5);

/// Identity of a network namespace: `(st_dev, st_ino)` of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    // st_dev/st_ino are u64 on every Linux target tokend supports; the casts only widen.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    fn of(stat: &FileStat) -> Self {
        Self {
            dev: stat.st_dev as u64,
            ino: stat.st_ino as u64,
        }
    }
}

impl fmt::Display for NetnsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device {} inode {}", self.dev, self.ino)
    }
}

/// What can go wrong with a pod's netns; every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("netns {path} does not exist")]
    Gone { path: PathBuf },
    #[error(
        "netns {path} now names another network namespace ({found}; the record says {expected})"
    )]
    Changed {
        path: PathBuf,
        expected: NetnsId,
        found: NetnsId,
    },
    #[error("netns {path} is not a network namespace file")]
    NotNamespace { path: PathBuf },
    #[error("cannot inspect netns {path}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("cannot enter netns {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("cannot listen on 127.0.0.1:{port} in netns {path}: {source}")]
    Bind {
        path: PathBuf,
        port: u16,
        source: io::Error,
    },
    #[error("binding 127.0.0.1:{port} in netns {path} did not finish: {reason}")]
    Worker {
        path: PathBuf,
        port: u16,
        reason: &'static str,
    },
}

impl NetnsError {
    /// Whether the namespace itself is gone or replaced: its records must be dropped, never
    /// retried.
    pub fn is_gone_or_changed(&self) -> bool {
        matches!(
            self,
            Self::Gone { .. } | Self::Changed { .. } | Self::NotNamespace { .. }
        )
    }
}

/// Identity of the namespace `path` names right now.
pub fn netns_id(path: &Path) -> Result<NetnsId, NetnsError> {
    match nix::sys::stat::stat(path) {
        Ok(stat) => Ok(NetnsId::of(&stat)),
        Err(Errno::ENOENT | Errno::ENOTDIR) => Err(NetnsError::Gone {
            path: path.to_owned(),
        }),
        Err(errno) => Err(NetnsError::Inspect {
            path: path.to_owned(),
            source: errno.into(),
        }),
    }
}

/// Checks that `path` still names the namespace `expected`.
pub fn check(path: &Path, expected: NetnsId) -> Result<(), NetnsError> {
    let found = netns_id(path)?;
    if found == expected {
        Ok(())
    } else {
        Err(NetnsError::Changed {
            path: path.to_owned(),
            expected,
            found,
        })
    }
}

/// Binds a non-blocking `127.0.0.1:<port>` listener inside the namespace at `path`, refusing
/// if the opened file is not the namespace `expected`.
pub async fn bind_loopback(
    path: &Path,
    expected: NetnsId,
    port: u16,
) -> Result<TcpListener, NetnsError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_path = path.to_owned();
    let spawned = std::thread::Builder::new()
        .name("podid-netns".into())
        .spawn(move || {
            // The receiver may have timed out; the listener then closes with this thread.
            let _ = tx.send(bind_on_this_thread(&thread_path, expected, port));
        });
    let worker_error = |reason| NetnsError::Worker {
        path: path.to_owned(),
        port,
        reason,
    };
    if spawned.is_err() {
        return Err(worker_error("no thread could be started"));
    }
    match tokio::time::timeout(BIND_TIMEOUT, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(worker_error("the netns thread ended without an answer")),
        Err(_) => Err(worker_error("timed out")),
    }
}

/// Runs on a thread of its own that is never reused: it leaves the thread in the pod netns.
fn bind_on_this_thread(
    path: &Path,
    expected: NetnsId,
    port: u16,
) -> Result<TcpListener, NetnsError> {
    let file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => NetnsError::Gone {
            path: path.to_owned(),
        },
        _ => NetnsError::Inspect {
            path: path.to_owned(),
            source,
        },
    })?;
    let inspect = |errno: Errno| NetnsError::Inspect {
        path: path.to_owned(),
        source: errno.into(),
    };
    // The opened fd, not the path, is what setns enters: check that very fd.
    let found = NetnsId::of(&nix::sys::stat::fstat(&file).map_err(inspect)?);
    if found != expected {
        return Err(NetnsError::Changed {
            path: path.to_owned(),
            expected,
            found,
        });
    }
    if fstatfs(&file).map_err(inspect)?.filesystem_type() != NSFS_MAGIC {
        return Err(NetnsError::NotNamespace {
            path: path.to_owned(),
        });
    }
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Enter {
        path: path.to_owned(),
        source: errno.into(),
    })?;
    let bind_error = |source| NetnsError::Bind {
        path: path.to_owned(),
        port,
        source,
    };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_path_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let err = netns_id(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, NetnsError::Gone { .. }), "{err}");
        assert!(err.is_gone_or_changed());
    }

    #[test]
    fn check_reports_both_identities() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ns");
        std::fs::write(&file, b"").unwrap();
        let real = netns_id(&file).unwrap();
        assert!(check(&file, real).is_ok());
        let other = NetnsId {
            dev: real.dev,
            ino: real.ino + 1,
        };
        let err = check(&file, other).unwrap_err();
        assert!(err.is_gone_or_changed());
        let text = err.to_string();
        assert!(
            text.contains("now names another network namespace"),
            "{text}"
        );
        assert!(text.contains(&real.ino.to_string()), "{text}");
    }

    #[tokio::test]
    async fn refuses_a_file_that_is_not_a_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ns");
        std::fs::write(&file, b"").unwrap();
        let id = netns_id(&file).unwrap();
        let err = bind_loopback(&file, id, 2579).await.unwrap_err();
        assert!(matches!(err, NetnsError::NotNamespace { .. }), "{err}");
        let wrong = NetnsId {
            dev: id.dev,
            ino: id.ino + 1,
        };
        let err = bind_loopback(&file, wrong, 2579).await.unwrap_err();
        assert!(matches!(err, NetnsError::Changed { .. }), "{err}");
        let err = bind_loopback(&dir.path().join("gone"), id, 2579)
            .await
            .unwrap_err();
        assert!(matches!(err, NetnsError::Gone { .. }), "{err}");
    }
}
