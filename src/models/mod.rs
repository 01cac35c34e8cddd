//! Versioned model blobs: saves, loads with checksum verification, listings, metadata search,
//! soft delete and cleanup (`versions`); streaming transfers in bounded memory (`blob`);
//! models larger than one chunk, stored in a chunk table over parallel streams (`chunked`);
//! aliases with their stack and history (`aliases`). Uses the plumbing in `db` only.

mod aliases;
mod blob;
mod chunked;
mod reference;
mod settings;
mod versions;

pub(crate) use settings::ModelSettings;
pub use settings::{
    DEFAULT_MAX_MODEL_SIZE, DEFAULT_MODEL_CHUNK_SIZE, DEFAULT_MODEL_STREAMS, MAX_BYTEA_MODEL_SIZE,
    MODEL_CHUNK_SIZE_RANGE,
};
pub use versions::ModelInfo;

use crate::error::Result;
use crate::repository::Registration;

/// What the models ask of the repository: their load counts written by the background
/// thread, and staged chunks of dead saves swept.
pub(crate) fn register(registration: &mut Registration<'_>) -> Result<()> {
    registration.flush_model_loads(versions::FLUSH_LOADS);
    registration.leftover(chunked::STAGED_CHUNKS);
    Ok(())
}
