//! `health`, `stats` and `optimize`.

use std::collections::BTreeMap;
use std::time::Duration;

use pg_model_repo::HealthStatus;
use serde_json::json;

use crate::connect::{self, scrub};
use crate::error::{CliError, EXIT_DEGRADED, EXIT_OK, EXIT_UNHEALTHY};
use crate::output::{self, table, to_json};
use crate::Global;

/// Exit 0 when healthy, 3 when degraded (slow, but working), 4 when unhealthy or unreachable.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// Query latency (checkout and a trivial query) above which the repository counts as
    /// degraded, in milliseconds [default: the library's slow-query threshold, 1000].
    #[arg(long, value_name = "MS")]
    degraded_above_ms: Option<u64>,
}

/// Per model and per entity type: counts, bytes, latest version, last update.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {}

/// Runs VACUUM ANALYZE on every table of the repository and purges expired cache entries;
/// prints what was done to each table and how long it took.
#[derive(Debug, clap::Args)]
pub struct OptimizeArgs {}

pub fn health(global: &Global, args: &HealthArgs) -> Result<i32, CliError> {
    let opened = connect::open_adjusted(global, |config| match args.degraded_above_ms {
        Some(ms) => config.slow_query_threshold(Duration::from_millis(ms)),
        None => config,
    });
    let (status, checks) = match opened {
        Ok(repo) => {
            let report = repo.health_check();
            repo.close();
            let checks: BTreeMap<String, (bool, String, Duration)> = report
                .checks
                .into_iter()
                .map(|(name, c)| (name, (c.ok, scrub(&c.detail), c.latency)))
                .collect();
            (report.status, checks)
        }
        Err(crate::error::CliError::Usage(m)) => return Err(CliError::Usage(m)),
        Err(e) => {
            let detail = match e {
                CliError::Failed(m) | CliError::Usage(m) => scrub(&m),
            };
            let checks = [("database".to_owned(), (false, detail, Duration::ZERO))].into();
            (HealthStatus::Unhealthy, checks)
        }
    };
    let (word, code) = match status {
        HealthStatus::Healthy => ("healthy", EXIT_OK),
        HealthStatus::Degraded => ("degraded", EXIT_DEGRADED),
        HealthStatus::Unhealthy => ("unhealthy", EXIT_UNHEALTHY),
    };
    let json_checks: serde_json::Map<String, serde_json::Value> = checks
        .iter()
        .map(|(name, (ok, detail, latency))| {
            (
                name.clone(),
                json!({"ok": ok, "detail": detail, "latency": latency.as_secs_f64()}),
            )
        })
        .collect();
    output::print(
        global.format,
        json!({"status": word, "exit_code": code, "checks": json_checks}),
        || {
            let rows: Vec<Vec<String>> = checks
                .iter()
                .map(|(name, (ok, detail, latency))| {
                    vec![
                        name.clone(),
                        if *ok { "ok" } else { "FAIL" }.to_owned(),
                        output::duration(*latency),
                        detail.clone(),
                    ]
                })
                .collect();
            format!(
                "status: {word}\n{}",
                table(&["CHECK", "RESULT", "LATENCY", "DETAIL"], &rows)
            )
        },
    )?;
    Ok(code)
}

pub fn stats(global: &Global, _args: &StatsArgs) -> Result<i32, CliError> {
    let repo = connect::open(global)?;
    let models = repo
        .get_model_storage_stats()
        .map_err(|e| CliError::repo("cannot read the model statistics", e))?;
    let embeddings = repo
        .get_embeddings_stats()
        .map_err(|e| CliError::repo("cannot read the embedding statistics", e))?;
    let cache = repo
        .get_cache_statistics()
        .map_err(|e| CliError::repo("cannot read the cache statistics", e))?;
    repo.close();
    output::print(
        global.format,
        json!({"models": to_json(&models), "embeddings": to_json(&embeddings),
               "cache": to_json(&cache)}),
        || {
            let model_rows: Vec<Vec<String>> = models
                .models
                .iter()
                .map(|m| {
                    vec![
                        m.model_name.clone(),
                        m.active_versions.to_string(),
                        m.versions.to_string(),
                        output::bytes(m.total_bytes),
                        m.latest_version.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            let type_rows: Vec<Vec<String>> = embeddings
                .entity_types
                .iter()
                .map(|t| {
                    vec![
                        t.entity_type.clone(),
                        t.count.to_string(),
                        t.dimension.to_string(),
                        output::bytes(t.total_bytes),
                        t.last_update.map(output::time).unwrap_or_default(),
                    ]
                })
                .collect();
            format!(
                "models: {} ({} active versions, {}; tables {})\n{}\n\
                 embeddings: {} vectors ({}; tables {})\n{}\n\
                 cache: {} entries ({} active, {} expired, {})\n",
                models.total_models,
                models.active_versions,
                output::bytes(models.total_bytes),
                output::bytes(models.table_bytes),
                table(
                    &["MODEL", "ACTIVE", "VERSIONS", "BYTES", "LATEST"],
                    &model_rows
                ),
                embeddings.total_embeddings,
                output::bytes(embeddings.total_bytes),
                output::bytes(embeddings.table_bytes),
                table(
                    &["TYPE", "COUNT", "DIMENSION", "BYTES", "LAST UPDATE"],
                    &type_rows
                ),
                cache.total_entries,
                cache.active_entries,
                cache.expired_entries,
                output::bytes(cache.total_bytes),
            )
        },
    )?;
    Ok(EXIT_OK)
}

pub fn optimize(global: &Global, _args: &OptimizeArgs) -> Result<i32, CliError> {
    let repo = connect::open(global)?;
    let spinner = crate::progress::spinner(global.quiet, "VACUUM ANALYZE");
    let report = repo.optimize_database();
    spinner.finish_and_clear();
    let report = report.map_err(|e| CliError::repo("optimize failed", e))?;
    repo.close();
    output::print(global.format, to_json(&report), || {
        let rows: Vec<Vec<String>> = report
            .tables
            .iter()
            .map(|t| {
                vec![
                    t.table.clone(),
                    t.action.clone(),
                    t.dead_tuples_before.to_string(),
                    t.dead_tuples_after.to_string(),
                    output::bytes(t.bytes_after),
                    output::duration(t.elapsed),
                ]
            })
            .collect();
        format!(
            "{}expired cache entries purged: {}\nleftovers removed: {}\ntook {}\n",
            table(
                &[
                    "TABLE",
                    "ACTION",
                    "DEAD BEFORE",
                    "DEAD AFTER",
                    "SIZE",
                    "TOOK"
                ],
                &rows
            ),
            report.expired_cache_rows_purged,
            report.leftovers_removed,
            output::duration(report.elapsed)
        )
    })?;
    Ok(EXIT_OK)
}
