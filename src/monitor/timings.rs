//! The per-operation timing registry every public call reports to: exact counts, totals and
//! maxima, percentiles from a bounded histogram, and a slow-call warning. Each thread records
//! into its own shard (no lock shared between threads on the hot path); a snapshot adds the
//! shards up.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::db::shard::Sharded;
use crate::db::static_key::{StaticKey, StaticMap};

/// Timings of one operation (a public method's name), since the repository was opened.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QueryMetric {
    /// The operation, e.g. `"save_model"`, `"get_embeddings"`.
    pub query_type: String,
    /// Calls completed.
    pub count: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Calls slower than the slow-query threshold.
    pub slow: u64,
    /// Time spent in all calls.
    pub total: Duration,
    /// Mean call time.
    pub mean: Duration,
    /// Median (from the histogram, 3 significant digits).
    pub p50: Duration,
    /// 95th percentile.
    pub p95: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// The slowest call.
    pub max: Duration,
}

struct OpStats {
    count: u64,
    errors: u64,
    slow: u64,
    total: Duration,
    max: Duration,
    /// `None` only if the histogram could not be built (its bounds are constants that
    /// hdrhistogram accepts): percentiles then fall back to the maximum.
    micros: Option<Histogram<u64>>,
}

impl OpStats {
    fn new() -> Self {
        OpStats {
            count: 0,
            errors: 0,
            slow: 0,
            total: Duration::ZERO,
            max: Duration::ZERO,
            // 1 µs .. 1 hour at 3 significant digits: a fixed ~100 KiB per operation name and
            // shard, whatever the traffic.
            micros: Histogram::new_with_bounds(1, 3_600_000_000, 3).ok(),
        }
    }

    fn record(&mut self, elapsed: Duration, ok: bool, slow: bool) {
        self.count += 1;
        self.errors += u64::from(!ok);
        self.slow += u64::from(slow);
        self.total += elapsed;
        self.max = self.max.max(elapsed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(histogram) = &mut self.micros {
            histogram.saturating_record(micros.max(1));
        }
    }

    /// Adds `other`'s calls to these.
    fn merge(&mut self, other: &OpStats) {
        self.count += other.count;
        self.errors += other.errors;
        self.slow += other.slow;
        self.total += other.total;
        self.max = self.max.max(other.max);
        match (&mut self.micros, &other.micros) {
            (Some(mine), Some(theirs)) => {
                // Same bounds on both sides: adding cannot fail.
                let _ = mine.add(theirs);
            }
            (None, Some(theirs)) => self.micros = Some(theirs.clone()),
            (_, None) => {}
        }
    }

    fn snapshot(&self, name: &str) -> QueryMetric {
        // A histogram bucket's upper edge may lie above the exact maximum.
        let at = |q: f64| match &self.micros {
            Some(h) => Duration::from_micros(h.value_at_quantile(q)).min(self.max),
            None => self.max,
        };
        QueryMetric {
            query_type: name.to_owned(),
            count: self.count,
            errors: self.errors,
            slow: self.slow,
            total: self.total,
            mean: self.total / u32::try_from(self.count.max(1)).unwrap_or(u32::MAX),
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: self.max,
        }
    }
}

/// One shard's operations, keyed by the name's address (merged by name in a snapshot).
type Ops = StaticMap<OpStats>;

/// The registry: one entry per operation name and shard, so memory is bounded by the number of
/// methods times the number of shards (at most one per CPU), whatever the traffic.
pub(crate) struct Timings {
    enabled: bool,
    slow_threshold: Duration,
    shards: Sharded<Mutex<Ops>>,
}

impl std::fmt::Debug for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timings")
            .field("enabled", &self.enabled)
            .field("slow_threshold", &self.slow_threshold)
            .finish_non_exhaustive()
    }
}

impl Timings {
    pub(crate) fn new(enabled: bool, slow_threshold: Duration) -> Self {
        Timings {
            enabled,
            slow_threshold,
            shards: Sharded::default(),
        }
    }

    /// Records one call. Slow calls log a warning naming the operation and its duration only
    /// (never its arguments).
    pub(crate) fn record(&self, op: &'static str, elapsed: Duration, ok: bool) {
        let slow = elapsed > self.slow_threshold;
        if slow {
            log::warn!("pg-model-repo: slow operation {op} took {elapsed:?}");
        }
        if !self.enabled {
            return;
        }
        lock(self.shards.local())
            .entry(StaticKey(op))
            .or_insert_with(OpStats::new)
            .record(elapsed, ok, slow);
    }

    /// Every operation's figures, sorted by name.
    pub(crate) fn snapshot(&self) -> Vec<QueryMetric> {
        let mut all: BTreeMap<&str, OpStats> = BTreeMap::new();
        for shard in self.shards.iter() {
            for (name, stats) in lock(shard).iter() {
                all.entry(name.0).or_insert_with(OpStats::new).merge(stats);
            }
        }
        all.iter().map(|(name, s)| s.snapshot(name)).collect()
    }
}

fn lock(ops: &Mutex<Ops>) -> MutexGuard<'_, Ops> {
    ops.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_from_many_threads_add_up() {
        let t = Timings::new(true, Duration::from_secs(1));
        std::thread::scope(|s| {
            for i in 0..6u64 {
                let t = &t;
                s.spawn(move || {
                    for _ in 0..100 {
                        t.record("op", Duration::from_micros(10 + i), i != 0);
                    }
                    t.record("other", Duration::from_millis(2), true);
                });
            }
        });
        let all = t.snapshot();
        let names: Vec<&str> = all.iter().map(|m| m.query_type.as_str()).collect();
        assert_eq!(names, ["op", "other"]);
        let op = &all[0];
        assert_eq!((op.count, op.errors), (600, 100));
        assert_eq!(op.total, Duration::from_micros(100 * (60 + 15)));
        assert_eq!(op.max, Duration::from_micros(15));
        assert_eq!(op.p50, Duration::from_micros(12));
        assert_eq!(all[1].count, 6);
    }

    #[test]
    fn counts_totals_and_maxima_are_exact() {
        let t = Timings::new(true, Duration::from_millis(5));
        t.record("op", Duration::from_millis(1), true);
        t.record("op", Duration::from_millis(3), false);
        t.record("op", Duration::from_millis(10), true);
        let m = &t.snapshot()[0];
        assert_eq!((m.count, m.errors, m.slow), (3, 1, 1));
        assert_eq!(m.total, Duration::from_millis(14));
        assert_eq!(m.max, Duration::from_millis(10));
        assert!(m.p50 >= Duration::from_micros(2990) && m.p50 <= Duration::from_micros(3010));
    }

    #[test]
    fn disabled_registry_records_nothing() {
        let t = Timings::new(false, Duration::from_secs(1));
        t.record("op", Duration::from_millis(1), true);
        assert!(t.snapshot().is_empty());
    }
}
