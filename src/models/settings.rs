//! The models' settings: the largest model accepted, the chunk size above which a model is
//! stored in chunks, and how many connections a chunked transfer uses.

use crate::error::{RepoError, Result};
use crate::validate::count_within;

/// The largest single BYTEA value that binary COPY really takes: 1 GiB - 1 MiB. Models
/// stored inline were limited to it; larger ones are stored in chunks.
pub const MAX_BYTEA_MODEL_SIZE: u64 = (1 << 30) - (1 << 20);

/// The default of [`RepositoryConfig::max_model_size`](crate::RepositoryConfig::max_model_size): 64 GiB.
pub const DEFAULT_MAX_MODEL_SIZE: u64 = 64 << 30;

/// The default of [`RepositoryConfig::model_chunk_size`](crate::RepositoryConfig::model_chunk_size): 4 MiB.
pub const DEFAULT_MODEL_CHUNK_SIZE: u32 = 4 << 20;

/// The bounds of [`RepositoryConfig::model_chunk_size`](crate::RepositoryConfig::model_chunk_size): 64 KiB ..= 256 MiB.
pub const MODEL_CHUNK_SIZE_RANGE: std::ops::RangeInclusive<u32> = (64 << 10)..=(256 << 20);

/// The default of [`RepositoryConfig::model_streams`](crate::RepositoryConfig::model_streams).
pub const DEFAULT_MODEL_STREAMS: u32 = 2;

/// The models' settings (see the setters of `RepositoryConfig`).
#[derive(Clone, Debug)]
pub(crate) struct ModelSettings {
    pub(crate) max_model_size: u64,
    pub(crate) chunk_size: u32,
    pub(crate) streams: u32,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            max_model_size: DEFAULT_MAX_MODEL_SIZE,
            chunk_size: DEFAULT_MODEL_CHUNK_SIZE,
            streams: DEFAULT_MODEL_STREAMS,
        }
    }
}

impl ModelSettings {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.max_model_size == 0 || self.max_model_size > i64::MAX as u64 {
            return Err(RepoError::invalid(format!(
                "max_model_size is {}; it must be within 1..={} bytes",
                self.max_model_size,
                i64::MAX
            )));
        }
        count_within(
            "model_chunk_size",
            self.chunk_size,
            *MODEL_CHUNK_SIZE_RANGE.start(),
            *MODEL_CHUNK_SIZE_RANGE.end(),
        )?;
        count_within("model_streams", self.streams, 1, 16)
    }
}
