//! `ledger-writer run|migrate|audit|rebuild|tail|redrive-dlq|partitions|archive|verify|retention|history|replay --config PATH`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use ledger_writer::archive::day_text;

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
        /// (of the merchant's entries, with --merchant), and the messages
        /// that repeat one (redeliveries after a crash); fewer ids than
        /// PostgreSQL rows is a drift.
        #[arg(long)]
        count_kafka: bool,
    },
    /// Recompute Redis cells from the ledger (PostgreSQL plus unrelayed
    /// outbox entries) after Redis lost or corrupted them. Refuses a key that
    /// took writes within the quiet window unless forced. Exits 1 when
    /// anything was refused.
    Rebuild {
        /// The stock key, as merchant/sku/location.
        #[arg(long, value_name = "MERCHANT/SKU/LOCATION", conflicts_with = "all")]
        key: Option<String>,
        /// Every stock key the ledger knows.
        #[arg(long, required_unless_present = "key")]
        all: bool,
        /// Rebuild keys that took writes within the quiet window too (each
        /// cell is still refused if it changes while being rebuilt).
        #[arg(long)]
        force: bool,
        /// How long a key must have been without writes, in seconds.
        #[arg(long, default_value_t = 10)]
        quiet_seconds: u64,
        /// Read the days retention dropped from PostgreSQL back from the
        /// archive (this URL, or `ledger_writer.archive_url` when none is
        /// given); without it, keys with dropped days are refused.
        #[arg(long, value_name = "DIR|URL", num_args = 0..=1, default_missing_value = "")]
        from_archive: Option<String>,
    },
    /// Create the ledger's day partitions for today and the days ahead
    /// (`ledger_writer.partitions_ahead_days`); the writer does it too.
    Partitions,
    /// Write closed days of the PostgreSQL ledger to the archive as Parquet,
    /// one file and manifest per day and ledger partition; a day already
    /// archived gains only the entries it lacked (idempotent). Exits 1 when a
    /// day could not be archived.
    Archive {
        /// Only this day (YYYY-MM-DD, UTC), even if it is not over yet.
        #[arg(long, value_parser = parse_day)]
        day: Option<time::Date>,
        /// The archive (default: `ledger_writer.archive_url`).
        #[arg(long, value_name = "DIR|URL")]
        to: Option<String>,
    },
    /// Read every archived file of a day back, check it against its
    /// manifest and that it holds every entry PostgreSQL has for the day.
    /// Exits 1 on any problem.
    Verify {
        /// The day (YYYY-MM-DD); every closed day (before today, UTC)
        /// PostgreSQL holds when absent, as `archive` does.
        #[arg(long, value_parser = parse_day)]
        day: Option<time::Date>,
        /// The archive (default: `ledger_writer.archive_url`).
        #[arg(long, value_name = "DIR|URL")]
        archive: Option<String>,
    },
    /// Drop the PostgreSQL ledger's days past `raw_retention_days` that the
    /// archive verifies (writing their curated history and carried balances
    /// first), and curated history past `history_retention_days`. A dry run
    /// unless --apply. Exits 1 when a day past retention was refused.
    Retention {
        /// Change things (else only say what would be done).
        #[arg(long)]
        apply: bool,
        /// Only this day, whatever its age (YYYY-MM-DD).
        #[arg(long, value_parser = parse_day)]
        day: Option<time::Date>,
        /// The archive (default: `ledger_writer.archive_url`).
        #[arg(long, value_name = "DIR|URL")]
        archive: Option<String>,
    },
    /// Write the curated daily history (`stock_history_daily`) of the days
    /// PostgreSQL still holds, or of one day.
    History {
        /// Only this day (YYYY-MM-DD).
        #[arg(long, value_parser = parse_day)]
        day: Option<time::Date>,
    },
    /// Undo a bad bulk import: from the ledger, the delta adjustments that
    /// take out what the source's selected events still do to each key
    /// (holds and sales since stay), with the blast radius. A dry run
    /// unless --apply; applied as new entries of source `undo.<source>`,
    /// once per key however often it runs. Exits 1 when a key would be
    /// left short or was compensated otherwise before.
    Compensate {
        /// The import's source.
        #[arg(long)]
        source: String,
        /// Its events from FIRST to LAST (event ids, in the order applied).
        #[arg(long, value_name = "FIRST..LAST", conflicts_with = "since")]
        events: Option<String>,
        /// Its events applied at or after this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        since: Option<time::OffsetDateTime>,
        /// Apply the compensation (else only print it).
        #[arg(long)]
        apply: bool,
    },
    /// Land archived days again: into PostgreSQL (each entry once; the day's
    /// carried balances removed) or the Kafka ledger topic.
    Replay {
        /// The archive (a directory or URL).
        #[arg(long, value_name = "DIR|URL")]
        from_archive: String,
        /// First day (YYYY-MM-DD, inclusive).
        #[arg(long, value_parser = parse_day)]
        since: Option<time::Date>,
        /// Last day (YYYY-MM-DD, inclusive).
        #[arg(long, value_parser = parse_day)]
        until: Option<time::Date>,
        /// Where to land them.
        #[arg(long, value_enum, default_value_t = ledger_writer::archive::Target::Postgres)]
        into: ledger_writer::archive::Target,
    },
    /// Print the Kafka ledger topic's entries, each once (repeats dropped by
    /// entry_id): JSON lines as published, or a table. Commits no offsets.
    Tail {
        /// From the topic's first entry (else only entries from now on).
        #[arg(long)]
        from_beginning: bool,
        /// Only this stock key's entries, as merchant/sku/location.
        #[arg(long, value_name = "MERCHANT/SKU/LOCATION")]
        key: Option<String>,
        /// Keep printing new entries until Ctrl-C (else stop once the topic
        /// has been quiet for 2 s).
        #[arg(long)]
        follow: bool,
        /// How to print each entry.
        #[arg(long, value_enum, default_value_t = ledger_writer::tail::Format::Json)]
        format: ledger_writer::tail::Format,
    },
    /// Without --fixed: print the stock events the ingestion sent to the
    /// dead-letter topic, a JSON line each (the letter, with the outcomes of
    /// its redrives so far). With --fixed FILE: apply each event of FILE (a
    /// copy of those lines with their payloads fixed, or bare events) once,
    /// record each outcome in the dead-letter topic and print it. Exits 1
    /// when an event is still invalid or refused.
    RedriveDlq {
        /// The fixed lines (`-` for standard input).
        #[arg(long, value_name = "FILE")]
        fixed: Option<PathBuf>,
    },
}

/// A `--key` argument: merchant/sku/location, none of them empty.
fn parse_key(text: &str) -> Result<allocator::StockKey, String> {
    match text.split('/').collect::<Vec<_>>().as_slice() {
        [merchant, sku, location]
            if !merchant.is_empty() && !sku.is_empty() && !location.is_empty() =>
        {
            Ok(allocator::StockKey::new(*merchant, *sku, *location))
        }
        _ => Err(format!(
            "ledger-writer: --key must be merchant/sku/location, not {text:?}"
        )),
    }
}

/// A `--day` argument.
fn parse_day(text: &str) -> Result<time::Date, String> {
    ledger_writer::archive::parse_day(text)
}

/// A `--since` argument.
fn parse_time(text: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("{text:?} is not an RFC 3339 time (2026-12-07T10:00:00Z)"))
}

/// The archive a command names, or the configured one.
fn open_archive(
    config: &config::Config,
    url: Option<&str>,
) -> anyhow::Result<ledger_writer::archive::Archive> {
    let url = url
        .filter(|url| !url.is_empty())
        .unwrap_or(&config.ledger_writer.archive_url);
    ledger_writer::archive::Archive::open(url)
}

/// PostgreSQL for the offline commands, migrated (an audit of a database no
/// writer has touched yet finds an empty ledger rather than no table). They
/// read whole ledgers, so the relay's statement timeout does not apply.
async fn offline_postgres(config: &config::Config) -> anyhow::Result<tokio_postgres::Client> {
    let mut client = ledger_writer::connect_postgres(config).await?;
    ledger_writer::migrate::migrate(&mut client).await?;
    client.batch_execute("SET statement_timeout = 0").await?;
    Ok(client)
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
    let cli = Cli::parse();
    config::init_logging(config::log_format_of(&cli.config), "info,rdkafka=warn");
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
        Command::Rebuild {
            key,
            all: _,
            force,
            quiet_seconds,
            from_archive,
        } => {
            let scope = match key.as_deref().map(parse_key) {
                None => ledger_writer::audit::Scope::All,
                Some(Ok(key)) => ledger_writer::audit::Scope::Key(key),
                Some(Err(error)) => {
                    eprintln!("{error}");
                    return Ok(std::process::ExitCode::from(2));
                }
            };
            let client = offline_postgres(&config).await?;
            let settings = allocator::AllocatorSettings::from_config(&config);
            let allocator = allocator::Allocator::connect(&config.redis.url, settings, 2).await?;
            let options = ledger_writer::rebuild::Options {
                scope,
                force,
                quiet: std::time::Duration::from_secs(quiet_seconds),
            };
            let archive = from_archive
                .as_deref()
                .map(|url| open_archive(&config, Some(url)))
                .transpose()?;
            let report = ledger_writer::rebuild::rebuild(
                &client,
                &allocator,
                &config,
                &options,
                archive.as_ref(),
            )
            .await?;
            println!(
                "rebuild: {} cells of {} stock keys rebuilt; {} lost holds released ({} units)",
                report.cells, report.keys, report.released_holds, report.released_units
            );
            for (subject, reason) in &report.refused {
                println!("refused: {subject}: {reason}");
            }
            if report.refused.is_empty() {
                Ok(std::process::ExitCode::SUCCESS)
            } else {
                Ok(std::process::ExitCode::FAILURE)
            }
        }
        Command::Partitions => {
            let client = offline_postgres(&config).await?;
            let days = ledger_writer::retention::ensure_ahead(
                &client,
                config.ledger_writer.partitions_ahead_days,
            )
            .await?;
            println!(
                "partitions: {} days from {} to {} exist",
                days.len(),
                days.first().map(|day| day_text(*day)).unwrap_or_default(),
                days.last().map(|day| day_text(*day)).unwrap_or_default()
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Archive { day, to } => {
            let client = offline_postgres(&config).await?;
            let archive = open_archive(&config, to.as_deref())?;
            let today = ledger_writer::retention::today(&client).await?;
            let days = ledger_writer::retention::closed_days(&client, day).await?;
            let mut failed = 0;
            for day in days {
                if day >= today {
                    eprintln!(
                        "archive: {} is not over: entries still arriving will need another archive run",
                        day_text(day)
                    );
                }
                match ledger_writer::archive::archive_day(&client, &archive, day).await {
                    Ok(files) => {
                        for file in files {
                            println!(
                                "archive: {} partition {}: {:?}, {} entries, {}",
                                file.manifest.day,
                                file.manifest.partition,
                                file.outcome,
                                file.manifest.rows,
                                file.manifest.file
                            );
                        }
                    }
                    Err(error) => {
                        failed += 1;
                        println!("archive: {}: failed: {error:#}", day_text(day));
                    }
                }
            }
            Ok(if failed == 0 {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
        Command::Verify { day, archive } => {
            let client = offline_postgres(&config).await?;
            let archive = open_archive(&config, archive.as_deref())?;
            let days = ledger_writer::retention::closed_days(&client, day).await?;
            let mut failed = 0;
            for day in days {
                let verified = ledger_writer::archive::verify_day(&client, &archive, day).await?;
                println!(
                    "verify: {}: {} files, {} entries archived, {} in postgresql",
                    day_text(day),
                    verified.files,
                    verified.archived,
                    verified.in_postgres
                );
                for problem in &verified.problems {
                    println!("problem: {}: {problem}", day_text(day));
                }
                failed += verified.problems.len();
            }
            Ok(if failed == 0 {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
        Command::Retention {
            apply,
            day,
            archive,
        } => {
            let mut client = offline_postgres(&config).await?;
            let archive = open_archive(&config, archive.as_deref())?;
            let report =
                ledger_writer::retention::retention(&mut client, &archive, &config, day, apply)
                    .await?;
            let verb = if apply { "dropped" } else { "would drop" };
            let mut refused = 0;
            for (day, decision) in &report.days {
                match decision {
                    ledger_writer::retention::Decision::Dropped { entries, history } => println!(
                        "retention: {}: {verb} ({entries} entries; {history} history rows written)",
                        day_text(*day)
                    ),
                    ledger_writer::retention::Decision::Refused(reason) => {
                        refused += 1;
                        println!("retention: {}: kept: {reason}", day_text(*day));
                    }
                }
            }
            if apply {
                println!(
                    "retention: {} curated history rows past {} days deleted",
                    report.history_deleted, config.ledger_writer.history_retention_days
                );
            } else {
                println!("retention: a dry run; --apply to drop");
            }
            Ok(if refused == 0 {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
        Command::History { day } => {
            let mut client = offline_postgres(&config).await?;
            let days = match day {
                Some(day) => vec![day],
                None => ledger_writer::archive::postgres_days(&client).await?,
            };
            for day in days {
                match ledger_writer::retention::history(&mut client, day).await? {
                    Some(rows) => println!("history: {}: {rows} stock keys", day_text(day)),
                    None => println!(
                        "history: {}: kept as written when retention dropped the day",
                        day_text(day)
                    ),
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Replay {
            from_archive,
            since,
            until,
            into,
        } => {
            let archive = open_archive(&config, Some(&from_archive))?;
            let mut client = match into {
                ledger_writer::archive::Target::Postgres => Some(offline_postgres(&config).await?),
                ledger_writer::archive::Target::Kafka => None,
            };
            let replayed = ledger_writer::archive::replay(
                &config,
                &archive,
                client.as_mut(),
                into,
                since,
                until,
            )
            .await?;
            println!(
                "replay: {} days, {} files, {} entries read; {} rows new to postgresql",
                replayed.days, replayed.files, replayed.entries, replayed.inserted
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Compensate {
            source,
            events,
            since,
            apply,
        } => {
            use ledger_writer::compensate::Selection;
            let selection = match (events, since) {
                (Some(range), _) => match range.split_once("..") {
                    Some((first, last)) if !first.is_empty() && !last.is_empty() => {
                        Selection::Events {
                            first: first.to_owned(),
                            last: last.to_owned(),
                        }
                    }
                    _ => {
                        eprintln!("ledger-writer: --events must be FIRST..LAST, not {range:?}");
                        return Ok(std::process::ExitCode::from(2));
                    }
                },
                (None, Some(since)) => Selection::Since(since),
                (None, None) => Selection::All,
            };
            let client = offline_postgres(&config).await?;
            let settings = allocator::AllocatorSettings::from_config(&config);
            let allocator = allocator::Allocator::connect(&config.redis.url, settings, 2).await?;
            let report = ledger_writer::compensate::compensate(
                &client, &allocator, &config, &source, &selection, apply,
            )
            .await?;
            let mut out = std::io::stdout().lock();
            for key in &report.keys {
                let state = match (&key.compensated_by_other, key.applied_differs) {
                    (Some(other), _) => {
                        format!(" (NOT APPLIED: compensated before by event {other})")
                    }
                    (None, Some(qty)) => {
                        format!(" (APPLIED BEFORE AS {qty:+}: the rest is left to you)")
                    }
                    (None, None) if key.already_applied => " (already applied)".to_owned(),
                    (None, None) => String::new(),
                };
                let pending = !key.already_applied && key.compensated_by_other.is_none();
                writeln!(
                    out,
                    "compensate: {}: {} entries, effect {:+} (added {}, removed {}, {} overridden by later counts), compensation {:+}{state}, {} reservations since, sellable {} -> {}{}",
                    key.key,
                    key.entries,
                    key.effect(),
                    key.added,
                    key.removed,
                    key.overridden,
                    -key.effect(),
                    key.reservations_since,
                    key.sellable_now,
                    if pending {
                        key.sellable_now - key.effect()
                    } else {
                        key.sellable_now
                    },
                    if key.would_be_short { " SHORT" } else { "" }
                )?;
            }
            let short = report.keys.iter().filter(|key| key.would_be_short).count();
            writeln!(
                out,
                "compensate: blast radius of {} import ({} entries): {} keys, {} units added and {} removed that still count, {} reservations made meanwhile, {short} keys left short",
                report.source,
                report.entries,
                report.keys.len(),
                report.units_added(),
                -report.units_removed(),
                report.reservations()
            )?;
            if let Some(seq) = report.highest_source_seq {
                writeln!(
                    out,
                    "compensate: the import's counts carried source_seq up to {seq}: later counts from {} at or below it are refused as stale, and a corrected file must use new event ids",
                    report.source
                )?;
            }
            if let Some((first, last)) = report.dropped_days {
                writeln!(
                    out,
                    "compensate: retention dropped {} to {} from postgresql: entries of the import on those days are not seen (replay them first)",
                    day_text(first),
                    day_text(last)
                )?;
            }
            if apply {
                writeln!(
                    out,
                    "compensate: applied {} adjustments as source {} ({} were already applied or compensated otherwise)",
                    report.applied, report.undo_source, report.duplicates
                )?;
            } else {
                writeln!(out, "compensate: a dry run; --apply to apply")?;
            }
            Ok(if report.attention() == 0 {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
        Command::RedriveDlq { fixed: None } => {
            let reader = Arc::clone(&config);
            let letters =
                tokio::task::spawn_blocking(move || ledger_writer::redrive::letters(&reader))
                    .await??;
            let mut out = std::io::stdout().lock();
            for letter in &letters {
                writeln!(out, "{letter}")?;
            }
            eprintln!(
                "ledger-writer redrive-dlq: {} letters in {}",
                letters.len(),
                config.kafka.dlq_topic
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::RedriveDlq { fixed: Some(path) } => {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&path)
                    .map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?
            };
            let mut lines = Vec::new();
            for (number, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(value) if value.is_object() => lines.push(value),
                    _ => {
                        eprintln!(
                            "{}:{}: not a JSON object; nothing was applied",
                            path.display(),
                            number + 1
                        );
                        return Ok(std::process::ExitCode::from(2));
                    }
                }
            }
            let settings = allocator::AllocatorSettings::from_config(&config);
            let allocator = allocator::Allocator::connect(&config.redis.url, settings, 2).await?;
            let producer = ledger_writer::producer(&config)?;
            let outcomes = ledger_writer::redrive::redrive(
                &config,
                &allocator,
                &producer,
                &lines,
                &mut std::io::stdout(),
            )
            .await?;
            let applied = outcomes
                .iter()
                .filter(|outcome| outcome.is_applied())
                .count();
            eprintln!(
                "ledger-writer redrive-dlq: {applied} of {} events applied (or already applied)",
                outcomes.len()
            );
            Ok(if applied == outcomes.len() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
        Command::Tail {
            from_beginning,
            key,
            follow,
            format,
        } => {
            let key = match key.as_deref().map(parse_key).transpose() {
                Ok(key) => key,
                Err(error) => {
                    eprintln!("{error}");
                    return Ok(std::process::ExitCode::from(2));
                }
            };
            let options = ledger_writer::tail::Options {
                from_beginning,
                key,
                follow,
                format,
            };
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopper = Arc::clone(&stop);
            tokio::spawn(async move {
                shutdown_signal().await;
                stopper.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            let reader = Arc::clone(&config);
            let counts = tokio::task::spawn_blocking(move || {
                ledger_writer::tail::tail(&reader, &options, &mut std::io::stdout().lock(), &stop)
            })
            .await??;
            eprintln!(
                "ledger-writer tail: {} entries printed, {} repeats dropped, {} of other keys skipped",
                counts.printed, counts.repeats, counts.skipped
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Audit {
            merchant,
            count_kafka,
        } => {
            let client = offline_postgres(&config).await?;
            let settings = allocator::AllocatorSettings::from_config(&config);
            let allocator = allocator::Allocator::connect(&config.redis.url, settings, 2).await?;
            let (mut report, passes) = ledger_writer::audit::audit_settled(
                &client,
                &allocator,
                &config,
                merchant.as_deref(),
            )
            .await?;
            println!(
                "audit: {} entries in postgresql, {} not yet relayed; {} cells, {} stock keys",
                report.entries_in_postgres, report.entries_not_relayed, report.cells, report.keys
            );
            if passes > 1 {
                println!(
                    "audit: read {passes} times (an earlier read found drifts; stock moving while it reads can show one that is not)"
                );
            }
            if count_kafka {
                let count = ledger_writer::audit::kafka_entry_ids(
                    &config,
                    merchant.as_deref(),
                    std::time::Duration::from_secs(120),
                )
                .await?;
                let ids = count.distinct;
                println!(
                    "audit: {ids} distinct entry ids in kafka topic {} ({} messages, {} redelivered)",
                    config.kafka.ledger_topic,
                    count.messages,
                    count.messages - ids
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
