//! podid-tokend: the node token daemon. It owns one IMDS listener inside every registered
//! pod's network namespace, registered by the CNI plugin over a unix socket (DESIGN.md).

mod api;
mod config;
mod health;
mod imds;
mod listener;
mod netns;
mod node;
mod registry;
mod spool;
mod store;

use std::fs;
use std::io::{self, IsTerminal};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};
use crate::imds::NoIdentities;
use crate::listener::{ImdsMetrics, ListenerEnv};
use crate::node::{Node, NodeMetrics};
use crate::spool::SpoolWatch;
use crate::store::StateDir;

/// How often listeners whose bind failed (the pod took the port) are tried again.
const BIND_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// How long shutdown waits for API requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Mode of the API socket: root only.
const SOCKET_MODE: u32 = 0o600;

fn main() -> ExitCode {
    let config = Arc::new(Config::parse());
    if let Err(message) = init_logging(config.log_format) {
        // Logging is not up; stderr is all there is.
        eprintln!("podid-tokend: {message}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("podid-tokend")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "podid-tokend stopped");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr with the level from `PODID_LOG` (RUST_LOG syntax, default `info`).
fn init_logging(format: LogFormat) -> Result<(), String> {
    let filter = match std::env::var("PODID_LOG") {
        Ok(value) => EnvFilter::try_new(&value)
            .map_err(|e| format!("invalid PODID_LOG value {value:?}: {e}"))?,
        Err(std::env::VarError::NotPresent) => EnvFilter::new("info"),
        Err(std::env::VarError::NotUnicode(value)) => {
            return Err(format!("invalid PODID_LOG value {value:?}: not UTF-8"));
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| format!("cannot set up logging: {e}"))
}

async fn run(config: Arc<Config>) -> anyhow::Result<()> {
    info!(
        version = env!("CARGO_PKG_VERSION"),
        socket = %config.socket.display(),
        state_dir = %config.state_dir.display(),
        listener_port = config.listener_port,
        health_addr = %config.health_addr,
        "starting"
    );
    // Before anything else: a SIGTERM during restore must exit cleanly too.
    let mut signals = Signals::new().context("cannot install signal handlers")?;
    let state = StateDir::open(&config.state_dir)
        .with_context(|| format!("--state-dir {}", config.state_dir.display()))?;
    state.write_listener_port(config.listener_port)?;

    let mut metrics = prometheus_client::registry::Registry::with_prefix("podid_tokend");
    let listener_env = Arc::new(ListenerEnv {
        identity: Arc::new(NoIdentities),
        metrics: ImdsMetrics::register(&mut metrics),
    });
    let node_metrics = NodeMetrics::register(&mut metrics);
    let node = Arc::new(Node::new(
        config.listener_port,
        state,
        listener_env,
        node_metrics,
    ));
    let shutdown = CancellationToken::new();

    let health = TcpListener::bind(config.health_addr)
        .await
        .with_context(|| format!("cannot listen on --health-addr {}", config.health_addr))?;
    tokio::spawn(health::serve(
        health,
        Arc::clone(&node),
        Arc::new(metrics),
        shutdown.clone(),
    ));

    // Watch first, then scan, so no spooled record slips between the two.
    let watch = match SpoolWatch::new(node.state_dir().pending_dir()) {
        Ok(watch) => Some(watch),
        Err(e) => {
            warn!(error = %e, "cannot watch the spool; relying on the periodic rescan");
            None
        }
    };
    tokio::select! {
        restored = node.restore() => restored?,
        signal = signals.recv() => {
            info!(signal, "stopping during restore; records and spool are kept");
            return Ok(());
        }
    }

    let socket = bind_socket(&config.socket)
        .with_context(|| format!("--socket {}", config.socket.display()))?;
    node.set_ready(true);
    info!(socket = %config.socket.display(), "serving");
    let api = tokio::spawn(api::serve(socket, Arc::clone(&node), shutdown.clone()));
    tokio::spawn(spool::run(
        Arc::clone(&node),
        watch,
        config.spool_rescan_interval(),
        shutdown.clone(),
    ));
    tokio::spawn(maintain(
        Arc::clone(&node),
        config.netns_check_interval(),
        shutdown.clone(),
    ));

    let signal = signals.recv().await;
    info!(signal, "stopping; records and spool are kept");
    node.set_ready(false);
    shutdown.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        if let Err(e) = api.await {
            warn!(error = %e, "api server task failed");
        }
        node.quiesce().await;
    })
    .await;
    if drained.is_err() {
        warn!("requests still in flight at shutdown were cut");
    }
    Ok(())
}

/// The periodic netns check and bind retry.
async fn maintain(node: Arc<Node>, netns_check_interval: Duration, shutdown: CancellationToken) {
    let mut check = tokio::time::interval(netns_check_interval);
    let mut retry = tokio::time::interval(BIND_RETRY_INTERVAL);
    for timer in [&mut check, &mut retry] {
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick is immediate; restore has just checked and bound everything.
        timer.tick().await;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = check.tick() => node.check_netns().await,
            _ = retry.tick() => node.retry_unbound().await,
        }
    }
}

/// Binds the API socket: creates its directory (0700), replaces a stale socket (the state
/// dir lock proves no other tokend serves it) and restricts it to root.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        store::create_dir(dir)?;
    }
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            fs::remove_file(path).context("cannot remove the stale socket")?;
            info!(socket = %path.display(), "stale socket removed");
        }
        Ok(_) => bail!("the path exists and is not a socket; refusing to replace it"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("cannot inspect the socket path"),
    }
    let listener = UnixListener::bind(path).context("cannot bind the socket")?;
    fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE))
        .context("cannot restrict the socket to root")?;
    Ok(listener)
}

/// SIGTERM and SIGINT.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn new() -> io::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
