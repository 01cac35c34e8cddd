//! Monitoring and maintenance: timings, health, statistics, optimize, server statement stats.

use std::time::{Duration, Instant};

use pg_model_repo::throwaway::{StopMode, ThrowawayServer};
use pg_model_repo::{HealthStatus, ModelRepository, RepositoryConfig};
use serde_json::json;

use crate::common::{self, TestRepo, TEST_SERVER_SETTINGS};

#[test]
fn timings_count_calls_errors_and_slow_calls_per_operation() {
    let repo = TestRepo::with_config(|c| c.slow_query_threshold(Duration::from_nanos(1)));
    for v in ["1", "2", "3"] {
        repo.save_model("m", v, b"x", &json!({})).unwrap();
    }
    assert!(repo.save_model("m", "latest", b"x", &json!({})).is_err());
    repo.load_model("m", "latest").unwrap();
    let metrics = repo.get_performance_metrics();
    let save = metrics
        .iter()
        .find(|m| m.query_type == "save_model")
        .unwrap();
    assert_eq!((save.count, save.errors, save.slow), (4, 1, 4));
    assert!(save.max >= save.p99 && save.p99 >= save.p50);
    assert!(save.total >= save.max);
    assert_eq!(save.mean, save.total / 4);
    let load = metrics
        .iter()
        .find(|m| m.query_type == "load_model")
        .unwrap();
    assert_eq!((load.count, load.errors), (1, 0));
}

#[test]
fn disabled_metrics_record_nothing() {
    let repo = TestRepo::with_config(|c| c.enable_metrics(false));
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    assert!(repo.get_performance_metrics().is_empty());
}

#[test]
fn a_reachable_database_is_healthy() {
    let repo = TestRepo::new();
    let report = repo.health_check();
    assert_eq!(report.status, HealthStatus::Healthy, "{report:?}");
    for name in ["database", "tables", "query_latency", "pool"] {
        assert!(report.checks[name].ok, "{name}: {report:?}");
    }
    assert!(report.checks["pool"].detail.contains("idle="));
    serde_json::to_string(&report).unwrap();
}

#[test]
fn latency_above_the_threshold_is_degraded() {
    let repo = TestRepo::with_config(|c| c.slow_query_threshold(Duration::from_nanos(1)));
    let report = repo.health_check();
    assert_eq!(report.status, HealthStatus::Degraded, "{report:?}");
    assert!(!report.checks["query_latency"].ok);
}

#[test]
fn a_missing_table_is_unhealthy() {
    let repo = TestRepo::new();
    repo.sql()
        .batch_execute("DROP TABLE model_alias_history")
        .unwrap();
    let report = repo.health_check();
    assert_eq!(report.status, HealthStatus::Unhealthy);
    assert!(!report.checks["tables"].ok);
    assert!(
        report.checks["tables"]
            .detail
            .contains("model_alias_history"),
        "{report:?}"
    );
}

#[test]
fn an_unreachable_server_is_unhealthy_within_pool_timeout_and_recovers() {
    let mut server = ThrowawayServer::start(TEST_SERVER_SETTINGS).unwrap();
    let pool_timeout = Duration::from_secs(2);
    let repo = ModelRepository::open(
        RepositoryConfig::new(server.url())
            .schema("health")
            .pool_size(2)
            .pool_timeout(pool_timeout)
            .reaper_interval(None),
    )
    .unwrap();
    assert_eq!(repo.health_check().status, HealthStatus::Healthy);
    server.stop(StopMode::Fast).unwrap();
    for _ in 0..2 {
        let started = Instant::now();
        let report = repo.health_check();
        let took = started.elapsed();
        assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
        assert!(!report.checks["database"].ok);
        assert!(!report.checks["database"].detail.is_empty());
        assert!(
            took <= pool_timeout + Duration::from_millis(200),
            "{took:?}"
        );
    }
    server.start_again().unwrap();
    assert_eq!(repo.health_check().status, HealthStatus::Healthy);
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
}

#[test]
fn model_storage_stats_match_what_was_written() {
    let repo = TestRepo::new();
    repo.save_model("a", "1", &[0u8; 100], &json!({})).unwrap();
    repo.save_model("a", "2", &[0u8; 250], &json!({})).unwrap();
    repo.save_model("a", "3", &[0u8; 50], &json!({})).unwrap();
    repo.delete_model("a", "3").unwrap();
    repo.save_model("b", "x", &[0u8; 7], &json!({})).unwrap();
    repo.delete_model("b", "x").unwrap();
    let stats = repo.get_model_storage_stats().unwrap();
    assert_eq!(stats.total_models, 2);
    assert_eq!(stats.total_versions, 4);
    assert_eq!(stats.active_versions, 2);
    assert_eq!(stats.total_bytes, 407);
    assert!(stats.table_bytes > 0);
    let a = &stats.models[0];
    assert_eq!(
        (
            a.model_name.as_str(),
            a.versions,
            a.active_versions,
            a.total_bytes
        ),
        ("a", 3, 2, 400)
    );
    assert_eq!(a.latest_version.as_deref(), Some("2"));
    let b = &stats.models[1];
    assert_eq!(
        (b.versions, b.active_versions, b.latest_version.clone()),
        (1, 0, None)
    );
    serde_json::to_string(&stats).unwrap();
}

#[test]
fn model_loads_are_counted_and_reach_the_table() {
    let repo = TestRepo::new();
    repo.save_model("a", "1", b"one", &json!({})).unwrap();
    repo.save_model("a", "2", b"two", &json!({})).unwrap();
    repo.save_model("b", "1", b"x", &json!({})).unwrap();
    for _ in 0..3 {
        repo.load_model("a", "1").unwrap().unwrap();
    }
    repo.load_model_with_info("a", "latest").unwrap().unwrap();
    repo.load_model_to_writer("a", "2", &mut Vec::new())
        .unwrap()
        .unwrap();
    assert!(repo.load_model("a", "missing").unwrap().is_none());
    let stats = repo.get_model_storage_stats().unwrap();
    let a = stats.models.iter().find(|m| m.model_name == "a").unwrap();
    assert_eq!(a.load_count, 5);
    assert!(a.last_loaded_at.is_some());
    let b = stats.models.iter().find(|m| m.model_name == "b").unwrap();
    assert_eq!((b.load_count, b.last_loaded_at), (0, None));
    let per_version: Vec<(String, i64)> = repo
        .sql()
        .query(
            "SELECT version, load_count FROM ml_models WHERE model_name = 'a' ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(per_version, [("1".to_owned(), 3), ("2".to_owned(), 2)]);
}

#[test]
fn close_flushes_buffered_model_loads() {
    let schema = common::unique_schema("loads");
    let repo = ModelRepository::open(common::config(&schema)).unwrap();
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    repo.load_model("m", "1").unwrap();
    repo.load_model("m", "1").unwrap();
    repo.close();
    let count: i64 = common::admin()
        .query_one(
            &format!("SELECT load_count FROM \"{schema}\".ml_models"),
            &[],
        )
        .unwrap()
        .get(0);
    common::drop_schema(&schema);
    assert_eq!(count, 2);
}

#[test]
fn embedding_stats_match_what_was_written() {
    let repo = common::bytea_repo();
    repo.sql()
        .batch_execute(
            "SELECT * FROM embedding_type_ensure('user', 3);
             SELECT * FROM embedding_type_ensure('item', 2);
             INSERT INTO embeddings (entity_type, entity_id, embeddings, dimension)
             SELECT 'user', 'u' || g, '\\x000000000000000000000000', 3 FROM generate_series(1, 10) g;
             INSERT INTO embeddings (entity_type, entity_id, embeddings, dimension, updated_at)
             VALUES ('item', 'i1', '\\x0000000000000000', 2, '2030-01-01');",
        )
        .unwrap();
    let stats = repo.get_embeddings_stats().unwrap();
    assert_eq!(stats.total_embeddings, 11);
    assert_eq!(stats.total_bytes, 10 * 12 + 8);
    let item = &stats.entity_types[0];
    assert_eq!(
        (
            item.entity_type.as_str(),
            item.count,
            item.dimension,
            item.total_bytes
        ),
        ("item", 1, 2, 8)
    );
    let expected = std::time::UNIX_EPOCH + Duration::from_secs(1_893_456_000);
    assert_eq!(item.last_update, Some(expected));
    let user = &stats.entity_types[1];
    assert_eq!((user.count, user.dimension, user.total_bytes), (10, 3, 120));
    serde_json::to_string(&stats).unwrap();
}

#[test]
fn optimize_vacuums_every_table_and_purges_expired_cache_rows() {
    let repo = TestRepo::new();
    {
        let mut sql = repo.sql();
        sql.batch_execute(
            "INSERT INTO prediction_cache (cache_key, predictions, cached_at, expires_at)
             SELECT 'old' || g, '\\x00', now() - interval '2 hours', now() - interval '1 hour'
             FROM generate_series(1, 30) g;
             INSERT INTO prediction_cache (cache_key, predictions, expires_at)
             SELECT 'live' || g, '\\x00', now() + interval '1 hour' FROM generate_series(1, 5) g;
             INSERT INTO training_metrics (model_name, version, metrics)
             SELECT 'm', g::text, '{\"a\": 1}' FROM generate_series(1, 500) g;
             DELETE FROM training_metrics WHERE version::int % 2 = 0;",
        )
        .unwrap();
    } // closing the session flushes its statistics
    std::thread::sleep(Duration::from_millis(300));
    let report = repo.optimize_database().unwrap();
    assert_eq!(report.expired_cache_rows_purged, 30);
    assert_eq!(report.tables.len(), 9);
    let metrics = report
        .tables
        .iter()
        .find(|t| t.table == "training_metrics")
        .unwrap();
    assert!(metrics.dead_tuples_before >= 250, "{metrics:?}");
    assert_eq!(metrics.dead_tuples_after, 0, "{metrics:?}");
    assert!(metrics.bytes_after > 0);
    assert!(report.tables.iter().all(|t| t.action == "VACUUM (ANALYZE)"));
    assert_eq!(common::count(&repo, "prediction_cache"), 5);
    serde_json::to_string(&report).unwrap();
    // The session went back to the pool with its statement timeout.
    assert!(repo.get_model_versions("m").unwrap().is_empty());
}

#[test]
fn server_query_stats_say_when_pg_stat_statements_is_missing() {
    let repo = TestRepo::new();
    let stats = repo.get_server_query_stats().unwrap();
    assert!(!stats.available);
    assert!(
        stats.detail.contains("pg_stat_statements"),
        "{}",
        stats.detail
    );
}

#[test]
fn server_query_stats_list_our_statements_where_installed() {
    let mut settings = TEST_SERVER_SETTINGS.to_vec();
    settings.push(("shared_preload_libraries", "pg_stat_statements"));
    let server = ThrowawayServer::start(&settings).unwrap();
    let mut admin = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
    admin
        .batch_execute("CREATE EXTENSION pg_stat_statements")
        .unwrap();
    let repo = ModelRepository::open(
        RepositoryConfig::new(server.url())
            .schema("stats")
            .pool_size(1)
            .reaper_interval(None),
    )
    .unwrap();
    // The migrations' DDL would fill the 25 slowest statements: count from here.
    admin
        .batch_execute("SELECT pg_stat_statements_reset()")
        .unwrap();
    for v in ["1", "2", "3"] {
        repo.save_model("m", v, b"x", &json!({})).unwrap();
    }
    let stats = repo.get_server_query_stats().unwrap();
    assert!(stats.available, "{}", stats.detail);
    assert!(
        stats
            .statements
            .iter()
            .any(|s| s.query.contains("ml_models") && s.calls >= 3),
        "{stats:?}"
    );
}
