//! What the crate reports through the `metrics` facade (feature `metrics`): OpenTelemetry's
//! database-client names for operations and the pool, the library's own counters under
//! `pg_model_repo.`. A leaf every layer may use; without the feature every method is empty.
//!
//! The library never installs a recorder. Handles are looked up at every record (never kept).
//! Gauges move by increments (a connection opened is +1 idle, a checkout moves one from idle
//! to used), so several pools of one schema add up; install the recorder before opening a
//! repository, or its gauges start from what they missed.

#[cfg(not(feature = "metrics"))]
use std::time::Duration;

use crate::error::RepoError;

/// Every name this module reports (docs/metrics.md has the table with units and attributes).
#[cfg(feature = "metrics")]
pub(crate) mod names {
    /// Histogram, seconds: one per public operation.
    pub(crate) const OPERATION_DURATION: &str = "db.client.operation.duration";
    /// Gauge, `{connection}`, by `db.client.connection.state` (idle, used).
    pub(crate) const CONNECTION_COUNT: &str = "db.client.connection.count";
    /// Gauge, `{connection}`: the pool's maximum size.
    pub(crate) const CONNECTION_MAX: &str = "db.client.connection.max";
    /// Histogram, seconds: the time a checkout took.
    pub(crate) const CONNECTION_WAIT_TIME: &str = "db.client.connection.wait_time";
    /// Counter, `{timeout}`: checkouts that ran past their bound.
    pub(crate) const CONNECTION_TIMEOUTS: &str = "db.client.connection.timeouts";
    /// Gauge, `{request}`: threads waiting for a connection.
    pub(crate) const CONNECTION_PENDING: &str = "db.client.connection.pending_requests";
    /// Counter, `{hit}`: cache lookups that found a live entry.
    pub(crate) const CACHE_HITS: &str = "pg_model_repo.cache.hits";
    /// Counter, `{miss}`: cache lookups that found nothing live.
    pub(crate) const CACHE_MISSES: &str = "pg_model_repo.cache.misses";
    /// Counter, `{entry}`: entries written.
    pub(crate) const CACHE_SETS: &str = "pg_model_repo.cache.sets";
    /// Counter, `{row}`: expired rows deleted by the background reaper.
    pub(crate) const CACHE_REAPED: &str = "pg_model_repo.cache.reaped";
    /// Counter, `{row}`: embeddings loaded, by `method`.
    pub(crate) const ROWS_LOADED: &str = "pg_model_repo.embeddings.rows_loaded";
    /// Counter, bytes: model bytes saved.
    pub(crate) const MODEL_BYTES_SAVED: &str = "pg_model_repo.models.bytes_saved";
    /// Counter, bytes: model bytes loaded.
    pub(crate) const MODEL_BYTES_LOADED: &str = "pg_model_repo.models.bytes_loaded";
    /// Counter, `{row}`: leftovers of dead loads and saves removed by the sweep.
    pub(crate) const LEFTOVERS_SWEPT: &str = "pg_model_repo.leftovers.swept";
    /// Gauge, `{subscription}`: live model event subscriptions.
    pub(crate) const EVENT_SUBSCRIPTIONS: &str = "pg_model_repo.events.subscriptions";
}

/// Why an operation failed, as `error.type` (and `db.response.status_code` when the server
/// gave a SQLSTATE).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct ErrorType<'a> {
    kind: &'static str,
    code: Option<&'a str>,
}

impl<'a> ErrorType<'a> {
    /// A failure that is no `RepoError` (an unhealthy health check).
    pub(crate) fn other(kind: &'static str) -> Self {
        ErrorType { kind, code: None }
    }
}

impl<'a> From<&'a RepoError> for ErrorType<'a> {
    fn from(e: &'a RepoError) -> Self {
        ErrorType {
            kind: e.kind_name(),
            code: e.code().map(|c| c.code()),
        }
    }
}

/// The facade's side of one repository (or pool): the schema its records are labelled with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Metrics {
    #[cfg(feature = "metrics")]
    namespace: &'static str,
}

/// When a checkout started (nothing without the feature: no clock is read).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
}

impl Clock {
    #[inline]
    pub(crate) fn start() -> Self {
        Clock {
            #[cfg(feature = "metrics")]
            started: std::time::Instant::now(),
        }
    }
}

/// Held while a subscription's thread runs: the subscriptions gauge counts it until dropped.
#[derive(Debug)]
pub(crate) struct Live {
    #[cfg(feature = "metrics")]
    metrics: Metrics,
}

#[cfg(feature = "metrics")]
mod facade {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};
    use ::metrics::{histogram, Unit};

    use super::names::*;
    use super::{Clock, ErrorType, Live, Metrics};

    const SYSTEM: &str = "db.system.name";
    const OPERATION: &str = "db.operation.name";
    const NAMESPACE: &str = "db.namespace";
    const ERROR: &str = "error.type";
    const STATUS: &str = "db.response.status_code";
    const POOL: &str = "db.client.connection.pool.name";
    const STATE: &str = "db.client.connection.state";

    /// The schema as a `&'static str`, so labels never allocate: each distinct schema name is
    /// kept once for the process's life.
    fn intern(schema: &str) -> &'static str {
        static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
        let mut names = NAMES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match names.get(schema) {
            Some(name) => name,
            None => {
                let name: &'static str = Box::leak(schema.to_owned().into_boxed_str());
                names.insert(name);
                name
            }
        }
    }

    impl Metrics {
        pub(crate) fn new(schema: &str) -> Self {
            Metrics {
                namespace: intern(schema),
            }
        }

        pub(crate) fn operation(
            &self,
            op: &'static str,
            elapsed: Duration,
            error: Option<ErrorType<'_>>,
        ) {
            let ns = self.namespace;
            let seconds = elapsed.as_secs_f64();
            match error {
                None => histogram!(OPERATION_DURATION, SYSTEM => "postgresql", OPERATION => op, NAMESPACE => ns)
                    .record(seconds),
                Some(ErrorType { kind, code: None }) => histogram!(OPERATION_DURATION, SYSTEM => "postgresql",
                    OPERATION => op, NAMESPACE => ns, ERROR => kind)
                .record(seconds),
                Some(ErrorType { kind, code: Some(code) }) => histogram!(OPERATION_DURATION,
                    SYSTEM => "postgresql", OPERATION => op, NAMESPACE => ns, ERROR => kind,
                    STATUS => code.to_owned())
                .record(seconds),
            }
        }

        pub(crate) fn cache_lookup(&self, hit: bool) {
            let name = if hit { CACHE_HITS } else { CACHE_MISSES };
            counter!(name, NAMESPACE => self.namespace).increment(1);
        }

        pub(crate) fn cache_set(&self) {
            counter!(CACHE_SETS, NAMESPACE => self.namespace).increment(1);
        }

        pub(crate) fn cache_reaped(&self, rows: u64) {
            counter!(CACHE_REAPED, NAMESPACE => self.namespace).increment(rows);
        }

        pub(crate) fn rows_loaded(&self, method: &'static str, rows: u64) {
            counter!(ROWS_LOADED, NAMESPACE => self.namespace, "method" => method).increment(rows);
        }

        pub(crate) fn model_bytes_saved(&self, bytes: u64) {
            counter!(MODEL_BYTES_SAVED, NAMESPACE => self.namespace).increment(bytes);
        }

        pub(crate) fn model_bytes_loaded(&self, bytes: u64) {
            counter!(MODEL_BYTES_LOADED, NAMESPACE => self.namespace).increment(bytes);
        }

        pub(crate) fn leftovers_swept(&self, rows: u64) {
            counter!(LEFTOVERS_SWEPT, NAMESPACE => self.namespace).increment(rows);
        }

        pub(crate) fn subscription(&self) -> Live {
            gauge!(EVENT_SUBSCRIPTIONS, NAMESPACE => self.namespace).increment(1.0);
            Live { metrics: *self }
        }

        /// Moves `idle` and `used` connections of the pool (+1 opened, -1 closed).
        pub(crate) fn connections(&self, idle: f64, used: f64) {
            let pool = self.namespace;
            if idle != 0.0 {
                gauge!(CONNECTION_COUNT, POOL => pool, STATE => "idle").increment(idle);
            }
            if used != 0.0 {
                gauge!(CONNECTION_COUNT, POOL => pool, STATE => "used").increment(used);
            }
        }

        /// A pool of `max` connections was built (`+`) or dropped (`-`).
        pub(crate) fn pool_max(&self, max: f64) {
            gauge!(CONNECTION_MAX, POOL => self.namespace).increment(max);
        }

        /// One more thread waits for a connection (`1.0`), or one less (`-1.0`).
        pub(crate) fn waiting(&self, delta: f64) {
            gauge!(CONNECTION_PENDING, POOL => self.namespace).increment(delta);
        }

        pub(crate) fn checkout(&self, clock: Clock) {
            let waited = clock.started.elapsed().as_secs_f64();
            histogram!(CONNECTION_WAIT_TIME, POOL => self.namespace).record(waited);
        }

        pub(crate) fn checkout_timed_out(&self) {
            counter!(CONNECTION_TIMEOUTS, POOL => self.namespace).increment(1);
        }
    }

    impl Drop for Live {
        fn drop(&mut self) {
            gauge!(EVENT_SUBSCRIPTIONS, NAMESPACE => self.metrics.namespace).decrement(1.0);
        }
    }

    /// Units and descriptions, for recorders that show them. Sent at every open (cheap, and a
    /// recorder installed since gets them too).
    pub(crate) fn describe() {
        let seconds = [
            (
                OPERATION_DURATION,
                "Duration of one public operation of pg-model-repo.",
            ),
            (
                CONNECTION_WAIT_TIME,
                "Time a checkout took to obtain a pooled connection.",
            ),
        ];
        for (name, what) in seconds {
            describe_histogram!(name, Unit::Seconds, what);
        }
        let counts = [
            (
                CONNECTION_TIMEOUTS,
                "Checkouts that ran past their bound (pool_timeout or the call's deadline).",
            ),
            (CACHE_HITS, "Cache lookups that found a live entry."),
            (CACHE_MISSES, "Cache lookups that found nothing live."),
            (CACHE_SETS, "Cache entries written."),
            (
                CACHE_REAPED,
                "Expired cache rows deleted by the background reaper.",
            ),
            (
                ROWS_LOADED,
                "Embeddings loaded by the batch loads, by method.",
            ),
            (
                LEFTOVERS_SWEPT,
                "Leftovers of dead loads and saves removed by the sweep.",
            ),
        ];
        for (name, what) in counts {
            describe_counter!(name, Unit::Count, what);
        }
        describe_counter!(MODEL_BYTES_SAVED, Unit::Bytes, "Model bytes saved.");
        describe_counter!(MODEL_BYTES_LOADED, Unit::Bytes, "Model bytes loaded.");
        let gauges = [
            (
                CONNECTION_COUNT,
                "Open pooled connections, by state (idle, used).",
            ),
            (CONNECTION_MAX, "The most connections the pool opens."),
            (
                CONNECTION_PENDING,
                "Threads waiting for a pooled connection.",
            ),
            (EVENT_SUBSCRIPTIONS, "Live model event subscriptions."),
        ];
        for (name, what) in gauges {
            describe_gauge!(name, Unit::Count, what);
        }
    }
}

#[cfg(feature = "metrics")]
pub(crate) use facade::describe;

/// Without the feature: the same methods, empty.
#[cfg(not(feature = "metrics"))]
impl Metrics {
    #[inline(always)]
    pub(crate) fn new(_schema: &str) -> Self {
        Metrics {}
    }
    #[inline(always)]
    pub(crate) fn operation(&self, _: &'static str, _: Duration, _: Option<ErrorType<'_>>) {}
    #[inline(always)]
    pub(crate) fn cache_lookup(&self, _hit: bool) {}
    #[inline(always)]
    pub(crate) fn cache_set(&self) {}
    #[inline(always)]
    pub(crate) fn cache_reaped(&self, _rows: u64) {}
    #[inline(always)]
    pub(crate) fn rows_loaded(&self, _method: &'static str, _rows: u64) {}
    #[inline(always)]
    pub(crate) fn model_bytes_saved(&self, _bytes: u64) {}
    #[inline(always)]
    pub(crate) fn model_bytes_loaded(&self, _bytes: u64) {}
    #[inline(always)]
    pub(crate) fn leftovers_swept(&self, _rows: u64) {}
    #[inline(always)]
    pub(crate) fn subscription(&self) -> Live {
        Live {}
    }
    #[inline(always)]
    pub(crate) fn connections(&self, _idle: f64, _used: f64) {}
    #[inline(always)]
    pub(crate) fn pool_max(&self, _max: f64) {}
    #[inline(always)]
    pub(crate) fn waiting(&self, _delta: f64) {}
    #[inline(always)]
    pub(crate) fn checkout(&self, _clock: Clock) {}
    #[inline(always)]
    pub(crate) fn checkout_timed_out(&self) {}
}

/// Without the feature there is nothing to describe.
#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn describe() {}
