//! Monitoring and maintenance: the health check (`health`), storage and embedding statistics
//! (`stats`), VACUUM ANALYZE and the server's own statement statistics (`maintenance`), the
//! per-operation timings (`timings`) and the buffered access counts (`counters`).

pub(crate) mod counters;
mod health;
mod maintenance;
mod stats;
pub(crate) mod timings;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::db::config::MAX_WAIT;
use crate::error::Result;
use crate::validate::duration_within;

/// The monitor's settings (see the setters of `RepositoryConfig`).
#[derive(Clone, Debug)]
pub(crate) struct MonitorSettings {
    /// Whether per-operation timings are recorded.
    pub(crate) enable_metrics: bool,
    /// Operations slower than this log a warning; a slower health probe is Degraded.
    pub(crate) slow_query_threshold: Duration,
}

impl Default for MonitorSettings {
    fn default() -> Self {
        MonitorSettings {
            enable_metrics: true,
            slow_query_threshold: Duration::from_secs(1),
        }
    }
}

impl MonitorSettings {
    pub(crate) fn validate(&self) -> Result<()> {
        duration_within(
            "slow_query_threshold",
            self.slow_query_threshold,
            Duration::ZERO,
            MAX_WAIT,
        )
    }
}

#[allow(unused_imports)] // named in doc links
use crate::repository::ModelRepository;

/// Overall health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum HealthStatus {
    /// Every check passed.
    Healthy,
    /// Reachable and working, but slow or short of connections.
    Degraded,
    /// The database or a table cannot be used.
    Unhealthy,
}

/// The outcome of one check.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    /// Whether the check passed.
    pub ok: bool,
    /// What was found (the reason, when it failed).
    pub detail: String,
    /// How long the check took.
    pub latency: Duration,
}

/// The result of [`ModelRepository::health_check`].
#[derive(Clone, Debug, Serialize)]
pub struct HealthReport {
    /// Overall status.
    pub status: HealthStatus,
    /// Checks by name: "database", "tables", "query_latency", "pool".
    pub checks: BTreeMap<String, CheckResult>,
}

/// Storage use of one model.
#[non_exhaustive]
#[derive(Clone, Debug, Serialize)]
pub struct ModelStats {
    /// The model's name.
    pub model_name: String,
    /// Stored versions, active or soft-deleted.
    pub versions: u64,
    /// Active versions.
    pub active_versions: u64,
    /// Sum of `size_bytes` over all stored versions.
    pub total_bytes: u64,
    /// The newest active version (by save sequence), if any.
    pub latest_version: Option<String>,
    /// Loads recorded over all versions.
    pub load_count: u64,
    /// The most recent recorded load.
    pub last_loaded_at: Option<SystemTime>,
}

/// The result of [`ModelRepository::get_model_storage_stats`].
#[non_exhaustive]
#[derive(Clone, Debug, Serialize)]
pub struct ModelStorageStats {
    /// Per model, by name.
    pub models: Vec<ModelStats>,
    /// Distinct models.
    pub total_models: u64,
    /// Stored versions.
    pub total_versions: u64,
    /// Active versions.
    pub active_versions: u64,
    /// Sum of `size_bytes` over every stored version.
    pub total_bytes: u64,
    /// On-disk size of the table with its TOAST data and indexes.
    pub table_bytes: u64,
}

/// Embeddings of one entity type.
#[non_exhaustive]
#[derive(Clone, Debug, Serialize)]
pub struct EntityTypeStats {
    /// The entity type.
    pub entity_type: String,
    /// Stored vectors.
    pub count: u64,
    /// The type's dimension.
    pub dimension: u32,
    /// Vector bytes (4 × dimension per vector).
    pub total_bytes: u64,
    /// The most recent save.
    pub last_update: Option<SystemTime>,
}

/// The result of [`ModelRepository::get_embeddings_stats`].
#[non_exhaustive]
#[derive(Clone, Debug, Serialize)]
pub struct EmbeddingsStats {
    /// Per entity type, by name.
    pub entity_types: Vec<EntityTypeStats>,
    /// Stored vectors.
    pub total_embeddings: u64,
    /// Vector bytes over all types.
    pub total_bytes: u64,
    /// On-disk size of the table with its indexes.
    pub table_bytes: u64,
}

/// What maintenance did to one table.
#[non_exhaustive]
#[derive(Clone, Debug, Serialize)]
pub struct TableMaintenance {
    /// The table.
    pub table: String,
    /// What ran: "VACUUM (ANALYZE)", or "skipped (not owner)" when this role may not vacuum
    /// the table (then nothing ran).
    pub action: String,
    /// Whether the VACUUM ran.
    pub vacuumed: bool,
    /// Dead tuples the statistics reported before.
    pub dead_tuples_before: u64,
    /// Dead tuples after.
    pub dead_tuples_after: u64,
    /// Total relation size before, in bytes.
    pub bytes_before: u64,
    /// Total relation size after, in bytes.
    pub bytes_after: u64,
    /// Time the VACUUM took.
    pub elapsed: Duration,
}

/// The result of [`ModelRepository::optimize_database`].
#[non_exhaustive]
#[derive(Clone, Debug, Serialize)]
pub struct OptimizeReport {
    /// Per table, in maintenance order.
    pub tables: Vec<TableMaintenance>,
    /// Expired cache rows deleted before vacuuming.
    pub expired_cache_rows_purged: u64,
    /// Leftovers of loads and saves that died midway (older than an hour) removed.
    pub leftovers_removed: u64,
    /// Time the whole run took.
    pub elapsed: Duration,
}

/// One statement from `pg_stat_statements`.
#[non_exhaustive]
#[derive(Clone, Debug, Serialize)]
pub struct StatementStats {
    /// The normalized statement text.
    pub query: String,
    /// Times executed.
    pub calls: u64,
    /// Rows returned or affected.
    pub rows: u64,
    /// Total execution time.
    pub total_time: Duration,
    /// Mean execution time.
    pub mean_time: Duration,
}

/// The result of [`ModelRepository::get_server_query_stats`].
#[non_exhaustive]
#[derive(Clone, Debug, Serialize)]
pub struct ServerQueryStats {
    /// False when `pg_stat_statements` is not installed or not loaded.
    pub available: bool,
    /// Why it is unavailable, or where the figures come from.
    pub detail: String,
    /// The statements touching this repository's tables, by total time, slowest first.
    pub statements: Vec<StatementStats>,
}
