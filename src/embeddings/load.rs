//! Batch loads: the plan (which method writes a batch, chosen in one place), the
//! single-connection paths (`Insert`, `MultiRowInsert`, `Copy`, each an upsert in one
//! transaction) and the public load methods. `ParallelCopy` lives in `parallel`.

use std::time::Instant;

use postgres::Transaction;
use rayon::slice::ParallelSliceMut;

use crate::db::pool::PgConnection;
use crate::db::retry::Retry;
use crate::embeddings::check::{at_index, check_batch, CheckedBatch};
use crate::embeddings::encode::{copy_in, on_cpu_pool};
use crate::embeddings::parallel::load_parallel;
use crate::embeddings::registry::in_load_transaction;
use crate::embeddings::sql::{COLUMNS, UPSERT_ONE};
use crate::embeddings::store::with_storage;
use crate::embeddings::types::{
    check_storage_dimension, vector_bytes, BatchReport, Embedding, LoadMethod, Storage, VectorParam,
};
use crate::error::{RepoError, Result};
use crate::repository::ModelRepository;

/// Rows per statement of `MultiRowInsert`.
const MULTI_ROW: usize = 1000;
/// `Insert` reports progress every this many rows.
const INSERT_PROGRESS_EVERY: usize = 1000;
/// Keys sampled to tell a reload from a fresh load.
const SAMPLE_KEYS: usize = 64;

/// Below this many records `batch_save_embeddings` upserts by `MultiRowInsert`. From here on
/// it samples 64 of the batch's keys inside the transaction: when at least half are stored
/// already (a reload) it still upserts from arrays, which skips the staging table; otherwise
/// it loads by `Copy`. Measured with `cargo run --release --example load_bench --
/// --crossover` (docs/embeddings.md).
pub const BATCH_COPY_CROSSOVER: usize = 300;

/// What the caller asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Exactly this method.
    Method(LoadMethod),
    /// `batch_save_embeddings`: the fastest correct method for the batch (see [`choose`]).
    Fastest,
}

/// The one place a load method is chosen. `mostly_existing` samples the table, and is only
/// asked for a large batch of `Plan::Fastest`: upserting existing keys straight from arrays
/// skips the staging table and measured faster than staging + merge at every size
/// (docs/embeddings.md); new keys go faster by COPY.
fn choose(
    plan: Plan,
    rows: usize,
    mostly_existing: impl FnOnce() -> Result<bool>,
) -> Result<LoadMethod> {
    Ok(match plan {
        Plan::Method(method) => method,
        Plan::Fastest if rows < BATCH_COPY_CROSSOVER => LoadMethod::MultiRowInsert,
        Plan::Fastest if mostly_existing()? => LoadMethod::MultiRowInsert,
        Plan::Fastest => LoadMethod::Copy,
    })
}

/// Runs a load by `Insert`, `MultiRowInsert` or `Copy` on one connection, in one transaction.
fn load_on(
    conn: &mut PgConnection,
    batch: &CheckedBatch<'_>,
    plan: Plan,
    storage: Storage,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    in_load_transaction(conn, batch, |tx| {
        let records = batch.records;
        let method = choose(plan, records.len(), || mostly_existing(tx, records))?;
        match method {
            LoadMethod::Insert => insert_rows(tx, records, storage, progress),
            LoadMethod::MultiRowInsert => insert_multi_row(tx, records, storage, progress),
            LoadMethod::Copy | LoadMethod::ParallelCopy => copy_merge(tx, batch, storage, progress),
        }
    })
}

const COUNT_EXISTING: &str = "SELECT count(*) FROM unnest($1::text[], $2::text[]) AS k(t, i) \
     JOIN embeddings e ON e.entity_type = k.t AND e.entity_id = k.i";

/// True when at least half of an evenly spaced sample of the batch's keys is stored already.
fn mostly_existing(tx: &mut Transaction<'_>, records: &[Embedding]) -> Result<bool> {
    let step = records.len().div_ceil(SAMPLE_KEYS).max(1);
    let sample: Vec<&Embedding> = records.iter().step_by(step).collect();
    let types: Vec<&str> = sample.iter().map(|e| e.entity_type.as_str()).collect();
    let ids: Vec<&str> = sample.iter().map(|e| e.entity_id.as_str()).collect();
    let existing: i64 = tx.query_one(COUNT_EXISTING, &[&types, &ids])?.try_get(0)?;
    Ok(existing as usize * 2 >= sample.len())
}

/// The records in key order: loads that upsert overlapping keys lock them in one order, so
/// concurrent loads wait for each other instead of deadlocking (40P01).
fn in_key_order(records: &[Embedding]) -> Vec<&Embedding> {
    fn key(e: &Embedding) -> (&str, &str) {
        (&e.entity_type, &e.entity_id)
    }
    let mut sorted: Vec<&Embedding> = records.iter().collect();
    if records.len() >= KEY_SORT_PARALLEL_MIN {
        on_cpu_pool(|| sorted.par_sort_unstable_by(|a, b| key(a).cmp(&key(b))));
    } else {
        sorted.sort_unstable_by(|a, b| key(a).cmp(&key(b)));
    }
    sorted
}

/// Batches at least this long are sorted on the crate's rayon pool.
const KEY_SORT_PARALLEL_MIN: usize = 16_384;

fn insert_rows(
    tx: &mut Transaction<'_>,
    records: &[Embedding],
    storage: Storage,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let statement = tx.prepare(UPSERT_ONE)?;
    for (i, e) in in_key_order(records).into_iter().enumerate() {
        let value = VectorParam::new(storage, &e.vector);
        let dimension = e.vector.len() as i32;
        tx.execute(
            &statement,
            &[&e.entity_type, &e.entity_id, value.sql(), &dimension],
        )?;
        if (i + 1) % INSERT_PROGRESS_EVERY == 0 || i + 1 == records.len() {
            progress(i as u64 + 1);
        }
    }
    Ok(())
}

/// The upsert from arrays; `$3` is an array of the storage's type.
fn upsert_arrays(storage: Storage) -> String {
    format!(
        concat!(
            insert_embeddings!(),
            "SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::{}[], $4::int4[])",
            on_key_update!()
        ),
        storage.sql_type()
    )
}

fn insert_multi_row(
    tx: &mut Transaction<'_>,
    records: &[Embedding],
    storage: Storage,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let statement = tx.prepare(&upsert_arrays(storage))?;
    let mut done = 0u64;
    for chunk in in_key_order(records).chunks(MULTI_ROW) {
        let types: Vec<&str> = chunk.iter().map(|e| e.entity_type.as_str()).collect();
        let ids: Vec<&str> = chunk.iter().map(|e| e.entity_id.as_str()).collect();
        let dims: Vec<i32> = chunk.iter().map(|e| e.vector.len() as i32).collect();
        match storage {
            Storage::Bytea => {
                let vectors: Vec<Vec<u8>> = chunk.iter().map(|e| vector_bytes(&e.vector)).collect();
                tx.execute(&statement, &[&types, &ids, &vectors, &dims])?
            }
            Storage::Vector => {
                let vectors: Vec<pgvector::Vector> = chunk
                    .iter()
                    .map(|e| pgvector::Vector::from(e.vector.clone()))
                    .collect();
                tx.execute(&statement, &[&types, &ids, &vectors, &dims])?
            }
        };
        done += chunk.len() as u64;
        progress(done);
    }
    Ok(())
}

const ANY_ROWS_OF_TYPES: &str =
    "SELECT EXISTS (SELECT 1 FROM embeddings WHERE entity_type = ANY($1::text[]))";

/// The staging table of `Copy`; its vectors are of the storage's type.
fn create_stage(storage: Storage) -> String {
    format!(
        "CREATE TEMP TABLE pg_model_repo_embeddings_stage \
         (entity_type text, entity_id text, embeddings {}, dimension int4) ON COMMIT DROP",
        storage.sql_type()
    )
}

/// Upserts the staged rows: `updated_at` moves to `now()`; `created_at` is left alone.
const MERGE_STAGE: &str = concat!(
    insert_embeddings!(),
    "SELECT entity_type, entity_id, embeddings, dimension FROM pg_model_repo_embeddings_stage",
    on_key_update!()
);

/// `Copy`: when the batch's types have no rows yet, COPY straight into the table (a fresh
/// load then costs what the server's own COPY costs); a key that appeared meanwhile rolls
/// that back to a savepoint. Otherwise, and after such a rollback, COPY into a temporary
/// staging table and merge with an upsert.
fn copy_merge(
    tx: &mut Transaction<'_>,
    batch: &CheckedBatch<'_>,
    storage: Storage,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let names: Vec<&str> = batch.types.iter().map(|t| t.entity_type).collect();
    let occupied: bool = tx.query_one(ANY_ROWS_OF_TYPES, &[&names])?.try_get(0)?;
    if !occupied {
        let direct = format!("COPY embeddings ({COLUMNS}) FROM STDIN (FORMAT binary)");
        let mut savepoint = tx.savepoint("pg_model_repo_direct_copy")?;
        match copy_in(
            &mut savepoint,
            &direct,
            batch.records,
            None,
            storage,
            progress,
        ) {
            Ok(_) => return Ok(savepoint.commit()?),
            Err(RepoError::Conflict(m)) => {
                log::debug!("pg-model-repo: direct COPY met existing keys ({m}); merging instead");
                savepoint.rollback()?;
            }
            Err(e) => return Err(e),
        }
    }
    tx.batch_execute(&create_stage(storage))?;
    let sql = format!("COPY pg_model_repo_embeddings_stage ({COLUMNS}) FROM STDIN (FORMAT binary)");
    copy_in(tx, &sql, batch.records, None, storage, progress)?;
    tx.execute(MERGE_STAGE, &[])?;
    Ok(())
}

impl ModelRepository {
    /// Saves a batch by the fastest correct method for it: multi-row upserts below
    /// [`BATCH_COPY_CROSSOVER`] records or when most of its keys exist already, binary COPY
    /// otherwise. All or nothing: any
    /// invalid record (or a key twice in the batch) fails the call, naming the first
    /// offending record, and nothing is written.
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

    fn load(
        &self,
        op: &'static str,
        batch: &[Embedding],
        plan: Plan,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BatchReport> {
        let started = Instant::now();
        self.timed(op, |call| {
            let checked = check_batch(batch)?;
            if !batch.is_empty() {
                let total = batch.len() as u64;
                let mut report = |done: u64| progress(done, total);
                with_storage(self.storage(), call, |storage| {
                    for t in &checked.types {
                        check_storage_dimension(storage, t.dimension)
                            .map_err(|e| at_index(t.first_index, e))?;
                    }
                    if plan == Plan::Method(LoadMethod::ParallelCopy) {
                        load_parallel(call, &checked, storage, &mut report)
                    } else {
                        call.with_conn(Retry::Idempotent, |conn| {
                            load_on(conn, &checked, plan, storage, &mut report)
                        })
                    }
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
