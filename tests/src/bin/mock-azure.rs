//! `mock-azure --config <file.json> --ca-file <path>`: the mock Entra ID and the mock node IMDS
//! as one process, for end-to-end runs and the local demo. Writes the test CA (which signed the
//! Entra server certificate) as PEM, prints one ready line per server, and runs until SIGTERM
//! or SIGINT. The configuration format: `tests/src/mocks/README.md`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use podid_tests::mocks::config::MockAzureConfig;
use podid_tests::mocks::tls::TestCa;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(about = "Mock Entra ID (HTTPS) and node IMDS (HTTP) for podid's tests and demo")]
struct Args {
    /// The JSON configuration: apps, identities, host name, listen addresses.
    #[arg(long)]
    config: PathBuf,
    /// Where to write the test CA certificate (PEM) that clients must trust.
    #[arg(long)]
    ca_file: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = MockAzureConfig::from_file(&args.config)?;
    let ca = Arc::new(TestCa::generate().context("generating the test CA")?);
    ca.write_pem(&args.ca_file)?;
    let base = args.config.parent().unwrap_or(Path::new("."));
    let mocks = config.start(base, ca).await?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // the lines a launcher waits for, one per server
    #[allow(clippy::print_stdout)]
    {
        if let Some(entra) = &mocks.entra {
            println!(
                "entra listening on {} ({})",
                entra.authority_host(),
                entra.addr()
            );
        }
        if let Some(imds) = &mocks.imds {
            println!("imds listening on {}", imds.url());
        }
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    mocks.shutdown().await;
    Ok(())
}
