//! Citus: where a repository's tables live on a Citus coordinator, and the step of the
//! migration that puts them there. The statements are `sql/citus.sql` itself (embedded), so
//! the file people run by hand is exactly what the library runs.
//!
//! Row-based, every big table is hash-distributed over the workers; schema-based, the whole
//! schema is one co-location group on one node. A schema created by the migration's first
//! file cannot be distributed while it is created (V001 gives its sequence an owner, which
//! Citus does not allow on a distributed sequence), so a new schema that Citus made a
//! distributed schema is undistributed while it is empty, built, and distributed again, all
//! in the migration's one transaction.

use std::time::Duration;

use postgres::Transaction;

use crate::db::layout::Layout;
use crate::error::{RepoError, Result};
use crate::schema::settings::CitusMode;
use crate::schema::tables;

/// The statements that distribute a schema's tables (see the file's header).
pub(crate) const CITUS_SQL: &str = include_str!("../../sql/citus.sql");

/// What the database says about Citus and one schema.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Found {
    /// The `citus` extension exists in this database.
    pub(crate) citus: bool,
    /// The schema is a Citus distributed schema (in `pg_dist_schema`).
    pub(crate) distributed_schema: bool,
    /// How many of [`tables::TABLES`] are hash-distributed or reference tables (a "Citus
    /// local table", which Citus makes of a table with a foreign key to a reference table, is
    /// not yet where the layout wants it).
    pub(crate) distributed_tables: usize,
    /// How many of [`tables::TABLES`] exist in the schema.
    pub(crate) tables: usize,
}

const HAS_CITUS: &str = "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')";

const INSPECT_SCHEMA: &str = "SELECT
        EXISTS (SELECT 1 FROM pg_catalog.pg_dist_schema s
                JOIN pg_namespace n ON n.oid = s.schemaid WHERE n.nspname = $1),
        (SELECT count(*) FROM pg_catalog.pg_dist_partition p
         JOIN pg_class c ON c.oid = p.logicalrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = ANY($2)
           AND (p.partmethod = 'h' OR p.repmodel = 't')),
        (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = ANY($2) AND c.relkind IN ('r', 'p'))";

/// Reads what [`Found`] holds (one query without Citus, two with it).
pub(crate) fn inspect<C: postgres::GenericClient>(client: &mut C, schema: &str) -> Result<Found> {
    let citus: bool = client.query_one(HAS_CITUS, &[])?.try_get(0)?;
    if !citus {
        return Ok(Found::default());
    }
    let tables: Vec<&str> = tables::names().collect();
    let row = client.query_one(INSPECT_SCHEMA, &[&schema, &tables])?;
    let distributed: i64 = row.try_get(1)?;
    let tables: i64 = row.try_get(2)?;
    Ok(Found {
        citus,
        distributed_schema: row.try_get(0)?,
        distributed_tables: usize::try_from(distributed).unwrap_or(0),
        tables: usize::try_from(tables).unwrap_or(0),
    })
}

/// Where the schema's tables are now (read by `open`: a few statements differ on a row-based
/// cluster).
pub(crate) fn current<C: postgres::GenericClient>(client: &mut C, schema: &str) -> Result<Layout> {
    let found = inspect(client, schema)?;
    Ok(if found.distributed_schema {
        Layout::SchemaBased
    } else if found.distributed_tables > 0 {
        Layout::RowBased
    } else {
        Layout::Local
    })
}

/// The layout `mode` asks for, given what the database says.
pub(crate) fn layout(mode: CitusMode, found: &Found, schema: &str) -> Result<Layout> {
    match (mode, found.citus) {
        (CitusMode::Off, _) | (CitusMode::Auto, false) => Ok(Layout::Local),
        (CitusMode::RowBased | CitusMode::SchemaBased, false) => Err(RepoError::invalid(format!(
            "RepositoryConfig::citus({mode:?}), but this database has no citus extension: \
             connect to a Citus coordinator (CREATE EXTENSION citus), or use CitusMode::Auto"
        ))),
        (CitusMode::Auto, true) if found.distributed_schema => Ok(Layout::SchemaBased),
        (CitusMode::Auto, true) => Ok(Layout::RowBased),
        (CitusMode::RowBased, true) if found.distributed_schema => {
            Err(RepoError::conflict(format!(
                "schema {schema} is a Citus distributed schema (schema-based sharding); open it \
                 with CitusMode::SchemaBased or CitusMode::Auto"
            )))
        }
        (CitusMode::RowBased, true) => Ok(Layout::RowBased),
        (CitusMode::SchemaBased, true) => Ok(Layout::SchemaBased),
    }
}

/// Whether the schema's tables are not yet where `layout` puts them.
pub(crate) fn incomplete(layout: Layout, found: &Found) -> bool {
    match layout {
        Layout::Local => false,
        // A schema not built yet has none of the tables: it is incomplete too.
        Layout::RowBased => found.tables == 0 || found.distributed_tables < found.tables,
        Layout::SchemaBased => !found.distributed_schema,
    }
}

/// Before a new schema is created on Citus: the mode it is to be built in (`Auto` becomes
/// `SchemaBased` where this session would create a distributed schema), and `CREATE SCHEMA`
/// made to create a plain one, which the end of the migration distributes. Built first and
/// distributed once, the schema takes one co-location id (Citus places a schema's group on
/// the worker its id picks, round-robin); a schema created distributed would take a second.
pub(crate) fn mode_for_new_schema(tx: &mut Transaction<'_>, mode: CitusMode) -> Result<CitusMode> {
    let sharding: Option<String> = tx
        .query_one(
            "SELECT current_setting('citus.enable_schema_based_sharding', true)",
            &[],
        )?
        .try_get(0)?;
    tx.batch_execute("SET LOCAL citus.enable_schema_based_sharding = off")?;
    Ok(match mode {
        CitusMode::Auto if sharding.as_deref() == Some("on") => CitusMode::SchemaBased,
        other => other,
    })
}

/// One database-wide lock (transaction-level) around every migration on a Citus coordinator:
/// Citus's own metadata locks make concurrent `create_distributed_table` calls of different
/// schemas deadlock (40P01), so first opens of several repositories at once take turns here.
/// It is the migration's first lock, taken before its `CREATE SCHEMA` (which Citus sends to
/// the workers): a migration that waits for it holds nothing on any node that the one
/// distributing now could need.
const DISTRIBUTION_LOCK: &str = "SELECT pg_advisory_xact_lock(7163041856271826961)";

/// Takes [`DISTRIBUTION_LOCK`] where the database has Citus, waiting at most `wait`
/// (pool_timeout, as for the schema's migration lock: another repository's distribution may
/// take longer than a statement).
pub(crate) fn take_distribution_lock(tx: &mut Transaction<'_>, wait: Duration) -> Result<()> {
    if !tx.query_one(HAS_CITUS, &[])?.try_get::<_, bool>(0)? {
        return Ok(());
    }
    let before: String = tx.query_one("SHOW lock_timeout", &[])?.try_get(0)?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}",
        wait.as_millis().max(1)
    ))?;
    tx.batch_execute(DISTRIBUTION_LOCK)?;
    tx.execute("SELECT set_config('lock_timeout', $1, true)", &[&before])?;
    Ok(())
}

/// Before the migrations run on Citus: triggers may be created on distributed tables (they
/// touch only their own row), and a distributed schema about to be built from its first file
/// is undistributed while it is still empty (see the module doc).
pub(crate) fn before_migrations(
    tx: &mut Transaction<'_>,
    schema: &str,
    found: &Found,
    building: bool,
) -> Result<()> {
    tx.batch_execute("SET LOCAL citus.enable_unsafe_triggers = on")?;
    if building {
        if found.distributed_schema {
            tx.execute(
                "SELECT citus_schema_undistribute(quote_ident($1)::regnamespace)",
                &[&schema],
            )?;
        }
        // Nothing of the new schema is distributed yet: its objects are created on the
        // coordinator alone, and distributing the tables creates what the shards need (their
        // trigger functions, sequences and the schema). Citus's propagation of some of the
        // build's statements (a REVOKE on a function of a schema whose name needs quotes) is
        // wrong, and the SECURITY DEFINER functions run on the coordinator only.
        tx.batch_execute("SET LOCAL citus.enable_ddl_propagation = off")?;
    }
    Ok(())
}

/// Runs `sql/citus.sql` for `layout` (idempotent: what is distributed already is left alone).
pub(crate) fn distribute(tx: &mut Transaction<'_>, schema: &str, layout: Layout) -> Result<()> {
    if layout == Layout::Local {
        return Ok(());
    }
    log::info!(
        "pg-model-repo: distributing schema {schema} on Citus ({}-based)",
        layout.as_str()
    );
    tx.execute(
        "SELECT set_config('pg_model_repo.citus_mode', $1, true), \
                set_config('citus.enable_ddl_propagation', 'on', true)",
        &[&layout.as_str()],
    )?;
    tx.batch_execute(CITUS_SQL)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_based_list_is_the_one_citus_sql_distributes() {
        for table in tables::names() {
            assert!(
                CITUS_SQL.contains(&format!("('{table}',")),
                "sql/citus.sql does not list {table}"
            );
        }
        let listed = CITUS_SQL
            .lines()
            .filter(|l| l.trim_start().starts_with("('"))
            .count();
        assert_eq!(listed, tables::TABLES.len());
    }

    #[test]
    fn forcing_a_mode_without_citus_is_refused() {
        let none = Found::default();
        assert_eq!(layout(CitusMode::Auto, &none, "s").unwrap(), Layout::Local);
        assert_eq!(layout(CitusMode::Off, &none, "s").unwrap(), Layout::Local);
        assert!(layout(CitusMode::RowBased, &none, "s").is_err());
        assert!(layout(CitusMode::SchemaBased, &none, "s").is_err());
        let schema = Found {
            citus: true,
            distributed_schema: true,
            distributed_tables: 0,
            tables: 0,
        };
        assert_eq!(
            layout(CitusMode::Auto, &schema, "s").unwrap(),
            Layout::SchemaBased
        );
        assert!(matches!(
            layout(CitusMode::RowBased, &schema, "s"),
            Err(RepoError::Conflict(_))
        ));
    }
}
