//! Sharing the database with other clients (issue 12): rows written as another client would
//! write them (SQL in the test), the documented manual setup run literally with `psql`, an
//! application role's maintenance and open, re-saves by the seed's Python, its non-numeric
//! metric rows, and the cache values it pickled.

use std::sync::OnceLock;
use std::time::Duration;

use pg_model_repo::throwaway::ThrowawayServer;
use pg_model_repo::{ModelRepository, RepoError, RepositoryConfig, VectorStorage};
use serde_json::json;

use crate::common::{self, documented_command, psql, sha256_hex, TestRepo};

/// `pickle.dumps([0.5, 0.25], protocol=4)`: what the seed's Python cached.
pub const PICKLED_LIST: &str =
    "80049517000000000000005d9428473fe0000000000000473fd0000000000000652e";

/// `pickle.dumps({"recommendations": [1, 2, 3], "scores": [0.9, 0.8]}, protocol=4)`.
pub const PICKLED_DICT: &str = "80049540000000000000007d94288c0f7265636f6d6d656e646174696f6e73945d94284b014b024b03658c0673636f726573945d9428473feccccccccccccd473fe999999999999a65752e";

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// `cbor2.dumps({"scores": [0.9, 0.8], "model": "1.0"})` (cbor2 writes floats as float64).
fn cbor2_dict() -> Vec<u8> {
    unhex("a26673636f72657382fb3feccccccccccccdfb3fe999999999999a656d6f64656c63312e30")
}

// Item 1 -----------------------------------------------------------------------------------

#[test]
fn cache_values_another_client_wrote_decode_only_when_they_are_one_cbor_item() {
    let repo = TestRepo::new();
    let mut sql = repo.sql();
    let mut junk = vec![0x07];
    junk.extend_from_slice(b"junk");
    for (key, value) in [
        ("pickled_list", unhex(PICKLED_LIST)),
        ("pickled_dict", unhex(PICKLED_DICT)),
        ("seven_and_junk", junk),
        ("cbor2", cbor2_dict()),
    ] {
        sql.execute(
            "INSERT INTO prediction_cache (cache_key, predictions, expires_at)
             VALUES ($1, $2, now() + interval '1 hour')",
            &[&key, &value],
        )
        .unwrap();
    }
    assert!(matches!(
        repo.get_cached_predictions::<Vec<f32>>("pickled_list"),
        Err(RepoError::Serialization(_))
    ));
    assert!(matches!(
        repo.get_cached_predictions::<serde_json::Value>("pickled_dict"),
        Err(RepoError::Serialization(_))
    ));
    assert!(matches!(
        repo.get_cached_predictions::<u32>("seven_and_junk"),
        Err(RepoError::Serialization(_))
    ));
    assert_eq!(
        repo.get_cached_predictions::<serde_json::Value>("cbor2")
            .unwrap(),
        Some(json!({"scores": [0.9, 0.8], "model": "1.0"}))
    );
    // get_or_compute treats the undecodable value as a miss and replaces it.
    let fresh: Vec<f32> = repo
        .get_or_compute("pickled_list", Duration::from_secs(60), || {
            Ok(vec![0.5, 0.25])
        })
        .unwrap();
    assert_eq!(fresh, vec![0.5, 0.25]);
    assert_eq!(
        repo.get_cached_predictions::<Vec<f32>>("pickled_list")
            .unwrap(),
        Some(vec![0.5, 0.25])
    );
}

// Item 4 -----------------------------------------------------------------------------------

fn checksum_of(repo: &TestRepo, version: &str) -> String {
    repo.sql()
        .query_one(
            "SELECT checksum FROM ml_models WHERE model_name = 'm' AND version = $1",
            &[&version],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_seed_style_resave_recomputes_the_checksum_and_becomes_latest() {
    let repo = TestRepo::new();
    repo.save_model("m", "1", b"first", &json!({})).unwrap();
    repo.save_model("m", "2", b"second", &json!({})).unwrap();
    assert_eq!(repo.load_model("m", "latest").unwrap().unwrap(), b"second");
    let before = repo.get_model_versions("m").unwrap()[1].created_at;

    // The seed's Python overwrites version 1 by upsert, naming only its own columns.
    repo.sql()
        .execute(
            "INSERT INTO ml_models (model_name, version, model_data, metadata)
             VALUES ('m', '1', 'first, retrained'::bytea, '{}')
             ON CONFLICT (model_name, version) DO UPDATE SET model_data = EXCLUDED.model_data",
            &[],
        )
        .unwrap();
    let (info, bytes) = repo.load_model_with_info("m", "1").unwrap().unwrap();
    assert_eq!(bytes, b"first, retrained");
    assert_eq!(info.checksum, sha256_hex(b"first, retrained"));
    assert_eq!(checksum_of(&repo, "1"), sha256_hex(b"first, retrained"));
    assert!(
        info.created_at > before,
        "the re-save is when it was last saved"
    );
    assert_eq!(
        repo.load_model("m", "latest").unwrap().unwrap(),
        b"first, retrained"
    );
    let order: Vec<String> = repo
        .get_model_versions("m")
        .unwrap()
        .into_iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(order, ["1", "2"]);

    // A plain UPDATE of the bytes, as SQL users write it, does the same.
    repo.sql()
        .execute(
            "UPDATE ml_models SET model_data = 'second, patched'::bytea WHERE version = '2'",
            &[],
        )
        .unwrap();
    assert_eq!(
        repo.load_model("m", "latest").unwrap().unwrap(),
        b"second, patched"
    );
    let mut out = Vec::new();
    repo.load_model_to_writer("m", "2", &mut out).unwrap();
    assert_eq!(out, b"second, patched");

    // Updates that do not write the bytes move nothing.
    repo.sql()
        .execute(
            "UPDATE ml_models SET metadata = '{\"k\": 1}' WHERE version = '1'",
            &[],
        )
        .unwrap();
    assert_eq!(
        repo.load_model("m", "latest").unwrap().unwrap(),
        b"second, patched"
    );
    // A writer that supplies its own checksum keeps it (the library's revival of a deleted
    // version does this).
    assert!(repo.delete_model("m", "1").unwrap());
    repo.save_model("m", "1", b"third", &json!({})).unwrap();
    assert_eq!(checksum_of(&repo, "1"), sha256_hex(b"third"));
    assert_eq!(repo.load_model("m", "latest").unwrap().unwrap(), b"third");
}

#[test]
fn bytes_changed_below_the_triggers_or_a_changed_checksum_still_read_as_corrupt() {
    let repo = TestRepo::new();
    repo.save_model("m", "1", b"original", &json!({})).unwrap();
    repo.save_model("m", "2", b"other", &json!({})).unwrap();
    let mut sql = repo.sql();
    // As a disk fault would: the triggers do not see it.
    sql.batch_execute(&common::below_triggers(
        "SET model_data = 'tampered'::bytea WHERE version = '1'",
    ))
    .unwrap();
    assert!(matches!(
        repo.load_model("m", "1"),
        Err(RepoError::Corrupt(_))
    ));
    sql.execute(
        "UPDATE ml_models SET checksum = repeat('0', 64) WHERE version = '2'",
        &[],
    )
    .unwrap();
    assert!(matches!(
        repo.load_model("m", "2"),
        Err(RepoError::Corrupt(_))
    ));
    let mut sink = Vec::new();
    assert!(matches!(
        repo.load_model_to_writer("m", "2", &mut sink),
        Err(RepoError::Corrupt(_))
    ));
}

// Item 6: training metrics ------------------------------------------------------------------

#[test]
fn a_non_numeric_metric_row_from_another_client_does_not_hide_the_history() {
    let repo = TestRepo::new();
    repo.save_training_metrics("m", "1", &[("auc".to_string(), 0.91)].into())
        .unwrap();
    repo.sql()
        .batch_execute(
            r#"INSERT INTO training_metrics (model_name, version, metrics)
               VALUES ('m', '2', '{"auc": "n/a", "loss": 0.3, "notes": {"by": "python"}}');
               INSERT INTO training_metrics (model_name, version, metrics)
               VALUES ('m', '2', '{"auc": "pending"}');
               INSERT INTO training_metrics (model_name, version, metrics)
               VALUES ('m', '3', '[1, 2]');"#,
        )
        .unwrap();
    repo.save_training_metrics("m", "4", &[("auc".to_string(), 0.95)].into())
        .unwrap();
    let history = repo.get_training_metrics_history("m").unwrap();
    let seen: Vec<(&str, Vec<(&str, f64)>)> = history
        .iter()
        .map(|r| {
            (
                r.version.as_str(),
                r.metrics.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("1", vec![("auc", 0.91)]),
            ("2", vec![("loss", 0.3)]),
            ("4", vec![("auc", 0.95)]),
        ]
    );
    // The newest readable record of version 2 is the one with a number in it.
    assert_eq!(
        repo.get_training_metrics("m", "2").unwrap(),
        Some([("loss".to_string(), 0.3)].into())
    );
    assert_eq!(repo.get_training_metrics("m", "3").unwrap(), None);
}

// Items 2, 3 and 6 (roles): a server of their own, with an owner and application roles ------

/// A server for the role tests (roles are cluster-wide): database `mydb` and an owner role as
/// the documentation names them, and an owner/application pair for the other tests.
fn roles_server() -> &'static ThrowawayServer {
    static SERVER: OnceLock<ThrowawayServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let server = ThrowawayServer::start(&[("max_connections", "100")]).unwrap();
        let mut admin = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
        admin.batch_execute("CREATE DATABASE mydb").unwrap();
        admin
            .batch_execute(
                "CREATE ROLE ml_owner LOGIN;
                 GRANT CREATE ON DATABASE mydb TO ml_owner;
                 CREATE ROLE opt_owner LOGIN;
                 CREATE ROLE opt_app LOGIN;
                 GRANT CREATE ON DATABASE postgres TO opt_owner;",
            )
            .unwrap();
        server
    })
}

fn as_role(role: &str, database: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={role} dbname={database}",
        roles_server().port()
    )
}

fn role_config(role: &str, database: &str, schema: &str) -> RepositoryConfig {
    RepositoryConfig::new(as_role(role, database))
        .schema(schema)
        .pool_size(1)
        .max_overflow(2)
        .pool_timeout(Duration::from_secs(10))
        .reaper_interval(None)
}

/// Runs a documented shell command as written, from the crate's root, as `role` on the roles
/// server (psql reads the server and the role from PGHOST, PGPORT and PGUSER).
fn run_documented(command: &str, role: &str) {
    let output = std::process::Command::new("sh")
        .args(["-c", command])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", roles_server().port().to_string())
        .env("PGUSER", role)
        .output()
        .expect("sh runs");
    assert!(
        output.status.success(),
        "{command}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("ERROR"), "{command}\n{stderr}");
}

fn exercise(repo: &ModelRepository, tag: &str) {
    let version = format!("v-{tag}");
    repo.save_model("m", &version, tag.as_bytes(), &json!({"by": tag}))
        .unwrap();
    assert_eq!(
        repo.load_model("m", &version).unwrap().unwrap(),
        tag.as_bytes()
    );
    repo.save_embeddings("user", tag, &[0.5, 0.25]).unwrap();
    assert_eq!(
        repo.get_embeddings("user", tag).unwrap(),
        Some(vec![0.5, 0.25])
    );
    repo.cache_predictions(tag, &vec![1u8, 2], Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        repo.get_cached_predictions::<Vec<u8>>(tag).unwrap(),
        Some(vec![1, 2])
    );
    repo.save_training_metrics("m", &version, &[("auc".to_string(), 0.9)].into())
        .unwrap();
}

#[test]
fn the_documented_manual_setup_opens_as_the_owner_and_as_the_application_role() {
    let _ = roles_server();
    // sql/roles.sql: the application role must exist first (run as a role with CREATEROLE).
    run_documented(
        &documented_command("sql/roles.sql", "psql -d mydb -c \"CREATE ROLE"),
        "postgres",
    );
    // sql/V001__init.sql: every numbered file, by hand, as the owner.
    run_documented(
        &documented_command("sql/V001__init.sql", "cat sql/V*.sql | psql"),
        "ml_owner",
    );
    run_documented(
        &documented_command(
            "sql/roles.sql",
            "psql -d mydb -v ON_ERROR_STOP=1 -v schema=ml",
        ),
        "ml_owner",
    );

    let app = ModelRepository::open(role_config("ml_app", "mydb", "ml").auto_migrate(false))
        .expect("the application role opens the schema set up by hand");
    exercise(&app, "app");
    app.close();
    let owner = ModelRepository::open(role_config("ml_owner", "mydb", "ml").auto_migrate(false))
        .expect("the owner opens the schema set up by hand");
    exercise(&owner, "owner");
    owner.close();
    // Nothing is pending, so the default auto_migrate(true) runs no DDL: the application role
    // opens with it too, and migrate as the owner has nothing to do.
    let app = ModelRepository::open(role_config("ml_app", "mydb", "ml")).unwrap();
    exercise(&app, "app-auto");
    app.close();
    let report =
        ModelRepository::migrate_with_report(&role_config("ml_owner", "mydb", "ml")).unwrap();
    assert!(report.applied.is_empty(), "{report:?}");
    assert!(report.seed_takeover.is_none());
}

/// A schema `schema` in database postgres migrated by `opt_owner`, with `opt_app` granted its
/// rights by sql/roles.sql.
fn owner_migrated_schema(schema: &str) {
    ModelRepository::migrate(&role_config("opt_owner", "postgres", schema)).unwrap();
    psql(
        &as_role("opt_owner", "postgres"),
        &[
            "-v",
            &format!("schema={schema}"),
            "-v",
            "app_role=opt_app",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/sql/roles.sql"),
        ],
    );
}

#[test]
fn optimize_database_as_the_application_role_reports_skipped_tables_and_still_purges() {
    owner_migrated_schema("opt");
    let app = ModelRepository::open(role_config("opt_app", "postgres", "opt")).unwrap();
    for i in 0..5 {
        app.cache_predictions(&format!("k{i}"), &i, Duration::from_secs(60))
            .unwrap();
    }
    let mut owner =
        postgres::Client::connect(&as_role("opt_owner", "postgres"), postgres::NoTls).unwrap();
    owner
        .execute(
            "UPDATE opt.prediction_cache SET cached_at = now() - interval '2 hours',
                 expires_at = now() - interval '1 hour' WHERE cache_key < 'k3'",
            &[],
        )
        .unwrap();

    let report = app.optimize_database().unwrap();
    assert_eq!(report.expired_cache_rows_purged, 3);
    assert_eq!(report.tables.len(), 9);
    for table in &report.tables {
        assert_eq!(table.action, "skipped (not owner)", "{table:?}");
        assert!(!table.vacuumed);
    }
    app.close();

    let owner_repo = ModelRepository::open(role_config("opt_owner", "postgres", "opt")).unwrap();
    let report = owner_repo.optimize_database().unwrap();
    for table in &report.tables {
        assert_eq!(table.action, "VACUUM (ANALYZE)", "{table:?}");
        assert!(table.vacuumed);
    }
}

#[test]
fn an_application_role_opens_a_migrated_schema_and_is_told_who_can_apply_a_pending_migration() {
    owner_migrated_schema("pending");
    let app = ModelRepository::open(role_config("opt_app", "postgres", "pending"))
        .expect("nothing pending: no DDL, no rights needed");
    app.save_model("m", "1", b"x", &json!({})).unwrap();
    app.close();

    // A release with a migration this schema lacks.
    let mut owner =
        postgres::Client::connect(&as_role("opt_owner", "postgres"), postgres::NoTls).unwrap();
    owner
        .execute(
            "DELETE FROM pending.model_repo_migrations WHERE version = 2",
            &[],
        )
        .unwrap();
    let err = ModelRepository::open(role_config("opt_app", "postgres", "pending")).unwrap_err();
    assert!(matches!(err, RepoError::PermissionDenied { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("ModelRepository::migrate"), "{message}");
    assert!(message.contains("auto_migrate(false)"), "{message}");
    assert_eq!(err.code().map(|c| c.code()), Some("42501"));

    let err =
        ModelRepository::open(role_config("opt_app", "postgres", "pending").auto_migrate(false))
            .unwrap_err();
    assert!(matches!(err, RepoError::NotFound(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("lacks migrations V002__resave_recomputes_checksum.sql"),
        "{err}"
    );
    // The owner applies it (the file's statements are idempotent), then the role opens again.
    let report =
        ModelRepository::migrate_with_report(&role_config("opt_owner", "postgres", "pending"))
            .unwrap();
    assert_eq!(report.applied, ["V002__resave_recomputes_checksum.sql"]);
    ModelRepository::open(role_config("opt_app", "postgres", "pending"))
        .unwrap()
        .close();
}

// The other client for real: Python with psycopg, cbor2 and numpy, where they are installed --

/// Says something in the test run's output even when the test passes (libtest captures only
/// the print macros), so that a cross-check that could not run never passes unnoticed.
fn announce(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The Python interpreter (see [`common::python`]) when it can import psycopg, cbor2 and
/// numpy, else why not.
fn python_with_packages() -> Result<(), String> {
    let probe = std::process::Command::new(crate::common::python())
        .args(["-c", "import psycopg, cbor2, numpy"])
        .output()
        .map_err(|e| format!("python3 did not start: {e}"))?;
    if probe.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&probe.stderr);
    Err(stderr
        .lines()
        .last()
        .unwrap_or("python3 -c 'import psycopg, cbor2, numpy' failed")
        .to_owned())
}

fn run_python_client(mode: &str, schema: &str) -> String {
    let output = std::process::Command::new(crate::common::python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/it/python_client.py"
        ))
        .args([mode, &crate::common::server_url(), schema])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        output.status.success(),
        "python_client.py {mode}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn a_python_client_reads_what_the_library_wrote_and_the_library_reads_what_it_writes() {
    if let Err(why) = python_with_packages() {
        // Not a failure: CI machines need not have Python packages. But it is said.
        announce(&format!(
            "interop: python cross-check NOT RUN ({why}); \
             to run it: pip install 'psycopg[binary]' cbor2 numpy"
        ));
        return;
    }
    // The seed's Python code reads and writes vectors as bytes (BYTEA storage).
    let repo = TestRepo::with_config(|c| c.vector_storage(VectorStorage::Bytea));
    repo.save_model("ranker", "1", b"weights v1", &json!({"auc": 0.91}))
        .unwrap();
    repo.save_model_from_reader("ranker", "2", &mut &b"weights v2"[..], &json!({}))
        .unwrap();
    let u1 = [0.1f32, -2.5, 3.25, 1e-7];
    repo.save_embeddings("user", "u1", &u1).unwrap();
    repo.save_embeddings("user", "u2", &u1.map(|v| v * 2.0))
        .unwrap();
    let hour = Duration::from_secs(3600);
    repo.cache_predictions(
        "recs",
        &json!({"recommendations": [1, 2, 3], "scores": [0.5, 0.25]}),
        hour,
    )
    .unwrap();
    repo.cache_predictions("label", "churn", hour).unwrap();
    repo.cache_predictions("count", &7u32, hour).unwrap();
    repo.cache_predictions("floats", &vec![0.5f32, 0.25, -1.0], hour)
        .unwrap();
    repo.save_training_metrics(
        "ranker",
        "1",
        &[("auc".to_string(), 0.91), ("loss".to_string(), 0.25)].into(),
    )
    .unwrap();
    let read = run_python_client("read", &repo.schema);

    let written = run_python_client("write", &repo.schema);
    assert_eq!(
        repo.load_model("ranker", "1").unwrap().unwrap(),
        b"retrained by python"
    );
    assert_eq!(
        repo.load_model("ranker", "latest").unwrap().unwrap(),
        b"retrained by python"
    );
    assert_eq!(
        repo.get_embeddings("user", "py").unwrap(),
        Some(vec![0.5, 0.25, 0.125, -8.0])
    );
    assert_eq!(
        repo.get_cached_predictions::<serde_json::Value>("py_recs")
            .unwrap(),
        Some(json!({"items": ["a", "b"], "scores": [0.9, 0.8]}))
    );
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Recs {
        items: Vec<String>,
        scores: Vec<f32>,
    }
    assert_eq!(
        repo.get_cached_predictions::<Recs>("py_recs").unwrap(),
        Some(Recs {
            items: vec!["a".into(), "b".into()],
            scores: vec![0.9, 0.8],
        })
    );
    assert_eq!(
        repo.get_training_metrics("ranker", "1").unwrap(),
        Some([("auc".to_string(), 0.93)].into())
    );
    announce(&format!(
        "interop: python cross-check ran (psycopg, cbor2, numpy): read {read}, write {written}"
    ));
}
