//! Filtered similarity search without an index (exact, on every server): a filter that
//! removes almost every row still returns k, excluding the top hit returns the next one,
//! the three parts of a filter together against a brute force, bad filters, and the exact
//! search's answers with large (but finite) values. The indexed paths are in
//! `search_pgvector`.

use pg_model_repo::{Embedding, Metric, RepoError, SearchFilter};

use crate::common::{assert_invalid, TestRepo};
use crate::search::{assert_neighbors, distance, plane, plane_answers, repo};

/// `n` random vectors of `dim` values; ids "keep<i>" for every `keep_every`-th, else "r<i>".
pub fn random_rows(n: usize, dim: usize, keep_every: usize, seed: u64) -> Vec<Embedding> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|i| {
            let prefix = if i % keep_every == 0 { "keep" } else { "r" };
            let v = (0..dim).map(|_| rng.f32() * 2.0 - 1.0).collect();
            Embedding::new("item", format!("{prefix}{i:06}"), v)
        })
        .collect()
}

/// The k closest rows passing `passes`, by brute force in f64, ties by id.
pub fn brute_force(
    rows: &[Embedding],
    q: &[f32],
    k: usize,
    metric: Metric,
    passes: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut all: Vec<(f64, &str)> = rows
        .iter()
        .filter(|e| passes(&e.entity_id))
        .map(|e| (distance(metric, q, &e.vector), e.entity_id.as_str()))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)));
    all.into_iter()
        .take(k)
        .map(|(_, id)| id.to_owned())
        .collect()
}

fn ids(found: &[pg_model_repo::Neighbor]) -> Vec<String> {
    found.iter().map(|n| n.entity_id.clone()).collect()
}

#[test]
fn a_filter_that_removes_almost_every_row_still_returns_k() {
    let repo = repo();
    // 10 of 10,000 rows pass: the filter removes 99.9% of the type.
    let rows = random_rows(10_000, 8, 1000, 1);
    repo.batch_save_embeddings(&rows).unwrap();
    let q = vec![0.1; 8];
    let prefix = SearchFilter {
        id_prefix: Some("keep".into()),
        ..Default::default()
    };
    for k in [5, 10, 50] {
        let found = repo
            .nearest_embeddings_filtered("item", &q, k, Metric::L2, &prefix)
            .unwrap();
        let expected = brute_force(&rows, &q, k, Metric::L2, |id| id.starts_with("keep"));
        assert_eq!(found.len(), k.min(10));
        assert_eq!(ids(&found), expected);
    }
    // The same ten as a candidate set, with ids that do not exist mixed in.
    let mut among: Vec<String> = rows
        .iter()
        .filter(|e| e.entity_id.starts_with("keep"))
        .map(|e| e.entity_id.clone())
        .collect();
    among.push("nobody".into());
    let candidates = SearchFilter {
        among: Some(among),
        ..Default::default()
    };
    let found = repo
        .nearest_embeddings_filtered("item", &q, 10, Metric::Cosine, &candidates)
        .unwrap();
    let expected = brute_force(&rows, &q, 10, Metric::Cosine, |id| id.starts_with("keep"));
    assert_eq!(ids(&found), expected);
}

#[test]
fn excluding_the_top_hit_returns_the_next_one() {
    let repo = repo();
    plane(&repo);
    for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
        let all = plane_answers(metric);
        let top = all[0].0;
        let filter = SearchFilter {
            exclude: vec![top.to_owned()],
            ..Default::default()
        };
        let found = repo
            .nearest_embeddings_filtered("pt", &[1.0, 0.0], 5, metric, &filter)
            .unwrap();
        assert_neighbors(&found, &all[1..6]);
    }
}

#[test]
fn candidates_exclusions_and_a_prefix_together_match_a_brute_force() {
    let repo = repo();
    let rows = random_rows(3000, 12, 3, 2);
    repo.batch_save_embeddings(&rows).unwrap();
    let mut rng = fastrand::Rng::with_seed(3);
    let among: Vec<String> = rows
        .iter()
        .filter(|_| rng.u8(..) < 128)
        .map(|e| e.entity_id.clone())
        .collect();
    let exclude: Vec<String> = among.iter().step_by(5).cloned().collect();
    let filter = SearchFilter {
        among: Some(among.clone()),
        exclude: exclude.clone(),
        id_prefix: Some("keep".into()),
    };
    let passes = |id: &str| {
        among.iter().any(|a| a == id) && !exclude.iter().any(|x| x == id) && id.starts_with("keep")
    };
    let queries: Vec<Vec<f32>> = (0..4)
        .map(|_| (0..12).map(|_| rng.f32() - 0.5).collect())
        .collect();
    for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
        let answers = repo
            .nearest_embeddings_filtered_many("item", &queries, 20, metric, &filter)
            .unwrap();
        for (q, found) in queries.iter().zip(&answers) {
            assert_eq!(ids(found), brute_force(&rows, q, 20, metric, passes));
        }
        // Without a candidate set: the type is streamed and filtered as it comes.
        let streamed = SearchFilter {
            among: None,
            ..filter.clone()
        };
        let found = repo
            .nearest_embeddings_filtered("item", &queries[0], 20, metric, &streamed)
            .unwrap();
        let expected = brute_force(&rows, &queries[0], 20, metric, |id| {
            !exclude.iter().any(|x| x == id) && id.starts_with("keep")
        });
        assert_eq!(ids(&found), expected);
    }
}

#[test]
fn bad_filters_are_invalid_input_and_an_empty_candidate_set_finds_nothing() {
    let repo = repo();
    plane(&repo);
    let q = [1.0, 0.0];
    let empty = SearchFilter {
        among: Some(Vec::new()),
        ..Default::default()
    };
    assert!(repo
        .nearest_embeddings_filtered("pt", &q, 3, Metric::L2, &empty)
        .unwrap()
        .is_empty());
    let answers = repo
        .nearest_embeddings_filtered_many("pt", &[q.to_vec(), q.to_vec()], 3, Metric::L2, &empty)
        .unwrap();
    assert_eq!(answers, vec![Vec::new(), Vec::new()]);
    let too_many = SearchFilter {
        among: Some((0..100_001).map(|i| format!("x{i}")).collect()),
        ..Default::default()
    };
    assert_invalid(repo.nearest_embeddings_filtered("pt", &q, 3, Metric::L2, &too_many));
    let at_bound = SearchFilter {
        among: Some((0..100_000).map(|i| format!("x{i}")).collect()),
        ..Default::default()
    };
    assert!(repo
        .nearest_embeddings_filtered("pt", &q, 3, Metric::L2, &at_bound)
        .unwrap()
        .is_empty());
    let nul = SearchFilter {
        exclude: vec!["a\0".into()],
        ..Default::default()
    };
    assert_invalid(repo.nearest_embeddings_filtered("pt", &q, 3, Metric::L2, &nul));
    let none = SearchFilter::default();
    assert_invalid(repo.nearest_embeddings_filtered("pt", &q, 0, Metric::L2, &none));
    assert_invalid(repo.nearest_embeddings_filtered("pt", &[f32::NAN, 0.0], 3, Metric::L2, &none));
    assert_invalid(repo.nearest_embeddings_filtered("pt", &[0.0, 0.0], 3, Metric::Cosine, &none));
    match repo.nearest_embeddings_filtered("pt", &[1.0, 0.0, 0.0], 3, Metric::L2, &none) {
        Err(RepoError::DimensionMismatch {
            expected: 2,
            actual: 3,
            ..
        }) => {}
        other => panic!("expected DimensionMismatch, got {other:?}"),
    }
    // An unfiltered filtered search is the plain search.
    let found = repo
        .nearest_embeddings_filtered("pt", &q, 6, Metric::L2, &none)
        .unwrap();
    assert_neighbors(&found, &plane_answers(Metric::L2));
}

/// Issue 27's fault: the f32 screen overflowed to infinity for large but finite values and
/// dropped the true nearest neighbour.
#[test]
fn the_exact_search_finds_the_nearest_neighbour_among_large_values() {
    let repo = repo();
    exact_with_large_values(&repo);
}

pub fn exact_with_large_values(repo: &TestRepo) {
    repo.save_embeddings("big", "a", &[0.0, 0.0, 0.0]).unwrap();
    repo.save_embeddings("big", "x", &[-1e19, 1e20, 1e20])
        .unwrap();
    let q = [1e20, 1e20, 1e20];
    for k in [1, 2] {
        let l2 = repo.nearest_embeddings("big", &q, k, Metric::L2).unwrap();
        assert_eq!(l2[0].entity_id, "x", "L2 k={k}: {l2:?}");
        assert!((f64::from(l2[0].distance) - 1.1e20).abs() < 1e14, "{l2:?}");
        let ip = repo
            .nearest_embeddings("big", &q, k, Metric::InnerProduct)
            .unwrap();
        assert_eq!(ip[0].entity_id, "x", "inner product k={k}: {ip:?}");
        let cos = repo.nearest_embeddings("big", &[1.0, 1.0, 1.0], k, Metric::Cosine);
        assert_eq!(cos.unwrap()[0].entity_id, "x");
    }
}
