//! `podid-controller`: parse and validate the flags, set up logging and the kube client, run
//! until SIGTERM/SIGINT (exit 0, lease released) or until the lease is lost (exit 1, so the
//! Deployment restarts this replica as a standby).

use std::io::IsTerminal as _;

use anyhow::Context as _;
use clap::Parser as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use podid_controller::Controller;
use podid_controller::config::{self, Args, Environment, LogFormat};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // kube's TLS uses ring; chosen explicitly so a build that also links aws-lc-rs still works
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let log = std::env::var(config::LOG_ENV).ok();
    let filter = config::log_filter(log.as_deref())?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let settings = args.settings(&Environment::current())?;

    let kube_config = match &args.kubeconfig {
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
    let client = kube::Client::try_from(kube_config).context("building the Kubernetes client")?;
    info!(
        lease = %format!("{}/{}", settings.lease.namespace, settings.lease.name),
        holder = %settings.lease.holder,
        cluster_wide_bindings = settings.cluster_wide_bindings,
        "podid-controller starting"
    );

    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            shutdown.cancel();
        });
    }
    match Controller::new(client, settings).run(shutdown).await {
        Ok(()) => {
            info!("stopped");
            Ok(())
        }
        Err(e) => {
            error!(error = %e, "stopping");
            Err(e.into())
        }
    }
}
