//! Storage statistics of models and embeddings, with the on-disk size of their tables.

use postgres::Client;

use crate::db::layout::Layout;
use crate::db::retry::Retry;
use crate::error::Result;
use crate::monitor::{EmbeddingsStats, EntityTypeStats, ModelStats, ModelStorageStats};
use crate::repository::ModelRepository;

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
        coalesce(sum(4 * e.dimension::bigint), 0)::bigint AS total_bytes,
        max(e.updated_at) AS last_update
     FROM embeddings e LEFT JOIN embedding_types t ON t.entity_type = e.entity_type
     GROUP BY e.entity_type, t.dimension ORDER BY e.entity_type";

/// A table's dead tuples and on-disk size (with indexes and TOAST), summed over its
/// partitions if it has any (`embeddings`: one per entity type).
const TABLE_FACTS: &str = "SELECT coalesce(sum(s.n_dead_tup), 0)::bigint,
        coalesce(sum(pg_total_relation_size(t.relid)), 0)::bigint
     FROM (SELECT relid FROM pg_partition_tree(to_regclass($1))
           UNION SELECT to_regclass($1)) t
     LEFT JOIN pg_stat_user_tables s ON s.relid = t.relid";

/// The same on a Citus coordinator, where a distributed table's rows live in its shards on
/// the workers (the coordinator holds an empty shell): sizes by `citus_total_relation_size`,
/// dead tuples read from every shard. Tables Citus does not distribute count as above.
const CITUS_TABLE_FACTS: &str = "SELECT coalesce(sum(CASE WHEN p.logicalrelid IS NULL
            THEN s.n_dead_tup
            ELSE (SELECT sum(nullif(r.result, '')::bigint)
                  FROM run_command_on_shards(t.relid::regclass,
                      'SELECT n_dead_tup FROM pg_stat_all_tables WHERE relid = ''%s''::regclass') r
                  WHERE r.success) END), 0)::bigint,
        coalesce(sum(CASE WHEN p.logicalrelid IS NULL THEN pg_total_relation_size(t.relid)
                          ELSE citus_total_relation_size(t.relid) END), 0)::bigint
     FROM (SELECT relid FROM pg_partition_tree(to_regclass($1))
           UNION SELECT to_regclass($1)) t
     LEFT JOIN pg_dist_partition p ON p.logicalrelid = t.relid
     LEFT JOIN pg_stat_user_tables s ON s.relid = t.relid";

impl ModelRepository {
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
        self.timed("get_model_storage_stats", |call| {
            // This repository's buffered loads count too.
            self.flush_counts()?;
            let layout = self.layout();
            call.with_conn(Retry::Idempotent, |conn| {
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
                    // Chunked models' bytes live in their own table.
                    table_bytes: table_size(client, layout, "ml_models")?
                        + table_size(client, layout, "ml_model_chunks")?,
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
        self.timed("get_embeddings_stats", |call| {
            let layout = self.layout();
            call.with_conn(Retry::Idempotent, |conn| {
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
                    table_bytes: table_size(client, layout, "embeddings")?,
                    entity_types,
                })
            })
        })
    }
}

pub(crate) fn as_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn table_size(client: &mut Client, layout: Layout, table: &str) -> Result<u64> {
    Ok(table_facts(client, layout, table)?.1)
}

/// A table's dead tuples and bytes (see [`TABLE_FACTS`]), wherever its rows are.
pub(crate) fn table_facts(client: &mut Client, layout: Layout, table: &str) -> Result<(u64, u64)> {
    let sql = match layout {
        Layout::Local => TABLE_FACTS,
        Layout::RowBased | Layout::SchemaBased => CITUS_TABLE_FACTS,
    };
    let row = client.query_one(sql, &[&table])?;
    Ok((as_u64(row.try_get(0)?), as_u64(row.try_get(1)?)))
}
