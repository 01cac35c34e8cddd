//! Credentials never leak (Debug, Display, logs, failed logins), and an application role with
//! only USAGE and DML works the repository that an owner role migrated.

use std::sync::OnceLock;
use std::time::Duration;

use pg_model_repo::throwaway::ThrowawayServer;
use pg_model_repo::{Embedding, ModelRepository, RepoError, RepositoryConfig};
use serde_json::json;

use crate::common::psql;
use crate::logging::LogWatch;

/// One server for these tests, with password authentication for role `app_user`.
fn server() -> &'static ThrowawayServer {
    static SERVER: OnceLock<ThrowawayServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let server = ThrowawayServer::start(&[("max_connections", "100")]).unwrap();
        let hba = server.data_dir().join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!("host all app_user 127.0.0.1/32 scram-sha-256\n{rules}"),
        )
        .unwrap();
        let mut admin = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!(
                "CREATE ROLE app_user LOGIN PASSWORD '{PASSWORD}';
                 GRANT CREATE ON DATABASE postgres TO app_user;
                 SELECT pg_reload_conf();"
            ))
            .unwrap();
        server
    })
}

const PASSWORD: &str = "S3cret-pw-4711";
const WRONG: &str = "Wr0ng-pw-0815";

fn urls(password: &str) -> [String; 2] {
    let port = server().port();
    [
        format!("postgres://app_user:{password}@127.0.0.1:{port}/postgres"),
        format!("host=127.0.0.1 port={port} user=app_user password={password} dbname=postgres"),
    ]
}

fn assert_clean(text: &str) {
    assert!(!text.contains(PASSWORD), "password leaked: {text}");
    assert!(!text.contains(WRONG), "password leaked: {text}");
}

#[test]
fn no_password_appears_in_debug_display_errors_or_logs() {
    let _ = server();
    let logs = LogWatch::start(&[PASSWORD, WRONG]);
    for url in urls(PASSWORD) {
        let config = RepositoryConfig::new(url.clone())
            .schema("creds")
            .pool_size(1)
            .reaper_interval(None);
        assert_clean(&format!("{config:?}"));
        let repo = ModelRepository::open(config).expect("the right password opens");
        repo.save_model("m", "1", b"x", &json!({})).unwrap();
        assert_clean(&format!("{repo:?}"));
        repo.close();
    }
    for url in urls(WRONG) {
        let config = RepositoryConfig::new(url)
            .schema("creds")
            .pool_size(1)
            .pool_timeout(Duration::from_secs(2))
            .reaper_interval(None);
        let err = ModelRepository::open(config).expect_err("a wrong password fails");
        assert!(matches!(err, RepoError::Database(_)), "{err:?}");
        assert_clean(&err.to_string());
        assert_clean(&format!("{err:?}"));
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            assert_clean(&s.to_string());
            source = s.source();
        }
    }
    let (records, leaks) = logs.seen();
    assert!(records > 0, "the watch saw the library's logs");
    assert!(leaks.is_empty(), "password leaked: {leaks:?}");
}

#[test]
fn an_application_role_with_only_usage_and_dml_works_the_repository() {
    let server = server();
    let mut admin = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
    admin
        .batch_execute(
            "CREATE ROLE ml_owner LOGIN; CREATE ROLE ml_app LOGIN;
             GRANT CREATE ON DATABASE postgres TO ml_owner;",
        )
        .unwrap();
    let as_role = |role: &str| {
        format!(
            "host=127.0.0.1 port={} user={role} dbname=postgres",
            server.port()
        )
    };
    let config = |role: &str| {
        RepositoryConfig::new(as_role(role))
            .schema("least")
            .pool_size(1)
            .reaper_interval(None)
    };
    ModelRepository::migrate(&config("ml_owner")).unwrap();
    let roles_sql = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/roles.sql");
    psql(
        &as_role("ml_owner"),
        &[
            "-v",
            "schema=least",
            "-v",
            "app_role=ml_app",
            "-f",
            roles_sql,
        ],
    );

    // Nothing is pending, so opening runs no DDL, with auto_migrate on or off; the role works
    // everything.
    ModelRepository::open(config("ml_app")).unwrap().close();
    let repo = ModelRepository::open(config("ml_app").auto_migrate(false)).unwrap();
    repo.save_model("m", "1", b"one", &json!({"a": 1})).unwrap();
    repo.save_model_from_reader("m", "2", &mut &b"two"[..], &json!({}))
        .unwrap();
    repo.set_model_alias("m", "champion", "1").unwrap();
    repo.set_model_alias("m", "champion", "2").unwrap();
    assert_eq!(repo.rollback_model_alias("m", "champion").unwrap(), "1");
    repo.save_training_metrics("m", "1", &[("auc".to_string(), 0.9)].into())
        .unwrap();
    assert!(repo.delete_model("m", "2").unwrap());
    assert_eq!(repo.cleanup_old_models("m", 1).unwrap(), 1);
    let mut out = Vec::new();
    repo.load_model_to_writer("m", "@champion", &mut out)
        .unwrap();
    assert_eq!(out, b"one");
    // Embeddings: a new type's storage, a full refresh and a drop need DDL, which the
    // schema owner's SECURITY DEFINER functions do for the role.
    repo.save_embeddings("user", "u1", &[1.0, 2.0]).unwrap();
    let batch: Vec<Embedding> = (0..500)
        .map(|i| Embedding::new("item", format!("i{i}"), vec![0.5; 4]))
        .collect();
    repo.batch_save_embeddings(&batch).unwrap();
    repo.replace_embeddings("item", &batch[..100]).unwrap();
    repo.replace_embeddings(
        "fresh",
        &batch[..3]
            .iter()
            .map(|e| Embedding::new("fresh", e.entity_id.clone(), vec![1.0; 8]))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_eq!(repo.get_all_embeddings("item").unwrap().len(), 100);
    assert_eq!(repo.drop_embedding_type("user").unwrap(), 1);
    assert_eq!(repo.get_embeddings_stats().unwrap().total_embeddings, 103);

    // And it really has no DDL rights.
    let mut app = postgres::Client::connect(&as_role("ml_app"), postgres::NoTls).unwrap();
    let ddl = app.batch_execute("CREATE TABLE least.intruder (x int)");
    assert!(ddl.is_err());
}
