//! The one place the plugin enters a pod's network namespace.
//!
//! `setns` changes only the calling thread, and a socket belongs to the netns it was created
//! in, so the work runs on a dedicated thread that enters the pod netns, creates its netlink
//! sockets there, and exits. The caller waits for it with a deadline: a wedged kernel call
//! cannot hang the plugin, whose process exit then ends that thread.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, PROC_SUPER_MAGIC, fstatfs};

/// How long work inside a pod netns may take; the kernel answers in milliseconds.
pub const WORK_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path} cannot be opened: {cause}")]
    Open { path: String, cause: io::Error },
    #[error("{path} is not a network namespace")]
    NotNetns { path: String },
    #[error("entering network namespace {path} failed: {cause}")]
    Enter { path: String, cause: nix::Error },
    #[error("the worker thread for network namespace {path} failed: {cause}")]
    Worker { path: String, cause: String },
    #[error("work in network namespace {path} did not finish within {} ms", .deadline.as_millis())]
    Deadline { path: String, deadline: Duration },
}

impl NetnsError {
    /// Whether the namespace no longer exists (DEL after the runtime removed it).
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::Open { cause, .. } if cause.kind() == io::ErrorKind::NotFound)
    }

    pub fn details(&self) -> String {
        match self {
            Self::Open { .. } | Self::NotNetns { .. } => {
                "CNI_NETNS must name the pod's network namespace, e.g. /var/run/netns/cni-<id>"
                    .to_owned()
            }
            Self::Enter { .. } => "podid needs CAP_SYS_ADMIN to enter the pod netns".to_owned(),
            Self::Worker { .. } => "see the plugin log".to_owned(),
            Self::Deadline { .. } => "the kernel did not answer; the runtime will retry".to_owned(),
        }
    }
}

/// `(st_dev, st_ino)` of the netns file: what tokend checks before it trusts the path again.
pub fn identity(path: &str) -> Result<(u64, u64), NetnsError> {
    std::fs::metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|cause| NetnsError::Open {
            path: path.to_owned(),
            cause,
        })
}

/// Runs `work` on a fresh thread inside the network namespace at `path`.
pub fn run_in<T, F>(path: &str, deadline: Duration, work: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = File::open(path).map_err(|cause| NetnsError::Open {
        path: path.to_owned(),
        cause,
    })?;
    let fs_type = fstatfs(&ns)
        .map_err(|cause| NetnsError::Open {
            path: path.to_owned(),
            cause: cause.into(),
        })?
        .filesystem_type();
    if fs_type != NSFS_MAGIC && fs_type != PROC_SUPER_MAGIC {
        return Err(NetnsError::NotNetns {
            path: path.to_owned(),
        });
    }
    let (tx, rx) = mpsc::channel();
    let owned_path = path.to_owned();
    thread::Builder::new()
        .name("podid-netns".to_owned())
        .spawn(move || {
            let result = setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|cause| NetnsError::Enter {
                    path: owned_path,
                    cause,
                })
                .map(|()| work());
            // The caller may have given up waiting; the result then has no reader.
            let _ = tx.send(result);
        })
        .map_err(|cause| NetnsError::Worker {
            path: path.to_owned(),
            cause: cause.to_string(),
        })?;
    match rx.recv_timeout(deadline) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(NetnsError::Deadline {
            path: path.to_owned(),
            deadline,
        }),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(NetnsError::Worker {
            path: path.to_owned(),
            cause: "it panicked".to_owned(),
        }),
    }
}
