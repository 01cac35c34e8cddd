//! Opening, migrations, schema rules and the pool's limits, against a real PostgreSQL.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pg_model_repo::{ModelRepository, RepoError, RepositoryConfig};
use serde_json::json;

use crate::common::{
    self, admin, config, drop_schema, psql, sessions_named, unique_schema, url_with_app_name,
    TestRepo,
};

fn schema_exists(name: &str) -> bool {
    admin()
        .query_opt(
            "SELECT 1 FROM pg_namespace WHERE nspname::text = $1",
            &[&name],
        )
        .unwrap()
        .is_some()
}

#[test]
fn six_concurrent_opens_of_one_new_schema_all_succeed() {
    let schema = unique_schema("six");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| ModelRepository::open(config(&schema)).map(|r| r.close())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    drop_schema_after(&schema, || {
        for r in &results {
            assert!(r.is_ok(), "{r:?}");
        }
        let applied: i64 = admin()
            .query_one(
                &format!("SELECT count(*) FROM \"{schema}\".model_repo_migrations"),
                &[],
            )
            .unwrap()
            .get(0);
        // Every numbered file once; the optional one (sql/optional) where pgvector is here.
        let count = |dir: &str| {
            std::fs::read_dir(dir)
                .unwrap()
                .filter(|f| {
                    f.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with('V')
                })
                .count() as i64
        };
        let files = count(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"));
        let optional = count(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/optional"));
        assert!(
            (files..=files + optional).contains(&applied),
            "each migration is recorded once: {applied} of {files} + {optional} optional"
        );
    });
}

fn drop_schema_after(schema: &str, f: impl FnOnce()) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    drop_schema(schema);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn hostile_schema_names_are_invalid_and_run_no_sql() {
    for name in [
        "x\"; DROP SCHEMA public CASCADE; --",
        "has space",
        "1starts_with_digit",
        "",
        "dash-ed",
        &"a".repeat(64),
    ] {
        let result = ModelRepository::open(config(name));
        assert!(
            matches!(result, Err(RepoError::InvalidInput(_))),
            "{name:?}: {result:?}"
        );
        assert!(!schema_exists(name));
    }
    assert!(schema_exists("public"));
}

#[test]
fn reserved_words_and_mixed_case_schemas_are_quoted() {
    for name in ["select", &format!("Mixed_{}", std::process::id())] {
        let repo = ModelRepository::open(config(name)).unwrap();
        repo.save_model("m", "1", b"x", &json!({})).unwrap();
        repo.close();
        assert!(schema_exists(name));
        drop_schema(name);
    }
}

#[test]
fn auto_migrate_false_runs_no_ddl_and_fails_clearly_on_a_missing_schema() {
    let schema = unique_schema("nomig");
    let result = ModelRepository::open(config(&schema).auto_migrate(false));
    assert!(matches!(result, Err(RepoError::NotFound(_))), "{result:?}");
    assert!(!schema_exists(&schema));
    ModelRepository::migrate(&config(&schema)).unwrap();
    drop_schema_after(&schema, || {
        let repo = ModelRepository::open(config(&schema).auto_migrate(false)).unwrap();
        repo.save_model("m", "1", b"x", &json!({})).unwrap();
    });
}

#[test]
fn an_edited_applied_migration_is_refused() {
    let repo = TestRepo::new();
    repo.sql()
        .execute("UPDATE model_repo_migrations SET checksum = 'edited'", &[])
        .unwrap();
    let result = ModelRepository::open(config(&repo.schema));
    assert!(matches!(result, Err(RepoError::Conflict(_))), "{result:?}");
}

#[test]
fn the_sql_files_run_with_psql_and_the_library_adopts_the_schema() {
    let schema = unique_schema("psql");
    let url = common::server_url();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/V001__init.sql");
    for _ in 0..2 {
        psql(
            &url,
            &[
                "-c",
                common::PLAIN_SCHEMA,
                "-c",
                &format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
                "-c",
                &format!("SET search_path TO \"{schema}\""),
                "-f",
                file,
            ],
        );
    }
    drop_schema_after(&schema, || {
        let repo = ModelRepository::open(config(&schema)).unwrap();
        repo.save_model("m", "1", b"x", &json!({})).unwrap();
        assert_eq!(repo.load_model("m", "latest").unwrap().unwrap(), b"x");
    });
}

/// The `('table', 'column', …)` rows of sql/citus.sql's list of distributed tables (reference
/// tables, whose column is NULL, have no distribution column).
fn distribution_columns() -> BTreeMap<String, String> {
    let text = include_str!("../../sql/citus.sql");
    text.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("('"))
        .filter_map(|l| {
            let quoted: Vec<&str> = l.split('\'').collect();
            (quoted.len() > 4).then(|| (quoted[1].to_owned(), quoted[3].to_owned()))
        })
        .collect()
}

#[test]
fn every_key_includes_its_tables_citus_distribution_column() {
    let repo = TestRepo::new();
    let columns = distribution_columns();
    assert!(columns.len() >= 7, "{columns:?}");
    let rows = repo
        .sql()
        .query(
            "SELECT c.relname, con.conname,
                    array_agg(a.attname::text ORDER BY a.attnum) AS cols
             FROM pg_constraint con
             JOIN pg_class c ON c.oid = con.conrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (con.conkey)
             WHERE n.nspname = $1 AND con.contype IN ('p', 'u')
             GROUP BY c.relname, con.conname",
            &[&repo.schema],
        )
        .unwrap();
    let mut checked = 0;
    for row in rows {
        let table: String = row.get(0);
        let constraint: String = row.get(1);
        let cols: Vec<String> = row.get(2);
        if let Some(dist) = columns.get(&table) {
            assert!(
                cols.contains(dist),
                "{table}.{constraint} {cols:?} lacks distribution column {dist}"
            );
            checked += 1;
        }
    }
    // embeddings_quarantine keeps whatever could not be stored, duplicates included: no key.
    assert!(
        checked >= columns.len() - 1,
        "every distributed table but the quarantine has a key"
    );
    // Unique indexes created outside constraints must obey the rule too.
    let stray: i64 = repo
        .sql()
        .query_one(
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND i.indisunique
               AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = i.indexrelid)",
            &[&repo.schema],
        )
        .unwrap()
        .get(0);
    assert_eq!(stray, 0);
}

#[test]
fn rows_with_only_the_seed_columns_are_valid_in_every_table() {
    let repo = TestRepo::new();
    // The vector 1.0 in the schema's storage: BYTEA (little-endian f32) or pgvector.
    let storage: String = repo
        .sql()
        .query_one(
            "SELECT t.typname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = 'embeddings'::regclass AND a.attname = 'embeddings'",
            &[],
        )
        .unwrap()
        .get(0);
    let one = if storage == "vector" {
        "[1]"
    } else {
        "\\x0000803f"
    };
    repo.sql()
        .batch_execute(&format!(
            "INSERT INTO ml_models (model_name, version, model_data) VALUES ('m', '1', '\\x00');
             INSERT INTO embeddings (entity_type, entity_id, embeddings, dimension)
                 VALUES ('user', 'u1', '{one}', 1);
             INSERT INTO prediction_cache (cache_key, predictions, expires_at)
                 VALUES ('k', '\\x00', now() + interval '1 hour');
             INSERT INTO training_metrics (model_name, version, metrics)
                 VALUES ('m', '1', '{{\"auc\": 0.5}}');"
        ))
        .unwrap();
    assert_eq!(repo.load_model("m", "1").unwrap().unwrap(), [0u8]);
    assert_eq!(
        repo.get_training_metrics("m", "1").unwrap().unwrap()["auc"],
        0.5
    );
}

fn application_names() -> Vec<String> {
    admin()
        .query(
            "SELECT DISTINCT application_name FROM pg_stat_activity WHERE backend_type = 'client backend'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn connections_carry_an_application_name() {
    let repo = TestRepo::new();
    repo.get_model_versions("m").unwrap();
    assert!(application_names().contains(&"pg-model-repo".to_owned()));

    let own = format!("own_app_{}", std::process::id());
    let url = url_with_app_name(&own);
    let schema = repo.schema.clone();
    let mine = ModelRepository::open(
        RepositoryConfig::new(url)
            .schema(&schema)
            .pool_size(1)
            .reaper_interval(None),
    )
    .unwrap();
    mine.get_model_versions("m").unwrap();
    assert!(application_names().contains(&own));
}

/// A writer that holds its connection busy for a while.
struct SlowWriter(Duration);

impl std::io::Write for SlowWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::thread::sleep(self.0);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_full_pool_times_out_after_pool_timeout_and_never_hangs() {
    // Built first with the suite's bounds: on a Citus cluster a first open waits its turn to
    // distribute the schema, which can take longer than this test's pool_timeout.
    let built = TestRepo::new();
    let repo = ModelRepository::open(
        config(&built.schema)
            .pool_size(1)
            .max_overflow(0)
            .pool_timeout(Duration::from_millis(400)),
    )
    .unwrap();
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    std::thread::scope(|s| {
        let holder = s
            .spawn(|| repo.load_model_to_writer("m", "1", &mut SlowWriter(Duration::from_secs(2))));
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let result = repo.get_model_versions("m");
        let waited = started.elapsed();
        match &result {
            Err(e @ RepoError::Timeout(_)) => assert!(e.is_transient(), "{e}"),
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(waited >= Duration::from_millis(350), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        holder.join().unwrap().unwrap();
    });
    assert_eq!(repo.get_model_versions("m").unwrap().len(), 1);
}

#[test]
fn a_lock_wait_past_query_timeout_is_a_timeout_and_the_connection_survives() {
    let repo = TestRepo::with_config(|c| {
        c.pool_size(1)
            .max_overflow(0)
            .query_timeout(Duration::from_millis(300))
    });
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    let mut locker = repo.sql();
    let mut tx = locker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE ml_models IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let result = repo.get_model_versions("m");
    match &result {
        Err(e @ RepoError::Timeout(_)) => assert!(!e.is_transient(), "{e}"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    tx.rollback().unwrap();
    assert_eq!(repo.get_model_versions("m").unwrap().len(), 1);
}

#[test]
fn from_env_reads_the_documented_variables() {
    let vars: BTreeMap<&str, &str> = [
        ("DATABASE_URL", "postgres://u@h/db"),
        ("DB_POOL_SIZE", "7"),
        ("MODEL_REPO_SCHEMA", "ml"),
    ]
    .into();
    let config = RepositoryConfig::from_lookup(|k| vars.get(k).map(|v| v.to_string())).unwrap();
    assert_eq!(config.schema_name(), "ml");
    let shown = format!("{config:?}");
    assert!(shown.contains("pool_size: 7"), "{shown}");
}

#[test]
fn closing_the_last_clone_closes_every_pooled_connection() {
    let schema = unique_schema("close");
    let app = format!("close_test_{}", std::process::id());
    let url = url_with_app_name(&app);
    let repo = ModelRepository::open(
        RepositoryConfig::new(url)
            .schema(&schema)
            .pool_size(3)
            .reaper_interval(None),
    )
    .unwrap();
    drop_schema_after(&schema, || {
        let clone = repo.clone();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| clone.get_model_versions("m").unwrap());
            }
        });
        assert!(sessions_named(&app) >= 1);
        clone.close();
        assert!(sessions_named(&app) >= 1, "other clones keep the pool open");
        repo.clone().close();
        assert!(sessions_named(&app) >= 1);
    });
    repo.close();
    // Terminated backends leave pg_stat_activity within moments of the client's goodbye.
    let deadline = Instant::now() + Duration::from_secs(2);
    while sessions_named(&app) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sessions_named(&app), 0);
}

#[test]
#[cfg_attr(
    feature = "citus",
    ignore = "on a Citus cluster a statement that reaches a worker opens the coordinator's \
              connection to it first, which alone can take 20 ms"
)]
fn six_concurrent_opens_at_a_20_ms_query_timeout_all_succeed() {
    // The migration outlasts query_timeout: waiting for it is bounded by pool_timeout.
    let schema = unique_schema("six20");
    let open = || {
        ModelRepository::open(config(&schema).query_timeout(Duration::from_millis(20)))
            .map(|r| r.close())
    };
    for round in ["a new schema", "an already migrated schema"] {
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6).map(|_| s.spawn(open)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        drop_schema_after_failure(&schema, || {
            for r in &results {
                assert!(r.is_ok(), "{round}: {r:?}");
            }
        });
    }
    drop_schema(&schema);
}

/// Drops the schema only if `f` panics (the caller drops it at the end otherwise).
fn drop_schema_after_failure(schema: &str, f: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        drop_schema(schema);
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn a_schema_starting_with_pg_is_invalid_and_runs_no_sql() {
    for name in ["pg_x", "pg_catalog", "pg_"] {
        let result = ModelRepository::open(config(name));
        match &result {
            Err(RepoError::InvalidInput(m)) => assert!(m.message().contains("pg_"), "{m}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    assert!(!schema_exists("pg_x"));
    // Only the lowercase prefix is reserved (schemas are always quoted).
    let name = format!("PG_x_{}", std::process::id());
    drop_schema_after(&name, || {
        ModelRepository::open(config(&name)).unwrap().close();
    });
}

#[test]
fn hostile_settings_are_invalid_input_naming_the_setting_before_any_io() {
    let huge = Duration::MAX;
    type Adjust = Box<dyn Fn(RepositoryConfig) -> RepositoryConfig>;
    let cases: Vec<(&str, Adjust)> = vec![
        ("pool_timeout", Box::new(move |c| c.pool_timeout(huge))),
        ("pool_timeout", Box::new(|c| c.pool_timeout(Duration::ZERO))),
        ("max_overflow", Box::new(|c| c.max_overflow(u32::MAX))),
        ("pool_size", Box::new(|c| c.pool_size(u32::MAX))),
        ("pool_size", Box::new(|c| c.pool_size(0))),
        (
            "pool_size + max_overflow",
            Box::new(|c| c.pool_size(6000).max_overflow(6000)),
        ),
        ("query_timeout", Box::new(move |c| c.query_timeout(huge))),
        // Above PostgreSQL's limit for statement_timeout (i32::MAX ms, about 24.8 days).
        (
            "query_timeout",
            Box::new(|c| c.query_timeout(Duration::from_millis(i32::MAX as u64 + 1))),
        ),
        (
            "query_timeout",
            Box::new(|c| c.query_timeout(Duration::from_micros(10))),
        ),
        ("cache_max_ttl", Box::new(move |c| c.cache_max_ttl(huge))),
        (
            "cache_default_ttl",
            Box::new(|c| c.cache_default_ttl(Duration::from_secs(100_000))),
        ),
        (
            "reaper_interval",
            Box::new(move |c| c.reaper_interval(Some(huge))),
        ),
        (
            "slow_query_threshold",
            Box::new(move |c| c.slow_query_threshold(huge)),
        ),
        (
            "stream_idle_timeout",
            Box::new(move |c| c.stream_idle_timeout(huge)),
        ),
        ("max_model_size", Box::new(|c| c.max_model_size(u64::MAX))),
        ("max_model_size", Box::new(|c| c.max_model_size(0))),
    ];
    for (setting, adjust) in &cases {
        let schema = unique_schema("hostile");
        let started = Instant::now();
        let result = ModelRepository::open(adjust(config(&schema)));
        match &result {
            Err(RepoError::InvalidInput(m)) => {
                assert!(m.message().starts_with(setting), "{setting}: {m}");
                assert!(m.message().contains("within"), "the range is named: {m}");
            }
            other => panic!("{setting}: {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!schema_exists(&schema), "{setting}: nothing was created");
    }
    // The same from the environment.
    for (var, value) in [
        ("DB_POOL_TIMEOUT", "1e19"),
        ("DB_MAX_OVERFLOW", "4294967295"),
        ("QUERY_TIMEOUT", "2147484"),
    ] {
        let config = RepositoryConfig::from_lookup(|name| match name {
            "DATABASE_URL" => Some(common::server_url()),
            "MODEL_REPO_SCHEMA" => Some(unique_schema("env")),
            n if n == var => Some(value.to_owned()),
            _ => None,
        })
        .unwrap();
        let schema = config.schema_name().to_owned();
        let result = ModelRepository::open(config);
        assert!(
            matches!(result, Err(RepoError::InvalidInput(_))),
            "{var}={value}: {result:?}"
        );
        assert!(!schema_exists(&schema));
    }
}

#[test]
fn connection_errors_name_their_cause() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let quick = |c: RepositoryConfig| c.pool_timeout(Duration::from_millis(500));
    let migrating = ModelRepository::open(quick(RepositoryConfig::new(&url))).unwrap_err();
    let pooled =
        ModelRepository::open(quick(RepositoryConfig::new(&url).auto_migrate(false))).unwrap_err();
    for e in [migrating, pooled] {
        let shown = e.to_string();
        assert!(shown.contains("refused"), "{shown}");
    }
}
