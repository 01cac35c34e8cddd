//! Access counts buffered in memory and written in one statement each: cache hits (and the
//! lookup totals) and model loads. Reads stay reads; the reaper tick, the statistics calls
//! and the last clone's close flush the buffers. The flush statements live next to the
//! tables they write (cache and models) and are handed in by the repository.
//!
//! Flushes are exactly once: each runs as a tracked write (`db::commit`). A flush whose
//! COMMIT reply was lost counts as written if the server says it committed, goes back into
//! the buffer if it says it did not, and otherwise waits aside, in doubt, until a later flush
//! can ask; its counts are never written twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::db::background::Chore;
use crate::db::commit::{self, Checkout, Outcome, Status};
use crate::db::pool::Pool;
use crate::db::retry::Retry;
use crate::db::shard::Sharded;
use crate::error::{RepoError, Result};

/// Distinct keys buffered before a flush is asked for early. Large enough that a hot working
/// set is counted in memory between reaper ticks (each early flush is an UPDATE of that many
/// rows: with a small bound, a busy cache spends its time writing counts), small enough to stay
/// a few MiB.
const FLUSH_SOON_KEYS: usize = 50_000;

/// Distinct keys buffered at most: past it, accesses to new keys are not buffered (memory stays
/// bounded while the database is unreachable).
const MAX_BUFFERED_KEYS: usize = 4 * FLUSH_SOON_KEYS;

/// The longest a background flush (the reaper's) waits for a connection.
const FLUSH_CHECKOUT: Duration = Duration::from_secs(2);

/// Who flushes, which decides how long it may wait and whether it retries.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Flush {
    /// The reaper: a short checkout, no retry (the next tick is the retry).
    Background,
    /// A public call (statistics, an early flush without a reaper): like every call.
    Call,
    /// The last clone's close: everything must be done by the deadline.
    Closing(Instant),
}

impl Flush {
    fn checkout(self, pool: &Pool) -> Checkout {
        match self {
            Flush::Background => Checkout::Within(pool.timeout().min(FLUSH_CHECKOUT)),
            Flush::Call => Checkout::Pool,
            Flush::Closing(deadline) => Checkout::Until(deadline),
        }
    }

    fn retry(self) -> Retry {
        match self {
            Flush::Background => Retry::Never,
            Flush::Call | Flush::Closing(_) => Retry::Idempotent,
        }
    }
}

/// Accesses of one key not yet written.
#[derive(Clone, Copy, Debug)]
struct Pending {
    count: u64,
    last: Instant,
}

impl Pending {
    /// Adds `other`'s accesses of the same key to these.
    fn absorb(&mut self, other: Pending) {
        self.count += other.count;
        self.last = self.last.max(other.last);
    }
}

/// What the caller of [`AccessBuffer::record`] should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Buffer {
    /// Nothing.
    Fine,
    /// The buffer is getting large: flush it soon.
    FlushSoon,
}

/// Counts per key, as drained from a buffer.
type Drained = Vec<(String, Pending)>;

/// A flush whose COMMIT reply was lost: its transaction id and the counts it carried.
type InDoubt = (i64, Drained);

/// One shard's counts: key -> (count, time of the last access).
type Counts = HashMap<String, Pending>;

/// Key -> (count, time of the last access), bounded. Each thread counts into its own shard
/// (no lock shared between threads on the hot path); a drain merges the shards.
#[derive(Debug, Default)]
struct AccessBuffer {
    shards: Sharded<Mutex<Counts>>,
    /// Keys over all shards (a key two threads counted is two).
    keys: AtomicUsize,
    /// Flushes whose outcome is not known yet: their transaction id and counts.
    in_doubt: Mutex<Vec<InDoubt>>,
    /// Accesses not buffered because the buffer was full.
    dropped: AtomicU64,
}

fn lock(counts: &Mutex<Counts>) -> MutexGuard<'_, Counts> {
    counts.lock().unwrap_or_else(|p| p.into_inner())
}

impl AccessBuffer {
    /// Counts one access of `key`.
    fn record(&self, key: &str) -> Buffer {
        let now = Instant::now();
        let mut pending = lock(self.shards.local());
        if let Some(p) = pending.get_mut(key) {
            p.count += 1;
            p.last = now;
            return Buffer::Fine;
        }
        if self.keys.load(Ordering::Relaxed) >= MAX_BUFFERED_KEYS {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Buffer::FlushSoon;
        }
        pending.insert(
            key.to_owned(),
            Pending {
                count: 1,
                last: now,
            },
        );
        // Counted under the shard's lock, so a drain never takes a key it has not counted.
        if self.keys.fetch_add(1, Ordering::Relaxed) + 1 >= FLUSH_SOON_KEYS {
            Buffer::FlushSoon
        } else {
            Buffer::Fine
        }
    }

    /// Takes the buffered counts, merged over the shards and sorted by key (a stable lock
    /// order for concurrent flushes).
    fn drain(&self) -> Drained {
        let mut merged = Counts::new();
        for shard in self.shards.iter() {
            let taken = std::mem::take(&mut *lock(shard));
            self.keys.fetch_sub(taken.len(), Ordering::Relaxed);
            for (key, c) in taken {
                merged.entry(key).and_modify(|p| p.absorb(c)).or_insert(c);
            }
        }
        let mut drained: Drained = merged.into_iter().collect();
        drained.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        drained
    }

    /// Puts back counts whose flush failed, so the next flush carries them.
    fn restore(&self, counts: Drained) {
        use std::collections::hash_map::Entry;
        let mut pending = lock(self.shards.local());
        for (key, c) in counts {
            match pending.entry(key) {
                Entry::Occupied(mut p) => p.get_mut().absorb(c),
                Entry::Vacant(v) if self.keys.load(Ordering::Relaxed) < MAX_BUFFERED_KEYS => {
                    v.insert(c);
                    self.keys.fetch_add(1, Ordering::Relaxed);
                }
                Entry::Vacant(_) => {
                    self.dropped.fetch_add(c.count, Ordering::Relaxed);
                }
            }
        }
    }

    /// Buffered keys not yet flushed.
    #[cfg(test)]
    fn pending_keys(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }

    /// (accesses, keys) not yet written, and accesses whose flush is in doubt.
    fn unwritten(&self) -> (u64, usize, u64) {
        let (mut accesses, mut keys) = (0, 0);
        for shard in self.shards.iter() {
            let pending = lock(shard);
            accesses += pending.values().map(|p| p.count).sum::<u64>();
            keys += pending.len();
        }
        let doubt = self.in_doubt.lock().unwrap_or_else(|p| p.into_inner());
        (
            accesses,
            keys,
            doubt
                .iter()
                .flat_map(|(_, counts)| counts.iter().map(|(_, p)| p.count))
                .sum(),
        )
    }

    /// Asks the server about flushes in doubt: committed ones are done, aborted ones go back
    /// into the buffer, forgotten ones are dropped (counting them again could count twice),
    /// the rest wait for the next flush.
    fn settle(&self, pool: &Pool, op: &str, checkout: Checkout) {
        let doubtful =
            std::mem::take(&mut *self.in_doubt.lock().unwrap_or_else(|p| p.into_inner()));
        for (xid, counts) in doubtful {
            match commit::status(pool, xid, checkout) {
                Ok(Status::Committed) => {
                    log::debug!("pg-model-repo: {op}: the flush in doubt ({xid}) committed")
                }
                Ok(Status::Aborted) => self.restore(counts),
                Ok(Status::Forgotten) => log::warn!(
                    "pg-model-repo: {op}: the server no longer knows whether flush {xid} \
                     committed; its {} counts are dropped rather than risk counting twice",
                    counts.iter().map(|(_, p)| p.count).sum::<u64>()
                ),
                Ok(Status::InProgress) | Err(_) => self
                    .in_doubt
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((xid, counts)),
            }
        }
    }
}

/// Cache lookups counted by the threads of one shard.
#[derive(Debug, Default)]
struct Lookups {
    hits: AtomicU64,
    misses: AtomicU64,
}

/// What is counted and how it is written: the one access-count type of the repository.
#[derive(Debug)]
pub(crate) struct AccessCounts {
    lookups: Sharded<Lookups>,
    cache_hits: Counted,
    model_loads: Counted,
}

/// One buffer with the statement that writes it.
#[derive(Debug)]
struct Counted {
    op: &'static str,
    sql: &'static str,
    buffer: AccessBuffer,
}

/// Statements that write buffered counts: `$1 text[]` (keys), `$2 int8[]` (counts), `$3
/// int8[]` (microseconds since the last access, so the database clock stamps it). Registered
/// by the features that count; a buffer no feature registered stays empty and is never
/// written.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FlushStatements {
    /// Adds hits to the cache rows (keys are cache keys).
    pub cache_hits: &'static str,
    /// Adds loads to the model rows (keys are JSON `[model_name, version]`).
    pub model_loads: &'static str,
}

impl AccessCounts {
    pub(crate) fn new(statements: FlushStatements) -> Self {
        let counted = |op, sql| Counted {
            op,
            sql,
            buffer: AccessBuffer::default(),
        };
        AccessCounts {
            lookups: Sharded::default(),
            cache_hits: counted("flush_cache_hits", statements.cache_hits),
            model_loads: counted("flush_model_loads", statements.model_loads),
        }
    }

    /// A cache lookup that found a live entry under `key`.
    pub(crate) fn record_hit(&self, key: &str) -> Buffer {
        self.lookups.local().hits.fetch_add(1, Ordering::Relaxed);
        self.cache_hits.buffer.record(key)
    }

    /// A cache lookup that found nothing live.
    pub(crate) fn record_miss(&self) {
        self.lookups.local().misses.fetch_add(1, Ordering::Relaxed);
    }

    /// A load of one model version.
    pub(crate) fn record_load(&self, model_name: &str, version: &str) -> Buffer {
        let key = serde_json::json!([model_name, version]).to_string();
        self.model_loads.buffer.record(&key)
    }

    /// Cache (hits, misses) since the repository was opened.
    pub(crate) fn lookups(&self) -> (u64, u64) {
        self.lookups.iter().fold((0, 0), |(hits, misses), l| {
            (
                hits + l.hits.load(Ordering::Relaxed),
                misses + l.misses.load(Ordering::Relaxed),
            )
        })
    }

    /// Writes both buffers; both are attempted unless the first timed out, and the first
    /// error is returned.
    pub(crate) fn flush(&self, pool: &Pool, how: Flush) -> Result<()> {
        let hits = self.cache_hits.flush(pool, how);
        if let Err(RepoError::Timeout(_)) = &hits {
            // No connection came, or the server hangs: the second would wait the same way.
            return hits;
        }
        let loads = self.model_loads.flush(pool, how);
        hits.and(loads)
    }

    /// What is not written yet, for the log of a close that could not flush it.
    pub(crate) fn unwritten(&self) -> String {
        let (hits, hit_keys, hits_in_doubt) = self.cache_hits.buffer.unwritten();
        let (loads, load_keys, loads_in_doubt) = self.model_loads.buffer.unwritten();
        format!(
            "{hits} cache hits over {hit_keys} keys and {loads} model loads over {load_keys} \
             versions not written; {hits_in_doubt} hits and {loads_in_doubt} loads whose flush \
             lost its reply, outcome unknown"
        )
    }

    /// True when nothing is buffered or in doubt.
    pub(crate) fn is_empty(&self) -> bool {
        let (hits, _, hits_doubt) = self.cache_hits.buffer.unwritten();
        let (loads, _, loads_doubt) = self.model_loads.buffer.unwritten();
        hits + hits_doubt + loads + loads_doubt == 0
    }
}

/// The background thread's first chore: the buffers written at every tick, and whenever a
/// buffer fills up (the reaper's wake-up).
impl Chore for AccessCounts {
    fn what(&self) -> &'static str {
        "flush buffered access counts"
    }

    fn work(&self, pool: &Pool, _stopping: &dyn Fn() -> bool) -> Result<u64> {
        self.flush(pool, Flush::Background).map(|()| 0)
    }
}

impl Counted {
    fn flush(&self, pool: &Pool, how: Flush) -> Result<()> {
        flush(pool, &self.buffer, self.op, self.sql, how)
    }
}

/// Writes the buffered counts with `sql`, which takes `$1 text[]` (keys), `$2 int8[]`
/// (counts) and `$3 int8[]` (microseconds since the last access, so the database clock stamps
/// it). On a failure before the commit the counts go back into the buffer; after a lost
/// commit reply they are settled as [`AccessBuffer::settle`] says.
fn flush(
    pool: &Pool,
    buffer: &AccessBuffer,
    op: &'static str,
    sql: &'static str,
    how: Flush,
) -> Result<()> {
    let checkout = how.checkout(pool);
    buffer.settle(pool, op, checkout);
    let drained = buffer.drain();
    if drained.is_empty() {
        return Ok(());
    }
    let now = Instant::now();
    let keys: Vec<&str> = drained.iter().map(|(k, _)| k.as_str()).collect();
    let counts: Vec<i64> = drained
        .iter()
        .map(|(_, p)| i64::try_from(p.count).unwrap_or(i64::MAX))
        .collect();
    let ages: Vec<i64> = drained
        .iter()
        .map(|(_, p)| i64::try_from(now.duration_since(p.last).as_micros()).unwrap_or(i64::MAX))
        .collect();
    let result = commit::run_tracked(pool, op, how.retry(), checkout, |tx| {
        Ok(tx.execute(sql, &[&keys, &counts, &ages])?)
    });
    match result {
        Ok(Outcome::Committed(updated)) => {
            log::debug!(
                "pg-model-repo: {op}: {} keys ({updated} rows)",
                drained.len()
            );
            Ok(())
        }
        Ok(Outcome::Unknown { xid, cause }) => {
            buffer
                .in_doubt
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((xid, drained));
            Err(commit::unknown(op, xid, &cause))
        }
        Err(e) => {
            buffer.restore(drained);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_and_misses_are_counted_and_hits_buffered() {
        let c = AccessCounts::new(FlushStatements {
            cache_hits: "",
            model_loads: "",
        });
        c.record_hit("a");
        c.record_hit("a");
        c.record_miss();
        c.record_load("m", "1");
        assert_eq!(c.lookups(), (2, 1));
        assert_eq!(c.cache_hits.buffer.pending_keys(), 1);
        assert_eq!(c.model_loads.buffer.pending_keys(), 1);
    }

    #[test]
    fn the_buffer_is_bounded_and_asks_for_a_flush() {
        let c = AccessBuffer::default();
        for i in 0..FLUSH_SOON_KEYS - 1 {
            assert_eq!(c.record(&format!("k{i}")), Buffer::Fine);
        }
        assert_eq!(c.record("last"), Buffer::FlushSoon);
        for i in 0..2 * MAX_BUFFERED_KEYS {
            c.record(&format!("more{i}"));
        }
        assert_eq!(c.pending_keys(), MAX_BUFFERED_KEYS);
        // Repeated accesses of a buffered key add up without growing the buffer.
        c.record("k0");
        let drained = c.drain();
        assert_eq!(drained.len(), MAX_BUFFERED_KEYS);
        assert_eq!(drained.iter().find(|(k, _)| k == "k0").unwrap().1.count, 2);
        assert_eq!(c.pending_keys(), 0);
        c.restore(drained);
        assert_eq!(c.pending_keys(), MAX_BUFFERED_KEYS);
    }

    #[test]
    fn counts_from_many_threads_merge_per_key() {
        let c = AccessCounts::new(FlushStatements {
            cache_hits: "",
            model_loads: "",
        });
        std::thread::scope(|s| {
            for t in 0..4 {
                let c = &c;
                s.spawn(move || {
                    for i in 0..100 {
                        c.record_hit(if i % 2 == 0 { "shared" } else { "other" });
                        if t == 0 {
                            c.record_miss();
                        }
                    }
                    c.record_hit(&format!("own{t}"));
                });
            }
        });
        assert_eq!(c.lookups(), (404, 100));
        let drained = c.cache_hits.buffer.drain();
        let counts: Vec<(&str, u64)> = drained.iter().map(|(k, p)| (k.as_str(), p.count)).collect();
        assert_eq!(
            counts,
            [
                ("other", 200),
                ("own0", 1),
                ("own1", 1),
                ("own2", 1),
                ("own3", 1),
                ("shared", 200)
            ]
        );
        assert_eq!(c.cache_hits.buffer.keys.load(Ordering::Relaxed), 0);
        assert_eq!(c.cache_hits.buffer.unwritten(), (0, 0, 0));
    }
}
