//! The public batch loads: checks, then the path `plan::choose` picks (fresh storage with one
//! or several COPY streams, or an upsert in one transaction), on the load's connection.

use std::time::Instant;

use crate::db::call::Call;
use crate::db::pool::PgConnection;
use crate::db::retry::Retry;
use crate::embeddings::check::{
    at_index, check_batch, check_key, check_shape, check_values, CheckedBatch, TypeDim,
    ENTITY_TYPE_MAX,
};
use crate::embeddings::copy_rows::Source;
use crate::embeddings::declare::{check_f16_range, check_f16_record, is_f16};
use crate::embeddings::fresh::{self, Keep};
use crate::embeddings::parallel::load_parallel;
use crate::embeddings::plan::{choose, type_state, Path, Plan, TypeState};
use crate::embeddings::registry::in_load_transaction;
use crate::embeddings::store::{known_storage, with_storage};
use crate::embeddings::types::{
    check_storage_dimension, BatchReport, Embedding, LoadMethod, Storage,
};
use crate::embeddings::upsert::{stream_merge, upsert};
use crate::error::{RepoError, Result};
use crate::repository::ModelRepository;
use crate::validate;

impl ModelRepository {
    /// Saves a batch by the fastest correct path for it: multi-row upserts below
    /// [`BATCH_COPY_CROSSOVER`](crate::BATCH_COPY_CROSSOVER) records; binary COPY into fresh
    /// storage for a type without rows or a reload of most of a type; COPY straight into the
    /// type for new keys; upserts otherwise (docs/embeddings.md has the table). All or
    /// nothing: any invalid record (or a key twice in the batch) fails the call, naming the
    /// first offending record, and nothing is written.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::Embedding;
    /// let batch: Vec<Embedding> = (0..10_000)
    ///     .map(|i| Embedding::new("item", format!("i{i}"), vec![i as f32; 64]))
    ///     .collect();
    /// let report = repo.batch_save_embeddings(&batch)?;
    /// println!("{} rows, {} bytes in {:?}", report.rows, report.bytes, report.elapsed);
    /// # Ok(()) }
    /// ```
    pub fn batch_save_embeddings(&self, batch: &[Embedding]) -> Result<BatchReport> {
        self.load(
            "batch_save_embeddings",
            batch,
            Plan::Fastest,
            &mut |_, _| {},
        )
    }

    /// Saves a batch by the given method (to compare methods; `batch_save_embeddings` picks
    /// one for you). Same rules as [`batch_save_embeddings`](Self::batch_save_embeddings).
    /// `Copy` and `ParallelCopy` load a type without rows, or a reload of most of a type, into
    /// fresh storage (one connection with COPY FREEZE, or one COPY stream per connection);
    /// `Insert` and `MultiRowInsert` are the upsert baselines.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::{Embedding, LoadMethod};
    /// let batch = vec![Embedding::new("item", "i1", vec![1.0, 2.0])];
    /// let report = repo.load_embeddings(&batch, LoadMethod::ParallelCopy)?;
    /// # Ok(()) }
    /// ```
    pub fn load_embeddings(&self, batch: &[Embedding], method: LoadMethod) -> Result<BatchReport> {
        self.load(
            "load_embeddings",
            batch,
            Plan::Method(method),
            &mut |_, _| {},
        )
    }

    /// [`load_embeddings`](Self::load_embeddings) that reports progress: `progress(rows_sent,
    /// rows_total)` is called on the caller's thread as the batch goes out (a retried load
    /// starts again from 0).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::{Embedding, LoadMethod};
    /// let batch = vec![Embedding::new("item", "i1", vec![1.0, 2.0])];
    /// repo.load_embeddings_with_progress(&batch, LoadMethod::Copy, &mut |done, total| {
    ///     eprintln!("{done}/{total}");
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn load_embeddings_with_progress(
        &self,
        batch: &[Embedding],
        method: LoadMethod,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BatchReport> {
        self.load("load_embeddings", batch, Plan::Method(method), progress)
    }

    /// Loads the vectors an iterator yields, all of one entity type, in constant memory (a
    /// pipeline can stream a file of any size), all or nothing: a bad record (another type,
    /// another length, a NaN, a blank id) or a key twice fails the call and nothing is
    /// written. A type without rows is loaded into fresh storage (by `Copy` and
    /// `ParallelCopy`: the latter over one COPY stream per connection); into a type that has
    /// rows the records are upserted. An empty iterator loads nothing. Not retried after the
    /// first record was taken (the iterator cannot be replayed).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::{Embedding, LoadMethod};
    /// let mut rows = (0..1_000_000).map(|i| Embedding::new("user", format!("u{i}"), vec![0.5; 384]));
    /// let report = repo.load_embeddings_iter(&mut rows, LoadMethod::ParallelCopy)?;
    /// println!("{} rows in {:?}", report.rows, report.elapsed);
    /// # Ok(()) }
    /// ```
    pub fn load_embeddings_iter(
        &self,
        rows: &mut dyn Iterator<Item = Embedding>,
        method: LoadMethod,
    ) -> Result<BatchReport> {
        let started = Instant::now();
        self.timed_bulk("load_embeddings_iter", |call| {
            let mut rows = rows.peekable();
            let Some(first) = rows.peek() else {
                return Ok(BatchReport {
                    rows: 0,
                    bytes: 0,
                    elapsed: started.elapsed(),
                });
            };
            check_key(&first.entity_type, &first.entity_id).map_err(|e| at_index(0, e))?;
            check_shape(&first.vector).map_err(|e| at_index(0, e))?;
            let (entity_type, dimension) = (first.entity_type.clone(), first.vector.len());
            // The iterator cannot be replayed: the storage must be known before it is read.
            let storage = known_storage(self.storage(), call)?;
            check_storage_dimension(storage, dimension)?;
            let half = is_f16(call, &entity_type)?;
            let mut check = |i: usize, e: &Embedding| {
                one_type_record(&entity_type, dimension, i, e)?;
                if half {
                    check_f16_record(i, e)?;
                }
                Ok(())
            };
            let streams = self.load_streams();
            let loaded = call.with_live_conn(|conn| {
                let source = Source::Iter {
                    rows: &mut rows,
                    check: &mut check,
                };
                load_stream(
                    call,
                    conn,
                    &entity_type,
                    dimension,
                    method,
                    storage,
                    streams,
                    source,
                )
            })?;
            Ok(BatchReport {
                rows: loaded,
                bytes: loaded * 4 * dimension as u64,
                elapsed: started.elapsed(),
            })
        })
    }

    /// How many COPY streams a parallel load runs (`RepositoryConfig::load_streams`).
    fn load_streams(&self) -> usize {
        self.config().embeddings.load_streams as usize
    }

    fn load(
        &self,
        op: &'static str,
        batch: &[Embedding],
        plan: Plan,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BatchReport> {
        let started = Instant::now();
        self.timed_bulk(op, |call| {
            let checked = check_batch(batch)?;
            if !batch.is_empty() {
                let total = batch.len() as u64;
                let mut report = |done: u64| progress(done, total);
                let streams = self.load_streams();
                with_storage(self.storage(), call, |storage| {
                    for t in &checked.types {
                        check_storage_dimension(storage, t.dimension)
                            .map_err(|e| at_index(t.first_index, e))?;
                    }
                    let types: Vec<&str> = checked.types.iter().map(|t| t.entity_type).collect();
                    call.with_conn(Retry::Idempotent, |conn| {
                        check_f16_range(conn.client(), batch, &types)?;
                        write_batch(call, conn, &checked, plan, storage, streams, &mut report)
                    })
                    .map_err(|e| first_offender(batch, e))
                })?;
                log::debug!(
                    "pg-model-repo: {op} wrote {total} rows ({plan:?}) in {:?}",
                    started.elapsed()
                );
            }
            Ok(BatchReport {
                rows: batch.len() as u64,
                bytes: checked.bytes,
                elapsed: started.elapsed(),
            })
        })
    }
}

/// Writes a checked batch by the path `choose` picks for it.
fn write_batch(
    call: &Call<'_>,
    conn: &mut PgConnection,
    batch: &CheckedBatch<'_>,
    plan: Plan,
    storage: Storage,
    streams: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let records = batch.records;
    let one_type: Option<&TypeDim<'_>> = (batch.types.len() == 1).then(|| &batch.types[0]);
    let mut seen: Option<TypeState> = None;
    let path = choose(plan, records.len(), one_type.is_some(), || {
        let t = one_type.expect("looked at for one type only");
        let state = type_state(conn.client(), t.entity_type, records)?;
        seen = Some(state);
        Ok(state)
    })?;
    match path {
        Path::Fresh { streams: parallel } => {
            let t = one_type.expect("fresh storage is for one type");
            let plan = fresh::Plan {
                stored: seen.is_some_and(|s| s.has_rows),
                ..fresh_plan(
                    call,
                    t.entity_type,
                    t.dimension,
                    Keep::OldRows,
                    storage,
                    Some(records.len() as u64),
                )
            };
            load_fresh(
                call,
                conn,
                plan,
                Source::Slice(records),
                parallel.then_some(streams),
                progress,
            )
            .map_err(|e| e.at_batch_index(t.first_index))
            .map(|_| ())
        }
        Path::Upsert(LoadMethod::ParallelCopy) => load_parallel(
            call.pool(),
            call.layout(),
            conn,
            batch,
            storage,
            streams,
            progress,
        )
        .inspect(|()| count_rows(call, LoadMethod::ParallelCopy, records.len() as u64)),
        Path::Upsert(method) => {
            if matches!(method, LoadMethod::Insert | LoadMethod::MultiRowInsert) {
                // Only the COPY encoder checks values as it goes.
                check_all_values(records)?;
            }
            let direct = seen.is_some_and(|s| s.sampled_stored == 0);
            in_load_transaction(conn, &batch.types, |tx| {
                upsert(tx, batch, method, direct, storage, progress)
            })
            .inspect(|()| count_rows(call, method, records.len() as u64))
        }
    }
}

/// Counts `rows` loaded by `method` (feature `metrics`; nothing otherwise).
fn count_rows(call: &Call<'_>, method: LoadMethod, rows: u64) {
    call.pool().metrics().rows_loaded(method.as_str(), rows);
}

/// What a load into fresh storage of `entity_type` writes.
pub(crate) fn fresh_plan<'a>(
    call: &Call<'_>,
    entity_type: &'a str,
    dimension: usize,
    keep: Keep,
    storage: Storage,
    expected: Option<u64>,
) -> fresh::Plan<'a> {
    fresh::Plan {
        entity_type,
        dimension,
        keep,
        storage,
        layout: call.layout(),
        expected,
        stored: false,
    }
}

/// Loads into fresh storage over this connection alone (`streams` None), or over one COPY
/// stream per connection, the extra ones taken only if idle (never waited for: waiting for a
/// second connection while holding one can deadlock a small pool).
pub(crate) fn load_fresh(
    call: &Call<'_>,
    conn: &mut PgConnection,
    plan: fresh::Plan<'_>,
    source: Source<'_>,
    streams: Option<usize>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let pool = call.pool();
    match streams {
        Some(n) if n > 1 => {
            let mut extra: Vec<_> = (1..n).map_while(|_| pool.try_get()).collect();
            if extra.is_empty() {
                // No second connection free: one stream, which may as well freeze its rows.
                return load_single(call, conn, plan, source, progress);
            }
            let extra_refs: Vec<&mut PgConnection> = extra.iter_mut().map(|c| &mut **c).collect();
            fresh::load_streams(pool, conn, extra_refs, plan, source, progress)
                .inspect(|&rows| count_rows(call, LoadMethod::ParallelCopy, rows))
        }
        _ => load_single(call, conn, plan, source, progress),
    }
}

/// Loads into fresh storage over `conn` alone, with FREEZE where the layout allows.
fn load_single(
    call: &Call<'_>,
    conn: &mut PgConnection,
    plan: fresh::Plan<'_>,
    source: Source<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    fresh::load_single(call.pool(), conn, plan, source, progress)
        .inspect(|&rows| count_rows(call, LoadMethod::Copy, rows))
}

/// An iterator's load: fresh storage for a type without rows, else (or when `embeddings` has
/// row triggers of its own) an upsert (staged by COPY in constant memory, then merged).
#[allow(clippy::too_many_arguments)]
fn load_stream(
    call: &Call<'_>,
    conn: &mut PgConnection,
    entity_type: &str,
    dimension: usize,
    method: LoadMethod,
    storage: Storage,
    streams: usize,
    source: Source<'_>,
) -> Result<u64> {
    let state = type_state(conn.client(), entity_type, &[])?;
    if state.has_rows || state.row_triggers {
        let types = [TypeDim {
            entity_type,
            dimension,
            first_index: 0,
        }];
        return stream_merge(conn, &types, storage, source)
            .inspect(|&rows| count_rows(call, LoadMethod::Copy, rows));
    }
    let parallel = (method == LoadMethod::ParallelCopy).then_some(streams);
    let plan = fresh_plan(call, entity_type, dimension, Keep::OldRows, storage, None);
    load_fresh(call, conn, plan, source, parallel, &mut |_| {})
}

/// One record of a one-type stream (its values are checked as they are encoded).
fn one_type_record(entity_type: &str, dimension: usize, index: usize, e: &Embedding) -> Result<()> {
    if e.entity_type != entity_type {
        return Err(RepoError::invalid_record(
            index,
            format!(
                "entity type {:?} in a stream of {entity_type:?} (one type per call)",
                e.entity_type
            ),
        ));
    }
    check_key(&e.entity_type, &e.entity_id).map_err(|err| at_index(index, err))?;
    check_shape(&e.vector).map_err(|err| at_index(index, err))?;
    validate::name("entity_type", &e.entity_type, ENTITY_TYPE_MAX)?;
    if e.vector.len() != dimension {
        return Err(RepoError::DimensionMismatch {
            entity_type: entity_type.to_owned(),
            expected: dimension,
            actual: e.vector.len(),
            index: Some(index),
        });
    }
    Ok(())
}

/// A record refused for its values, as the first of the batch that is: parallel streams
/// may come upon a later one first.
fn first_offender(batch: &[Embedding], error: RepoError) -> RepoError {
    match &error {
        RepoError::InvalidInput(d) => match d.record() {
            Some(k) => check_all_values(&batch[..k.min(batch.len())])
                .err()
                .unwrap_or(error),
            None => error,
        },
        _ => error,
    }
}

/// Every record's values are finite (the paths without the COPY encoder).
fn check_all_values(records: &[Embedding]) -> Result<()> {
    match records
        .iter()
        .enumerate()
        .find_map(|(i, e)| check_values(&e.vector).err().map(|err| (i, err)))
    {
        Some((i, err)) => Err(at_index(i, err)),
        None => Ok(()),
    }
}
