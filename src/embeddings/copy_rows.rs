//! The COPY of embedding rows, over one connection or several at once. Three stages run at
//! the same time: the rows are handed out in chunks (from a slice, or pulled from the caller's
//! iterator on the caller's thread), checked and encoded on the crate's rayon pool (one pass
//! over each vector: `encode::encode_chunk`), and written by one COPY per connection, each
//! taking the next encoded chunk as soon as it is free. Memory stays bounded by a few chunks
//! whatever the number of rows.
//!
//! One connection writes inside the caller's transaction; several each write in a transaction
//! of their own, committed when the rows run out (the caller makes that safe: the table they
//! fill is not visible until the load's last transaction). Any failure (a record refused, a
//! connection lost, a stream or the caller's iterator panicking) stops every stage, and no
//! stream commits unless every row was encoded and handed out.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread::ScopedJoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use postgres::{CopyInWriter, Transaction};
use rayon::prelude::*;

use crate::db::binary_copy::{self, io_error};
use crate::db::pool::{begin_unbounded, PgConnection, Pool};
use crate::embeddings::encode::{
    cpu_threads, encode_chunk, encode_indexed, on_cpu_pool, rows_per_chunk, Prefix,
};
use crate::embeddings::stamps::Stamps;
use crate::embeddings::types::{Embedding, Storage};
use crate::error::{RepoError, Result};

/// Where the rows come from.
pub(crate) enum Source<'a> {
    /// A batch already checked (keys, dimensions, duplicates); its values are checked as they
    /// are encoded.
    Slice(&'a [Embedding]),
    /// A part of such a batch, whose first record has this index in it (for errors).
    Part(&'a [Embedding], usize),
    /// Such a batch in another order (key order), each record with its index in the batch.
    Keyed(&'a [(usize, &'a Embedding)]),
    /// The caller's iterator, pulled on the caller's thread; each record passes
    /// `check(index, &record)` before it is queued.
    Iter {
        rows: &'a mut dyn Iterator<Item = Embedding>,
        check: &'a mut dyn FnMut(usize, &Embedding) -> Result<()>,
    },
}

/// What the rows are copied into: the COPY statement (`COPY … FROM STDIN (FORMAT binary)`)
/// and how each row is formed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Target<'a> {
    pub(crate) sql: &'a str,
    pub(crate) prefix: Prefix,
    /// created_at and updated_at after each record, when given (see `Stamps`).
    pub(crate) stamps: Option<&'a Stamps>,
    pub(crate) storage: Storage,
}

/// Copies every row of `source` inside `tx`; returns the rows the server counted.
/// `progress(rows)` runs on the caller's thread as rows go out (for a slice).
pub(crate) fn copy_in_tx(
    tx: &mut Transaction<'_>,
    target: Target<'_>,
    source: Source<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let writer = move |chunks: &Chunks<'_>| -> Written {
        let copy = tx.copy_in(target.sql)?;
        write_copy(copy, chunks)
    };
    run(vec![Box::new(writer)], target, source, progress)
}

/// Copies every row of `source` over `conns` at once, each in a transaction of its own
/// committed when the rows run out; returns the rows the server counted, summed. A
/// connection that fails is reported to `pool` (and not reused when broken).
pub(crate) fn copy_in_streams(
    pool: &Pool,
    conns: Vec<&mut PgConnection>,
    target: Target<'_>,
    source: Source<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let writers: Vec<Writer<'_>> = conns
        .into_iter()
        .map(|conn| {
            Box::new(move |chunks: &Chunks<'_>| -> Written {
                let written = stream_committed(conn, target.sql, chunks);
                if let Err(Failure::Error(e)) = &written {
                    pool.note_failure(conn, e);
                }
                written
            }) as Writer<'_>
        })
        .collect();
    run(writers, target, source, progress)
}

/// One stream's transaction: the COPY, then the commit once every row was handed out.
fn stream_committed(conn: &mut PgConnection, sql: &str, chunks: &Chunks<'_>) -> Written {
    let mut tx = begin_unbounded(conn)?;
    let rows = write_copy(tx.copy_in(sql)?, chunks)?;
    tx.commit()?;
    Ok(rows)
}

/// Writes encoded chunks into one COPY until they run out: finishes it when every row was
/// encoded, else drops it (the server aborts the COPY).
fn write_copy(mut copy: CopyInWriter<'_>, chunks: &Chunks<'_>) -> Written {
    use std::io::Write;
    copy.write_all(binary_copy::HEADER).map_err(io_error)?;
    while let Some(chunk) = chunks.next() {
        copy.write_all(&chunk.bytes).map_err(io_error)?;
        chunks.written(chunk.rows);
    }
    if !chunks.complete() {
        return Err(Failure::Stopped);
    }
    copy.write_all(&binary_copy::TRAILER).map_err(io_error)?;
    Ok(copy.finish()?)
}

/// How a stage ends without its rows written.
enum Failure {
    /// Another stage failed first (or the caller panicked): that failure is the one reported.
    Stopped,
    /// This stage's own failure.
    Error(RepoError),
}

impl From<RepoError> for Failure {
    fn from(e: RepoError) -> Self {
        Failure::Error(e)
    }
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Self {
        Failure::Error(e.into())
    }
}

/// What a stream's COPY wrote: the rows the server counted.
type Written = std::result::Result<u64, Failure>;

/// A stream: consumes encoded chunks, returns the rows its COPY wrote.
type Writer<'w> = Box<dyn FnOnce(&Chunks<'_>) -> Written + Send + 'w>;

/// Rows handed to the encoder: a part of the caller's slice, or records pulled from its
/// iterator.
enum Raw<'a> {
    Borrowed(&'a [Embedding]),
    Owned(Vec<Embedding>),
    Keyed(&'a [(usize, &'a Embedding)]),
}

impl Raw<'_> {
    fn len(&self) -> usize {
        match self {
            Raw::Borrowed(records) => records.len(),
            Raw::Owned(records) => records.len(),
            Raw::Keyed(records) => records.len(),
        }
    }

    /// The rows in COPY's binary format; `first` is the index of a slice's first record.
    fn encode(&self, first: usize, target: &Target<'_>) -> Result<Vec<u8>> {
        let (prefix, stamps, storage) = (target.prefix, target.stamps, target.storage);
        match self {
            Raw::Borrowed(records) => encode_chunk(records, first, prefix, stamps, storage),
            Raw::Owned(records) => encode_chunk(records, first, prefix, stamps, storage),
            Raw::Keyed(records) => {
                let indexed = records.iter().map(|(i, e)| (*i, *e));
                encode_indexed(indexed, prefix, stamps, storage)
            }
        }
    }
}

/// An encoded chunk: its rows in binary COPY form.
struct Encoded {
    rows: usize,
    bytes: Vec<u8>,
}

/// What every stage shares: the stop flag, the first failure, whether every row was encoded,
/// and the channels between the stages.
struct Shared {
    stop: AtomicBool,
    failure: Mutex<Option<RepoError>>,
    encoded_all: AtomicBool,
}

impl Shared {
    /// Records the first failure and stops every stage.
    fn fail(&self, error: RepoError) {
        let mut first = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(error);
        self.stop.store(true, Ordering::Release);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// Stops every stage when dropped while unwinding: a panicking stage never leaves the others
/// waiting, and never lets a stream commit.
struct StopOnPanic<'a>(&'a Shared);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop.store(true, Ordering::Release);
        }
    }
}

/// A stream's view of the encoded chunks.
struct Chunks<'s> {
    receiver: Receiver<Encoded>,
    shared: &'s Shared,
    progress: Sender<u64>,
}

impl Chunks<'_> {
    /// The next chunk, or `None` when they ran out or the load stopped.
    fn next(&self) -> Option<Encoded> {
        if self.shared.stopped() {
            return None;
        }
        let chunk = self.receiver.recv().ok()?;
        (!self.shared.stopped()).then_some(chunk)
    }

    fn written(&self, rows: usize) {
        let _ = self.progress.send(rows as u64);
    }

    /// Every row was encoded and handed out, and nothing failed.
    fn complete(&self) -> bool {
        self.shared.encoded_all.load(Ordering::Acquire) && !self.shared.stopped()
    }
}

/// Runs the three stages: the source on the caller's thread (an iterator) or a thread of its
/// own (a slice), the encoder on its own thread (encoding on the rayon pool), one thread per
/// writer. Returns the rows written, or the first failure once every stage has ended; a
/// panic in any stage resumes on the caller's thread after the others ended.
fn run(
    writers: Vec<Writer<'_>>,
    target: Target<'_>,
    source: Source<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let shared = Shared {
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        encoded_all: AtomicBool::new(false),
    };
    let streams = writers.len();
    let (raw_tx, raw_rx) = bounded::<(usize, Raw<'_>)>(2 * cpu_threads());
    let (encoded_tx, encoded_rx) = bounded::<Encoded>(streams + 1);
    let (progress_tx, progress_rx) = unbounded::<u64>();
    let (written, panic) = std::thread::scope(|scope| {
        let mut handles: Vec<ScopedJoinHandle<'_, Option<u64>>> = Vec::new();
        let encoder = {
            let shared = &shared;
            std::thread::Builder::new()
                .name("pg-model-repo-encode".into())
                .spawn_scoped(scope, move || {
                    let _guard = StopOnPanic(shared);
                    encode_all(&raw_rx, &encoded_tx, target, shared);
                })
        };
        if let Err(e) = &encoder {
            shared.fail(RepoError::Io(std::io::Error::other(e.to_string())));
        }
        for (n, writer) in writers.into_iter().enumerate() {
            let chunks = Chunks {
                receiver: encoded_rx.clone(),
                shared: &shared,
                progress: progress_tx.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("pg-model-repo-copy-{n}"))
                .spawn_scoped(scope, move || {
                    let _guard = StopOnPanic(chunks.shared);
                    match writer(&chunks) {
                        Ok(rows) => Some(rows),
                        Err(Failure::Error(e)) => {
                            chunks.shared.fail(e);
                            None
                        }
                        Err(Failure::Stopped) => None,
                    }
                });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => shared.fail(RepoError::Io(e)),
            }
        }
        drop(encoded_rx);
        drop(progress_tx);
        let produced = catch_unwind(AssertUnwindSafe(|| {
            produce(source, &raw_tx, &shared, scope)
        }));
        let mut panic = produced.err();
        if panic.is_some() {
            // Before the encoder can see the rows end: nothing may commit.
            shared.stop.store(true, Ordering::Release);
        }
        drop(raw_tx);
        // Progress is reported on this thread while the streams write.
        let mut done = 0u64;
        for rows in progress_rx.iter() {
            done += rows;
            if panic.is_none() {
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| progress(done))) {
                    shared.stop.store(true, Ordering::Release);
                    panic = Some(p);
                }
            }
        }
        let mut written = 0u64;
        for handle in handles {
            match handle.join() {
                Ok(Some(rows)) => written += rows,
                Ok(None) => {}
                Err(p) => {
                    panic.get_or_insert(p);
                }
            }
        }
        if let Ok(encoder) = encoder {
            if let Err(p) = encoder.join() {
                panic.get_or_insert(p);
            }
        }
        (written, panic)
    });
    if let Some(panic) = panic {
        resume_unwind(panic);
    }
    match shared
        .failure
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        Some(error) => Err(error),
        None if shared.encoded_all.load(Ordering::Acquire) => Ok(written),
        None => Err(RepoError::Io(std::io::Error::other(
            "the COPY stopped before every row was encoded",
        ))),
    }
}

/// Hands the rows to the encoder in chunks: a slice's parts from a thread of their own (the
/// caller's thread reports progress meanwhile), an iterator's records from the caller's
/// thread (it is not `Send`).
fn produce<'scope, 'env, 'a: 'scope>(
    source: Source<'a>,
    raw: &Sender<(usize, Raw<'a>)>,
    shared: &'scope Shared,
    scope: &'scope std::thread::Scope<'scope, 'env>,
) {
    match source {
        Source::Slice(records) => produce(Source::Part(records, 0), raw, shared, scope),
        Source::Part(records, offset) => {
            let per_chunk =
                rows_per_chunk(records.iter().map(|e| e.vector.len()).max().unwrap_or(1));
            let raw = raw.clone();
            let spawned = std::thread::Builder::new()
                .name("pg-model-repo-rows".into())
                .spawn_scoped(scope, move || {
                    for (n, part) in records.chunks(per_chunk).enumerate() {
                        let first = offset + n * per_chunk;
                        if shared.stopped() || raw.send((first, Raw::Borrowed(part))).is_err() {
                            return;
                        }
                    }
                });
            if let Err(e) = spawned {
                shared.fail(RepoError::Io(e));
            }
        }
        Source::Keyed(records) => {
            let per_chunk = rows_per_chunk(
                records
                    .iter()
                    .map(|(_, e)| e.vector.len())
                    .max()
                    .unwrap_or(1),
            );
            let raw = raw.clone();
            let spawned = std::thread::Builder::new()
                .name("pg-model-repo-rows".into())
                .spawn_scoped(scope, move || {
                    for part in records.chunks(per_chunk) {
                        if shared.stopped() || raw.send((0, Raw::Keyed(part))).is_err() {
                            return;
                        }
                    }
                });
            if let Err(e) = spawned {
                shared.fail(RepoError::Io(e));
            }
        }
        Source::Iter { rows, check } => {
            let mut chunk: Vec<Embedding> = Vec::new();
            let mut per_chunk = 0;
            let mut first = 0;
            for (index, record) in rows.enumerate() {
                if shared.stopped() {
                    return;
                }
                if let Err(e) = check(index, &record) {
                    shared.fail(e);
                    return;
                }
                if per_chunk == 0 {
                    per_chunk = rows_per_chunk(record.vector.len());
                    chunk.reserve(per_chunk);
                }
                chunk.push(record);
                if chunk.len() == per_chunk {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(per_chunk));
                    if raw.send((first, Raw::Owned(full))).is_err() {
                        return;
                    }
                    first = index + 1;
                }
            }
            if !chunk.is_empty() {
                let _ = raw.send((first, Raw::Owned(chunk)));
            }
        }
    }
}

/// The encoder: takes up to one chunk per core at a time, encodes them in parallel and passes
/// them on in order. The first record refused (the lowest index: chunks come in order and a
/// group is encoded whole) stops the load.
fn encode_all(
    raw: &Receiver<(usize, Raw<'_>)>,
    encoded: &Sender<Encoded>,
    target: Target<'_>,
    shared: &Shared,
) {
    let group = cpu_threads();
    while let Ok(first) = raw.recv() {
        let mut batch = vec![first];
        while batch.len() < group {
            match raw.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let encode = |(index, rows): &(usize, Raw<'_>)| {
            rows.encode(*index, &target).map(|bytes| Encoded {
                rows: rows.len(),
                bytes,
            })
        };
        let results: Vec<Result<Encoded>> = if batch.len() == 1 {
            batch.iter().map(encode).collect()
        } else {
            on_cpu_pool(|| batch.par_iter().map(encode).collect())
        };
        for result in results {
            if shared.stopped() {
                return;
            }
            match result {
                Ok(chunk) => {
                    if encoded.send(chunk).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    shared.fail(e);
                    return;
                }
            }
        }
    }
    // The sender hung up: every row was handed out, unless the load stopped.
    if !shared.stopped() {
        shared.encoded_all.store(true, Ordering::Release);
    }
}
