//! The upsert paths, each in the load's one transaction on one connection: `Insert` (a
//! prepared single-row upsert per record), `MultiRowInsert` (upserts from arrays, a thousand
//! rows a statement) and `Copy` (binary COPY straight into the table when none of the batch's
//! keys is stored, falling back to a staged merge when one turns out to be; else COPY into a
//! temporary table and one `INSERT … ON CONFLICT` from it). Rows are written in key order, so
//! concurrent loads of overlapping keys wait for each other instead of deadlocking.

use postgres::Transaction;
use rayon::slice::ParallelSliceMut;

use crate::db::pool::PgConnection;
use crate::embeddings::check::{CheckedBatch, TypeDim};
use crate::embeddings::copy_rows::{copy_in_tx, Source, Target};
use crate::embeddings::encode::{on_cpu_pool, Prefix};
use crate::embeddings::registry::in_load_transaction;
use crate::embeddings::sql::{COLUMNS, UPSERT_ONE};
use crate::embeddings::types::{vector_bytes, Embedding, LoadMethod, Storage, VectorParam};
use crate::error::{RepoError, Result};

/// Rows per statement of `MultiRowInsert`.
const MULTI_ROW: usize = 1000;
/// `Insert` reports progress every this many rows.
const INSERT_PROGRESS_EVERY: usize = 1000;

/// Upserts the rows of an iterator (of the one type in `types`) in one transaction: COPY into
/// a temporary staging table as they come (constant memory), then one merge. Returns the
/// rows loaded. A key twice fails the merge: `InvalidInput`.
pub(crate) fn stream_merge(
    conn: &mut PgConnection,
    types: &[TypeDim<'_>],
    storage: Storage,
    source: Source<'_>,
) -> Result<u64> {
    in_load_transaction(conn, types, |tx| {
        tx.batch_execute(&create_stage(storage))?;
        let sql =
            format!("COPY pg_model_repo_embeddings_stage ({COLUMNS}) FROM STDIN (FORMAT binary)");
        let target = Target {
            sql: &sql,
            prefix: Prefix::None,
            stamps: None,
            storage,
        };
        let rows = copy_in_tx(tx, target, source, &mut |_| {})?;
        tx.execute(MERGE_STAGE, &[])
            .map_err(|e| twice_as_invalid(e.into()))?;
        Ok(rows)
    })
}

/// A merge that met a key twice ("ON CONFLICT DO UPDATE command cannot affect row a second
/// time", 21000): the load had a key twice.
fn twice_as_invalid(error: RepoError) -> RepoError {
    match error.code() {
        Some(code) if code.code() == "21000" => {
            RepoError::invalid(format!("duplicate entity_id in one load: {error}"))
        }
        _ => error,
    }
}

/// Upserts `batch` by `method` inside `tx`. `Copy` goes straight into the table when `direct`
/// (no key of the batch is known to be stored).
pub(crate) fn upsert(
    tx: &mut Transaction<'_>,
    batch: &CheckedBatch<'_>,
    method: LoadMethod,
    direct: bool,
    storage: Storage,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let records = batch.records;
    match method {
        LoadMethod::Insert => insert_rows(tx, records, storage, progress),
        LoadMethod::MultiRowInsert => insert_multi_row(tx, records, storage, progress),
        LoadMethod::Copy | LoadMethod::ParallelCopy => {
            copy_merge(tx, batch, direct, storage, progress)
        }
    }
}

/// The records in key order: loads that upsert overlapping keys lock them in one order, so
/// concurrent loads wait for each other instead of deadlocking (40P01).
fn in_key_order(records: &[Embedding]) -> Vec<&Embedding> {
    in_key_order_indexed(records)
        .into_iter()
        .map(|(_, e)| e)
        .collect()
}

/// [`in_key_order`], each record with its index in `records` (for errors).
fn in_key_order_indexed(records: &[Embedding]) -> Vec<(usize, &Embedding)> {
    fn key<'e>((_, e): &(usize, &'e Embedding)) -> (&'e str, &'e str) {
        (&e.entity_type, &e.entity_id)
    }
    let mut sorted: Vec<(usize, &Embedding)> = records.iter().enumerate().collect();
    if records.len() >= KEY_SORT_PARALLEL_MIN {
        on_cpu_pool(|| sorted.par_sort_unstable_by(|a, b| key(a).cmp(&key(b))));
    } else {
        sorted.sort_unstable_by(|a, b| key(a).cmp(&key(b)));
    }
    sorted
}

/// True when `records` are in key order already (a sorted export, a numbered range).
fn is_in_key_order(records: &[Embedding]) -> bool {
    records
        .windows(2)
        .all(|w| (&w[0].entity_type, &w[0].entity_id) <= (&w[1].entity_type, &w[1].entity_id))
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

/// (`LIMIT 1`: see `plan::TYPE_STATE`, for a Citus coordinator.)
const ANY_ROWS_OF_TYPES: &str =
    "SELECT EXISTS (SELECT 1 FROM embeddings WHERE entity_type = ANY($1::text[]) LIMIT 1)";

/// The staging table of `Copy`; its vectors are of the storage's type.
fn create_stage(storage: Storage) -> String {
    format!(
        "CREATE TEMP TABLE pg_model_repo_embeddings_stage \
         (entity_type text, entity_id text, embeddings {}, dimension int4) ON COMMIT DROP",
        storage.sql_type()
    )
}

/// Upserts the staged rows in key order (concurrent loads of overlapping keys then wait for
/// each other instead of deadlocking): `updated_at` moves to `now()`; `created_at` is left
/// alone.
const MERGE_STAGE: &str = concat!(
    insert_embeddings!(),
    "SELECT entity_type, entity_id, embeddings, dimension FROM pg_model_repo_embeddings_stage \
     ORDER BY entity_type COLLATE \"C\", entity_id COLLATE \"C\"",
    on_key_update!()
);

/// `Copy`: when `direct` (no key of the batch known to be stored), or the batch's types have
/// no rows yet, COPY straight into the table (a load of new keys then costs what the server's
/// own COPY costs); a key that turns out to be stored rolls that back to a savepoint.
/// Otherwise, and after such a rollback, COPY into a temporary staging table and merge with an
/// upsert.
fn copy_merge(
    tx: &mut Transaction<'_>,
    batch: &CheckedBatch<'_>,
    direct: bool,
    storage: Storage,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let names: Vec<&str> = batch.types.iter().map(|t| t.entity_type).collect();
    let direct = direct
        || !tx
            .query_one(ANY_ROWS_OF_TYPES, &[&names])?
            .try_get::<_, bool>(0)?;
    if direct {
        let sql = format!("COPY embeddings ({COLUMNS}) FROM STDIN (FORMAT binary)");
        let target = Target {
            sql: &sql,
            prefix: Prefix::None,
            stamps: None,
            storage,
        };
        // In key order, as every path that writes many rows: two loads of overlapping new
        // keys wait for each other instead of deadlocking.
        let keyed;
        let source = if is_in_key_order(batch.records) {
            Source::Slice(batch.records)
        } else {
            keyed = in_key_order_indexed(batch.records);
            Source::Keyed(&keyed)
        };
        let mut savepoint = tx.savepoint("pg_model_repo_direct_copy")?;
        match copy_in_tx(&mut savepoint, target, source, progress) {
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
    let target = Target {
        sql: &sql,
        prefix: Prefix::None,
        stamps: None,
        storage,
    };
    copy_in_tx(tx, target, Source::Slice(batch.records), progress)?;
    tx.execute(MERGE_STAGE, &[])?;
    Ok(())
}
