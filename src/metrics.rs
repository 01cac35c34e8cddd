//! What the crate reports through the `metrics` facade (feature `metrics`): OpenTelemetry's
//! database-client names for operations and the pool, the library's own counters under
//! `pg_model_repo.`. A leaf every layer may use; without the feature every method is empty.
//!
//! The library never installs a recorder. Each pool registers its handles once, when it is
//! built, with the recorder installed then (an operation's histogram at its first record), and
//! records through them: no key is built and no registry searched on a hot path. So install
//! the recorder before opening a repository; one opened before it records nothing. Gauges
//! move by increments (a connection opened is +1 idle, a checkout moves one from idle to
//! used), so several pools of one schema add up.

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

/// The facade's side of one repository (or pool): its handles, labelled with its schema.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    #[cfg(feature = "metrics")]
    handles: std::sync::Arc<facade::Handles>,
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
pub(crate) struct Live {
    #[cfg(feature = "metrics")]
    subscriptions: ::metrics::Gauge,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

#[cfg(feature = "metrics")]
mod facade {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
    use std::time::Duration;

    use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};
    use ::metrics::{histogram, Counter, Gauge, Histogram, Unit};

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
            .unwrap_or_else(PoisonError::into_inner);
        match names.get(schema) {
            Some(name) => name,
            None => {
                let name: &'static str = Box::leak(schema.to_owned().into_boxed_str());
                names.insert(name);
                name
            }
        }
    }

    /// One pool's handles, registered when it is built. Failed operations, loads by method
    /// and subscriptions are rare: theirs are looked up when they happen.
    pub(crate) struct Handles {
        namespace: &'static str,
        /// Each operation's histogram of successes, registered at its first record.
        operations: RwLock<HashMap<&'static str, Histogram>>,
        cache_hits: Counter,
        cache_misses: Counter,
        cache_sets: Counter,
        cache_reaped: Counter,
        bytes_saved: Counter,
        bytes_loaded: Counter,
        swept: Counter,
        idle: Gauge,
        used: Gauge,
        max: Gauge,
        pending: Gauge,
        wait_time: Histogram,
        timeouts: Counter,
    }

    impl std::fmt::Debug for Handles {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Handles")
                .field("namespace", &self.namespace)
                .finish_non_exhaustive()
        }
    }

    impl Handles {
        fn register(namespace: &'static str) -> Self {
            let ns = namespace;
            Handles {
                namespace,
                operations: RwLock::default(),
                cache_hits: counter!(CACHE_HITS, NAMESPACE => ns),
                cache_misses: counter!(CACHE_MISSES, NAMESPACE => ns),
                cache_sets: counter!(CACHE_SETS, NAMESPACE => ns),
                cache_reaped: counter!(CACHE_REAPED, NAMESPACE => ns),
                bytes_saved: counter!(MODEL_BYTES_SAVED, NAMESPACE => ns),
                bytes_loaded: counter!(MODEL_BYTES_LOADED, NAMESPACE => ns),
                swept: counter!(LEFTOVERS_SWEPT, NAMESPACE => ns),
                idle: gauge!(CONNECTION_COUNT, POOL => ns, STATE => "idle"),
                used: gauge!(CONNECTION_COUNT, POOL => ns, STATE => "used"),
                max: gauge!(CONNECTION_MAX, POOL => ns),
                pending: gauge!(CONNECTION_PENDING, POOL => ns),
                wait_time: histogram!(CONNECTION_WAIT_TIME, POOL => ns),
                timeouts: counter!(CONNECTION_TIMEOUTS, POOL => ns),
            }
        }

        fn succeeded(&self, op: &'static str, seconds: f64) {
            let known = self
                .operations
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(h) = known.get(op) {
                h.record(seconds);
                return;
            }
            drop(known);
            let ns = self.namespace;
            self.operations
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(op)
                .or_insert_with(|| {
                    histogram!(OPERATION_DURATION, SYSTEM => "postgresql", OPERATION => op,
                        NAMESPACE => ns)
                })
                .record(seconds);
        }
    }

    impl Metrics {
        pub(crate) fn new(schema: &str) -> Self {
            Metrics {
                handles: Arc::new(Handles::register(intern(schema))),
            }
        }

        pub(crate) fn operation(
            &self,
            op: &'static str,
            elapsed: Duration,
            error: Option<ErrorType<'_>>,
        ) {
            let ns = self.handles.namespace;
            let seconds = elapsed.as_secs_f64();
            match error {
                None => self.handles.succeeded(op, seconds),
                Some(ErrorType { kind, code: None }) => {
                    histogram!(OPERATION_DURATION, SYSTEM => "postgresql",
                    OPERATION => op, NAMESPACE => ns, ERROR => kind)
                    .record(seconds)
                }
                Some(ErrorType {
                    kind,
                    code: Some(code),
                }) => histogram!(OPERATION_DURATION,
                    SYSTEM => "postgresql", OPERATION => op, NAMESPACE => ns, ERROR => kind,
                    STATUS => code.to_owned())
                .record(seconds),
            }
        }

        pub(crate) fn cache_lookup(&self, hit: bool) {
            let h = &self.handles;
            if hit { &h.cache_hits } else { &h.cache_misses }.increment(1);
        }

        pub(crate) fn cache_set(&self) {
            self.handles.cache_sets.increment(1);
        }

        pub(crate) fn cache_reaped(&self, rows: u64) {
            self.handles.cache_reaped.increment(rows);
        }

        pub(crate) fn rows_loaded(&self, method: &'static str, rows: u64) {
            counter!(ROWS_LOADED, NAMESPACE => self.handles.namespace, "method" => method)
                .increment(rows);
        }

        pub(crate) fn model_bytes_saved(&self, bytes: u64) {
            self.handles.bytes_saved.increment(bytes);
        }

        pub(crate) fn model_bytes_loaded(&self, bytes: u64) {
            self.handles.bytes_loaded.increment(bytes);
        }

        pub(crate) fn leftovers_swept(&self, rows: u64) {
            self.handles.swept.increment(rows);
        }

        pub(crate) fn subscription(&self) -> Live {
            let subscriptions = gauge!(EVENT_SUBSCRIPTIONS, NAMESPACE => self.handles.namespace);
            subscriptions.increment(1.0);
            Live { subscriptions }
        }

        /// Moves `idle` and `used` connections of the pool (+1 opened, -1 closed).
        pub(crate) fn connections(&self, idle: f64, used: f64) {
            if idle != 0.0 {
                self.handles.idle.increment(idle);
            }
            if used != 0.0 {
                self.handles.used.increment(used);
            }
        }

        /// A pool of `max` connections was built (`+`) or dropped (`-`).
        pub(crate) fn pool_max(&self, max: f64) {
            self.handles.max.increment(max);
        }

        /// One more thread waits for a connection (`1.0`), or one less (`-1.0`).
        pub(crate) fn waiting(&self, delta: f64) {
            self.handles.pending.increment(delta);
        }

        pub(crate) fn checkout(&self, clock: Clock) {
            let waited = clock.started.elapsed().as_secs_f64();
            self.handles.wait_time.record(waited);
        }

        pub(crate) fn checkout_timed_out(&self) {
            self.handles.timeouts.increment(1);
        }
    }

    impl Drop for Live {
        fn drop(&mut self) {
            self.subscriptions.decrement(1.0);
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

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use std::time::Duration;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::Metrics;

    /// Handles are registered when a pool's `Metrics` is built (an operation's histogram at
    /// its first record): with the recorder installed then, later records reach it wherever
    /// they are made; built before, they reach nothing.
    #[test]
    fn handles_go_to_the_recorder_installed_when_the_pool_was_built() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let before = Metrics::new("handles_before");
        let after = metrics::with_local_recorder(&recorder, || {
            let after = Metrics::new("handles_after");
            after.operation("get_cached_predictions", Duration::from_millis(3), None);
            after
        });
        before.operation("get_cached_predictions", Duration::from_millis(3), None);
        for m in [&before, &after] {
            m.cache_lookup(true);
        }
        after.operation("get_cached_predictions", Duration::from_millis(5), None);
        let seen: Vec<(String, Vec<String>, DebugValue)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let (name, labels) = key.key().clone().into_parts();
                let labels = labels.iter().map(|l| format!("{}={}", l.key(), l.value()));
                (name.as_str().to_owned(), labels.collect(), value)
            })
            .collect();
        assert!(seen
            .iter()
            .all(|(_, labels, _)| !labels.contains(&"db.namespace=handles_before".to_owned())));
        let hits = seen
            .iter()
            .find(|(name, _, _)| name == "pg_model_repo.cache.hits")
            .expect("the hit of the pool built with the recorder");
        assert_eq!(hits.2, DebugValue::Counter(1));
        let durations = seen
            .iter()
            .find(|(name, _, _)| name == "db.client.operation.duration")
            .expect("the operation's histogram, registered at its first record");
        match &durations.2 {
            DebugValue::Histogram(values) => assert_eq!(values.len(), 2),
            other => panic!("{other:?}"),
        }
    }
}

/// What the facade costs a cache hit, without the server: the records a hit makes, timed in a
/// loop, through the handles the library keeps and through handles looked up at every record
/// (as before they were kept). A measurement, not a check:
/// `cargo test --release --features metrics --lib facade_cost -- --ignored --nocapture`
/// (docs/metrics.md).
#[cfg(all(test, feature = "metrics"))]
mod cost {
    use std::time::{Duration, Instant};

    use metrics::{counter, gauge, histogram};

    use super::{Clock, Metrics};

    const HITS: u32 = 1_000_000;

    /// A hit's records: the checkout (idle -> used, its wait), the operation, the hit, the
    /// return (used -> idle).
    fn kept(m: &Metrics) {
        m.connections(-1.0, 1.0);
        m.checkout(Clock::start());
        m.operation("get_cached_predictions", Duration::from_micros(50), None);
        m.cache_lookup(true);
        m.connections(1.0, -1.0);
    }

    /// The same records with every handle looked up at the record.
    fn looked_up(ns: &'static str) {
        let state = "db.client.connection.state";
        let pool = "db.client.connection.pool.name";
        gauge!("db.client.connection.count", pool => ns, state => "idle").decrement(1.0);
        gauge!("db.client.connection.count", pool => ns, state => "used").increment(1.0);
        let started = Instant::now();
        histogram!("db.client.connection.wait_time", pool => ns)
            .record(started.elapsed().as_secs_f64());
        histogram!("db.client.operation.duration", "db.system.name" => "postgresql",
            "db.operation.name" => "get_cached_predictions", "db.namespace" => ns)
        .record(50e-6);
        counter!("pg_model_repo.cache.hits", "db.namespace" => ns).increment(1);
        gauge!("db.client.connection.count", pool => ns, state => "idle").increment(1.0);
        gauge!("db.client.connection.count", pool => ns, state => "used").decrement(1.0);
    }

    fn per_hit(mut hit: impl FnMut()) -> Duration {
        for _ in 0..HITS / 10 {
            hit();
        }
        let started = Instant::now();
        for _ in 0..HITS {
            hit();
        }
        started.elapsed() / HITS
    }

    fn report(recorder: &str, kept_ns: Duration, looked_up_ns: Duration) {
        println!(
            "{recorder}: {kept_ns:?} a hit through kept handles, {looked_up_ns:?} looking them up"
        );
    }

    #[test]
    #[ignore = "a measurement: run with --release --ignored --nocapture"]
    fn facade_cost() {
        let m = Metrics::new("facade_cost");
        report(
            "no recorder",
            per_hit(|| kept(&m)),
            per_hit(|| looked_up("facade_cost")),
        );
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            let m = Metrics::new("facade_cost_prometheus");
            report(
                "Prometheus recorder",
                per_hit(|| kept(&m)),
                per_hit(|| looked_up("facade_cost_prometheus")),
            );
        });
    }
}
