//! `fake-apiserver --port <p> --kubeconfig <path>`: the loopback fake Kubernetes API server as
//! its own process, for end-to-end runs and benchmarks. Writes a kubeconfig, prints one
//! `listening on http://127.0.0.1:<port>` line when ready, and runs until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use podid_tests::fakeapi::FakeApiServer;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(about = "A loopback fake Kubernetes API server for podid's tests and benchmarks")]
struct Args {
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where to write a kubeconfig that points at this server.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Changes kept for watch resumption; a watch from an older version gets 410 Gone.
    #[arg(long, default_value_t = 20_000)]
    history: usize,
    /// Seconds between bookmarks on watches that allow them.
    #[arg(long, default_value_t = 5)]
    bookmark_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = FakeApiServer::builder()
        .port(args.port)
        .history_limit(args.history)
        .bookmark_interval(Duration::from_secs(args.bookmark_seconds.max(1)))
        .start()
        .await
        .with_context(|| format!("binding 127.0.0.1:{}", args.port))?;
    server
        .write_kubeconfig(&args.kubeconfig)
        .with_context(|| format!("writing the kubeconfig to {}", args.kubeconfig.display()))?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // the one line a launcher waits for
    #[allow(clippy::print_stdout)]
    {
        println!("listening on {}", server.url());
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    server.shutdown().await;
    Ok(())
}
