//! Entity embeddings: the public types and how vectors are stored (`types`), input rules
//! (`check`), the per-type dimension registry (`registry`), single saves, reads and streaming
//! reads (`store`), similarity search (`search`, exact scoring in `exact`), and batch loads: the plan and the single-connection paths (`load`), the
//! binary COPY rows (`encode`) and the multi-connection `ParallelCopy` (`parallel`). Uses the
//! plumbing in `db` only.

/// The insert prefix every embeddings write shares, as a literal for `concat!`.
macro_rules! insert_embeddings {
    () => {
        "INSERT INTO embeddings AS e (entity_type, entity_id, embeddings, dimension) "
    };
}

/// The upsert clause every embeddings write shares: `created_at` is kept, `updated_at` moves
/// (to the new row's default, `now()`: Citus allows no function call in `DO UPDATE SET`).
macro_rules! on_key_update {
    () => {
        " ON CONFLICT (entity_type, entity_id) DO UPDATE \
         SET embeddings = EXCLUDED.embeddings, dimension = EXCLUDED.dimension, \
         updated_at = EXCLUDED.updated_at"
    };
}

mod check;
mod encode;
mod exact;
mod index;
mod load;
mod parallel;
mod registry;
mod replace;
mod search;
mod store;
mod types;

pub(crate) use index::IndexCache;
pub use load::BATCH_COPY_CROSSOVER;
pub(crate) use parallel::STAGED_ROWS;
pub use search::{Metric, Neighbor, MAX_NEAREST_K};
pub(crate) use store::detect_storage;
pub use types::{BatchReport, Embedding, LoadMethod};
pub(crate) use types::{Storage, StorageCell};
