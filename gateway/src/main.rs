//! `gateway --config PATH`: one gateway node.

use std::path::PathBuf;

use clap::Parser;

/// mimalloc rather than glibc's malloc: a profile of the hot-SKU reservation
/// path (two nodes at the ceiling) spent 15% of the gateway's samples in
/// glibc's malloc, free and chunk consolidation; the request path makes
/// many small, short-lived allocations across threads, mimalloc's case.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An edge node of the inventory availability gateway.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The TOML config (see config/dev.toml); reloaded on change or SIGHUP.
    #[arg(long, env = "INVGW_CONFIG", default_value = "config/dev.toml")]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    config::init_logging(config::log_format_of(&cli.config), "info,pingora=warn");
    gateway::run(&cli.config, gateway::unix_shutdown())
}
