//! `ModelRepository::migration_status`: applied and pending files, read without DDL.

use std::time::{Duration, SystemTime};

use pg_model_repo::ModelRepository;

use crate::common::{admin, config, drop_schema, unique_schema};

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
fn status_lists_every_file_pending_for_a_new_schema_and_creates_nothing() {
    let schema = unique_schema("mstat");
    let status = ModelRepository::migration_status(&config(&schema)).unwrap();
    assert_eq!(status.schema, schema);
    assert!(status.applied.is_empty(), "{status:?}");
    assert_eq!(
        status.pending.first().map(String::as_str),
        Some("V001__init.sql")
    );
    assert!(
        status.pending.iter().any(|f| f == "V007__citus_ready.sql"),
        "{status:?}"
    );
    assert!(!schema_exists(&schema), "a status read must run no DDL");
}

#[test]
fn status_after_migrate_lists_the_applied_files_with_their_time_and_nothing_pending() {
    let schema = unique_schema("mstat");
    let cfg = config(&schema);
    let before = ModelRepository::migration_status(&cfg).unwrap();
    let report = ModelRepository::migrate_with_report(&cfg).unwrap();
    let status = ModelRepository::migration_status(&cfg);
    drop_schema(&schema);
    let status = status.unwrap();
    assert!(status.pending.is_empty(), "{status:?}");
    let names: Vec<&str> = status.applied.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, report.applied, "{status:?}");
    // What was pending is what got applied (the optional pgvector file only where available).
    for name in &report.applied {
        assert!(
            before.pending.contains(name),
            "{name} was not listed pending: {before:?}"
        );
    }
    let now = SystemTime::now();
    for applied in &status.applied {
        let age = now
            .duration_since(applied.applied_at)
            .unwrap_or(Duration::ZERO);
        assert!(age < Duration::from_secs(600), "{applied:?}");
    }
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["applied"][0]["name"], "V001__init.sql");
}
