//! Embeddings: every rule of API.md's "Embeddings" section and of the load methods, against a
//! real PostgreSQL.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime};

use pg_model_repo::{Embedding, LoadMethod, ModelRepository, RepoError, RepositoryConfig};

use crate::common::{self, assert_invalid, count, terminate_sessions, url_with_app_name, TestRepo};

/// `n` records of one type, values depending on `seed` so that a reload changes them.
fn batch(entity_type: &str, n: usize, dim: usize, seed: f32) -> Vec<Embedding> {
    (0..n)
        .map(|i| {
            let vector = (0..dim)
                .map(|j| seed + i as f32 * 0.5 + j as f32 * 0.001)
                .collect();
            Embedding::new(entity_type, format!("id-{i:06}"), vector)
        })
        .collect()
}

fn timestamps(repo: &TestRepo, entity_type: &str, entity_id: &str) -> (SystemTime, SystemTime) {
    let row = repo
        .sql()
        .query_one(
            "SELECT created_at, updated_at FROM embeddings WHERE entity_type = $1 AND entity_id = $2",
            &[&entity_type, &entity_id],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

fn staged_rows(repo: &TestRepo) -> i64 {
    count(repo, "embeddings_staging")
}

#[track_caller]
fn assert_mismatch<T: std::fmt::Debug>(
    result: pg_model_repo::Result<T>,
    expected: usize,
    actual: usize,
    index: Option<usize>,
) {
    match result {
        Err(RepoError::DimensionMismatch {
            expected: e,
            actual: a,
            index: i,
            ..
        }) => assert_eq!((e, a, i), (expected, actual, index)),
        other => {
            panic!("expected DimensionMismatch({expected}, {actual}, {index:?}), got {other:?}")
        }
    }
}

/// InvalidInput whose message names the record.
#[track_caller]
fn assert_invalid_at<T: std::fmt::Debug>(result: pg_model_repo::Result<T>, index: usize) {
    match result {
        Err(RepoError::InvalidInput(m)) => {
            assert!(m.message().contains(&format!("record {index}:")), "{m}")
        }
        other => panic!("expected InvalidInput at record {index}, got {other:?}"),
    }
}

#[test]
fn saved_vector_reads_back_exactly() {
    let repo = TestRepo::new();
    let v = vec![0.25, -1.5, f32::MIN_POSITIVE, f32::MAX, -0.0];
    repo.save_embeddings("user", "u1", &v).unwrap();
    assert_eq!(repo.get_embeddings("user", "u1").unwrap(), Some(v));
    assert_eq!(repo.get_embeddings("user", "nobody").unwrap(), None);
    assert_eq!(repo.get_embeddings("other", "u1").unwrap(), None);
}

#[test]
fn vectors_are_stored_as_little_endian_f32_bytes_with_their_dimension() {
    let repo = common::bytea_repo();
    repo.save_embeddings("user", "u1", &[1.0, -2.5]).unwrap();
    repo.load_embeddings(&batch("item", 3, 2, 1.0), LoadMethod::Copy)
        .unwrap();
    let row = repo
        .sql()
        .query_one(
            "SELECT embeddings, dimension, octet_length(embeddings) FROM embeddings WHERE entity_id = 'u1'",
            &[],
        )
        .unwrap();
    let bytes: Vec<u8> = row.get(0);
    let mut expected = 1.0f32.to_le_bytes().to_vec();
    expected.extend_from_slice(&(-2.5f32).to_le_bytes());
    assert_eq!(bytes, expected);
    assert_eq!(bytes, vec![0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x20, 0xc0]);
    assert_eq!(row.get::<_, i32>(1), 2);
    assert_eq!(row.get::<_, i32>(2), 8);
    // The COPY path writes the same layout.
    let copied: Vec<u8> = repo
        .sql()
        .query_one(
            "SELECT embeddings FROM embeddings WHERE entity_type = 'item' AND entity_id = 'id-000000'",
            &[],
        )
        .unwrap()
        .get(0);
    let mut expected = 1.0f32.to_le_bytes().to_vec();
    expected.extend_from_slice(&1.001f32.to_le_bytes());
    assert_eq!(copied, expected);
}

#[test]
fn upsert_keeps_created_at_and_moves_updated_at() {
    let repo = TestRepo::new();
    repo.save_embeddings("user", "u1", &[1.0, 2.0]).unwrap();
    let (created, updated) = timestamps(&repo, "user", "u1");
    std::thread::sleep(Duration::from_millis(20));
    repo.save_embeddings("user", "u1", &[3.0, 4.0]).unwrap();
    let (created2, updated2) = timestamps(&repo, "user", "u1");
    assert_eq!(created2, created);
    assert!(updated2 > updated, "{updated2:?} <= {updated:?}");
    assert_eq!(
        repo.get_embeddings("user", "u1").unwrap(),
        Some(vec![3.0, 4.0])
    );
    assert_eq!(count(&repo, "embeddings"), 1);
}

#[test]
fn every_load_method_upserts_keeping_created_at() {
    let repo = TestRepo::new();
    for method in LoadMethod::ALL {
        let ty = format!("t_{method}");
        let first = batch(&ty, 2500, 8, 1.0);
        repo.load_embeddings(&first, method).unwrap();
        let (created, updated) = timestamps(&repo, &ty, "id-002499");
        std::thread::sleep(Duration::from_millis(20));
        let second = batch(&ty, 3000, 8, 7.0);
        let report = repo.load_embeddings(&second, method).unwrap();
        assert_eq!(report.rows, 3000);
        let (created2, updated2) = timestamps(&repo, &ty, "id-002499");
        assert_eq!(created2, created, "{method}");
        assert!(updated2 > updated, "{method}");
        let all = repo.get_all_embeddings(&ty).unwrap();
        assert_eq!(all.len(), 3000, "{method}");
        for e in &second {
            assert_eq!(all[&e.entity_id], e.vector, "{method}");
        }
    }
    assert_eq!(staged_rows(&repo), 0);
}

#[test]
fn batch_report_counts_rows_and_vector_bytes() {
    let repo = TestRepo::new();
    let mut b = batch("a", 10, 4, 0.0);
    b.extend(batch("b", 5, 3, 0.0));
    for method in LoadMethod::ALL {
        let report = repo.load_embeddings(&b, method).unwrap();
        assert_eq!(report.rows, 15);
        assert_eq!(report.bytes, 10 * 16 + 5 * 12);
    }
    let report = repo.batch_save_embeddings(&b).unwrap();
    assert_eq!((report.rows, report.bytes), (15, 220));
    let empty = repo.batch_save_embeddings(&[]).unwrap();
    assert_eq!((empty.rows, empty.bytes), (0, 0));
}

#[test]
fn batch_save_works_below_and_above_the_crossover() {
    let repo = TestRepo::new();
    let small = batch("small", 10, 16, 0.0);
    let large = batch("large", pg_model_repo::BATCH_COPY_CROSSOVER + 10, 16, 0.0);
    repo.batch_save_embeddings(&small).unwrap();
    repo.batch_save_embeddings(&large).unwrap();
    repo.batch_save_embeddings(&large).unwrap();
    assert_eq!(repo.get_all_embeddings("small").unwrap().len(), 10);
    assert_eq!(
        repo.get_all_embeddings("large").unwrap().len(),
        pg_model_repo::BATCH_COPY_CROSSOVER + 10
    );
}

#[test]
fn the_first_vector_fixes_the_dimension_of_its_type() {
    let repo = TestRepo::new();
    repo.save_embeddings("user", "u1", &[1.0, 2.0, 3.0])
        .unwrap();
    assert_mismatch(repo.save_embeddings("user", "u2", &[1.0, 2.0]), 3, 2, None);
    // Even for an existing key, and nothing changes.
    assert_mismatch(repo.save_embeddings("user", "u1", &[1.0; 4]), 3, 4, None);
    assert_eq!(
        repo.get_embeddings("user", "u1").unwrap(),
        Some(vec![1.0, 2.0, 3.0])
    );
    // Other types have their own dimension.
    repo.save_embeddings("item", "i1", &[1.0]).unwrap();
    let dim: i32 = repo
        .sql()
        .query_one(
            "SELECT dimension FROM embedding_types WHERE entity_type = 'user'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(dim, 3);
}

#[test]
fn a_batch_against_the_registry_names_the_first_record_of_the_wrong_type() {
    let repo = TestRepo::new();
    repo.save_embeddings("user", "u0", &[1.0, 2.0, 3.0])
        .unwrap();
    for method in LoadMethod::ALL {
        let mut b = batch("item", 4, 2, 0.0);
        b.extend(batch("user", 3, 4, 0.0));
        assert_mismatch(repo.load_embeddings(&b, method), 3, 4, Some(4));
        assert_eq!(count(&repo, "embeddings"), 1, "{method}");
        assert_eq!(staged_rows(&repo), 0, "{method}");
    }
    // The failed batches did not register "item" either.
    let registered = count(&repo, "embedding_types");
    assert_eq!(registered, 1);
}

#[test]
fn mixed_dimensions_within_one_type_of_a_batch_name_the_record() {
    let repo = TestRepo::new();
    let mut b = batch("user", 5, 3, 0.0);
    b[3].vector.push(1.0);
    for method in LoadMethod::ALL {
        assert_mismatch(repo.load_embeddings(&b, method), 3, 4, Some(3));
    }
    let err = repo.batch_save_embeddings(&b).unwrap_err();
    assert!(err.to_string().contains("record 3"), "{err}");
    assert_eq!(count(&repo, "embeddings"), 0);
    assert_eq!(count(&repo, "embedding_types"), 0);
}

#[test]
fn bad_single_saves_are_invalid_input() {
    let repo = TestRepo::new();
    assert_invalid(repo.save_embeddings("user", "u", &[]));
    assert_invalid(repo.save_embeddings("user", "u", &[1.0, f32::NAN]));
    assert_invalid(repo.save_embeddings("user", "u", &[f32::INFINITY]));
    assert_invalid(repo.save_embeddings("user", "u", &[f32::NEG_INFINITY]));
    assert_invalid(repo.save_embeddings("", "u", &[1.0]));
    assert_invalid(repo.save_embeddings(" \t", "u", &[1.0]));
    assert_invalid(repo.save_embeddings("user", "  ", &[1.0]));
    assert_invalid(repo.save_embeddings("us\0er", "u", &[1.0]));
    assert_invalid(repo.save_embeddings("user", "u\0", &[1.0]));
    assert_invalid(repo.save_embeddings(&"t".repeat(51), "u", &[1.0]));
    assert_invalid(repo.save_embeddings("user", &"i".repeat(256), &[1.0]));
    assert_invalid(repo.get_embeddings("user", ""));
    assert_invalid(repo.get_embeddings_many("user", &["ok", " "]));
    assert_invalid(repo.for_each_embedding("", &mut |_, _| {}));
    assert_eq!(count(&repo, "embeddings"), 0);
    assert_eq!(count(&repo, "embedding_types"), 0);
    // The limits count characters, as varchar does.
    let ty = "é".repeat(50);
    let id = "ü".repeat(255);
    repo.save_embeddings(&ty, &id, &[1.0]).unwrap();
    assert_eq!(repo.get_embeddings(&ty, &id).unwrap(), Some(vec![1.0]));
}

#[test]
fn every_bad_record_fails_its_batch_by_every_method_naming_its_index() {
    let repo = TestRepo::new();
    type Spoil = fn(&mut Embedding);
    let spoilers: [(&str, Spoil); 10] = [
        ("empty vector", |e| e.vector.clear()),
        ("NaN", |e| e.vector[1] = f32::NAN),
        ("+inf", |e| e.vector[0] = f32::INFINITY),
        ("-inf", |e| e.vector[2] = f32::NEG_INFINITY),
        ("blank type", |e| e.entity_type = "  ".into()),
        ("blank id", |e| e.entity_id = String::new()),
        ("NUL in type", |e| e.entity_type = "a\0b".into()),
        ("NUL in id", |e| e.entity_id.push('\0')),
        ("long type", |e| e.entity_type = "x".repeat(51)),
        ("long id", |e| e.entity_id = "x".repeat(256)),
    ];
    for (what, spoil) in spoilers {
        // The bad record comes last, in a batch big enough for the parallel checks.
        let mut b = batch("user", 5000, 4, 0.0);
        spoil(&mut b[4999]);
        for method in LoadMethod::ALL {
            let result = repo.load_embeddings(&b, method);
            match &result {
                Err(RepoError::InvalidInput(m)) => {
                    assert!(m.message().contains("record 4999:"), "{what}: {m}")
                }
                other => panic!("{what} by {method}: {other:?}"),
            }
        }
        assert_invalid_at(repo.batch_save_embeddings(&b), 4999);
        assert_invalid_at(repo.batch_save_embeddings(&b[4990..]), 9);
    }
    assert_eq!(count(&repo, "embeddings"), 0);
    assert_eq!(count(&repo, "embedding_types"), 0);
}

#[test]
fn the_first_offending_record_is_named_when_several_are_bad() {
    let repo = TestRepo::new();
    let mut b = batch("user", 100, 4, 0.0);
    b[70].vector[0] = f32::NAN;
    b[40].entity_id = b[10].entity_id.clone();
    b[90].vector.push(1.0);
    assert_invalid_at(repo.batch_save_embeddings(&b), 40);
    b[20].vector.pop();
    assert_mismatch(repo.batch_save_embeddings(&b), 4, 3, Some(20));
}

#[test]
fn duplicate_keys_in_one_batch_fail_it_naming_the_second_occurrence() {
    let repo = TestRepo::new();
    for n in [3, 6000] {
        let mut b = batch("user", n, 4, 0.0);
        b[n - 1].entity_id = b[1].entity_id.clone();
        for method in LoadMethod::ALL {
            assert_invalid_at(repo.load_embeddings(&b, method), n - 1);
        }
    }
    // The same id under another type is no duplicate.
    let mut b = batch("user", 3, 4, 0.0);
    b[2].entity_type = "item".into();
    b[2].entity_id = b[0].entity_id.clone();
    repo.batch_save_embeddings(&b).unwrap();
    assert_eq!(count(&repo, "embeddings"), 3);
}

/// A CHECK constraint the client knows nothing about: the server refuses the last record, in
/// the middle of a COPY, of the merge or of the inserts.
#[test]
fn a_record_the_server_refuses_leaves_nothing_behind_by_every_method() {
    let repo = TestRepo::new();
    repo.sql()
        .batch_execute(
            "ALTER TABLE embeddings ADD CONSTRAINT no_poison CHECK (entity_id <> 'poison')",
        )
        .unwrap();
    let existing = batch("user", 10, 4, 0.0);
    repo.load_embeddings(&existing, LoadMethod::Copy).unwrap();
    for (ty, rows) in [("user", 4000), ("fresh", 4000)] {
        let mut b = batch(ty, rows, 4, 3.0);
        b[rows - 1].entity_id = "poison".into();
        for method in LoadMethod::ALL {
            let err = repo.load_embeddings(&b, method).unwrap_err();
            assert_eq!(
                err.code().map(|c| c.code()),
                Some("23514"),
                "{method}: {err}"
            );
            assert_eq!(count(&repo, "embeddings"), 10, "{method}");
            assert_eq!(staged_rows(&repo), 0, "{method}");
            // The old values are untouched.
            assert_eq!(
                repo.get_embeddings("user", "id-000003").unwrap(),
                Some(existing[3].vector.clone())
            );
        }
    }
    assert_eq!(count(&repo, "embedding_types"), 1);
}

/// A repository whose connections carry their own application_name, so a test can kill
/// exactly its backends.
struct Tagged {
    repo: ModelRepository,
    schema: String,
    app: String,
}

impl Tagged {
    fn new() -> Self {
        let schema = common::unique_schema("k");
        let app = format!("kill_{schema}");
        let url = url_with_app_name(&app);
        let config = RepositoryConfig::new(url)
            .schema(&schema)
            .pool_size(2)
            .max_overflow(4)
            .pool_timeout(Duration::from_secs(10))
            .reaper_interval(None);
        let repo = ModelRepository::open(config).unwrap();
        Tagged { repo, schema, app }
    }

    fn kill_backends(&self) -> i64 {
        terminate_sessions(&self.app)
    }

    fn count(&self, table: &str) -> i64 {
        common::admin()
            .query_one(
                &format!("SELECT count(*) FROM \"{}\".{table}", self.schema),
                &[],
            )
            .unwrap()
            .get(0)
    }
}

impl Drop for Tagged {
    fn drop(&mut self) {
        common::drop_schema(&self.schema);
    }
}

#[test]
fn a_load_whose_backend_is_killed_every_time_midway_leaves_nothing() {
    let t = Tagged::new();
    // 1024 floats a row: about 1000 rows a COPY chunk, so the COPY is several chunks long.
    let b = batch("user", 5000, 1024, 0.0);
    for method in LoadMethod::ALL {
        let kills = AtomicUsize::new(0);
        let result = t
            .repo
            .load_embeddings_with_progress(&b, method, &mut |_, _| {
                // Every progress report comes before the load's commit: killing at each one
                // fails every attempt, whatever steps this attempt happens to report in.
                kills.fetch_add(t.kill_backends() as usize, Ordering::Relaxed);
            });
        assert!(result.is_err(), "{method} survived {kills:?} kills");
        assert!(kills.load(Ordering::Relaxed) > 0, "{method}");
        assert_eq!(t.count("embeddings"), 0, "{method}");
        assert_eq!(t.count("embeddings_staging"), 0, "{method}");
    }
}

#[test]
fn a_load_whose_backend_is_killed_once_is_retried_and_written_once() {
    let t = Tagged::new();
    let b = batch("user", 5000, 1024, 0.0);
    for method in LoadMethod::ALL {
        let mut killed = false;
        let report = t
            .repo
            .load_embeddings_with_progress(&b, method, &mut |done, total| {
                if !killed && done >= total / 2 && done < total {
                    killed = t.kill_backends() > 0;
                }
            })
            .unwrap();
        assert!(killed, "{method}");
        assert_eq!(report.rows, 5000);
        assert_eq!(t.count("embeddings"), 5000, "{method}");
        assert_eq!(t.count("embeddings_staging"), 0, "{method}");
    }
    let all = t.repo.get_all_embeddings("user").unwrap();
    assert_eq!(all["id-004999"], b[4999].vector);
}

#[test]
fn concurrent_first_saves_of_a_new_type_agree_on_one_dimension() {
    let repo = TestRepo::new();
    for round in 0..10 {
        let ty = format!("new_{round}");
        let barrier = Arc::new(Barrier::new(2));
        let results: Vec<_> = [3usize, 4]
            .into_iter()
            .map(|dim| {
                let (repo, ty, barrier) = (repo.repo.clone(), ty.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    if round % 2 == 0 {
                        repo.save_embeddings(&ty, &format!("e{dim}"), &vec![1.0; dim])
                            .map(|_| dim)
                    } else {
                        let b = batch(&ty, 2000, dim, 0.0);
                        repo.load_embeddings(&b, LoadMethod::Copy).map(|_| dim)
                    }
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let winners: Vec<usize> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let loser = results.iter().find(|r| r.is_err()).unwrap();
        assert!(
            matches!(loser, Err(RepoError::DimensionMismatch { expected, .. }) if *expected == winners[0]),
            "{loser:?}"
        );
        let registered: i32 = repo
            .sql()
            .query_one(
                "SELECT dimension FROM embedding_types WHERE entity_type = $1",
                &[&ty],
            )
            .unwrap()
            .get(0);
        assert_eq!(registered as usize, winners[0]);
        let dims: Vec<i32> = repo
            .sql()
            .query(
                "SELECT DISTINCT dimension FROM embeddings WHERE entity_type = $1",
                &[&ty],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(dims, vec![winners[0] as i32]);
    }
}

#[test]
fn concurrent_overlapping_copies_into_an_empty_type_both_land() {
    let repo = TestRepo::new();
    // Registered, but its rows are gone: both loads may try the direct COPY at once.
    repo.save_embeddings("user", "seed", &[0.0; 8]).unwrap();
    repo.sql().batch_execute("DELETE FROM embeddings").unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = [1.0f32, 2.0]
        .into_iter()
        .map(|seed| {
            let (repo, barrier) = (repo.repo.clone(), barrier.clone());
            std::thread::spawn(move || {
                let b = batch("user", 5000, 8, seed);
                barrier.wait();
                repo.load_embeddings(&b, LoadMethod::Copy)
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    assert_eq!(count(&repo, "embeddings"), 5000);
}

/// The database itself enforces the types: another client's row needs a registered type and
/// its dimension.
#[test]
fn rows_inserted_by_hand_must_fit_a_registered_type() {
    let repo = common::bytea_repo();
    repo.save_embeddings("user", "u1", &[1.0, 2.0, 3.0])
        .unwrap();
    let mut sql = repo.sql();
    let insert = "INSERT INTO embeddings (entity_type, entity_id, embeddings, dimension) \
                  VALUES ($1, $2, $3, $4)";
    // A 2-dimensional row into the 3-dimensional type: refused by the type's CHECK.
    let err = sql
        .execute(insert, &[&"user", &"x", &vec![0u8; 8], &2i32])
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("23514"), "{err}");
    // Bytes that do not match the stated dimension: refused too.
    let err = sql
        .execute(insert, &[&"user", &"x", &vec![0u8; 8], &3i32])
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("23514"), "{err}");
    // A fitting row from another client reads back through the library.
    let bytes: Vec<u8> = [4.0f32, 5.0, 6.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    sql.execute(insert, &[&"user", &"x", &bytes, &3i32])
        .unwrap();
    assert_eq!(
        repo.get_embeddings("user", "x").unwrap(),
        Some(vec![4.0, 5.0, 6.0])
    );
    assert_eq!(count(&repo, "embeddings"), 2);
}

#[test]
fn a_new_type_with_rows_inserted_by_hand_takes_their_dimension() {
    let repo = common::bytea_repo();
    repo.sql()
        .execute(
            "INSERT INTO embeddings (entity_type, entity_id, embeddings, dimension) \
             VALUES ('legacy', 'x', $1, 2)",
            &[&[0u8; 8].to_vec()],
        )
        .unwrap();
    assert_mismatch(
        repo.save_embeddings("legacy", "y", &[1.0, 2.0, 3.0]),
        2,
        3,
        None,
    );
    assert_mismatch(
        repo.load_embeddings(&batch("legacy", 3, 3, 0.0), LoadMethod::Copy),
        2,
        3,
        Some(0),
    );
    repo.save_embeddings("legacy", "y", &[1.0, 2.0]).unwrap();
    assert_eq!(
        repo.get_embeddings("legacy", "x").unwrap(),
        Some(vec![0.0, 0.0])
    );
}

#[test]
fn get_embeddings_many_answers_in_the_callers_order() {
    let repo = TestRepo::new();
    repo.batch_save_embeddings(&batch("user", 5, 2, 0.0))
        .unwrap();
    repo.save_embeddings("item", "id-000009", &[9.0, 9.0])
        .unwrap();
    let got = repo
        .get_embeddings_many(
            "user",
            &[
                "id-000003",
                "missing",
                "id-000000",
                "id-000009",
                "id-000003",
            ],
        )
        .unwrap();
    assert_eq!(
        got,
        vec![
            Some(vec![1.5, 1.501]),
            None,
            Some(vec![0.0, 0.001]),
            None,
            Some(vec![1.5, 1.501]),
        ]
    );
    assert!(repo.get_embeddings_many("user", &[]).unwrap().is_empty());
}

#[test]
fn streaming_reads_see_every_row_of_the_type_only() {
    let repo = TestRepo::new();
    let users = batch("user", 3000, 16, 0.0);
    repo.batch_save_embeddings(&users).unwrap();
    repo.batch_save_embeddings(&batch("item", 7, 16, 0.0))
        .unwrap();
    let mut seen = std::collections::HashMap::new();
    let n = repo
        .for_each_embedding("user", &mut |id, v| {
            assert!(
                seen.insert(id.to_owned(), v.to_vec()).is_none(),
                "{id} twice"
            );
        })
        .unwrap();
    assert_eq!(n, 3000);
    assert_eq!(seen.len(), 3000);
    for e in &users {
        assert_eq!(seen[&e.entity_id], e.vector);
    }
    assert_eq!(repo.get_all_embeddings("user").unwrap(), seen);
    assert_eq!(repo.get_all_embeddings("item").unwrap().len(), 7);
    assert!(repo.get_all_embeddings("nothing").unwrap().is_empty());
    let mut calls = 0;
    assert_eq!(
        repo.for_each_embedding("nothing", &mut |_, _| calls += 1)
            .unwrap(),
        0
    );
    assert_eq!(calls, 0);
}

#[test]
fn streaming_reads_and_loads_run_without_the_query_timeout() {
    let repo = TestRepo::with_config(|c| c.query_timeout(Duration::from_millis(300)));
    let b = batch("user", 20_000, 256, 0.0);
    // Slow consumer: the stream outlives the statement timeout.
    repo.load_embeddings(&b, LoadMethod::Copy).unwrap();
    let mut n = 0;
    repo.for_each_embedding("user", &mut |_, _| {
        n += 1;
        if n % 5000 == 0 {
            std::thread::sleep(Duration::from_millis(150));
        }
    })
    .unwrap();
    assert_eq!(n, 20_000);
}

#[test]
fn progress_reports_reach_the_total_by_every_method() {
    let repo = TestRepo::new();
    let b = batch("user", 6000, 300, 0.0);
    for method in LoadMethod::ALL {
        let mut calls = Vec::new();
        repo.load_embeddings_with_progress(&b, method, &mut |done, total| {
            calls.push((done, total))
        })
        .unwrap();
        assert!(calls.len() > 1, "{method}: {calls:?}");
        assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0), "{method}");
        assert_eq!(calls.last(), Some(&(6000, 6000)), "{method}");
    }
}

#[test]
fn parallel_copy_runs_with_one_stream_when_no_connection_is_free() {
    let repo = TestRepo::with_config(|c| c.pool_size(1).max_overflow(0));
    let b = batch("user", 5000, 8, 0.0);
    repo.load_embeddings(&b, LoadMethod::ParallelCopy).unwrap();
    assert_eq!(count(&repo, "embeddings"), 5000);
    assert_eq!(staged_rows(&repo), 0);
}

#[test]
fn load_methods_parse_from_their_names() {
    for m in LoadMethod::ALL {
        assert_eq!(m.as_str().parse::<LoadMethod>().unwrap(), m);
    }
    assert_invalid("bulk".parse::<LoadMethod>());
}

/// Advisory locks held by any session on the load ids of ParallelCopy (class 1886221873).
fn load_id_locks() -> i64 {
    common::admin()
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1886221873",
            &[],
        )
        .unwrap()
        .get(0)
}

/// True once no session holds a load id's lock. Other tests' loads hold theirs for a moment
/// (the count is server-wide); a lock leaked by an idle pooled session stays for good.
fn load_id_locks_all_released() -> bool {
    let started = std::time::Instant::now();
    while load_id_locks() > 0 {
        if started.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn a_panic_in_parallel_copys_progress_callback_stops_the_streams_and_leaves_nothing_staged() {
    // With spare connections (streams on their own threads) and without (the caller's
    // connection stages every part itself).
    for (pool_size, overflow) in [(4, 2), (1, 0)] {
        let repo = TestRepo::with_config(|c| c.pool_size(pool_size).max_overflow(overflow));
        // Let the pool open its idle connections, so the streams get some.
        std::thread::sleep(Duration::from_millis(300));
        let b = batch("panicky", 40_000, 32, 1.0);
        for panic_at in [1, 20_000] {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                repo.load_embeddings_with_progress(&b, LoadMethod::ParallelCopy, &mut |done, _| {
                    if done >= panic_at {
                        panic!("progress callback bug");
                    }
                })
            }));
            assert!(outcome.is_err(), "the panic reaches the caller");
            assert_eq!(
                staged_rows(&repo),
                0,
                "pool {pool_size}, panic at {panic_at}"
            );
            assert_eq!(count(&repo, "embeddings"), 0);
        }
        // Nothing keeps a load id locked, and the repository goes on working.
        assert!(load_id_locks_all_released(), "a load id stays locked");
        repo.load_embeddings(&b, LoadMethod::ParallelCopy).unwrap();
        assert_eq!(count(&repo, "embeddings"), 40_000);
        assert_eq!(staged_rows(&repo), 0);

        // A part of the type, stored keys: staged over the streams, then merged.
        let part = batch("panicky", 10_000, 32, 2.0);
        for panic_at in [1, 5_000] {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                repo.load_embeddings_with_progress(
                    &part,
                    LoadMethod::ParallelCopy,
                    &mut |done, _| {
                        if done >= panic_at {
                            panic!("progress callback bug");
                        }
                    },
                )
            }));
            assert!(outcome.is_err(), "the panic reaches the caller");
            assert_eq!(staged_rows(&repo), 0, "pool {pool_size}, part, {panic_at}");
            let kept = repo
                .get_embeddings("panicky", "id-000000")
                .unwrap()
                .unwrap();
            assert_eq!(kept[0], 1.0, "nothing of the part was merged");
        }
        assert!(load_id_locks_all_released(), "a load id stays locked");
        repo.load_embeddings(&part, LoadMethod::ParallelCopy)
            .unwrap();
        assert_eq!(
            repo.get_embeddings("panicky", "id-000000")
                .unwrap()
                .unwrap()[0],
            2.0
        );
        assert_eq!(staged_rows(&repo), 0);
    }
}

#[test]
fn concurrent_loads_of_overlapping_keys_in_opposite_orders_never_deadlock() {
    let repo = TestRepo::with_config(|c| c.pool_size(4).max_overflow(4));
    let forward = batch("overlap", 3000, 8, 1.0);
    let mut backward = batch("overlap", 3000, 8, 2.0);
    backward.reverse();
    repo.batch_save_embeddings(&forward[..1]).unwrap();
    for method in [LoadMethod::Insert, LoadMethod::MultiRowInsert] {
        let start = Barrier::new(4);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let (repo, start) = (&repo, &start);
                    let b = if i % 2 == 0 { &forward } else { &backward };
                    s.spawn(move || {
                        start.wait();
                        repo.load_embeddings(b, method)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in &results {
            assert!(r.is_ok(), "{method:?}: {r:?}");
        }
        assert_eq!(count(&repo, "embeddings"), 3000);
    }
}

/// Rows a dead `ParallelCopy` left in staging go with the sweep once they are old; a live
/// load's rows (its session holds its load ids' locks, or an older release's session the
/// lock without the schema) and recent rows stay. Load ids come from each schema's own
/// sequence: a live load of the same id in another schema spares nothing here.
#[test]
fn staged_rows_of_dead_loads_are_swept_by_age_and_live_loads_keep_theirs() {
    let repo = common::bytea_repo();
    repo.sql()
        .batch_execute(
            "INSERT INTO embeddings_staging (load_id, entity_type, entity_id, embeddings, dimension, staged_at)
             SELECT l.id, 'user', l.tag || g, '\\x00000000', 1, now() - l.age
             FROM (VALUES (101, 'dead', interval '2 hours'), (102, 'live', interval '2 hours'),
                          (103, 'recent', interval '1 minute'), (104, 'old_release', interval '2 hours'))
                  AS l(id, tag, age),
                  generate_series(1, 5) g",
        )
        .unwrap();
    const LIVE: &str =
        "SELECT pg_advisory_lock(hashtext('pg-model-repo.staged_load.' || current_schema()), $1)";
    let mut live = repo.sql();
    live.execute(LIVE, &[&102i32]).unwrap();
    let mut older_release = common::admin();
    older_release
        .execute("SELECT pg_advisory_lock(1886221873, 104)", &[])
        .unwrap();
    let other = TestRepo::new();
    let mut elsewhere = other.sql();
    elsewhere.execute(LIVE, &[&101i32]).unwrap();
    let report = repo.optimize_database().unwrap();
    assert_eq!(report.leftovers_removed, 5, "only the dead load's rows go");
    assert_eq!(staged_rows(&repo), 15);
    // Once the live loads end (they release their locks), their old rows go too.
    live.execute(&LIVE.replace("_lock(", "_unlock("), &[&102i32])
        .unwrap();
    older_release
        .execute("SELECT pg_advisory_unlock(1886221873, 104)", &[])
        .unwrap();
    assert_eq!(repo.optimize_database().unwrap().leftovers_removed, 10);
    assert_eq!(staged_rows(&repo), 5);
}
