//! Bulk loads into fresh storage (issue 22): every path all-or-nothing under a record refused
//! late, a killed stream and a panicking producer; readers see the old set or the new; a
//! writer during a rebuild loses nothing; the sweep spares a live load and removes a dead
//! one; refreshes queue instead of timing out; the FREEZE caveat as docs/embeddings.md says.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use pg_model_repo::{Embedding, LoadMethod, RepoError, RepositoryConfig};

use crate::common::{self, count, terminate_sessions, uniform_batch, TestRepo};

/// Loads in progress or left behind.
fn loads(repo: &TestRepo) -> i64 {
    count(repo, "embedding_loads")
}

fn registered(repo: &TestRepo, entity_type: &str) -> bool {
    repo.sql()
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM embedding_types WHERE entity_type = $1)",
            &[&entity_type],
        )
        .unwrap()
        .get(0)
}

/// One value of each stored vector of the type, with how many rows hold it.
fn values(repo: &TestRepo, entity_type: &str) -> Vec<(f32, usize)> {
    let mut seen: Vec<(f32, usize)> = Vec::new();
    repo.for_each_embedding(
        entity_type,
        &mut |_, v| match seen.iter_mut().find(|(x, _)| *x == v[0]) {
            Some((_, n)) => *n += 1,
            None => seen.push((v[0], 1)),
        },
    )
    .unwrap();
    seen.sort_by(|a, b| a.0.total_cmp(&b.0));
    seen
}

/// The ways a batch of one type is loaded: (label, method, whether the type holds rows first,
/// whether the batch's keys are the type's own).
const PATHS: &[(&str, LoadMethod, bool, bool)] = &[
    ("fresh, one connection", LoadMethod::Copy, false, false),
    ("fresh, streams", LoadMethod::ParallelCopy, false, false),
    ("reload, one connection", LoadMethod::Copy, true, true),
    ("reload, streams", LoadMethod::ParallelCopy, true, true),
    ("append", LoadMethod::Copy, true, false),
    ("upsert, streams", LoadMethod::ParallelCopy, true, false),
    ("multi-row", LoadMethod::MultiRowInsert, true, true),
];

#[test]
fn a_record_refused_late_writes_nothing_on_every_path() {
    let repo = TestRepo::with_config(|c| c.pool_size(3).max_overflow(3).load_streams(3));
    for (n, (label, method, has_rows, same_keys)) in PATHS.iter().enumerate() {
        let ty = format!("late_{n}");
        if *has_rows {
            repo.load_embeddings(&uniform_batch(&ty, "k", 20_000, 16, 1.0), LoadMethod::Copy)
                .unwrap();
        }
        let tables = common::storage_tables(&repo);
        let prefix = if *same_keys { "k" } else { "n" };
        let mut batch = uniform_batch(&ty, prefix, 20_000, 16, 2.0);
        batch[19_990].vector[7] = f32::NAN;
        let err = repo.load_embeddings(&batch, *method).unwrap_err();
        match &err {
            RepoError::InvalidInput(d) => assert_eq!(d.record(), Some(19_990), "{label}: {err}"),
            other => panic!("{label}: {other:?}"),
        }
        let expected = if *has_rows {
            vec![(1.0, 20_000)]
        } else {
            vec![]
        };
        assert_eq!(values(&repo, &ty), expected, "{label}");
        assert_eq!(registered(&repo, &ty), *has_rows, "{label}");
        assert_eq!(
            common::storage_tables(&repo),
            tables,
            "{label}: a table stayed behind"
        );
        assert_eq!(loads(&repo), 0, "{label}");
    }
    // The iterator form: a NaN late in the stream, a key twice.
    for method in [LoadMethod::Copy, LoadMethod::ParallelCopy] {
        let mut rows = uniform_batch("late_iter", "k", 20_000, 16, 3.0);
        rows[15_000].vector[0] = f32::INFINITY;
        let err = repo
            .load_embeddings_iter(&mut rows.into_iter(), method)
            .unwrap_err();
        assert!(
            matches!(&err, RepoError::InvalidInput(d) if d.record() == Some(15_000)),
            "{err}"
        );
        let mut rows = uniform_batch("late_iter", "k", 20_000, 16, 3.0);
        rows[17_000].entity_id = rows[3].entity_id.clone();
        let err = repo
            .load_embeddings_iter(&mut rows.into_iter(), method)
            .unwrap_err();
        assert!(err.to_string().contains("duplicate entity_id"), "{err}");
        assert!(!registered(&repo, "late_iter"));
        assert_eq!(loads(&repo), 0);
    }
}

#[test]
fn a_stream_whose_connection_is_killed_leaves_nothing_visible() {
    let app = format!("kill_streams_{}", std::process::id());
    let url = common::url_with_app_name(&app);
    let repo = TestRepo::with_config(|c| {
        RepositoryConfig::new(url)
            .schema(c.schema_name())
            .pool_size(3)
            .max_overflow(3)
            .load_streams(3)
            .reaper_interval(None)
    });
    repo.load_embeddings(
        &uniform_batch("kept", "k", 5_000, 16, 1.0),
        LoadMethod::Copy,
    )
    .unwrap();
    for (label, method, has_rows, _) in PATHS.iter().filter(|p| p.1 == LoadMethod::ParallelCopy) {
        let ty = if *has_rows { "kept" } else { "killed" };
        let batch = uniform_batch(ty, "k", 40_000, 16, 2.0);
        let kills = AtomicUsize::new(0);
        // Every attempt (the load is retried) dies midway.
        let result = repo.load_embeddings_with_progress(&batch, *method, &mut |done, _| {
            if done > 5_000 {
                kills.fetch_add(terminate_sessions(&app) as usize, Ordering::Relaxed);
            }
        });
        assert!(result.is_err(), "{label}: {result:?}");
        assert!(kills.load(Ordering::Relaxed) > 0, "{label}");
        assert_eq!(values(&repo, "kept"), vec![(1.0, 5_000)], "{label}");
        assert!(values(&repo, "killed").is_empty(), "{label}");
    }
    assert_eq!(
        common::storage_tables(&repo).len(),
        1,
        "{:?}",
        common::storage_tables(&repo)
    );
    assert_eq!(loads(&repo), 0);
    // And the repository works on.
    repo.load_embeddings(
        &uniform_batch("killed", "k", 1_000, 16, 4.0),
        LoadMethod::ParallelCopy,
    )
    .unwrap();
    assert_eq!(values(&repo, "killed"), vec![(4.0, 1_000)]);
}

#[test]
fn a_panicking_producer_leaves_nothing_visible() {
    let repo = TestRepo::with_config(|c| c.pool_size(3).max_overflow(3).load_streams(3));
    repo.load_embeddings(
        &uniform_batch("kept", "k", 5_000, 16, 1.0),
        LoadMethod::Copy,
    )
    .unwrap();
    for method in [LoadMethod::Copy, LoadMethod::ParallelCopy] {
        for ty in ["kept", "fresh"] {
            let panicking = uniform_batch(ty, "k", 40_000, 16, 2.0)
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    assert!(i < 25_000, "the producer fails");
                    e
                });
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut rows = panicking;
                repo.load_embeddings_iter(&mut rows, method)
            }));
            assert!(outcome.is_err(), "the panic reaches the caller");
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut rows = uniform_batch("kept", "r", 40_000, 16, 3.0)
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    assert!(i < 25_000, "the producer fails");
                    e
                });
            repo.replace_embeddings_iter("kept", &mut rows)
        }));
        assert!(outcome.is_err());
        assert_eq!(values(&repo, "kept"), vec![(1.0, 5_000)], "{method}");
        assert!(!registered(&repo, "fresh"), "{method}");
        assert_eq!(common::storage_tables(&repo).len(), 1, "{method}");
        assert_eq!(loads(&repo), 0, "{method}");
    }
    repo.load_embeddings(
        &uniform_batch("fresh", "k", 1_000, 16, 4.0),
        LoadMethod::ParallelCopy,
    )
    .unwrap();
    assert_eq!(values(&repo, "fresh"), vec![(4.0, 1_000)]);
}

#[test]
fn readers_see_the_old_set_or_the_new_never_a_mix() {
    let repo = TestRepo::with_config(|c| c.pool_size(3).max_overflow(3).load_streams(2));
    repo.load_embeddings(
        &uniform_batch("swap", "k", 10_000, 8, 0.0),
        LoadMethod::Copy,
    )
    .unwrap();
    let done = AtomicBool::new(false);
    let mixes = AtomicUsize::new(0);
    let reads = AtomicUsize::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut sql = repo.sql();
            while !done.load(Ordering::Relaxed) {
                let row = sql
                    .query_one(
                        "SELECT count(*), count(DISTINCT embeddings) FROM embeddings \
                         WHERE entity_type = 'swap'",
                        &[],
                    )
                    .unwrap();
                let (rows, distinct): (i64, i64) = (row.get(0), row.get(1));
                if rows != 10_000 || distinct != 1 {
                    mixes.fetch_add(1, Ordering::Relaxed);
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        });
        for round in 1..=6 {
            let batch = uniform_batch("swap", "k", 10_000, 8, round as f32);
            let method = [LoadMethod::Copy, LoadMethod::ParallelCopy][round % 2];
            repo.load_embeddings(&batch, method).unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(mixes.load(Ordering::Relaxed), 0);
    assert_eq!(values(&repo, "swap"), vec![(6.0, 10_000)]);
}

#[test]
fn a_writer_during_a_rebuild_loses_nothing() {
    let repo = TestRepo::with_config(|c| {
        c.pool_size(3)
            .max_overflow(3)
            .load_streams(2)
            .query_timeout(Duration::from_secs(20))
    });
    repo.load_embeddings(
        &uniform_batch("busy", "k", 20_000, 8, 0.0),
        LoadMethod::Copy,
    )
    .unwrap();
    let done = AtomicBool::new(false);
    let written = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut n = 0;
            while !done.load(Ordering::Relaxed) {
                repo.save_embeddings("busy", &format!("w{n:06}"), &[n as f32; 8])
                    .unwrap();
                n += 1;
            }
            n
        });
        for round in 1..=4 {
            let method = [LoadMethod::Copy, LoadMethod::ParallelCopy][round % 2];
            repo.load_embeddings(&uniform_batch("busy", "k", 20_000, 8, round as f32), method)
                .unwrap();
        }
        done.store(true, Ordering::Relaxed);
        writer.join().unwrap()
    });
    assert!(written > 0);
    let all = repo.get_all_embeddings("busy").unwrap();
    assert_eq!(all.len(), 20_000 + written);
    for n in 0..written {
        assert_eq!(all[&format!("w{n:06}")], vec![n as f32; 8]);
    }
    assert!(all
        .iter()
        .filter(|(k, _)| k.starts_with('k'))
        .all(|(_, v)| v[0] == 4.0));
}

#[test]
fn a_reload_keeps_created_at_and_no_dead_rows() {
    let repo = TestRepo::new();
    let first = uniform_batch("stamp", "k", 5_000, 96, 1.0);
    repo.load_embeddings(&first, LoadMethod::Copy).unwrap();
    let stamp = |repo: &TestRepo, id: &str| -> (std::time::SystemTime, std::time::SystemTime) {
        let row = repo
            .sql()
            .query_one(
                "SELECT created_at, updated_at FROM embeddings WHERE entity_type = 'stamp' \
                 AND entity_id = $1",
                &[&id],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    let (created, updated) = stamp(&repo, "k000042");
    std::thread::sleep(Duration::from_millis(20));
    let mut again = uniform_batch("stamp", "k", 5_000, 96, 2.0);
    again.extend(uniform_batch("stamp", "z", 100, 96, 2.0));
    repo.load_embeddings(&again, LoadMethod::ParallelCopy)
        .unwrap();
    let (created2, updated2) = stamp(&repo, "k000042");
    assert_eq!(created2, created);
    assert!(updated2 > updated);
    let (new_created, new_updated) = stamp(&repo, "z000001");
    assert_eq!(new_created, new_updated);
    // Rebuilt, not updated in place: the storage holds the rows it has, no dead versions.
    // The repository's own count of the type's table (summed over a cluster's shards).
    let bytes = repo.get_embeddings_stats().unwrap().table_bytes as f64;
    let dead: Option<i64> = repo
        .sql()
        .query_one(
            "SELECT (SELECT n_dead_tup FROM pg_stat_user_tables \
                     WHERE schemaname = current_schema() AND relname = storage) \
             FROM embedding_types WHERE entity_type = 'stamp'",
            &[],
        )
        .unwrap()
        .get(0);
    let raw = 4.0 * 96.0;
    assert!(
        bytes / 5_100.0 <= 1.15 * raw + 300.0,
        "{} bytes a row",
        bytes / 5_100.0
    );
    assert_eq!(dead.unwrap_or(0), 0);
}

/// A reload reads the stored created_at on a second connection while its rows go out, or
/// first on its own when the pool has no second one free: either way every stored key keeps
/// its created_at and every new one takes the load's time, whatever the batch's order (here
/// reversed, new keys in between: the first rows sent are the last stored).
#[test]
fn a_reload_keeps_created_at_whether_read_alongside_or_first() {
    for (label, pool_size) in [("alongside", 4), ("first", 1)] {
        let repo = TestRepo::with_config(|c| c.pool_size(pool_size).max_overflow(0));
        let first = uniform_batch("stamp", "k", 20_000, 8, 1.0);
        repo.load_embeddings(&first, LoadMethod::Copy).unwrap();
        let before = created(&repo, "stamp");
        std::thread::sleep(Duration::from_millis(20));
        let mut again: Vec<Embedding> = Vec::new();
        for (i, e) in first.iter().rev().enumerate() {
            again.push(Embedding::new("stamp", e.entity_id.clone(), vec![2.0; 8]));
            if i % 100 == 0 {
                again.push(Embedding::new("stamp", format!("new{i:05}"), vec![2.0; 8]));
            }
        }
        for method in [LoadMethod::Copy, LoadMethod::ParallelCopy] {
            repo.load_embeddings(&again, method).unwrap();
            let after = created(&repo, "stamp");
            assert_eq!(after.len(), 20_200, "{label} {method:?}");
            for (key, stamp) in &before {
                assert_eq!(&after[key], stamp, "{label} {method:?}: {key}");
            }
            let new_keys: std::collections::HashSet<&String> = after
                .iter()
                .filter(|(k, _)| k.starts_with("new"))
                .map(|(_, v)| v)
                .collect();
            assert_eq!(new_keys.len(), 1, "{label} {method:?}: one load, one time");
            assert!(!before.values().any(|v| new_keys.contains(v)), "{label}");
            assert_eq!(
                values(&repo, "stamp"),
                vec![(2.0, 20_200)],
                "{label} {method:?}"
            );
        }
    }
}

/// The second connection that reads the stored created_at of a reload dies in the middle of
/// its pass, at every attempt (the load is retried): the reload fails typed, nothing of it is
/// visible, no table is left, and the next reload works. (The read is caught in the act by
/// polling pg_stat_activity; an attempt whose reads all ended before a kill landed is a reload
/// that succeeded, and the next tries again.)
#[test]
fn a_reload_whose_created_at_reader_is_killed_leaves_nothing_visible() {
    let app = format!("kill_stamps_{}", std::process::id());
    let url = common::url_with_app_name(&app);
    let repo = TestRepo::with_config(|c| {
        RepositoryConfig::new(url)
            .schema(c.schema_name())
            .pool_size(3)
            .max_overflow(0)
            .reaper_interval(None)
    });
    let rows = 300_000;
    repo.load_embeddings(&uniform_batch("kept", "k", rows, 2, 0.0), LoadMethod::Copy)
        .unwrap();
    let mut current = 0.0;
    let mut failed = None;
    for attempt in 1..=5 {
        let value = attempt as f32;
        let done = AtomicBool::new(false);
        let (result, kills) = std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let mut admin = common::admin();
                let mut kills = 0;
                while !done.load(Ordering::Acquire) {
                    let n: i64 = admin
                        .query_one(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                             WHERE application_name = $1 AND state = 'active' \
                               AND query LIKE 'COPY (SELECT entity_id, created_at%'",
                            &[&app],
                        )
                        .unwrap()
                        .get(0);
                    kills += n;
                }
                kills
            });
            let batch = uniform_batch("kept", "k", rows, 2, value);
            let result = repo.load_embeddings(&batch, LoadMethod::Copy);
            done.store(true, Ordering::Release);
            (result, watcher.join().unwrap())
        });
        match result {
            Ok(_) => current = value,
            Err(e) => {
                assert!(kills > 0, "attempt {attempt}: {e}");
                assert!(
                    matches!(e, RepoError::Database(_) | RepoError::Io(_)),
                    "attempt {attempt}: {e:?}"
                );
                failed = Some(e);
            }
        }
        assert_eq!(
            values(&repo, "kept"),
            vec![(current, rows)],
            "attempt {attempt}"
        );
        assert_eq!(common::storage_tables(&repo).len(), 1, "attempt {attempt}");
        assert_eq!(loads(&repo), 0, "attempt {attempt}");
        if failed.is_some() {
            break;
        }
    }
    assert!(
        failed.is_some(),
        "no attempt's reads were all caught in the act"
    );
    repo.load_embeddings(&uniform_batch("kept", "k", rows, 2, 9.0), LoadMethod::Copy)
        .unwrap();
    assert_eq!(values(&repo, "kept"), vec![(9.0, rows)]);
}

/// The created_at of every row of the type, by key.
fn created(repo: &TestRepo, entity_type: &str) -> std::collections::HashMap<String, String> {
    repo.sql()
        .query(
            "SELECT entity_id, created_at::text FROM embeddings WHERE entity_type = $1",
            &[&entity_type],
        )
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[test]
fn a_reload_carries_over_every_row_it_lacks_however_many() {
    // The carry-over (sql/V011) counts the keys a reload lacks from the key indexes and
    // fetches those by key when they are few, or reads every old row when they are many or
    // the old table's pages are not all visible (rows written by streams): each branch here.
    let repo = TestRepo::new();
    let n = 4_000;
    repo.load_embeddings(&uniform_batch("carry", "k", n, 16, 1.0), LoadMethod::Copy)
        .unwrap();
    let mut expected: Vec<f32> = vec![1.0; n];
    // (value, which keys the reload holds, method): none lacking; 2% lacking (by key); 40%
    // lacking (every old row read); 2% lacking after a load by streams.
    type Keys = fn(usize) -> bool;
    let rounds: [(f32, Keys, LoadMethod); 5] = [
        (2.0, |_| true, LoadMethod::Copy),
        (3.0, |i| i % 50 != 7, LoadMethod::Copy),
        (4.0, |i| i % 5 < 3, LoadMethod::Copy),
        (5.0, |_| true, LoadMethod::ParallelCopy),
        (6.0, |i| i % 50 != 9, LoadMethod::Copy),
    ];
    for (value, holds, method) in rounds {
        let before = created(&repo, "carry");
        std::thread::sleep(Duration::from_millis(5));
        let batch: Vec<Embedding> = (0..n)
            .filter(|&i| holds(i))
            .map(|i| Embedding::new("carry", format!("k{i:06}"), vec![value; 16]))
            .collect();
        let report = repo.load_embeddings(&batch, method).unwrap();
        assert_eq!(report.rows, batch.len() as u64);
        for (i, v) in expected.iter_mut().enumerate() {
            if holds(i) {
                *v = value;
            }
        }
        let all = repo.get_all_embeddings("carry").unwrap();
        assert_eq!(all.len(), n, "reload of {value}");
        for (i, v) in expected.iter().enumerate() {
            assert_eq!(
                all[&format!("k{i:06}")],
                vec![*v; 16],
                "k{i:06} after {value}"
            );
        }
        assert_eq!(created(&repo, "carry"), before, "created_at after {value}");
    }
}

#[test]
fn the_sweep_spares_a_live_load_and_drops_a_dead_ones_table() {
    let repo = TestRepo::with_config(|c| c.pool_size(3).max_overflow(3).load_streams(2));
    // A dead load: begun by a session that then went away, a table and a record older than
    // an hour.
    {
        let mut dead = repo.sql();
        dead.query_one("SELECT * FROM embedding_load_begin('ghost', 8)", &[])
            .unwrap();
    }
    repo.sql()
        .batch_execute("UPDATE embedding_loads SET started_at = now() - interval '2 hours'")
        .unwrap();
    assert_eq!(common::storage_tables(&repo).len(), 1);
    // A live load that waits midway while the sweep runs, its record made just as old.
    let midway = Arc::new(Barrier::new(2));
    let resume = Arc::new(Barrier::new(2));
    std::thread::scope(|s| {
        let (midway2, resume2) = (midway.clone(), resume.clone());
        let loader = s.spawn(|| {
            let mut rows = uniform_batch("live", "k", 20_000, 8, 1.0)
                .into_iter()
                .enumerate()
                .map(move |(i, e)| {
                    if i == 10_000 {
                        midway2.wait();
                        resume2.wait();
                    }
                    e
                });
            repo.load_embeddings_iter(&mut rows, LoadMethod::ParallelCopy)
        });
        midway.wait();
        repo.sql()
            .batch_execute(
                "UPDATE embedding_loads SET started_at = now() - interval '2 hours' \
                 WHERE entity_type = 'live'",
            )
            .unwrap();
        let report = repo.optimize_database().unwrap();
        assert_eq!(report.leftovers_removed, 1, "the dead load's table only");
        resume.wait();
        loader.join().unwrap().unwrap();
    });
    assert_eq!(values(&repo, "live"), vec![(1.0, 20_000)]);
    assert_eq!(common::storage_tables(&repo).len(), 1);
    assert_eq!(loads(&repo), 0);
}

#[test]
fn refreshes_of_one_type_queue_and_of_two_types_never_deadlock() {
    let repo = TestRepo::with_config(|c| {
        c.pool_size(4)
            .max_overflow(4)
            .load_streams(2)
            .query_timeout(Duration::from_secs(2))
    });
    repo.replace_embeddings("a", &uniform_batch("a", "k", 100, 8, 0.0))
        .unwrap();
    repo.replace_embeddings("b", &uniform_batch("b", "k", 100, 8, 0.0))
        .unwrap();
    let start = Barrier::new(3);
    std::thread::scope(|s| {
        let same = |value: f32| {
            let (repo, start) = (&repo, &start);
            s.spawn(move || {
                start.wait();
                for round in 0..3 {
                    let batch = uniform_batch("a", "k", 60_000, 8, value + round as f32);
                    repo.replace_embeddings("a", &batch).unwrap();
                }
            })
        };
        let first = same(10.0);
        let second = same(20.0);
        let other = s.spawn(|| {
            start.wait();
            for round in 0..3 {
                let mut rows = uniform_batch("b", "k", 60_000, 8, round as f32).into_iter();
                repo.replace_embeddings_iter("b", &mut rows).unwrap();
            }
        });
        first.join().unwrap();
        second.join().unwrap();
        other.join().unwrap();
    });
    let a = values(&repo, "a");
    assert!(
        a == vec![(12.0, 60_000)] || a == vec![(22.0, 60_000)],
        "{a:?}"
    );
    assert_eq!(values(&repo, "b"), vec![(2.0, 60_000)]);
    assert_eq!(common::storage_tables(&repo).len(), 2);
}

#[test]
fn first_saves_of_a_new_type_from_many_threads_never_deadlock() {
    // A server of its own: its deadlock counter is this test's alone.
    let server = pg_model_repo::throwaway::ThrowawayServer::start(&[("max_connections", "60")])
        .expect("throwaway server");
    let repo = pg_model_repo::ModelRepository::open(
        RepositoryConfig::new(server.url())
            .vector_storage(common::test_vector_storage())
            .schema("crowd")
            .pool_size(24)
            .max_overflow(0)
            .reaper_interval(None),
    )
    .unwrap();
    let start = Barrier::new(24);
    std::thread::scope(|s| {
        for t in 0..24 {
            let (repo, start) = (&repo, &start);
            s.spawn(move || {
                start.wait();
                repo.save_embeddings("crowd", &format!("t{t}"), &[t as f32; 4])
                    .unwrap();
            });
        }
    });
    assert_eq!(repo.get_all_embeddings("crowd").unwrap().len(), 24);
    let deadlocks = deadlocks_on(&server);
    assert_eq!(deadlocks, 0, "23 of 24 threads used to deadlock here");
    repo.close();
}

#[test]
fn a_repeatable_read_reader_across_a_refresh_sees_what_the_docs_say() {
    let repo = TestRepo::with_config(|c| c.query_timeout(Duration::from_secs(5)));
    repo.replace_embeddings("rr", &uniform_batch("rr", "k", 1_000, 8, 1.0))
        .unwrap();
    let count_of = |sql: &mut postgres::Transaction<'_>| -> i64 {
        sql.query_one(
            "SELECT count(*) FROM embeddings WHERE entity_type = 'rr'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    // A reader that read the type first: the swap waits for it, and it sees the old set to
    // its end.
    let mut client = repo.sql();
    let mut reader = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    assert_eq!(count_of(&mut reader), 1_000);
    std::thread::scope(|s| {
        let refresh =
            s.spawn(|| repo.replace_embeddings("rr", &uniform_batch("rr", "n", 2_000, 8, 2.0)));
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(count_of(&mut reader), 1_000, "still the old set");
        assert!(!refresh.is_finished(), "the swap waits for the reader");
        reader.commit().unwrap();
        refresh.join().unwrap().unwrap();
    });
    // A reader whose snapshot predates the refresh, reading the type only after it: frozen
    // rows (one connection) are visible to it, rows a stream committed before the swap are
    // not (it sees the type empty).
    // Through a Citus coordinator nothing is frozen.
    let expected_of = |method| match (cfg!(feature = "citus"), method) {
        (false, LoadMethod::Copy) => 3_000,
        _ => 0,
    };
    for method in [LoadMethod::Copy, LoadMethod::ParallelCopy] {
        let expected = expected_of(method);
        let mut client = repo.sql();
        let mut reader = client
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .start()
            .unwrap();
        // The snapshot: taken by the first statement (on Citus, each worker's when the
        // transaction first reaches it: this read reaches them all), which takes no lock on
        // embeddings (that would hold the drop and the swap off until the reader ends).
        reader
            .query_one("SELECT count(*) FROM prediction_cache", &[])
            .unwrap();
        repo.drop_embedding_type("rr").unwrap();
        repo.load_embeddings(&uniform_batch("rr", "m", 3_000, 8, 3.0), method)
            .unwrap();
        assert_eq!(count_of(&mut reader), expected, "{method}");
        reader.commit().unwrap();
    }
}

/// Every path that writes many rows writes them in one key order: two loads of overlapping
/// keys in opposite orders (new keys: COPY straight into the table; stored keys: merges),
/// whatever their methods, wait for each other and never deadlock.
#[test]
fn loads_of_overlapping_keys_in_opposite_orders_never_deadlock() {
    // A server of its own: its deadlock counter is this test's alone.
    let server = pg_model_repo::throwaway::ThrowawayServer::start(&[
        ("max_connections", "60"),
        ("deadlock_timeout", "100ms"),
    ])
    .expect("throwaway server");
    let repo = pg_model_repo::ModelRepository::open(
        RepositoryConfig::new(server.url())
            .vector_storage(common::test_vector_storage())
            .schema("order")
            .pool_size(8)
            .reaper_interval(None),
    )
    .unwrap();
    // A type with rows, so that these loads upsert into it rather than rebuild it.
    repo.load_embeddings(
        &uniform_batch("t", "base", 40_000, 8, 0.0),
        LoadMethod::Copy,
    )
    .unwrap();
    let pairs = [
        (LoadMethod::Copy, LoadMethod::Copy),
        (LoadMethod::Copy, LoadMethod::ParallelCopy),
        (LoadMethod::ParallelCopy, LoadMethod::ParallelCopy),
        (LoadMethod::MultiRowInsert, LoadMethod::Copy),
    ];
    for (round, (first, second)) in pairs.into_iter().enumerate() {
        let forward = uniform_batch("t", &format!("r{round}-"), 6_000, 8, round as f32);
        let backward: Vec<Embedding> = forward.iter().rev().cloned().collect();
        // New keys first (COPY straight into the table), then the same keys again (merges).
        for pass in 0..2 {
            let start = Barrier::new(2);
            std::thread::scope(|s| {
                for (rows, method) in [(&forward, first), (&backward, second)] {
                    let (repo, start) = (&repo, &start);
                    s.spawn(move || {
                        start.wait();
                        let loaded = repo.load_embeddings(rows, method);
                        assert_eq!(loaded.unwrap().rows, 6_000, "{method:?} pass {pass}");
                    });
                }
            });
        }
    }
    assert_eq!(
        repo.get_all_embeddings("t").unwrap().len(),
        40_000 + 4 * 6_000
    );
    // Closed: every backend has exited, and reported its deadlocks.
    repo.close();
    let deadlocks = deadlocks_on(&server);
    assert_eq!(
        deadlocks, 0,
        "loads in opposite key orders deadlocked (and were retried)"
    );
}

/// Row triggers on `embeddings` (an audit, a check another team added) fire for every loaded
/// row: with one, loads go through the table, never into fresh storage, where a partition
/// attached with its rows in would fire none. A row the trigger refuses fails the load whole.
#[test]
fn row_triggers_on_embeddings_fire_for_every_load() {
    let repo = TestRepo::new();
    common::refuse_poison_rows(&mut repo.sql());
    let mut poisoned = uniform_batch("t", "k", 3_000, 4, 1.0);
    poisoned.push(Embedding::new("t", "poison", vec![0.0; 4]));
    // A new type (fresh storage without the trigger), then a type with rows (a reload).
    for base in [0, 3_000] {
        if base > 0 {
            repo.load_embeddings(&uniform_batch("t", "k", base, 4, 0.5), LoadMethod::Copy)
                .unwrap();
        }
        for method in LoadMethod::ALL {
            let err = repo.load_embeddings(&poisoned, method).unwrap_err();
            assert_refused_by_the_trigger(&err, &method.to_string());
            assert_eq!(count(&repo, "embeddings"), base as i64, "{method}");
        }
        let err = repo
            .load_embeddings_iter(&mut poisoned.clone().into_iter(), LoadMethod::Copy)
            .unwrap_err();
        assert_refused_by_the_trigger(&err, "iter");
        assert_eq!(count(&repo, "embeddings"), base as i64, "iter");
    }
}

/// The trigger's check_violation (23514). Through a Citus coordinator, a worker's error
/// during a COPY reaches the client with the worker's message and SQLSTATE XX000.
#[track_caller]
fn assert_refused_by_the_trigger(err: &RepoError, what: &str) {
    let code = err.code().map(|c| c.code().to_owned());
    let through_citus_copy = cfg!(feature = "citus") && code.as_deref() == Some("XX000");
    assert!(
        code.as_deref() == Some("23514") || through_citus_copy,
        "{what}: {err}"
    );
    assert!(err.to_string().contains("poison refused"), "{what}: {err}");
}

/// The deadlocks `server`'s database has counted (a server of the test's own: the count is
/// the test's alone).
fn deadlocks_on(server: &pg_model_repo::throwaway::ThrowawayServer) -> i64 {
    postgres::Client::connect(&server.url(), postgres::NoTls)
        .unwrap()
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .unwrap()
        .get(0)
}
