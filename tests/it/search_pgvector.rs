//! pgvector: vectors in its `vector` type (new schemas, and BYTEA schemas converted on
//! request), the extension in a schema of its own, every embeddings method the same on both
//! storages, and HNSW indexes. Built with `--features pgvector`; every test fails (never
//! skips) when the test server has no pgvector, with the command that installs it.

use std::collections::HashMap;

use pg_model_repo::{Embedding, LoadMethod, Metric, ModelRepository, RepoError, VectorStorage};

use crate::common::{self, assert_invalid, count, TestRepo};

/// Half-size vectors (types declared f16), run with the rest of this module.
#[path = "half_vectors.rs"]
mod half_vectors;
use crate::search::{assert_neighbors, plane, plane_answers, search_during_writes};

/// Fails the test unless the server can run pgvector.
fn require_pgvector() {
    let available: bool = common::admin()
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        available,
        "the test server has no pgvector extension: install it with \
         `bash ../shared/tools/install-pg-extensions.sh pgvector` (as root), then run the \
         tests again"
    );
}

/// A repository that stores vectors in pgvector's type.
fn pgvector_repo() -> TestRepo {
    require_pgvector();
    TestRepo::with_config(|c| c.vector_storage(VectorStorage::Pgvector))
}

fn column_type(repo: &TestRepo, table: &str) -> String {
    repo.sql()
        .query_one(
            "SELECT t.typname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = $1::text::regclass AND a.attname = 'embeddings'",
            &[&table],
        )
        .unwrap()
        .get(0)
}

fn extension_schema() -> String {
    common::admin()
        .query_one(
            "SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
             WHERE e.extname = 'vector'",
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_new_schema_stores_vectors_in_pgvectors_type_with_the_extension_in_its_own_schema() {
    require_pgvector();
    let repo = TestRepo::with_config(|c| c.vector_storage(VectorStorage::Auto));
    repo.save_embeddings("user", "u1", &[1.0, -2.5, 3.25])
        .unwrap();
    assert_eq!(column_type(&repo, "embeddings"), "vector");
    assert_eq!(column_type(&repo, "embeddings_staging"), "vector");
    let schema = extension_schema();
    assert_ne!(
        schema, repo.schema,
        "the extension must not live in a repository's schema"
    );
    // What other clients see: a vector, with the dimension CHECKed by the database.
    let mut sql = repo.sql();
    sql.batch_execute(&format!(
        "SET search_path TO \"{}\", \"{schema}\"",
        repo.schema
    ))
    .unwrap();
    let text: String = sql
        .query_one(
            "SELECT embeddings::text FROM embeddings WHERE entity_id = 'u1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(text, "[1,-2.5,3.25]");
    let insert = "INSERT INTO embeddings (entity_type, entity_id, embeddings, dimension)
                  VALUES ('user', $1, $2::text::vector, $3)";
    for (bad, dim) in [("[1,2]", 2), ("[1,2]", 3)] {
        let err = sql.execute(insert, &[&"x", &bad, &dim]).unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("23514"), "{err}");
    }
    sql.execute(insert, &[&"x", &"[4,5,6]", &3i32]).unwrap();
    assert_eq!(
        repo.get_embeddings("user", "x").unwrap(),
        Some(vec![4.0, 5.0, 6.0])
    );
    // A type first written by another client is adopted with its dimension.
    sql.execute(
        "INSERT INTO embeddings (entity_type, entity_id, embeddings, dimension)
         VALUES ('legacy', 'l1', '[0.5,1.5]', 2)",
        &[],
    )
    .unwrap();
    assert!(matches!(
        repo.save_embeddings("legacy", "l2", &[1.0; 3]),
        Err(RepoError::DimensionMismatch { expected: 2, .. })
    ));
    assert_eq!(
        repo.get_embeddings("legacy", "l1").unwrap(),
        Some(vec![0.5, 1.5])
    );
}

#[test]
fn vector_storage_bytea_keeps_bytea_where_pgvector_is_available() {
    require_pgvector();
    let repo = common::bytea_repo();
    repo.save_embeddings("user", "u1", &[1.0, 2.0]).unwrap();
    assert_eq!(column_type(&repo, "embeddings"), "bytea");
}

/// Everything a caller can observe, for one storage.
fn observe(repo: &ModelRepository) -> Vec<String> {
    let mut seen = Vec::new();
    let dim = 24;
    let rows = |t: &str, n: usize, seed: f32| -> Vec<Embedding> {
        (0..n)
            .map(|i| {
                let v = (0..dim)
                    .map(|j| seed + (i * dim + j) as f32 * 0.37 - 40.0 + 1e-40)
                    .collect();
                Embedding::new(t, format!("{t}{i:05}"), v)
            })
            .collect()
    };
    repo.save_embeddings("one", "a", &[f32::MIN_POSITIVE, -0.0, 1e30, -3.5])
        .unwrap();
    seen.push(format!("{:?}", repo.get_embeddings("one", "a").unwrap()));
    for (i, method) in LoadMethod::ALL.into_iter().enumerate() {
        let t = format!("m{i}");
        let report = repo
            .load_embeddings(&rows(&t, 3000, i as f32), method)
            .unwrap();
        seen.push(format!(
            "{method}: {} rows {} bytes",
            report.rows, report.bytes
        ));
        // Reloads change every vector.
        repo.load_embeddings(&rows(&t, 3000, 100.0 + i as f32), method)
            .unwrap();
    }
    repo.batch_save_embeddings(&rows("batch", 50, 3.0)).unwrap();
    repo.replace_embeddings("m0", &rows("m0", 700, 7.0))
        .unwrap();
    let mut iter = rows("m1", 900, 8.0).into_iter();
    repo.replace_embeddings_iter("m1", &mut iter).unwrap();
    repo.drop_embedding_type("m2").unwrap();
    for t in ["one", "m0", "m1", "m2", "m3", "batch"] {
        let all: std::collections::BTreeMap<String, Vec<u32>> = repo
            .get_all_embeddings(t)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.iter().map(|x| x.to_bits()).collect()))
            .collect();
        seen.push(format!("{t}: {all:?}"));
        let mut streamed = 0;
        repo.for_each_embedding(t, &mut |_, v| {
            assert_eq!(v.len(), if t == "one" { 4 } else { dim });
            streamed += 1;
        })
        .unwrap();
        seen.push(format!("{t}: {streamed} streamed"));
    }
    seen.push(format!(
        "{:?}",
        repo.get_embeddings_many("m3", &["m300002", "nope", "m302999"])
            .unwrap()
    ));
    let stats = repo.get_embeddings_stats().unwrap();
    for t in stats.entity_types {
        seen.push(format!(
            "{} {} {} {}",
            t.entity_type, t.count, t.dimension, t.total_bytes
        ));
    }
    let q: Vec<Vec<f32>> = (0..5).map(|i| vec![i as f32 - 2.5; dim]).collect();
    for metric in Metric::ALL {
        seen.push(format!(
            "{:?}",
            repo.nearest_embeddings_many("m3", &q, 7, metric).unwrap()
        ));
    }
    assert!(matches!(
        repo.save_embeddings("batch", "x", &[1.0; 5]),
        Err(RepoError::DimensionMismatch {
            expected: 24,
            actual: 5,
            ..
        })
    ));
    seen
}

#[test]
fn every_embeddings_method_behaves_the_same_on_both_storages() {
    let vector = pgvector_repo();
    let bytea = common::bytea_repo();
    assert_eq!(column_type(&vector, "embeddings"), "vector");
    assert_eq!(column_type(&bytea, "embeddings"), "bytea");
    let (a, b) = (observe(&vector), observe(&bytea));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y);
    }
    // pgvector's own limit is checked before any I/O.
    assert_invalid(vector.save_embeddings("huge", "h", &vec![1.0; 16_001]));
    assert_invalid(vector.batch_save_embeddings(&[Embedding::new("huge", "h", vec![1.0; 16_001])]));
}

#[test]
fn the_exact_search_answers_the_same_on_pgvector_storage() {
    let repo = pgvector_repo();
    plane(&repo);
    for metric in Metric::ALL {
        let got = repo
            .nearest_embeddings("pt", &[1.0, 0.0], 6, metric)
            .unwrap();
        assert_neighbors(&got, &plane_answers(metric));
    }
    search_during_writes(&repo);
}

#[test]
fn dropping_one_repositorys_schema_leaves_another_repositorys_vectors_alone() {
    let doomed = pgvector_repo();
    let survivor = pgvector_repo();
    doomed.save_embeddings("user", "d", &[1.0, 2.0]).unwrap();
    let batch: Vec<Embedding> = (0..500)
        .map(|i| Embedding::new("item", format!("i{i}"), vec![i as f32, 0.5]))
        .collect();
    survivor.batch_save_embeddings(&batch).unwrap();
    let schema = doomed.schema.clone();
    drop(doomed);
    let gone: bool = common::admin()
        .query_one("SELECT to_regnamespace($1) IS NULL", &[&schema])
        .unwrap()
        .get(0);
    assert!(gone, "the schema was dropped with CASCADE");
    assert_eq!(column_type(&survivor, "embeddings"), "vector");
    let all = survivor.get_all_embeddings("item").unwrap();
    assert_eq!(all.len(), 500);
    assert_eq!(all["i42"], vec![42.0, 0.5]);
    survivor
        .save_embeddings("item", "new", &[1.0, 1.0])
        .unwrap();
    assert_eq!(count(&survivor, "embeddings"), 501);
}

/// A BYTEA schema with vectors stays BYTEA under `Auto`, and converts, rows and all, when its
/// owner asks; a repository opened before the conversion keeps working after it.
#[test]
fn a_bytea_schema_with_vectors_converts_to_pgvector_only_when_asked() {
    require_pgvector();
    let repo = common::bytea_repo();
    let config = || common::config(&repo.schema);
    let mut rng = fastrand::Rng::with_seed(9);
    let mut expected: HashMap<String, HashMap<String, Vec<u32>>> = HashMap::new();
    for (t, dim, n) in [("user", 64, 5000), ("item", 3, 10), ("tiny", 1, 1)] {
        let batch: Vec<Embedding> = (0..n)
            .map(|i| {
                let v: Vec<f32> = (0..dim)
                    .map(|_| match rng.u8(0..6) {
                        0 => f32::MIN_POSITIVE / 8.0, // subnormal
                        1 => -f32::MAX,
                        2 => -0.0,
                        _ => (rng.f32() - 0.5) * 1e6,
                    })
                    .collect();
                Embedding::new(t, format!("{t}{i}"), v)
            })
            .collect();
        repo.batch_save_embeddings(&batch).unwrap();
        expected.insert(
            t.to_owned(),
            batch
                .iter()
                .map(|e| {
                    (
                        e.entity_id.clone(),
                        e.vector.iter().map(|x| x.to_bits()).collect(),
                    )
                })
                .collect(),
        );
    }
    let before = repo
        .nearest_embeddings("item", &[1.0, 2.0, 3.0], 10, Metric::Cosine)
        .unwrap();
    // Auto never rewrites a schema that has vectors.
    ModelRepository::open(config().vector_storage(VectorStorage::Auto))
        .unwrap()
        .close();
    assert_eq!(column_type(&repo, "embeddings"), "bytea");
    // The owner asks.
    ModelRepository::migrate(&config().vector_storage(VectorStorage::Pgvector)).unwrap();
    assert_eq!(column_type(&repo, "embeddings"), "vector");
    let converted = ModelRepository::open(config()).unwrap();
    for (t, rows) in &expected {
        let all = converted.get_all_embeddings(t).unwrap();
        assert_eq!(all.len(), rows.len());
        for (id, bits) in rows {
            let got: Vec<u32> = all[id].iter().map(|x| x.to_bits()).collect();
            assert_eq!(&got, bits, "{t} {id}");
        }
    }
    assert_eq!(
        converted
            .nearest_embeddings("item", &[1.0, 2.0, 3.0], 10, Metric::Cosine)
            .unwrap(),
        before
    );
    // The database enforces every type's dimension in vector terms.
    let err = repo
        .sql()
        .execute(
            &format!(
                "INSERT INTO embeddings (entity_type, entity_id, embeddings, dimension)
                 VALUES ('item', 'bad', $1::real[]::\"{}\".vector, 3)",
                extension_schema()
            ),
            &[&vec![1.0f32, 2.0]],
        )
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("23514"), "{err}");
    // The repository opened before the conversion still believes BYTEA: its calls notice
    // and carry on.
    repo.save_embeddings("item", "after", &[7.0, 8.0, 9.0])
        .unwrap();
    repo.batch_save_embeddings(&[Embedding::new("user", "after", vec![0.5; 64])])
        .unwrap();
    assert_eq!(
        repo.get_embeddings("item", "after").unwrap(),
        Some(vec![7.0, 8.0, 9.0])
    );
    assert_eq!(repo.get_all_embeddings("user").unwrap().len(), 5001);
    // Converting again is a no-op; Bytea cannot turn it back.
    ModelRepository::migrate(&config().vector_storage(VectorStorage::Pgvector)).unwrap();
    ModelRepository::open(config().vector_storage(VectorStorage::Bytea))
        .unwrap()
        .close();
    assert_eq!(column_type(&repo, "embeddings"), "vector");
}

#[test]
fn pgvector_storage_without_auto_migrate_refuses_a_bytea_schema() {
    require_pgvector();
    let repo = common::bytea_repo();
    let refused = ModelRepository::open(
        common::config(&repo.schema)
            .vector_storage(VectorStorage::Pgvector)
            .auto_migrate(false),
    );
    assert_invalid(refused);
}

/// Clustered vectors: `clusters` centres, `per` points around each.
fn clustered(
    entity_type: &str,
    clusters: usize,
    per: usize,
    dim: usize,
    seed: u64,
) -> Vec<Embedding> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let centres: Vec<Vec<f32>> = (0..clusters)
        .map(|_| (0..dim).map(|_| rng.f32() * 10.0 - 5.0).collect())
        .collect();
    (0..clusters * per)
        .map(|i| {
            let c = &centres[i % clusters];
            let v = c.iter().map(|x| x + (rng.f32() - 0.5) * 0.8).collect();
            Embedding::new(entity_type, format!("{entity_type}{i:06}"), v)
        })
        .collect()
}

fn hnsw_indexes(repo: &TestRepo, entity_type: &str) -> Vec<String> {
    // Catalog rows only (no pg_indexes, whose functions would meet other tests' dropped
    // tables): the library names them <storage>_hnsw_<metric>.
    repo.sql()
        .query(
            "SELECT c.relname::text FROM pg_class c
             JOIN embedding_types r ON c.relname::text LIKE r.storage || '\\_hnsw\\_%'
             WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'i'
               AND r.entity_type = $1 ORDER BY 1",
            &[&entity_type],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
#[cfg_attr(
    feature = "citus",
    ignore = "reads the plan and the index's scan count on the coordinator; on a cluster each \
              shard holds a few hundred rows, which its planner sorts instead of scanning HNSW"
)]
fn an_hnsw_index_serves_its_metric_and_explain_shows_it() {
    let repo = pgvector_repo();
    // Enough rows that the planner prefers the index to sorting a scan.
    let data = clustered("item", 20, 1000, 16, 1);
    repo.batch_save_embeddings(&data).unwrap();
    let q = data[123].vector.clone();
    let exact = repo.nearest_embeddings("item", &q, 10, Metric::L2).unwrap();
    assert!(repo
        .explain_nearest_embeddings("item", &q, 10, Metric::L2)
        .unwrap()
        .starts_with("exact search"));
    repo.create_vector_index("item", Metric::L2).unwrap();
    // Again: harmless.
    repo.create_vector_index("item", Metric::L2).unwrap();
    assert_eq!(hnsw_indexes(&repo, "item").len(), 1);
    let plan = repo
        .explain_nearest_embeddings("item", &q, 10, Metric::L2)
        .unwrap();
    assert!(
        plan.contains("Index Scan using") && plan.contains("_hnsw_l2"),
        "{plan}"
    );
    // Other metrics stay exact.
    assert!(repo
        .explain_nearest_embeddings("item", &q, 10, Metric::Cosine)
        .unwrap()
        .starts_with("exact search"));
    // The library's own searches scan the index.
    let scans = || -> i64 {
        repo.sql()
            .query_one(
                "WITH mine AS MATERIALIZED (
                     SELECT c.oid FROM pg_class c
                     WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'i'
                       AND c.relname::text LIKE '%hnsw%')
                 SELECT coalesce(sum(pg_stat_get_numscans(oid)), 0)::int8 FROM mine",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let before = scans();
    let approx = repo.nearest_embeddings("item", &q, 10, Metric::L2).unwrap();
    let mut after = scans();
    for _ in 0..200 {
        if after > before {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        after = scans();
    }
    assert!(
        after > before,
        "the HNSW index was not scanned ({before} -> {after})"
    );
    // On well separated clusters the approximate answer is the exact one.
    assert_eq!(approx[0].entity_id, "item000123");
    assert_eq!(approx[0].distance, 0.0);
    let ids = |n: &[pg_model_repo::Neighbor]| -> Vec<String> {
        n.iter().map(|x| x.entity_id.clone()).collect()
    };
    assert_eq!(ids(&approx), ids(&exact));
    // Many queries through the index, in the caller's order.
    let queries: Vec<Vec<f32>> = (0..5).map(|i| data[i * 97].vector.clone()).collect();
    let many = repo
        .nearest_embeddings_many("item", &queries, 3, Metric::L2)
        .unwrap();
    for (i, answer) in many.iter().enumerate() {
        assert_eq!(answer[0].entity_id, data[i * 97].entity_id);
        assert!(answer.windows(2).all(|w| w[0].distance <= w[1].distance));
    }
    // A query of another length is still a mismatch.
    assert!(matches!(
        repo.nearest_embeddings("item", &[1.0; 3], 5, Metric::L2),
        Err(RepoError::DimensionMismatch {
            expected: 16,
            actual: 3,
            ..
        })
    ));
}

#[test]
fn indexed_searches_match_hand_computed_distances_for_every_metric() {
    let repo = pgvector_repo();
    plane(&repo);
    for metric in Metric::ALL {
        repo.create_vector_index("pt", metric).unwrap();
    }
    assert_eq!(hnsw_indexes(&repo, "pt").len(), 3);
    for metric in Metric::ALL {
        // Six rows: the planner may sort a scan rather than walk the graph; either way the
        // search runs in SQL with pgvector's distances.
        let plan = repo
            .explain_nearest_embeddings("pt", &[1.0, 0.0], 6, metric)
            .unwrap();
        assert!(!plan.starts_with("exact search"), "{plan}");
        let got = repo
            .nearest_embeddings("pt", &[1.0, 0.0], 6, metric)
            .unwrap();
        assert_neighbors(&got, &plane_answers(metric));
    }
}

#[test]
fn a_full_refresh_rebuilds_the_types_indexes_and_a_drop_forgets_them() {
    let repo = pgvector_repo();
    repo.batch_save_embeddings(&clustered("doc", 5, 400, 8, 2))
        .unwrap();
    repo.create_vector_index("doc", Metric::Cosine).unwrap();
    let old = hnsw_indexes(&repo, "doc");
    repo.replace_embeddings("doc", &clustered("doc", 5, 2000, 12, 3))
        .unwrap();
    let new = hnsw_indexes(&repo, "doc");
    assert_eq!(new.len(), 1);
    assert_ne!(new, old, "the index lives on the new storage");
    let q = vec![1.0; 12];
    let plan = repo
        .explain_nearest_embeddings("doc", &q, 5, Metric::Cosine)
        .unwrap();
    // (On a Citus cluster each shard's few hundred rows are sorted, not searched by HNSW.)
    if !cfg!(feature = "citus") {
        assert!(plan.contains("_hnsw_cosine"), "{plan}");
    }
    assert_eq!(
        repo.nearest_embeddings("doc", &q, 5, Metric::Cosine)
            .unwrap()
            .len(),
        5
    );
    // The iterator form too.
    let mut rows = clustered("doc", 5, 2000, 12, 4).into_iter();
    repo.replace_embeddings_iter("doc", &mut rows).unwrap();
    let newer = hnsw_indexes(&repo, "doc");
    assert_eq!(newer.len(), 1);
    assert_ne!(newer, new);
    repo.drop_embedding_type("doc").unwrap();
    let recorded: i64 = repo
        .sql()
        .query_one("SELECT count(*) FROM embedding_vector_indexes", &[])
        .unwrap()
        .get(0);
    assert_eq!(recorded, 0);
    // A new type of that name starts without one.
    repo.save_embeddings("doc", "d", &[1.0, 2.0]).unwrap();
    assert!(repo
        .explain_nearest_embeddings("doc", &[1.0, 2.0], 1, Metric::Cosine)
        .unwrap()
        .starts_with("exact search"));
}

#[test]
fn bad_index_requests_are_refused() {
    let repo = pgvector_repo();
    assert!(matches!(
        repo.create_vector_index("nobody", Metric::L2),
        Err(RepoError::NotFound(_))
    ));
    assert_invalid(repo.create_vector_index("", Metric::L2));
    repo.save_embeddings("wide", "w", &vec![0.5; 2001]).unwrap();
    assert_invalid(repo.create_vector_index("wide", Metric::L2));
    assert!(hnsw_indexes(&repo, "wide").is_empty());
}

/// An HNSW scan yields at most ef_search rows: a larger k asks for more candidates (and past
/// 1000, an iterative scan), so k results still come back.
#[test]
fn k_beyond_ef_search_still_returns_k_neighbours() {
    require_pgvector();
    let repo =
        TestRepo::with_config(|c| c.vector_storage(VectorStorage::Pgvector).hnsw_ef_search(20));
    repo.batch_save_embeddings(&clustered("many", 10, 150, 4, 5))
        .unwrap();
    repo.create_vector_index("many", Metric::InnerProduct)
        .unwrap();
    for k in [5, 120, 1200] {
        let got = repo
            .nearest_embeddings("many", &[1.0, 0.5, -0.5, 2.0], k, Metric::InnerProduct)
            .unwrap();
        assert_eq!(got.len(), k);
        assert!(got.windows(2).all(|w| w[0].distance <= w[1].distance));
    }
}

/// The ids of an answer.
fn answer_ids(found: &[pg_model_repo::Neighbor]) -> Vec<String> {
    found.iter().map(|n| n.entity_id.clone()).collect()
}

#[test]
fn indexed_filtered_searches_return_k_whenever_k_rows_pass() {
    use crate::search_filtered::{brute_force, random_rows};
    use pg_model_repo::SearchFilter;
    let repo = pgvector_repo();
    // 10 of 10,000 rows have the prefix: the filter removes 99.9% of the type.
    let rows = random_rows(10_000, 16, 1000, 5);
    repo.batch_save_embeddings(&rows).unwrap();
    repo.create_vector_index("item", Metric::L2).unwrap();
    let q = rows[17].vector.clone();
    let prefix = SearchFilter {
        id_prefix: Some("keep".into()),
        ..Default::default()
    };
    for k in [5, 10, 20] {
        let found = repo
            .nearest_embeddings_filtered("item", &q, k, Metric::L2, &prefix)
            .unwrap();
        assert_eq!(found.len(), k.min(10), "k={k}");
        let expected = brute_force(&rows, &q, k, Metric::L2, |id| id.starts_with("keep"));
        assert_eq!(answer_ids(&found), expected);
    }
    // Excluding the top hit returns the next one.
    let top = repo.nearest_embeddings("item", &q, 2, Metric::L2).unwrap();
    let without_top = SearchFilter {
        exclude: vec![top[0].entity_id.clone()],
        ..Default::default()
    };
    let found = repo
        .nearest_embeddings_filtered("item", &q, 1, Metric::L2, &without_top)
        .unwrap();
    assert_eq!(found[0].entity_id, top[1].entity_id);
    // A large candidate set goes through the index: 5,000 candidates, every query answers k
    // and most of the true neighbours.
    let mut among: Vec<String> = rows
        .iter()
        .step_by(2)
        .map(|e| e.entity_id.clone())
        .collect();
    among.sort();
    let candidates = SearchFilter {
        among: Some(among.clone()),
        ..Default::default()
    };
    let queries: Vec<Vec<f32>> = rows
        .iter()
        .skip(1)
        .step_by(500)
        .map(|e| e.vector.clone())
        .collect();
    let answers = repo
        .nearest_embeddings_filtered_many("item", &queries, 10, Metric::L2, &candidates)
        .unwrap();
    let (mut hits, mut total) = (0, 0);
    for (q, found) in queries.iter().zip(&answers) {
        assert_eq!(found.len(), 10);
        let expected = brute_force(&rows, q, 10, Metric::L2, |id| {
            among.binary_search(&id.to_owned()).is_ok()
        });
        hits += found
            .iter()
            .filter(|n| expected.contains(&n.entity_id))
            .count();
        total += 10;
        assert!(found
            .iter()
            .all(|n| among.binary_search(&n.entity_id).is_ok()));
    }
    assert!(hits * 10 >= total * 9, "recall {hits}/{total}");
    // A small candidate set is exact (the planner fetches it by key and sorts it).
    let few = SearchFilter {
        among: Some(among[..50].to_vec()),
        ..Default::default()
    };
    let found = repo
        .nearest_embeddings_filtered("item", &q, 10, Metric::L2, &few)
        .unwrap();
    let expected = brute_force(&rows, &q, 10, Metric::L2, |id| {
        among[..50].iter().any(|a| a == id)
    });
    assert_eq!(answer_ids(&found), expected);
}

#[test]
fn the_exact_search_finds_the_nearest_neighbour_among_large_values_in_vector_storage() {
    crate::search_filtered::exact_with_large_values(&pgvector_repo());
}

/// Issue 27's fault: the index build held writers of its type off for the whole build. Writes
/// go on while the build runs, each within 1 s (the repository's query timeout is 2 s); the
/// blocking build failed the first write after it started.
#[test]
fn an_index_build_does_not_block_writers_of_its_type() {
    require_pgvector();
    let repo = TestRepo::with_config(|c| {
        c.vector_storage(VectorStorage::Pgvector)
            .query_timeout(std::time::Duration::from_secs(2))
    });
    let data = clustered("item", 50, 600, 64, 9);
    repo.load_embeddings(&data, LoadMethod::Copy).unwrap();
    let building = std::sync::atomic::AtomicBool::new(true);
    let (mut during, mut seen_building) = (0, false);
    std::thread::scope(|scope| {
        let build = scope.spawn(|| {
            let built = repo.create_vector_index("item", Metric::L2);
            building.store(false, std::sync::atomic::Ordering::SeqCst);
            built
        });
        let mut sql = repo.sql();
        let started = std::time::Instant::now();
        let mut n = 0;
        while building.load(std::sync::atomic::Ordering::SeqCst) {
            // The build is under way once its index exists in the catalog (on a cluster,
            // the workers build the shards' indexes: the coordinator has no progress row).
            seen_building |= sql
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname LIKE 'embeddings\\_%\\_hnsw\\_l2' \
                     AND relnamespace = current_schema()::regnamespace)",
                    &[],
                )
                .unwrap()
                .get::<_, bool>(0);
            let t = std::time::Instant::now();
            repo.save_embeddings("item", &format!("new{n}"), &[0.5; 64])
                .unwrap();
            assert!(
                t.elapsed() < std::time::Duration::from_secs(1),
                "{:?}",
                t.elapsed()
            );
            n += 1;
            if seen_building && building.load(std::sync::atomic::Ordering::SeqCst) {
                during += 1;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(started.elapsed() < std::time::Duration::from_secs(300));
        }
        build.join().unwrap().unwrap();
    });
    assert!(
        during > 0,
        "the build ended before any write was tried during it"
    );
    // The index serves searches and holds the rows written meanwhile.
    if !cfg!(feature = "citus") {
        assert!(repo
            .explain_nearest_embeddings("item", &[0.5; 64], 5, Metric::L2)
            .unwrap()
            .contains("hnsw"));
    }
    let found = repo
        .nearest_embeddings("item", &[0.5; 64], 1, Metric::L2)
        .unwrap();
    assert!(found[0].entity_id.starts_with("new"), "{found:?}");
}
