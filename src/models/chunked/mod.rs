//! Models larger than one chunk: their bytes live in `ml_model_chunks`, one row per chunk with
//! its own sha256, staged under a chunk set id by several connections at once and published
//! by one short transaction (`save`), and read back over several connections sharing one
//! snapshot, in order, through a bounded reorder window (`load`). Uses the plumbing in `db`.

mod load;
mod save;

use postgres::{Row, Transaction};

use crate::db::call::Call;
use crate::db::pool::begin_unbounded;
use crate::db::retry::Retry;
use crate::error::{RepoError, Result};
use crate::schema::sweep::{try_owner_lock, Leftover};

pub(crate) use load::stream_chunks;
pub(crate) use save::{save_chunked, ChunkReader, ChunkSource, ChunkedSave};

/// The advisory lock key of a chunk set in this schema (`$set` is its id). A save holds a
/// session lock on it while it lives, so the sweep never takes a live save's staged chunks.
macro_rules! set_lock_key {
    ($set:literal) => {
        $crate::schema::sweep::owner_lock_key!("chunk_set", $set)
    };
}
pub(crate) use set_lock_key;

/// The columns [`Layout::from_row`] reads (table alias `m`), as a literal for `concat!`.
macro_rules! layout_columns {
    () => {
        "m.chunk_size, m.chunk_count, m.chunk_set"
    };
}
pub(crate) use layout_columns;

/// How a stored version keeps its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// In `ml_models.model_data`.
    Inline,
    /// In `ml_model_chunks`.
    Chunked(Chunks),
}

/// Where a chunked version's bytes are: `count` chunks of `size` bytes (the last one may be
/// shorter) under chunk set `set`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Chunks {
    pub set: i64,
    pub size: u32,
    pub count: u32,
}

impl Layout {
    /// Reads the [`layout_columns!`] of a row.
    pub(crate) fn from_row(row: &Row) -> Result<Self> {
        let count: i32 = row.try_get("chunk_count")?;
        if count == 0 {
            return Ok(Layout::Inline);
        }
        let set: Option<i64> = row.try_get("chunk_set")?;
        let size: i32 = row.try_get("chunk_size")?;
        match (set, u32::try_from(size), u32::try_from(count)) {
            (Some(set), Ok(size), Ok(count)) if size > 0 => {
                Ok(Layout::Chunked(Chunks { set, size, count }))
            }
            _ => Err(RepoError::corrupt(format!(
                "chunking facts make no sense: {count} chunks of {size} bytes in set {set:?}"
            ))),
        }
    }
}

impl Chunks {
    /// The layout of a model of `total` bytes cut into chunks of `size` (`total > 0`).
    pub(crate) fn for_model(set: i64, size: u32, total: u64) -> Result<Self> {
        let count = u32::try_from(total.div_ceil(u64::from(size)))
            .ok()
            .filter(|&n| i32::try_from(n).is_ok())
            .ok_or_else(|| {
                RepoError::invalid(format!(
                    "a model of {total} bytes needs more than 2^31 chunks of {size} bytes"
                ))
            })?;
        Ok(Chunks { set, size, count })
    }

    /// The byte range chunk `no` covers in a model of `total` bytes.
    pub(crate) fn range(&self, no: u32, total: u64) -> std::ops::Range<u64> {
        let start = u64::from(no) * u64::from(self.size);
        start.min(total)..(start + u64::from(self.size)).min(total)
    }
}

/// A chunk (`c`) that no stored version names.
macro_rules! unpublished {
    () => {
        "NOT EXISTS (SELECT 1 FROM ml_models m WHERE m.model_name = c.model_name \
         AND m.version = c.version AND m.chunk_set = c.chunk_set)"
    };
}

/// Staged chunks of saves that died before they published or removed them: old enough, not
/// part of any stored version, and their set not locked by a live save.
pub(crate) const STAGED_CHUNKS: Leftover = Leftover {
    what: "staged model chunks of dead saves",
    candidates: concat!(
        "SELECT DISTINCT c.chunk_set FROM ml_model_chunks c \
         WHERE c.staged_at < now() - $1 * interval '1 second' AND ",
        unpublished!()
    ),
    // Before the schema was part of the key: class "mchk" (0x6d63686b).
    try_lock: try_owner_lock!("chunk_set", "1835231339"),
    delete: concat!(
        "DELETE FROM ml_model_chunks c \
         WHERE c.chunk_set = $1 AND c.staged_at < now() - $2 * interval '1 second' AND ",
        unpublished!()
    ),
};

const DELETE_SET: &str =
    "DELETE FROM ml_model_chunks WHERE model_name = $1 AND version = $2 AND chunk_set = $3";

/// A chunk set's rows, unless a stored version names it (a save's own staged chunks after a
/// failure, whose publish may have committed with its reply lost; a removed version's).
pub(crate) const DELETE_UNREFERENCED_SET: &str = "DELETE FROM ml_model_chunks c \
     WHERE c.model_name = $1 AND c.version = $2 AND c.chunk_set = $3 \
       AND NOT EXISTS (SELECT 1 FROM ml_models m WHERE m.model_name = c.model_name \
           AND m.version = c.version AND m.chunk_set = c.chunk_set)";

/// Hands a removed version's chunks to the leftover sweep (`staged_at` set again), should
/// their deletion after the removal not happen.
const RELEASE_SET: &str = "UPDATE ml_model_chunks SET staged_at = now() \
     WHERE model_name = $1 AND version = $2 AND chunk_set = $3";

/// Removing a big model's chunks is bulk work: no statement_timeout for it.
const LIFT_TIMEOUT: &str = "SET LOCAL statement_timeout = 0";

/// Inside the transaction that removes versions `(version, chunk set)` of `model_name`:
/// marks their chunks as leftovers, a short update; [`delete_released`] deletes them after
/// the commit, and the sweep does if that fails.
pub(crate) fn release_sets(
    tx: &mut Transaction<'_>,
    model_name: &str,
    sets: &[(String, i64)],
) -> Result<()> {
    if sets.is_empty() {
        return Ok(());
    }
    let statement = tx.prepare(RELEASE_SET)?;
    for (version, set) in sets {
        tx.execute(&statement, &[&model_name, version, set])?;
    }
    Ok(())
}

/// Deletes released chunk sets, each in a transaction of its own (bulk work: a big model has
/// many chunks). A failure is logged; the sweep removes what is left within an hour or so.
pub(crate) fn delete_released(call: &Call<'_>, model_name: &str, sets: &[(String, i64)]) {
    for (version, set) in sets {
        let deleted = call.with_conn(Retry::Idempotent, |conn| {
            let mut tx = begin_unbounded(conn)?;
            let n = tx.execute(DELETE_UNREFERENCED_SET, &[&model_name, version, set])?;
            tx.commit()?;
            Ok(n)
        });
        if let Err(e) = deleted {
            log::warn!(
                "pg-model-repo: the chunks of removed version {model_name}/{version} were not \
                 deleted ({e}); the leftover sweep removes them later"
            );
        }
    }
}

/// Deletes the chunks of the versions `(version, chunk set)` of `model_name` inside the
/// caller's transaction (a replaced soft-deleted version); returns the rows removed.
pub(crate) fn delete_sets(
    tx: &mut Transaction<'_>,
    model_name: &str,
    sets: &[(String, i64)],
) -> Result<u64> {
    if sets.is_empty() {
        return Ok(0);
    }
    tx.batch_execute(LIFT_TIMEOUT)?;
    let statement = tx.prepare(DELETE_SET)?;
    let mut removed = 0;
    for (version, set) in sets {
        removed += tx.execute(&statement, &[&model_name, version, set])?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ranges_cover_the_model_once() {
        let chunks = Chunks::for_model(7, 10, 25).unwrap();
        assert_eq!(chunks.count, 3);
        let ranges: Vec<_> = (0..chunks.count).map(|n| chunks.range(n, 25)).collect();
        assert_eq!(ranges, [0..10, 10..20, 20..25]);
        assert_eq!(Chunks::for_model(7, 10, 30).unwrap().count, 3);
        assert!(Chunks::for_model(7, 1, 1 << 40).is_err());
    }

    #[test]
    fn the_lock_key_names_the_kind_and_the_schema_and_the_legacy_class_spells_mchk() {
        assert_eq!(
            set_lock_key!("x"),
            "hashtext('pg-model-repo.chunk_set.' || current_schema()), ((x)::int8 % 2147483647)::int4"
        );
        assert!(STAGED_CHUNKS.try_lock.contains(set_lock_key!("$1")));
        assert!(STAGED_CHUNKS.try_lock.contains("1835231339, ($1::int8"));
        assert_eq!(1835231339i32.to_be_bytes(), *b"mchk");
    }
}
