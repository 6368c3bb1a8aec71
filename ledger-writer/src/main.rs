//! `ledger-writer run|migrate --config PATH`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

/// Relays the stock ledger from Redis to Kafka and PostgreSQL, and reconciles.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The TOML config (see config/dev.toml).
    #[arg(
        long,
        env = "INVGW_CONFIG",
        default_value = "config/dev.toml",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Relay every partition's outbox and run the reconciler until SIGTERM/SIGINT.
    Run,
    /// Apply the PostgreSQL migrations and exit.
    Migrate,
}

async fn shutdown_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(stream) => stream,
            Err(_) => return std::future::pending().await,
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn")),
        )
        .init();
    let cli = Cli::parse();
    let config = Arc::new(config::load_file(&cli.config)?);
    match cli.command {
        Command::Run => ledger_writer::run(config, shutdown_signal()).await,
        Command::Migrate => {
            let mut client = ledger_writer::connect_postgres(&config).await?;
            let applied = ledger_writer::migrate::migrate(&mut client).await?;
            eprintln!("ledger-writer: {applied} migrations applied");
            Ok(())
        }
    }
}
