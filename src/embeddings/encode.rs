//! Embedding rows in binary COPY form (framed with `db::binary_copy`), encoded on the crate's
//! rayon pool in chunks and streamed through a bounded channel into a COPY writer.

use std::io::Write;
use std::sync::OnceLock;

use postgres::Transaction;
use rayon::prelude::*;

use crate::db::binary_copy::{self, io_error};
use crate::embeddings::types::{Embedding, Storage};
use crate::error::Result;

/// Encoded bytes per chunk: what one channel slot holds.
const CHUNK_BYTES: usize = 2 << 20;
/// Chunks waiting between the encoders and the writer.
const CHANNEL_CHUNKS: usize = 2;

/// Runs CPU work (validation, encoding) on the crate's own rayon pool: never blocking I/O,
/// never a pool checkout. Should the pool fail to start, rayon's global pool serves.
pub(crate) fn on_cpu_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(cpu_threads())
            .thread_name(|i| format!("pg-model-repo-cpu-{i}"))
            .build()
            .map_err(|e| log::warn!("pg-model-repo: no rayon pool of its own ({e})"))
            .ok()
    });
    match pool {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

/// Threads of the CPU pool: one per core.
pub(crate) fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Rows per encoded chunk, from the batch's widest vector.
fn rows_per_chunk(records: &[Embedding]) -> usize {
    let widest = records.iter().map(|e| e.vector.len()).max().unwrap_or(1);
    (CHUNK_BYTES / (4 * widest + 64)).clamp(16, 65_536)
}

/// Binary COPY rows for `records`: (entity_type, entity_id, embeddings, dimension), with the
/// load id in front when it is given, the vector in the storage's binary form.
fn encode_chunk(records: &[Embedding], load_id: Option<i64>, storage: Storage) -> Vec<u8> {
    let size: usize = records
        .iter()
        .map(|e| 32 + e.entity_type.len() + e.entity_id.len() + 4 * e.vector.len())
        .sum();
    let mut out = Vec::with_capacity(size);
    for e in records {
        match load_id {
            Some(id) => {
                binary_copy::row(&mut out, 5);
                binary_copy::int8(&mut out, id);
            }
            None => binary_copy::row(&mut out, 4),
        }
        binary_copy::field(&mut out, e.entity_type.as_bytes());
        binary_copy::field(&mut out, e.entity_id.as_bytes());
        match storage {
            Storage::Bytea => binary_copy::f32_le(&mut out, &e.vector),
            Storage::Vector => binary_copy::pgvector(&mut out, &e.vector),
        }
        binary_copy::int4(&mut out, e.vector.len() as i32);
    }
    out
}

/// Streams `records` as a binary COPY into `writer`: a plain thread has the crate's rayon pool
/// encode a few chunks at a time and hands them over a bounded channel, so at most a few
/// chunks of encoded bytes exist at once. `progress(rows)` after each chunk is written.
fn stream_rows(
    writer: &mut dyn Write,
    records: &[Embedding],
    load_id: Option<i64>,
    storage: Storage,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let per_chunk = rows_per_chunk(records);
    writer.write_all(binary_copy::HEADER).map_err(io_error)?;
    if records.len() <= per_chunk {
        writer
            .write_all(&encode_chunk(records, load_id, storage))
            .map_err(io_error)?;
        progress(records.len() as u64);
    } else {
        let (sender, receiver) = crossbeam_channel::bounded::<(usize, Vec<u8>)>(CHANNEL_CHUNKS);
        std::thread::scope(|scope| -> Result<()> {
            let encoder = std::thread::Builder::new()
                .name("pg-model-repo-encode".into())
                .spawn_scoped(scope, move || {
                    let group = per_chunk * cpu_threads();
                    for rows in records.chunks(group) {
                        let encoded: Vec<(usize, Vec<u8>)> = on_cpu_pool(|| {
                            rows.par_chunks(per_chunk)
                                .map(|c| (c.len(), encode_chunk(c, load_id, storage)))
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
    writer.write_all(&binary_copy::TRAILER).map_err(io_error)
}

/// One COPY … FROM STDIN of `records` inside `tx`; dropping the writer on error aborts it.
pub(crate) fn copy_in(
    tx: &mut Transaction<'_>,
    sql: &str,
    records: &[Embedding],
    load_id: Option<i64>,
    storage: Storage,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let mut writer = tx.copy_in(sql)?;
    stream_rows(&mut writer, records, load_id, storage, progress)?;
    Ok(writer.finish()?)
}

/// Records per encoded chunk of an iterator load (its vectors' width is known only as they
/// come: the first record's sets it).
const ITER_CHUNK_BYTES: usize = CHUNK_BYTES;

/// One COPY … FROM STDIN inside `tx` of the records an iterator yields, in constant memory:
/// each record passes `check(index, &record)` before it is buffered, and a chunk is encoded
/// and written whenever about [`ITER_CHUNK_BYTES`] are buffered. A failed check (or a failed
/// write) ends the call with that error and the COPY aborted. Returns the rows copied.
pub(crate) fn copy_in_iter(
    tx: &mut Transaction<'_>,
    sql: &str,
    rows: &mut dyn Iterator<Item = Embedding>,
    storage: Storage,
    check: &mut dyn FnMut(usize, &Embedding) -> Result<()>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let mut writer = tx.copy_in(sql)?;
    writer.write_all(binary_copy::HEADER).map_err(io_error)?;
    let mut chunk: Vec<Embedding> = Vec::new();
    let mut chunk_bytes = 0;
    let mut sent = 0u64;
    for (index, record) in rows.enumerate() {
        check(index, &record)?;
        chunk_bytes += 64 + 4 * record.vector.len();
        chunk.push(record);
        if chunk_bytes >= ITER_CHUNK_BYTES {
            writer
                .write_all(&encode_chunk(&chunk, None, storage))
                .map_err(io_error)?;
            sent += chunk.len() as u64;
            progress(sent);
            chunk.clear();
            chunk_bytes = 0;
        }
    }
    if !chunk.is_empty() {
        writer
            .write_all(&encode_chunk(&chunk, None, storage))
            .map_err(io_error)?;
        sent += chunk.len() as u64;
        progress(sent);
    }
    writer.write_all(&binary_copy::TRAILER).map_err(io_error)?;
    Ok(writer.finish()?)
}
