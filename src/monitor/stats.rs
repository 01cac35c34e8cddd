//! Storage statistics of models and embeddings, with the on-disk size of their tables.

use postgres::Client;

use crate::db::error::Result;
use crate::db::retry::Retry;
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

/// With indexes and TOAST, summed over the table's partitions if it has any.
const TABLE_SIZE: &str = "SELECT sum(pg_total_relation_size(relid))::bigint \
     FROM (SELECT relid FROM pg_partition_tree(to_regclass($1)) \
           UNION SELECT to_regclass($1)) t";

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
            call.run(Retry::Idempotent, |conn| {
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
                    table_bytes: table_size(client, "ml_models")?
                        + table_size(client, "ml_model_chunks")?,
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
            call.run(Retry::Idempotent, |conn| {
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
}

pub(crate) fn as_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn table_size(client: &mut Client, table: &str) -> Result<u64> {
    let size: Option<i64> = client.query_one(TABLE_SIZE, &[&table])?.try_get(0)?;
    Ok(size.map_or(0, as_u64))
}
