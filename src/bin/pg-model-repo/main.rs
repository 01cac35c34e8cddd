//! `pg-model-repo`: the command-line tool for operators and pipelines (docs/cli.md), built on
//! the library's public API only. Each command is one clap struct whose doc comments are its
//! help; each module owns one group of commands and prints through `output`.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 bad usage; `health` exits 3 when the
//! repository is degraded and 4 when it is unhealthy.

mod cache;
mod connect;
mod embeddings;
mod error;
mod ids;
mod migrate;
mod models;
mod monitor;
mod npy;
mod output;
#[cfg(feature = "parquet")]
mod parquet_io;
mod progress;

use clap::{Parser, Subcommand};

use crate::error::CliError;
use crate::output::Format;

/// Models, aliases, embeddings (.npy and Parquet files), cache, health and migrations of a
/// pg-model-repo database.
///
/// Exit codes: 0 success, 1 the operation failed, 2 bad usage; `health` exits 3 when
/// degraded and 4 when unhealthy. The manual: docs/cli.md.
#[derive(Debug, Parser)]
#[command(name = "pg-model-repo", version, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes, before or after the subcommand.
#[derive(Debug, clap::Args)]
pub struct Global {
    /// The database: a postgres:// URL or a "host=… user=…" string. Its password never
    /// appears in any output, error or log.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub url: Option<String>,
    /// The schema that holds the repository's tables [default: $MODEL_REPO_SCHEMA, else
    /// public].
    #[arg(long, global = true)]
    pub schema: Option<String>,
    /// Human tables, or JSON on stdout (one document per command).
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// No progress bars (they are drawn on stderr, and only when it is a terminal).
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply pending migrations, or list applied and pending ones (--status, --dry-run).
    Migrate(migrate::MigrateArgs),
    /// Versioned models: list, show, push, pull, delete, cleanup, aliases.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Embeddings: load from and export to .npy or Parquet files, stats, drop, nearest.
    #[command(subcommand)]
    Embeddings(embeddings::EmbeddingsCommand),
    /// The prediction cache: stats, clear by glob, purge expired entries.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Check the database, the tables and the query latency (exit 0 healthy, 3 degraded,
    /// 4 unhealthy).
    Health(monitor::HealthArgs),
    /// Storage statistics of models, embeddings and the cache.
    Stats(monitor::StatsArgs),
    /// VACUUM ANALYZE the repository's tables and purge expired cache entries.
    Optimize(monitor::OptimizeArgs),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // clap's own convention: 2 for bad usage, 0 for --help and --version.
        Err(e) => e.exit(),
    };
    connect::remember_secrets(cli.global.url.as_deref());
    error::install_logger();
    let code = match run(&cli) {
        Ok(code) => code,
        Err(e) => e.report(),
    };
    std::process::exit(code);
}

/// Runs the command; returns the exit code of a command that finished (0, or health's).
fn run(cli: &Cli) -> Result<i32, CliError> {
    let global = &cli.global;
    match &cli.command {
        Command::Migrate(args) => migrate::run(global, args),
        Command::Models(command) => models::run(global, command),
        Command::Embeddings(command) => embeddings::run(global, command),
        Command::Cache(command) => cache::run(global, command),
        Command::Health(args) => monitor::health(global, args),
        Command::Stats(args) => monitor::stats(global, args),
        Command::Optimize(args) => monitor::optimize(global, args),
    }
}

/// `--parquet` in a build without the `parquet` feature.
#[cfg(not(feature = "parquet"))]
fn parquet_io_missing() -> CliError {
    CliError::usage(
        "this pg-model-repo was built without Parquet support: install it with \
         `cargo install --path . --features cli,parquet`",
    )
}
