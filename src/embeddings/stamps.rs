//! The timestamps a load that keeps the type's rows writes after each record (created_at,
//! updated_at): a key the type had keeps its `created_at` (as an upsert does), a new one takes
//! the load's time, and every row is updated at the load's time.
//!
//! The stored `created_at` are one pass over the type's table (72-123 ms of a 100k x 384
//! reload, the heap's 160 MB read for 8 bytes a row). Where a second connection is free that
//! pass runs on it while the rows go out: the encoder of a chunk waits only for keys the pass
//! has not reached yet, and a batch in the order the type was stored (a nightly reload from
//! the same pipeline) never waits. Without a free connection the pass runs first, on the
//! load's own connection. Either way the pass reads what was committed when it ran: a key
//! another session writes meanwhile takes the load's time.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::db::binary_copy::RowReader;
use crate::db::pool::{PgConnection, Pool};
use crate::db::quote_literal;
use crate::error::{RepoError, Result};

/// The server's clock, in PostgreSQL's binary timestamptz.
const NOW_MICROS: &str =
    "SELECT (extract(epoch FROM now() - timestamptz '2000-01-01 00:00:00+00') * 1000000)::int8";

/// Stored keys handed to the encoders at a time.
const BATCH: usize = 1024;

/// The stored `created_at` of the type's keys, as PostgreSQL's binary timestamptz
/// (microseconds since 2000-01-01 UTC), complete or still being read; and the load's time.
#[derive(Debug)]
pub(crate) struct Stamps {
    book: Mutex<Book>,
    arrived: Condvar,
    /// The load's time.
    pub(crate) now: i64,
}

#[derive(Debug)]
struct Book {
    created: HashMap<String, i64>,
    read: Read,
}

/// How far the pass over the stored keys is.
#[derive(Debug)]
enum Read {
    Going,
    Done,
    /// It failed (the message): the load fails too.
    Failed(String),
}

impl Stamps {
    /// Before the pass starts.
    fn new(now: i64) -> Self {
        Stamps {
            book: Mutex::new(Book {
                created: HashMap::new(),
                read: Read::Going,
            }),
            arrived: Condvar::new(),
            now,
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `created_at` to write for each of `keys`, in order: the stored one, else the
    /// load's time. Waits for a key the pass has not reached while it goes on.
    pub(crate) fn created_of<'k>(&self, keys: impl Iterator<Item = &'k str>) -> Result<Vec<i64>> {
        let mut book = self.book();
        let mut out = Vec::with_capacity(keys.size_hint().0);
        for key in keys {
            loop {
                if let Some(&created) = book.created.get(key) {
                    out.push(created);
                    break;
                }
                match &book.read {
                    Read::Done => {
                        out.push(self.now);
                        break;
                    }
                    Read::Failed(why) => {
                        return Err(RepoError::Io(std::io::Error::other(format!(
                            "reading the stored created_at failed: {why}"
                        ))))
                    }
                    Read::Going => {
                        book = self.arrived.wait(book).unwrap_or_else(|p| p.into_inner())
                    }
                }
            }
        }
        Ok(out)
    }

    fn add(&self, rows: &mut Vec<(String, i64)>) {
        self.book().created.extend(rows.drain(..));
        self.arrived.notify_all();
    }

    fn end(&self, read: Read) {
        self.book().read = read;
        self.arrived.notify_all();
    }
}

/// Runs `work` (over `conn`) with the type's stored `created_at`: read concurrently on a
/// second connection from `pool` when one is free, else first on `conn`. The read's failure
/// is the call's.
pub(crate) fn with_stamps<T>(
    pool: &Pool,
    conn: &mut PgConnection,
    entity_type: &str,
    work: impl FnOnce(&mut PgConnection, Option<&Stamps>) -> Result<T>,
) -> Result<T> {
    let now: i64 = conn.client().query_one(NOW_MICROS, &[])?.try_get(0)?;
    let stamps = Stamps::new(now);
    let Some(mut reader) = pool.try_get() else {
        read_stored(conn, entity_type, &stamps)?;
        stamps.end(Read::Done);
        return work(conn, Some(&stamps));
    };
    std::thread::scope(|s| {
        let read = s.spawn(|| {
            let read = read_stored(&mut reader, entity_type, &stamps);
            match &read {
                Ok(()) => stamps.end(Read::Done),
                Err(e) => {
                    pool.note_failure(&mut reader, e);
                    stamps.end(Read::Failed(e.to_string()));
                }
            }
            read
        });
        let worked = work(conn, Some(&stamps));
        let read = read
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        match (worked, read) {
            // Every key the encoders asked for was answered before the read failed (a key it
            // had not reached would have failed them): the load is right, and committed.
            (Ok(rows), Err(e)) => {
                log::debug!(
                    "pg-model-repo: the created_at read failed after the load used it ({e})"
                );
                Ok(rows)
            }
            // A failed read failed the load (its encoders stop at the first key it had not
            // read): its error is the cause.
            (Err(_), Err(e)) => Err(e),
            (worked, Ok(())) => worked,
        }
    })
}

/// One pass over the type's keys and `created_at`, handed to `stamps` as it goes.
fn read_stored(conn: &mut PgConnection, entity_type: &str, stamps: &Stamps) -> Result<()> {
    let sql = format!(
        "COPY (SELECT entity_id, created_at FROM embeddings WHERE entity_type = {}) \
         TO STDOUT (FORMAT binary)",
        quote_literal(entity_type)
    );
    let mut out = conn.unbounded_client().copy_out(sql.as_str())?;
    let mut rows = RowReader::new(&mut out, 2)?;
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(row) = rows.next_row()? {
        let id = String::from_utf8(row[0].clone())
            .map_err(|e| RepoError::corrupt(format!("entity_id is not UTF-8: {e}")))?;
        let micros = <[u8; 8]>::try_from(row[1].as_slice())
            .map(i64::from_be_bytes)
            .map_err(|_| RepoError::corrupt("created_at is not a timestamptz"))?;
        batch.push((id, micros));
        if batch.len() == BATCH {
            stamps.add(&mut batch);
        }
    }
    stamps.add(&mut batch);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_waits_for_the_pass_and_a_new_key_takes_the_loads_time_once_it_ends() {
        let stamps = Stamps::new(99);
        std::thread::scope(|s| {
            let encoder = s.spawn(|| stamps.created_of(["b", "a", "new"].into_iter()));
            stamps.add(&mut vec![("a".to_owned(), 1)]);
            std::thread::sleep(std::time::Duration::from_millis(20));
            stamps.add(&mut vec![("b".to_owned(), 2)]);
            stamps.end(Read::Done);
            assert_eq!(encoder.join().unwrap().unwrap(), vec![2, 1, 99]);
        });
    }

    #[test]
    fn a_failed_pass_fails_the_keys_it_had_not_reached() {
        let stamps = Stamps::new(99);
        stamps.add(&mut vec![("a".to_owned(), 1)]);
        assert_eq!(stamps.created_of(["a"].into_iter()).unwrap(), vec![1]);
        stamps.end(Read::Failed("connection lost".into()));
        let e = stamps.created_of(["a", "b"].into_iter()).unwrap_err();
        assert!(e.to_string().contains("connection lost"), "{e}");
    }
}
