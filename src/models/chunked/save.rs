//! Saving a chunked model: the caller's thread cuts the bytes into chunks (reading ahead into
//! at most `streams + 1` buffers when they come from a reader) and hashes the whole model;
//! stream threads, each on its own connection, COPY chunks into `ml_model_chunks` under the
//! save's chunk set, committed batch by batch; one short transaction then publishes the set
//! by writing the `ml_models` row, so a reader never sees a partial model.

use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;

use crossbeam_channel::{Receiver, Sender};
use postgres::Client;
use sha2::{Digest, Sha256};

use crate::db::binary_copy::{self, io_error};
use crate::db::call::Call;
use crate::db::deadline::stream_from_here;
use crate::db::pool::{begin_unbounded, Conn, PgConnection, PoisonOnPanic, Pool};
use crate::db::retry::Retry;
use crate::db::to_hex;
use crate::error::{RepoError, Result};
use crate::models::chunked::{delete_sets, set_lock_key, Chunks, DELETE_UNREFERENCED_SET};
use crate::models::versions::{
    compare_with_stored, info_columns, saved_meanwhile, ModelInfo, SaveRequest, Stored,
};

/// A new chunk set id, locked (session advisory lock) by this connection while the save lives.
const OPEN_SET: &str = concat!(
    "SELECT id, pg_advisory_lock(",
    set_lock_key!("id"),
    ") FROM (SELECT nextval('ml_model_chunk_sets') AS id) s"
);
const CLOSE_SET: &str = concat!("SELECT pg_advisory_unlock(", set_lock_key!("$1"), ")");

/// The checksum comes after the bytes: it is computed as they are sent.
const COPY_CHUNK: &str = "COPY ml_model_chunks \
     (model_name, version, chunk_set, chunk_no, data, checksum) FROM STDIN (FORMAT binary)";

/// A staged chunk's commit need not wait for its WAL to reach disk: the publish's commit
/// flushes the WAL up to itself, every staged chunk of the save included (and a crash before
/// the publish loses only a save that had not happened).
const STAGE_WITHOUT_FLUSH: &str = "SET LOCAL synchronous_commit = off";

/// Marks the staged chunks published (`staged_at` NULL: a sweep that started before this
/// transaction and waits on these rows skips them once it commits) and counts them and their
/// bytes, to publish only a whole set.
const TOUCH_SET: &str = "WITH t AS (UPDATE ml_model_chunks SET staged_at = NULL \
        WHERE model_name = $1 AND version = $2 AND chunk_set = $3 \
        RETURNING octet_length(data) AS n) \
     SELECT count(*)::int8, coalesce(sum(n), 0)::int8 FROM t";

const DELETE_INACTIVE: &str = "DELETE FROM ml_models \
     WHERE model_name = $1 AND version = $2 AND NOT is_active RETURNING chunk_set";

/// model_data stays NULL: a reader that does not know about chunks must not take it for a
/// model of 0 bytes (sql/V009).
const INSERT_CHUNKED: &str = concat!(
    "INSERT INTO ml_models AS m (model_name, version, model_data, metadata, checksum, \
        size_bytes, chunk_size, chunk_count, chunk_set)
     VALUES ($1, $2, NULL, $3, $4, $5, $6, $7, $8)
     ON CONFLICT (model_name, version) DO NOTHING RETURNING ",
    info_columns!(),
    ", m.save_seq"
);

/// The most chunks a stream sends in one transaction and one COPY (64 MiB at the default
/// chunk size): enough for the connection to carry the next chunk while the server stores the
/// last, few enough that no transaction lasts long.
const BATCH_CHUNKS: usize = 16;

/// Bytes handed to the COPY writer at once: the writer copies each write into its buffer, so
/// writing a whole chunk at once would briefly hold it twice.
const WRITE_PIECE: usize = 64 << 10;

/// Where a chunked save's bytes come from.
pub(crate) enum ChunkSource<'a> {
    /// The caller's bytes, in memory; their checksum is in the request.
    Slice(&'a [u8]),
    /// A reader, with the chunks already read from it (to tell it is larger than one chunk).
    Reader(ChunkReader<'a>, Vec<Vec<u8>>),
}

/// Reads a model chunk by chunk, hashing and counting it, refusing more than `max` bytes.
pub(crate) struct ChunkReader<'a> {
    reader: &'a mut dyn Read,
    chunk_size: usize,
    max: u64,
    len: u64,
    hasher: Sha256,
}

impl<'a> ChunkReader<'a> {
    pub(crate) fn new(reader: &'a mut dyn Read, chunk_size: u32, max: u64) -> Self {
        ChunkReader {
            reader,
            chunk_size: chunk_size as usize,
            max,
            len: 0,
            hasher: Sha256::new(),
        }
    }

    /// Fills `buf` with the next chunk (shorter only at the end; empty at the end). More than
    /// `max` bytes in all is `InvalidInput`. Only the bytes read are touched: a small model
    /// costs little more than its size.
    pub(crate) fn fill(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        buf.reserve_exact(self.chunk_size);
        // One byte past the limit is enough to know it was passed.
        let allowed = (self.max - self.len).saturating_add(1);
        let limit = (self.chunk_size as u64).min(allowed);
        let n = (&mut *self.reader).take(limit).read_to_end(buf)?;
        self.len += n as u64;
        if self.len > self.max {
            return Err(RepoError::invalid(format!(
                "model is larger than max_model_size ({} bytes)",
                self.max
            )));
        }
        self.hasher.update(&buf[..]);
        Ok(())
    }

    /// Bytes read so far and their sha256 (hex).
    pub(crate) fn finish(self) -> (u64, String) {
        (self.len, to_hex(&self.hasher.finalize()))
    }
}

/// The save's parameters that stay fixed across attempts.
pub(crate) struct ChunkedSave<'a> {
    pub request: &'a SaveRequest<'a>,
    pub chunk_size: u32,
    pub streams: usize,
}

/// Saves a model larger than one chunk: stages its chunks over up to `streams` connections,
/// then publishes them in one short transaction. A slice is re-sent whole on a transient
/// failure; a reader cannot be re-read, so only the publish step is repeated (it recognizes
/// its own earlier commit). Any failure removes the staged chunks (or leaves them to the
/// sweep when no connection is left to do it): nothing of a failed save is ever visible.
pub(crate) fn save_chunked(
    call: &Call<'_>,
    save: &ChunkedSave<'_>,
    source: ChunkSource<'_>,
) -> Result<ModelInfo> {
    let retry = match source {
        ChunkSource::Slice(_) => Retry::Idempotent,
        ChunkSource::Reader(..) => Retry::Never,
    };
    let mut source = Some(source);
    let mut attempts = 0u32;
    let mut attempt_on = |conn: &mut PgConnection| {
        attempts += 1;
        let source = match &mut source {
            Some(ChunkSource::Slice(data)) => ChunkSource::Slice(data),
            other => other.take().ok_or_else(|| {
                RepoError::Io(std::io::Error::other("the model's reader was already read"))
            })?,
        };
        // The caller's reader runs while this session holds the set's lock: should it panic,
        // the session is dropped (and the lock with it), never pooled again.
        stage_and_publish(
            call.pool(),
            &mut PoisonOnPanic(conn),
            save,
            source,
            attempts == 1,
        )
    };
    let attempt = match retry {
        // A reader is read once: it starts on a session just seen alive, not one that died
        // idle in the pool (after a restart, or idle backends killed).
        Retry::Never => call.with_live_conn(&mut attempt_on)?,
        _ => call.with_conn(retry, &mut attempt_on)?,
    };
    match attempt {
        Attempt::Done(info) => Ok(info),
        Attempt::PublishFailed(staged, first) => {
            log::warn!(
                "pg-model-repo: publishing {}/{} failed ({first}); trying again",
                save.request.model_name,
                save.request.version
            );
            let published = call.with_conn(Retry::Idempotent, |conn| {
                // A repeated publish that finds its version stored sends no second event.
                let published = publish(conn.unbounded_client(), save.request, &staged, false)?;
                clear_unpublished(call.pool(), conn, save.request, staged.chunks.set);
                Ok(published)
            });
            if published.is_err() {
                if let Some(mut conn) = call.pool().try_get() {
                    clear_unpublished(call.pool(), &mut conn, save.request, staged.chunks.set);
                }
            }
            published
        }
    }
}

/// What one attempt of a chunked save achieved.
enum Attempt {
    Done(ModelInfo),
    /// Every chunk is staged, but the publish failed in a way another try may cure.
    PublishFailed(Staged, RepoError),
}

/// A staged chunk set: what the publish writes in `ml_models`.
struct Staged {
    size: u64,
    checksum: String,
    chunks: Chunks,
}

/// One attempt; `first_attempt` is false when the call tries again after a failure (then a
/// version found stored with this content is its own earlier attempt's, whose event went).
fn stage_and_publish(
    pool: &Pool,
    conn: &mut PgConnection,
    save: &ChunkedSave<'_>,
    source: ChunkSource<'_>,
    first_attempt: bool,
) -> Result<Attempt> {
    if let ChunkSource::Slice(_) = source {
        // The checksum is known: an identical or conflicting version answers before any write.
        let mut tx = conn.client().transaction()?;
        if let Stored::Same { info, save_seq } = compare_with_stored(&mut tx, save.request)? {
            save.request
                .notify_resave(&mut tx, save_seq, first_attempt)?;
            tx.commit()?;
            return Ok(Attempt::Done(info));
        }
        tx.commit()?;
    }
    let set: i64 = conn.client().query_one(OPEN_SET, &[])?.try_get(0)?;
    // The server answers: the transfer is a stream from here on.
    stream_from_here(conn.watch());
    let staged = stage_or_clear_on_panic(pool, conn, save, set, source);
    let outcome = match staged {
        Err(e) => Err(e),
        Ok(staged) => match publish(
            conn.unbounded_client(),
            save.request,
            &staged,
            first_attempt,
        ) {
            Ok(info) => Ok(Attempt::Done(info)),
            Err(e) if e.is_transient() => Ok(Attempt::PublishFailed(staged, e)),
            Err(e) => Err(e),
        },
    };
    if !matches!(outcome, Ok(Attempt::PublishFailed(..))) {
        clear_unpublished(pool, conn, save.request, set);
    }
    close_set(conn, set);
    outcome
}

/// [`stage`], and should the caller's reader panic, the chunks staged so far are cleared (on
/// another session: this one is dropped, and the set's lock with it) before the panic goes on,
/// as after an error.
fn stage_or_clear_on_panic(
    pool: &Pool,
    conn: &mut PgConnection,
    save: &ChunkedSave<'_>,
    set: i64,
    source: ChunkSource<'_>,
) -> Result<Staged> {
    let staging = AssertUnwindSafe(|| stage(pool, conn, save, set, source));
    match std::panic::catch_unwind(staging) {
        Ok(staged) => staged,
        Err(panic) => {
            conn.poison();
            clear_unpublished(pool, conn, save.request, set);
            std::panic::resume_unwind(panic)
        }
    }
}

/// Releases the set's lock; a connection that cannot is not reused (its session, and the
/// lock, end when it is dropped).
fn close_set(conn: &mut PgConnection, set: i64) {
    if conn.is_broken() {
        return;
    }
    if let Err(e) = conn.client().query_one(CLOSE_SET, &[&set]) {
        log::debug!("pg-model-repo: releasing chunk set {set} failed ({e}); dropping the session");
        conn.poison();
    }
}

/// Deletes the set's staged chunks unless a stored version names them: on `conn` if it still
/// works, else on an idle pooled connection. Failing that, the sweep removes them later.
fn clear_unpublished(pool: &Pool, conn: &mut PgConnection, request: &SaveRequest<'_>, set: i64) {
    let clear = |conn: &mut PgConnection| -> Result<u64> {
        let mut tx = begin_unbounded(conn)?;
        let n = tx.execute(
            DELETE_UNREFERENCED_SET,
            &[&request.model_name, &request.version, &set],
        )?;
        tx.commit()?;
        Ok(n)
    };
    let cleared = if conn.is_broken() {
        match pool.try_get() {
            Some(mut fresh) => clear(&mut fresh),
            None => pool.get().and_then(|mut fresh| clear(&mut fresh)),
        }
    } else {
        clear(conn)
    };
    match cleared {
        Ok(0) => {}
        Ok(n) => log::debug!("pg-model-repo: cleared {n} staged chunks of set {set}"),
        Err(e) => log::warn!(
            "pg-model-repo: the staged chunks of set {set} ({}/{}) could not be cleared ({e}); \
             the leftover sweep will remove them",
            request.model_name,
            request.version
        ),
    }
}

/// One chunk for a stream to write.
struct Job<'a> {
    no: u32,
    bytes: Payload<'a>,
}

enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Payload<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Owned(v) => v,
        }
    }
}

/// What a stream reports after each chunk: the buffer back (if it was owned), or the failure
/// that ends this stream (and the save).
enum Event {
    Written(Option<Vec<u8>>),
    Failed(RepoError),
}

/// Stages every chunk of `source` under `set`, over `conn` and idle pooled connections.
fn stage(
    pool: &Pool,
    conn: &mut PgConnection,
    save: &ChunkedSave<'_>,
    set: i64,
    source: ChunkSource<'_>,
) -> Result<Staged> {
    let wanted = match &source {
        ChunkSource::Slice(data) => {
            let count = data.len().div_ceil(save.chunk_size as usize);
            save.streams.clamp(1, count.max(1))
        }
        ChunkSource::Reader(..) => save.streams.max(1),
    };
    let mut extra: Vec<Conn> = (1..wanted).map_while(|_| pool.try_get()).collect();
    let target = Target {
        request: save.request,
        set,
    };
    let (jobs_in, jobs) = crossbeam_channel::bounded::<Job<'_>>(0);
    let (events, events_out) = crossbeam_channel::unbounded::<Event>();
    let streams = extra.len() + 1;
    let mut conns: Vec<&mut PgConnection> = vec![conn];
    conns.extend(extra.iter_mut().map(|c| &mut **c));
    std::thread::scope(|scope| {
        for (n, conn) in conns.into_iter().enumerate() {
            let (stream_jobs, stream_events, target) = (jobs.clone(), events.clone(), &target);
            let spawned = std::thread::Builder::new()
                .name(format!("pg-model-repo-chunk-out-{n}"))
                .spawn_scoped(scope, move || {
                    target.serve(pool, conn, &stream_jobs, &stream_events)
                });
            if let Err(e) = spawned {
                let _ = events.send(Event::Failed(RepoError::Io(e)));
            }
        }
        drop((jobs, events));
        let produced = produce(save, source, streams, &jobs_in, &events_out);
        // Streams end after their current chunk; wait for them and keep the first failure.
        drop(jobs_in);
        let mut failure = None;
        for event in events_out.iter() {
            if let Event::Failed(e) = event {
                failure.get_or_insert(e);
            }
        }
        match (produced, failure) {
            (Err(e), _) | (Ok(_), Some(e)) => Err(e),
            (Ok((size, checksum)), None) => Ok(Staged {
                size,
                checksum,
                chunks: Chunks::for_model(set, save.chunk_size, size)?,
            }),
        }
    })
}

/// Cuts the source into jobs on the caller's thread; returns the model's size and sha256.
fn produce<'a>(
    save: &ChunkedSave<'_>,
    source: ChunkSource<'a>,
    streams: usize,
    jobs: &Sender<Job<'a>>,
    events: &Receiver<Event>,
) -> Result<(u64, String)> {
    let mut out = Streams {
        jobs,
        events,
        free: Vec::new(),
    };
    match source {
        ChunkSource::Slice(data) => {
            for (no, piece) in data.chunks(save.chunk_size as usize).enumerate() {
                out.send(Job {
                    no: no as u32,
                    bytes: Payload::Borrowed(piece),
                })?;
            }
            Ok((data.len() as u64, save.request.checksum.clone()))
        }
        ChunkSource::Reader(mut reader, read) => {
            // Buffers in all: one per stream, and the one being filled.
            let buffers = streams + 1;
            let mut allocated = read.len();
            let mut no = 0u32;
            for buf in read {
                out.send(Job {
                    no,
                    bytes: Payload::Owned(buf),
                })?;
                no += 1;
            }
            loop {
                out.poll()?;
                let mut buf = match out.free.pop() {
                    Some(buf) => buf,
                    None if allocated < buffers => {
                        allocated += 1;
                        Vec::new()
                    }
                    None => {
                        out.wait()?;
                        continue;
                    }
                };
                reader.fill(&mut buf)?;
                if buf.is_empty() {
                    break;
                }
                out.send(Job {
                    no,
                    bytes: Payload::Owned(buf),
                })?;
                no += 1;
                if no > i32::MAX as u32 {
                    return Err(RepoError::invalid(
                        "a model needs more than 2^31 chunks: raise model_chunk_size",
                    ));
                }
            }
            Ok(reader.finish())
        }
    }
}

/// The producer's side of the streams: jobs out, reports in (buffers back, failures).
struct Streams<'j, 'a> {
    jobs: &'j Sender<Job<'a>>,
    events: &'j Receiver<Event>,
    /// Buffers the streams gave back.
    free: Vec<Vec<u8>>,
}

impl<'a> Streams<'_, 'a> {
    /// Takes in what the streams reported so far; a failure stops the save.
    fn poll(&mut self) -> Result<()> {
        while let Ok(event) = self.events.try_recv() {
            self.take(event)?;
        }
        Ok(())
    }

    /// Waits for the next report.
    fn wait(&mut self) -> Result<()> {
        match self.events.recv() {
            Ok(event) => self.take(event),
            Err(_) => Err(streams_gone()),
        }
    }

    fn take(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Written(Some(buf)) => self.free.push(buf),
            Event::Written(None) => {}
            Event::Failed(e) => return Err(e),
        }
        Ok(())
    }

    /// Hands a chunk to the next free stream. When every stream is gone, the failure that
    /// ended them is the error.
    fn send(&mut self, job: Job<'a>) -> Result<()> {
        self.poll()?;
        if self.jobs.send(job).is_err() {
            self.poll()?;
            return Err(streams_gone());
        }
        Ok(())
    }
}

fn streams_gone() -> RepoError {
    RepoError::Io(std::io::Error::other(
        "every chunk stream ended before the model was staged",
    ))
}

/// Where chunks go: one version's chunk set.
struct Target<'a> {
    request: &'a SaveRequest<'a>,
    set: i64,
}

impl Target<'_> {
    /// Writes the chunks it is sent, batch by batch, until the queue closes or a write fails.
    fn serve(
        &self,
        pool: &Pool,
        conn: &mut PgConnection,
        jobs: &Receiver<Job<'_>>,
        events: &Sender<Event>,
    ) {
        while let Ok(first) = jobs.recv() {
            match self.write_batch(conn, first, jobs, events) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    pool.note_failure(conn, &e);
                    let _ = events.send(Event::Failed(e));
                    return;
                }
            }
        }
    }

    /// One transaction and one COPY for up to [`BATCH_CHUNKS`] chunks, as long as the next one
    /// is ready at once (a slow source commits chunk by chunk, and no transaction waits on
    /// it): the next chunk flows into the connection while the server stores the last one.
    /// Each buffer goes back as soon as its bytes are sent. Returns whether the queue may hold
    /// more.
    fn write_batch(
        &self,
        conn: &mut PgConnection,
        first: Job<'_>,
        jobs: &Receiver<Job<'_>>,
        events: &Sender<Event>,
    ) -> Result<bool> {
        let mut tx = begin_unbounded(conn)?;
        tx.batch_execute(STAGE_WITHOUT_FLUSH)?;
        let mut writer = tx.copy_in(COPY_CHUNK)?;
        writer.write_all(binary_copy::HEADER).map_err(io_error)?;
        let (mut job, mut sent, mut more) = (first, 0, true);
        loop {
            self.write_row(&mut writer, job.no, job.bytes.bytes())?;
            sent += 1;
            let back = match job.bytes {
                Payload::Owned(buf) => Some(buf),
                Payload::Borrowed(_) => None,
            };
            let _ = events.send(Event::Written(back));
            if sent == BATCH_CHUNKS {
                break;
            }
            match jobs.try_recv() {
                Ok(next) => job = next,
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    more = false;
                    break;
                }
            }
        }
        writer.write_all(&binary_copy::TRAILER).map_err(io_error)?;
        writer.finish()?;
        tx.commit()?;
        Ok(more)
    }

    /// One chunk's row, hashing its bytes as they are sent, with its sha256 after them.
    fn write_row(&self, writer: &mut dyn Write, no: u32, data: &[u8]) -> Result<()> {
        let len = i32::try_from(data.len())
            .map_err(|_| RepoError::invalid("a chunk is larger than 2 GiB"))?;
        let mut head = Vec::with_capacity(128);
        binary_copy::row(&mut head, 6);
        binary_copy::field(&mut head, self.request.model_name.as_bytes());
        binary_copy::field(&mut head, self.request.version.as_bytes());
        binary_copy::int8(&mut head, self.set);
        binary_copy::int4(&mut head, no as i32);
        binary_copy::field_len(&mut head, len);
        writer.write_all(&head).map_err(io_error)?;
        let mut hasher = Sha256::new();
        for piece in data.chunks(WRITE_PIECE) {
            hasher.update(piece);
            writer.write_all(piece).map_err(io_error)?;
        }
        let mut tail = Vec::with_capacity(72);
        binary_copy::field(&mut tail, to_hex(&hasher.finalize()).as_bytes());
        writer.write_all(&tail).map_err(io_error)
    }
}

/// The publish transaction: an identical active version answers (and the staged set goes);
/// else the whole staged set is checked, a soft-deleted version of the same name is replaced
/// (with its chunks: bulk work, hence the unbounded client), and the row naming the set is
/// written; its event goes in the same transaction.
fn publish(
    client: &mut Client,
    request: &SaveRequest<'_>,
    staged: &Staged,
    first_attempt: bool,
) -> Result<ModelInfo> {
    let request = request.sized(staged.size, staged.checksum.clone());
    let mut tx = client.transaction()?;
    if let Stored::Same { info, save_seq } = compare_with_stored(&mut tx, &request)? {
        request.notify_resave(&mut tx, save_seq, first_attempt)?;
        tx.commit()?;
        return Ok(info);
    }
    let chunks = staged.chunks;
    let row = tx.query_one(
        TOUCH_SET,
        &[&request.model_name, &request.version, &chunks.set],
    )?;
    let (count, bytes): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    if count != i64::from(chunks.count) || bytes as u64 != staged.size {
        return Err(RepoError::Io(std::io::Error::other(format!(
            "{} of {} staged chunks ({bytes} of {} bytes) are left; nothing was stored",
            count, chunks.count, staged.size
        ))));
    }
    let inactive = tx.query(DELETE_INACTIVE, &[&request.model_name, &request.version])?;
    let revived = !inactive.is_empty();
    let replaced: Vec<(String, i64)> = inactive
        .iter()
        .map(|r| r.try_get::<_, Option<i64>>(0))
        .collect::<std::result::Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .map(|set| (request.version.to_owned(), set))
        .collect();
    delete_sets(&mut tx, request.model_name, &replaced)?;
    let size = i64::try_from(staged.size)
        .map_err(|_| RepoError::invalid("a model larger than 2^63 bytes"))?;
    let row = tx.query_opt(
        INSERT_CHUNKED,
        &[
            &request.model_name,
            &request.version,
            request.metadata,
            &request.checksum,
            &size,
            &(chunks.size as i32),
            &(chunks.count as i32),
            &chunks.set,
        ],
    )?;
    let info = match row {
        Some(row) => {
            request.notify_saved(&mut tx, row.try_get("save_seq")?, revived)?;
            ModelInfo::from_row(&row)?
        }
        // Saved concurrently between the comparison and the insert.
        None => saved_meanwhile(&mut tx, &request, first_attempt)?,
    };
    tx.commit()?;
    Ok(info)
}
