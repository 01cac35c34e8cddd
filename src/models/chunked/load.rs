//! Reading a chunked model: stream threads, each on its own connection inside the snapshot the
//! caller's transaction exported, fetch chunks, check each against its own sha256 and copy it
//! into a recycled buffer; the caller's thread writes them in order through a reorder window
//! of `streams + 1` chunks and hashes the whole model as it goes.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender};
use postgres::{Row, Transaction};
use sha2::{Digest, Sha256};

use crate::db::pool::{begin_snapshot, Conn, Pool};
use crate::db::to_hex;
use crate::error::{RepoError, Result};
use crate::models::chunked::Chunks;
use crate::models::versions::ModelInfo;

const SELECT_CHUNK: &str = "SELECT data, checksum FROM ml_model_chunks \
     WHERE model_name = $1 AND version = $2 AND chunk_set = $3 AND chunk_no = $4";

const EXPORT_SNAPSHOT: &str = "SELECT pg_export_snapshot()";

/// What a stream hands back: a checked chunk, or the failure that ends the load.
type Fetched = (u32, Result<Vec<u8>>);

/// Writes the chunks of `info` to `writer` in order and returns the whole model's sha256
/// (hex). `tx` is the REPEATABLE READ transaction that read the version's row: every stream
/// reads in its snapshot, so the bytes are those of that row even if the version is removed
/// meanwhile. Uses up to `streams` connections: `tx`'s own and idle ones from `pool`
/// (`try_get` only). A chunk that fails its checksum is `Corrupt` naming the chunk, reported
/// as soon as it is read; `written` counts the bytes handed to `writer`.
pub(crate) fn stream_chunks(
    pool: &Pool,
    tx: &mut Transaction<'_>,
    info: &ModelInfo,
    chunks: Chunks,
    streams: usize,
    writer: &mut dyn Write,
    written: &mut u64,
) -> Result<String> {
    let wanted = streams.clamp(1, chunks.count as usize);
    let snapshot: Option<String> = if wanted > 1 {
        Some(tx.query_one(EXPORT_SNAPSHOT, &[])?.try_get(0)?)
    } else {
        None
    };
    let mut extra: Vec<Conn> = (1..wanted).map_while(|_| pool.try_get()).collect();
    let (work, jobs) = crossbeam_channel::unbounded::<u32>();
    let (results, fetched) = crossbeam_channel::unbounded::<Fetched>();
    // Written chunks' buffers, for the streams to fill again.
    let (free, buffers) = crossbeam_channel::unbounded::<Vec<u8>>();
    let fetch = Fetch {
        info,
        chunks,
        buffers,
    };
    let stop = AtomicBool::new(false);
    // Chunks handed out and not yet written: one per stream, and one more ready to go.
    let window = extra.len() + 2;
    std::thread::scope(|scope| {
        for (n, conn) in extra.iter_mut().enumerate() {
            let (jobs, results, stop, fetch) = (jobs.clone(), results.clone(), &stop, &fetch);
            let snapshot = snapshot.as_deref().unwrap_or_default();
            let spawned = std::thread::Builder::new()
                .name(format!("pg-model-repo-chunk-in-{n}"))
                .spawn_scoped(scope, move || {
                    let joined = begin_snapshot(conn, Some(snapshot)).and_then(|mut stream_tx| {
                        fetch.serve(&mut stream_tx, &jobs, &results, stop);
                        Ok(stream_tx.commit()?)
                    });
                    if let Err(e) = joined {
                        pool.note_failure(conn, &e);
                        log::debug!("pg-model-repo: a chunk stream could not read: {e}");
                    }
                });
            if let Err(e) = spawned {
                log::debug!("pg-model-repo: no thread for a chunk stream: {e}");
            }
        }
        let own = {
            let (jobs, results, stop, fetch) = (jobs.clone(), results.clone(), &stop, &fetch);
            std::thread::Builder::new()
                .name("pg-model-repo-chunk-in".to_owned())
                .spawn_scoped(scope, move || fetch.serve(tx, &jobs, &results, stop))?
        };
        drop((jobs, results));
        let outcome = write_in_order(&fetch, &work, &fetched, &free, window, writer, written);
        // Whatever happened, the streams stop after their current chunk.
        stop.store(true, Ordering::Relaxed);
        drop(work);
        if own.join().is_err() {
            return Err(RepoError::Io(std::io::Error::other(
                "a chunk stream panicked",
            )));
        }
        outcome
    })
}

/// What every stream needs to fetch and check chunks of one version.
struct Fetch<'a> {
    info: &'a ModelInfo,
    chunks: Chunks,
    /// Buffers given back by the writer.
    buffers: Receiver<Vec<u8>>,
}

impl Fetch<'_> {
    /// Fetches the chunks it is sent until the queue closes, the load stops, or a fetch fails
    /// (the failure is sent on, and this stream ends).
    fn serve(
        &self,
        tx: &mut Transaction<'_>,
        jobs: &Receiver<u32>,
        results: &Sender<Fetched>,
        stop: &AtomicBool,
    ) {
        let statement = match tx.prepare(SELECT_CHUNK) {
            Ok(s) => s,
            Err(e) => {
                let _ = results.send((0, Err(e.into())));
                return;
            }
        };
        for no in jobs {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let fetched = tx
                .query_opt(
                    &statement,
                    &[
                        &self.info.model_name,
                        &self.info.version,
                        &self.chunks.set,
                        &(no as i32),
                    ],
                )
                .map_err(RepoError::from)
                .and_then(|row| self.check(no, row))
                .and_then(|row| self.copy_out(&row));
            let failed = fetched.is_err();
            if results.send((no, fetched)).is_err() || failed {
                return;
            }
        }
    }

    /// The chunk's bytes in a buffer of their own size. The row's bytes share an allocation
    /// with the connection's read buffer, about twice the chunk's size: holding rows while
    /// they wait for their turn would double the memory a load takes.
    fn copy_out(&self, row: &Row) -> Result<Vec<u8>> {
        let data: &[u8] = row.try_get("data")?;
        let mut buf = self.buffers.try_recv().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        Ok(buf)
    }

    /// The chunk's row if it is there, of the right length, and matches its own checksum.
    fn check(&self, no: u32, row: Option<Row>) -> Result<Row> {
        let range = self.chunks.range(no, self.info.size_bytes);
        let what = || {
            format!(
                "{}/{}: chunk {no} of {} (bytes {}..{})",
                self.info.model_name, self.info.version, self.chunks.count, range.start, range.end
            )
        };
        let row = row.ok_or_else(|| RepoError::corrupt(format!("{} is missing", what())))?;
        let data: &[u8] = row.try_get("data")?;
        let checksum: &str = row.try_get("checksum")?;
        if data.len() as u64 != range.end - range.start {
            return Err(RepoError::corrupt(format!(
                "{} holds {} bytes",
                what(),
                data.len()
            )));
        }
        let actual = to_hex(&Sha256::digest(data));
        if !checksum.eq_ignore_ascii_case(&actual) {
            return Err(RepoError::corrupt(format!(
                "{}: stored checksum {checksum} but the bytes hash to {actual}",
                what()
            )));
        }
        Ok(row)
    }
}

/// Hands out chunk numbers less than `window` ahead of the next one to write, writes fetched
/// chunks in order, and hashes them. Returns the whole model's sha256 (hex).
fn write_in_order(
    fetch: &Fetch<'_>,
    work: &Sender<u32>,
    fetched: &Receiver<Fetched>,
    free: &Sender<Vec<u8>>,
    window: usize,
    writer: &mut dyn Write,
    written: &mut u64,
) -> Result<String> {
    let count = fetch.chunks.count;
    let mut hasher = Sha256::new();
    let mut waiting: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let mut next_job = 0u32;
    let mut next_write = 0u32;
    let hand_out = |next_job: &mut u32, next_write: u32| {
        while *next_job < count && ((*next_job - next_write) as usize) < window {
            if work.send(*next_job).is_err() {
                return;
            }
            *next_job += 1;
        }
    };
    hand_out(&mut next_job, next_write);
    while next_write < count {
        let data = match waiting.remove(&next_write) {
            Some(data) => data,
            None => {
                let (no, result) = fetched.recv().map_err(|_| {
                    RepoError::Io(std::io::Error::other(
                        "every chunk stream ended before the model was read",
                    ))
                })?;
                waiting.insert(no, result?);
                continue;
            }
        };
        hasher.update(&data);
        writer.write_all(&data)?;
        *written += data.len() as u64;
        let _ = free.send(data);
        next_write += 1;
        hand_out(&mut next_job, next_write);
    }
    writer.flush()?;
    Ok(to_hex(&hasher.finalize()))
}
