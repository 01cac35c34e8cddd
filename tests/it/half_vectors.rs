//! Half-size vectors (issue 27): a type declared f16 is stored as pgvector's halfvec by every
//! write path, read back widened within f16's error, indexed by HNSW up to 4,000 dimensions,
//! searched exactly and with filters; the declaration is the only way a type changes
//! precision. Built with `--features pgvector` (the tests need pgvector on the server).

use pg_model_repo::{
    Embedding, LoadMethod, Metric, RepoError, SearchFilter, VectorPrecision, VectorStorage,
};

use crate::common::{assert_invalid, bytea_repo, TestRepo};
use crate::search_filtered::brute_force;

fn repo() -> TestRepo {
    super::require_pgvector();
    TestRepo::with_config(|c| c.vector_storage(VectorStorage::Pgvector))
}

/// Values spread over f16's normal range and signs, some exactly representable.
fn rows(entity_type: &str, n: usize, dim: usize, seed: u64) -> Vec<Embedding> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|i| {
            let v = (0..dim)
                .map(|j| match j % 4 {
                    0 => rng.f32() * 2.0 - 1.0,
                    1 => (rng.f32() - 0.5) * 60_000.0,
                    2 => (rng.f32() - 0.5) * 1e-3,
                    _ => 0.5,
                })
                .collect();
            Embedding::new(entity_type, format!("e{i:05}"), v)
        })
        .collect()
}

/// f16 rounding to nearest: relative error at most 2^-11 for normal values, absolute 2^-25
/// below f16's smallest normal (2^-14).
#[track_caller]
fn assert_within_f16(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let error = (g - w).abs();
        let allowed = (w.abs() * 2f32.powi(-11)).max(2f32.powi(-25));
        assert!(error <= allowed, "value {i}: {g} for {w}");
    }
}

fn stored_as_halfvec(repo: &TestRepo, entity_type: &str) -> (i64, i64) {
    let row = repo
        .sql()
        .query_one(
            "SELECT count(*) FILTER (WHERE embeddings IS NULL AND embeddings_half IS NOT NULL),
                    count(*) FROM embeddings WHERE entity_type = $1",
            &[&entity_type],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn every_write_path_stores_a_declared_f16_type_as_halfvec_and_reads_it_back_within_f16_error() {
    let repo = repo();
    let dim = 24;
    let mut expected = std::collections::HashMap::new();
    let mut check = |entity_type: &str, written: &[Embedding]| {
        let (half, all) = stored_as_halfvec(&repo, entity_type);
        assert_eq!(
            (half, all),
            (written.len() as i64, written.len() as i64),
            "{entity_type}"
        );
        let got = repo.get_all_embeddings(entity_type).unwrap();
        for e in written {
            assert_within_f16(&got[&e.entity_id], &e.vector);
            expected.insert(
                (entity_type.to_owned(), e.entity_id.clone()),
                e.vector.clone(),
            );
        }
    };
    for (n, method) in LoadMethod::ALL.into_iter().enumerate() {
        let t = format!("load{n}");
        repo.declare_embedding_type(&t, dim, VectorPrecision::F16)
            .unwrap();
        let data = rows(&t, 300, dim, n as u64);
        repo.load_embeddings(&data, method).unwrap();
        // Upserts over the same keys replace the values (the trigger's conversion included).
        let again = rows(&t, 300, dim, 100 + n as u64);
        repo.load_embeddings(&again, method).unwrap();
        check(&t, &again);
    }
    repo.declare_embedding_type("single", dim, VectorPrecision::F16)
        .unwrap();
    let data = rows("single", 3, dim, 7);
    for e in &data {
        repo.save_embeddings("single", &e.entity_id, &e.vector)
            .unwrap();
    }
    let one = repo.get_embeddings("single", "e00001").unwrap().unwrap();
    assert_within_f16(&one, &data[1].vector);
    let many = repo
        .get_embeddings_many("single", &["e00002", "none", "e00000"])
        .unwrap();
    assert_within_f16(many[0].as_ref().unwrap(), &data[2].vector);
    assert!(many[1].is_none());
    check("single", &data);
    repo.declare_embedding_type("refresh", dim, VectorPrecision::F16)
        .unwrap();
    let data = rows("refresh", 500, dim, 8);
    repo.replace_embeddings("refresh", &data).unwrap();
    check("refresh", &data);
    let data = rows("refresh", 400, dim, 9);
    repo.replace_embeddings_iter("refresh", &mut data.clone().into_iter())
        .unwrap();
    check("refresh", &data);
    repo.declare_embedding_type("iter", dim, VectorPrecision::F16)
        .unwrap();
    let data = rows("iter", 2500, dim, 10);
    repo.load_embeddings_iter(&mut data.clone().into_iter(), LoadMethod::Copy)
        .unwrap();
    check("iter", &data);
}

#[test]
fn precision_never_changes_silently() {
    let repo = repo();
    // An undeclared type is f32, exactly.
    let v = [0.1f32, 1e-7, 70_000.0];
    repo.save_embeddings("plain", "p", &v).unwrap();
    assert_eq!(repo.get_embeddings("plain", "p").unwrap().unwrap(), v);
    // The same declaration again is a no-op; another one while the type has rows is Conflict.
    repo.declare_embedding_type("plain", 3, VectorPrecision::F32)
        .unwrap();
    match repo.declare_embedding_type("plain", 3, VectorPrecision::F16) {
        Err(RepoError::Conflict(_)) => {}
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(repo.get_embeddings("plain", "p").unwrap().unwrap(), v);
    // An empty type may be redeclared.
    repo.declare_embedding_type("h", 4, VectorPrecision::F32)
        .unwrap();
    repo.declare_embedding_type("h", 3, VectorPrecision::F16)
        .unwrap();
    repo.declare_embedding_type("h", 3, VectorPrecision::F16)
        .unwrap();
    // Values outside f16's range are InvalidInput naming the record; nothing is written.
    let batch = vec![
        Embedding::new("h", "ok", vec![1.0, 2.0, 65_504.0]),
        Embedding::new("other", "big", vec![1e6, 0.0, 0.0]),
        Embedding::new("h", "bad", vec![1.0, -65_520.0, 0.0]),
    ];
    for method in LoadMethod::ALL {
        match repo.load_embeddings(&batch, method) {
            Err(RepoError::InvalidInput(d)) => {
                assert!(d.to_string().contains("record 2"), "{method}: {d}");
            }
            other => panic!("{method}: expected InvalidInput, got {other:?}"),
        }
    }
    assert_invalid(repo.replace_embeddings("h", &[batch[2].clone()]));
    assert_invalid(repo.save_embeddings("h", "bad", &[1.0, 1e5, 0.0]));
    let mut iter = vec![batch[0].clone(), batch[2].clone()].into_iter();
    match repo.load_embeddings_iter(&mut iter, LoadMethod::Copy) {
        Err(RepoError::InvalidInput(d)) => assert!(d.to_string().contains("record 1"), "{d}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let mut iter = vec![batch[0].clone(), batch[2].clone()].into_iter();
    assert_invalid(repo.replace_embeddings_iter("h", &mut iter));
    assert!(repo.get_embeddings("h", "ok").unwrap().is_none());
    assert!(repo.get_embeddings("other", "big").unwrap().is_none());
    // The largest finite f16 is kept.
    repo.save_embeddings("h", "max", &[65_504.0, -65_504.0, 6e-8])
        .unwrap();
    assert_eq!(
        repo.get_embeddings("h", "max").unwrap().unwrap()[..2],
        [65_504.0, -65_504.0]
    );
    // Bad declarations.
    assert_invalid(repo.declare_embedding_type("z", 0, VectorPrecision::F16));
    assert_invalid(repo.declare_embedding_type("z", 16_001, VectorPrecision::F16));
    assert_invalid(repo.declare_embedding_type(" ", 3, VectorPrecision::F16));
    // F16 needs pgvector.
    let bytea = bytea_repo();
    assert_invalid(bytea.declare_embedding_type("h", 3, VectorPrecision::F16));
    bytea
        .declare_embedding_type("f", 3, VectorPrecision::F32)
        .unwrap();
    bytea.save_embeddings("f", "x", &[1.0, 2.0, 3.0]).unwrap();
}

#[test]
fn a_large_batch_is_checked_against_f16_range_for_its_f16_types_only() {
    // Above a million values a load asks which of its types are f16 before it scans
    // (declare::ASK_FIRST_VALUES): the same rule as a small batch's scan.
    let repo = repo();
    repo.declare_embedding_type("hbig", 512, VectorPrecision::F16)
        .unwrap();
    let mut batch: Vec<Embedding> = (0..2_100)
        .map(|i| {
            let (entity_type, value) = if i % 2 == 0 {
                ("hbig", 0.5)
            } else {
                ("fbig", 1e6)
            };
            Embedding::new(entity_type, format!("e{i:05}"), vec![value; 512])
        })
        .collect();
    batch[2_050].vector[300] = -70_000.0;
    for method in [LoadMethod::Copy, LoadMethod::MultiRowInsert] {
        match repo.load_embeddings(&batch, method) {
            Err(RepoError::InvalidInput(d)) => {
                assert!(d.to_string().contains("record 2050"), "{method}: {d}");
            }
            other => panic!("{method}: expected InvalidInput, got {other:?}"),
        }
    }
    let only_half: Vec<Embedding> = batch
        .iter()
        .filter(|e| e.entity_type == "hbig")
        .cloned()
        .collect();
    assert_invalid(repo.replace_embeddings("hbig", &only_half));
    assert!(repo.get_all_embeddings("hbig").unwrap().is_empty());
    assert!(repo.get_all_embeddings("fbig").unwrap().is_empty());
    batch[2_050].vector[300] = -65_504.0;
    repo.load_embeddings(&batch, LoadMethod::Copy).unwrap();
    assert_eq!(
        repo.get_embeddings("fbig", "e00001").unwrap().unwrap(),
        vec![1e6; 512]
    );
    assert_eq!(
        repo.get_embeddings("hbig", "e02050").unwrap().unwrap()[300],
        -65_504.0
    );
}

#[test]
fn f16_types_are_searched_exactly_with_filters_and_through_hnsw_up_to_4000_dimensions() {
    let repo = repo();
    repo.declare_embedding_type("item", 32, VectorPrecision::F16)
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(4);
    let data: Vec<Embedding> = (0..3000)
        .map(|i| {
            let v = (0..32).map(|_| rng.f32() * 2.0 - 1.0).collect();
            Embedding::new("item", format!("i{i:05}"), v)
        })
        .collect();
    repo.load_embeddings(&data, LoadMethod::Copy).unwrap();
    // Exact: against the stored (f16-rounded) values, read back.
    let stored: Vec<Embedding> = repo
        .get_all_embeddings("item")
        .unwrap()
        .into_iter()
        .map(|(id, v)| Embedding::new("item", id, v))
        .collect();
    let q = data[5].vector.clone();
    for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
        let found = repo.nearest_embeddings("item", &q, 10, metric).unwrap();
        let ids: Vec<String> = found.iter().map(|n| n.entity_id.clone()).collect();
        assert_eq!(ids, brute_force(&stored, &q, 10, metric, |_| true));
    }
    let filter = SearchFilter {
        exclude: vec!["i00005".into()],
        id_prefix: Some("i000".into()),
        ..Default::default()
    };
    let found = repo
        .nearest_embeddings_filtered("item", &q, 10, Metric::L2, &filter)
        .unwrap();
    let ids: Vec<String> = found.iter().map(|n| n.entity_id.clone()).collect();
    assert_eq!(
        ids,
        brute_force(&stored, &q, 10, Metric::L2, |id| id.starts_with("i000")
            && id != "i00005")
    );
    // HNSW on halfvec: the index is built, used, and finds the query's own row.
    repo.create_vector_index("item", Metric::L2).unwrap();
    let plan = repo
        .explain_nearest_embeddings("item", &q, 10, Metric::L2)
        .unwrap();
    assert!(plan.contains("halfvec"), "{plan}");
    let found = repo.nearest_embeddings("item", &q, 10, Metric::L2).unwrap();
    assert_eq!(found[0].entity_id, "i00005");
    let found = repo
        .nearest_embeddings_filtered("item", &q, 10, Metric::L2, &filter)
        .unwrap();
    assert_eq!(found.len(), 10);
    assert!(found
        .iter()
        .all(|n| n.entity_id.starts_with("i000") && n.entity_id != "i00005"));
    // A full refresh keeps the precision and rebuilds the index.
    repo.replace_embeddings("item", &data[..2000]).unwrap();
    assert_eq!(stored_as_halfvec(&repo, "item"), (2000, 2000));
    assert_eq!(
        repo.nearest_embeddings("item", &q, 1, Metric::L2).unwrap()[0].entity_id,
        "i00005"
    );
    // 3,000 dimensions: beyond HNSW's 2,000 for vector, within its 4,000 for halfvec.
    repo.declare_embedding_type("wide", 3000, VectorPrecision::F16)
        .unwrap();
    let wide: Vec<Embedding> = (0..200)
        .map(|i| {
            let v = (0..3000).map(|_| rng.f32() - 0.5).collect();
            Embedding::new("wide", format!("w{i}"), v)
        })
        .collect();
    repo.load_embeddings(&wide, LoadMethod::Copy).unwrap();
    repo.create_vector_index("wide", Metric::Cosine).unwrap();
    let found = repo
        .nearest_embeddings("wide", &wide[7].vector, 3, Metric::Cosine)
        .unwrap();
    assert_eq!(found[0].entity_id, "w7");
    repo.save_embeddings("wide32", "x", &vec![0.5; 3000])
        .unwrap();
    assert_invalid(repo.create_vector_index("wide32", Metric::Cosine));
}

#[test]
fn f16_storage_takes_at_most_060_of_the_f32_layouts_bytes() {
    let repo = repo();
    repo.declare_embedding_type("half", 384, VectorPrecision::F16)
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(6);
    let data: Vec<Vec<f32>> = (0..2000)
        .map(|_| (0..384).map(|_| rng.f32() - 0.5).collect())
        .collect();
    for t in ["half", "full"] {
        let batch: Vec<Embedding> = data
            .iter()
            .enumerate()
            .map(|(i, v)| Embedding::new(t, format!("e{i}"), v.clone()))
            .collect();
        repo.load_embeddings(&batch, LoadMethod::Copy).unwrap();
    }
    // On a row-based Citus cluster the rows live on the workers: Citus sums their shards (a
    // schema-based cluster's single-shard tables are not measured: the layout of a row is
    // pgvector's either way).
    if cfg!(feature = "citus")
        && std::env::var("MODEL_REPO_CITUS_MODE").is_ok_and(|m| m.trim() == "schema")
    {
        return;
    }
    let function = if cfg!(feature = "citus") {
        "citus_total_relation_size"
    } else {
        "pg_total_relation_size"
    };
    let size = |t: &str| -> i64 {
        repo.sql()
            .query_one(
                &format!(
                    "SELECT {function}(storage::regclass)::int8 FROM embedding_types
                     WHERE entity_type = $1"
                ),
                &[&t],
            )
            .unwrap()
            .get(0)
    };
    let (half, full) = (size("half"), size("full"));
    assert!(
        (half as f64) <= 0.6 * full as f64,
        "halfvec {half} bytes, vector {full} bytes"
    );
}

/// `value(r, i)` of tests/it/python_storages.py, in the same f32 arithmetic.
fn python_value(r: usize, i: usize) -> f32 {
    ((r * 7 + i) % 13) as f32 * 0.1f32 - 0.6f32
}

fn python_row(r: usize) -> Vec<f32> {
    (0..16).map(|i| python_value(r, i)).collect()
}

fn run_python_storages(mode: &str, schema: &str, storage: &str, entity_type: &str) -> bool {
    let probe = std::process::Command::new(crate::common::python())
        .args(["-c", "import psycopg, numpy, pgvector"])
        .output();
    if !probe.is_ok_and(|p| p.status.success()) {
        eprintln!(
            "half_vectors: python storage cross-check NOT RUN (python3 cannot import psycopg, \
             numpy and pgvector); to run it: pip install 'psycopg[binary]' numpy pgvector"
        );
        return false;
    }
    let output = std::process::Command::new(crate::common::python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/it/python_storages.py"
        ))
        .args([
            mode,
            &crate::common::server_url(),
            schema,
            storage,
            entity_type,
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "python_storages.py {mode} {storage}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    true
}

#[test]
fn python_reads_and_writes_every_storage_and_the_library_reads_it_back() {
    let pgvector = repo();
    pgvector
        .declare_embedding_type("half", 16, VectorPrecision::F16)
        .unwrap();
    let bytea = bytea_repo();
    for (repo, storage, entity_type) in [
        (&pgvector, "vector", "full"),
        (&pgvector, "halfvec", "half"),
        (&bytea, "bytea", "raw"),
    ] {
        let rows: Vec<Embedding> = (0..5)
            .map(|r| Embedding::new(entity_type, format!("r{r}"), python_row(r)))
            .collect();
        repo.load_embeddings(&rows, LoadMethod::Copy).unwrap();
        if !run_python_storages("read", &repo.schema, storage, entity_type) {
            return;
        }
        run_python_storages("write", &repo.schema, storage, entity_type);
        for r in 0..5 {
            let got = repo
                .get_embeddings(entity_type, &format!("p{r}"))
                .unwrap()
                .unwrap();
            if storage == "halfvec" {
                assert_within_f16(&got, &python_row(r));
            } else {
                assert_eq!(got, python_row(r), "{storage}");
            }
        }
        // Python's upsert over rows of the type replaces them.
        run_python_storages("write", &repo.schema, storage, entity_type);
        assert_eq!(stored_count(repo, entity_type), 10);
    }
}

fn stored_count(repo: &TestRepo, entity_type: &str) -> i64 {
    repo.sql()
        .query_one(
            "SELECT count(*) FROM embeddings WHERE entity_type = $1",
            &[&entity_type],
        )
        .unwrap()
        .get(0)
}
