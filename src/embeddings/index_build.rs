//! Building a type's HNSW index without blocking its writers: `CREATE INDEX CONCURRENTLY` on
//! the type's storage table, run by a session whose role owns it (the library's own schema);
//! a role that does not (the application role of sql/roles.sql) builds through the schema
//! owner's function instead, which holds writers of the type off until it is done.

use postgres::Client;

use crate::embeddings::types::Metric;
use crate::error::Result;

/// The type's storage, its dimension, and whether this session may index it itself.
const STORAGE: &str = "SELECT r.storage, r.dimension, c.reltuples::float8, \
         pg_has_role(c.relowner, 'USAGE') AS owned, embedding_storage_is_half(r.storage) AS half \
     FROM embedding_types r JOIN pg_class c ON c.oid = to_regclass(quote_ident(r.storage)) \
     WHERE r.entity_type = $1 AND r.storage IS NOT NULL";

/// An index of that name left invalid by a concurrent build that failed.
const INVALID: &str = "SELECT EXISTS (SELECT 1 FROM pg_index i \
     WHERE i.indexrelid = to_regclass(quote_ident($1)) AND NOT i.indisvalid)";

/// pgvector's schema: a build on Citus runs on the workers, whose sessions do not have it on
/// their search_path, so the type and operator class are named with it.
const EXTENSION_SCHEMA: &str = "SELECT quote_ident(n.nspname) FROM pg_extension e \
     JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'";

const RECORD: &str = "INSERT INTO embedding_vector_indexes (entity_type, metric) \
     VALUES ($1, $2) ON CONFLICT (entity_type, metric) DO NOTHING";

/// The storage a build found.
#[derive(Debug)]
struct Target {
    storage: String,
    dimension: i32,
    rows: f64,
    /// An f16 type's storage (halfvec, sql/V010).
    half: bool,
}

/// What a concurrent build did: `None` when this session may not build concurrently (the
/// caller then uses the blocking function), else whether the type exists.
pub(crate) fn build_concurrently(
    client: &mut Client,
    entity_type: &str,
    metric: Metric,
) -> Result<Option<bool>> {
    // A load or refresh may swap the storage during the build: the index is then built
    // again on the new table (a load's commit builds recorded indexes itself, so a swap
    // after the record needs nothing).
    for _ in 0..3 {
        let Some(row) = client.query_opt(STORAGE, &[&entity_type])? else {
            return Ok(Some(false));
        };
        if !row.try_get::<_, bool>("owned")? {
            return Ok(None);
        }
        let target = Target {
            storage: row.try_get("storage")?,
            dimension: row.try_get("dimension")?,
            rows: row.try_get(2)?,
            half: row.try_get("half")?,
        };
        with_session_settings(client, &target, |client| build(client, &target, metric))?;
        client.execute(RECORD, &[&entity_type, &metric.as_str()])?;
        let now = client.query_opt(STORAGE, &[&entity_type])?;
        let same = match &now {
            Some(row) => row.try_get::<_, String>("storage")? == target.storage,
            None => true,
        };
        if same {
            return Ok(Some(true));
        }
    }
    Ok(Some(true))
}

/// Runs `f` without statement_timeout and with the memory an HNSW graph of the table needs
/// (at most 2 GB: a graph that outgrows maintenance_work_mem builds many times slower),
/// restoring both after.
fn with_session_settings(
    client: &mut Client,
    target: &Target,
    f: impl FnOnce(&mut Client) -> Result<()>,
) -> Result<()> {
    let row = client.query_one(
        "SELECT current_setting('statement_timeout'), \
                pg_size_bytes(current_setting('maintenance_work_mem'))",
        &[],
    )?;
    let timeout: String = row.try_get(0)?;
    let memory: i64 = row.try_get(1)?;
    let wanted = (target.rows.max(0.0) as i64) * (8 * i64::from(target.dimension) + 512);
    let memory_kb = memory.max(wanted.min(2_147_483_648)) / 1024;
    client.batch_execute(&format!(
        "SET statement_timeout = 0; SET maintenance_work_mem = '{memory_kb}kB'"
    ))?;
    let built = f(client);
    let restored = client.execute(
        "SELECT set_config('statement_timeout', $1, false), \
                set_config('maintenance_work_mem', $2, false)",
        &[&timeout, &format!("{}kB", memory / 1024)],
    );
    built?;
    restored?;
    Ok(())
}

/// `CREATE INDEX CONCURRENTLY` of the metric's HNSW index on the storage table (the
/// expression searches order by), after dropping an invalid one a failed build left.
fn build(client: &mut Client, target: &Target, metric: Metric) -> Result<()> {
    let ops = match metric {
        Metric::L2 => "l2_ops",
        Metric::Cosine => "cosine_ops",
        Metric::InnerProduct => "ip_ops",
    };
    let (column, kind) = if target.half {
        ("embeddings_half", "halfvec")
    } else {
        ("embeddings", "vector")
    };
    let name = format!("{}_hnsw_{}", target.storage, metric.as_str());
    let invalid: bool = client.query_one(INVALID, &[&name])?.try_get(0)?;
    if invalid {
        client.batch_execute(&format!(
            "DROP INDEX CONCURRENTLY IF EXISTS {}",
            crate::db::pool::quote_ident(&name)
        ))?;
    }
    let ext: String = client.query_one(EXTENSION_SCHEMA, &[])?.try_get(0)?;
    let table = crate::db::pool::quote_ident(&target.storage);
    // Separate statements: a concurrent build cannot run inside a multi-statement string.
    client.batch_execute(&format!("ANALYZE {table}"))?;
    client.batch_execute(&format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} \
             USING hnsw (({column}::{ext}.{kind}({dim})) {ext}.{kind}_{ops})",
        index = crate::db::pool::quote_ident(&name),
        dim = target.dimension,
    ))?;
    Ok(())
}
