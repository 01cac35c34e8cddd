//! The prediction cache: CBOR entries under string keys with a TTL judged by the database
//! clock (`entries`), Redis-style glob clearing (`glob`), and the background reaper that
//! deletes expired rows and flushes buffered access counts (`reaper`). Uses the plumbing in
//! `db` only.

mod entries;
mod glob;
mod reaper;

pub use entries::CacheStats;
pub(crate) use entries::{purge_expired, FLUSH_HITS};
pub(crate) use reaper::Reaper;
