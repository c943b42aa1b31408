//! inotify on the conf dir and the bin dir: a reader thread turns events that may matter (a
//! config file or the plugin binary created, finished, renamed in or out, deleted) into wake-ups
//! of the file keeper. Our own temp files are ignored. The keeper also rescans on a timer, for
//! lost events (queue overflow) and for symlinked configs whose targets live elsewhere.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use inotify::{EventMask, Inotify, WatchMask, Watches};
use podid_api::fsutil::is_temp_file;
use tracing::warn;

use crate::conflist::{Kind, PLUGIN_TYPE};

/// A file appearing (create, rename in), finished (close after write), going (delete, rename
/// out) or changing mode (a chmod of the binary); the directory itself going.
const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::DELETE)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF);
/// Room for a few hundred events per read.
const EVENT_BUFFER: usize = 16 * 1024;

/// Why the keeper wakes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Something in a watched dir changed.
    Changed,
    /// Events were lost or a watch went away: rescan, and re-arm the watches.
    Rescan,
    /// Stop (SIGTERM).
    Stop,
}

/// The watches on the dirs, kept to re-arm them after a dir was replaced.
#[derive(Debug)]
pub struct DirWatch {
    watches: Watches,
    dirs: Vec<PathBuf>,
}

impl DirWatch {
    /// Watches `dirs` and starts the reader thread, which sends to `wake`.
    pub fn start(dirs: &[&Path], wake: Sender<Wake>) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        let mut dirs: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
        dirs.dedup();
        let mut watch = Self {
            watches: inotify.watches(),
            dirs,
        };
        watch.arm()?;
        std::thread::Builder::new()
            .name("podid-install-inotify".into())
            .spawn(move || read_events(inotify, &wake))?;
        Ok(watch)
    }

    /// Adds the watches that are missing (adding an existing one is a no-op).
    pub fn arm(&mut self) -> io::Result<()> {
        for dir in &self.dirs {
            self.watches.add(dir, MASK)?;
        }
        Ok(())
    }
}

/// Whether an event about `name` may change what the keeper does.
pub fn matters(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    !is_temp_file(&name) && (name == PLUGIN_TYPE || Kind::of(&name).is_some())
}

fn read_events(mut inotify: Inotify, wake: &Sender<Wake>) {
    let mut buffer = vec![0; EVENT_BUFFER];
    loop {
        let events = match inotify.read_events_blocking(&mut buffer) {
            Ok(events) => events,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(error = %e, "inotify read failed; relying on the periodic rescan");
                let _ = wake.send(Wake::Rescan);
                return;
            }
        };
        let mut send = None;
        for event in events {
            let lost = event.mask.intersects(
                EventMask::Q_OVERFLOW
                    | EventMask::IGNORED
                    | EventMask::DELETE_SELF
                    | EventMask::MOVE_SELF,
            );
            if lost {
                send = Some(Wake::Rescan);
            } else if event.name.is_some_and(matters) && send.is_none() {
                send = Some(Wake::Changed);
            }
        }
        if let Some(w) = send
            && wake.send(w).is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn what_matters() {
        for name in ["10-azure.conflist", "87-podman.conf", "x.json", "podid"] {
            assert!(matters(OsStr::new(name)), "{name}");
        }
        for name in [
            ".podid-tmp-1-2-3",
            "10-azure.conflist.old",
            "bridge",
            "podid.old",
        ] {
            assert!(!matters(OsStr::new(name)), "{name}");
        }
    }

    #[test]
    fn wakes_on_renames_and_writes_not_on_temps() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel();
        let _watch = DirWatch::start(&[dir.path(), dir.path()], tx).unwrap();
        std::fs::write(dir.path().join(".podid-tmp-1"), b"x").unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        std::fs::rename(
            dir.path().join(".podid-tmp-1"),
            dir.path().join("10-a.conflist"),
        )
        .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Wake::Changed
        );
        std::fs::write(dir.path().join("podid"), b"x").unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Wake::Changed
        );
    }
}
