//! Training metrics (API.md, "Training metrics").

use std::collections::BTreeMap;

use crate::common::{assert_invalid, count, TestRepo};

fn metrics(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn metrics_round_trip_exactly() {
    let repo = TestRepo::new();
    let m = metrics(&[
        ("auc", 0.1 + 0.2),
        ("loss", 1e-300),
        ("big", 1.7e308),
        ("neg", -3.5),
    ]);
    repo.save_training_metrics("m", "1", &m).unwrap();
    assert_eq!(repo.get_training_metrics("m", "1").unwrap(), Some(m));
}

#[test]
fn the_newest_record_of_a_version_is_returned() {
    let repo = TestRepo::new();
    repo.save_training_metrics("m", "1", &metrics(&[("auc", 0.8)]))
        .unwrap();
    repo.save_training_metrics("m", "1", &metrics(&[("auc", 0.9)]))
        .unwrap();
    repo.save_training_metrics("m", "2", &metrics(&[("auc", 0.7)]))
        .unwrap();
    assert_eq!(
        repo.get_training_metrics("m", "1").unwrap(),
        Some(metrics(&[("auc", 0.9)]))
    );
    assert_eq!(repo.get_training_metrics("m", "3").unwrap(), None);
    assert_eq!(repo.get_training_metrics("x", "1").unwrap(), None);
}

#[test]
fn history_lists_every_record_oldest_first() {
    let repo = TestRepo::new();
    for (v, auc) in [("1", 0.5), ("2", 0.6), ("1", 0.7)] {
        repo.save_training_metrics("m", v, &metrics(&[("auc", auc)]))
            .unwrap();
    }
    repo.save_training_metrics("other", "1", &metrics(&[("auc", 0.1)]))
        .unwrap();
    // Equal timestamps cannot reorder the history.
    repo.sql()
        .execute(
            "UPDATE training_metrics SET training_date = '2020-01-01'",
            &[],
        )
        .unwrap();
    let h = repo.get_training_metrics_history("m").unwrap();
    let seen: Vec<(&str, f64)> = h
        .iter()
        .map(|r| (r.version.as_str(), r.metrics["auc"]))
        .collect();
    assert_eq!(seen, [("1", 0.5), ("2", 0.6), ("1", 0.7)]);
    assert!(h.iter().all(|r| r.model_name == "m"));
    assert!(repo
        .get_training_metrics_history("none")
        .unwrap()
        .is_empty());
}

#[test]
fn versions_are_literal_and_need_no_saved_model() {
    let repo = TestRepo::new();
    repo.save_training_metrics("m", "latest", &metrics(&[("a", 1.0)]))
        .unwrap();
    repo.save_training_metrics("m", "@champion", &metrics(&[("a", 2.0)]))
        .unwrap();
    assert_eq!(
        repo.get_training_metrics("m", "latest").unwrap(),
        Some(metrics(&[("a", 1.0)]))
    );
    assert_eq!(
        repo.get_training_metrics("m", "@champion").unwrap(),
        Some(metrics(&[("a", 2.0)]))
    );
    assert_eq!(count(&repo, "ml_models"), 0);
}

#[test]
fn non_finite_values_empty_maps_and_bad_names_are_rejected() {
    let repo = TestRepo::new();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        assert_invalid(repo.save_training_metrics("m", "1", &metrics(&[("ok", 1.0), ("x", bad)])));
    }
    assert_invalid(repo.save_training_metrics("m", "1", &BTreeMap::new()));
    for name in ["", "  ", "a\0b"] {
        assert_invalid(repo.save_training_metrics("m", "1", &metrics(&[(name, 1.0)])));
    }
    assert_invalid(repo.save_training_metrics("m", "1", &metrics(&[(&"n".repeat(256), 1.0)])));
    repo.save_training_metrics("m", "1", &metrics(&[(&"é".repeat(255), 1.0)]))
        .unwrap();
    assert_invalid(repo.save_training_metrics("", "1", &metrics(&[("a", 1.0)])));
    assert_invalid(repo.save_training_metrics("m", " ", &metrics(&[("a", 1.0)])));
    assert_invalid(repo.save_training_metrics("m", &"v".repeat(51), &metrics(&[("a", 1.0)])));
    assert_invalid(repo.get_training_metrics("m\0", "1"));
    assert_invalid(repo.get_training_metrics_history(""));
    assert_eq!(count(&repo, "training_metrics"), 1);
}
