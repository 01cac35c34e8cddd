//! Health checks, storage and embedding statistics, database maintenance (VACUUM ANALYZE) and
//! the server's own statement statistics (pg_stat_statements, where installed).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use postgres::Client;
use serde::Serialize;

use crate::error::{RepoError, Result};
use crate::pool::PgConnection;
use crate::repository::ModelRepository;
use crate::retry::Retry;

/// Every table the repository owns, in the order maintenance visits them.
pub(crate) const TABLES: &[&str] = &[
    "ml_models",
    "model_aliases",
    "model_alias_stack",
    "model_alias_history",
    "training_metrics",
    "embedding_types",
    "embeddings",
    "prediction_cache",
];

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
    /// What ran: "VACUUM (ANALYZE)".
    pub action: String,
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

const MODEL_STATS: &str = "SELECT m.model_name,
        count(*) AS versions,
        count(*) FILTER (WHERE m.is_active) AS active_versions,
        coalesce(sum(m.size_bytes), 0)::bigint AS total_bytes,
        (array_agg(m.version ORDER BY m.save_seq DESC) FILTER (WHERE m.is_active))[1] AS latest_version,
        coalesce(sum(m.load_count), 0)::bigint AS load_count,
        max(m.last_loaded_at) AS last_loaded_at
     FROM ml_models m GROUP BY m.model_name ORDER BY m.model_name";

const EMBEDDING_STATS: &str = "SELECT e.entity_type, count(*) AS n,
        coalesce(t.dimension, max(e.dimension)) AS dimension,
        coalesce(sum(octet_length(e.embeddings)), 0)::bigint AS total_bytes,
        max(e.updated_at) AS last_update
     FROM embeddings e LEFT JOIN embedding_types t ON t.entity_type = e.entity_type
     GROUP BY e.entity_type, t.dimension ORDER BY e.entity_type";

const TABLE_SIZE: &str = "SELECT pg_total_relation_size(to_regclass($1))::bigint";

const DEAD_TUPLES: &str = "SELECT coalesce(n_dead_tup, 0)::bigint,
        pg_total_relation_size(c.oid)::bigint
     FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
     WHERE c.oid = to_regclass($1)";

impl ModelRepository {
    /// Checks the database ("database": a trivial query), every table ("tables"), the round
    /// trip time ("query_latency": Degraded above `slow_query_threshold`) and the pool
    /// ("pool": connections, idle, waiting). Never panics and never waits longer than
    /// `pool_timeout`; with the server down the report is Unhealthy with the reason.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let report = repo.health_check();
    /// println!("{:?}", report.status);
    /// for (name, check) in &report.checks {
    ///     println!("{name}: {} {} ({:?})", check.ok, check.detail, check.latency);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn health_check(&self) -> HealthReport {
        let started = Instant::now();
        let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_checks()))
            .unwrap_or_else(|_| unhealthy("database", "the health check panicked".to_owned()));
        self.inner.timings.record(
            "health_check",
            started.elapsed(),
            report.status != HealthStatus::Unhealthy,
        );
        report
    }

    fn run_checks(&self) -> HealthReport {
        // Leave a tenth of pool_timeout for the probes themselves.
        let budget = self.inner.pool.timeout().mul_f64(0.9);
        let deadline = Instant::now() + self.inner.pool.timeout();
        let mut checks = BTreeMap::new();
        checks.insert("pool".to_owned(), self.pool_check());
        let (mut conn, database) = match self.probe_database(budget) {
            Ok(found) => found,
            Err(e) => {
                let mut report = unhealthy("database", e.to_string());
                report.checks.extend(checks);
                return report;
            }
        };
        let latency = database.latency;
        checks.insert("database".to_owned(), database);
        checks.insert("tables".to_owned(), tables_check(&mut conn, deadline));
        let slow = latency > self.inner.config.slow_query_threshold;
        checks.insert(
            "query_latency".to_owned(),
            CheckResult {
                ok: !slow,
                detail: format!(
                    "{latency:?} for checkout and a trivial query (threshold {:?})",
                    self.inner.config.slow_query_threshold
                ),
                latency,
            },
        );
        HealthReport {
            status: overall_status(&checks),
            checks,
        }
    }

    /// A connection that answered `SELECT 1`, with the check's result. A pooled connection
    /// that died under us (a server restart) is discarded and one fresh attempt is made within
    /// the budget: a stale connection is not an unhealthy database.
    fn probe_database(&self, budget: Duration) -> Result<(crate::pool::Conn, CheckResult)> {
        let started = Instant::now();
        let mut last_error = None;
        for _ in 0..2 {
            let left = budget.saturating_sub(started.elapsed());
            let mut conn = self.inner.pool.get_within(left)?;
            match conn.client().batch_execute("SELECT 1") {
                Ok(()) => {
                    let check = CheckResult {
                        ok: true,
                        detail: "reachable".to_owned(),
                        latency: started.elapsed(),
                    };
                    return Ok((conn, check));
                }
                Err(e) => {
                    let error = RepoError::from(e);
                    self.inner.pool.note_failure(&mut conn, &error);
                    conn.poison();
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("the loop ran"))
    }

    fn pool_check(&self) -> CheckResult {
        let state = self.inner.pool.state();
        let exhausted = state.idle == 0 && state.connections >= state.max_size && state.waiting > 0;
        CheckResult {
            ok: !exhausted,
            detail: format!(
                "connections={} idle={} waiting={} max={}",
                state.connections, state.idle, state.waiting, state.max_size
            ),
            latency: Duration::ZERO,
        }
    }

    /// Per model: versions, active versions, bytes, latest version, loads (this repository's
    /// buffered loads are written first); and totals.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let stats = repo.get_model_storage_stats()?;
    /// println!("{} models, {} bytes", stats.total_models, stats.total_bytes);
    /// # Ok(()) }
    /// ```
    pub fn get_model_storage_stats(&self) -> Result<ModelStorageStats> {
        self.timed("get_model_storage_stats", || {
            // This repository's buffered loads count too.
            let inner = &self.inner;
            crate::repository::flush_access_counts(&inner.pool, &inner.hits, &inner.loads)?;
            self.with_conn("get_model_storage_stats", Retry::Idempotent, |conn| {
                let client = conn.client();
                let models = client
                    .query(MODEL_STATS, &[])?
                    .iter()
                    .map(|r| {
                        Ok(ModelStats {
                            model_name: r.try_get("model_name")?,
                            versions: as_u64(r.try_get("versions")?),
                            active_versions: as_u64(r.try_get("active_versions")?),
                            total_bytes: as_u64(r.try_get("total_bytes")?),
                            latest_version: r.try_get("latest_version")?,
                            load_count: as_u64(r.try_get("load_count")?),
                            last_loaded_at: r.try_get("last_loaded_at")?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(ModelStorageStats {
                    total_models: models.len() as u64,
                    total_versions: models.iter().map(|m| m.versions).sum(),
                    active_versions: models.iter().map(|m| m.active_versions).sum(),
                    total_bytes: models.iter().map(|m| m.total_bytes).sum(),
                    table_bytes: table_size(client, "ml_models")?,
                    models,
                })
            })
        })
    }

    /// Per entity type: count, dimension, vector bytes, last update; and totals.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// for t in repo.get_embeddings_stats()?.entity_types {
    ///     println!("{}: {} x {}", t.entity_type, t.count, t.dimension);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn get_embeddings_stats(&self) -> Result<EmbeddingsStats> {
        self.timed("get_embeddings_stats", || {
            self.with_conn("get_embeddings_stats", Retry::Idempotent, |conn| {
                let client = conn.client();
                let entity_types = client
                    .query(EMBEDDING_STATS, &[])?
                    .iter()
                    .map(|r| {
                        Ok(EntityTypeStats {
                            entity_type: r.try_get("entity_type")?,
                            count: as_u64(r.try_get("n")?),
                            dimension: u32::try_from(r.try_get::<_, i32>("dimension")?)
                                .unwrap_or(0),
                            total_bytes: as_u64(r.try_get("total_bytes")?),
                            last_update: r.try_get("last_update")?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(EmbeddingsStats {
                    total_embeddings: entity_types.iter().map(|t| t.count).sum(),
                    total_bytes: entity_types.iter().map(|t| t.total_bytes).sum(),
                    table_bytes: table_size(client, "embeddings")?,
                    entity_types,
                })
            })
        })
    }

    /// Purges expired cache rows, then runs `VACUUM (ANALYZE)` on every table (outside any
    /// transaction, without the statement timeout), reporting dead tuples and sizes before and
    /// after, and the time each took.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let report = repo.optimize_database()?;
    /// for t in &report.tables {
    ///     println!("{}: {} -> {} dead tuples in {:?}", t.table, t.dead_tuples_before, t.dead_tuples_after, t.elapsed);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn optimize_database(&self) -> Result<OptimizeReport> {
        self.timed("optimize_database", || {
            let started = Instant::now();
            let purged =
                crate::cache::purge_expired(&self.inner.pool, Retry::Idempotent, &|| false)?;
            let session_setup = crate::pool::session_setup_sql(&self.inner.config);
            let tables = self.with_conn("optimize_database", Retry::Idempotent, |conn| {
                conn.client().batch_execute("SET statement_timeout = 0")?;
                let result = vacuum_all(conn);
                // Give the session back as the pool set it up.
                let restore = conn.client().batch_execute(&session_setup);
                if restore.is_err() {
                    conn.poison();
                }
                result
            })?;
            Ok(OptimizeReport {
                tables,
                expired_cache_rows_purged: purged,
                elapsed: started.elapsed(),
            })
        })
    }

    /// The statements touching this repository's tables from `pg_stat_statements`, slowest
    /// first. Where the extension is not installed (or not preloaded) the result says so in
    /// `detail` with `available == false` instead of failing.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let stats = repo.get_server_query_stats()?;
    /// if !stats.available {
    ///     println!("{}", stats.detail);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn get_server_query_stats(&self) -> Result<ServerQueryStats> {
        self.timed("get_server_query_stats", || {
            self.with_conn("get_server_query_stats", Retry::Idempotent, |conn| {
                server_statements(conn.client())
            })
        })
    }
}

fn as_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn table_size(client: &mut Client, table: &str) -> Result<u64> {
    let size: Option<i64> = client.query_one(TABLE_SIZE, &[&table])?.try_get(0)?;
    Ok(size.map_or(0, as_u64))
}

fn unhealthy(check: &str, detail: String) -> HealthReport {
    let mut checks = BTreeMap::new();
    checks.insert(
        check.to_owned(),
        CheckResult {
            ok: false,
            detail,
            latency: Duration::ZERO,
        },
    );
    HealthReport {
        status: HealthStatus::Unhealthy,
        checks,
    }
}

fn overall_status(checks: &BTreeMap<String, CheckResult>) -> HealthStatus {
    let failed = |name: &str| checks.get(name).is_none_or(|c| !c.ok);
    if failed("database") || failed("tables") {
        HealthStatus::Unhealthy
    } else if failed("query_latency") || failed("pool") {
        HealthStatus::Degraded
    } else {
        HealthStatus::Healthy
    }
}

/// Reads one row of every table, within what is left of the deadline.
fn tables_check(conn: &mut PgConnection, deadline: Instant) -> CheckResult {
    let started = Instant::now();
    let left_ms = deadline
        .saturating_duration_since(started)
        .as_millis()
        .max(1);
    let mut sql = format!("BEGIN READ ONLY; SET LOCAL statement_timeout = {left_ms};");
    for table in TABLES {
        sql.push_str(&format!("SELECT 1 FROM {table} LIMIT 1;"));
    }
    sql.push_str("COMMIT");
    match conn.client().batch_execute(&sql) {
        Ok(()) => CheckResult {
            ok: true,
            detail: format!("{} tables readable", TABLES.len()),
            latency: started.elapsed(),
        },
        Err(e) => {
            let _ = conn.client().batch_execute("ROLLBACK");
            CheckResult {
                ok: false,
                detail: RepoError::from(e).to_string(),
                latency: started.elapsed(),
            }
        }
    }
}

fn vacuum_all(conn: &mut PgConnection) -> Result<Vec<TableMaintenance>> {
    let client = conn.client();
    let mut report = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        let (dead_before, bytes_before) = dead_tuples(client, table)?;
        let started = Instant::now();
        client.batch_execute(&format!("VACUUM (ANALYZE) {table}"))?;
        let elapsed = started.elapsed();
        let (dead_after, bytes_after) = dead_tuples(client, table)?;
        report.push(TableMaintenance {
            table: (*table).to_owned(),
            action: "VACUUM (ANALYZE)".to_owned(),
            dead_tuples_before: dead_before,
            dead_tuples_after: dead_after,
            bytes_before,
            bytes_after,
            elapsed,
        });
    }
    Ok(report)
}

fn dead_tuples(client: &mut Client, table: &str) -> Result<(u64, u64)> {
    let row = client.query_one(DEAD_TUPLES, &[&table])?;
    Ok((as_u64(row.try_get(0)?), as_u64(row.try_get(1)?)))
}

fn server_statements(client: &mut Client) -> Result<ServerQueryStats> {
    let schema: Option<String> = client
        .query_opt(
            "SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
             WHERE e.extname = 'pg_stat_statements'",
            &[],
        )?
        .map(|r| r.try_get(0))
        .transpose()?;
    let Some(schema) = schema else {
        return Ok(unavailable(
            "pg_stat_statements is not installed: add it to shared_preload_libraries and run \
             CREATE EXTENSION pg_stat_statements",
        ));
    };
    let sql = format!(
        "SELECT query, calls, rows, total_exec_time, mean_exec_time
         FROM {}.pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND query ~* $1
         ORDER BY total_exec_time DESC LIMIT 25",
        crate::pool::quote_ident(&schema)
    );
    let tables = format!("\\m({})\\M", TABLES.join("|"));
    let rows = match client.query(sql.as_str(), &[&tables]) {
        Ok(rows) => rows,
        // Installed but not preloaded (55000), or not readable by this role.
        Err(e) if e.code().is_some() => {
            return Ok(unavailable(&format!(
                "pg_stat_statements is installed but cannot be read: {}",
                RepoError::from(e)
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let statements = rows
        .iter()
        .map(|r| {
            Ok(StatementStats {
                query: r.try_get(0)?,
                calls: as_u64(r.try_get(1)?),
                rows: as_u64(r.try_get(2)?),
                total_time: Duration::from_secs_f64(r.try_get::<_, f64>(3)?.max(0.0) / 1000.0),
                mean_time: Duration::from_secs_f64(r.try_get::<_, f64>(4)?.max(0.0) / 1000.0),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ServerQueryStats {
        available: true,
        detail: format!("from {schema}.pg_stat_statements"),
        statements,
    })
}

fn unavailable(detail: &str) -> ServerQueryStats {
    ServerQueryStats {
        available: false,
        detail: detail.to_owned(),
        statements: Vec::new(),
    }
}
