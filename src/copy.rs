//! Batch loads of embeddings: binary COPY encoding (rayon, in chunks, through a bounded
//! channel) and the four load paths, each an upsert in one transaction.

use std::io::Write;
use std::sync::OnceLock;

use postgres::Transaction;
use rayon::prelude::*;

use crate::embeddings::{check_registry, vector_bytes, CheckedBatch, LoadMethod, UPSERT_ONE};
use crate::error::{RepoError, Result};
use crate::pool::PgConnection;
use crate::repository::ModelRepository;
use crate::retry::Retry;
use crate::Embedding;

/// Encoded bytes per chunk: what one channel slot holds.
const CHUNK_BYTES: usize = 2 << 20;
/// Chunks waiting between the encoders and the writer.
const CHANNEL_CHUNKS: usize = 2;
/// Rows per statement of `MultiRowInsert`.
const MULTI_ROW: usize = 1000;
/// `Insert` reports progress every this many rows.
const INSERT_PROGRESS_EVERY: usize = 1000;

/// The crate's own rayon pool for CPU work (validation, encoding): never blocking I/O, never
/// a pool checkout.
pub(crate) fn cpu_pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("pg-model-repo-cpu-{i}"))
            .build()
            .expect("cannot start the pg-model-repo rayon pool")
    })
}

/// The binary COPY header: signature, flags, header extension length.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
const COPY_TRAILER: &[u8] = &(-1i16).to_be_bytes();

const COLUMNS: &str = "entity_type, entity_id, embeddings, dimension";

/// Rows per encoded chunk, from the batch's widest vector.
fn rows_per_chunk(records: &[Embedding]) -> usize {
    let widest = records.iter().map(|e| e.vector.len()).max().unwrap_or(1);
    (CHUNK_BYTES / (4 * widest + 64)).clamp(16, 65_536)
}

/// Binary COPY rows for `records`: (entity_type, entity_id, embeddings, dimension), with the
/// load id in front when it is given.
fn encode_chunk(records: &[Embedding], load_id: Option<i64>) -> Vec<u8> {
    let size: usize = records
        .iter()
        .map(|e| 32 + e.entity_type.len() + e.entity_id.len() + 4 * e.vector.len())
        .sum();
    let mut out = Vec::with_capacity(size);
    for e in records {
        match load_id {
            Some(id) => {
                out.extend_from_slice(&5i16.to_be_bytes());
                out.extend_from_slice(&8i32.to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
            }
            None => out.extend_from_slice(&4i16.to_be_bytes()),
        }
        for text in [&e.entity_type, &e.entity_id] {
            out.extend_from_slice(&(text.len() as i32).to_be_bytes());
            out.extend_from_slice(text.as_bytes());
        }
        out.extend_from_slice(&((4 * e.vector.len()) as i32).to_be_bytes());
        for v in &e.vector {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&4i32.to_be_bytes());
        out.extend_from_slice(&(e.vector.len() as i32).to_be_bytes());
    }
    out
}

/// An I/O error from the COPY writer or reader, with the database error inside it (if any)
/// brought back out, so its SQLSTATE still decides the variant and the retry.
pub(crate) fn io_error(e: std::io::Error) -> RepoError {
    if e.get_ref()
        .is_some_and(|inner| inner.is::<postgres::Error>())
    {
        if let Some(inner) = e.into_inner() {
            if let Ok(pg) = inner.downcast::<postgres::Error>() {
                return RepoError::from(*pg);
            }
        }
        return RepoError::Io(std::io::Error::other("COPY failed"));
    }
    RepoError::Io(e)
}

/// Streams `records` as a binary COPY into `writer`: a plain thread has the crate's rayon pool
/// encode a few chunks at a time and hands them over a bounded channel, so at most a few
/// chunks of encoded bytes exist at once. `progress(rows)` after each chunk is written.
fn stream_rows(
    writer: &mut dyn Write,
    records: &[Embedding],
    load_id: Option<i64>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let per_chunk = rows_per_chunk(records);
    writer.write_all(COPY_HEADER).map_err(io_error)?;
    if records.len() <= per_chunk {
        writer
            .write_all(&encode_chunk(records, load_id))
            .map_err(io_error)?;
        progress(records.len() as u64);
    } else {
        let (sender, receiver) = crossbeam_channel::bounded::<(usize, Vec<u8>)>(CHANNEL_CHUNKS);
        std::thread::scope(|scope| -> Result<()> {
            let encoder = std::thread::Builder::new()
                .name("pg-model-repo-encode".into())
                .spawn_scoped(scope, move || {
                    let group = per_chunk * cpu_pool().current_num_threads().max(1);
                    for rows in records.chunks(group) {
                        let encoded: Vec<(usize, Vec<u8>)> = cpu_pool().install(|| {
                            rows.par_chunks(per_chunk)
                                .map(|c| (c.len(), encode_chunk(c, load_id)))
                                .collect()
                        });
                        for chunk in encoded {
                            // The writer hung up (it failed): stop encoding.
                            if sender.send(chunk).is_err() {
                                return;
                            }
                        }
                    }
                })?;
            let mut written = 0u64;
            let result = receiver.iter().try_for_each(|(rows, bytes)| {
                writer.write_all(&bytes).map_err(io_error)?;
                written += rows as u64;
                progress(written);
                Ok(())
            });
            // Hang up before joining, so a blocked encoder wakes up and ends.
            drop(receiver);
            if let Err(panic) = encoder.join() {
                std::panic::resume_unwind(panic);
            }
            result
        })?;
    }
    writer.write_all(COPY_TRAILER).map_err(io_error)
}

/// One COPY … FROM STDIN of `records` inside `tx`; dropping the writer on error aborts it.
fn copy_in(
    tx: &mut Transaction<'_>,
    sql: &str,
    records: &[Embedding],
    load_id: Option<i64>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let mut writer = tx.copy_in(sql)?;
    stream_rows(&mut writer, records, load_id, progress)?;
    Ok(writer.finish()?)
}

/// How a single-connection load writes its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// Exactly this method.
    Method(LoadMethod),
    /// `batch_save_embeddings` on a large batch: decided inside the transaction by a sample
    /// of the batch's keys (see [`mostly_existing`]).
    Fastest,
}

/// Keys sampled to tell a reload from a fresh load.
const SAMPLE_KEYS: usize = 64;

/// Runs a load by `Insert`, `MultiRowInsert` or `Copy` on one connection, in one transaction.
pub(crate) fn load_on(
    conn: &mut PgConnection,
    batch: &CheckedBatch<'_>,
    path: Path,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut tx = conn.client().transaction()?;
    tx.batch_execute("SET LOCAL statement_timeout = 0")?;
    check_registry(&mut tx, &batch.types)?;
    let method = match path {
        Path::Method(method) => method,
        // Upserting existing keys straight from arrays skips the staging table, and measured
        // faster than staging + merge at every size (docs/embeddings.md); new keys go faster
        // by COPY.
        Path::Fastest if mostly_existing(&mut tx, batch.records)? => LoadMethod::MultiRowInsert,
        Path::Fastest => LoadMethod::Copy,
    };
    match method {
        LoadMethod::Insert => insert_rows(&mut tx, batch.records, progress)?,
        LoadMethod::MultiRowInsert => insert_multi_row(&mut tx, batch.records, progress)?,
        LoadMethod::Copy | LoadMethod::ParallelCopy => copy_merge(&mut tx, batch, progress)?,
    }
    tx.commit()?;
    Ok(())
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

fn insert_rows(
    tx: &mut Transaction<'_>,
    records: &[Embedding],
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let statement = tx.prepare(UPSERT_ONE)?;
    for (i, e) in records.iter().enumerate() {
        let bytes = vector_bytes(&e.vector);
        let dimension = e.vector.len() as i32;
        tx.execute(
            &statement,
            &[&e.entity_type, &e.entity_id, &bytes, &dimension],
        )?;
        if (i + 1) % INSERT_PROGRESS_EVERY == 0 || i + 1 == records.len() {
            progress(i as u64 + 1);
        }
    }
    Ok(())
}

const UPSERT_ARRAYS: &str =
    "INSERT INTO embeddings AS e (entity_type, entity_id, embeddings, dimension) \
     SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::bytea[], $4::int4[]) \
     ON CONFLICT (entity_type, entity_id) DO UPDATE \
     SET embeddings = EXCLUDED.embeddings, dimension = EXCLUDED.dimension, updated_at = now()";

fn insert_multi_row(
    tx: &mut Transaction<'_>,
    records: &[Embedding],
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let statement = tx.prepare(UPSERT_ARRAYS)?;
    let mut done = 0u64;
    for chunk in records.chunks(MULTI_ROW) {
        let types: Vec<&str> = chunk.iter().map(|e| e.entity_type.as_str()).collect();
        let ids: Vec<&str> = chunk.iter().map(|e| e.entity_id.as_str()).collect();
        let vectors: Vec<Vec<u8>> = chunk.iter().map(|e| vector_bytes(&e.vector)).collect();
        let dims: Vec<i32> = chunk.iter().map(|e| e.vector.len() as i32).collect();
        tx.execute(&statement, &[&types, &ids, &vectors, &dims])?;
        done += chunk.len() as u64;
        progress(done);
    }
    Ok(())
}

const ANY_ROWS_OF_TYPES: &str =
    "SELECT EXISTS (SELECT 1 FROM embeddings WHERE entity_type = ANY($1::text[]))";

const CREATE_STAGE: &str = "CREATE TEMP TABLE pg_model_repo_embeddings_stage \
     (entity_type text, entity_id text, embeddings bytea, dimension int4) ON COMMIT DROP";

/// Upserts the staged rows. `updated_at = now()` moves it; `created_at` is left alone.
const MERGE_STAGE: &str =
    "INSERT INTO embeddings AS e (entity_type, entity_id, embeddings, dimension) \
     SELECT entity_type, entity_id, embeddings, dimension FROM pg_model_repo_embeddings_stage \
     ON CONFLICT (entity_type, entity_id) DO UPDATE \
     SET embeddings = EXCLUDED.embeddings, dimension = EXCLUDED.dimension, updated_at = now()";

/// `Copy`: when the batch's types have no rows yet, COPY straight into the table (a fresh
/// load then costs what the server's own COPY costs); a key that appeared meanwhile rolls
/// that back to a savepoint. Otherwise, and after such a rollback, COPY into a temporary
/// staging table and merge with an upsert.
fn copy_merge(
    tx: &mut Transaction<'_>,
    batch: &CheckedBatch<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let names: Vec<&str> = batch.types.iter().map(|t| t.entity_type).collect();
    let occupied: bool = tx.query_one(ANY_ROWS_OF_TYPES, &[&names])?.try_get(0)?;
    if !occupied {
        let direct = format!("COPY embeddings ({COLUMNS}) FROM STDIN (FORMAT binary)");
        let mut savepoint = tx.savepoint("pg_model_repo_direct_copy")?;
        match copy_in(&mut savepoint, &direct, batch.records, None, progress) {
            Ok(_) => return Ok(savepoint.commit()?),
            Err(RepoError::Conflict(m)) => {
                log::debug!("pg-model-repo: direct COPY met existing keys ({m}); merging instead");
                savepoint.rollback()?;
            }
            Err(e) => return Err(e),
        }
    }
    tx.batch_execute(CREATE_STAGE)?;
    let sql = format!("COPY pg_model_repo_embeddings_stage ({COLUMNS}) FROM STDIN (FORMAT binary)");
    copy_in(tx, &sql, batch.records, None, progress)?;
    tx.execute(MERGE_STAGE, &[])?;
    Ok(())
}

/// One load id per part of a parallel load.
const NEXT_LOAD_IDS: &str = "SELECT nextval('embeddings_load_seq') FROM generate_series(1, $1)";
const MERGE_STAGED: &str = "INSERT INTO embeddings AS e (entity_type, entity_id, embeddings, dimension) \
     SELECT entity_type, entity_id, embeddings, dimension FROM embeddings_staging WHERE load_id = $1 \
     ON CONFLICT (entity_type, entity_id) DO UPDATE \
     SET embeddings = EXCLUDED.embeddings, dimension = EXCLUDED.dimension, updated_at = now()";
const CLEAR_STAGED: &str = "DELETE FROM embeddings_staging WHERE load_id = ANY($1)";

/// Rows per part of a parallel load: small enough that merging starts early, large enough
/// that a part's statements cost little.
const PART_ROWS_MIN: usize = 2048;

/// What the COPY streams tell the merging thread.
enum StreamEvent {
    /// More rows reached the server.
    Rows(u64),
    /// A part's rows are committed in staging.
    Staged(usize),
    /// A stream failed; the load fails.
    Failed(RepoError),
}

/// `ParallelCopy`: COPY streams, each on its own plain thread and connection, commit parts of
/// the batch into the shared UNLOGGED staging table (one load id per part), while the
/// caller's connection merges each committed part inside one transaction that also checks
/// the registry and finally deletes the load's staged rows; so merging overlaps staging and
/// nothing is visible in `embeddings` before that transaction commits. Any failure deletes
/// the load's staged rows. Extra connections come from `try_get` only (waiting for a second
/// connection while holding one can deadlock a small pool); with none free, the caller's
/// connection stages the parts itself first.
pub(crate) fn load_parallel(
    repo: &ModelRepository,
    batch: &CheckedBatch<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let pool = &repo.inner.pool;
    let records = batch.records;
    let streams = std::thread::available_parallelism().map_or(2, |n| n.get());
    let part_rows = records.len().div_ceil(streams * 4).max(PART_ROWS_MIN);
    let parts: Vec<&[Embedding]> = records.chunks(part_rows).collect();
    let wanted = streams.min(parts.len());
    repo.with_conn("load_embeddings", Retry::Idempotent, |conn| {
        let ids: Vec<i64> = conn
            .client()
            .query(NEXT_LOAD_IDS, &[&(parts.len() as i32)])?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()?;
        let mut extra: Vec<_> = (0..wanted).map_while(|_| pool.try_get()).collect();
        let started = std::time::Instant::now();
        let result = if extra.is_empty() {
            stage_then_merge(conn, batch, &parts, &ids, progress)
        } else {
            pipeline(repo, conn, &mut extra, batch, &parts, &ids, progress)
        };
        log::debug!(
            "pg-model-repo: parallel load of {} rows in {} parts over {} streams: {:?}",
            records.len(),
            parts.len(),
            extra.len().max(1),
            started.elapsed()
        );
        drop(extra);
        if let Err(e) = &result {
            clear_staged(repo, conn, &ids, e);
        }
        result
    })
}

/// No spare connection: stage every part on the caller's connection, then merge.
fn stage_then_merge(
    conn: &mut PgConnection,
    batch: &CheckedBatch<'_>,
    parts: &[&[Embedding]],
    ids: &[i64],
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut done = 0;
    for (rows, id) in parts.iter().zip(ids) {
        stage_part(conn, rows, *id, &mut |n| progress(done + n))?;
        done += rows.len() as u64;
    }
    let mut tx = conn.client().transaction()?;
    tx.batch_execute("SET LOCAL statement_timeout = 0")?;
    check_registry(&mut tx, &batch.types)?;
    let merge = tx.prepare(MERGE_STAGED)?;
    for id in ids {
        tx.execute(&merge, &[id])?;
    }
    tx.execute(CLEAR_STAGED, &[&ids])?;
    tx.commit()?;
    Ok(())
}

/// Streams stage parts (taking the next part from a shared queue) while this thread merges
/// each part as soon as it is committed.
fn pipeline(
    repo: &ModelRepository,
    conn: &mut PgConnection,
    extra: &mut [crate::pool::Conn],
    batch: &CheckedBatch<'_>,
    parts: &[&[Embedding]],
    ids: &[i64],
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let (queue, next_part) = crossbeam_channel::unbounded::<usize>();
    for i in 0..parts.len() {
        let _ = queue.send(i);
    }
    drop(queue);
    let (events, received) = crossbeam_channel::unbounded::<StreamEvent>();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for (n, stream_conn) in extra.iter_mut().enumerate() {
            let (next_part, stream_events, stop) = (next_part.clone(), events.clone(), &stop);
            let spawned = std::thread::Builder::new()
                .name(format!("pg-model-repo-copy-{n}"))
                .spawn_scoped(scope, move || {
                    run_stream(
                        repo,
                        stream_conn,
                        parts,
                        ids,
                        &next_part,
                        &stream_events,
                        stop,
                    )
                });
            if let Err(e) = spawned {
                let _ = events.send(StreamEvent::Failed(RepoError::Io(e)));
            }
        }
        drop(events);
        let result = merge_as_staged(conn, batch, parts.len(), ids, &received, progress);
        // On failure, streams stop after their current part; either way they end before the
        // scope does, so their parts are committed or gone when the staging is cleared.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    })
}

/// A COPY stream: stages parts from the queue until it is empty, stopped, or failing.
fn run_stream(
    repo: &ModelRepository,
    conn: &mut PgConnection,
    parts: &[&[Embedding]],
    ids: &[i64],
    next_part: &crossbeam_channel::Receiver<usize>,
    events: &crossbeam_channel::Sender<StreamEvent>,
    stop: &std::sync::atomic::AtomicBool,
) {
    while let Ok(i) = next_part.try_recv() {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut last = 0;
        let staged = stage_part(conn, parts[i], ids[i], &mut |done| {
            let _ = events.send(StreamEvent::Rows(done - last));
            last = done;
        });
        match staged {
            Ok(()) => {
                let _ = events.send(StreamEvent::Staged(i));
            }
            Err(e) => {
                repo.inner.pool.note_failure(conn, &e);
                let _ = events.send(StreamEvent::Failed(e));
                return;
            }
        }
    }
}

/// The load's one transaction: registry check, a merge per staged part as it arrives, then
/// the staged rows go.
fn merge_as_staged(
    conn: &mut PgConnection,
    batch: &CheckedBatch<'_>,
    parts: usize,
    ids: &[i64],
    events: &crossbeam_channel::Receiver<StreamEvent>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut tx = conn.client().transaction()?;
    tx.batch_execute("SET LOCAL statement_timeout = 0")?;
    check_registry(&mut tx, &batch.types)?;
    let merge = tx.prepare(MERGE_STAGED)?;
    let (mut merged, mut sent) = (0, 0u64);
    while merged < parts {
        match events.recv() {
            Ok(StreamEvent::Rows(n)) => {
                sent += n;
                progress(sent);
            }
            Ok(StreamEvent::Staged(i)) => {
                let started = std::time::Instant::now();
                tx.execute(&merge, &[&ids[i]])?;
                log::trace!("pg-model-repo: merged part {i} in {:?}", started.elapsed());
                merged += 1;
            }
            Ok(StreamEvent::Failed(e)) => return Err(e),
            Err(_) => {
                return Err(RepoError::Io(std::io::Error::other(
                    "every COPY stream ended before the load was staged",
                )))
            }
        }
    }
    let started = std::time::Instant::now();
    tx.execute(CLEAR_STAGED, &[&ids])?;
    tx.commit()?;
    log::trace!(
        "pg-model-repo: cleared and committed in {:?}",
        started.elapsed()
    );
    Ok(())
}

/// COPYs one part into staging in its own committed transaction.
fn stage_part(
    conn: &mut PgConnection,
    rows: &[Embedding],
    load_id: i64,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut tx = conn.client().transaction()?;
    tx.batch_execute("SET LOCAL statement_timeout = 0")?;
    let sql = format!("COPY embeddings_staging (load_id, {COLUMNS}) FROM STDIN (FORMAT binary)");
    let started = std::time::Instant::now();
    copy_in(&mut tx, &sql, rows, Some(load_id), progress)?;
    tx.commit()?;
    log::trace!(
        "pg-model-repo: staged load id {load_id} in {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Deletes a failed load's staged rows, on its own connection if that still works, else on a
/// fresh one. A failure here is logged: the rows stay until someone deletes them (they are
/// tagged with the load's ids and never merged).
fn clear_staged(repo: &ModelRepository, conn: &mut PgConnection, ids: &[i64], cause: &RepoError) {
    let attempt = |conn: &mut PgConnection| -> Result<u64> {
        let mut tx = conn.client().transaction()?;
        tx.batch_execute("SET LOCAL statement_timeout = 0")?;
        let n = tx.execute(CLEAR_STAGED, &[&ids])?;
        tx.commit()?;
        Ok(n)
    };
    let cleared = if conn.is_broken() {
        Err(RepoError::Pool("connection broken".into()))
    } else {
        attempt(conn)
    }
    .or_else(|_| {
        let mut fresh = repo.inner.pool.get()?;
        attempt(&mut fresh)
    });
    match cleared {
        Ok(n) => log::debug!("pg-model-repo: parallel load failed ({cause}); cleared {n} staged rows"),
        Err(e) => log::warn!(
            "pg-model-repo: parallel load failed ({cause}) and its staged rows could not be \
             cleared ({e}); delete them with: DELETE FROM embeddings_staging WHERE load_id IN {ids:?}"
        ),
    }
}
