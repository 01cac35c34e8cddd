//! The prediction cache against a real PostgreSQL: values, TTLs by the database clock, key
//! limits, glob clearing (with a property test against a reference matcher), statistics,
//! buffered hit counts, and the reaper thread.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pg_model_repo::{ModelRepository, RepoError};
use serde::{Deserialize, Serialize};

use crate::common::{
    self, assert_invalid, sessions_named, terminate_sessions, url_with_app_name, TestRepo,
};

const HOUR: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Scored {
    model: String,
    scores: Vec<f32>,
    labels: BTreeMap<String, u8>,
    note: Option<String>,
}

/// Makes `key` expired by the database clock, without waiting.
fn expire(repo: &TestRepo, key: &str) {
    let n = repo
        .sql()
        .execute(
            "UPDATE prediction_cache SET cached_at = now() - interval '2 hours',
                 expires_at = now() - interval '1 hour' WHERE cache_key = $1",
            &[&key],
        )
        .unwrap();
    assert_eq!(n, 1, "no row {key:?} to expire");
}

/// Inserts `n` rows already expired (by the database clock), keys `{prefix}{i}`.
fn insert_expired(client: &mut postgres::Client, prefix: &str, n: i64) {
    client
        .execute(
            "INSERT INTO prediction_cache (cache_key, predictions, cached_at, expires_at)
             SELECT $1 || i, '\\x00', now() - interval '2 hours', now() - interval '1 hour'
             FROM generate_series(1, $2::int8) AS i",
            &[&prefix, &n],
        )
        .unwrap();
}

fn access(repo: &TestRepo, key: &str) -> (i64, bool) {
    let row = repo
        .sql()
        .query_one(
            "SELECT access_count, last_accessed >= cached_at AND last_accessed <= now()
             FROM prediction_cache WHERE cache_key = $1",
            &[&key],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// Waits (at most `limit`) for `done`; returns whether it came true.
fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

#[test]
fn values_of_several_types_round_trip() {
    let repo = TestRepo::new();
    let scored = Scored {
        model: "ranker".into(),
        scores: vec![0.25, -1.5, f32::MAX],
        labels: [("a".to_string(), 1), ("b".to_string(), 2)].into(),
        note: None,
    };
    repo.cache_predictions("struct", &scored, HOUR).unwrap();
    repo.cache_predictions("vec", &vec![1.5f64, 2.5], HOUR)
        .unwrap();
    repo.cache_predictions("str", "plain text é", HOUR).unwrap();
    repo.cache_predictions("slice", &[1u8, 2, 3][..], HOUR)
        .unwrap();
    let map: HashMap<String, Vec<i64>> = [("x".to_string(), vec![-1, i64::MAX])].into();
    repo.cache_predictions("map", &map, HOUR).unwrap();
    repo.cache_predictions("tuple", &(7u32, "seven", true), HOUR)
        .unwrap();

    assert_eq!(
        repo.get_cached_predictions::<Scored>("struct").unwrap(),
        Some(scored)
    );
    assert_eq!(
        repo.get_cached_predictions::<Vec<f64>>("vec").unwrap(),
        Some(vec![1.5, 2.5])
    );
    assert_eq!(
        repo.get_cached_predictions::<String>("str")
            .unwrap()
            .as_deref(),
        Some("plain text é")
    );
    assert_eq!(
        repo.get_cached_predictions::<Vec<u8>>("slice").unwrap(),
        Some(vec![1, 2, 3])
    );
    assert_eq!(repo.get_cached_predictions("map").unwrap(), Some(map));
    assert_eq!(
        repo.get_cached_predictions::<(u32, String, bool)>("tuple")
            .unwrap(),
        Some((7, "seven".to_string(), true))
    );
    assert_eq!(
        repo.get_cached_predictions::<Vec<f64>>("absent").unwrap(),
        None
    );
}

#[test]
fn writing_a_key_again_replaces_value_and_ttl() {
    let repo = TestRepo::new();
    repo.cache_predictions("k", &vec![1, 2], HOUR).unwrap();
    assert!(repo.cache_ttl("k").unwrap().unwrap() > Duration::from_secs(3500));
    repo.cache_predictions("k", &vec![3], Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        repo.get_cached_predictions::<Vec<i32>>("k").unwrap(),
        Some(vec![3])
    );
    let left = repo.cache_ttl("k").unwrap().unwrap();
    assert!(
        left <= Duration::from_secs(10) && left > Duration::from_secs(5),
        "{left:?}"
    );
    assert_eq!(common::count(&repo, "prediction_cache"), 1);
    // An expired entry is replaced too, and lives again.
    expire(&repo, "k");
    repo.cache_predictions("k", &vec![4], HOUR).unwrap();
    assert_eq!(
        repo.get_cached_predictions::<Vec<i32>>("k").unwrap(),
        Some(vec![4])
    );
}

#[test]
fn ttl_must_be_positive_and_at_most_the_maximum() {
    let repo = TestRepo::with_config(|c| {
        c.cache_max_ttl(Duration::from_secs(100))
            .cache_default_ttl(Duration::from_secs(50))
    });
    assert_invalid(repo.cache_predictions("k", &1, Duration::ZERO));
    assert_invalid(repo.cache_predictions(
        "k",
        &1,
        Duration::from_secs(100) + Duration::from_nanos(1),
    ));
    assert_invalid(repo.get_or_compute("k", Duration::from_secs(101), || Ok(1)));
    assert_eq!(common::count(&repo, "prediction_cache"), 0);

    repo.cache_predictions("max", &1, Duration::from_secs(100))
        .unwrap();
    // A sub-microsecond TTL is still a valid (if short) entry.
    repo.cache_predictions("tiny", &1, Duration::from_nanos(1))
        .unwrap();
    repo.cache_predictions_default("default", &1).unwrap();
    let left = repo.cache_ttl("default").unwrap().unwrap();
    assert!(
        left <= Duration::from_secs(50) && left > Duration::from_secs(40),
        "{left:?}"
    );
    let left = repo.cache_ttl("max").unwrap().unwrap();
    assert!(
        left <= Duration::from_secs(100) && left > Duration::from_secs(90),
        "{left:?}"
    );
}

#[test]
fn keys_are_one_to_512_characters_without_nul() {
    let repo = TestRepo::new();
    let longest = "é".repeat(512);
    repo.cache_predictions(&longest, &1u8, HOUR).unwrap();
    assert_eq!(
        repo.get_cached_predictions::<u8>(&longest).unwrap(),
        Some(1)
    );
    assert_eq!(repo.clear_cache(&longest).unwrap(), 1);

    for bad in ["é".repeat(513), String::new(), "a\0b".into(), "  ".into()] {
        assert_invalid(repo.cache_predictions(&bad, &1u8, HOUR));
        assert_invalid(repo.get_cached_predictions::<u8>(&bad));
        assert_invalid(repo.cache_ttl(&bad));
        assert_invalid(repo.get_or_compute(&bad, HOUR, || Ok(1u8)));
    }
    assert_eq!(common::count(&repo, "prediction_cache"), 0);
}

#[test]
fn expired_entries_are_never_returned() {
    let repo = TestRepo::new();
    repo.cache_predictions("old", &1, HOUR).unwrap();
    repo.cache_predictions("live", &2, HOUR).unwrap();
    expire(&repo, "old");
    assert_eq!(repo.get_cached_predictions::<i32>("old").unwrap(), None);
    assert_eq!(repo.cache_ttl("old").unwrap(), None);
    assert_eq!(repo.get_cached_predictions::<i32>("live").unwrap(), Some(2));
    // Not reaped (no reaper here), just never returned.
    assert_eq!(common::count(&repo, "prediction_cache"), 2);

    repo.cache_predictions("short", &3, Duration::from_millis(300))
        .unwrap();
    assert_eq!(
        repo.get_cached_predictions::<i32>("short").unwrap(),
        Some(3)
    );
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(repo.get_cached_predictions::<i32>("short").unwrap(), None);
}

#[test]
fn expiry_is_computed_and_judged_by_the_database_clock() {
    let repo = TestRepo::new();
    let mut sql = repo.sql();
    let before: std::time::SystemTime = sql
        .query_one("SELECT clock_timestamp()", &[])
        .unwrap()
        .get(0);
    repo.cache_predictions("k", &1, Duration::from_micros(90_000_123))
        .unwrap();
    let after: std::time::SystemTime = sql
        .query_one("SELECT clock_timestamp()", &[])
        .unwrap()
        .get(0);
    let row = sql
        .query_one(
            "SELECT cached_at, expires_at - cached_at = interval '90.000123 seconds'
             FROM prediction_cache WHERE cache_key = 'k'",
            &[],
        )
        .unwrap();
    let cached_at: std::time::SystemTime = row.get(0);
    // Stamped by the server (its clock, its transaction time), the TTL added there exactly.
    assert!(before <= cached_at && cached_at <= after);
    assert!(row.get::<_, bool>(1));

    // Whatever the client's clock says, the database's now() decides: one microsecond past
    // by the server's clock is expired, a few seconds ahead is live.
    sql.execute(
        "UPDATE prediction_cache SET cached_at = now() - interval '1 hour',
             expires_at = now() - interval '1 microsecond' WHERE cache_key = 'k'",
        &[],
    )
    .unwrap();
    assert_eq!(repo.get_cached_predictions::<i32>("k").unwrap(), None);
    sql.execute(
        "UPDATE prediction_cache SET expires_at = now() + interval '5 seconds' WHERE cache_key = 'k'",
        &[],
    )
    .unwrap();
    assert_eq!(repo.get_cached_predictions::<i32>("k").unwrap(), Some(1));
}

#[test]
fn decoding_as_the_wrong_type_is_a_serialization_error() {
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Other {
        required: Vec<String>,
    }
    let repo = TestRepo::new();
    repo.cache_predictions("text", "not numbers", HOUR).unwrap();
    repo.cache_predictions(
        "struct",
        &Scored {
            model: "m".into(),
            scores: vec![],
            labels: BTreeMap::new(),
            note: Some("n".into()),
        },
        HOUR,
    )
    .unwrap();
    match repo.get_cached_predictions::<Vec<f32>>("text") {
        Err(RepoError::Serialization(msg)) => assert!(msg.message().contains("text"), "{msg}"),
        other => panic!("expected Serialization, got {other:?}"),
    }
    assert!(matches!(
        repo.get_cached_predictions::<Other>("struct"),
        Err(RepoError::Serialization(_))
    ));
    assert!(matches!(
        repo.get_cached_predictions::<u8>("struct"),
        Err(RepoError::Serialization(_))
    ));
}

fn keys_left(repo: &TestRepo) -> BTreeSet<String> {
    repo.sql()
        .query("SELECT cache_key FROM prediction_cache", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn clear_cache_follows_redis_glob_rules() {
    let repo = TestRepo::new();
    let keys = [
        "user1_a", "user1_b", "user1%x", "user10_a", "user1a", "a*b", "a?b", "a[b", "a\\b", "axb",
        "b-1", "c]", "ü1", "%", "_",
    ];
    let cases: &[(&str, &[&str])] = &[
        ("user1_*", &["user1_a", "user1_b"]),
        ("user1%*", &["user1%x"]),
        ("user1?a", &["user1_a"]),
        ("user1??a", &["user10_a"]),
        ("user1[_%]?", &["user1_a", "user1_b", "user1%x"]),
        ("user1[^_]*", &["user1%x", "user10_a", "user1a"]),
        ("a\\*b", &["a*b"]),
        ("a\\?b", &["a?b"]),
        ("a\\[b", &["a[b"]),
        ("a\\\\b", &["a\\b"]),
        ("a?b", &["a*b", "a?b", "a[b", "a\\b", "axb"]),
        ("[z-a]-1", &["b-1"]),
        ("c\\]", &["c]"]),
        ("[ü]?", &["ü1"]),
        ("%", &["%"]),
        ("_", &["_"]),
        ("*", &keys),
    ];
    for (pattern, expected) in cases {
        for k in keys {
            repo.cache_predictions(k, &0, HOUR).unwrap();
        }
        let removed = repo.clear_cache(pattern).unwrap();
        let left = keys_left(&repo);
        let gone: BTreeSet<&str> = keys
            .iter()
            .copied()
            .filter(|k| !left.contains(*k))
            .collect();
        assert_eq!(
            gone,
            expected.iter().copied().collect(),
            "pattern {pattern:?}"
        );
        assert_eq!(removed, expected.len() as u64, "pattern {pattern:?}");
    }

    for k in keys {
        repo.cache_predictions(k, &0, HOUR).unwrap();
    }
    for bad in ["", "[", "user[1", "[]", "[^]", "abc\\", "[a-", "a\0*"] {
        assert_invalid(repo.clear_cache(bad));
    }
    assert_eq!(keys_left(&repo).len(), keys.len());
    // Expired entries not yet reaped are removed (and counted) too.
    expire(&repo, "axb");
    assert_eq!(repo.clear_cache("ax?").unwrap(), 1);
}

/// The reference: a direct reading of the glob rules in API.md, matching by backtracking.
/// `None` for a malformed pattern.
mod reference {
    #[derive(Debug)]
    enum Tok {
        Lit(char),
        One,
        Any,
        Class(bool, Vec<(char, char)>),
    }

    fn parse(p: &[char]) -> Option<Vec<Tok>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < p.len() {
            match p[i] {
                '*' => out.push(Tok::Any),
                '?' => out.push(Tok::One),
                '\\' => {
                    i += 1;
                    out.push(Tok::Lit(*p.get(i)?));
                }
                '[' => {
                    i += 1;
                    let neg = p.get(i) == Some(&'^');
                    if neg {
                        i += 1;
                    }
                    let mut items: Vec<(char, char)> = Vec::new();
                    loop {
                        let mut c = *p.get(i)?;
                        if c == ']' {
                            break;
                        }
                        if c == '\\' {
                            i += 1;
                            c = *p.get(i)?;
                        }
                        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&e| e != ']') {
                            i += 2;
                            let mut e = p[i];
                            if e == '\\' {
                                i += 1;
                                e = *p.get(i)?;
                            }
                            items.push((c.min(e), c.max(e)));
                        } else {
                            items.push((c, c));
                        }
                        i += 1;
                    }
                    if items.is_empty() {
                        return None;
                    }
                    out.push(Tok::Class(neg, items));
                }
                c => out.push(Tok::Lit(c)),
            }
            i += 1;
        }
        if out.is_empty() {
            None
        } else {
            Some(out)
        }
    }

    fn matches(t: &[Tok], s: &[char]) -> bool {
        match t.first() {
            None => s.is_empty(),
            Some(Tok::Any) => (0..=s.len()).any(|k| matches(&t[1..], &s[k..])),
            Some(tok) => {
                let Some(&c) = s.first() else { return false };
                let ok = match tok {
                    Tok::Lit(l) => *l == c,
                    Tok::One => true,
                    Tok::Class(neg, items) => items.iter().any(|&(a, b)| a <= c && c <= b) != *neg,
                    Tok::Any => unreachable!(),
                };
                ok && matches(&t[1..], &s[1..])
            }
        }
    }

    pub fn glob(pattern: &str, key: &str) -> Option<bool> {
        let p: Vec<char> = pattern.chars().collect();
        let s: Vec<char> = key.chars().collect();
        parse(&p).map(|t| matches(&t, &s))
    }
}

#[test]
fn the_reference_matcher_reads_the_rules_as_documented() {
    use reference::glob;
    assert_eq!(glob("a*", "abc"), Some(true));
    assert_eq!(glob("a?c", "abc"), Some(true));
    assert_eq!(glob("[z-a]", "q"), Some(true));
    assert_eq!(glob("[^a]", "a"), Some(false));
    assert_eq!(glob("a_", "ab"), Some(false));
    assert_eq!(glob("\\*", "*"), Some(true));
    assert_eq!(glob("[a-]", "-"), Some(true));
    for bad in ["", "[", "[]", "[^]", "a\\", "[\\"] {
        assert_eq!(glob(bad, "a"), None, "{bad:?}");
    }
}

#[test]
fn glob_translation_agrees_with_a_reference_matcher() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    const ALPHABET: &[char] = &[
        'a',
        'b',
        'c',
        'z',
        '-',
        '%',
        '_',
        '.',
        '$',
        '(',
        '|',
        '^',
        ']',
        '[',
        '\\',
        '*',
        '?',
        'é',
        '😀',
        '\u{D7FF}',
        '\u{E000}',
        '\u{10FFFF}',
        '\n',
    ];
    let key_char = prop::sample::select(ALPHABET);
    let key = prop::collection::vec(key_char.clone(), 1..6)
        .prop_map(|cs| cs.into_iter().collect::<String>())
        .prop_filter("keys are not blank", |k| !k.trim().is_empty());
    let piece = prop_oneof![
        4 => key_char.prop_map(|c| c.to_string()),
        2 => Just("*".to_string()),
        1 => Just("?".to_string()),
        1 => prop::sample::select(ALPHABET).prop_map(|c| format!("\\{c}")),
        1 => (prop::sample::select(ALPHABET), prop::sample::select(ALPHABET))
            .prop_map(|(a, b)| format!("[{a}-{b}]")),
        1 => (any::<bool>(), prop::collection::vec(prop::sample::select(ALPHABET), 1..4))
            .prop_map(|(neg, cs)| format!("[{}{}]", if neg { "^" } else { "" },
                                           cs.into_iter().collect::<String>())),
    ];
    let pattern = prop::collection::vec(piece, 0..6).prop_map(|ps| ps.concat());
    let case = (pattern, prop::collection::btree_set(key, 1..16));

    let repo = TestRepo::new();
    let sql = std::sync::Mutex::new(repo.sql());
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    let matched = AtomicUsize::new(0);
    let malformed = AtomicUsize::new(0);
    runner
        .run(&case, |(pattern, keys)| {
            let mut sql = sql.lock().unwrap();
            sql.batch_execute("DELETE FROM prediction_cache").unwrap();
            let keys: Vec<String> = keys.into_iter().collect();
            sql.execute(
                "INSERT INTO prediction_cache (cache_key, predictions, expires_at)
                 SELECT k, '\\x00', now() + interval '1 hour' FROM unnest($1::text[]) AS k",
                &[&keys],
            )
            .unwrap();
            drop(sql);
            let result = repo.clear_cache(&pattern);
            let expected: Option<BTreeSet<&String>> = keys
                .iter()
                .map(|k| reference::glob(&pattern, k).map(|m| (k, m)))
                .collect::<Option<Vec<_>>>()
                .map(|v| v.into_iter().filter(|(_, m)| *m).map(|(k, _)| k).collect());
            let left = keys_left(&repo);
            match (expected, result) {
                (None, Err(RepoError::InvalidInput(_))) => {
                    malformed.fetch_add(1, Ordering::Relaxed);
                    prop_assert_eq!(left.len(), keys.len());
                }
                (Some(expected), Ok(removed)) => {
                    matched.fetch_add(expected.len(), Ordering::Relaxed);
                    let gone: BTreeSet<&String> =
                        keys.iter().filter(|k| !left.contains(*k)).collect();
                    prop_assert_eq!(&gone, &expected, "pattern {:?}", pattern);
                    prop_assert_eq!(removed, expected.len() as u64);
                }
                (expected, result) => {
                    prop_assert!(
                        false,
                        "pattern {:?}: reference {:?}, library {:?}",
                        pattern,
                        expected,
                        result
                    );
                }
            }
            Ok(())
        })
        .unwrap();
    // The generator must exercise both sides (not just malformed patterns, not just misses).
    assert!(matched.load(Ordering::Relaxed) > 100, "{matched:?}");
    assert!(malformed.load(Ordering::Relaxed) > 10, "{malformed:?}");
}

#[test]
fn a_literal_prefix_clear_uses_the_key_index() {
    let repo = TestRepo::new();
    let mut sql = repo.sql();
    sql.batch_execute(
        "INSERT INTO prediction_cache (cache_key, predictions, expires_at)
         SELECT 'user' || (i % 1000) || ':item' || i, '\\x00', now() + interval '1 hour'
         FROM generate_series(1, 120000) AS i;
         ANALYZE prediction_cache",
    )
    .unwrap();
    for pattern in [
        "user123:*",
        "user123:item?23",
        "user12[3]:*",
        "user123:item1[0-9]*",
    ] {
        let plan = repo.explain_clear_cache(pattern).unwrap();
        assert!(plan.contains("prediction_cache_pkey"), "{pattern}: {plan}");
        assert!(!plan.contains("Seq Scan"), "{pattern}: {plan}");
    }
    // Without a literal prefix there is no range to use: the plan says so honestly.
    assert!(repo
        .explain_clear_cache("*:item1")
        .unwrap()
        .contains("Seq Scan"));
    let expected: i64 = sql
        .query_one(
            "SELECT count(*) FROM prediction_cache WHERE cache_key LIKE 'user123:%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(expected, 120);
    assert_eq!(repo.clear_cache("user123:*").unwrap(), 120);
    assert_eq!(common::count(&repo, "prediction_cache"), 120_000 - 120);
}

#[test]
fn purge_removes_expired_rows_only_in_batches() {
    let repo = TestRepo::new();
    repo.cache_predictions("live", &1, HOUR).unwrap();
    repo.cache_predictions("old", &1, HOUR).unwrap();
    expire(&repo, "old");
    insert_expired(&mut repo.sql(), "bulk", 25_000);
    assert_eq!(repo.purge_expired_cache().unwrap(), 25_001);
    assert_eq!(keys_left(&repo), ["live".to_string()].into());
    assert_eq!(repo.purge_expired_cache().unwrap(), 0);
}

#[test]
fn statistics_count_entries_bytes_and_lookups() {
    let repo = TestRepo::new();
    let empty = repo.get_cache_statistics().unwrap();
    assert_eq!(
        (
            empty.total_entries,
            empty.hits,
            empty.misses,
            empty.hit_rate
        ),
        (0, 0, 0, 0.0)
    );

    let values = [("a", vec![1.0f32, 2.0]), ("b", vec![3.0]), ("c", vec![])];
    let mut bytes = 0;
    for (k, v) in &values {
        repo.cache_predictions(k, v, HOUR).unwrap();
        let mut buf = Vec::new();
        ciborium::ser::into_writer(v, &mut buf).unwrap();
        bytes += buf.len() as u64;
    }
    expire(&repo, "c");
    let clone = repo.repo.clone();
    assert!(repo
        .get_cached_predictions::<Vec<f32>>("a")
        .unwrap()
        .is_some());
    assert!(clone
        .get_cached_predictions::<Vec<f32>>("a")
        .unwrap()
        .is_some());
    assert!(clone
        .get_cached_predictions::<Vec<f32>>("b")
        .unwrap()
        .is_some());
    assert!(repo
        .get_cached_predictions::<Vec<f32>>("b")
        .unwrap()
        .is_some());
    assert!(repo
        .get_cached_predictions::<Vec<f32>>("c")
        .unwrap()
        .is_none());
    assert!(clone
        .get_cached_predictions::<Vec<f32>>("zzz")
        .unwrap()
        .is_none());
    assert!(repo
        .get_cached_predictions::<Vec<f32>>("zzz")
        .unwrap()
        .is_none());
    // cache_ttl is neither a hit nor a miss.
    repo.cache_ttl("a").unwrap();

    let s = repo.get_cache_statistics().unwrap();
    assert_eq!(s.total_entries, 3);
    assert_eq!(s.active_entries, 2);
    assert_eq!(s.expired_entries, 1);
    assert_eq!((s.hits, s.misses), (4, 3));
    assert!((s.hit_rate - 4.0 / 7.0).abs() < 1e-12);
    assert_eq!(s.total_access_count, 4);
    assert_eq!(s.total_bytes, bytes);
    assert_eq!(clone.get_cache_statistics().unwrap(), s);
}

#[test]
fn hits_are_buffered_and_flushed_by_close() {
    let probe = TestRepo::new();
    let handle = ModelRepository::open(common::config(&probe.schema)).unwrap();
    handle.cache_predictions("k", &1, HOUR).unwrap();
    handle.cache_predictions("other", &1, HOUR).unwrap();
    let clone = handle.clone();
    for _ in 0..3 {
        clone.get_cached_predictions::<i32>("k").unwrap();
    }
    handle.get_cached_predictions::<i32>("other").unwrap();
    // Reads stay reads: nothing written yet.
    assert_eq!(access(&probe, "k").0, 0);
    // Closing one clone while another lives flushes nothing.
    clone.close();
    assert_eq!(access(&probe, "k").0, 0);
    handle.close();
    assert_eq!(access(&probe, "k"), (3, true));
    assert_eq!(access(&probe, "other"), (1, true));
}

#[test]
fn the_last_drop_flushes_hits_like_close() {
    let probe = TestRepo::new();
    let handle = ModelRepository::open(common::config(&probe.schema)).unwrap();
    handle.cache_predictions("k", &1, HOUR).unwrap();
    handle.get_cached_predictions::<i32>("k").unwrap();
    drop(handle);
    assert_eq!(access(&probe, "k"), (1, true));
}

#[test]
fn hits_are_flushed_by_the_reaper() {
    let repo = TestRepo::with_config(|c| c.reaper_interval(Some(Duration::from_millis(100))));
    repo.cache_predictions("k", &1, HOUR).unwrap();
    for _ in 0..5 {
        repo.get_cached_predictions::<i32>("k").unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || access(&repo, "k").0 == 5),
        "hits never reached the table: {:?}",
        access(&repo, "k")
    );
    assert!(access(&repo, "k").1);
}

#[test]
fn the_reaper_deletes_expired_rows_and_leaves_live_ones() {
    let repo = TestRepo::with_config(|c| c.reaper_interval(Some(Duration::from_millis(100))));
    repo.cache_predictions("live", &1, HOUR).unwrap();
    insert_expired(&mut repo.sql(), "old", 30_000);
    assert!(eventually(Duration::from_secs(30), || common::count(
        &repo,
        "prediction_cache"
    ) == 1));
    assert_eq!(repo.get_cached_predictions::<i32>("live").unwrap(), Some(1));
}

/// Records every DELETE on the cache table: which connection (application_name) deleted how
/// many rows.
fn log_deletes(client: &mut postgres::Client) {
    client
        .batch_execute(
            "CREATE TABLE delete_log (app text, n int8);
             CREATE FUNCTION log_delete() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO delete_log SELECT current_setting('application_name'), count(*)
                 FROM gone;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER log_delete AFTER DELETE ON prediction_cache
                 REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION log_delete();",
        )
        .unwrap();
}

#[test]
#[cfg_attr(
    feature = "citus",
    ignore = "counts deletes per session with a statement trigger on the cache table; Citus runs \
              no trigger with transition tables on a distributed table (citus::the_reaper_\
              deletes_expired_rows_on_every_shard covers the reaper there)"
)]
fn two_reapers_on_one_schema_cooperate() {
    let tick = Some(Duration::from_millis(50));
    let first = TestRepo::with_config(|c| c.reaper_interval(tick));
    let mut sql = first.sql();
    log_deletes(&mut sql);
    // The second opens with its own application_name so the log tells them apart.
    let second_config = pg_model_repo::RepositoryConfig::new(url_with_app_name("reaper_two"))
        .schema(&first.schema)
        .pool_size(2)
        .reaper_interval(tick);
    let second = ModelRepository::open(second_config).unwrap();
    first.cache_predictions("live", &1, HOUR).unwrap();

    let mut inserted = 0;
    let mut both = false;
    for wave in 0..20 {
        insert_expired(&mut sql, &format!("w{wave}_"), 20_000);
        inserted += 20_000;
        assert!(
            eventually(Duration::from_secs(30), || common::count(
                &first,
                "prediction_cache"
            ) == 1),
            "expired rows left after wave {wave}"
        );
        let apps: BTreeSet<String> = sql
            .query("SELECT DISTINCT app FROM delete_log WHERE n > 0", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if apps.contains("reaper_two") && apps.contains("pg-model-repo") {
            both = true;
            break;
        }
    }
    assert!(both, "only one reaper ever deleted anything");
    // Every expired row deleted exactly once, none twice, the live one kept.
    let deleted: i64 = sql
        .query_one("SELECT coalesce(sum(n), 0)::int8 FROM delete_log", &[])
        .unwrap()
        .get(0);
    assert_eq!(deleted, inserted);
    assert_eq!(
        first.get_cached_predictions::<i32>("live").unwrap(),
        Some(1)
    );
    second.close();
}

#[test]
fn the_reaper_survives_its_connections_being_killed() {
    let app = format!("reaper_kill_{}", std::process::id());
    let schema = common::unique_schema("kill");
    let config = pg_model_repo::RepositoryConfig::new(url_with_app_name(&app))
        .schema(&schema)
        .pool_size(1)
        .max_overflow(2)
        .reaper_interval(Some(Duration::from_millis(100)));
    let repo = TestRepo {
        repo: ModelRepository::open(config).unwrap(),
        schema,
    };
    let mut sql = repo.sql();
    insert_expired(&mut sql, "a", 1000);
    assert!(eventually(Duration::from_secs(10), || common::count(
        &repo,
        "prediction_cache"
    ) == 0));

    // Kill every backend of this repository, the reaper's pooled connection included, a few
    // times over (between ticks and possibly during one).
    let mut killed = 0;
    for _ in 0..3 {
        killed += terminate_sessions(&app);
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(
        killed > 0,
        "no connection of the repository was found to kill"
    );

    insert_expired(&mut sql, "b", 1000);
    assert!(
        eventually(Duration::from_secs(20), || common::count(
            &repo,
            "prediction_cache"
        ) == 0),
        "the reaper stopped reaping after its connection was killed"
    );
    // And the flush path recovered too.
    repo.cache_predictions("k", &1, HOUR).unwrap();
    repo.get_cached_predictions::<i32>("k").unwrap();
    assert!(eventually(Duration::from_secs(10), || access(&repo, "k").0 == 1));
}

#[test]
fn close_stops_the_reaper_promptly_and_closes_connections() {
    let app = format!("reaper_close_{}", std::process::id());
    let guard = TestRepo::new();
    let interval = Duration::from_secs(60);
    let config = pg_model_repo::RepositoryConfig::new(url_with_app_name(&app))
        .schema(&guard.schema)
        .pool_size(2)
        .reaper_interval(Some(interval));
    let handle = ModelRepository::open(config).unwrap();
    // A clone closing leaves the reaper running.
    handle.clone().close();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    handle.close();
    // Within one interval (it is waiting for a tick 60 s away; it must not wait for it).
    assert!(
        started.elapsed() < interval / 4,
        "close took {:?}",
        started.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(5), || sessions_named(&app) == 0),
        "connections left open after close"
    );
}

#[test]
fn no_reaper_thread_runs_without_an_interval() {
    // reaper_interval(None) (the test default): expired rows stay until purged.
    let repo = TestRepo::new();
    insert_expired(&mut repo.sql(), "x", 10);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(common::count(&repo, "prediction_cache"), 10);
}

#[test]
fn get_or_compute_computes_once_and_then_serves_the_cache() {
    let repo = TestRepo::new();
    let calls = AtomicUsize::new(0);
    let compute = || {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok(vec![0.5f32, 0.25])
    };
    let ttl = Duration::from_secs(120);
    assert_eq!(
        repo.get_or_compute("k", ttl, compute).unwrap(),
        vec![0.5, 0.25]
    );
    assert_eq!(
        repo.get_or_compute("k", ttl, compute).unwrap(),
        vec![0.5, 0.25]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        repo.get_cached_predictions::<Vec<f32>>("k").unwrap(),
        Some(vec![0.5, 0.25])
    );
    let left = repo.cache_ttl("k").unwrap().unwrap();
    assert!(
        left <= ttl && left > ttl - Duration::from_secs(10),
        "{left:?}"
    );

    // An error from f is returned and nothing is stored.
    let failed: pg_model_repo::Result<i32> =
        repo.get_or_compute("e", ttl, || Err(RepoError::NotFound("model".into())));
    assert!(matches!(failed, Err(RepoError::NotFound(_))));
    assert_eq!(repo.cache_ttl("e").unwrap(), None);

    // Expired: computed again.
    expire(&repo, "k");
    assert_eq!(
        repo.get_or_compute("k", ttl, compute).unwrap(),
        vec![0.5, 0.25]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // A cached value of another type is recomputed and replaced.
    let s: String = repo
        .get_or_compute("k", ttl, || Ok("now a string".to_string()))
        .unwrap();
    assert_eq!(s, "now a string");
    assert_eq!(
        repo.get_cached_predictions::<String>("k")
            .unwrap()
            .as_deref(),
        Some("now a string")
    );
}

#[test]
fn cache_ttl_tells_the_time_left() {
    let repo = TestRepo::new();
    assert_eq!(repo.cache_ttl("none").unwrap(), None);
    repo.cache_predictions("k", &1, Duration::from_secs(100))
        .unwrap();
    let left = repo.cache_ttl("k").unwrap().unwrap();
    assert!(
        left <= Duration::from_secs(100) && left > Duration::from_secs(90),
        "{left:?}"
    );
    repo.clear_cache("k").unwrap();
    assert_eq!(repo.cache_ttl("k").unwrap(), None);
}

#[test]
fn the_repository_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ModelRepository>();
    check::<pg_model_repo::CacheStats>();
}
