//! Versioned model blobs: saves, loads with checksum verification, listings, metadata search,
//! soft delete and cleanup (`versions`); streaming transfers in bounded memory (`blob`);
//! models larger than one chunk, stored in a chunk table over parallel streams (`chunked`);
//! aliases with their stack and history (`aliases`). Uses the plumbing in `db` only.

mod aliases;
mod blob;
mod chunked;
mod versions;

pub(crate) use chunked::STAGED_CHUNKS;
pub use versions::ModelInfo;
pub(crate) use versions::FLUSH_LOADS;
