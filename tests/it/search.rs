//! Similarity search without an index: exact answers for every metric against hand-computed
//! distances, ordering and ties, every bad input, unknown types, and searches while other
//! threads write. These run on every server (the exact search needs no pgvector); the
//! pgvector-only tests are in `search_pgvector`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pg_model_repo::{Embedding, Metric, ModelRepository, Neighbor, RepoError};

use crate::common::{assert_invalid, TestRepo};

/// The repository these tests search: BYTEA storage, whatever the server has.
pub fn repo() -> TestRepo {
    crate::common::bytea_repo()
}

/// Six points in the plane, chosen so that each metric has ties.
pub fn plane(repo: &ModelRepository) {
    let points: [(&str, [f32; 2]); 6] = [
        ("a", [1.0, 0.0]),
        ("b", [0.0, 1.0]),
        ("c", [1.0, 1.0]),
        ("d", [-1.0, 0.0]),
        ("e", [3.0, 4.0]),
        ("f", [1.0, -1.0]),
    ];
    let batch: Vec<Embedding> = points
        .iter()
        .map(|(id, v)| Embedding::new("pt", *id, v.to_vec()))
        .collect();
    repo.batch_save_embeddings(&batch).unwrap();
}

#[track_caller]
pub fn assert_neighbors(got: &[Neighbor], expected: &[(&str, f64)]) {
    let shown: Vec<(&str, f32)> = got
        .iter()
        .map(|n| (n.entity_id.as_str(), n.distance))
        .collect();
    assert_eq!(got.len(), expected.len(), "{shown:?}");
    for (n, (id, d)) in got.iter().zip(expected) {
        assert_eq!(n.entity_id, *id, "{shown:?}");
        assert!(
            (f64::from(n.distance) - d).abs() < 1e-6,
            "{id}: {} instead of {d} in {shown:?}",
            n.distance
        );
    }
}

/// The hand-computed answers for the query (1, 0) over [`plane`], all six, closest first.
pub fn plane_answers(metric: Metric) -> Vec<(&'static str, f64)> {
    let r2 = 2f64.sqrt();
    match metric {
        // |q - x|: a 0, c 1, f 1, b sqrt 2, d 2, e sqrt 20.
        Metric::L2 => vec![
            ("a", 0.0),
            ("c", 1.0),
            ("f", 1.0),
            ("b", r2),
            ("d", 2.0),
            ("e", 20f64.sqrt()),
        ],
        // 1 - q.x / (|q| |x|): a 0, c and f 1 - 1/sqrt 2, e 1 - 3/5, b 1, d 2.
        Metric::Cosine => vec![
            ("a", 0.0),
            ("c", 1.0 - 1.0 / r2),
            ("f", 1.0 - 1.0 / r2),
            ("e", 0.4),
            ("b", 1.0),
            ("d", 2.0),
        ],
        // -q.x: e -3, a c f -1, b 0, d 1.
        Metric::InnerProduct => vec![
            ("e", -3.0),
            ("a", -1.0),
            ("c", -1.0),
            ("f", -1.0),
            ("b", 0.0),
            ("d", 1.0),
        ],
    }
}

#[test]
fn every_metric_matches_hand_computed_distances_with_ties_by_entity_id() {
    let repo = repo();
    plane(&repo);
    for metric in Metric::ALL {
        let expected = plane_answers(metric);
        let all = repo
            .nearest_embeddings("pt", &[1.0, 0.0], 10, metric)
            .unwrap();
        assert_neighbors(&all, &expected);
        // k cuts the same order short, ties included.
        let three = repo
            .nearest_embeddings("pt", &[1.0, 0.0], 3, metric)
            .unwrap();
        assert_neighbors(&three, &expected[..3]);
    }
    // The query's scale does not matter to Cosine; it does to the others.
    let scaled = repo
        .nearest_embeddings("pt", &[7.0, 0.0], 6, Metric::Cosine)
        .unwrap();
    assert_neighbors(&scaled, &plane_answers(Metric::Cosine));
    let near_e = repo
        .nearest_embeddings("pt", &[3.0, 3.0], 2, Metric::L2)
        .unwrap();
    assert_neighbors(&near_e, &[("e", 1.0), ("c", 8f64.sqrt())]);
}

#[test]
fn many_queries_are_answered_in_the_callers_order() {
    let repo = repo();
    plane(&repo);
    let queries = vec![
        vec![1.0, 0.0],
        vec![0.0, 1.0],
        vec![1.0, 0.0],
        vec![-2.0, 0.0],
    ];
    for metric in Metric::ALL {
        let answers = repo
            .nearest_embeddings_many("pt", &queries, 6, metric)
            .unwrap();
        assert_eq!(answers.len(), 4);
        for (q, answer) in queries.iter().zip(&answers) {
            assert_eq!(
                answer,
                &repo.nearest_embeddings("pt", q, 6, metric).unwrap(),
                "{metric:?} {q:?}"
            );
        }
        assert_neighbors(&answers[0], &plane_answers(metric));
    }
    let b_first = repo
        .nearest_embeddings_many("pt", &queries, 1, Metric::L2)
        .unwrap();
    let firsts: Vec<&str> = b_first.iter().map(|a| a[0].entity_id.as_str()).collect();
    assert_eq!(firsts, ["a", "b", "a", "d"]);
    assert!(repo
        .nearest_embeddings_many("pt", &[], 5, Metric::L2)
        .unwrap()
        .is_empty());
}

/// Thousands of equal vectors across several streamed blocks: the smallest ids win.
#[test]
fn ties_across_blocks_go_to_the_smallest_entity_ids() {
    let repo = repo();
    let mut batch: Vec<Embedding> = (0..12_000)
        .map(|i| {
            Embedding::new(
                "same",
                format!("id{:05}", (i * 7919) % 12_000),
                vec![0.5; 128],
            )
        })
        .collect();
    batch.push(Embedding::new("same", "zz-closest", vec![0.25; 128]));
    repo.batch_save_embeddings(&batch).unwrap();
    let got = repo
        .nearest_embeddings("same", &[0.2; 128], 4, Metric::L2)
        .unwrap();
    let ids: Vec<&str> = got.iter().map(|n| n.entity_id.as_str()).collect();
    assert_eq!(ids, ["zz-closest", "id00000", "id00001", "id00002"]);
    assert_eq!(got[1].distance, got[3].distance);
}

/// The exact search against a brute force computed here from the stored vectors.
#[test]
fn the_exact_search_agrees_with_a_brute_force_over_random_vectors() {
    let repo = repo();
    let mut rng = fastrand::Rng::with_seed(42);
    let dim = 48;
    let batch: Vec<Embedding> = (0..20_000)
        .map(|i| {
            let v = (0..dim).map(|_| rng.f32() * 2.0 - 1.0).collect();
            Embedding::new("rand", format!("r{i}"), v)
        })
        .collect();
    repo.batch_save_embeddings(&batch).unwrap();
    let queries: Vec<Vec<f32>> = (0..25)
        .map(|_| (0..dim).map(|_| rng.f32() * 2.0 - 1.0).collect())
        .collect();
    for metric in Metric::ALL {
        let answers = repo
            .nearest_embeddings_many("rand", &queries, 10, metric)
            .unwrap();
        for (q, answer) in queries.iter().zip(answers) {
            let mut all: Vec<(f32, &str)> = batch
                .iter()
                .map(|e| (distance(metric, q, &e.vector) as f32, e.entity_id.as_str()))
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)));
            let expected: Vec<(&str, f64)> = all[..10]
                .iter()
                .map(|(d, id)| (*id, f64::from(*d)))
                .collect();
            assert_neighbors(&answer, &expected);
        }
    }
}

/// pgvector's distances, computed in f64.
pub fn distance(metric: Metric, q: &[f32], x: &[f32]) -> f64 {
    let dot: f64 = q
        .iter()
        .zip(x)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    let sq = |v: &[f32]| v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>();
    match metric {
        Metric::L2 => q
            .iter()
            .zip(x)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
            .sum::<f64>()
            .sqrt(),
        Metric::Cosine => 1.0 - (dot / (sq(q) * sq(x)).sqrt()).clamp(-1.0, 1.0),
        Metric::InnerProduct => -dot,
    }
}

#[test]
fn bad_searches_are_invalid_input_or_dimension_mismatch() {
    let repo = repo();
    plane(&repo);
    let q = [1.0, 0.0];
    assert_invalid(repo.nearest_embeddings("pt", &q, 0, Metric::L2));
    assert_invalid(repo.nearest_embeddings("pt", &q, 10_001, Metric::L2));
    assert!(repo
        .nearest_embeddings("pt", &q, 10_000, Metric::L2)
        .is_ok());
    assert_invalid(repo.nearest_embeddings("pt", &[], 5, Metric::L2));
    assert_invalid(repo.nearest_embeddings("pt", &[f32::NAN, 0.0], 5, Metric::L2));
    assert_invalid(repo.nearest_embeddings("pt", &[f32::INFINITY, 0.0], 5, Metric::L2));
    assert_invalid(repo.nearest_embeddings("pt", &[0.0, f32::NEG_INFINITY], 5, Metric::L2));
    assert_invalid(repo.nearest_embeddings("pt", &[0.0, 0.0], 5, Metric::Cosine));
    // A zero query is fine where the distance is defined.
    assert_eq!(
        repo.nearest_embeddings("pt", &[0.0, 0.0], 1, Metric::L2)
            .unwrap()[0]
            .entity_id,
        "a"
    );
    assert_invalid(repo.nearest_embeddings(" ", &q, 5, Metric::L2));
    assert_invalid(repo.nearest_embeddings("a\0b", &q, 5, Metric::L2));
    assert_invalid(repo.nearest_embeddings(&"t".repeat(51), &q, 5, Metric::L2));
    match repo.nearest_embeddings("pt", &[1.0, 0.0, 0.0], 5, Metric::L2) {
        Err(RepoError::DimensionMismatch {
            entity_type,
            expected: 2,
            actual: 3,
            index: None,
        }) => assert_eq!(entity_type, "pt"),
        other => panic!("expected DimensionMismatch, got {other:?}"),
    }
    // Batches name the first offending query.
    let mixed = vec![vec![1.0, 0.0], vec![1.0, 0.0, 0.0]];
    match repo.nearest_embeddings_many("pt", &mixed, 5, Metric::L2) {
        Err(RepoError::DimensionMismatch {
            expected: 2,
            actual: 3,
            index: Some(1),
            ..
        }) => {}
        other => panic!("expected DimensionMismatch at query 1, got {other:?}"),
    }
    let wrong = vec![vec![1.0, 0.0, 0.0], vec![1.0, 0.0, 0.0]];
    match repo.nearest_embeddings_many("pt", &wrong, 5, Metric::L2) {
        Err(RepoError::DimensionMismatch {
            expected: 2,
            actual: 3,
            index: Some(0),
            ..
        }) => {}
        other => panic!("expected DimensionMismatch at query 0, got {other:?}"),
    }
    let with_nan = vec![vec![1.0, 0.0], vec![1.0, f32::NAN]];
    match repo.nearest_embeddings_many("pt", &with_nan, 5, Metric::L2) {
        Err(RepoError::InvalidInput(m)) => assert!(m.message().contains("query 1"), "{m}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let zero = vec![vec![1.0, 0.0], vec![0.0, 0.0]];
    assert_invalid(repo.nearest_embeddings_many("pt", &zero, 5, Metric::Cosine));
    assert_invalid(repo.nearest_embeddings_many("pt", &[vec![]], 5, Metric::L2));
    assert_invalid(repo.nearest_embeddings_many("pt", &[q.to_vec()], 0, Metric::L2));
    // Nothing was written by any of it.
    assert_eq!(repo.get_all_embeddings("pt").unwrap().len(), 6);
}

#[test]
fn an_unknown_type_has_no_neighbours() {
    let repo = repo();
    plane(&repo);
    assert!(repo
        .nearest_embeddings("nobody", &[1.0, 2.0, 3.0], 5, Metric::L2)
        .unwrap()
        .is_empty());
    let answers = repo
        .nearest_embeddings_many("nobody", &[vec![1.0], vec![2.0]], 5, Metric::Cosine)
        .unwrap();
    assert_eq!(answers, vec![Vec::<Neighbor>::new(), Vec::new()]);
    // A dropped type is unknown again.
    repo.drop_embedding_type("pt").unwrap();
    assert!(repo
        .nearest_embeddings("pt", &[1.0, 0.0], 5, Metric::L2)
        .unwrap()
        .is_empty());
}

#[test]
fn an_index_needs_pgvector_and_says_how_to_install_it() {
    let repo = repo();
    plane(&repo);
    match repo.create_vector_index("pt", Metric::L2) {
        Err(RepoError::InvalidInput(m)) => {
            assert!(
                m.message().contains("pgvector") && m.message().contains("install"),
                "{m}"
            )
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert_invalid(repo.create_vector_index(" ", Metric::L2));
}

/// Searches see one consistent set while writers add and move other vectors: the fixed
/// nearest ones always come back, in order, whatever is written meanwhile.
#[test]
fn searches_during_concurrent_writes_see_a_consistent_answer() {
    search_during_writes(&repo());
}

pub fn search_during_writes(repo: &ModelRepository) {
    let dim = 16;
    let anchors: Vec<Embedding> = (0..10)
        .map(|i| {
            let mut v = vec![0.0; dim];
            v[0] = i as f32 * 0.01;
            Embedding::new("w", format!("anchor{i}"), v)
        })
        .collect();
    repo.batch_save_embeddings(&anchors).unwrap();
    repo.save_embeddings("w", "far-first", &vec![5.0; dim])
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (repo, stop) = (repo.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut round = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let far: Vec<Embedding> = (0..400)
                        .map(|i| {
                            let v = vec![5.0 + (round % 7) as f32 + i as f32 * 0.001; dim];
                            Embedding::new("w", format!("far{w}-{i}"), v)
                        })
                        .collect();
                    repo.batch_save_embeddings(&far).unwrap();
                    repo.save_embeddings("w", &format!("single{w}"), &vec![9.0; dim])
                        .unwrap();
                    round += 1;
                }
                round
            })
        })
        .collect();
    let query = vec![0.0; dim];
    let queries = vec![query.clone(); 3];
    for _ in 0..25 {
        let got = repo
            .nearest_embeddings("w", &query, 10, Metric::L2)
            .unwrap();
        let ids: Vec<String> = got.into_iter().map(|n| n.entity_id).collect();
        let expected: Vec<String> = (0..10).map(|i| format!("anchor{i}")).collect();
        assert_eq!(ids, expected);
        for answer in repo
            .nearest_embeddings_many("w", &queries, 11, Metric::L2)
            .unwrap()
        {
            assert_eq!(answer.len(), 11);
            assert!(answer[10].entity_id.starts_with("far"), "{answer:?}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        assert!(w.join().unwrap() > 0, "the writers wrote");
    }
}
