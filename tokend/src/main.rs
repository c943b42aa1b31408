//! podid-tokend: the node token daemon. It owns one IMDS listener inside every registered
//! pod's network namespace, registered by the CNI plugin over a unix socket, and serves each
//! pod tokens of the Azure identities assigned to it (DESIGN.md).

mod api;
mod cache;
mod cluster;
mod config;
mod entra;
mod health;
mod imds;
mod limit;
mod listener;
mod netns;
mod node;
mod node_imds;
mod registry;
mod resolve;
mod service;
mod spool;
mod store;
mod token;
mod upstream;

use std::fs;
use std::io::{self, IsTerminal};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use podid_api::matching::MatchPolicy;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::cache::{CacheMetrics, TokenCache};
use crate::cluster::{Cluster, ClusterMetrics};
use crate::config::{Config, LogFormat};
use crate::entra::Entra;
use crate::limit::{LimitMetrics, Limits, PodLimiter};
use crate::listener::{ImdsMetrics, ListenerEnv};
use crate::node::{Node, NodeMetrics};
use crate::node_imds::NodeImds;
use crate::service::{ServiceMetrics, Settings, TokenService};
use crate::spool::SpoolWatch;
use crate::store::StateDir;
use crate::upstream::{Upstream, UpstreamMetrics};

/// How often listeners whose bind failed (the pod took the port) are tried again.
const BIND_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// How often tokend checks whether a burst of pod connections is over, to give its memory back.
const MEMORY_CHECK: Duration = Duration::from_secs(2);
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
        node = %config.node_name,
        socket = %config.socket.display(),
        state_dir = %config.state_dir.display(),
        listener_port = config.listener_port,
        health_addr = %config.health_addr,
        cluster_wide_bindings = config.cluster_wide_bindings,
        instance_metadata = ?config.instance_metadata,
        "starting"
    );
    // Before anything else: a SIGTERM during restore must exit cleanly too.
    let mut signals = Signals::new().context("cannot install signal handlers")?;
    // kube and reqwest both use rustls; ring is the one provider linked.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let extra_roots = match &config.ca_file {
        Some(path) => {
            load_ca_file(path).with_context(|| format!("--ca-file {}", path.display()))?
        }
        None => Vec::new(),
    };
    let client = kube_client(&config).await?;
    let state = StateDir::open(&config.state_dir)
        .with_context(|| format!("--state-dir {}", config.state_dir.display()))?;
    state.write_listener_port(config.listener_port)?;

    let mut metrics = prometheus_client::registry::Registry::with_prefix("podid_tokend");
    let cluster = Arc::new(Cluster::default());
    let cluster_metrics = ClusterMetrics::register(&mut metrics);
    let entra = Entra::new(extra_roots).context("cannot set up the HTTPS client for Entra ID")?;
    let node_imds = NodeImds::new(config.imds_endpoint.clone())
        .with_context(|| format!("--imds-endpoint {}", config.imds_endpoint))?;
    let upstream = Arc::new(Upstream::new(
        entra,
        node_imds,
        client.clone(),
        config.authority_host.clone(),
        usize::try_from(config.upstream_inflight).unwrap_or(usize::MAX),
        UpstreamMetrics::register(&mut metrics),
    ));
    let cache = TokenCache::new(
        usize::try_from(config.token_cache_size).unwrap_or(usize::MAX),
        CacheMetrics::register(&mut metrics),
    );
    let limiter = PodLimiter::new(
        Limits {
            rps: f64::from(config.pod_rps),
            burst: f64::from(config.pod_burst),
            inflight: config.pod_inflight,
        },
        LimitMetrics::register(&mut metrics),
    );
    let service = Arc::new(
        TokenService::new(
            Settings {
                policy: MatchPolicy {
                    cluster_wide: config.cluster_wide_bindings,
                },
                pod_wait: config.pod_wait,
                assignment_wait: config.assignment_wait,
                instance_metadata: config.instance_metadata,
            },
            Arc::clone(&cluster),
            cache,
            limiter,
            upstream,
            ServiceMetrics::register(&mut metrics),
        )
        .with_api(client.clone()),
    );
    let listener_env = Arc::new(ListenerEnv::new(
        Arc::clone(&service) as Arc<dyn imds::ImdsBackend>,
        ImdsMetrics::register(&mut metrics),
        usize::try_from(config.max_connections).unwrap_or(usize::MAX),
    ));
    let node_metrics = NodeMetrics::register(&mut metrics);
    let node = Arc::new(Node::new(
        config.listener_port,
        state,
        Arc::clone(&listener_env),
        node_metrics,
    ));
    let shutdown = CancellationToken::new();
    // The watches start before the restore, so they list while listeners are rebuilt.
    {
        let (cluster, node_name, shutdown) = (
            Arc::clone(&cluster),
            config.node_name.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            cluster::run(client, &node_name, cluster, cluster_metrics, shutdown).await;
        });
    }
    tokio::spawn(Arc::clone(&service).prune(shutdown.clone()));
    tokio::spawn(listener_env.give_back_memory(MEMORY_CHECK, shutdown.clone()));

    let health = TcpListener::bind(config.health_addr)
        .await
        .with_context(|| format!("cannot listen on --health-addr {}", config.health_addr))?;
    tokio::spawn(health::serve(
        health,
        Arc::clone(&node),
        Arc::clone(&cluster),
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

/// The Kubernetes client: `--kubeconfig`, else the in-cluster config, else the default
/// kubeconfig. Nothing is asked of the API server here: tokend starts (and serves its unix
/// API) while it is unreachable.
async fn kube_client(config: &Config) -> anyhow::Result<kube::Client> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}: reading", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}: loading", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no --kubeconfig, and neither an in-cluster config nor a default kubeconfig loads",
        )?,
    };
    kube::Client::try_from(kube_config).context("cannot build the Kubernetes client")
}

/// The CA certificates of a PEM file (at least one).
fn load_ca_file(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem = fs::read(path).context("cannot read the file")?;
    let certificates =
        reqwest::Certificate::from_pem_bundle(&pem).context("not a PEM bundle of certificates")?;
    if certificates.is_empty() {
        bail!("the file holds no PEM certificate");
    }
    Ok(certificates)
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
