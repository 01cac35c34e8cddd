//! Versioned model blobs: saves, loads with checksum verification, listings, metadata search,
//! soft delete and cleanup (`versions`); streaming transfers in bounded memory (`blob`);
//! models larger than one chunk, stored in a chunk table over parallel streams (`chunked`);
//! aliases with their stack and history (`aliases`); retention policies (`retention`); change
//! events sent by every write and the subscriptions that read them (`events`). Uses the
//! plumbing in `db` only.

mod aliases;
mod blob;
mod chunked;
mod events;
mod reference;
mod retention;
mod settings;
mod versions;

pub use events::{
    ModelEvent, ModelEventKind, ModelEvents, MAX_EVENT_PAYLOAD_BYTES, MODEL_EVENTS_CAPACITY,
};
pub use retention::{RetentionDecision, RetentionPolicy, RetentionReason, RetentionReport};

pub(crate) use settings::ModelSettings;
pub use settings::{
    DEFAULT_MAX_MODEL_SIZE, DEFAULT_MODEL_CHUNK_SIZE, DEFAULT_MODEL_STREAMS, MAX_BYTEA_MODEL_SIZE,
    MODEL_CHUNK_SIZE_RANGE,
};
pub use versions::ModelInfo;

use crate::error::Result;
use crate::repository::Registration;

/// What the models ask of the repository: their load counts written by the background
/// thread, staged chunks of dead saves swept, and the change events' channel and
/// subscriptions (stopped at close).
pub(crate) fn register(registration: &mut Registration<'_>) -> Result<()> {
    registration.flush_model_loads(versions::FLUSH_LOADS);
    registration.leftover(chunked::STAGED_CHUNKS);
    events::register(registration);
    Ok(())
}
