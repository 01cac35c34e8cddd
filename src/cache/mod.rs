//! The prediction cache: CBOR entries under string keys with a TTL judged by the database
//! clock (`entries`), Redis-style glob clearing (`glob`), its settings (`settings`), and the
//! chore that deletes expired rows at every tick of the repository's background thread. Uses
//! the plumbing in `db` only.

mod entries;
mod glob;
mod settings;

pub use entries::CacheStats;
pub(crate) use settings::CacheSettings;

use crate::error::Result;
use crate::repository::Registration;

/// What the cache asks of the repository: its hit counts written, and expired rows deleted
/// at every background tick.
pub(crate) fn register(registration: &mut Registration<'_>) -> Result<()> {
    registration.flush_cache_hits(entries::FLUSH_HITS);
    registration.chore(entries::PurgeExpired {
        layout: registration.layout,
    });
    Ok(())
}
