//! Maintenance: expired cache rows purged, VACUUM (ANALYZE) of every table with dead tuples
//! and sizes before and after; and the server's statement statistics (pg_stat_statements).

use std::time::{Duration, Instant};

use postgres::Client;

use crate::db::layout::Layout;
use crate::db::pool::{quote_ident, PgConnection};
use crate::db::retry::Retry;
use crate::error::{RepoError, Result};
use crate::monitor::stats::{as_u64, table_facts};
use crate::monitor::{OptimizeReport, ServerQueryStats, StatementStats, TableMaintenance};
use crate::repository::ModelRepository;
use crate::schema::sweep::{sweep, LEFTOVER_AGE};
use crate::schema::tables;

impl ModelRepository {
    /// Purges expired cache rows, then runs `VACUUM (ANALYZE)` on every table (outside any
    /// transaction, without the statement timeout), reporting dead tuples and sizes before and
    /// after, and the time each took. A table this role may not vacuum (an application role
    /// that does not own the tables) is reported as `"skipped (not owner)"` with
    /// `vacuumed == false`, where PostgreSQL would only have warned; the purge runs anyway.
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
        self.timed_bulk("optimize_database", |call| {
            let started = Instant::now();
            let purged = self.purge_expired_cache()?;
            let leftovers = sweep(
                call.pool(),
                self.leftovers(),
                LEFTOVER_AGE,
                Retry::Idempotent,
            )?;
            let session_setup = call.pool().session_setup();
            let tables = call.with_conn(Retry::Idempotent, |conn| {
                conn.unbounded_client()
                    .batch_execute("SET statement_timeout = 0")?;
                let result = vacuum_all(conn, self.layout());
                // Give the session back as the pool set it up.
                let restore = conn.client().batch_execute(session_setup);
                if restore.is_err() {
                    conn.poison();
                }
                result
            })?;
            Ok(OptimizeReport {
                tables,
                expired_cache_rows_purged: purged,
                leftovers_removed: leftovers,
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
        self.timed("get_server_query_stats", |call| {
            call.with_conn(Retry::Idempotent, |conn| server_statements(conn.client()))
        })
    }
}

/// Who may VACUUM a table before PostgreSQL 17: its owner (or a member of the owning role),
/// a superuser, or the database's owner.
const MAY_VACUUM: &str = "SELECT pg_has_role(c.relowner, 'USAGE')
        OR pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE')
     FROM pg_class c WHERE c.oid = to_regclass($1)";

/// From PostgreSQL 17 on: the MAINTAIN privilege (owners have it), or the database's owner.
const MAY_VACUUM_17: &str = "SELECT has_table_privilege(c.oid, 'MAINTAIN')
        OR pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE')
     FROM pg_class c WHERE c.oid = to_regclass($1)";

/// What the report says of a table this role may not vacuum: PostgreSQL would only warn and
/// skip it ("only table or database owner can vacuum it").
pub(crate) const SKIPPED_NOT_OWNER: &str = "skipped (not owner)";

fn vacuum_all(conn: &mut PgConnection, layout: Layout) -> Result<Vec<TableMaintenance>> {
    let client = conn.client();
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])?
        .try_get(0)?;
    let may_vacuum = if version >= 170_000 {
        MAY_VACUUM_17
    } else {
        MAY_VACUUM
    };
    let mut report = Vec::with_capacity(tables::every_schema_has().count());
    let mut skipped = Vec::new();
    for table in tables::every_schema_has() {
        let allowed: Option<bool> = client
            .query_opt(may_vacuum, &[&table])?
            .map(|row| row.try_get(0))
            .transpose()?;
        let (dead_before, bytes_before) = table_facts(client, layout, table)?;
        let started = Instant::now();
        let vacuumed = allowed == Some(true);
        if vacuumed {
            client.batch_execute(&format!("VACUUM (ANALYZE) {table}"))?;
        } else {
            skipped.push(table);
        }
        let elapsed = started.elapsed();
        let (dead_after, bytes_after) = table_facts(client, layout, table)?;
        report.push(TableMaintenance {
            table: table.to_owned(),
            action: if vacuumed {
                "VACUUM (ANALYZE)"
            } else {
                SKIPPED_NOT_OWNER
            }
            .to_owned(),
            vacuumed,
            dead_tuples_before: dead_before,
            dead_tuples_after: dead_after,
            bytes_before,
            bytes_after,
            elapsed,
        });
    }
    if !skipped.is_empty() {
        log::info!(
            "pg-model-repo: optimize_database skipped VACUUM of {} (this role does not own them; \
             run it as the owner)",
            skipped.join(", ")
        );
    }
    Ok(report)
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
        quote_ident(&schema)
    );
    let tables = format!(
        "\\m({})\\M",
        tables::every_schema_has().collect::<Vec<_>>().join("|")
    );
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
