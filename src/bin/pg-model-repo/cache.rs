//! `cache stats|clear|purge`: the prediction cache.

use serde_json::json;

use crate::connect;
use crate::error::{CliError, EXIT_OK};
use crate::output::{self, fields, to_json};
use crate::Global;

#[derive(Debug, clap::Subcommand)]
pub enum CacheCommand {
    /// Entries (active and expired), bytes and access counts.
    Stats,
    /// Delete the entries whose key matches a Redis-style glob (`*`, `?`, `[a-z]`, `\`
    /// escapes); prints how many went.
    Clear(ClearArgs),
    /// Delete every expired entry now (the reaper does it in the background too).
    Purge,
}

#[derive(Debug, clap::Args)]
pub struct ClearArgs {
    /// The glob, e.g. 'user123_*' (quote it in the shell).
    glob: String,
}

pub fn run(global: &Global, command: &CacheCommand) -> Result<i32, CliError> {
    let repo = connect::open(global)?;
    match command {
        CacheCommand::Stats => {
            let stats = repo
                .get_cache_statistics()
                .map_err(|e| CliError::repo("cannot read the cache statistics", e))?;
            output::print(global.format, to_json(&stats), || {
                fields(&[
                    ("entries", stats.total_entries.to_string()),
                    ("active", stats.active_entries.to_string()),
                    ("expired", stats.expired_entries.to_string()),
                    ("accesses", stats.total_access_count.to_string()),
                    ("bytes", output::bytes(stats.total_bytes)),
                ])
            })?;
        }
        CacheCommand::Clear(args) => {
            let removed = repo
                .clear_cache(&args.glob)
                .map_err(|e| CliError::repo(format!("cannot clear {:?}", args.glob), e))?;
            output::print(
                global.format,
                json!({"pattern": args.glob, "removed": removed}),
                || format!("removed {removed} entries matching {:?}", args.glob),
            )?;
        }
        CacheCommand::Purge => {
            let purged = repo
                .purge_expired_cache()
                .map_err(|e| CliError::repo("cannot purge the cache", e))?;
            output::print(global.format, json!({"purged": purged}), || {
                format!("purged {purged} expired entries")
            })?;
        }
    }
    repo.close();
    Ok(EXIT_OK)
}
