//! Embedded, numbered migrations from `sql/`, applied under a per-schema advisory lock, each in
//! one transaction with its history row; an edited, already-applied file is refused.

use postgres::Client;
use sha2::{Digest, Sha256};

use crate::db::config::{RepositoryConfig, VectorStorage, PGVECTOR_INSTALL_HINT};
use crate::db::error::{RepoError, Result};
use crate::db::hex_sha256;
use crate::db::pool::{connect, quote_ident};

/// One numbered DDL file.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
    when: When,
}

/// When a migration applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    /// Always, in order.
    Always,
    /// Only when the repository's vectors are to be stored in pgvector's `vector` type (see
    /// [`VectorStorage`]): a new schema where pgvector is available, or one whose owner asks
    /// for the conversion.
    VectorStorage,
}

/// Every migration, in order. New files go at the end with the next number.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "V001__init.sql",
        sql: include_str!("../../sql/V001__init.sql"),
        when: When::Always,
    },
    Migration {
        version: 4,
        name: "V004__embeddings_per_type.sql",
        sql: include_str!("../../sql/V004__embeddings_per_type.sql"),
        when: When::Always,
    },
    Migration {
        version: 6,
        name: "V006__vector_storage.sql",
        sql: include_str!("../../sql/V006__vector_storage.sql"),
        when: When::VectorStorage,
    },
];

/// Is pgvector installed in this database, or can it be created (its files are on the
/// server)?
const PGVECTOR_AVAILABLE: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')";

/// Has the schema stored any vector yet (quarantined ones included)?
const HAS_VECTORS: &str = "SELECT EXISTS (SELECT 1 FROM embeddings) \
     OR EXISTS (SELECT 1 FROM embeddings_quarantine)";

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
    let mut client = connect(config)?;
    // DDL may take long on a big table; only lock waits stay bounded.
    client.batch_execute("SET statement_timeout = 0")?;
    let key = lock_key(&config.schema);
    client.execute("SELECT pg_advisory_lock($1)", &[&key])?;
    let outcome = apply_pending(&mut client, &config.schema, config.vector_storage);
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&key]);
    outcome?;
    unlock?;
    Ok(())
}

/// The advisory lock that serializes migrations of one schema (and its creation).
fn lock_key(schema: &str) -> i64 {
    let digest = Sha256::digest(format!("pg-model-repo:migrate:{schema}"));
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

fn apply_pending(client: &mut Client, schema: &str, storage: VectorStorage) -> Result<()> {
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
        match (existing, migration.when) {
            (Some(row), When::Always) => {
                check_unchanged(migration, &checksum, row.try_get("checksum")?)?
            }
            (Some(row), When::VectorStorage) => {
                check_unchanged(migration, &checksum, row.try_get("checksum")?)?;
                if storage == VectorStorage::Bytea {
                    log::warn!(
                        "pg-model-repo: schema {schema} stores vectors in pgvector's vector type \
                         (converted earlier); vector_storage(Bytea) cannot turn that back"
                    );
                }
            }
            (None, When::Always) => apply(client, migration, &checksum)?,
            (None, When::VectorStorage) => {
                apply_vector_storage(client, migration, &checksum, schema, storage)?
            }
        }
    }
    Ok(())
}

/// Applies the conversion to pgvector's `vector` type when the setting asks for it: always
/// for `Pgvector` (an error without pgvector), for `Auto` only while the schema has no
/// vectors and pgvector is there (a failure to create the extension, such as a role that may
/// not, leaves BYTEA with a warning).
fn apply_vector_storage(
    client: &mut Client,
    migration: &Migration,
    checksum: &str,
    schema: &str,
    storage: VectorStorage,
) -> Result<()> {
    if storage == VectorStorage::Bytea {
        log::debug!(
            "pg-model-repo: schema {schema} stores vectors as BYTEA (vector_storage(Bytea))"
        );
        return Ok(());
    }
    let available: bool = client.query_one(PGVECTOR_AVAILABLE, &[])?.try_get(0)?;
    if storage == VectorStorage::Pgvector {
        if !available {
            return Err(RepoError::invalid(format!(
                "vector_storage(Pgvector), but the server has no pgvector extension. {}",
                PGVECTOR_INSTALL_HINT
            )));
        }
        log::info!(
            "pg-model-repo: converting the vectors of schema {schema} to pgvector's vector type \
             (the embeddings table is rewritten under an exclusive lock)"
        );
        return apply(client, migration, checksum);
    }
    if !available {
        log::debug!(
            "pg-model-repo: no pgvector on the server; schema {schema} stores vectors as BYTEA"
        );
        return Ok(());
    }
    let has_vectors: bool = client.query_one(HAS_VECTORS, &[])?.try_get(0)?;
    if has_vectors {
        log::info!(
            "pg-model-repo: schema {schema} stores its vectors as BYTEA although pgvector is \
             available; to convert them (a rewrite under an exclusive lock), run \
             ModelRepository::migrate with vector_storage(VectorStorage::Pgvector)"
        );
        return Ok(());
    }
    match apply(client, migration, checksum) {
        Ok(()) => Ok(()),
        // Not allowed to create the extension (it needs a superuser), or its files are
        // incomplete: stay on BYTEA. Anything else is a real failure.
        Err(e)
            if matches!(
                e.code().map(|c| c.code()),
                Some("42501" | "58P01" | "0A000")
            ) =>
        {
            log::warn!(
                "pg-model-repo: schema {schema} stores vectors as BYTEA: pgvector could not be \
                 set up ({e}); a superuser can run: CREATE SCHEMA IF NOT EXISTS pgvector; \
                 CREATE EXTENSION IF NOT EXISTS vector SCHEMA pgvector"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
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
    let latest = MIGRATIONS
        .iter()
        .filter(|m| m.when == When::Always)
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    let row = client
        .query_opt(
            "SELECT max(version) FROM model_repo_migrations WHERE version = ANY($1)",
            &[&MIGRATIONS
                .iter()
                .filter(|m| m.when == When::Always)
                .map(|m| m.version)
                .collect::<Vec<i32>>()],
        )
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
