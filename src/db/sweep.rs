//! Leftovers of work that died midway (a process killed during a `ParallelCopy`, a full
//! refresh or a chunked model save) are removed by one sweep, by age, run by the reaper tick
//! and by `optimize_database`. Each feature declares its leftovers next to its tables; the
//! repository lists them.

use std::time::Duration;

use crate::db::error::Result;
use crate::db::pool::Pool;
use crate::db::retry::Retry;

/// How old a leftover must be before the sweep removes it: far longer than any step of a
/// live load or save leaves its staged rows unclaimed.
pub(crate) const LEFTOVER_AGE: Duration = Duration::from_secs(60 * 60);

/// One kind of leftover: `sql` takes `$1` (float8, the minimum age in seconds) and returns one
/// int8 row, the number of leftovers it removed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Leftover {
    /// What is removed, for the log.
    pub what: &'static str,
    /// The statement that removes it.
    pub sql: &'static str,
}

/// Removes every kind of leftover older than `min_age`; returns how many went. Each kind is
/// tried even when another fails; the first error is returned after all were tried.
pub(crate) fn sweep(
    pool: &Pool,
    leftovers: &[Leftover],
    min_age: Duration,
    retry: Retry,
) -> Result<u64> {
    let age = min_age.as_secs_f64();
    let mut removed = 0;
    let mut first_error = None;
    for leftover in leftovers {
        let swept = pool.run("sweep_leftovers", retry, |conn| {
            let statement = conn.prepare_cached(leftover.sql)?;
            let n: i64 = conn.client().query_one(&statement, &[&age])?.try_get(0)?;
            Ok(u64::try_from(n).unwrap_or(0))
        });
        match swept {
            Ok(0) => {}
            Ok(n) => {
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
