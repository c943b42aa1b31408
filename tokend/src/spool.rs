//! Watching the plugin's spool (`<state>/pending`): inotify for promptness, a periodic rescan
//! as the safety net (lost events, queue overflow, a recreated directory). The inotify
//! descriptor is read by a blocking thread of its own that feeds a channel.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchMask, Watches};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::node::Node;

/// Events that mean "a record may have appeared": an atomic rename, a finished write, a link.
const WATCH_MASK: WatchMask = WatchMask::MOVED_TO
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::CREATE);
/// Room for a few hundred events per read.
const EVENT_BUFFER: usize = 16 * 1024;
/// Batches the reader thread may queue before it waits for the spool task.
const CHANNEL_DEPTH: usize = 64;

/// What one read of the inotify descriptor asks for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Batch {
    /// File names that may be new records.
    names: Vec<String>,
    /// Events were lost: scan the whole directory.
    rescan: bool,
    /// The watch is gone (directory removed): set it up again.
    lost: bool,
}

/// An inotify watch on the spool directory.
#[derive(Debug)]
pub struct SpoolWatch {
    dir: PathBuf,
    watches: Watches,
    events: mpsc::Receiver<io::Result<Batch>>,
    active: bool,
}

impl SpoolWatch {
    /// Starts watching `dir`; set up before the first scan so no record slips between the two.
    pub fn new(dir: &Path) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        let mut watches = inotify.watches();
        watches.add(dir, WATCH_MASK)?;
        let (tx, events) = mpsc::channel(CHANNEL_DEPTH);
        std::thread::Builder::new()
            .name("podid-spool".into())
            .spawn(move || read_events(inotify, &tx))?;
        Ok(Self {
            dir: dir.to_owned(),
            watches,
            events,
            active: true,
        })
    }

    async fn next(&mut self) -> io::Result<Batch> {
        self.events
            .recv()
            .await
            .unwrap_or_else(|| Err(io::Error::other("the spool reader thread stopped")))
    }

    /// Watches the directory again after it was removed and recreated.
    fn rewatch(&mut self) -> io::Result<()> {
        self.watches.add(&self.dir, WATCH_MASK)?;
        self.active = true;
        Ok(())
    }
}

/// The reader thread: blocks on the descriptor until the spool task goes away.
fn read_events(mut inotify: Inotify, tx: &mpsc::Sender<io::Result<Batch>>) {
    let mut buffer = vec![0; EVENT_BUFFER];
    loop {
        let batch = match inotify.read_events_blocking(&mut buffer) {
            Ok(events) => {
                let mut batch = Batch::default();
                for event in events {
                    batch.rescan |= event.mask.contains(EventMask::Q_OVERFLOW);
                    batch.lost |= event.mask.contains(EventMask::IGNORED);
                    if let Some(name) = event.name.and_then(|n| n.to_str()) {
                        batch.names.push(name.to_owned());
                    }
                }
                Ok(batch)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
        let failed = batch.is_err();
        if tx.blocking_send(batch).is_err() || failed {
            return;
        }
    }
}

/// Adopts spooled records as they appear, until `shutdown`.
pub async fn run(
    node: Arc<Node>,
    mut watch: Option<SpoolWatch>,
    rescan_interval: Duration,
    shutdown: CancellationToken,
) {
    let mut rescan = tokio::time::interval(rescan_interval);
    rescan.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick fires at once; restore has just scanned.
    rescan.tick().await;
    loop {
        let event = async {
            match watch.as_mut().filter(|w| w.active) {
                Some(watch) => watch.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = rescan.tick() => {
                if let Some(watch) = watch.as_mut().filter(|w| !w.active) {
                    restore_watch(&node, watch);
                }
                scan(&node).await;
            }
            batch = event => match batch {
                Ok(batch) => {
                    if batch.lost && let Some(watch) = watch.as_mut() {
                        warn!(dir = %node.state_dir().pending_dir().display(), "spool watch lost; rescanning until it is back");
                        watch.active = false;
                    }
                    if batch.rescan {
                        scan(&node).await;
                    }
                    for name in &batch.names {
                        debug!(file = %name, "spool event");
                        node.adopt_pending(name).await;
                    }
                }
                Err(e) => {
                    error!(error = %e, "cannot read spool events; relying on the periodic rescan");
                    watch = None;
                }
            },
        }
    }
}

async fn scan(node: &Node) {
    if let Err(e) = node.rescan_pending().await {
        error!(error = %e, "cannot scan the spool");
    }
}

fn restore_watch(node: &Node, watch: &mut SpoolWatch) {
    let result = node
        .state_dir()
        .ensure_pending_dir()
        .map_err(io::Error::other)
        .and_then(|()| watch.rewatch());
    match result {
        Ok(()) => debug!(dir = %watch.dir.display(), "spool watch restored"),
        Err(e) => warn!(dir = %watch.dir.display(), error = %e, "cannot watch the spool yet"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_renames_and_finished_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = SpoolWatch::new(dir.path()).unwrap();
        podid_api::fsutil::write_atomic(
            &dir.path().join("a-eth0.json"),
            b"{}",
            0o600,
            podid_api::fsutil::Durability::ProcessCrash,
        )
        .unwrap();
        let mut names = Vec::new();
        while !names.iter().any(|n| n == "a-eth0.json") {
            let batch = tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .expect("an event within 5 s")
                .unwrap();
            assert!(!batch.rescan && !batch.lost);
            names.extend(batch.names);
        }
        // The temp file shows up too; the node ignores it by name.
        assert!(
            names.iter().any(|n| podid_api::fsutil::is_temp_file(n)),
            "{names:?}"
        );
    }

    #[tokio::test]
    async fn reports_a_removed_directory() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("pending");
        std::fs::create_dir(&dir).unwrap();
        let mut watch = SpoolWatch::new(&dir).unwrap();
        std::fs::remove_dir(&dir).unwrap();
        let batch = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("an event within 5 s")
            .unwrap();
        assert!(batch.lost);
        std::fs::create_dir(&dir).unwrap();
        watch.rewatch().unwrap();
        std::fs::write(dir.join("b-eth0.json"), b"{}").unwrap();
        let batch = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("an event within 5 s")
            .unwrap();
        assert!(batch.names.iter().any(|n| n == "b-eth0.json"));
    }
}
