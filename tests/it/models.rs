//! Models: every rule of API.md's "Models" section, against a real PostgreSQL.

use std::io::{Cursor, Read};

use pg_model_repo::{ModelRepository, RepoError};
use serde_json::json;

use crate::common::{self, assert_invalid, count, sha256_hex, TestRepo};

#[test]
fn repository_handle_is_clone_send_and_sync() {
    fn assert_traits<T: Clone + Send + Sync + 'static>() {}
    assert_traits::<ModelRepository>();
}

#[test]
fn saved_model_loads_back_with_its_info() {
    let repo = TestRepo::new();
    let data = b"model bytes \x00\xff".to_vec();
    let meta = json!({"framework": "xgboost", "auc": 0.91, "tags": ["a", "b"]});
    let info = repo.save_model("ranker", "1.0", &data, &meta).unwrap();
    assert_eq!(info.model_name, "ranker");
    assert_eq!(info.version, "1.0");
    assert_eq!(info.size_bytes, data.len() as u64);
    assert_eq!(info.checksum, sha256_hex(&data));
    assert_eq!(info.metadata, meta);
    assert!(info.is_active);

    assert_eq!(
        repo.load_model("ranker", "1.0").unwrap(),
        Some(data.clone())
    );
    let (loaded_info, bytes) = repo.load_model_with_info("ranker", "1.0").unwrap().unwrap();
    assert_eq!(bytes, data);
    assert_eq!(loaded_info, info);
}

#[test]
fn empty_model_bytes_are_a_valid_model() {
    let repo = TestRepo::new();
    let info = repo.save_model("m", "v", b"", &json!({})).unwrap();
    assert_eq!(info.size_bytes, 0);
    assert_eq!(repo.load_model("m", "v").unwrap(), Some(vec![]));
}

#[test]
fn identical_resave_returns_the_existing_info() {
    let repo = TestRepo::new();
    let first = repo
        .save_model("m", "1", b"abc", &json!({"a": 1, "b": 2}))
        .unwrap();
    // Same JSONB value, other key order and spacing.
    let again = repo
        .save_model("m", "1", b"abc", &json!({"b": 2, "a": 1}))
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(count(&repo, "ml_models"), 1);
}

#[test]
fn resave_with_different_bytes_or_metadata_is_a_conflict() {
    let repo = TestRepo::new();
    repo.save_model("m", "1", b"abc", &json!({"a": 1})).unwrap();
    assert!(matches!(
        repo.save_model("m", "1", b"abd", &json!({"a": 1})),
        Err(RepoError::Conflict(_))
    ));
    assert!(matches!(
        repo.save_model("m", "1", b"abc", &json!({"a": 2})),
        Err(RepoError::Conflict(_))
    ));
    assert_eq!(repo.load_model("m", "1").unwrap().unwrap(), b"abc");
}

#[test]
fn resaving_a_deleted_version_revives_it_as_latest() {
    let repo = TestRepo::new();
    repo.save_model("m", "1", b"one", &json!({})).unwrap();
    repo.save_model("m", "2", b"two", &json!({})).unwrap();
    assert!(repo.delete_model("m", "1").unwrap());
    let revived = repo
        .save_model("m", "1", b"new one", &json!({"r": true}))
        .unwrap();
    assert!(revived.is_active);
    assert_eq!(revived.metadata, json!({"r": true}));
    assert_eq!(repo.load_model("m", "latest").unwrap().unwrap(), b"new one");
    let versions: Vec<String> = repo
        .get_model_versions("m")
        .unwrap()
        .into_iter()
        .map(|i| i.version)
        .collect();
    assert_eq!(versions, ["1", "2"]);
}

#[test]
fn latest_follows_the_save_sequence_not_the_version_name() {
    let repo = TestRepo::new();
    for v in ["9", "10", "2", "1"] {
        repo.save_model("m", v, v.as_bytes(), &json!({})).unwrap();
    }
    assert_eq!(repo.load_model("m", "latest").unwrap().unwrap(), b"1");
    // Same created_at cannot break the order: force equal timestamps.
    repo.sql()
        .execute("UPDATE ml_models SET created_at = '2020-01-01'", &[])
        .unwrap();
    assert_eq!(repo.load_model("m", "latest").unwrap().unwrap(), b"1");
    let (info, _) = repo.load_model_with_info("m", "latest").unwrap().unwrap();
    assert_eq!(info.version, "1");
}

#[test]
fn latest_skips_deleted_versions_and_is_none_when_nothing_is_active() {
    let repo = TestRepo::new();
    repo.save_model("m", "1", b"1", &json!({})).unwrap();
    repo.save_model("m", "2", b"2", &json!({})).unwrap();
    repo.delete_model("m", "2").unwrap();
    assert_eq!(repo.load_model("m", "latest").unwrap().unwrap(), b"1");
    repo.delete_model("m", "latest").unwrap();
    assert_eq!(repo.load_model("m", "latest").unwrap(), None);
}

#[test]
fn reserved_versions_cannot_be_saved() {
    let repo = TestRepo::new();
    assert_invalid(repo.save_model("m", "latest", b"x", &json!({})));
    assert_invalid(repo.save_model("m", "@champion", b"x", &json!({})));
    assert_invalid(repo.save_model_from_reader("m", "latest", &mut Cursor::new(b"x"), &json!({})));
    assert_eq!(count(&repo, "ml_models"), 0);
}

#[test]
fn absent_and_deleted_versions_load_as_none() {
    let repo = TestRepo::new();
    assert_eq!(repo.load_model("nope", "1").unwrap(), None);
    assert_eq!(repo.load_model("nope", "latest").unwrap(), None);
    assert!(repo.load_model_with_info("nope", "1").unwrap().is_none());
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    repo.delete_model("m", "1").unwrap();
    assert_eq!(repo.load_model("m", "1").unwrap(), None);
    let mut sink = Vec::new();
    assert!(repo
        .load_model_to_writer("m", "1", &mut sink)
        .unwrap()
        .is_none());
    assert!(sink.is_empty());
}

#[test]
fn metadata_must_be_a_small_nul_free_object() {
    let repo = TestRepo::new();
    for bad in [json!([1, 2]), json!("text"), json!(3), json!(null)] {
        assert_invalid(repo.save_model("m", "1", b"x", &bad));
    }
    assert_invalid(repo.save_model("m", "1", b"x", &json!({"k": "a\u{0}b"})));
    assert_invalid(repo.save_model("m", "1", b"x", &json!({"nested": {"k\u{0}": 1}})));
    let big = json!({"blob": "x".repeat(pg_model_repo::MAX_METADATA_BYTES)});
    assert_invalid(repo.save_model("m", "1", b"x", &big));
    assert_invalid(repo.save_model_from_reader("m", "1", &mut Cursor::new(b"x"), &big));
    assert_eq!(count(&repo, "ml_models"), 0);
}

#[test]
fn names_and_versions_follow_the_character_limits() {
    let repo = TestRepo::new();
    let name_255 = "é".repeat(255);
    let version_50 = "ü".repeat(50);
    repo.save_model(&name_255, &version_50, b"x", &json!({}))
        .unwrap();
    assert_eq!(
        repo.load_model(&name_255, &version_50).unwrap().unwrap(),
        b"x"
    );
    assert_invalid(repo.save_model(&"é".repeat(256), "1", b"x", &json!({})));
    assert_invalid(repo.save_model("m", &"ü".repeat(51), b"x", &json!({})));
    for blank in ["", " ", "\t\n"] {
        assert_invalid(repo.save_model(blank, "1", b"x", &json!({})));
        assert_invalid(repo.save_model("m", blank, b"x", &json!({})));
        assert_invalid(repo.load_model(blank, "1"));
    }
    assert_invalid(repo.save_model("a\0b", "1", b"x", &json!({})));
    assert_invalid(repo.save_model("m", "1\0", b"x", &json!({})));
    assert_invalid(repo.load_model("m", "1\0"));
    assert_invalid(repo.get_model_versions(""));
    assert_invalid(repo.delete_model("m", " "));
    assert_invalid(repo.cleanup_old_models("", 1));
    assert_eq!(count(&repo, "ml_models"), 1);
}

#[test]
fn changed_bytes_are_reported_as_corrupt() {
    let repo = TestRepo::new();
    repo.save_model("m", "1", b"original bytes", &json!({}))
        .unwrap();
    repo.sql()
        .batch_execute(
            // Below the triggers, as a disk fault would (an ordinary UPDATE of the bytes is a
            // re-save: the database recomputes the checksum).
            &common::below_triggers("SET model_data = 'tampered'::bytea"),
        )
        .unwrap();
    assert!(matches!(
        repo.load_model("m", "1"),
        Err(RepoError::Corrupt(_))
    ));
    assert!(matches!(
        repo.load_model_with_info("m", "latest"),
        Err(RepoError::Corrupt(_))
    ));
    let mut sink = Vec::new();
    assert!(matches!(
        repo.load_model_to_writer("m", "1", &mut sink),
        Err(RepoError::Corrupt(_))
    ));
}

#[test]
fn models_over_max_model_size_are_rejected_and_not_stored() {
    let repo = TestRepo::with_config(|c| c.max_model_size(1000));
    repo.save_model("m", "ok", &[7u8; 1000], &json!({}))
        .unwrap();
    assert_invalid(repo.save_model("m", "big", &[7u8; 1001], &json!({})));
    let mut reader = Cursor::new(vec![7u8; 1001]);
    assert_invalid(repo.save_model_from_reader("m", "big", &mut reader, &json!({})));
    assert_eq!(repo.load_model("m", "big").unwrap(), None);
    assert_eq!(count(&repo, "ml_models"), 1);
}

#[test]
fn versions_list_active_ones_newest_first() {
    let repo = TestRepo::new();
    for v in ["a", "b", "c", "d"] {
        repo.save_model("m", v, v.as_bytes(), &json!({})).unwrap();
    }
    repo.save_model("other", "z", b"z", &json!({})).unwrap();
    repo.delete_model("m", "b").unwrap();
    let versions: Vec<String> = repo
        .get_model_versions("m")
        .unwrap()
        .into_iter()
        .map(|i| i.version)
        .collect();
    assert_eq!(versions, ["d", "c", "a"]);
    assert!(repo.get_model_versions("unknown").unwrap().is_empty());
}

#[test]
fn search_matches_contained_metadata_newest_first() {
    let repo = TestRepo::new();
    repo.save_model("a", "1", b"x", &json!({"stage": "prod", "team": "rec"}))
        .unwrap();
    repo.save_model("b", "1", b"x", &json!({"stage": "dev"}))
        .unwrap();
    repo.save_model(
        "c",
        "1",
        b"x",
        &json!({"stage": "prod", "tags": ["x", "y"]}),
    )
    .unwrap();
    repo.save_model("d", "1", b"x", &json!({"stage": "prod"}))
        .unwrap();
    repo.delete_model("d", "1").unwrap();
    let names = |filter| -> Vec<String> {
        repo.search_models(&filter)
            .unwrap()
            .into_iter()
            .map(|i| i.model_name)
            .collect()
    };
    assert_eq!(names(json!({"stage": "prod"})), ["c", "a"]);
    assert_eq!(names(json!({"tags": ["y"]})), ["c"]);
    assert_eq!(names(json!({})), ["c", "b", "a"]);
    assert!(names(json!({"stage": "nope"})).is_empty());
    assert_invalid(repo.search_models(&json!(["stage"])));
    assert_invalid(repo.search_models(&json!({"k": "\u{0}"})));
}

#[test]
fn metadata_search_is_served_by_the_gin_index() {
    let repo = TestRepo::new();
    let mut sql = repo.sql();
    sql.batch_execute(
        "INSERT INTO ml_models (model_name, version, model_data, metadata)
         SELECT 'm' || g, '1', 'x'::bytea, jsonb_build_object('n', g) FROM generate_series(1, 5000) g;
         ANALYZE ml_models;",
    )
    .unwrap();
    let plan: Vec<String> = sql
        .query(
            "EXPLAIN SELECT * FROM ml_models WHERE is_active AND metadata @> '{\"n\": 42}'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("ml_models_active_metadata"), "{plan}");
    assert_eq!(repo.search_models(&json!({"n": 42})).unwrap().len(), 1);
}

#[test]
fn delete_is_soft_and_reports_whether_it_deleted() {
    let repo = TestRepo::new();
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    assert!(repo.delete_model("m", "1").unwrap());
    assert!(!repo.delete_model("m", "1").unwrap());
    assert!(!repo.delete_model("m", "never").unwrap());
    let active: bool = repo
        .sql()
        .query_one(
            "SELECT is_active FROM ml_models WHERE model_name = 'm'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!active, "the row stays, inactive");
}

#[test]
fn cleanup_keeps_the_newest_active_versions_only() {
    let repo = TestRepo::new();
    for v in 1..=6 {
        repo.save_model("m", &v.to_string(), b"x", &json!({}))
            .unwrap();
    }
    repo.save_model("other", "1", b"x", &json!({})).unwrap();
    repo.delete_model("m", "6").unwrap();
    // Active: 1..=5 (5 newest). Keep 2 -> 5 and 4 stay; 1, 2, 3 and deleted 6 go.
    assert_eq!(repo.cleanup_old_models("m", 2).unwrap(), 4);
    let left: Vec<String> = repo
        .sql()
        .query(
            "SELECT version FROM ml_models WHERE model_name = 'm' ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["4", "5"]);
    assert_eq!(repo.cleanup_old_models("m", 2).unwrap(), 0);
    assert_eq!(repo.cleanup_old_models("m", 0).unwrap(), 2);
    assert_eq!(count(&repo, "ml_models"), 1, "other models are untouched");
}

#[test]
fn cleanup_removes_aliases_but_keeps_history_and_metrics() {
    let repo = TestRepo::new();
    for v in ["1", "2", "3"] {
        repo.save_model("m", v, b"x", &json!({})).unwrap();
    }
    repo.set_model_alias("m", "old", "1").unwrap();
    repo.set_model_alias("m", "new", "3").unwrap();
    repo.save_training_metrics("m", "1", &[("loss".into(), 0.5)].into())
        .unwrap();
    assert_eq!(repo.cleanup_old_models("m", 1).unwrap(), 2);
    let aliases = repo.get_model_aliases("m").unwrap();
    assert_eq!(
        aliases.into_iter().collect::<Vec<_>>(),
        [("new".into(), "3".into())]
    );
    assert_eq!(repo.get_alias_history("m", "old").unwrap().len(), 1);
    assert!(repo.get_training_metrics("m", "1").unwrap().is_some());
    assert_eq!(repo.load_model("m", "@old").unwrap(), None);
}

#[test]
fn streaming_save_and_load_round_trip_with_checksum() {
    let repo = TestRepo::new();
    // Several slices long, not a multiple of the slice size, from a reader of unknown length.
    let data: Vec<u8> = (0..9_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut reader = ChunkyReader {
        inner: Cursor::new(data.clone()),
    };
    let info = repo
        .save_model_from_reader("big", "1", &mut reader, &json!({"kind": "stream"}))
        .unwrap();
    assert_eq!(info.size_bytes, data.len() as u64);
    assert_eq!(info.checksum, sha256_hex(&data));
    let mut out = Vec::new();
    let loaded = repo
        .load_model_to_writer("big", "latest", &mut out)
        .unwrap()
        .unwrap();
    assert_eq!(loaded, info);
    assert!(out == data, "streamed bytes differ");
    assert!(repo.load_model("big", "1").unwrap().unwrap() == data);
    // An identical streamed re-save is harmless; a different one conflicts.
    let again = repo
        .save_model_from_reader(
            "big",
            "1",
            &mut Cursor::new(data.clone()),
            &json!({"kind": "stream"}),
        )
        .unwrap();
    assert_eq!(again, info);
    assert!(matches!(
        repo.save_model_from_reader("big", "1", &mut Cursor::new(b"other"), &json!({})),
        Err(RepoError::Conflict(_))
    ));
}

#[test]
fn slice_saved_models_stream_out_and_streamed_ones_load_whole() {
    let repo = TestRepo::new();
    let data = vec![42u8; 5_000_000];
    repo.save_model("m", "1", &data, &json!({})).unwrap();
    let mut out = Vec::new();
    repo.load_model_to_writer("m", "1", &mut out)
        .unwrap()
        .unwrap();
    assert!(out == data);
}

/// Returns short, irregular reads, as a network stream would.
struct ChunkyReader {
    inner: Cursor<Vec<u8>>,
}

impl Read for ChunkyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(77_777);
        self.inner.read(&mut buf[..n])
    }
}

#[test]
fn concurrent_saves_of_one_new_version_store_it_once() {
    let repo = TestRepo::new();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| repo.save_model("m", "1", b"same", &json!({"k": 1}))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(count(&repo, "ml_models"), 1);
}

#[test]
fn rows_inserted_by_hand_with_seed_columns_only_are_valid() {
    let repo = TestRepo::new();
    repo.sql()
        .execute(
            "INSERT INTO ml_models (model_name, version, model_data) VALUES ('hand', '1', 'abc'::bytea)",
            &[],
        )
        .unwrap();
    let (info, data) = repo
        .load_model_with_info("hand", "latest")
        .unwrap()
        .unwrap();
    assert_eq!(data, b"abc");
    assert_eq!(info.checksum, sha256_hex(b"abc"));
    assert_eq!(info.size_bytes, 3);
    assert_eq!(info.metadata, json!({}));
}

#[test]
fn a_checksum_cleared_by_hand_is_computed_on_load_and_guards_later_loads() {
    let repo = TestRepo::new();
    let data = b"weights".to_vec();
    repo.save_model("m", "1", &data, &json!({})).unwrap();
    repo.save_model("m", "2", &data, &json!({})).unwrap();
    repo.sql()
        .batch_execute("UPDATE ml_models SET checksum = NULL")
        .unwrap();

    let (info, bytes) = repo.load_model_with_info("m", "1").unwrap().unwrap();
    assert_eq!(bytes, data);
    assert_eq!(info.checksum, sha256_hex(&data));
    let mut out = Vec::new();
    let streamed = repo
        .load_model_to_writer("m", "2", &mut out)
        .unwrap()
        .unwrap();
    assert_eq!(streamed.checksum, sha256_hex(&data));
    // Stored back, so listings show it and a later corruption is caught.
    for v in repo.get_model_versions("m").unwrap() {
        assert_eq!(v.checksum, sha256_hex(&data), "{}", v.version);
    }
    // Bytes that change under the checksum (a disk fault; an UPDATE the re-save trigger does
    // not see) now read as Corrupt.
    repo.sql()
        .batch_execute(&common::below_triggers("SET model_data = '\\x00'"))
        .unwrap();
    assert!(matches!(
        repo.load_model("m", "1"),
        Err(RepoError::Corrupt(_))
    ));
}
