//! Which path a batch load takes, decided in one place ([`choose`]) from what the caller asked
//! for, the batch, and one look at the type's state ([`TypeState`]). The crossovers are
//! measured with `load_bench` (docs/embeddings.md, "Which path a load takes").

use postgres::GenericClient;

use crate::embeddings::types::{Embedding, LoadMethod};
use crate::error::Result;

/// Below this many records `batch_save_embeddings` upserts by `MultiRowInsert`: a COPY's
/// set-up costs more than a small batch's statements. Measured with `cargo run --release
/// --example load_bench -- --crossover` (docs/embeddings.md).
pub const BATCH_COPY_CROSSOVER: usize = 300;

/// A load that covers at least this share of a type's rows, most of them keys the type has
/// (a reload), rebuilds the type instead of upserting into it: rewriting the rows it lacks
/// costs less than updating the ones it has in place, and leaves no dead rows behind.
pub(crate) const REBUILD_MIN_COVER: f64 = 0.5;

/// A COPY load of new keys (none of the sample stored) into a type that has rows: with at
/// least this many rows per stored row it goes to fresh storage with the type's rows carried
/// over (the carry-over is cheap next to the load); below, straight into the type's table.
pub(crate) const APPEND_REBUILD_MIN_RATIO: f64 = 4.0;

/// Keys sampled to tell a reload from a load of new keys.
const SAMPLE_KEYS: usize = 64;

/// What the caller asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Exactly this method.
    Method(LoadMethod),
    /// `batch_save_embeddings`: the fastest correct path for the batch.
    Fastest,
}

/// How a load writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// Upserts in the load's one transaction, by this method (`Copy`: straight into the table
    /// when no key is stored, else staged and merged; `ParallelCopy`: staged by several
    /// streams and merged).
    Upsert(LoadMethod),
    /// Into fresh storage, the type's other rows carried over, then swapped in: one
    /// connection (with FREEZE), or several COPY streams.
    Fresh { streams: bool },
}

/// What one look at a type tells a load.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TypeState {
    /// The type has rows.
    pub(crate) has_rows: bool,
    /// About how many (the planner's count, or an exact one).
    pub(crate) rows: u64,
    /// Keys of the batch's sample that the type has, and the sample's size.
    pub(crate) sampled_stored: usize,
    pub(crate) sampled: usize,
    /// `embeddings` has row triggers of its own (an audit, a check another team added): the
    /// rows go through the table, where they fire, never into fresh storage, where they would
    /// not (a partition attached with its rows in fires no row trigger).
    pub(crate) row_triggers: bool,
}

/// The type's state in one round trip: whether it has rows, about how many, and how many of
/// an evenly spaced sample of the batch's keys it holds. (`LIMIT 1` inside `EXISTS` changes
/// nothing on one server; through a Citus coordinator it is what stops each shard at its first
/// row: without it the coordinator collected every row of the type, 200 ms for 100k.)
const TYPE_STATE: &str = "SELECT \
       EXISTS (SELECT 1 FROM embeddings e WHERE e.entity_type = $1 LIMIT 1), \
       coalesce((SELECT greatest(c.reltuples, 0)::int8 FROM embedding_types r \
                 JOIN pg_class c ON c.oid = to_regclass(quote_ident(r.storage)) \
                 WHERE r.entity_type = $1), 0), \
       (SELECT count(*) FROM embeddings e WHERE e.entity_type = $1 AND e.entity_id = ANY($2)), \
       EXISTS (SELECT 1 FROM pg_trigger t \
               WHERE t.tgrelid = 'embeddings'::regclass AND NOT t.tgisinternal)";

/// The exact count, where the planner has none yet (a table never analyzed).
const COUNT_ROWS: &str = "SELECT count(*) FROM embeddings WHERE entity_type = $1";

/// Looks at the one type of `records` (sampling its keys).
pub(crate) fn type_state<C: GenericClient>(
    client: &mut C,
    entity_type: &str,
    records: &[Embedding],
) -> Result<TypeState> {
    let step = records.len().div_ceil(SAMPLE_KEYS).max(1);
    let sample: Vec<&str> = records
        .iter()
        .step_by(step)
        .map(|e| e.entity_id.as_str())
        .collect();
    let row = client.query_one(TYPE_STATE, &[&entity_type, &sample])?;
    let mut state = TypeState {
        has_rows: row.try_get(0)?,
        rows: row.try_get::<_, i64>(1)?.max(0) as u64,
        sampled_stored: row.try_get::<_, i64>(2)?.max(0) as usize,
        sampled: sample.len(),
        row_triggers: row.try_get(3)?,
    };
    if state.has_rows && state.rows == 0 {
        state.rows = client
            .query_one(COUNT_ROWS, &[&entity_type])?
            .try_get::<_, i64>(0)?
            .max(1) as u64;
    }
    Ok(state)
}

/// The one place a load's path is chosen. `state` is asked for (one round trip) only where
/// the answer depends on it: a batch of one type loaded by COPY.
pub(crate) fn choose(
    plan: Plan,
    rows: usize,
    one_type: bool,
    state: impl FnOnce() -> Result<TypeState>,
) -> Result<Path> {
    let method = match plan {
        Plan::Method(method) => method,
        Plan::Fastest if rows < BATCH_COPY_CROSSOVER => LoadMethod::MultiRowInsert,
        Plan::Fastest => LoadMethod::Copy,
    };
    let copying = matches!(method, LoadMethod::Copy | LoadMethod::ParallelCopy);
    if !copying || !one_type {
        return Ok(Path::Upsert(method));
    }
    let streams = method == LoadMethod::ParallelCopy;
    let state = state()?;
    if state.row_triggers {
        return Ok(Path::Upsert(method));
    }
    if !state.has_rows {
        return Ok(Path::Fresh { streams });
    }
    let stored = state.sampled_stored as f64 / state.sampled.max(1) as f64;
    let cover = rows as f64 / state.rows.max(1) as f64;
    let reload = stored >= 0.5 && cover >= REBUILD_MIN_COVER;
    let big_append = state.sampled_stored == 0 && cover >= APPEND_REBUILD_MIN_RATIO;
    if reload || big_append {
        return Ok(Path::Fresh { streams });
    }
    // A small batch into a large type, or one that mixes new and stored keys: upsert (with
    // `Fastest`, a batch mostly of stored keys upserts from arrays, skipping the staging).
    Ok(match plan {
        Plan::Fastest if stored >= 0.5 => Path::Upsert(LoadMethod::MultiRowInsert),
        // New keys into a type that has rows, streams asked for: the rows must land in the
        // type's indexed table in one transaction, so staging them over several connections
        // only adds a merge pass, on one backend too (measured: 0.32-0.46x of one COPY
        // straight into the table, whose encoders run in parallel all the same).
        _ if streams && state.sampled_stored == 0 => Path::Upsert(LoadMethod::Copy),
        _ => Path::Upsert(method),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(has_rows: bool, rows: u64, sampled_stored: usize) -> TypeState {
        TypeState {
            has_rows,
            rows,
            sampled_stored,
            sampled: 64,
            row_triggers: false,
        }
    }

    #[test]
    fn row_triggers_on_embeddings_keep_every_load_in_the_table() {
        let triggered = |s: TypeState| TypeState {
            row_triggers: true,
            ..s
        };
        for s in [
            state(false, 0, 0),
            state(true, 100_000, 64),
            state(true, 10, 0),
        ] {
            assert_eq!(
                path(COPY, 100_000, true, triggered(s)),
                Path::Upsert(LoadMethod::Copy)
            );
            assert_eq!(
                path(PARALLEL, 100_000, true, triggered(s)),
                Path::Upsert(LoadMethod::ParallelCopy)
            );
        }
    }

    fn path(plan: Plan, rows: usize, one_type: bool, s: TypeState) -> Path {
        choose(plan, rows, one_type, || Ok(s)).unwrap()
    }

    const COPY: Plan = Plan::Method(LoadMethod::Copy);
    const PARALLEL: Plan = Plan::Method(LoadMethod::ParallelCopy);

    #[test]
    fn a_type_without_rows_is_loaded_into_fresh_storage() {
        let empty = state(false, 0, 0);
        assert_eq!(path(COPY, 10, true, empty), Path::Fresh { streams: false });
        assert_eq!(
            path(PARALLEL, 10, true, empty),
            Path::Fresh { streams: true }
        );
        assert_eq!(
            path(Plan::Fastest, 100_000, true, empty),
            Path::Fresh { streams: false }
        );
    }

    #[test]
    fn a_reload_of_most_of_a_type_rebuilds_it() {
        let full = state(true, 100_000, 64);
        assert_eq!(
            path(COPY, 100_000, true, full),
            Path::Fresh { streams: false }
        );
        assert_eq!(
            path(PARALLEL, 60_000, true, full),
            Path::Fresh { streams: true }
        );
        // A small part of a large type is upserted.
        assert_eq!(
            path(COPY, 1_000, true, full),
            Path::Upsert(LoadMethod::Copy)
        );
        assert_eq!(
            path(Plan::Fastest, 1_000, true, full),
            Path::Upsert(LoadMethod::MultiRowInsert)
        );
    }

    #[test]
    fn new_keys_go_straight_into_the_type_unless_they_dwarf_it() {
        let some = state(true, 100_000, 0);
        assert_eq!(
            path(COPY, 100_000, true, some),
            Path::Upsert(LoadMethod::Copy)
        );
        assert_eq!(
            path(COPY, 400_000, true, some),
            Path::Fresh { streams: false }
        );
        // Streams would only stage them for a merge: one COPY straight in.
        assert_eq!(
            path(PARALLEL, 100_000, true, some),
            Path::Upsert(LoadMethod::Copy)
        );
        assert_eq!(
            path(PARALLEL, 400_000, true, some),
            Path::Fresh { streams: true }
        );
        // Stored keys among them: staged over the streams and merged.
        assert_eq!(
            path(PARALLEL, 10_000, true, state(true, 100_000, 10)),
            Path::Upsert(LoadMethod::ParallelCopy)
        );
    }

    #[test]
    fn baselines_small_batches_and_several_types_never_look() {
        let never = || -> Result<TypeState> { panic!("no look needed") };
        assert_eq!(
            choose(Plan::Method(LoadMethod::Insert), 10, true, never).unwrap(),
            Path::Upsert(LoadMethod::Insert)
        );
        assert_eq!(
            choose(Plan::Fastest, 10, true, never).unwrap(),
            Path::Upsert(LoadMethod::MultiRowInsert)
        );
        assert_eq!(
            choose(PARALLEL, 10_000, false, never).unwrap(),
            Path::Upsert(LoadMethod::ParallelCopy)
        );
    }
}
