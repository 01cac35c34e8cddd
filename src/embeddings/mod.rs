//! Entity embeddings: the public types and how vectors are stored (`types`), input rules
//! (`check`), the per-type dimension registry (`registry`) and precision declarations
//! (`declare`), single saves, reads and streaming reads (`store`), similarity search
//! (`search`, exact scoring in `exact`, filters in `filter` and `filtered`, HNSW indexes in
//! `index` and their concurrent builds in `index_build`), and batch loads: the plan and the
//! single-connection paths (`load`), the binary COPY rows (`encode`) and the multi-connection
//! `ParallelCopy` (`parallel`). Uses the plumbing in `db` only.

#[macro_use]
mod sql;

mod check;
mod copy_rows;
mod declare;
mod encode;
mod exact;
mod filter;
mod filtered;
mod fresh;
mod index;
mod index_build;
mod load;
mod parallel;
mod plan;
mod registry;
mod replace;
mod search;
mod settings;
mod stamps;
mod store;
mod types;
mod upsert;

pub use filter::{SearchFilter, MAX_FILTER_IDS};
pub use filtered::FILTERED_MAX_SCAN_TUPLES;
pub use plan::BATCH_COPY_CROSSOVER;
pub use search::MAX_NEAREST_K;
pub(crate) use settings::EmbeddingSettings;
pub use settings::DEFAULT_HNSW_EF_SEARCH;
pub use types::{BatchReport, Embedding, LoadMethod, Metric, Neighbor, VectorPrecision};

use crate::error::{RepoError, Result};
use crate::repository::{ModelRepository, Registration};
use crate::schema::settings::VectorStorage;
use index::IndexCache;
use types::{Storage, StorageCell};

/// What the embeddings keep per repository.
#[derive(Debug, Default)]
struct EmbeddingsState {
    /// How the schema stores vectors (BYTEA or pgvector), as last seen.
    storage: StorageCell,
    /// Which entity types have HNSW indexes, as recently seen.
    index_cache: IndexCache,
}

/// What the embeddings ask of the repository: their state, and staged rows of dead loads
/// swept. Where `open` may not convert (`auto_migrate(false)`) and the setting insists on
/// pgvector, the schema's storage is checked now; otherwise it is read on first use.
pub(crate) fn register(registration: &mut Registration<'_>) -> Result<()> {
    registration.leftover(parallel::STAGED_ROWS);
    registration.leftover(fresh::LOADS);
    let state = EmbeddingsState::default();
    let config = registration.config;
    if !config.migrations.auto_migrate
        && config.migrations.vector_storage == VectorStorage::Pgvector
    {
        let found = store::detect_storage(registration.pool.get()?.client())?;
        if found == Storage::Bytea {
            return Err(RepoError::invalid(format!(
                "vector_storage(Pgvector), but schema {} stores vectors as BYTEA and \
                 auto_migrate(false) runs no DDL: convert it with ModelRepository::migrate",
                config.schema_name()
            )));
        }
        state.storage.set(found);
    }
    registration.state(state);
    Ok(())
}

impl ModelRepository {
    /// How the schema stores vectors, as last seen (see `store::with_storage`).
    pub(crate) fn storage(&self) -> &StorageCell {
        &self.state::<EmbeddingsState>().storage
    }

    /// What is known of the entity types' HNSW indexes.
    pub(crate) fn index_cache(&self) -> &IndexCache {
        &self.state::<EmbeddingsState>().index_cache
    }
}
