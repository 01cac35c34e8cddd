//! The `metrics` feature, seen through metrics-util's debugging recorder (installed once for
//! the whole test binary): each name appears with its unit and attributes after the operation
//! that feeds it, a failure carries its `error.type`, and the pool's gauges move while threads
//! hold connections. Every test reads only what is labelled with its own schema.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use ::metrics::Unit;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use pg_model_repo::{Embedding, LoadMethod, ModelRepository, RepoError};
use serde_json::json;

use crate::common::TestRepo;
use crate::pool::{hold_connections, wait_for_status};

/// What the recorder saw since the binary started, added up: a snapshot drains what it reads
/// (counters and gauges back to 0, histograms emptied), and tests run in parallel. The
/// library moves its gauges by increments, so their sum is their value.
#[derive(Default)]
struct Seen(HashMap<CompositeKey, (Option<Unit>, DebugValue)>);

fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("no other recorder in the test binary");
        snapshotter
    })
}

/// A repository in a fresh schema, opened after the recorder is installed.
fn repo(
    adjust: impl FnOnce(pg_model_repo::RepositoryConfig) -> pg_model_repo::RepositoryConfig,
) -> TestRepo {
    snapshotter();
    TestRepo::with_config(adjust)
}

/// Everything recorded so far whose name is `name` and whose labels include `labels`.
fn find(name: &str, labels: &[(&str, &str)]) -> Vec<(CompositeKey, Option<Unit>, DebugValue)> {
    static SEEN: OnceLock<Mutex<Seen>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for (key, unit, _, value) in snapshotter().snapshot().into_vec() {
        match (seen.0.get_mut(&key), value) {
            (Some((_, DebugValue::Histogram(all))), DebugValue::Histogram(new)) => all.extend(new),
            (Some((_, DebugValue::Counter(all))), DebugValue::Counter(new)) => *all += new,
            (Some((_, DebugValue::Gauge(all))), DebugValue::Gauge(new)) => *all += new,
            (_, value) => {
                seen.0.insert(key, (unit, value));
            }
        }
    }
    seen.0
        .iter()
        .filter(|(key, _)| {
            key.key().name() == name
                && labels
                    .iter()
                    .all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
        })
        .map(|(key, (unit, value))| (key.clone(), *unit, copy(value)))
        .collect()
}

/// `DebugValue` is not `Clone`.
fn copy(value: &DebugValue) -> DebugValue {
    match value {
        DebugValue::Counter(n) => DebugValue::Counter(*n),
        DebugValue::Gauge(v) => DebugValue::Gauge(*v),
        DebugValue::Histogram(v) => DebugValue::Histogram(v.clone()),
    }
}

fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    find(name, labels)
        .into_iter()
        .map(|(key, unit, value)| match value {
            DebugValue::Counter(n) => {
                assert_eq!(key.kind(), MetricKind::Counter);
                assert!(unit.is_some(), "{name} has no unit");
                n
            }
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

fn gauge(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found = find(name, labels);
    assert!(found.len() <= 1, "{name} {labels:?}: {found:?}");
    found
        .into_iter()
        .next()
        .map(|(_, unit, value)| match value {
            DebugValue::Gauge(v) => {
                assert_eq!(unit, Some(Unit::Count), "{name}");
                v.into_inner()
            }
            other => panic!("{name} is not a gauge: {other:?}"),
        })
}

/// The values of a histogram in seconds.
fn seconds(name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    find(name, labels)
        .into_iter()
        .flat_map(|(_, unit, value)| match value {
            DebugValue::Histogram(v) => {
                assert_eq!(unit, Some(Unit::Seconds), "{name}");
                v.into_iter().map(|x| x.into_inner()).collect::<Vec<_>>()
            }
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .collect()
}

/// The durations of `op`'s successful calls in `schema`: recorded with the OpenTelemetry
/// attributes and without `error.type`.
fn durations(schema: &str, op: &str) -> Vec<f64> {
    let labels = [
        ("db.system.name", "postgresql"),
        ("db.operation.name", op),
        ("db.namespace", schema),
    ];
    let all = seconds("db.client.operation.duration", &labels);
    let failed = find("db.client.operation.duration", &labels)
        .into_iter()
        .filter(|(key, ..)| key.key().labels().any(|l| l.key() == "error.type"))
        .count();
    assert_eq!(failed, 0, "{op} failed");
    all
}

#[test]
fn every_operation_is_a_duration_in_seconds_with_the_otel_attributes() {
    let repo = repo(|c| c);
    let ns = repo.schema.as_str();
    repo.cache_predictions("k", &[1, 2, 3], Duration::from_secs(60))
        .unwrap();
    let _: Option<Vec<u32>> = repo.get_cached_predictions("k").unwrap();
    repo.save_model("m", "1", b"weights", &json!({})).unwrap();
    let _ = repo.load_model("m", "1").unwrap();
    for op in [
        "cache_predictions",
        "get_cached_predictions",
        "save_model",
        "load_model",
    ] {
        let values = durations(ns, op);
        assert_eq!(values.len(), 1, "{op}: {values:?}");
        assert!(values[0] > 0.0 && values[0] < 30.0, "{op}: {values:?}");
    }
}

#[test]
fn a_failed_operation_carries_its_error_type() {
    let repo = repo(|c| c);
    let ns = repo.schema.as_str();
    let error = repo.save_model("m", "", b"x", &json!({})).unwrap_err();
    assert!(matches!(error, RepoError::InvalidInput(_)), "{error:?}");
    repo.save_model("m", "1", b"one", &json!({})).unwrap();
    let error = repo.save_model("m", "1", b"two", &json!({})).unwrap_err();
    assert!(matches!(error, RepoError::Conflict(_)), "{error:?}");
    let op = [("db.operation.name", "save_model"), ("db.namespace", ns)];
    let with = |kind: &'static str| {
        let mut labels = op.to_vec();
        labels.push(("error.type", kind));
        seconds("db.client.operation.duration", &labels)
    };
    assert_eq!(with("invalid_input").len(), 1);
    assert_eq!(with("conflict").len(), 1);
    assert_eq!(seconds("db.client.operation.duration", &op).len(), 3);
}

#[test]
fn the_librarys_counters_follow_the_calls_that_feed_them() {
    let repo = repo(|c| c);
    let ns = [("db.namespace", repo.schema.as_str())];
    repo.cache_predictions("k", &[1], Duration::from_secs(60))
        .unwrap();
    repo.get_or_compute("computed", Duration::from_secs(60), || Ok(7u32))
        .unwrap();
    let _: Option<Vec<u32>> = repo.get_cached_predictions("k").unwrap();
    let _: Option<Vec<u32>> = repo.get_cached_predictions("absent").unwrap();
    assert_eq!(counter("pg_model_repo.cache.sets", &ns), 2);
    assert_eq!(counter("pg_model_repo.cache.hits", &ns), 1);
    assert_eq!(
        counter("pg_model_repo.cache.misses", &ns),
        2,
        "get_or_compute missed"
    );

    let data = vec![7u8; 10_000];
    repo.save_model("m", "1", &data, &json!({})).unwrap();
    let _ = repo.load_model("m", "1").unwrap();
    repo.load_model_to_writer("m", "1", &mut std::io::sink())
        .unwrap();
    assert_eq!(counter("pg_model_repo.models.bytes_saved", &ns), 10_000);
    assert_eq!(counter("pg_model_repo.models.bytes_loaded", &ns), 20_000);
    let bytes = find("pg_model_repo.models.bytes_saved", &ns);
    assert_eq!(bytes[0].1, Some(Unit::Bytes));

    let batch = |t: &str| -> Vec<Embedding> {
        (0..50)
            .map(|i| Embedding::new(t, format!("e{i}"), vec![i as f32, 1.0]))
            .collect()
    };
    repo.load_embeddings(&batch("a"), LoadMethod::Copy).unwrap();
    repo.load_embeddings(&batch("a"), LoadMethod::MultiRowInsert)
        .unwrap();
    let by = |method: &'static str| {
        counter(
            "pg_model_repo.embeddings.rows_loaded",
            &[("db.namespace", repo.schema.as_str()), ("method", method)],
        )
    };
    assert_eq!((by("copy"), by("multi_row_insert")), (50, 50));

    let events = repo.subscribe_model_events().unwrap();
    assert_eq!(gauge("pg_model_repo.events.subscriptions", &ns), Some(1.0));
    drop(events);
    assert_eq!(gauge("pg_model_repo.events.subscriptions", &ns), Some(0.0));
}

#[test]
fn the_reaper_and_the_sweep_count_what_they_remove() {
    let repo = repo(|c| {
        c.reaper_interval(Some(Duration::from_millis(100)))
            .vector_storage(pg_model_repo::VectorStorage::Bytea)
    });
    let ns = [("db.namespace", repo.schema.as_str())];
    for i in 0..3 {
        repo.cache_predictions(&format!("short{i}"), &i, Duration::from_millis(1))
            .unwrap();
    }
    let started = std::time::Instant::now();
    while counter("pg_model_repo.cache.reaped", &ns) < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the reaper never reaped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(counter("pg_model_repo.cache.reaped", &ns), 3);

    repo.sql()
        .batch_execute(
            "INSERT INTO embeddings_staging (load_id, entity_type, entity_id, embeddings, dimension, staged_at)
             SELECT 101, 'user', 'dead' || g, '\\x00000000', 1, now() - interval '2 hours'
             FROM generate_series(1, 4) g",
        )
        .unwrap();
    assert_eq!(repo.optimize_database().unwrap().leftovers_removed, 4);
    assert_eq!(counter("pg_model_repo.leftovers.swept", &ns), 4);
}

#[test]
fn pool_gauges_move_while_threads_hold_connections() {
    let repo = repo(|c| {
        c.pool_size(1)
            .max_overflow(1)
            .pool_timeout(Duration::from_millis(800))
    });
    let pool = [("db.client.connection.pool.name", repo.schema.as_str())];
    let state = |s: &'static str| {
        gauge(
            "db.client.connection.count",
            &[pool[0], ("db.client.connection.state", s)],
        )
    };
    assert_eq!(gauge("db.client.connection.max", &pool), Some(2.0));
    let holders = hold_connections(&repo, 2);
    assert_eq!((state("used"), state("idle")), (Some(2.0), Some(0.0)));

    let waiter = {
        let repo: ModelRepository = repo.repo.clone();
        std::thread::spawn(move || repo.get_cached_predictions::<u32>("k"))
    };
    wait_for_status(&repo, Duration::from_secs(5), |s| s.waiting == 1);
    assert_eq!(
        gauge("db.client.connection.pending_requests", &pool),
        Some(1.0)
    );
    assert!(waiter.join().unwrap().is_err());
    assert_eq!(
        gauge("db.client.connection.pending_requests", &pool),
        Some(0.0)
    );
    assert_eq!(counter("db.client.connection.timeouts", &pool), 1);

    holders.release();
    assert_eq!((state("used"), state("idle")), (Some(0.0), Some(2.0)));
    let waits = seconds("db.client.connection.wait_time", &pool);
    assert!(waits.len() >= 3, "{waits:?}");
    assert!(waits.iter().all(|w| (0.0..30.0).contains(w)), "{waits:?}");
}
