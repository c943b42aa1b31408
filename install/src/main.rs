//! `podid-install`: parse and validate the flags, set up logging (and the kube client when the
//! taint is to be removed), then either `--uninstall` and exit, or run until SIGTERM/SIGINT and
//! exit 0 leaving the plugin, its conflist entry and the host guard in place.

use std::io::IsTerminal as _;

use anyhow::Context as _;
use clap::Parser as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use podid_install::config::{self, Args, LogFormat, TaintSettings};
use podid_install::run;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

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
    let exe = std::env::current_exe().ok();
    let settings = args.settings(exe.as_deref())?;

    if settings.uninstall {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || run::uninstall(&settings))
            .await
            .context("the uninstall task panicked")??;
        return Ok(());
    }

    let client = match &settings.taint {
        Some(taint) => Some(kube_client(taint).await?),
        None => None,
    };
    info!(
        conf_dir = %settings.conf_dir.display(),
        bin_dir = %settings.bin_dir.display(),
        plugin = %settings.plugin_binary.display(),
        entry = %settings.entry,
        "podid-install starting"
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
    run::run(settings, client, shutdown).await?;
    Ok(())
}

async fn kube_client(taint: &TaintSettings) -> anyhow::Result<kube::Client> {
    let kube_config = match &taint.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}: reading", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}: loading", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no --kubeconfig, and neither an in-cluster config nor a default kubeconfig loads (or pass --remove-taint=false)",
        )?,
    };
    kube::Client::try_from(kube_config).context("building the Kubernetes client")
}
