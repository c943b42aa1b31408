//! The I/O shell around [`Registry`]: registrations from the API, adoption of spooled and
//! stored records, the periodic netns check and bind retries. One async mutex serialises every
//! change, so the registry, the files under `pods/` and the open listeners stay consistent.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use podid_api::wire::{PodList, PodState, Status};
use podid_api::{BoundPod, PodKey, PodRecord, RecordError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Mutex, MutexGuard};
use tracing::{debug, error, info, warn};

use crate::listener::{ListenerEnv, ListenerHandle};
use crate::netns::{self, NetnsError, NetnsId};
use crate::registry::{NetnsShared, Plan, PortChoice, Registry};
use crate::store::{self, ReadOutcome, StateDir, StoreError};

/// Why a registration, removal or lookup failed; the API maps these to statuses in one place.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("path names pod {path} but the record is for {body}")]
    KeyMismatch { path: PodKey, body: PodKey },
    #[error("invalid pod record: {0}")]
    InvalidRecord(RecordError),
    #[error("{0}")]
    UnsupportedNetns(RecordError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot start the listener on 127.0.0.1:{port} in netns {path}: {source}")]
    Listener {
        path: String,
        port: u16,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("pod {0} is not registered")]
    NotFound(PodKey),
    #[error("podid-tokend is shutting down")]
    NotReady,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Delete,
    Adopt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Rejected,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropReason {
    NetnsGone,
    NetnsChanged,
    Invalid,
}

impl DropReason {
    fn of(error: &NetnsError) -> Self {
        match error {
            NetnsError::Changed { .. } | NetnsError::NotNamespace { .. } => Self::NetnsChanged,
            _ => Self::NetnsGone,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistrationLabels {
    op: &'static str,
    result: &'static str,
}

impl RegistrationLabels {
    fn new(op: Op, outcome: Outcome) -> Self {
        let op = match op {
            Op::Put => "put",
            Op::Delete => "delete",
            Op::Adopt => "adopt",
        };
        let result = match outcome {
            Outcome::Ok => "ok",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
        };
        Self { op, result }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

impl DropLabels {
    fn new(reason: DropReason) -> Self {
        let reason = match reason {
            DropReason::NetnsGone => "netns_gone",
            DropReason::NetnsChanged => "netns_changed",
            DropReason::Invalid => "invalid",
        };
        Self { reason }
    }
}

/// The metrics of the registry shell.
#[derive(Debug, Clone, Default)]
pub struct NodeMetrics {
    pods: Gauge,
    listeners: Gauge,
    registrations: Family<RegistrationLabels, Counter>,
    dropped: Family<DropLabels, Counter>,
    bind_failures: Counter,
}

impl NodeMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.register("pods", "Registered pod attachments", metrics.pods.clone());
        registry.register(
            "listeners",
            "Open IMDS listeners in pod network namespaces",
            metrics.listeners.clone(),
        );
        registry.register(
            "registrations",
            "Registrations by operation and result",
            metrics.registrations.clone(),
        );
        registry.register(
            "records_dropped",
            "Records dropped because their netns is gone or changed, or they do not parse",
            metrics.dropped.clone(),
        );
        registry.register(
            "listener_bind_failures",
            "Failed attempts to bind a pod listener (other than a gone or changed netns)",
            metrics.bind_failures.clone(),
        );
        // Every series exists from the start, at zero, so rates need no first event.
        for op in [Op::Put, Op::Delete, Op::Adopt] {
            for outcome in [Outcome::Ok, Outcome::Rejected, Outcome::Error] {
                metrics
                    .registrations
                    .get_or_create(&RegistrationLabels::new(op, outcome))
                    .inc_by(0);
            }
        }
        for reason in [
            DropReason::NetnsGone,
            DropReason::NetnsChanged,
            DropReason::Invalid,
        ] {
            metrics
                .dropped
                .get_or_create(&DropLabels::new(reason))
                .inc_by(0);
        }
        metrics
    }

    fn registration(&self, op: Op, outcome: Outcome) {
        self.registrations
            .get_or_create(&RegistrationLabels::new(op, outcome))
            .inc();
    }

    fn dropped(&self, reason: DropReason) {
        self.dropped.get_or_create(&DropLabels::new(reason)).inc();
    }
}

/// Where a record being adopted comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// `pods/` at start: tokend's own records.
    Store,
    /// `pending/`: the plugin's spool.
    Pending,
}

/// The node data path: registry, state dir, listeners.
#[derive(Debug)]
pub struct Node {
    listener_port: u16,
    state: StateDir,
    registry: Mutex<Registry<ListenerHandle>>,
    listener_env: Arc<ListenerEnv>,
    metrics: NodeMetrics,
    ready: AtomicBool,
}

impl Node {
    pub fn new(
        listener_port: u16,
        state: StateDir,
        listener_env: Arc<ListenerEnv>,
        metrics: NodeMetrics,
    ) -> Self {
        Self {
            listener_port,
            state,
            registry: Mutex::new(Registry::default()),
            listener_env,
            metrics,
            ready: AtomicBool::new(false),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn state_dir(&self) -> &StateDir {
        &self.state
    }

    /// Waits for the change in progress, if any, to finish; used at shutdown.
    pub async fn quiesce(&self) {
        drop(self.registry.lock().await);
    }

    /// `PUT /v1/pods/{containerId}/{ifname}`: registers the record and returns the port its
    /// redirect must point to, once the listener is bound and the record persisted.
    pub async fn put(&self, path_key: &PodKey, record: PodRecord) -> Result<u16, NodeError> {
        let result = self.put_inner(path_key, record).await;
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(
                NodeError::KeyMismatch { .. }
                | NodeError::InvalidRecord(_)
                | NodeError::UnsupportedNetns(_)
                | NodeError::NotReady,
            ) => Outcome::Rejected,
            Err(NodeError::Netns(e)) if e.is_gone_or_changed() => Outcome::Rejected,
            Err(_) => Outcome::Error,
        };
        self.metrics.registration(Op::Put, outcome);
        match &result {
            Ok(port) => info!(pod = %path_key, port, "pod registered"),
            Err(e) if outcome == Outcome::Rejected => {
                warn!(pod = %path_key, error = %e, "registration refused")
            }
            Err(e) => error!(pod = %path_key, error = %e, "registration failed"),
        }
        result
    }

    async fn put_inner(&self, path_key: &PodKey, record: PodRecord) -> Result<u16, NodeError> {
        if !self.is_ready() {
            return Err(NodeError::NotReady);
        }
        let key = record.key();
        if key != *path_key {
            return Err(NodeError::KeyMismatch {
                path: path_key.clone(),
                body: key,
            });
        }
        record.validate().map_err(|e| {
            if e.is_netns() {
                NodeError::UnsupportedNetns(e)
            } else {
                NodeError::InvalidRecord(e)
            }
        })?;
        let netns = checked_netns(&record)?;
        let mut registry = self.registry.lock().await;
        match registry.plan(&record, netns, PortChoice::Configured(self.listener_port)) {
            Plan::Existing {
                port,
                live,
                changed,
            } => {
                if !live {
                    let shared = registry.shared(netns).unwrap_or_default();
                    let handle = self
                        .open_listener(&record.netns, netns, port, shared)
                        .await?;
                    if let Err(handle) = registry.set_live(netns, port, handle) {
                        handle.close().await;
                    }
                }
                if changed {
                    let bound = BoundPod {
                        record,
                        listener_port: port,
                    };
                    self.state.save(&bound)?;
                    let closed = registry.insert(bound, netns, None, Arc::default());
                    close_all(closed).await;
                }
                self.update_gauges(&registry);
                Ok(port)
            }
            Plan::Register {
                port,
                needs_bind,
                replaces,
                shared,
            } => {
                if replaces {
                    info!(pod = %key, netns = %record.netns, "replacing the pod's earlier registration");
                }
                let handle = if needs_bind {
                    Some(
                        self.open_listener(&record.netns, netns, port, Arc::clone(&shared))
                            .await?,
                    )
                } else {
                    None
                };
                let bound = BoundPod {
                    record,
                    listener_port: port,
                };
                if let Err(e) = self.state.save(&bound) {
                    if let Some(handle) = handle {
                        handle.close().await;
                    }
                    return Err(e.into());
                }
                let closed = registry.insert(bound, netns, handle, shared);
                close_all(closed).await;
                self.update_gauges(&registry);
                Ok(port)
            }
        }
    }

    /// `DELETE /v1/pods/{containerId}/{ifname}`: forgets the key, its file and any spooled
    /// record of it; closes the listener it was the last user of.
    pub async fn delete(&self, key: &PodKey) -> Result<(), NodeError> {
        let result = self.delete_inner(key).await;
        let outcome = match &result {
            Ok(()) => Outcome::Ok,
            Err(NodeError::NotFound(_) | NodeError::NotReady) => Outcome::Rejected,
            Err(_) => Outcome::Error,
        };
        self.metrics.registration(Op::Delete, outcome);
        match &result {
            Ok(()) => info!(pod = %key, "pod unregistered"),
            Err(NodeError::NotFound(_)) => debug!(pod = %key, "delete of an unknown pod"),
            Err(e) => error!(pod = %key, error = %e, "unregistration failed"),
        }
        result
    }

    async fn delete_inner(&self, key: &PodKey) -> Result<(), NodeError> {
        if !self.is_ready() {
            return Err(NodeError::NotReady);
        }
        let mut registry = self.registry.lock().await;
        let spooled = store::remove_file(&self.state.pending_path(key))?;
        if !registry.contains(key) {
            return if spooled {
                Ok(())
            } else {
                Err(NodeError::NotFound(key.clone()))
            };
        }
        // File first: if it cannot go, the pod stays registered and the caller may retry.
        store::remove_file(&self.state.record_path(key))?;
        if let Some(removed) = registry.remove(key)
            && let Some(handle) = removed.closed
        {
            handle.close().await;
        }
        self.update_gauges(&registry);
        Ok(())
    }

    /// `GET /v1/pods`.
    pub async fn list(&self) -> PodList {
        PodList {
            pods: self.registry.lock().await.states(),
        }
    }

    /// `GET /v1/pods/{containerId}/{ifname}`.
    pub async fn get(&self, key: &PodKey) -> Result<PodState, NodeError> {
        self.registry
            .lock()
            .await
            .state(key)
            .ok_or_else(|| NodeError::NotFound(key.clone()))
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Status {
        Status {
            ready: self.is_ready(),
            pods: self.registry.lock().await.len(),
            listener_port: self.listener_port,
        }
    }

    /// At start: rebuilds every listener from `pods/`, then adopts `pending/`.
    pub async fn restore(&self) -> Result<(), StoreError> {
        let stored = store::list_records(self.state.pods_dir())?;
        for path in &stored {
            self.adopt(path, Origin::Store).await;
        }
        self.rescan_pending().await?;
        let registry = self.registry.lock().await;
        info!(
            pods = registry.len(),
            listeners = registry.live_listeners(),
            "records restored"
        );
        Ok(())
    }

    /// Adopts every record in `pending/`.
    pub async fn rescan_pending(&self) -> Result<(), StoreError> {
        for path in store::list_records(self.state.pending_dir())? {
            self.adopt(&path, Origin::Pending).await;
        }
        Ok(())
    }

    /// Adopts one spooled record, if `name` is a record file name.
    pub async fn adopt_pending(&self, name: &str) {
        if store::is_record_name(name) {
            self.adopt(&self.state.pending_dir().join(name), Origin::Pending)
                .await;
        }
    }

    /// Registers a stored or spooled record on its own port, where its redirect points. A
    /// spooled record of a known key on another port moves the key there: the spool is the
    /// plugin's last word on where that key's redirect points.
    async fn adopt(&self, path: &Path, origin: Origin) {
        let mut registry = self.registry.lock().await;
        let grace = (origin == Origin::Pending).then_some(store::FRESH_GRACE);
        let bound = match store::read_record(path, grace) {
            ReadOutcome::Record(bound) => bound,
            ReadOutcome::Missing | ReadOutcome::Fresh => return,
            ReadOutcome::Invalid(reason) => {
                self.set_aside(path, &reason);
                return;
            }
        };
        if let Err(e) = bound.record.validate() {
            self.set_aside(path, &e.to_string());
            return;
        }
        // Binding port 0 would pick a random port that no redirect points to.
        if bound.listener_port == 0 {
            self.set_aside(path, "listenerPort 0 is not a port");
            return;
        }
        let key = bound.record.key();
        let netns = match checked_netns(&bound.record) {
            Ok(netns) => netns,
            Err(e) => {
                self.discard(path, &key, &e);
                return;
            }
        };
        // The key's own file under pods/ stays and needs no rewrite; any other source goes.
        let canonical = path == self.state.record_path(&key);
        let (port, needs_bind, shared, inserts, needs_save) =
            match registry.plan(&bound.record, netns, PortChoice::Exact(bound.listener_port)) {
                Plan::Existing {
                    port,
                    live,
                    changed,
                } => {
                    let shared = registry.shared(netns).unwrap_or_default();
                    (port, !live, shared, changed, changed)
                }
                Plan::Register {
                    port,
                    needs_bind,
                    shared,
                    ..
                } => (port, needs_bind, shared, true, !canonical),
            };
        let handle = if needs_bind {
            match self
                .try_listener(&bound.record.netns, netns, port, &shared)
                .await
            {
                Ok(handle) => handle,
                Err(e) => {
                    self.discard(path, &key, &e);
                    self.drop_netns_keys(&mut registry, netns, &e).await;
                    self.update_gauges(&registry);
                    return;
                }
            }
        } else {
            None
        };
        let bound = BoundPod {
            record: bound.record,
            listener_port: port,
        };
        if needs_save && let Err(e) = self.state.save(&bound) {
            // The source file stays for the next scan; nothing changed.
            self.metrics.registration(Op::Adopt, Outcome::Error);
            error!(pod = %key, file = %path.display(), error = %e, "cannot persist an adopted record");
            if let Some(handle) = handle {
                handle.close().await;
            }
            return;
        }
        let mut closed = Vec::new();
        if inserts {
            closed = registry.insert(bound, netns, handle, shared);
        } else if let Some(handle) = handle
            && let Err(handle) = registry.set_live(netns, port, handle)
        {
            closed.push(handle);
        }
        close_all(closed).await;
        if (origin == Origin::Pending || !canonical)
            && let Err(e) = store::remove_file(path)
        {
            error!(pod = %key, error = %e, "cannot remove an adopted record file");
        }
        self.update_gauges(&registry);
        self.metrics.registration(Op::Adopt, Outcome::Ok);
        let listener_bound = registry.state(&key).is_some_and(|s| s.listener_bound);
        let from = match origin {
            Origin::Store => "pods",
            Origin::Pending => "pending",
        };
        info!(pod = %key, port, from, listener_bound, "record adopted");
    }

    /// Drops every registered key whose netns path is gone or names another namespace.
    pub async fn check_netns(&self) {
        let mut registry = self.registry.lock().await;
        for registered in registry.registered() {
            let Err(e) = netns::check(Path::new(&registered.path), registered.netns) else {
                continue;
            };
            if !e.is_gone_or_changed() {
                warn!(pod = %registered.key, error = %e, "cannot check netns");
                continue;
            }
            self.drop_key(&mut registry, &registered.key, &e).await;
        }
        self.update_gauges(&registry);
    }

    /// Tries again to open every listener whose bind failed.
    pub async fn retry_unbound(&self) {
        let mut registry = self.registry.lock().await;
        for target in registry.unbound() {
            let opened = self
                .open_listener(&target.path, target.netns, target.port, target.shared)
                .await;
            match opened {
                Ok(handle) => {
                    info!(netns = %target.netns, port = target.port, "listener bound on retry");
                    if let Err(handle) = registry.set_live(target.netns, target.port, handle) {
                        handle.close().await;
                    }
                }
                Err(NodeError::Netns(e)) if e.is_gone_or_changed() => {
                    self.drop_netns_keys(&mut registry, target.netns, &e).await;
                }
                Err(e) => {
                    debug!(netns = %target.netns, port = target.port, error = %e, "listener still not bound")
                }
            }
        }
        self.update_gauges(&registry);
    }

    /// Binds and starts a listener; any failure is the caller's error.
    async fn open_listener(
        &self,
        path: &str,
        netns: NetnsId,
        port: u16,
        shared: Arc<NetnsShared>,
    ) -> Result<ListenerHandle, NodeError> {
        let socket = netns::bind_loopback(Path::new(path), netns, port)
            .await
            .inspect_err(|e| {
                if !e.is_gone_or_changed() {
                    self.metrics.bind_failures.inc();
                }
            })?;
        ListenerHandle::start(socket, netns, port, shared, Arc::clone(&self.listener_env)).map_err(
            |source| {
                self.metrics.bind_failures.inc();
                NodeError::Listener {
                    path: path.to_owned(),
                    port,
                    source,
                }
            },
        )
    }

    /// Binds for a record with no caller waiting: a gone or changed netns is the caller's to
    /// drop; any other failure leaves the slot unbound, to be retried.
    async fn try_listener(
        &self,
        path: &str,
        netns: NetnsId,
        port: u16,
        shared: &Arc<NetnsShared>,
    ) -> Result<Option<ListenerHandle>, NetnsError> {
        match self
            .open_listener(path, netns, port, Arc::clone(shared))
            .await
        {
            Ok(handle) => Ok(Some(handle)),
            Err(NodeError::Netns(e)) if e.is_gone_or_changed() => Err(e),
            Err(e) => {
                warn!(netns = %netns, port, error = %e, "listener not bound; will retry");
                Ok(None)
            }
        }
    }

    /// Forgets one key whose netns is gone or changed: file, registration, listener.
    async fn drop_key(
        &self,
        registry: &mut MutexGuard<'_, Registry<ListenerHandle>>,
        key: &PodKey,
        reason: &NetnsError,
    ) {
        if let Err(e) = store::remove_file(&self.state.record_path(key)) {
            error!(pod = %key, error = %e, "cannot remove the record of a dropped pod");
        }
        let Some(removed) = registry.remove(key) else {
            return;
        };
        self.metrics.dropped(DropReason::of(reason));
        warn!(pod = %key, netns = %removed.bound.record.netns, reason = %reason, "record dropped");
        if let Some(handle) = removed.closed {
            handle.close().await;
        }
    }

    /// Forgets every key registered in `netns` (found gone or changed while binding).
    async fn drop_netns_keys(
        &self,
        registry: &mut MutexGuard<'_, Registry<ListenerHandle>>,
        netns: NetnsId,
        reason: &NetnsError,
    ) {
        let keys = registry
            .registered()
            .into_iter()
            .filter(|r| r.netns == netns)
            .map(|r| r.key);
        for key in keys {
            self.drop_key(registry, &key, reason).await;
        }
    }

    /// A record file whose netns is gone or changed: delete it (the pod is gone).
    fn discard(&self, path: &Path, key: &PodKey, reason: &NetnsError) {
        if let Err(e) = store::remove_file(path) {
            error!(pod = %key, error = %e, "cannot remove a record of a gone pod");
        }
        self.metrics.dropped(DropReason::of(reason));
        self.metrics.registration(Op::Adopt, Outcome::Rejected);
        warn!(pod = %key, file = %path.display(), reason = %reason, "record dropped");
    }

    /// A record file that is not a valid record: keep it as `<name>.invalid`, never read again.
    fn set_aside(&self, path: &Path, reason: &str) {
        self.metrics.dropped(DropReason::Invalid);
        self.metrics.registration(Op::Adopt, Outcome::Rejected);
        match store::set_aside(path) {
            Ok(to) => {
                error!(file = %path.display(), kept_as = %to.display(), reason, "invalid record file set aside")
            }
            Err(e) => {
                error!(file = %path.display(), reason, error = %e, "invalid record file could not be set aside")
            }
        }
    }

    fn update_gauges(&self, registry: &Registry<ListenerHandle>) {
        self.metrics.pods.set(gauge_value(registry.len()));
        self.metrics
            .listeners
            .set(gauge_value(registry.live_listeners()));
    }
}

/// The netns the record's path names now, which must be the one the record was made for.
fn checked_netns(record: &PodRecord) -> Result<NetnsId, NetnsError> {
    let expected = NetnsId {
        dev: record.netns_dev,
        ino: record.netns_inode,
    };
    netns::check(Path::new(&record.netns), expected)?;
    Ok(expected)
}

async fn close_all(handles: Vec<ListenerHandle>) {
    for handle in handles {
        handle.close().await;
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
