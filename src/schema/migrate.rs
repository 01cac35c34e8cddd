//! Embedded, numbered migrations from `sql/`: every pending one applied under a per-schema
//! advisory lock, in one transaction with its history row; an edited, already-applied file is
//! refused. A schema the seed's Python code built is taken over first (`seed_takeover`).
//!
//! Each file ends with a record section that writes its own history row, so that the files
//! run by hand with `psql` leave a schema the library recognises. A file's checksum covers
//! its statements above that section, without comment-only and blank lines: comments can be
//! corrected without refusing databases that applied the file.

use std::collections::HashMap;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, GenericClient, Transaction};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::db::config::ConnectionConfig;
use crate::db::deadline::STATEMENT_GRACE;
use crate::db::hex_sha256;
use crate::db::layout::Layout;
use crate::db::pool::{connect, quote_ident};
use crate::error::{RepoError, Result};
use crate::schema::citus;
use crate::schema::seed_takeover::{self, SeedTakeoverReport};
use crate::schema::settings::{CitusMode, MigrationSettings, VectorStorage, PGVECTOR_INSTALL_HINT};

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

/// Every migration, in order. New files go at the end with the next number, and end with
/// their record section (see [`record_section`]; a unit test prints the one to paste).
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "V001__init.sql",
        sql: include_str!("../../sql/V001__init.sql"),
        when: When::Always,
    },
    Migration {
        version: 2,
        name: "V002__resave_recomputes_checksum.sql",
        sql: include_str!("../../sql/V002__resave_recomputes_checksum.sql"),
        when: When::Always,
    },
    Migration {
        version: 4,
        name: "V004__embeddings_per_type.sql",
        sql: include_str!("../../sql/V004__embeddings_per_type.sql"),
        when: When::Always,
    },
    Migration {
        version: 5,
        name: "V005__model_chunks.sql",
        sql: include_str!("../../sql/V005__model_chunks.sql"),
        when: When::Always,
    },
    Migration {
        version: 6,
        name: "V006__vector_storage.sql",
        sql: include_str!("../../sql/optional/V006__vector_storage.sql"),
        when: When::VectorStorage,
    },
    Migration {
        version: 7,
        name: "V007__citus_ready.sql",
        sql: include_str!("../../sql/V007__citus_ready.sql"),
        when: When::Always,
    },
    Migration {
        version: 8,
        name: "V008__fresh_storage_loads.sql",
        sql: include_str!("../../sql/V008__fresh_storage_loads.sql"),
        when: When::Always,
    },
    Migration {
        version: 9,
        name: "V009__models_for_every_client.sql",
        sql: include_str!("../../sql/V009__models_for_every_client.sql"),
        when: When::Always,
    },
    Migration {
        version: 10,
        name: "V010__half_size_vectors.sql",
        sql: include_str!("../../sql/V010__half_size_vectors.sql"),
        when: When::Always,
    },
    Migration {
        version: 11,
        name: "V011__carry_over_by_key.sql",
        sql: include_str!("../../sql/V011__carry_over_by_key.sql"),
        when: When::Always,
    },
    Migration {
        version: 12,
        name: "V012__load_begin_waits_its_turn_on_citus.sql",
        sql: include_str!("../../sql/V012__load_begin_waits_its_turn_on_citus.sql"),
        when: When::Always,
    },
];

/// The migration that gives each type a precision. Converting a schema to pgvector (V006,
/// which redefines the storage functions) after it was applied runs its statements again,
/// and those of every later migration applied already (they redefine some of V010's
/// functions in turn), in order.
const HALF_SIZE_VECTORS: usize = position_of(10);

/// The index in [`MIGRATIONS`] of the migration numbered `version` (at compile time).
const fn position_of(version: i32) -> usize {
    let mut i = 0;
    while i < MIGRATIONS.len() {
        if MIGRATIONS[i].version == version {
            return i;
        }
        i += 1;
    }
    panic!("no migration has this number")
}

/// Has the schema stored any vector yet (quarantined ones included)?
const HAS_VECTORS: &str = "SELECT EXISTS (SELECT 1 FROM embeddings LIMIT 1) \
     OR EXISTS (SELECT 1 FROM embeddings_quarantine LIMIT 1)";

/// Is pgvector installed in this database, or can it be created (its files are on the
/// server)?
const PGVECTOR_AVAILABLE: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')";

/// Checksums that earlier releases recorded, when a checksum hashed a file's whole text.
/// Databases migrated then hold exactly the statements of today's file (only comments and the
/// record section were added since: that text's statements hash to today's checksum), so these
/// still count as unchanged.
const EARLIER_CHECKSUMS: &[(i32, &str)] = &[
    (
        1,
        "4d2ae7a045b6ef507878b1cb7212013c6854f904d41642ecf1536d06dcc0e087",
    ),
    (
        4,
        "6fb5f9a5c422ca867083f426b1c7d80691939eb12bfaf4cba26eb91ea6d010ff",
    ),
];

/// The first line of every file's record section: the checksum covers what comes before.
const RECORD_MARKER: &str = "-- pg-model-repo: record this migration";

const CREATE_HISTORY: &str = "CREATE TABLE IF NOT EXISTS model_repo_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

const SELECT_APPLIED: &str = "SELECT version, checksum FROM model_repo_migrations";

/// A file run by the library records itself in its record section; this keeps the row if
/// the section wrote it.
const INSERT_APPLIED: &str = "INSERT INTO model_repo_migrations (version, name, checksum)
     VALUES ($1, $2, $3) ON CONFLICT (version) DO NOTHING";

/// What one run of the migrations did.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MigrationReport {
    /// The files applied by this run, in order (empty when the schema was up to date).
    pub applied: Vec<String>,
    /// What taking over a schema built by the seed's Python code did, when this run did it.
    pub seed_takeover: Option<SeedTakeoverReport>,
    /// How this run distributed the schema on a Citus coordinator (`"row"` or `"schema"`),
    /// when it did (see [`CitusMode`](crate::CitusMode)).
    pub distributed: Option<String>,
}

/// What a migration run works on: the connection (with the schema's name) and what the schema
/// should be. Its settings were checked by the caller.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) connection: &'a ConnectionConfig,
    pub(crate) settings: &'a MigrationSettings,
}

/// Creates the schema if absent and applies every pending migration in one transaction (a
/// failure changes nothing). When nothing is pending it runs no DDL and takes no lock, so an
/// application role without DDL rights can open a migrated schema. Safe when several
/// processes run it at once: they queue on the schema's advisory lock, and the later ones find
/// nothing left to do.
pub(crate) fn apply_migrations(config: &Target<'_>) -> Result<MigrationReport> {
    let mut conn = connect(config.connection)?;
    if pending(conn.client(), config.settings.vector_storage)?.is_empty()
        && !undistributed(conn.client(), config)?
    {
        return Ok(MigrationReport::default());
    }
    // Waiting for another process's migration is bounded by pool_timeout (server-side, and
    // by the watchdog should the server hang), never by query_timeout: a migration may well
    // take longer than one statement should.
    let wait = config.connection.pool_timeout;
    conn.watch().set_bound(
        config
            .connection
            .stream_idle_timeout
            .max(wait.saturating_add(STATEMENT_GRACE)),
    );
    let client = conn.client();
    // DDL may take long on a big table; only lock waits stay bounded.
    client.batch_execute("SET statement_timeout = 0")?;
    let key = lock_key(&config.connection.schema);
    client.batch_execute(&format!("SET lock_timeout = {}", wait.as_millis().max(1)))?;
    client
        .execute(LOCK, &[&key])
        .map_err(|e| waited_for_migration(e.into(), &config.connection.schema, wait))?;
    // The DDL's own lock waits (on tables applications use) stay bounded by query_timeout.
    let outcome = client
        .batch_execute(&format!(
            "SET lock_timeout = {}",
            config.connection.query_timeout.as_millis().max(1)
        ))
        .map_err(RepoError::from)
        .and_then(|()| apply_with_retries(client, config, wait));
    let unlock = client.execute(UNLOCK, &[&key]);
    let report = outcome.map_err(|e| needs_owner(e, &config.connection.schema))?;
    unlock?;
    log_report(&config.connection.schema, &report);
    Ok(report)
}

/// Whether the database has Citus and the schema's tables are not yet distributed as the
/// config asks (an error when it asks for Citus on a database without it).
fn undistributed(client: &mut Client, config: &Target<'_>) -> Result<bool> {
    let found = citus::inspect(client, &config.connection.schema)?;
    let layout = citus::layout(config.settings.citus, &found, &config.connection.schema)?;
    Ok(citus::incomplete(layout, &found))
}

const LOCK: &str = "SELECT pg_advisory_lock($1)";
const UNLOCK: &str = "SELECT pg_advisory_unlock($1)";

/// A lock wait past pool_timeout, said as what it is.
fn waited_for_migration(error: RepoError, schema: &str, wait: Duration) -> RepoError {
    match error {
        RepoError::Timeout(_) => error.with_context(format_args!(
            "waited pool_timeout ({wait:?}) for another process's migration of schema {schema:?}"
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

/// The migrations not yet recorded in the schema that apply to it, read without DDL or
/// locks. A recorded migration whose file has changed since is `Conflict`. The optional
/// conversion to pgvector's type is pending where `storage` asks for it (`Pgvector`), or for
/// a new schema under `Auto` (it then checks whether pgvector is there as it applies); an
/// existing BYTEA schema never converts because a package appeared.
fn pending<C: GenericClient>(
    client: &mut C,
    storage: VectorStorage,
) -> Result<Vec<&'static Migration>> {
    let applies = |m: &&Migration, new_schema: bool| match m.when {
        When::Always => true,
        When::VectorStorage => match storage {
            VectorStorage::Pgvector => true,
            VectorStorage::Auto => new_schema,
            VectorStorage::Bytea => false,
        },
    };
    let rows = match client.query(SELECT_APPLIED, &[]) {
        Ok(rows) => rows,
        // No history table (or no schema): everything is pending.
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
            return Ok(MIGRATIONS.iter().filter(|m| applies(m, true)).collect())
        }
        Err(e) => return Err(e.into()),
    };
    let new_schema = rows.is_empty();
    let mut recorded = HashMap::with_capacity(rows.len());
    for row in &rows {
        recorded.insert(
            row.try_get::<_, i32>("version")?,
            row.try_get::<_, String>("checksum")?,
        );
    }
    let mut pending = Vec::new();
    for migration in MIGRATIONS {
        match recorded.get(&migration.version) {
            Some(checksum) => check_unchanged(migration, checksum)?,
            None if applies(&migration, new_schema) => pending.push(migration),
            None => {}
        }
    }
    Ok(pending)
}

fn check_unchanged(migration: &Migration, recorded: &str) -> Result<()> {
    let checksum = checksum(migration.sql);
    let earlier = EARLIER_CHECKSUMS
        .iter()
        .any(|(v, c)| *v == migration.version && *c == recorded);
    if recorded == checksum || earlier {
        return Ok(());
    }
    Err(RepoError::conflict(format!(
        "migration {} was edited after it was applied (recorded checksum {recorded}, file {checksum})",
        migration.name
    )))
}

/// What a migration's checksum covers: its lines above the record section, without blank
/// lines and lines that are only a comment, each without trailing blanks.
fn checksum(sql: &str) -> String {
    let body = sql.find(RECORD_MARKER).map_or(sql, |at| &sql[..at]);
    let statements: Vec<&str> = body
        .lines()
        .map(str::trim_end)
        .filter(|line| {
            let line = line.trim_start();
            !line.is_empty() && !line.starts_with("--")
        })
        .collect();
    hex_sha256(statements.join("\n").as_bytes())
}

/// How many times a migration that lost a deadlock is run again.
const DEADLOCK_ATTEMPTS: u32 = 4;

/// [`apply_pending`], run again (it is one transaction, rolled back whole) when it lost a
/// deadlock or a serialization failure: on a Citus coordinator DDL takes locks across the
/// database (Citus's metadata, its local tables), so another session's DDL can deadlock with
/// a migration that touches nothing of it.
fn apply_with_retries(
    client: &mut Client,
    config: &Target<'_>,
    wait: Duration,
) -> Result<MigrationReport> {
    let mut attempt = 1;
    loop {
        match apply_pending(client, config, wait) {
            Err(e)
                if attempt < DEADLOCK_ATTEMPTS
                    && matches!(e.code().map(|c| c.code()), Some("40P01" | "40001")) =>
            {
                log::warn!(
                    "pg-model-repo: the migration of schema {} lost a deadlock (attempt \
                     {attempt} of {DEADLOCK_ATTEMPTS}); running it again: {e}",
                    config.connection.schema
                );
                std::thread::sleep(Duration::from_millis(
                    50 * u64::from(attempt) + fastrand::u64(0..50),
                ));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// `wait` bounds the waits for the database-wide locks other repositories' first opens take
/// (the optional conversion's extension lock; on Citus, the distribution lock, taken first),
/// as it bounds the wait for this schema's migration lock.
fn apply_pending(
    client: &mut Client,
    config: &Target<'_>,
    wait: Duration,
) -> Result<MigrationReport> {
    let schema = config.connection.schema.as_str();
    let storage = config.settings.vector_storage;
    let mut tx = client.transaction()?;
    citus::take_distribution_lock(&mut tx, wait)?;
    let (layout, found) = create_schema(&mut tx, schema, config.settings.citus)?;
    let pending = pending(&mut tx, storage)?;
    let building = pending.first().is_some_and(|m| m.version == 1);
    let pending_versions: Vec<i32> = pending.iter().map(|m| m.version).collect();
    if layout != Layout::Local {
        citus::before_migrations(&mut tx, schema, &found, building)?;
    }
    let mut report = MigrationReport::default();
    let mut takeover = if building {
        seed_takeover::begin(&mut tx)?
    } else {
        None
    };
    for migration in pending {
        let applied = match migration.when {
            When::Always => apply(&mut tx, migration).map(|()| true)?,
            When::VectorStorage => {
                tx.batch_execute(&format!(
                    "SET LOCAL lock_timeout = {}",
                    wait.as_millis().max(1)
                ))?;
                apply_vector_storage(&mut tx, migration, schema, storage)?
            }
        };
        if !applied {
            continue;
        }
        if migration.when == When::VectorStorage {
            for later in &MIGRATIONS[HALF_SIZE_VECTORS..] {
                if !pending_versions.contains(&later.version) {
                    tx.batch_execute(later.sql)?;
                }
            }
        }
        report.applied.push(migration.name.to_owned());
        if migration.version == 1 {
            if let Some(takeover) = takeover.take() {
                report.seed_takeover = Some(takeover.finish(&mut tx)?);
            }
        }
    }
    // Read again: a migration may have added a table (pgvector's index list) to distribute.
    let incomplete = building || citus::incomplete(layout, &citus::inspect(&mut tx, schema)?);
    // A migration that redefines a function sql/citus.sql configures (CREATE OR REPLACE
    // resets a function's settings) on a distributed schema: citus.sql configures it again.
    let redefined = layout != Layout::Local && !report.applied.is_empty();
    if incomplete || redefined {
        citus::distribute(&mut tx, schema, layout)?;
    }
    if incomplete && layout != Layout::Local {
        report.distributed = Some(layout.as_str().to_owned());
    }
    tx.commit()?;
    Ok(report)
}

/// Creates the schema and the history table if absent; returns the layout the schema is to
/// have and what the database said of it. On Citus a new schema is always created as a plain
/// schema, built, and distributed at the end (see `citus`): under `CitusMode::Auto` it is to
/// be schema-based when this session would have made it a distributed schema.
fn create_schema(
    tx: &mut Transaction<'_>,
    schema: &str,
    mut mode: CitusMode,
) -> Result<(Layout, citus::Found)> {
    // Only an absent schema is created (the schema's advisory lock keeps two processes from
    // racing here): on Citus 13.2, CREATE SCHEMA IF NOT EXISTS of an existing schema while
    // schema-based sharding is on registers it as a distributed schema, tables and all, though
    // none of its tables is distributed.
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )?
        .try_get(0)?;
    if !exists {
        if citus::inspect(tx, schema)?.citus {
            mode = citus::mode_for_new_schema(tx, mode)?;
        }
        tx.batch_execute(&format!("CREATE SCHEMA {}", quote_ident(schema)))?;
    }
    tx.batch_execute(CREATE_HISTORY)?;
    let found = citus::inspect(tx, schema)?;
    Ok((citus::layout(mode, &found, schema)?, found))
}

fn apply(tx: &mut Transaction<'_>, migration: &Migration) -> Result<()> {
    log::info!("pg-model-repo: applying migration {}", migration.name);
    tx.batch_execute(migration.sql)?;
    tx.execute(
        INSERT_APPLIED,
        &[
            &migration.version,
            &migration.name,
            &checksum(migration.sql),
        ],
    )?;
    Ok(())
}

/// Applies the conversion to pgvector's `vector` type where it is pending: for `Pgvector`
/// always (an error without pgvector), for `Auto` (a new schema) only where pgvector is there;
/// a failure to create the extension (a role that may not) leaves BYTEA with a warning.
/// Returns whether it was applied.
fn apply_vector_storage(
    tx: &mut Transaction<'_>,
    migration: &Migration,
    schema: &str,
    storage: VectorStorage,
) -> Result<bool> {
    let available: bool = tx.query_one(PGVECTOR_AVAILABLE, &[])?.try_get(0)?;
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
        apply(tx, migration)?;
        return Ok(true);
    }
    if !available {
        log::debug!(
            "pg-model-repo: no pgvector on the server; schema {schema} stores vectors as BYTEA"
        );
        return Ok(false);
    }
    // A schema that holds vectors already (a seed's database taken over) is converted only
    // when asked.
    let has_vectors: bool = tx.query_one(HAS_VECTORS, &[])?.try_get(0)?;
    if has_vectors {
        log::info!(
            "pg-model-repo: schema {schema} stores its vectors as BYTEA although pgvector is \
             available; to convert them (a rewrite under an exclusive lock), run \
             ModelRepository::migrate with vector_storage(VectorStorage::Pgvector)"
        );
        return Ok(false);
    }
    let mut attempt = tx.savepoint("pg_model_repo_vector_storage")?;
    match apply(&mut attempt, migration) {
        Ok(()) => {
            attempt.commit()?;
            Ok(true)
        }
        // Not allowed to create the extension (it needs a superuser), or its files are
        // incomplete: stay on BYTEA. Anything else is a real failure.
        Err(e)
            if matches!(
                e.code().map(|c| c.code()),
                Some("42501" | "58P01" | "0A000")
            ) =>
        {
            attempt.rollback()?;
            log::warn!(
                "pg-model-repo: schema {schema} stores vectors as BYTEA: pgvector could not be \
                 set up ({e}); a superuser can run: CREATE SCHEMA IF NOT EXISTS pgvector; \
                 CREATE EXTENSION IF NOT EXISTS vector SCHEMA pgvector"
            );
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// A migration refused for lack of rights says who may run it.
fn needs_owner(error: RepoError, schema: &str) -> RepoError {
    match error {
        RepoError::Database(source) if source.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            RepoError::PermissionDenied {
                hint: format!(
                    "schema {schema} needs migrations this role may not run: run \
                     ModelRepository::migrate as the schema's owner, and open with \
                     auto_migrate(false) as the application role"
                ),
                source,
            }
        }
        other => other,
    }
}

fn log_report(schema: &str, report: &MigrationReport) {
    if let Some(takeover) = &report.seed_takeover {
        log::info!(
            "pg-model-repo: took over the seed's tables in schema {schema}: {} models, {} \
             embeddings ({} converted from float64), {} cache entries, {} training metric records",
            takeover.models,
            takeover.embeddings,
            takeover.embeddings_converted_from_f64,
            takeover.cache_entries,
            takeover.training_metrics
        );
        if takeover.embeddings_quarantined > 0 {
            log::warn!(
                "pg-model-repo: {} embeddings of schema {schema} were not valid vectors and moved \
                 to embeddings_quarantine; the first: {}",
                takeover.embeddings_quarantined,
                takeover
                    .quarantined_first
                    .iter()
                    .map(|q| format!("{}/{} ({})", q.entity_type, q.entity_id, q.reason))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
}

/// For `auto_migrate(false)`, which runs no DDL: Ok when every migration is recorded, else
/// `NotFound` saying what is missing and who can add it.
pub(crate) fn check_applied(client: &mut Client, schema: &str) -> Result<()> {
    // The optional conversion to pgvector is never missing: open checks the storage itself.
    let pending = pending(client, VectorStorage::Bytea)?;
    if pending.is_empty() {
        return Ok(());
    }
    Err(RepoError::not_found(describe_missing(
        client, schema, &pending,
    )?))
}

const SCHEMA_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)";

/// The tables of ours (as the seed named them) the schema holds.
const TABLES_PRESENT: &str = "SELECT c.relname::text FROM pg_class c
     JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
       AND c.relname IN ('ml_models', 'embeddings', 'prediction_cache', 'training_metrics')
     ORDER BY 1";

fn describe_missing(
    client: &mut Client,
    schema: &str,
    pending: &[&'static Migration],
) -> Result<String> {
    let run_migrate =
        "run ModelRepository::migrate as the schema's owner (auto_migrate(false) runs no DDL)";
    let always = MIGRATIONS.iter().filter(|m| m.when == When::Always).count();
    if pending.len() < always {
        let names: Vec<&str> = pending.iter().map(|m| m.name).collect();
        return Ok(format!(
            "schema {schema} lacks migrations {}: {run_migrate}, or run those sql/ files as \
             sql/V001__init.sql describes",
            names.join(", ")
        ));
    }
    let exists: bool = client.query_one(SCHEMA_EXISTS, &[&schema])?.try_get(0)?;
    if !exists {
        return Ok(format!("schema {schema} does not exist: {run_migrate}"));
    }
    if seed_takeover::is_seed_schema(client)? {
        return Ok(format!(
            "schema {schema} holds the tables of the seed's Python repository (uuid id keys, no \
             save sequence): run ModelRepository::migrate as the schema's owner to take them \
             over (see the README, \"Coming from the Python repository\")"
        ));
    }
    let tables: Vec<String> = client
        .query(TABLES_PRESENT, &[&schema])?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
    if tables.is_empty() {
        return Ok(format!(
            "schema {schema} has no pg-model-repo tables and no model_repo_migrations: {run_migrate}"
        ));
    }
    Ok(format!(
        "schema {schema} has tables ({}) but no record of the migrations that built them \
         (model_repo_migrations is missing or empty), so the library cannot tell their shape: \
         {run_migrate}; it adopts tables that sql/V001__init.sql built",
        tables.join(", ")
    ))
}

/// The recorded applied time of every migration, oldest first.
const SELECT_APPLIED_AT: &str =
    "SELECT name, applied_at FROM model_repo_migrations ORDER BY version";

/// One migration recorded as applied in a schema.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AppliedMigration {
    /// The file's name, e.g. `"V001__init.sql"`.
    pub name: String,
    /// When it was applied (the database's clock).
    pub applied_at: std::time::SystemTime,
}

/// The migrations of one schema, as [`ModelRepository::migrate`](crate::ModelRepository::migrate)
/// would find them: the files recorded as applied and those it would apply now.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MigrationStatus {
    /// The schema read.
    pub schema: String,
    /// The files recorded in the schema's `model_repo_migrations`, in order (empty for a new
    /// schema).
    pub applied: Vec<AppliedMigration>,
    /// The files a migration would apply now, in order. The optional conversion to pgvector's
    /// type (`V006__vector_storage.sql`) is listed where the config asks for it, or for a new
    /// schema under `VectorStorage::Auto`, where `migrate` applies it only if the server has
    /// pgvector.
    pub pending: Vec<String>,
}

/// What `target`'s schema has applied, and what a migration would apply now: read only,
/// without DDL or locks.
pub(crate) fn status(target: &Target<'_>) -> Result<MigrationStatus> {
    let mut conn = connect(target.connection)?;
    let client = conn.client();
    let pending = pending(client, target.settings.vector_storage)?
        .iter()
        .map(|m| m.name.to_owned())
        .collect();
    let applied = match client.query(SELECT_APPLIED_AT, &[]) {
        Ok(rows) => rows
            .iter()
            .map(|row| {
                Ok(AppliedMigration {
                    name: row.try_get("name")?,
                    applied_at: row.try_get("applied_at")?,
                })
            })
            .collect::<Result<Vec<_>>>()?,
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    Ok(MigrationStatus {
        schema: target.connection.schema.clone(),
        applied,
        pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The section every migration file ends with: it creates the history table if needed and
    /// records the file, exactly as the library does, so that `psql -f` leaves a schema the
    /// library recognises.
    fn record_section(migration: &Migration) -> String {
        format!(
            "{RECORD_MARKER} (its checksum covers the statements above, not comments)\n\
         {CREATE_HISTORY};\n\
         INSERT INTO model_repo_migrations (version, name, checksum)\n    \
         VALUES ({}, '{}', '{}')\n    \
         ON CONFLICT (version) DO NOTHING;\n",
            migration.version,
            migration.name,
            checksum(migration.sql)
        )
    }

    #[test]
    fn every_migration_ends_with_its_own_record_section() {
        for migration in MIGRATIONS {
            let expected = record_section(migration);
            assert!(
                migration.sql.ends_with(&expected),
                "{} must end with exactly this section (its checksum is computed from the \
                 statements above it):\n{expected}",
                migration.name
            );
        }
    }

    #[test]
    fn the_migrations_run_again_after_a_pgvector_conversion_start_at_v010() {
        assert_eq!(
            MIGRATIONS[HALF_SIZE_VECTORS].name,
            "V010__half_size_vectors.sql"
        );
    }

    #[test]
    fn migrations_are_numbered_in_order_and_named_after_their_number() {
        for (i, migration) in MIGRATIONS.iter().enumerate() {
            if i > 0 {
                assert!(
                    migration.version > MIGRATIONS[i - 1].version,
                    "{}",
                    migration.name
                );
            }
            assert!(
                migration
                    .name
                    .starts_with(&format!("V{:03}__", migration.version)),
                "{}",
                migration.name
            );
        }
    }

    #[test]
    fn comments_do_not_change_a_checksum_and_statements_do() {
        let sql = "-- a comment\nCREATE TABLE t (x int);\n\n";
        let commented = "-- another comment\n\nCREATE TABLE t (x int);   \n  -- more\n";
        assert_eq!(checksum(sql), checksum(commented));
        assert_ne!(checksum(sql), checksum("CREATE TABLE t (x bigint);"));
        let recorded = format!("{sql}{RECORD_MARKER}\nINSERT 1;\n");
        assert_eq!(checksum(sql), checksum(&recorded));
    }

    #[test]
    fn the_checksum_the_first_release_recorded_is_still_accepted() {
        let v1 = &MIGRATIONS[0];
        assert!(check_unchanged(v1, EARLIER_CHECKSUMS[0].1).is_ok());
        assert!(check_unchanged(v1, &checksum(v1.sql)).is_ok());
        assert!(matches!(
            check_unchanged(v1, "edited"),
            Err(RepoError::Conflict(_))
        ));
    }
}
