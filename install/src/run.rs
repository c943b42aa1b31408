//! The installer at work: a file keeper (plugin binary and primary conflist, woken by inotify
//! and a timer), a guard keeper (the nf_tables table, woken by nftables notifications and a
//! timer), the taint task, and the health listener. Each keeper is a plain thread running the
//! pure core's decisions through its I/O module; the async runtime only serves HTTP and the API.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use prometheus_client::registry::Registry;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::binary::Plugin;
use crate::confdir::{ConfDir, ConfError, Outcome, Records, Removal};
use crate::config::{Settings, TaintSettings};
use crate::conflist::Entry;
use crate::files;
use crate::guard::{self, GuardAction, GuardWake};
use crate::health::{self, HealthState};
use crate::metrics::{Metrics, Stage};
use crate::readiness::{Check, Component, Readiness};
use crate::taint::{self, Untainted};
use crate::tokend;
use crate::watch::{DirWatch, Wake};

/// First retry after a truncated or raced config; doubles up to [`SOON_MAX`].
const SOON_MIN: Duration = Duration::from_millis(10);
const SOON_MAX: Duration = Duration::from_millis(500);
/// First retry after an error; doubles up to [`ERROR_MAX`].
const ERROR_MIN: Duration = Duration::from_secs(1);
const ERROR_MAX: Duration = Duration::from_secs(30);
/// How often tokend is asked whether it is ready, and how long it may take to answer.
const TOKEND_POLL: Duration = Duration::from_secs(1);
const TOKEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long SIGTERM waits for the file keeper to finish the pass it is in.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long `--uninstall` waits for a truncated config to be written completely.
const UNINSTALL_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Health(#[from] health::BindError),
    #[error("watching {dirs}: {source}")]
    Watch {
        dirs: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the {what} thread: {source}")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A retry delay that doubles from `min` to `max`.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Readiness and the `ready` gauge, written by every keeper.
#[derive(Debug, Clone)]
struct Publisher {
    readiness: Arc<watch::Sender<Readiness>>,
    metrics: Metrics,
}

impl Publisher {
    fn set(&self, component: Component, check: Check) {
        let changed = self.readiness.send_if_modified(|r| {
            let slot = r.slot(component);
            let changed = *slot != check;
            *slot = check;
            changed
        });
        if changed {
            let ready = self.readiness.borrow().ready();
            self.metrics.ready.set(i64::from(ready));
            debug!(readiness = %self.readiness.borrow().to_string().replace('\n', "; "), "readiness changed");
        }
    }
}

/// How soon the file keeper looks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// All done: on the next event or the timer.
    Idle,
    /// A config is being written or changed under us: very soon.
    Soon,
    /// Something failed: later, backing off.
    Error,
}

/// The plugin binary and the primary conflist.
#[derive(Debug)]
struct FileKeeper {
    plugin: Plugin,
    conf: ConfDir,
    entry: Entry,
    publisher: Publisher,
    /// The last state logged, so a wait is logged once, not every pass.
    last: String,
}

impl FileKeeper {
    fn pass(&mut self) -> Pace {
        let metrics = &self.publisher.metrics;
        let installed = match self.plugin.ensure() {
            Ok(installed) => installed,
            Err(e) => {
                metrics.error(Stage::Binary);
                self.note(
                    format!("binary: {e}"),
                    || error!(error = %e, "installing the plugin binary failed"),
                );
                self.publisher
                    .set(Component::Binary, Check::Pending(e.to_string()));
                self.publisher.set(
                    Component::Chained,
                    Check::Pending("waiting for the plugin binary".to_owned()),
                );
                return Pace::Error;
            }
        };
        if installed.wrote {
            metrics.binary_installs.inc();
            info!(path = %self.plugin.target().display(), supported = ?installed.supported, "installed the plugin binary");
        }
        self.publisher.set(Component::Binary, Check::Done);
        let outcome = self.conf.reconcile(&self.entry, &installed.supported);
        let dir = self.conf.dir().display().to_string();
        match outcome {
            Ok(Outcome::Chained {
                file,
                wrote,
                converted_from,
            }) => {
                if let Some(original) = &converted_from {
                    metrics.conversions.inc();
                    info!(%original, list = %file, "converted a lone config into a list with podid last; the original is kept for --uninstall");
                }
                if wrote {
                    metrics.rechains.inc();
                    info!(file = %file, "chained podid into the primary network config");
                }
                self.note(
                    format!("chained: {file}"),
                    || info!(file = %file, "the primary network config ends with podid"),
                );
                self.publisher.set(Component::Chained, Check::Done);
                Pace::Idle
            }
            Ok(Outcome::NoPrimary) => {
                self.note("no primary".to_owned(), || {
                    info!(dir = %dir, "waiting for the primary CNI plugin to write its network config; podid never writes one of its own")
                });
                self.publisher.set(
                    Component::Chained,
                    Check::Pending(format!("no network config in {dir} yet")),
                );
                Pace::Idle
            }
            Ok(Outcome::Pending { file }) => {
                metrics.retries.inc();
                debug!(file = %file, "the first network config is truncated; waiting for its writer");
                self.publisher.set(
                    Component::Chained,
                    Check::Pending(format!("{file} is being written")),
                );
                Pace::Soon
            }
            Ok(Outcome::Raced { file }) => {
                metrics.retries.inc();
                debug!(file = %file, "the network config changed under our write; nothing written, looking again");
                self.publisher.set(
                    Component::Chained,
                    Check::Pending(format!("{file} changed during the edit")),
                );
                Pace::Soon
            }
            Err(e) => {
                metrics.error(Stage::Conflist);
                self.note(
                    format!("conflist: {e}"),
                    || error!(error = %e, "chaining podid failed"),
                );
                self.publisher
                    .set(Component::Chained, Check::Pending(e.to_string()));
                Pace::Error
            }
        }
    }

    /// Runs `log` when the state differs from the last one noted.
    fn note(&mut self, state: String, log: impl FnOnce()) {
        if self.last != state {
            log();
            self.last = state;
        }
    }

    fn run(mut self, mut watch: DirWatch, wake: &Receiver<Wake>, rescan: Duration) {
        let mut soon = Backoff::new(SOON_MIN, SOON_MAX);
        let mut failing = Backoff::new(ERROR_MIN, ERROR_MAX);
        loop {
            let wait = match self.pass() {
                Pace::Idle => {
                    soon.reset();
                    failing.reset();
                    rescan
                }
                Pace::Soon => soon.next(),
                Pace::Error => failing.next(),
            };
            let mut rearm = false;
            match wake.recv_timeout(wait) {
                Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Wake::Rescan) | Err(RecvTimeoutError::Timeout) => rearm = true,
                Ok(Wake::Changed) => {}
            }
            // One pass for a burst of events.
            while let Ok(next) = wake.try_recv() {
                match next {
                    Wake::Stop => return,
                    Wake::Rescan => rearm = true,
                    Wake::Changed => {}
                }
            }
            if rearm && let Err(e) = watch.arm() {
                warn!(error = %e, "re-arming the inotify watches failed; relying on the periodic rescan");
            }
        }
    }
}

/// The guard, checked on every nftables change and on its timer.
fn keep_guard(publisher: &Publisher, wake: &Receiver<GuardWake>, interval: Duration) {
    let mut failing = Backoff::new(ERROR_MIN, ERROR_MAX);
    let mut installed_once = false;
    loop {
        let wait = match guard::reconcile() {
            Ok(action) => {
                if let GuardAction::Installed { why } = action {
                    publisher.metrics.guard_repairs.inc();
                    if installed_once {
                        warn!(%why, "the host guard was missing or changed; put it back");
                    } else {
                        info!(%why, table = "ip podid-guard", "installed the host guard: forwarded traffic to 169.254.169.254 is dropped; it stays when podid-install exits");
                    }
                } else if !installed_once {
                    info!(
                        table = "ip podid-guard",
                        "the host guard is in place; it stays when podid-install exits"
                    );
                }
                installed_once = true;
                failing.reset();
                publisher.set(Component::Guard, Check::Done);
                interval
            }
            Err(e) => {
                publisher.metrics.error(Stage::Guard);
                error!(error = %e, "installing the host guard failed");
                publisher.set(Component::Guard, Check::Pending(e.to_string()));
                failing.next().min(interval)
            }
        };
        if guard::next_wake(wake, wait) == GuardWake::Stop {
            return;
        }
    }
}

/// Waits for the node to be protected and tokend ready, then removes the taint.
async fn handle_taint(
    taint: TaintSettings,
    client: kube::Client,
    publisher: Publisher,
    shutdown: CancellationToken,
) {
    let nodes: kube::Api<Node> = kube::Api::all(client);
    let mut readiness = publisher.readiness.subscribe();
    let mut failing = Backoff::new(ERROR_MIN, ERROR_MAX);
    let mut last_tokend = String::new();
    publisher.set(
        Component::Taint,
        Check::Pending("waiting for the plugin, the chain and the guard".to_owned()),
    );
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            protected = readiness.wait_for(Readiness::protected) => if protected.is_err() { return },
        }
        let delay = match tokend::is_ready(&taint.tokend_socket, TOKEND_TIMEOUT).await {
            Ok(false) => {
                publisher.set(
                    Component::Taint,
                    Check::Pending("waiting for tokend to report ready".to_owned()),
                );
                TOKEND_POLL
            }
            Err(e) => {
                publisher.metrics.error(Stage::Tokend);
                if last_tokend != e.to_string() {
                    warn!(error = %e, "tokend is not answering yet");
                    last_tokend = e.to_string();
                }
                publisher.set(Component::Taint, Check::Pending(format!("tokend: {e}")));
                TOKEND_POLL
            }
            Ok(true) => match taint::remove(&nodes, &taint.node_name).await {
                Ok(untainted) => {
                    match untainted {
                        Untainted::Removed => {
                            info!(node = %taint.node_name, taint = %format!("{}:{}", taint::TAINT_KEY, taint::TAINT_EFFECT), "removed the node's startup taint: the node takes pods now")
                        }
                        Untainted::Absent => {
                            info!(node = %taint.node_name, taint = %format!("{}:{}", taint::TAINT_KEY, taint::TAINT_EFFECT), "the node does not carry the startup taint")
                        }
                    }
                    publisher.set(Component::Taint, Check::Done);
                    return;
                }
                Err(e) => {
                    publisher.metrics.error(Stage::Taint);
                    error!(error = %e, "removing the node taint failed");
                    publisher.set(Component::Taint, Check::Pending(e.to_string()));
                    failing.next()
                }
            },
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Runs until `shutdown`, then returns leaving the binary, the conflist entry and the guard in
/// place. `client` is needed when the settings ask for taint removal.
pub async fn run(
    settings: Settings,
    client: Option<kube::Client>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut registry = Registry::with_prefix("podid_install");
    let metrics = Metrics::register(&mut registry);
    let (readiness, readiness_rx) = watch::channel(Readiness::default());
    let publisher = Publisher {
        readiness: Arc::new(readiness),
        metrics,
    };
    let listener = health::bind(settings.health_addr).await?;
    for dir in [
        &settings.bin_dir,
        &settings.conf_dir,
        &settings.install_state_dir,
    ] {
        remove_stale_temps(dir);
    }

    let (wake_tx, wake_rx) = mpsc::channel();
    let dirs = [settings.conf_dir.as_path(), settings.bin_dir.as_path()];
    let watch = DirWatch::start(&dirs, wake_tx.clone()).map_err(|source| RunError::Watch {
        dirs: format!("{} and {}", dirs[0].display(), dirs[1].display()),
        source,
    })?;
    let keeper = FileKeeper {
        plugin: Plugin::new(settings.plugin_binary.clone(), &settings.bin_dir),
        conf: ConfDir::new(
            settings.conf_dir.clone(),
            Records::new(settings.install_state_dir.clone()),
        ),
        entry: settings.entry.clone(),
        publisher: publisher.clone(),
        last: String::new(),
    };
    let (files_done, files_stopped) = oneshot::channel::<()>();
    let rescan = settings.rescan_interval;
    std::thread::Builder::new()
        .name("podid-install-files".into())
        .spawn(move || {
            keeper.run(watch, &wake_rx, rescan);
            let _ = files_done.send(());
        })
        .map_err(|source| RunError::Thread {
            what: "file keeper",
            source,
        })?;

    let (guard_tx, guard_rx) = mpsc::sync_channel(1);
    guard::spawn_notifier(guard_tx.clone());
    let guard_publisher = publisher.clone();
    let guard_interval = settings.guard_interval;
    std::thread::Builder::new()
        .name("podid-install-guard".into())
        .spawn(move || keep_guard(&guard_publisher, &guard_rx, guard_interval))
        .map_err(|source| RunError::Thread {
            what: "guard keeper",
            source,
        })?;

    match (settings.taint.clone(), client) {
        (Some(taint), Some(client)) => {
            tokio::spawn(handle_taint(
                taint,
                client,
                publisher.clone(),
                shutdown.clone(),
            ));
        }
        (Some(_), None) => {
            error!("taint removal was asked for without a Kubernetes client; the taint stays");
            publisher.set(
                Component::Taint,
                Check::Pending("no Kubernetes client".to_owned()),
            );
        }
        (None, _) => {
            info!("--remove-taint=false: the node taint is left alone");
            publisher.set(Component::Taint, Check::Done);
        }
    }

    let state = HealthState {
        registry: Arc::new(registry),
        readiness: readiness_rx,
    };
    health::serve(listener, state, shutdown.clone()).await;

    let _ = wake_tx.send(Wake::Stop);
    let _ = guard_tx.try_send(GuardWake::Stop);
    if tokio::time::timeout(STOP_GRACE, files_stopped)
        .await
        .is_err()
    {
        warn!("the file keeper did not finish its pass in time");
    }
    info!(
        "stopping; the plugin binary, its entry in the primary network config and the host guard stay in place (only --uninstall removes the entry)"
    );
    Ok(())
}

/// `--uninstall`: podid's entry out of every list (originals of converted files written back
/// when unchanged); the binary and the guard stay.
pub fn uninstall(settings: &Settings) -> Result<Removal, ConfError> {
    remove_stale_temps(&settings.conf_dir);
    let mut conf = ConfDir::new(
        settings.conf_dir.clone(),
        Records::new(settings.install_state_dir.clone()),
    );
    let removal = conf.uninstall(UNINSTALL_PATIENCE)?;
    if removal.unchained.is_empty() && removal.restored.is_empty() {
        info!(dir = %settings.conf_dir.display(), "no network config holds podid");
    }
    for file in &removal.unreadable {
        warn!(%file, "a network config stayed truncated; it was not checked for podid");
    }
    info!(
        binary = %settings.bin_dir.join(crate::conflist::PLUGIN_TYPE).display(),
        "uninstalled: the plugin binary stays, since the runtime needs it to tear down pods set up with it (DEL would fail with \"failed to find plugin\"), and the host guard table ip podid-guard stays, so pods still cannot reach the node's IMDS"
    );
    Ok(removal)
}

fn remove_stale_temps(dir: &Path) {
    match files::remove_stale_temps(dir) {
        Ok(removed) => {
            for path in removed {
                info!(path = %path.display(), "removed a temp file left by an earlier run");
            }
        }
        Err(e) => warn!(dir = %dir.display(), error = %e, "cannot clean up temp files"),
    }
}
