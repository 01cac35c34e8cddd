//! Full refresh of an entity type and dropping a type. A refresh is a load into fresh storage
//! (`fresh`, sql/V008) that drops the type's old rows at the swap: the new set goes into a new
//! table by binary COPY (one connection with FREEZE, or one stream per connection on machines
//! with more than two cores), is indexed after the load and swapped in for the old storage.
//! Readers see the old set until the commit, then the new one; a refresh that fails at any
//! point leaves nothing behind.

use std::time::Instant;

use crate::db::retry::Retry;
use crate::embeddings::check::{at_index, check_batch, check_key, check_shape, ENTITY_TYPE_MAX};
use crate::embeddings::copy_rows::Source;
use crate::embeddings::declare::{check_f16_range, check_f16_record, is_f16};
use crate::embeddings::fresh::Keep;
use crate::embeddings::load::{fresh_plan, load_fresh};
use crate::embeddings::store::{known_storage, with_storage};
use crate::embeddings::types::{check_storage_dimension, BatchReport, Embedding};
use crate::error::{RepoError, Result};
use crate::repository::ModelRepository;
use crate::validate;

const DROP_TYPE: &str = "SELECT embedding_type_drop($1)";

impl ModelRepository {
    /// COPY streams of a full refresh: one (with FREEZE) unless `load_streams` is above two.
    fn refresh_streams(&self) -> Option<usize> {
        let n = self.config().embeddings.load_streams as usize;
        (n > 2).then_some(n)
    }

    /// Replaces the whole set of vectors of `entity_type` with `batch`, atomically: readers see
    /// the old set until the commit, then the new one, never a mix. The type's dimension may
    /// change (the batch's sets it). Every record must be of `entity_type`, share one
    /// dimension and have a distinct id; an empty batch is `InvalidInput` (to remove a type,
    /// use [`drop_embedding_type`](Self::drop_embedding_type)). Checked before any I/O.
    ///
    /// The new set is loaded by binary COPY into fresh storage, indexed after the load, and
    /// swapped in within one short lock, so the type takes no more room afterwards than the
    /// new set needs.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::Embedding;
    /// let fresh: Vec<Embedding> = (0..1000)
    ///     .map(|i| Embedding::new("item", format!("i{i}"), vec![i as f32; 768]))
    ///     .collect();
    /// let report = repo.replace_embeddings("item", &fresh)?;
    /// # Ok(()) }
    /// ```
    pub fn replace_embeddings(
        &self,
        entity_type: &str,
        batch: &[Embedding],
    ) -> Result<BatchReport> {
        self.replace_embeddings_with_progress(entity_type, batch, &mut |_, _| {})
    }

    /// [`replace_embeddings`](Self::replace_embeddings) that reports progress:
    /// `progress(rows_sent, rows_total)` on the caller's thread as the batch goes out (a
    /// retried refresh starts again from 0).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// # let fresh = vec![pg_model_repo::Embedding::new("item", "i1", vec![1.0, 2.0])];
    /// repo.replace_embeddings_with_progress("item", &fresh, &mut |done, total| {
    ///     eprintln!("{done}/{total}");
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn replace_embeddings_with_progress(
        &self,
        entity_type: &str,
        batch: &[Embedding],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BatchReport> {
        let started = Instant::now();
        self.timed_bulk("replace_embeddings", |call| {
            let dimension = check_replacement_batch(entity_type, batch)?;
            let total = batch.len() as u64;
            let streams = self.refresh_streams();
            with_storage(self.storage(), call, |storage| {
                check_storage_dimension(storage, dimension)?;
                // Repeating it after a failure replaces again with the same set.
                call.with_conn(Retry::Idempotent, |conn| {
                    check_f16_range(conn.client(), batch, &[entity_type])?;
                    let mut report = |done: u64| progress(done, total);
                    let plan = fresh_plan(
                        call,
                        entity_type,
                        dimension,
                        Keep::Nothing,
                        storage,
                        Some(total),
                    );
                    load_fresh(call, conn, plan, Source::Slice(batch), streams, &mut report)
                })
            })?;
            Ok(report(batch.len() as u64, dimension, started))
        })
    }

    /// [`replace_embeddings`](Self::replace_embeddings) from an iterator, in constant memory
    /// (a pipeline can stream a hundred million vectors). Records are checked as they come: the
    /// first one's length fixes the dimension, and a bad record (another type, another length,
    /// an invalid value, an id seen before) fails the call with nothing changed. An empty
    /// iterator is `InvalidInput`. Not retried after the first record went out (the iterator
    /// cannot be replayed).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::Embedding;
    /// let mut rows = (0..1_000_000).map(|i| Embedding::new("user", format!("u{i}"), vec![0.5; 384]));
    /// let report = repo.replace_embeddings_iter("user", &mut rows)?;
    /// println!("{} rows in {:?}", report.rows, report.elapsed);
    /// # Ok(()) }
    /// ```
    pub fn replace_embeddings_iter(
        &self,
        entity_type: &str,
        rows: &mut dyn Iterator<Item = Embedding>,
    ) -> Result<BatchReport> {
        let started = Instant::now();
        self.timed_bulk("replace_embeddings_iter", |call| {
            validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
            let first = rows.next().ok_or_else(|| {
                RepoError::invalid(
                    "a full refresh needs at least one record (use drop_embedding_type to remove a type)",
                )
            })?;
            check_replacement_record(entity_type, first.vector.len(), 0, &first)?;
            let dimension = first.vector.len();
            // The iterator cannot be replayed: the storage must be known before it is read.
            let storage = known_storage(self.storage(), call)?;
            check_storage_dimension(storage, dimension)?;
            let streams = self.refresh_streams();
            let mut all = std::iter::once(first).chain(&mut *rows);
            let half = is_f16(call, entity_type)?;
            let mut check = |i: usize, e: &Embedding| {
                check_replacement_record(entity_type, dimension, i, e)?;
                if half {
                    check_f16_record(i, e)?;
                }
                Ok(())
            };
            let copied = call.with_live_conn(|conn| {
                let plan = fresh_plan(call, entity_type, dimension, Keep::Nothing, storage, None);
                let source = Source::Iter {
                    rows: &mut all,
                    check: &mut check,
                };
                load_fresh(call, conn, plan, source, streams, &mut |_| {})
            })?;
            Ok(report(copied, dimension, started))
        })
    }

    /// Removes every vector of `entity_type`, its storage and its registered dimension (the
    /// next save fixes a new one); returns the number of vectors removed, 0 for an unknown
    /// type.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let removed = repo.drop_embedding_type("retired_items")?;
    /// # Ok(()) }
    /// ```
    pub fn drop_embedding_type(&self, entity_type: &str) -> Result<u64> {
        self.timed("drop_embedding_type", |call| {
            validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
            // A tracked write: after a lost commit reply the count stays right.
            call.run_once(|tx| {
                let removed: i64 = tx.query_one(DROP_TYPE, &[&entity_type])?.try_get(0)?;
                Ok(u64::try_from(removed).unwrap_or(0))
            })
        })
    }
}

fn report(rows: u64, dimension: usize, started: Instant) -> BatchReport {
    BatchReport {
        rows,
        bytes: rows * 4 * dimension as u64,
        elapsed: started.elapsed(),
    }
}

/// The slice form's rules, before any I/O: the batch rules, plus one type (this one) and one
/// dimension; returns the dimension.
fn check_replacement_batch(entity_type: &str, batch: &[Embedding]) -> Result<usize> {
    validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
    let Some(first) = batch.first() else {
        return Err(RepoError::invalid(
            "a full refresh needs at least one record (use drop_embedding_type to remove a type)",
        ));
    };
    if let Some(i) = batch.iter().position(|e| e.entity_type != entity_type) {
        return Err(other_type(i, entity_type, &batch[i]));
    }
    let checked = check_batch(batch).map_err(|e| match e {
        // One type per refresh: another length is a bad record here, not a registry matter.
        RepoError::DimensionMismatch { index, actual, .. } => RepoError::invalid_record(
            index.unwrap_or(0),
            format!(
                "a full refresh needs one dimension; this vector has {actual}, the first {}",
                first.vector.len()
            ),
        ),
        other => other,
    })?;
    Ok(checked.types[0].dimension)
}

/// One record of the iterator form.
fn check_replacement_record(
    entity_type: &str,
    dimension: usize,
    index: usize,
    e: &Embedding,
) -> Result<()> {
    if e.entity_type != entity_type {
        return Err(other_type(index, entity_type, e));
    }
    check_key(&e.entity_type, &e.entity_id).map_err(|err| at_index(index, err))?;
    // The values are checked as the record is encoded.
    check_shape(&e.vector).map_err(|err| at_index(index, err))?;
    if e.vector.len() != dimension {
        return Err(RepoError::invalid_record(
            index,
            format!(
                "a full refresh needs one dimension; this vector has {}, the first {dimension}",
                e.vector.len()
            ),
        ));
    }
    Ok(())
}

fn other_type(index: usize, entity_type: &str, e: &Embedding) -> RepoError {
    RepoError::invalid_record(
        index,
        format!(
            "entity type {:?} in a full refresh of {entity_type:?}",
            e.entity_type
        ),
    )
}
