//! Embedded, numbered migrations from `sql/`, applied under a per-schema advisory lock, each in
//! one transaction with its history row; an edited, already-applied file is refused.

use postgres::Client;
use sha2::{Digest, Sha256};

use std::time::Duration;

use crate::db::config::RepositoryConfig;
use crate::db::deadline::STATEMENT_GRACE;
use crate::db::error::{RepoError, Result};
use crate::db::hex_sha256;
use crate::db::pool::{connect, quote_ident};

/// One numbered DDL file.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in order. New files go at the end with the next number.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "V001__init.sql",
    sql: include_str!("../../sql/V001__init.sql"),
}];

const CREATE_HISTORY: &str = "CREATE TABLE IF NOT EXISTS model_repo_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())";

const SELECT_APPLIED: &str = "SELECT version, name, checksum FROM model_repo_migrations";

const INSERT_APPLIED: &str =
    "INSERT INTO model_repo_migrations (version, name, checksum) VALUES ($1, $2, $3)";

/// Creates the schema if absent and applies every pending migration. Safe when several
/// processes run it at once: they queue on the schema's advisory lock, and the later ones find
/// nothing left to do.
pub(crate) fn run(config: &RepositoryConfig) -> Result<()> {
    config.validate()?;
    let mut conn = connect(config)?;
    // Waiting for another process's migration is bounded by pool_timeout (server-side, and
    // by the watchdog should the server hang), never by query_timeout: a migration may well
    // take longer than one statement should.
    let wait = config.pool_timeout;
    conn.watch().set_bound(
        config
            .stream_idle_timeout
            .max(wait.saturating_add(STATEMENT_GRACE)),
    );
    let client = conn.client();
    // DDL may take long on a big table; only lock waits stay bounded.
    client.batch_execute("SET statement_timeout = 0")?;
    let key = lock_key(&config.schema);
    client.batch_execute(&format!("SET lock_timeout = {}", wait.as_millis().max(1)))?;
    client
        .execute(LOCK, &[&key])
        .map_err(|e| waited_for_migration(e.into(), &config.schema, wait))?;
    // The DDL's own lock waits (on tables applications use) stay bounded by query_timeout.
    let outcome = client
        .batch_execute(&format!(
            "SET lock_timeout = {}",
            config.query_timeout.as_millis().max(1)
        ))
        .map_err(RepoError::from)
        .and_then(|()| apply_pending(client, &config.schema));
    let unlock = client.execute(UNLOCK, &[&key]);
    outcome?;
    unlock?;
    Ok(())
}

const LOCK: &str = "SELECT pg_advisory_lock($1)";
const UNLOCK: &str = "SELECT pg_advisory_unlock($1)";

/// A lock wait past pool_timeout, said as what it is.
fn waited_for_migration(error: RepoError, schema: &str, wait: Duration) -> RepoError {
    match error {
        RepoError::Timeout(m) => RepoError::Timeout(format!(
            "waited pool_timeout ({wait:?}) for another process's migration of schema \
             {schema:?}: {m}"
        )),
        other => other,
    }
}

/// The advisory lock that serializes migrations of one schema (and its creation).
fn lock_key(schema: &str) -> i64 {
    let digest = Sha256::digest(format!("pg-model-repo:migrate:{schema}"));
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

fn apply_pending(client: &mut Client, schema: &str) -> Result<()> {
    client.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}; {CREATE_HISTORY}",
        schema = quote_ident(schema)
    ))?;
    let applied = client.query(SELECT_APPLIED, &[])?;
    for migration in MIGRATIONS {
        let checksum = hex_sha256(migration.sql.as_bytes());
        let existing = applied
            .iter()
            .find(|row| row.try_get::<_, i32>("version").ok() == Some(migration.version));
        match existing {
            Some(row) => check_unchanged(migration, &checksum, row.try_get("checksum")?)?,
            None => apply(client, migration, &checksum)?,
        }
    }
    Ok(())
}

fn check_unchanged(migration: &Migration, checksum: &str, recorded: &str) -> Result<()> {
    if recorded == checksum {
        return Ok(());
    }
    Err(RepoError::Conflict(format!(
        "migration {} was edited after it was applied (recorded checksum {recorded}, file {checksum})",
        migration.name
    )))
}

fn apply(client: &mut Client, migration: &Migration, checksum: &str) -> Result<()> {
    log::info!("pg-model-repo: applying migration {}", migration.name);
    let mut tx = client.transaction()?;
    tx.batch_execute(migration.sql)?;
    tx.execute(
        INSERT_APPLIED,
        &[&migration.version, &migration.name, &checksum],
    )?;
    tx.commit()?;
    Ok(())
}

/// True when the schema holds every table this version of the crate needs (for
/// `auto_migrate(false)`, which must not run DDL but should fail clearly on a missing schema).
pub(crate) fn check_applied(client: &mut Client) -> Result<()> {
    let latest = MIGRATIONS.last().map_or(0, |m| m.version);
    let row = client
        .query_opt("SELECT max(version) FROM model_repo_migrations", &[])
        .map_err(|e| match e.code().map(|c| c.code()) {
            Some("42P01") => RepoError::NotFound(
                "the schema has no pg-model-repo tables; run ModelRepository::migrate as its owner"
                    .to_owned(),
            ),
            _ => e.into(),
        })?;
    let applied: Option<i32> = match row {
        Some(r) => r.try_get(0)?,
        None => None,
    };
    match applied {
        Some(v) if v >= latest => Ok(()),
        other => Err(RepoError::NotFound(format!(
            "the schema is at migration {} but this library needs {latest}; run ModelRepository::migrate",
            other.unwrap_or(0)
        ))),
    }
}
