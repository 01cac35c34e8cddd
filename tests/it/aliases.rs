//! Aliases: movable pointers with a stack and a history (API.md, "Models", aliases).

use pg_model_repo::RepoError;
use serde_json::json;

use crate::common::{assert_invalid, TestRepo};

fn repo_with_versions(versions: &[&str]) -> TestRepo {
    let repo = TestRepo::new();
    for v in versions {
        repo.save_model("m", v, v.as_bytes(), &json!({})).unwrap();
    }
    repo
}

fn history(repo: &TestRepo, alias: &str) -> Vec<String> {
    repo.get_alias_history("m", alias)
        .unwrap()
        .into_iter()
        .map(|(v, _)| v)
        .collect()
}

#[test]
fn an_alias_resolves_to_its_version_everywhere() {
    let repo = repo_with_versions(&["1", "2"]);
    repo.set_model_alias("m", "champion", "1").unwrap();
    assert_eq!(repo.load_model("m", "@champion").unwrap().unwrap(), b"1");
    let (info, _) = repo
        .load_model_with_info("m", "@champion")
        .unwrap()
        .unwrap();
    assert_eq!(info.version, "1");
    let mut out = Vec::new();
    repo.load_model_to_writer("m", "@champion", &mut out)
        .unwrap()
        .unwrap();
    assert_eq!(out, b"1");
    repo.set_model_alias("m", "champion", "2").unwrap();
    assert_eq!(repo.load_model("m", "@champion").unwrap().unwrap(), b"2");
    let aliases = repo.get_model_aliases("m").unwrap();
    assert_eq!(aliases.get("champion").map(String::as_str), Some("2"));
}

#[test]
fn an_unknown_alias_loads_as_none_and_a_malformed_one_is_invalid() {
    let repo = repo_with_versions(&["1"]);
    assert_eq!(repo.load_model("m", "@nobody").unwrap(), None);
    assert_invalid(repo.load_model("m", "@"));
    assert_invalid(repo.load_model("m", "@bad alias"));
    assert_invalid(repo.load_model("m", &format!("@{}", "a".repeat(65))));
}

#[test]
fn alias_names_follow_the_rules() {
    let repo = repo_with_versions(&["1"]);
    repo.set_model_alias("m", &"a".repeat(64), "1").unwrap();
    repo.set_model_alias("m", "Prod_v-2", "1").unwrap();
    for bad in [
        "",
        "latest",
        "has space",
        "dot.ted",
        "ünï",
        "a\0",
        &"a".repeat(65),
    ] {
        assert_invalid(repo.set_model_alias("m", bad, "1"));
    }
    assert_eq!(repo.get_model_aliases("m").unwrap().len(), 2);
}

#[test]
fn an_alias_only_points_to_an_active_version() {
    let repo = repo_with_versions(&["1", "2"]);
    repo.delete_model("m", "2").unwrap();
    assert!(matches!(
        repo.set_model_alias("m", "a", "2"),
        Err(RepoError::NotFound(_))
    ));
    assert!(matches!(
        repo.set_model_alias("m", "a", "missing"),
        Err(RepoError::NotFound(_))
    ));
    assert!(matches!(
        repo.set_model_alias("other", "a", "1"),
        Err(RepoError::NotFound(_))
    ));
    // "latest" and "@other" resolve to a literal version.
    repo.set_model_alias("m", "a", "latest").unwrap();
    repo.set_model_alias("m", "b", "@a").unwrap();
    assert_eq!(repo.get_model_aliases("m").unwrap()["b"], "1");
}

#[test]
fn deleting_a_version_removes_its_aliases_but_not_their_history() {
    let repo = repo_with_versions(&["1", "2"]);
    repo.set_model_alias("m", "champion", "1").unwrap();
    repo.set_model_alias("m", "staging", "2").unwrap();
    repo.delete_model("m", "1").unwrap();
    let aliases = repo.get_model_aliases("m").unwrap();
    assert!(!aliases.contains_key("champion"));
    assert_eq!(aliases["staging"], "2");
    assert_eq!(history(&repo, "champion"), ["1"]);
    assert_eq!(repo.load_model("m", "@champion").unwrap(), None);
}

#[test]
fn delete_alias_reports_whether_it_existed() {
    let repo = repo_with_versions(&["1"]);
    repo.set_model_alias("m", "a", "1").unwrap();
    assert!(repo.delete_model_alias("m", "a").unwrap());
    assert!(!repo.delete_model_alias("m", "a").unwrap());
    assert!(repo.get_model_aliases("m").unwrap().is_empty());
    assert_eq!(history(&repo, "a"), ["1"]);
    assert_invalid(repo.delete_model_alias("m", "bad alias"));
}

#[test]
fn rollback_walks_back_down_the_stack() {
    let repo = repo_with_versions(&["1", "2", "3"]);
    for v in ["1", "2", "3"] {
        repo.set_model_alias("m", "champion", v).unwrap();
    }
    assert_eq!(repo.rollback_model_alias("m", "champion").unwrap(), "2");
    assert_eq!(repo.rollback_model_alias("m", "champion").unwrap(), "1");
    assert!(matches!(
        repo.rollback_model_alias("m", "champion"),
        Err(RepoError::NotFound(_))
    ));
    // A failed rollback changes nothing.
    assert_eq!(repo.get_model_aliases("m").unwrap()["champion"], "1");
    assert_eq!(history(&repo, "champion"), ["1", "2", "3", "2", "1"]);
}

#[test]
fn a_set_after_a_rollback_pushes_on_the_remaining_stack() {
    let repo = repo_with_versions(&["1", "2", "3", "4"]);
    for v in ["1", "2", "3"] {
        repo.set_model_alias("m", "champion", v).unwrap();
    }
    assert_eq!(repo.rollback_model_alias("m", "champion").unwrap(), "2");
    repo.set_model_alias("m", "champion", "4").unwrap();
    assert_eq!(repo.rollback_model_alias("m", "champion").unwrap(), "2");
    assert_eq!(repo.load_model("m", "@champion").unwrap().unwrap(), b"2");
}

#[test]
fn rollback_skips_and_pops_versions_no_longer_active() {
    let repo = repo_with_versions(&["1", "2", "3"]);
    for v in ["1", "2", "3"] {
        repo.set_model_alias("m", "champion", v).unwrap();
    }
    repo.delete_model("m", "2").unwrap();
    assert_eq!(repo.rollback_model_alias("m", "champion").unwrap(), "1");
    // Reviving 2 later does not put it back on the stack.
    repo.save_model("m", "2", b"2", &json!({})).unwrap();
    assert!(matches!(
        repo.rollback_model_alias("m", "champion"),
        Err(RepoError::NotFound(_))
    ));
}

#[test]
fn rollback_of_an_unknown_alias_is_not_found() {
    let repo = repo_with_versions(&["1"]);
    assert!(matches!(
        repo.rollback_model_alias("m", "nobody"),
        Err(RepoError::NotFound(_))
    ));
    assert_invalid(repo.rollback_model_alias("m", "latest"));
}

#[test]
fn history_lists_every_move_oldest_first_with_times() {
    let repo = repo_with_versions(&["1", "2"]);
    repo.set_model_alias("m", "a", "1").unwrap();
    repo.set_model_alias("m", "a", "2").unwrap();
    repo.rollback_model_alias("m", "a").unwrap();
    let h = repo.get_alias_history("m", "a").unwrap();
    let versions: Vec<&str> = h.iter().map(|(v, _)| v.as_str()).collect();
    assert_eq!(versions, ["1", "2", "1"]);
    assert!(h.windows(2).all(|w| w[0].1 <= w[1].1));
    assert!(repo.get_alias_history("m", "never").unwrap().is_empty());
}

#[test]
fn setting_the_current_target_again_changes_nothing() {
    let repo = repo_with_versions(&["1", "2"]);
    repo.set_model_alias("m", "a", "1").unwrap();
    repo.set_model_alias("m", "a", "2").unwrap();
    repo.set_model_alias("m", "a", "2").unwrap();
    assert_eq!(history(&repo, "a"), ["1", "2"]);
    assert_eq!(repo.rollback_model_alias("m", "a").unwrap(), "1");
}
