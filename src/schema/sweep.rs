//! Leftovers of work that died midway (a process killed during a `ParallelCopy`, a full
//! refresh or a chunked model save) are removed by one sweep, by age, run by the reaper tick
//! and by `optimize_database`. Each feature declares its leftovers next to its tables and
//! registers them when the repository opens.

use std::time::Duration;

use crate::db::background::Chore;
use crate::db::pool::Pool;
use crate::db::retry::Retry;
use crate::error::Result;

/// How old a leftover must be before the sweep removes it: far longer than any step of a
/// live load or save leaves its staged rows unclaimed.
pub(crate) const LEFTOVER_AGE: Duration = Duration::from_secs(60 * 60);

/// The advisory lock key (two int4) by which a live owner holds group `$id` (an int8 SQL
/// expression) of leftover `$kind` in the connection's schema: the kind and the schema hashed,
/// and the id modulo 2^31. Ids come from each schema's own sequences, so the schema is part
/// of the key: a live save or load in one repository never holds (or waits on) another's.
macro_rules! owner_lock_key {
    ($kind:literal, $id:literal) => {
        concat!(
            "hashtext('pg-model-repo.",
            $kind,
            ".' || current_schema()), ((",
            $id,
            ")::int8 % 2147483647)::int4"
        )
    };
}
pub(crate) use owner_lock_key;

/// The sweep's [`Leftover::try_lock`] for a kind: its key, and the key of releases before the
/// schema was part of it (`$legacy_class`, the id modulo 2^31), which an older process still
/// running against the schema holds; a group is free when neither is held.
macro_rules! try_owner_lock {
    ($kind:literal, $legacy_class:literal) => {
        concat!(
            "SELECT pg_try_advisory_xact_lock(",
            $crate::schema::sweep::owner_lock_key!($kind, "$1"),
            ") AND pg_try_advisory_xact_lock(",
            $legacy_class,
            ", ($1::int8 % 2147483647)::int4)"
        )
    };
}
pub(crate) use try_owner_lock;

/// One kind of leftover, in groups (a load's or a save's id) that a live owner keeps locked
/// with a session advisory lock. The lock is tried by a statement of its own that reads no
/// table, so that on a Citus cluster it runs on the coordinator, where the owners lock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Leftover {
    /// What is removed, for the log.
    pub what: &'static str,
    /// The ids (int8) of groups older than `$1` (float8, seconds).
    pub candidates: &'static str,
    /// Tries the advisory lock of group `$1` (int8) for the transaction: one bool.
    pub try_lock: &'static str,
    /// Removes group `$1`'s leftovers older than `$2` (float8, seconds).
    pub delete: &'static str,
}

/// The background thread's chore: every registered kind of leftover older than
/// [`LEFTOVER_AGE`] removed at each tick.
#[derive(Debug)]
pub(crate) struct Sweep {
    leftovers: Vec<Leftover>,
}

impl Sweep {
    pub(crate) fn new(leftovers: Vec<Leftover>) -> Self {
        Sweep { leftovers }
    }
}

impl Chore for Sweep {
    fn what(&self) -> &'static str {
        "sweep leftovers"
    }

    fn work(&self, pool: &Pool, _stopping: &dyn Fn() -> bool) -> Result<u64> {
        // Errors are logged inside, per kind; the next tick tries again.
        Ok(sweep(pool, &self.leftovers, LEFTOVER_AGE, Retry::Never).unwrap_or(0))
    }
}

/// Removes every kind of leftover older than `min_age`; returns how many went. Each kind is
/// tried even when another fails; the first error is returned after all were tried.
pub(crate) fn sweep(
    pool: &Pool,
    leftovers: &[Leftover],
    min_age: Duration,
    retry: Retry,
) -> Result<u64> {
    let mut removed = 0;
    let mut first_error = None;
    for leftover in leftovers {
        match sweep_one(pool, leftover, min_age, retry) {
            Ok(0) => {}
            Ok(n) => {
                pool.metrics().leftovers_swept(n);
                log::info!(
                    "pg-model-repo: swept {n} {} older than {min_age:?}",
                    leftover.what
                );
                removed += n;
            }
            Err(e) => {
                log::warn!("pg-model-repo: sweeping {} failed: {e}", leftover.what);
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// One kind: the groups old enough, then each group that no live owner holds, in a
/// transaction of its own (the lock is held until its delete commits).
fn sweep_one(pool: &Pool, leftover: &Leftover, min_age: Duration, retry: Retry) -> Result<u64> {
    let age = min_age.as_secs_f64();
    let groups: Vec<i64> = pool.with_conn("sweep_leftovers", retry, |conn| {
        let statement = conn.prepare_cached(leftover.candidates)?;
        conn.client()
            .query(&statement, &[&age])?
            .iter()
            .map(|row| Ok(row.try_get(0)?))
            .collect()
    })?;
    let mut removed = 0;
    for group in groups {
        removed += pool.with_conn("sweep_leftovers", retry, |conn| {
            let mut tx = conn.client().transaction()?;
            let free: bool = tx.query_one(leftover.try_lock, &[&group])?.try_get(0)?;
            if !free {
                return Ok(0);
            }
            let n = tx.execute(leftover.delete, &[&group, &age])?;
            tx.commit()?;
            Ok(n)
        })?;
    }
    Ok(removed)
}
