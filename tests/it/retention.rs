//! Retention (API.md, "Models in production"): what a policy keeps (the newest, the aliased,
//! the recent), what it removes (with its chunks, in one transaction), and a dry run that
//! reports exactly what the real run does.

use std::time::Duration;

use pg_model_repo::{RetentionPolicy, RetentionReason, RetentionReport};
use serde_json::json;

use crate::common::{assert_invalid, count, TestRepo};

fn versions_of(repo: &TestRepo, model: &str) -> Vec<String> {
    repo.sql()
        .query(
            "SELECT version::text FROM ml_models WHERE model_name = $1 ORDER BY save_seq DESC",
            &[&model],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn policy(keep_newest: usize) -> RetentionPolicy {
    RetentionPolicy {
        keep_newest,
        ..RetentionPolicy::default()
    }
}

/// Versions 1..=7 of "m" (7 the newest), 3 and 6 soft-deleted, @champion on 1.
fn seven_versions() -> TestRepo {
    let repo = TestRepo::new();
    for v in 1..=7 {
        let bytes = vec![v as u8; v * 10];
        repo.save_model("m", &v.to_string(), &bytes, &json!({"v": v}))
            .unwrap();
    }
    repo.delete_model("m", "3").unwrap();
    repo.delete_model("m", "6").unwrap();
    repo.set_model_alias("m", "champion", "1").unwrap();
    repo
}

#[test]
fn the_default_policy_keeps_five_and_what_an_alias_serves() {
    let p = RetentionPolicy::default();
    assert_eq!(
        (
            p.keep_newest,
            p.keep_aliased,
            p.keep_younger_than,
            p.dry_run
        ),
        (5, true, None, false)
    );
}

#[test]
fn retention_keeps_the_newest_active_and_the_aliased_and_removes_the_rest() {
    let repo = seven_versions();
    repo.save_training_metrics("m", "2", &[("auc".to_string(), 0.5)].into())
        .unwrap();
    let report = repo.apply_retention("m", &policy(2)).unwrap();
    assert_eq!(report.model_name, "m");
    assert!(!report.dry_run);
    // Active by save order: 7, 5, 4, 2, 1; soft-deleted: 6, 3.
    assert_eq!(report.kept, ["7", "5", "1"]);
    assert_eq!(report.removed, ["6", "4", "3", "2"]);
    assert_eq!(report.bytes_freed, 60 + 40 + 30 + 20);
    let reasons: Vec<(&str, RetentionReason, u64, bool)> = report
        .versions
        .iter()
        .map(|v| (v.version.as_str(), v.reason, v.size_bytes, v.is_active))
        .collect();
    use RetentionReason::*;
    assert_eq!(
        reasons,
        [
            ("7", Newest, 70, true),
            ("6", SoftDeleted, 60, false),
            ("5", Newest, 50, true),
            ("4", Superseded, 40, true),
            ("3", SoftDeleted, 30, false),
            ("2", Superseded, 20, true),
            ("1", Aliased, 10, true),
        ]
    );
    assert!(report.aliases_removed.is_empty());
    assert_eq!(versions_of(&repo, "m"), ["7", "5", "1"]);
    assert_eq!(repo.load_model("m", "@champion").unwrap().unwrap(), [1; 10]);
    // Training metrics of removed versions stay.
    assert!(repo.get_training_metrics("m", "2").unwrap().is_some());
    // Nothing left to remove.
    let again = repo.apply_retention("m", &policy(2)).unwrap();
    assert!(again.removed.is_empty());
    assert_eq!(again.kept, ["7", "5", "1"]);
    assert_eq!(again.bytes_freed, 0);
}

#[test]
fn without_keep_aliased_an_aliased_version_goes_with_its_alias_and_the_history_stays() {
    let repo = seven_versions();
    let report = repo
        .apply_retention(
            "m",
            &RetentionPolicy {
                keep_newest: 3,
                keep_aliased: false,
                ..RetentionPolicy::default()
            },
        )
        .unwrap();
    assert_eq!(report.kept, ["7", "5", "4"]);
    assert_eq!(report.removed, ["6", "3", "2", "1"]);
    assert_eq!(report.aliases_removed, ["champion"]);
    assert!(repo.get_model_aliases("m").unwrap().is_empty());
    assert_eq!(repo.load_model("m", "@champion").unwrap(), None);
    assert_eq!(repo.get_alias_history("m", "champion").unwrap().len(), 1);
    assert_eq!(count(&repo, "model_alias_stack"), 0);
}

#[test]
fn keep_younger_than_keeps_recent_versions_by_the_database_clock() {
    let repo = seven_versions();
    // Versions 1..=4 were saved two days ago, by the database's clock.
    repo.sql()
        .execute(
            "UPDATE ml_models SET created_at = now() - interval '2 days' \
             WHERE model_name = 'm' AND version IN ('1', '2', '3', '4')",
            &[],
        )
        .unwrap();
    let report = repo
        .apply_retention(
            "m",
            &RetentionPolicy {
                keep_newest: 0,
                keep_aliased: false,
                keep_younger_than: Some(Duration::from_secs(24 * 3600)),
                dry_run: false,
            },
        )
        .unwrap();
    assert_eq!(report.kept, ["7", "6", "5"]);
    assert_eq!(report.removed, ["4", "3", "2", "1"]);
    assert!(report
        .versions
        .iter()
        .filter(|v| !v.removed)
        .all(|v| v.reason == RetentionReason::Recent));
    // Beyond any timestamp: everything is recent.
    let report = repo
        .apply_retention(
            "m",
            &RetentionPolicy {
                keep_newest: 0,
                keep_younger_than: Some(Duration::MAX),
                ..RetentionPolicy::default()
            },
        )
        .unwrap();
    assert!(report.removed.is_empty());
}

#[test]
fn a_dry_run_reports_exactly_what_the_real_run_does_and_changes_nothing() {
    let repo = TestRepo::with_config(|c| c.model_chunk_size(64 << 10));
    for model in ["a", "b"] {
        for v in 1..=6u8 {
            // Every other version is chunked (three 64 KiB chunks).
            let len = if v % 2 == 0 { 3 * (64 << 10) - 7 } else { 100 };
            repo.save_model(model, &v.to_string(), &vec![v; len], &json!({}))
                .unwrap();
        }
    }
    repo.delete_model("a", "5").unwrap();
    repo.set_model_alias("a", "champion", "2").unwrap();
    repo.set_model_alias("b", "staging", "1").unwrap();
    repo.sql()
        .execute(
            "UPDATE ml_models SET created_at = now() - interval '1 hour' WHERE version <> '3'",
            &[],
        )
        .unwrap();
    let tables = |repo: &TestRepo| {
        [
            "ml_models",
            "ml_model_chunks",
            "model_aliases",
            "model_alias_stack",
        ]
        .map(|t| count(repo, t))
    };
    for keep_aliased in [true, false] {
        let policy = RetentionPolicy {
            keep_newest: 2,
            keep_aliased,
            keep_younger_than: Some(Duration::from_secs(600)),
            dry_run: true,
        };
        let before = tables(&repo);
        let dry = repo.apply_retention_all(&policy).unwrap();
        assert_eq!(tables(&repo), before, "a dry run changes nothing");
        assert!(dry.iter().any(|r| !r.removed.is_empty()));
        assert!(dry.iter().all(|r| r.dry_run));
        let real = repo
            .apply_retention_all(&RetentionPolicy {
                dry_run: false,
                ..policy.clone()
            })
            .unwrap();
        let as_real = |r: &RetentionReport| {
            let mut r = r.clone();
            r.dry_run = false;
            r
        };
        let dry: Vec<RetentionReport> = dry.iter().map(as_real).collect();
        assert_eq!(dry, real, "keep_aliased {keep_aliased}");
    }
    // The chunks of every removed version went with it.
    let orphans: i64 = repo
        .sql()
        .query_one(
            "SELECT count(*) FROM ml_model_chunks c WHERE NOT EXISTS (SELECT 1 FROM ml_models m \
             WHERE m.model_name = c.model_name AND m.version = c.version \
               AND m.chunk_set = c.chunk_set)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0);
}

#[test]
fn chunks_are_freed_in_the_same_transaction_as_their_version() {
    let repo = TestRepo::with_config(|c| c.model_chunk_size(64 << 10));
    for v in 1..=3u8 {
        repo.save_model("m", &v.to_string(), &vec![v; 5 * (64 << 10)], &json!({}))
            .unwrap();
    }
    assert_eq!(count(&repo, "ml_model_chunks"), 15);
    let report = repo.apply_retention("m", &policy(1)).unwrap();
    assert_eq!(report.removed, ["2", "1"]);
    assert_eq!(report.bytes_freed, 2 * 5 * (64 << 10));
    // Gone when the call returns, not released to the sweep.
    assert_eq!(count(&repo, "ml_model_chunks"), 5);
    assert_eq!(repo.load_model("m", "3").unwrap().unwrap().len(), 5 << 16);
}

/// A deletion of chunks that fails makes the whole retention fail: nothing of it stays.
/// (A trigger on the chunk table: Citus refuses triggers on distributed tables.)
#[cfg(not(feature = "citus"))]
#[test]
fn a_failure_while_freeing_chunks_leaves_every_version_in_place() {
    let repo = TestRepo::with_config(|c| c.model_chunk_size(64 << 10));
    for v in 1..=3u8 {
        repo.save_model("m", &v.to_string(), &vec![v; 3 * (64 << 10)], &json!({}))
            .unwrap();
    }
    repo.sql()
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'chunks stay'; END $$;
             CREATE TRIGGER refuse BEFORE DELETE ON ml_model_chunks
                 FOR EACH ROW EXECUTE FUNCTION refuse();",
        )
        .unwrap();
    let err = repo.apply_retention("m", &policy(1)).unwrap_err();
    assert!(err.to_string().contains("chunks stay"), "{err}");
    assert_eq!(versions_of(&repo, "m"), ["3", "2", "1"]);
    assert_eq!(count(&repo, "ml_model_chunks"), 9);
}

#[test]
fn an_unknown_model_gives_an_empty_report_and_every_model_gets_one() {
    let repo = seven_versions();
    let report = repo.apply_retention("nobody", &policy(0)).unwrap();
    assert_eq!(report.model_name, "nobody");
    assert!(report.removed.is_empty() && report.kept.is_empty() && report.versions.is_empty());
    assert_eq!(report.bytes_freed, 0);

    repo.save_model("z", "1", b"only", &json!({})).unwrap();
    let reports = repo.apply_retention_all(&policy(3)).unwrap();
    let names: Vec<&str> = reports.iter().map(|r| r.model_name.as_str()).collect();
    assert_eq!(names, ["m", "z"]);
    assert_eq!(reports[0].kept, ["7", "5", "4", "1"]);
    assert_eq!(reports[1].kept, ["1"]);
    assert!(reports[1].removed.is_empty());
    // Serializable, as every report is.
    let json = serde_json::to_value(&reports[0]).unwrap();
    assert_eq!(json["versions"][0]["reason"], "Newest");
}

#[test]
fn bad_model_names_are_invalid_and_change_nothing() {
    let repo = seven_versions();
    for bad in ["", "   ", "a\0b", &"x".repeat(256)] {
        assert_invalid(repo.apply_retention(bad, &policy(0)));
    }
    assert_eq!(versions_of(&repo, "m").len(), 7);
}

#[test]
fn cleanup_old_models_keeps_its_own_contract() {
    let repo = seven_versions();
    // Not retention: the aliased version 1 goes, with its alias.
    assert_eq!(repo.cleanup_old_models("m", 2).unwrap(), 5);
    assert_eq!(versions_of(&repo, "m"), ["7", "5"]);
    assert!(repo.get_model_aliases("m").unwrap().is_empty());
}
