//! Versioned model blobs: saves, loads with checksum verification, listings, metadata search,
//! soft delete and cleanup (`versions`); streaming transfers in constant memory (`blob`);
//! aliases with their stack and history (`aliases`). Uses the plumbing in `db` only.

mod aliases;
mod blob;
mod versions;

pub use versions::ModelInfo;
pub(crate) use versions::FLUSH_LOADS;
