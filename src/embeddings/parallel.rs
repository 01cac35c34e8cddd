//! `ParallelCopy` as an upsert (a batch of several types, or a small part of a large type):
//! several COPY streams stage parts of a batch on connections of their own while the
//! caller's connection merges each staged part inside the load's one transaction. Loads into
//! fresh storage (`fresh`) need no merge.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::db::layout::Layout;
use crate::db::pool::{begin_unbounded, Conn, PgConnection, Pool};
use crate::embeddings::check::CheckedBatch;
use crate::embeddings::copy_rows::{copy_in_tx, Source, Target};
use crate::embeddings::encode::Prefix;
use crate::embeddings::registry::in_load_transaction;
use crate::embeddings::sql::COLUMNS;
use crate::embeddings::types::{Embedding, Storage};
use crate::error::{RepoError, Result};
use crate::schema::sweep::{owner_lock_key, try_owner_lock, Leftover};

/// One load id per part of a parallel load, each locked (a session advisory lock) by the
/// loading connection until the load ends: the leftover sweep skips a live load's rows however
/// long it runs, and a dead session's locks are gone with it.
const NEXT_LOAD_IDS: &str = concat!(
    "SELECT id, pg_advisory_lock(",
    owner_lock_key!("staged_load", "id"),
    ") FROM (SELECT nextval('embeddings_load_seq') AS id FROM generate_series(1, $1)) ids"
);
const UNLOCK_LOAD_IDS: &str = concat!(
    "SELECT count(pg_advisory_unlock(",
    owner_lock_key!("staged_load", "id"),
    ")) FROM unnest($1::int8[]) AS ids(id)"
);

/// Staged rows of a `ParallelCopy` whose process died before it merged or cleared them: old
/// enough, and their load id not locked by a live load.
pub(crate) const STAGED_ROWS: Leftover = Leftover {
    what: "staged embedding rows of dead ParallelCopy loads",
    candidates: "SELECT DISTINCT load_id FROM embeddings_staging \
                 WHERE staged_at < now() - $1 * interval '1 second'",
    try_lock: try_owner_lock!("staged_load", "1886221873"),
    delete: "DELETE FROM embeddings_staging \
             WHERE load_id = $1 AND staged_at < now() - $2 * interval '1 second'",
};
const MERGE_STAGED: &str = concat!(
    insert_embeddings!(),
    "SELECT entity_type, entity_id, embeddings, dimension FROM embeddings_staging WHERE load_id = $1",
    on_key_update!()
);
/// The same for a Citus distributed schema, where pushing the `INSERT … SELECT` down to the
/// node fails (Citus 13.2 deparses it with an empty partition-column test): the part is read
/// first, in a materialized CTE, and then inserted through the coordinator.
const MERGE_STAGED_VIA_COORDINATOR: &str = concat!(
    "WITH part AS MATERIALIZED (SELECT entity_type, entity_id, embeddings, dimension \
     FROM embeddings_staging WHERE load_id = $1) ",
    insert_embeddings!(),
    "SELECT entity_type, entity_id, embeddings, dimension FROM part",
    on_key_update!()
);

/// Every staged part at once, in key order (byte order, as the direct COPY's): loads of
/// overlapping keys lock them in one order and wait for each other instead of deadlocking.
const MERGE_ALL_IN_KEY_ORDER: &str = concat!(
    insert_embeddings!(),
    "SELECT entity_type, entity_id, embeddings, dimension FROM embeddings_staging \
     WHERE load_id = ANY($1) ORDER BY entity_type COLLATE \"C\", entity_id COLLATE \"C\"",
    on_key_update!()
);

/// How the staged parts are merged into embeddings.
#[derive(Clone, Copy, Debug)]
enum Merge {
    /// All of them in one statement, in key order, once every part is staged.
    All(&'static str),
    /// One statement per part, as each is staged (a Citus coordinator, which spreads the rows
    /// over its shards and does not keep an order across them).
    PerPart(&'static str),
}

fn merge_statement(layout: Layout) -> Merge {
    match layout {
        Layout::Local => Merge::All(MERGE_ALL_IN_KEY_ORDER),
        Layout::SchemaBased => Merge::PerPart(MERGE_STAGED_VIA_COORDINATOR),
        Layout::RowBased => Merge::PerPart(MERGE_STAGED),
    }
}
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
    /// A stream panicked (its encoder): the merging thread panics with it.
    Panicked(Box<dyn std::any::Any + Send>),
}

/// Sets the streams' stop flag when dropped, unwinding included: a panic on the merging
/// thread (the caller's progress callback) stops the streams after their current part.
struct StopOnExit<'a>(&'a AtomicBool);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `ParallelCopy`: COPY streams, each on its own plain thread and connection, commit parts of
/// the batch into the shared UNLOGGED staging table (one load id per part), while the
/// caller's connection merges each committed part inside one transaction that also checks
/// the registry and finally deletes the load's staged rows; so merging overlaps staging and
/// nothing is visible in `embeddings` before that transaction commits. Any failure deletes
/// the load's staged rows. Extra connections come from `try_get` only (waiting for a second
/// connection while holding one can deadlock a small pool); with none free, the caller's
/// connection stages the parts itself first. A panic anywhere (the caller's progress
/// callback, an encoder) stops the streams, deletes what they staged, and then goes on
/// unwinding.
pub(crate) fn load_parallel(
    pool: &Pool,
    layout: Layout,
    conn: &mut PgConnection,
    batch: &CheckedBatch<'_>,
    storage: Storage,
    streams: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let records = batch.records;
    let streams = streams.max(1);
    let part_rows = records.len().div_ceil(streams * 4).max(PART_ROWS_MIN);
    let parts: Vec<&[Embedding]> = records.chunks(part_rows).collect();
    let wanted = (streams - 1).min(parts.len()).max(usize::from(streams > 1));
    let merge = merge_statement(layout);
    {
        let ids: Vec<i64> = conn
            .client()
            .query(NEXT_LOAD_IDS, &[&(parts.len() as i32)])?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()?;
        let mut extra: Vec<_> = (0..wanted).map_while(|_| pool.try_get()).collect();
        let started = std::time::Instant::now();
        let staged = catch_unwind(AssertUnwindSafe(|| {
            if extra.is_empty() {
                stage_then_merge(conn, batch, &parts, &ids, storage, merge, progress)
            } else {
                let work = Staging {
                    parts: &parts,
                    part_rows,
                    ids: &ids,
                    storage,
                    merge,
                };
                pipeline(pool, conn, &mut extra, batch, &work, progress)
            }
        }));
        let (result, panic) = match staged {
            Ok(result) => (result, None),
            Err(panic) => {
                let e = RepoError::Io(std::io::Error::other("the load panicked"));
                (Err(e), Some(panic))
            }
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
            clear_staged(pool, conn, &ids, e);
        }
        unlock_load_ids(conn, &ids);
        if let Some(panic) = panic {
            // The unwinding rolled the caller's transaction back (the cleanup above ran on
            // that connection, or on a fresh one if it could not), but a session a panic went
            // through is not handed out again.
            conn.poison();
            resume_unwind(panic);
        }
        result
    }
}

/// Releases the load ids' locks; a connection that cannot is not reused (its session, and so
/// its locks, end when it is dropped).
fn unlock_load_ids(conn: &mut PgConnection, ids: &[i64]) {
    if conn.is_broken() {
        return;
    }
    if let Err(e) = conn.client().query_one(UNLOCK_LOAD_IDS, &[&ids]) {
        log::debug!("pg-model-repo: releasing load id locks failed ({e}); dropping the session");
        conn.poison();
    }
}

/// No spare connection: stage every part on the caller's connection, then merge.
fn stage_then_merge(
    conn: &mut PgConnection,
    batch: &CheckedBatch<'_>,
    parts: &[&[Embedding]],
    ids: &[i64],
    storage: Storage,
    merge: Merge,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut done = 0;
    for (rows, id) in parts.iter().zip(ids) {
        stage_part(conn, rows, done as usize, *id, storage, &mut |n| {
            progress(done + n)
        })?;
        done += rows.len() as u64;
    }
    in_load_transaction(conn, &batch.types, |tx| {
        match merge {
            Merge::All(sql) => {
                tx.execute(sql, &[&ids])?;
            }
            Merge::PerPart(sql) => {
                let merge = tx.prepare(sql)?;
                for id in ids {
                    tx.execute(&merge, &[id])?;
                }
            }
        }
        tx.execute(CLEAR_STAGED, &[&ids])?;
        Ok(())
    })
}

/// Streams stage parts (taking the next part from a shared queue) while this thread merges
/// each part as soon as it is committed.
fn pipeline(
    pool: &Pool,
    conn: &mut PgConnection,
    extra: &mut [Conn],
    batch: &CheckedBatch<'_>,
    work: &Staging<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let parts = work.parts;
    let (queue, next_part) = crossbeam_channel::unbounded::<usize>();
    for i in 0..parts.len() {
        let _ = queue.send(i);
    }
    drop(queue);
    let (events, received) = crossbeam_channel::unbounded::<StreamEvent>();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for (n, stream_conn) in extra.iter_mut().enumerate() {
            let (next_part, stream_events, stop) = (next_part.clone(), events.clone(), &stop);
            let spawned = std::thread::Builder::new()
                .name(format!("pg-model-repo-copy-{n}"))
                .spawn_scoped(scope, move || {
                    run_stream(pool, stream_conn, work, &next_part, &stream_events, stop)
                });
            if let Err(e) = spawned {
                let _ = events.send(StreamEvent::Failed(RepoError::Io(e)));
            }
        }
        drop(events);
        // On failure or panic, streams stop after their current part; either way they end
        // before the scope does, so their parts are committed or gone when the staging is
        // cleared.
        let _stop = StopOnExit(&stop);
        merge_as_staged(conn, batch, work, &received, progress)
    })
}

/// What the COPY streams stage: the parts, their load ids, and the storage to encode for.
struct Staging<'a> {
    parts: &'a [&'a [Embedding]],
    /// Rows per part (the last may have fewer): part i starts at record i * part_rows.
    part_rows: usize,
    ids: &'a [i64],
    storage: Storage,
    /// The statement that merges a staged part (see [`merge_statement`]).
    merge: Merge,
}

/// A COPY stream: stages parts from the queue until it is empty, stopped, or failing.
fn run_stream(
    pool: &Pool,
    conn: &mut PgConnection,
    work: &Staging<'_>,
    next_part: &crossbeam_channel::Receiver<usize>,
    events: &crossbeam_channel::Sender<StreamEvent>,
    stop: &AtomicBool,
) {
    while let Ok(i) = next_part.try_recv() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let mut last = 0;
        let staged = catch_unwind(AssertUnwindSafe(|| {
            stage_part(
                conn,
                work.parts[i],
                i * work.part_rows,
                work.ids[i],
                work.storage,
                &mut |done| {
                    let _ = events.send(StreamEvent::Rows(done - last));
                    last = done;
                },
            )
        }));
        let staged = match staged {
            Ok(staged) => staged,
            Err(panic) => {
                // Mid-COPY: this session is not reused.
                conn.poison();
                let _ = events.send(StreamEvent::Panicked(panic));
                return;
            }
        };
        match staged {
            Ok(()) => {
                let _ = events.send(StreamEvent::Staged(i));
            }
            Err(e) => {
                pool.note_failure(conn, &e);
                let _ = events.send(StreamEvent::Failed(e));
                return;
            }
        }
    }
}

/// The load's one transaction: registry check, a merge per staged part as it arrives (or of
/// all of them once the last arrived), then the staged rows go.
fn merge_as_staged(
    conn: &mut PgConnection,
    batch: &CheckedBatch<'_>,
    work: &Staging<'_>,
    events: &crossbeam_channel::Receiver<StreamEvent>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let (parts, ids) = (work.parts.len(), work.ids);
    in_load_transaction(conn, &batch.types, |tx| {
        let per_part = match work.merge {
            Merge::PerPart(sql) => Some(tx.prepare(sql)?),
            Merge::All(_) => None,
        };
        let (mut merged, mut sent) = (0, 0u64);
        while merged < parts {
            match events.recv() {
                Ok(StreamEvent::Rows(n)) => {
                    sent += n;
                    progress(sent);
                }
                Ok(StreamEvent::Staged(i)) => {
                    if let Some(merge) = &per_part {
                        let started = std::time::Instant::now();
                        tx.execute(merge, &[&ids[i]])?;
                        log::trace!("pg-model-repo: merged part {i} in {:?}", started.elapsed());
                    }
                    merged += 1;
                }
                Ok(StreamEvent::Failed(e)) => return Err(e),
                Ok(StreamEvent::Panicked(panic)) => resume_unwind(panic),
                Err(_) => {
                    return Err(RepoError::Io(std::io::Error::other(
                        "every COPY stream ended before the load was staged",
                    )))
                }
            }
        }
        if let Merge::All(sql) = work.merge {
            tx.execute(sql, &[&ids])?;
        }
        tx.execute(CLEAR_STAGED, &[&ids])?;
        Ok(())
    })
}

/// COPYs one part into staging in its own committed transaction.
fn stage_part(
    conn: &mut PgConnection,
    rows: &[Embedding],
    first_index: usize,
    load_id: i64,
    storage: Storage,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut tx = begin_unbounded(conn)?;
    let sql = format!("COPY embeddings_staging (load_id, {COLUMNS}) FROM STDIN (FORMAT binary)");
    let started = std::time::Instant::now();
    let target = Target {
        sql: &sql,
        prefix: Prefix::LoadId(load_id),
        stamps: None,
        storage,
    };
    copy_in_tx(&mut tx, target, Source::Part(rows, first_index), progress)?;
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
fn clear_staged(pool: &Pool, conn: &mut PgConnection, ids: &[i64], cause: &RepoError) {
    let attempt = |conn: &mut PgConnection| -> Result<u64> {
        let mut tx = begin_unbounded(conn)?;
        let n = tx.execute(CLEAR_STAGED, &[&ids])?;
        tx.commit()?;
        Ok(n)
    };
    let on_own = if conn.is_broken() {
        None
    } else {
        attempt(conn).ok()
    };
    let cleared = match on_own {
        Some(n) => Ok(n),
        None => pool.get().and_then(|mut fresh| attempt(&mut fresh)),
    };
    match cleared {
        Ok(n) => log::debug!("pg-model-repo: parallel load failed ({cause}); cleared {n} staged rows"),
        Err(e) => log::warn!(
            "pg-model-repo: parallel load failed ({cause}) and its staged rows could not be \
             cleared ({e}); delete them with: DELETE FROM embeddings_staging WHERE load_id IN {ids:?}"
        ),
    }
}
