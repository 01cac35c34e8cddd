//! What only a Citus cluster shows (feature `citus`: the whole suite then runs against a
//! throwaway coordinator and two workers, see `common::server_url`): where rows really are,
//! per worker; the layout the library gives a schema in each mode, and that sql/citus.sql run
//! by hand gives the same; all-or-nothing across workers; the reaper, statistics and the
//! health check reaching the shards. Each test picks its mode explicitly, so one run of the
//! suite (row- or schema-based by `MODEL_REPO_CITUS_MODE`) covers both.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pg_model_repo::{
    CitusMode, Embedding, HealthStatus, LoadMethod, ModelRepository, RepoError, RepositoryConfig,
    VectorStorage,
};
use serde_json::json;

use pg_model_repo::throwaway::{StopMode, ThrowawayCluster};

use crate::common::{self, admin, documented_command, TestRepo};

fn repo(mode: CitusMode) -> TestRepo {
    TestRepo::with_config(|c| c.citus(mode))
}

/// The workers' ports, as the coordinator knows them.
fn worker_ports() -> BTreeSet<i32> {
    admin()
        .query(
            "SELECT nodeport FROM pg_dist_node WHERE groupid <> 0 AND noderole = 'primary'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Rows of `schema.table` per node port, counted on every placement of its shards (for a
/// partitioned table, each shard counts its partitions' rows). Fails if a placement fails.
fn rows_per_node(schema: &str, table: &str) -> BTreeMap<i32, i64> {
    let rows = admin()
        .query(
            "SELECT nodeport, success, result FROM run_command_on_placements(
                 $1::text::regclass, 'SELECT count(*) FROM %s')",
            &[&format!("\"{schema}\".{table}")],
        )
        .unwrap();
    let mut per_node = BTreeMap::new();
    for row in rows {
        let (port, ok, result): (i32, bool, String) = (row.get(0), row.get(1), row.get(2));
        assert!(ok, "{table} on {port}: {result}");
        *per_node.entry(port).or_insert(0) += result.parse::<i64>().unwrap();
    }
    per_node
}

/// The nodes that hold shards of the schema's tables.
fn nodes_of_schema(schema: &str) -> BTreeSet<i32> {
    admin()
        .query(
            "SELECT DISTINCT s.nodeport FROM citus_shards s
             JOIN pg_class c ON c.oid = s.table_name JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1",
            &[&schema],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn vectors(entity_type: &str, n: usize, dim: usize) -> Vec<Embedding> {
    (0..n)
        .map(|i| {
            let v = (0..dim).map(|j| i as f32 + j as f32 / 100.0).collect();
            Embedding::new(entity_type, format!("e{i:05}"), v)
        })
        .collect()
}

/// What must be equal between two schemas distributed the same way: per table, its kind
/// (distributed, reference, schema), distribution column, and co-location peers.
type Layout = BTreeMap<String, (String, Option<String>, Vec<String>)>;

fn layout_of(schema: &str) -> Layout {
    layout_in(&mut admin(), schema)
}

fn layout_in(db: &mut postgres::Client, schema: &str) -> Layout {
    db.query(
        "SELECT c.relname::text, t.citus_table_type::text, t.distribution_column::text,
                (SELECT array_agg(c2.relname::text ORDER BY c2.relname)
                 FROM citus_tables t2 JOIN pg_class c2 ON c2.oid = t2.table_name
                 WHERE t2.colocation_id = t.colocation_id AND c2.relnamespace = c.relnamespace)
         FROM citus_tables t JOIN pg_class c ON c.oid = t.table_name
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
        &[&schema],
    )
    .unwrap()
    .iter()
    .map(|r| {
        let column: String = r.get(2);
        let column = (column != "<none>").then_some(column);
        (r.get(0), (r.get(1), column, r.get(3)))
    })
    .collect()
}

#[test]
fn row_based_rows_spread_over_every_worker_and_each_is_stored_once() {
    let repo = repo(CitusMode::RowBased);
    repo.load_embeddings(&vectors("user", 400, 8), LoadMethod::Copy)
        .unwrap();
    for i in 0..300 {
        repo.cache_predictions(&format!("k{i}"), &i, Duration::from_secs(600))
            .unwrap();
    }
    for i in 0..40 {
        repo.save_model(&format!("model-{i}"), "1", b"bytes", &json!({}))
            .unwrap();
    }
    let workers = worker_ports();
    assert_eq!(workers.len(), 2);
    for (table, rows) in [
        ("embeddings", 400),
        ("prediction_cache", 300),
        ("ml_models", 40),
    ] {
        let per_node = rows_per_node(&repo.schema, table);
        assert_eq!(
            per_node.keys().copied().collect::<BTreeSet<_>>(),
            workers,
            "{table}: {per_node:?}"
        );
        assert!(per_node.values().all(|&n| n > 0), "{table}: {per_node:?}");
        assert_eq!(
            per_node.values().sum::<i64>(),
            rows,
            "{table}: {per_node:?}"
        );
    }
    // The registry is a reference table: one full copy on every node.
    let layout = layout_of(&repo.schema);
    assert_eq!(layout["embedding_types"].0, "reference", "{layout:?}");
    for (table, column) in [
        ("embeddings", "entity_id"),
        ("prediction_cache", "cache_key"),
        ("ml_models", "model_name"),
        ("ml_model_chunks", "model_name"),
        ("model_aliases", "model_name"),
        ("training_metrics", "model_name"),
    ] {
        assert_eq!(layout[table].0, "distributed", "{table}");
        assert_eq!(layout[table].1.as_deref(), Some(column), "{table}");
    }
    // Model-keyed tables share one co-location group; the cache has its own.
    let model_group = &layout["ml_models"].2;
    for table in [
        "ml_model_chunks",
        "model_aliases",
        "model_alias_stack",
        "training_metrics",
    ] {
        assert!(model_group.contains(&table.to_owned()), "{model_group:?}");
    }
    assert_eq!(layout["prediction_cache"].2, ["prediction_cache"]);
    // Every read gives back what was written, through the coordinator.
    let ids: Vec<String> = (0..400).rev().map(|i| format!("e{i:05}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let got = repo.get_embeddings_many("user", &ids).unwrap();
    assert_eq!(got.len(), 400);
    for (i, vector) in (0..400).rev().zip(&got) {
        assert_eq!(
            vector.as_ref().unwrap()[0],
            i as f32,
            "in the caller's order"
        );
    }
}

/// Citus places each distributed schema on the worker its co-location id picks (round-robin):
/// repositories created one after another spread over the workers. Other tests create
/// co-location groups meanwhile, so up to 12 are created until both workers are used.
#[test]
fn a_schema_based_repository_lives_whole_on_one_node_and_repositories_spread() {
    let workers = worker_ports();
    let mut used = BTreeSet::new();
    let mut repos = Vec::new();
    while used != workers && repos.len() < 12 {
        repos.push(repo(CitusMode::SchemaBased));
        let repo = repos.last().unwrap();
        repo.load_embeddings(&vectors("user", 50, 4), LoadMethod::ParallelCopy)
            .unwrap();
        repo.save_model("m", "1", b"x", &json!({})).unwrap();
        let in_citus_schemas: bool = admin()
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM citus_schemas WHERE schema_name::text = $1)",
                &[&repo.schema],
            )
            .unwrap()
            .get(0);
        assert!(in_citus_schemas);
        let nodes = nodes_of_schema(&repo.schema);
        assert_eq!(nodes.len(), 1, "{}: {nodes:?}", repo.schema);
        used.extend(nodes);
        assert!(repo.get_embeddings_many("user", &["e00049"]).unwrap()[0].is_some());
    }
    assert_eq!(used, workers, "{} repositories", repos.len());
}

/// A record the database refuses, on a worker, after rows of the batch went to shards on
/// both workers: the load fails with a typed error and no worker keeps a row of it.
#[test]
fn a_batch_refused_midway_on_one_worker_leaves_nothing_on_any() {
    let repo = repo(CitusMode::RowBased);
    repo.save_embeddings("user", "first", &[1.0, 2.0]).unwrap();
    common::refuse_poison_rows(&mut repo.sql());
    let mut batch = vectors("user", 3000, 2);
    batch.push(Embedding::new("user", "poison", vec![0.0, 0.0]));
    for method in LoadMethod::ALL {
        let err = repo.load_embeddings(&batch, method).unwrap_err();
        assert!(
            matches!(err, RepoError::Database(_) | RepoError::InvalidInput(_)),
            "{method}: {err:?}"
        );
        // A worker's error during a COPY reaches the client with its message and SQLSTATE
        // XX000 (Citus 13.2); through the upserts, with its own code.
        let code = err.code().map(|c| c.code().to_owned());
        let copied = matches!(method, LoadMethod::Copy | LoadMethod::ParallelCopy);
        assert!(
            code.as_deref() == Some("23514") || (copied && code.as_deref() == Some("XX000")),
            "{method}: {err}"
        );
        assert!(
            err.to_string().contains("poison refused"),
            "{method}: {err}"
        );
        let per_node = rows_per_node(&repo.schema, "embeddings");
        assert_eq!(per_node.values().sum::<i64>(), 1, "{method}: {per_node:?}");
        assert_eq!(per_node.len(), 2);
    }
    assert_eq!(
        repo.get_embeddings("user", "first").unwrap(),
        Some(vec![1.0, 2.0])
    );
}

#[test]
fn the_reaper_deletes_expired_rows_on_every_shard_and_keeps_live_ones() {
    let repo = repo(CitusMode::RowBased);
    for i in 0..200 {
        repo.cache_predictions(&format!("old{i}"), &i, Duration::from_secs(600))
            .unwrap();
        repo.cache_predictions(&format!("live{i}"), &i, Duration::from_secs(600))
            .unwrap();
    }
    repo.sql()
        .batch_execute(
            "UPDATE prediction_cache SET cached_at = now() - interval '2 hours',
                 expires_at = now() - interval '1 hour' WHERE cache_key LIKE 'old%'",
        )
        .unwrap();
    let before = rows_per_node(&repo.schema, "prediction_cache");
    assert!(before.values().all(|&n| n > 0), "{before:?}");
    assert_eq!(repo.purge_expired_cache().unwrap(), 200);
    let after = rows_per_node(&repo.schema, "prediction_cache");
    assert_eq!(after.values().sum::<i64>(), 200, "{after:?}");
    assert!(after.values().all(|&n| n > 0), "{after:?}");
    assert_eq!(
        repo.get_cached_predictions::<i32>("live7").unwrap(),
        Some(7)
    );
}

#[test]
fn statistics_report_the_distributed_size_and_health_names_every_worker() {
    for mode in [CitusMode::RowBased, CitusMode::SchemaBased] {
        let repo = repo(mode);
        repo.load_embeddings(&vectors("user", 2000, 64), LoadMethod::Copy)
            .unwrap();
        let stats = repo.get_embeddings_stats().unwrap();
        // 2,000 rows of 256 vector bytes are on the workers; the coordinator's shell is empty.
        assert!(stats.table_bytes >= 2000 * 256, "{mode:?}: {stats:?}");
        let report = repo.health_check();
        assert_eq!(report.status, HealthStatus::Healthy, "{report:?}");
        let workers = &report.checks["workers"];
        assert!(workers.ok);
        assert!(
            workers.detail.starts_with("2 of 2 workers reachable"),
            "{workers:?}"
        );
        let optimized = repo.optimize_database().unwrap();
        let embeddings = optimized
            .tables
            .iter()
            .find(|t| t.table == "embeddings")
            .unwrap();
        assert!(embeddings.bytes_after >= 2000 * 256, "{embeddings:?}");
    }
}

/// The by-hand path of sql/citus.sql's header, run literally, gives the layout the library
/// gives, in both modes; the library then opens the schema without running any DDL.
#[test]
fn sql_citus_sql_by_hand_distributes_as_the_library_does() {
    let cluster_url = common::server_url();
    let port = cluster_url
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("port="))
        .expect("the cluster URL names its port")
        .to_owned();
    common::citus_cluster()
        .expect("this test builds a database of its own on the throwaway cluster")
        .create_database("mydb")
        .unwrap();
    let run = |command: &str| {
        let output = std::process::Command::new("sh")
            .args(["-c", command])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", &port)
            .env("PGUSER", "postgres")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && !stderr.contains("ERROR"),
            "{command}\n{stderr}"
        );
    };
    let build = documented_command("sql/citus.sql", "cat sql/V*.sql");
    let row = documented_command(
        "sql/citus.sql",
        "psql -d mydb -v ON_ERROR_STOP=1 -1 -c 'SET search_path TO ml' -f",
    );
    let schema = documented_command(
        "sql/citus.sql",
        "psql -d mydb -v ON_ERROR_STOP=1 -1 -c 'SET search_path TO ml' -c",
    );
    let mydb_url = format!("host=127.0.0.1 port={port} user=postgres dbname=mydb");
    let mydb = |schema: &str| {
        RepositoryConfig::new(mydb_url.clone())
            .schema(schema)
            .pool_size(2)
            .reaper_interval(None)
    };
    for (mode, distribute) in [
        (CitusMode::RowBased, &row),
        (CitusMode::SchemaBased, &schema),
    ] {
        run(&build);
        run(distribute);
        // BYTEA as the by-hand files (pgvector's conversion is optional, not in sql/V*.sql).
        let library = ModelRepository::open(
            mydb("by_library")
                .citus(mode)
                .vector_storage(VectorStorage::Bytea),
        )
        .unwrap();
        let by_hand = ModelRepository::open(mydb("ml")).unwrap();
        let mut db = postgres::Client::connect(&mydb_url, postgres::NoTls).unwrap();
        assert_eq!(
            layout_in(&mut db, "ml"),
            layout_in(&mut db, "by_library"),
            "{mode:?}"
        );
        by_hand
            .save_model("m", "1", b"by hand", &json!({}))
            .unwrap();
        assert_eq!(by_hand.load_model("m", "1").unwrap().unwrap(), b"by hand");
        by_hand.close();
        library.close();
        db.batch_execute("DROP SCHEMA ml CASCADE; DROP SCHEMA by_library CASCADE")
            .unwrap();
    }
}

/// Issue 15's faults, on a cluster of this test's own (a worker is stopped): a worker stopped
/// in the middle of a load gives a typed error and leaves no row of the load on any worker
/// (or, if the load committed, all of them); reads and the health check with the worker down
/// fail typed and name it; once the worker is back, the repository works again without
/// being reopened.
#[test]
fn a_worker_stopped_mid_load_and_mid_read_fails_typed_leaves_nothing_partial_and_recovers() {
    crate::logging::init();
    let mut cluster = ThrowawayCluster::start_with(2, common::TEST_SERVER_SETTINGS).unwrap();
    let config = RepositoryConfig::new(cluster.url())
        .schema("faults")
        .citus(CitusMode::RowBased)
        .pool_size(2)
        .pool_timeout(Duration::from_secs(10))
        .query_timeout(Duration::from_secs(10))
        .reaper_interval(None);
    let repo = ModelRepository::open(config).unwrap();
    let kept = vectors("kept", 1000, 16);
    repo.load_embeddings(&kept, LoadMethod::Copy).unwrap();
    let batch = vectors("user", 60_000, 16);
    let rows_on_workers = |cluster: &ThrowawayCluster| -> i64 {
        let mut c = postgres::Client::connect(&cluster.url(), postgres::NoTls).unwrap();
        // Prepared transactions a stopped worker missed are settled first (Citus does this
        // in the background too).
        c.batch_execute("SELECT recover_prepared_transactions()")
            .unwrap();
        c.query_one(
            "SELECT count(*) FROM faults.embeddings WHERE entity_type = 'user'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    for method in [
        LoadMethod::Copy,
        LoadMethod::ParallelCopy,
        LoadMethod::MultiRowInsert,
    ] {
        let mut stopped = false;
        let result = repo.load_embeddings_with_progress(&batch, method, &mut |done, total| {
            if !stopped && done * 3 >= total {
                stopped = true;
                cluster.worker_mut(1).stop(StopMode::Fast).unwrap();
            }
        });
        assert!(stopped, "{method}: the load reported no progress");
        match &result {
            Ok(report) => log::info!("{method}: committed before the worker went: {report:?}"),
            Err(e) => {
                assert!(
                    matches!(e, RepoError::Database(_) | RepoError::OutcomeUnknown(_)),
                    "{method}: {e:?}"
                );
                log::info!("{method}: {e}");
            }
        }
        // With the worker down, a read of the type fails typed, naming the worker.
        let read = repo.for_each_embedding("user", &mut |_, _| {});
        let err = read.expect_err("a read with a worker down");
        assert!(matches!(err, RepoError::Database(_)), "{err:?}");
        let health = repo.health_check();
        assert_eq!(health.status, HealthStatus::Unhealthy, "{health:?}");
        let workers = &health.checks["workers"];
        let down = cluster.workers()[1].port().to_string();
        assert!(!workers.ok && workers.detail.contains(&down), "{workers:?}");

        cluster.worker_mut(1).start_again().unwrap();
        let landed = rows_on_workers(&cluster);
        match result {
            Ok(_) => assert_eq!(landed, 60_000, "{method}"),
            Err(_) => assert_eq!(landed, 0, "{method}: nothing partial"),
        }
        // The same repository works again: the load, then a full read.
        repo.load_embeddings(&batch, method).unwrap();
        let mut n = 0;
        assert_eq!(
            repo.for_each_embedding("user", &mut |_, _| n += 1).unwrap(),
            60_000
        );
        assert_eq!(n, 60_000);
        assert_eq!(repo.health_check().status, HealthStatus::Healthy);
        assert_eq!(repo.drop_embedding_type("user").unwrap(), 60_000);
    }
    let ids: Vec<String> = kept.iter().map(|e| e.entity_id.clone()).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let back = repo.get_embeddings_many("kept", &ids).unwrap();
    assert!(back
        .iter()
        .zip(&kept)
        .all(|(got, e)| got.as_ref() == Some(&e.vector)));
    repo.close();
}

/// The functions sql/citus.sql runs in sequential mode keep that setting after a migration
/// redefines one of them (CREATE OR REPLACE resets a function's settings): here the schema
/// is put back to before V012 (its record deleted, its function's settings reset, as the
/// redefinition leaves them) and migrated again, in both modes.
#[test]
fn a_migration_that_redefines_a_function_keeps_its_citus_settings() {
    let sequential = |sql: &mut postgres::Client| -> Vec<String> {
        sql.query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace
               AND 'citus.multi_shard_modify_mode=sequential' = ANY (p.proconfig)
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    for mode in [CitusMode::RowBased, CitusMode::SchemaBased] {
        let repo = repo(mode);
        let mut sql = repo.sql();
        let before = sequential(&mut sql);
        assert!(
            before.contains(&"embedding_load_begin(text,integer)".to_owned()),
            "{mode:?}: {before:?}"
        );
        sql.batch_execute(
            "ALTER FUNCTION embedding_load_begin(text, integer) RESET ALL;
             DELETE FROM model_repo_migrations WHERE version = 12",
        )
        .unwrap();
        assert_eq!(sequential(&mut sql).len(), before.len() - 1, "{mode:?}");
        let report =
            ModelRepository::migrate_with_report(&common::config(&repo.schema).citus(mode))
                .unwrap();
        assert_eq!(
            report.applied,
            vec!["V012__load_begin_waits_its_turn_on_citus.sql"],
            "{mode:?}"
        );
        assert_eq!(sequential(&mut sql), before, "{mode:?}");
        repo.replace_embeddings("t", &vectors("t", 100, 4)).unwrap();
        assert_eq!(repo.get_all_embeddings("t").unwrap().len(), 100);
    }
}
