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
    /// Check Redis against the ledger (PostgreSQL plus unrelayed outbox
    /// entries): every cell and the conservation law of every stock key.
    /// Exits 1 on any drift.
    Audit {
        /// Only this merchant's stock keys.
        #[arg(long)]
        merchant: Option<String>,
        /// Also read the whole Kafka ledger topic and count its entry ids
        /// (fewer ids than PostgreSQL rows is a drift).
        #[arg(long)]
        count_kafka: bool,
    },
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
async fn main() -> anyhow::Result<std::process::ExitCode> {
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
        Command::Run => {
            ledger_writer::run(config, shutdown_signal()).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let mut client = ledger_writer::connect_postgres(&config).await?;
            let applied = ledger_writer::migrate::migrate(&mut client).await?;
            eprintln!("ledger-writer: {applied} migrations applied");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Audit {
            merchant,
            count_kafka,
        } => {
            let client = ledger_writer::connect_postgres(&config).await?;
            let settings = allocator::AllocatorSettings::from_config(&config);
            let allocator = allocator::Allocator::connect(&config.redis.url, settings, 2).await?;
            let mut report =
                ledger_writer::audit::audit(&client, &allocator, &config, merchant.as_deref())
                    .await?;
            println!(
                "audit: {} entries in postgresql, {} not yet relayed; {} cells, {} stock keys",
                report.entries_in_postgres, report.entries_not_relayed, report.cells, report.keys
            );
            if count_kafka && merchant.is_none() {
                let ids = ledger_writer::audit::kafka_entry_ids(
                    &config,
                    std::time::Duration::from_secs(120),
                )
                .await?;
                println!(
                    "audit: {ids} distinct entry ids in kafka topic {}",
                    config.kafka.ledger_topic
                );
                if ids < report.entries_in_postgres {
                    report.drifts.push(ledger_writer::audit::Drift {
                        subject: config.kafka.ledger_topic.clone(),
                        problem: format!(
                            "{ids} entry ids in kafka, {} rows in postgresql",
                            report.entries_in_postgres
                        ),
                    });
                }
            }
            for drift in &report.drifts {
                println!("drift: {}: {}", drift.subject, drift.problem);
            }
            if report.drifts.is_empty() {
                println!("audit: the books balance");
                Ok(std::process::ExitCode::SUCCESS)
            } else {
                println!("audit: {} drifts", report.drifts.len());
                Ok(std::process::ExitCode::FAILURE)
            }
        }
    }
}
