//! The health check: the database, every table, the round trip and the pool, within
//! pool_timeout, never panicking.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::db::layout::Layout;
use crate::db::pool::{Conn, PgConnection};
use crate::error::{RepoError, Result};
use crate::metrics::ErrorType;
use crate::monitor::{CheckResult, HealthReport, HealthStatus};
use crate::repository::ModelRepository;
use crate::schema::tables;

impl ModelRepository {
    /// Checks the database ("database": a trivial query), every table ("tables"), the round
    /// trip time ("query_latency": Degraded above `slow_query_threshold`) and the pool
    /// ("pool": connections, idle, waiting); on a Citus coordinator also every worker
    /// ("workers": each one's reachability from the coordinator; Unhealthy when one is not). Never panics and never waits longer than
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
        let failed =
            (report.status == HealthStatus::Unhealthy).then(|| ErrorType::other("unhealthy"));
        self.record_timing("health_check", started, failed);
        report
    }

    fn run_checks(&self) -> HealthReport {
        // Leave a tenth of pool_timeout for the probes themselves; the watchdog cuts a
        // connection still waiting on the server at the deadline (a hung server).
        let pool_timeout = self.pool().timeout();
        let budget = pool_timeout.mul_f64(0.9);
        let deadline = Instant::now() + budget;
        let mut checks = BTreeMap::new();
        checks.insert("pool".to_owned(), self.pool_check());
        let (mut conn, database) = match self.probe_database(budget, deadline) {
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
        if self.layout() != Layout::Local {
            checks.insert("workers".to_owned(), workers_check(&mut conn, deadline));
        }
        let threshold = self.config().monitor.slow_query_threshold;
        let slow = latency > threshold;
        checks.insert(
            "query_latency".to_owned(),
            CheckResult {
                ok: !slow,
                detail: format!(
                    "{latency:?} for checkout and a trivial query (threshold {threshold:?})"
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
    fn probe_database(&self, budget: Duration, deadline: Instant) -> Result<(Conn, CheckResult)> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let left = budget.saturating_sub(started.elapsed());
            let mut conn = self.pool().get_within(left)?;
            conn.watch().cut_at(deadline);
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
                    self.pool().note_failure(&mut conn, &error);
                    conn.poison();
                    if attempt == 2 {
                        return Err(error);
                    }
                }
            }
        }
    }

    fn pool_check(&self) -> CheckResult {
        let state = self.pool().state();
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
    let workers_failed = checks.get("workers").is_some_and(|c| !c.ok);
    if failed("database") || failed("tables") || workers_failed {
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
    let left_ms = millis_left(deadline, started);
    let mut sql = format!("BEGIN READ ONLY; SET LOCAL statement_timeout = {left_ms};");
    for table in tables::every_schema_has() {
        sql.push_str(&format!("SELECT 1 FROM {table} LIMIT 1;"));
    }
    sql.push_str("COMMIT");
    match conn.client().batch_execute(&sql) {
        Ok(()) => CheckResult {
            ok: true,
            detail: format!("{} tables readable", tables::every_schema_has().count()),
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

/// On a Citus coordinator: a trivial query on every active worker, through the coordinator's
/// own connections, within what is left of the deadline.
const WORKERS: &str = "SELECT nodename::text, nodeport::int4, success, result
     FROM run_command_on_workers('SELECT 1') ORDER BY nodename, nodeport";

fn workers_check(conn: &mut PgConnection, deadline: Instant) -> CheckResult {
    let started = Instant::now();
    let left_ms = millis_left(deadline, started);
    let probe = |conn: &mut PgConnection| -> Result<(bool, String)> {
        let mut tx = conn.client().transaction()?;
        tx.batch_execute(&format!("SET LOCAL statement_timeout = {left_ms}"))?;
        let rows = tx.query(WORKERS, &[])?;
        let mut reachable = 0;
        let mut failures = Vec::new();
        for row in &rows {
            let (host, port): (String, i32) = (row.try_get(0)?, row.try_get(1)?);
            if row.try_get::<_, bool>(2)? {
                reachable += 1;
            } else {
                failures.push(format!("{host}:{port}: {}", row.try_get::<_, String>(3)?));
            }
        }
        tx.commit()?;
        let mut detail = format!("{reachable} of {} workers reachable", rows.len());
        if !failures.is_empty() {
            detail.push_str(&format!(" ({})", failures.join("; ")));
        }
        Ok((failures.is_empty() && !rows.is_empty(), detail))
    };
    let (ok, detail) = probe(conn).unwrap_or_else(|e| (false, e.to_string()));
    CheckResult {
        ok,
        detail,
        latency: started.elapsed(),
    }
}

/// Milliseconds from `now` to `deadline`, at least 1 (a statement_timeout of 0 is none).
fn millis_left(deadline: Instant, now: Instant) -> u128 {
    deadline.saturating_duration_since(now).as_millis().max(1)
}
