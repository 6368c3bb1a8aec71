//! `invgw-config`: check a config file and hash API keys for it.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tools for the gateway's configuration file.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load, override from the environment and validate a config file; print
    /// each broken field on its own line and exit 1 if any.
    Check {
        /// The TOML file.
        path: PathBuf,
    },
    /// Print the `key_sha256` of a bearer token (read from stdin when omitted,
    /// so the token stays out of the shell history).
    HashKey {
        /// The bearer token.
        token: Option<String>,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Check { path } => match config::load_file(&path) {
            Ok(config) => {
                println!(
                    "ok: node {} on {}, {} partitions, {} api keys, {} flash sales",
                    config.node.id,
                    config.listen.http,
                    config.stock.partitions,
                    config.auth.api_keys.len(),
                    config.flash_sales.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(error) => {
                let fields = error.field_errors();
                if fields.is_empty() {
                    eprintln!("{error}");
                } else {
                    for field in fields {
                        eprintln!("{field}");
                    }
                }
                Ok(ExitCode::FAILURE)
            }
        },
        Command::HashKey { token } => {
            let token = match token {
                Some(token) => token,
                None => {
                    let mut input = String::new();
                    std::io::stdin().read_to_string(&mut input)?;
                    input.trim_end_matches(['\n', '\r']).to_owned()
                }
            };
            anyhow::ensure!(!token.is_empty(), "empty token");
            println!("{}", config::hash_api_key(&token));
            Ok(ExitCode::SUCCESS)
        }
    }
}
