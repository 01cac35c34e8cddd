//! Change events (API.md, "Models in production"): every change the library makes notifies in
//! its own transaction, in commit order, once; subscriptions resync after a lost connection
//! and stop within a second; changes by other clients send nothing, which
//! `wait_for_alias_change` covers by reading again; on Citus the notifications come from the
//! coordinator's sessions.

use std::time::{Duration, Instant, SystemTime};

use pg_model_repo::{
    ModelEvent, ModelEventKind, ModelEvents, RetentionPolicy, MAX_EVENT_PAYLOAD_BYTES,
};
use serde_json::json;

use crate::common::{
    self, assert_invalid, psql, server_url, terminate_sessions, unique_schema, url_with_app_name,
    TestRepo,
};

/// A repository in `schema` whose sessions carry application_name `app`, so that a test can
/// find them.
fn open_named(app: &str, schema: &str) -> pg_model_repo::ModelRepository {
    let config = pg_model_repo::RepositoryConfig::new(url_with_app_name(app))
        .schema(schema)
        .pool_size(2)
        .max_overflow(4)
        .pool_timeout(Duration::from_secs(10))
        .reaper_interval(None);
    pg_model_repo::ModelRepository::open(config).unwrap()
}

/// [`open_named`] in a fresh schema, dropped at the end of the test.
fn repo_named(app: &str) -> TestRepo {
    let schema = unique_schema("ev");
    let repo = open_named(app, &schema);
    TestRepo { repo, schema }
}

/// What a test compares of an event.
type Seen = (ModelEventKind, String, Option<String>, Option<String>, bool);

fn seen(event: &ModelEvent) -> Seen {
    (
        event.kind,
        event.model_name.clone(),
        event.version.clone(),
        event.alias.clone(),
        event.resave,
    )
}

fn ev(kind: ModelEventKind, model: &str, version: &str, alias: Option<&str>) -> Seen {
    (
        kind,
        model.to_owned(),
        Some(version.to_owned()),
        alias.map(str::to_owned),
        false,
    )
}

/// The next `n` events, waiting at most 10 s for each.
fn next(events: &ModelEvents, n: usize) -> Vec<ModelEvent> {
    (0..n)
        .map(|i| {
            events
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("event {i} of {n} did not come"))
        })
        .collect()
}

/// Asserts that nothing more arrives within `wait`.
#[track_caller]
fn quiet(events: &ModelEvents, wait: Duration) {
    if let Some(event) = events.recv_timeout(wait) {
        panic!("unexpected event {event:?}");
    }
}

use ModelEventKind::*;

#[test]
fn every_change_the_library_makes_notifies_once_in_commit_order() {
    let repo = TestRepo::with_config(|c| c.model_chunk_size(64 << 10));
    let events = repo.subscribe_model_events().unwrap();
    let big = vec![7u8; 3 * (64 << 10)];
    let started = SystemTime::now();

    repo.save_model("m", "1", b"one", &json!({})).unwrap();
    repo.save_model("m", "2", &big, &json!({})).unwrap();
    repo.save_model_from_reader("m", "3", &mut &big[..], &json!({}))
        .unwrap();
    // A repeated save changes nothing but still says so; a conflicting one says nothing.
    repo.save_model("m", "1", b"one", &json!({})).unwrap();
    repo.save_model("m", "2", &big, &json!({})).unwrap();
    assert!(repo.save_model("m", "1", b"other", &json!({})).is_err());
    repo.set_model_alias("m", "champion", "1").unwrap();
    repo.set_model_alias("m", "champion", "1").unwrap(); // no move, no event
    repo.set_model_alias("m", "champion", "2").unwrap();
    assert_eq!(repo.rollback_model_alias("m", "champion").unwrap(), "1");
    repo.set_model_alias("m", "staging", "3").unwrap();
    assert!(repo.delete_model_alias("m", "staging").unwrap());
    assert!(!repo.delete_model_alias("m", "staging").unwrap());
    repo.set_model_alias("m", "staging", "3").unwrap();
    // Deleting a version removes the aliases on it: each says so.
    assert!(repo.delete_model("m", "3").unwrap());
    assert!(!repo.delete_model("m", "3").unwrap());
    repo.save_model_from_reader("m", "3", &mut &big[..], &json!({}))
        .unwrap();
    repo.delete_model("m", "1").unwrap();
    repo.save_model("m", "1", b"one again", &json!({})).unwrap();
    repo.save_model("m", "4", b"four", &json!({})).unwrap();
    assert_eq!(repo.cleanup_old_models("m", 3).unwrap(), 1);
    let report = repo
        .apply_retention(
            "m",
            &RetentionPolicy {
                keep_newest: 1,
                keep_aliased: false,
                ..RetentionPolicy::default()
            },
        )
        .unwrap();
    assert_eq!(report.removed, ["1", "3"]);

    let expected = vec![
        ev(Saved, "m", "1", None),
        ev(Saved, "m", "2", None),
        ev(Saved, "m", "3", None),
        (Saved, "m".into(), Some("1".into()), None, true),
        (Saved, "m".into(), Some("2".into()), None, true),
        ev(AliasSet, "m", "1", Some("champion")),
        ev(AliasSet, "m", "2", Some("champion")),
        ev(AliasRolledBack, "m", "1", Some("champion")),
        ev(AliasSet, "m", "3", Some("staging")),
        ev(AliasDeleted, "m", "3", Some("staging")),
        ev(AliasSet, "m", "3", Some("staging")),
        ev(Deleted, "m", "3", None),
        ev(AliasDeleted, "m", "3", Some("staging")),
        ev(Revived, "m", "3", None),
        ev(Deleted, "m", "1", None),
        ev(AliasDeleted, "m", "1", Some("champion")),
        ev(Revived, "m", "1", None),
        ev(Saved, "m", "4", None),
        // cleanup_old_models("m", 3): active by save order 4, 1, 3, 2.
        ev(CleanedUp, "m", "2", None),
        // apply_retention, newest first.
        ev(CleanedUp, "m", "1", None),
        ev(CleanedUp, "m", "3", None),
    ];
    let got = next(&events, expected.len());
    assert_eq!(got.iter().map(seen).collect::<Vec<_>>(), expected);
    quiet(&events, Duration::from_millis(300));

    // The save sequence is the one the save took, and the commit time the database's.
    let seqs: Vec<(String, i64)> = repo
        .sql()
        .query(
            "SELECT version::text, save_seq FROM ml_models ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let saved_4 = got
        .iter()
        .find(|e| e.version.as_deref() == Some("4"))
        .unwrap();
    assert_eq!(seqs, [("4".to_owned(), saved_4.save_seq.unwrap())]);
    let mut last = started - Duration::from_secs(5);
    for event in &got {
        let at = event.committed_at.expect("a commit time");
        assert!(at >= last, "in commit order: {event:?}");
        last = at;
        assert!(at < SystemTime::now() + Duration::from_secs(5));
    }
    let alias_deleted = got.iter().find(|e| e.kind == AliasDeleted).unwrap();
    assert_eq!(alias_deleted.save_seq, None);
    assert!(got
        .iter()
        .filter(|e| e.kind != AliasDeleted)
        .all(|e| e.save_seq.is_some()));
}

#[test]
fn a_subscription_sees_only_its_schema_and_only_what_commits_after_it_starts() {
    let repo = TestRepo::new();
    let other = TestRepo::new();
    repo.save_model("m", "before", b"x", &json!({})).unwrap();
    let events = repo.subscribe_model_events().unwrap();
    other
        .save_model("m", "elsewhere", b"x", &json!({}))
        .unwrap();
    repo.save_model("m", "after", b"x", &json!({})).unwrap();
    let got = next(&events, 1);
    assert_eq!(seen(&got[0]), ev(Saved, "m", "after", None));
    quiet(&events, Duration::from_millis(300));
    assert_ne!(repo.model_events_channel(), other.model_events_channel());
}

/// A change whose transaction fails at COMMIT (a deferred constraint trigger here) is never
/// seen, though its event was sent inside it. (Citus refuses triggers on distributed tables.)
#[cfg(not(feature = "citus"))]
#[test]
fn a_change_that_rolls_back_is_never_seen() {
    let repo = TestRepo::new();
    repo.sql()
        .batch_execute(
            "CREATE FUNCTION doom() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'doomed at commit'; END $$;
             CREATE CONSTRAINT TRIGGER doom AFTER INSERT OR UPDATE ON ml_models
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                 WHEN (NEW.model_name = 'doomed') EXECUTE FUNCTION doom();",
        )
        .unwrap();
    let events = repo.subscribe_model_events().unwrap();
    let err = repo
        .save_model("doomed", "1", b"x", &json!({}))
        .unwrap_err();
    assert!(err.to_string().contains("doomed at commit"), "{err}");
    repo.save_model("fine", "1", b"x", &json!({})).unwrap();
    let got = next(&events, 1);
    assert_eq!(seen(&got[0]), ev(Saved, "fine", "1", None));
    quiet(&events, Duration::from_millis(300));
    assert_eq!(repo.load_model("doomed", "1").unwrap(), None);
}

#[test]
fn the_longest_names_travel_whole() {
    let repo = TestRepo::new();
    let events = repo.subscribe_model_events().unwrap();
    // Characters JSON escapes, quotes, and four-byte ones, at the limits.
    let model: String = "\u{1}\"\\𝄞é".chars().cycle().take(255).collect();
    let version: String = "\u{1f}\"𝄞".chars().cycle().take(50).collect();
    let alias = "a-".repeat(32);
    repo.save_model(&model, &version, b"x", &json!({})).unwrap();
    repo.set_model_alias(&model, &alias, &version).unwrap();
    let got = next(&events, 2);
    assert_eq!(seen(&got[0]), ev(Saved, &model, &version, None));
    assert_eq!(seen(&got[1]), ev(AliasSet, &model, &version, Some(&alias)));
    const { assert!(MAX_EVENT_PAYLOAD_BYTES < 8000) };
}

#[test]
fn the_channel_is_documented_in_sql_and_its_payloads_are_json() {
    let repo = TestRepo::new();
    let mut sql = repo.sql();
    let channel: String = sql
        .query_one("SELECT model_events_channel()", &[])
        .unwrap()
        .get(0);
    assert_eq!(channel, repo.model_events_channel());
    assert_eq!(channel, format!("model_events.{}", repo.schema));
    // A client without the library listens as the docs say.
    sql.batch_execute(&format!("LISTEN \"{channel}\"")).unwrap();
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    let notification = {
        use postgres::fallible_iterator::FallibleIterator;
        let mut notifications = sql.notifications();
        let mut iter = notifications.timeout_iter(Duration::from_secs(10));
        iter.next().unwrap().expect("a notification")
    };
    let payload: serde_json::Value = serde_json::from_str(notification.payload()).unwrap();
    assert_eq!(payload["kind"], "saved");
    assert_eq!(payload["model"], "m");
    assert_eq!(payload["version"], "1");
    assert_eq!(payload["alias"], serde_json::Value::Null);
    assert_eq!(payload["resave"], false);
    assert!(payload["save_seq"].as_i64().unwrap() > 0);
    let at_us = payload["at_us"].as_i64().unwrap();
    let now_us = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    assert!((now_us - at_us).abs() < 60_000_000, "{at_us} vs {now_us}");
}

#[test]
fn after_its_backend_is_killed_the_subscription_resyncs_once_and_goes_on() {
    let app = format!("events-kill-{}", std::process::id());
    let repo = repo_named(&app);
    let events = repo.subscribe_model_events().unwrap();
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    assert_eq!(seen(&next(&events, 1)[0]), ev(Saved, "m", "1", None));
    // Every session of the repository, the listener's included.
    assert!(terminate_sessions(&app) >= 1);
    let resync = next(&events, 1).remove(0);
    assert_eq!(resync.kind, Resync);
    assert_eq!(
        (resync.model_name.as_str(), resync.committed_at),
        ("", None)
    );
    repo.save_model("m", "2", b"x", &json!({})).unwrap();
    assert_eq!(seen(&next(&events, 1)[0]), ev(Saved, "m", "2", None));
    quiet(&events, Duration::from_millis(300));
    assert!(events.is_running());
}

#[test]
fn dropping_a_subscription_or_closing_the_repository_stops_the_listener_within_a_second() {
    let app = format!("events-stop-{}", std::process::id());
    let schema = unique_schema("ev");
    let repo = open_named(&app, &schema);
    let listening = || {
        common::admin()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
                 AND query ILIKE 'LISTEN%'",
                &[&app],
            )
            .unwrap()
            .get::<_, i64>(0)
    };
    let events = repo.subscribe_model_events().unwrap();
    assert_eq!(listening(), 1);
    let started = Instant::now();
    drop(events);
    assert!(started.elapsed() < Duration::from_secs(1));
    let gone = Instant::now() + Duration::from_secs(1);
    while listening() > 0 && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(listening(), 0, "the listening session closed");

    let events = repo.subscribe_model_events().unwrap();
    let receiver = events.receiver().clone();
    let started = Instant::now();
    repo.clone().close(); // another clone lives: nothing stops
    assert!(events.is_running());
    repo.close();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!events.is_running(), "stopped by the close");
    // The channel is closed once the listener is gone.
    assert!(receiver.recv_timeout(Duration::from_secs(1)).is_err());
    assert_eq!(events.recv_timeout(Duration::from_millis(10)), None);
    common::drop_schema(&schema);
}

#[test]
fn changes_other_clients_make_with_sql_send_no_event() {
    let repo = TestRepo::new();
    repo.save_model("m", "1", b"one", &json!({})).unwrap();
    repo.save_model("m", "2", b"two", &json!({})).unwrap();
    repo.set_model_alias("m", "champion", "1").unwrap();
    let events = repo.subscribe_model_events().unwrap();
    let search_path = format!("SET search_path TO {}", repo.schema);
    psql(
        &server_url(),
        &[
            "-c",
            &search_path,
            "-c",
            "INSERT INTO ml_models (model_name, version, model_data) VALUES ('m', '3', 'psql')",
            "-c",
            "UPDATE ml_models SET model_data = 'one, patched' WHERE version = '1'",
            "-c",
            "UPDATE model_aliases SET version = '2' WHERE alias = 'champion'",
            "-c",
            "UPDATE ml_models SET is_active = false WHERE version = '3'",
        ],
    );
    quiet(&events, Duration::from_millis(500));
    // wait_for_alias_change reads again: it sees the move all the same.
    let started = Instant::now();
    assert_eq!(
        repo.wait_for_alias_change("m", "champion", Some("1"), Duration::from_secs(10))
            .unwrap()
            .as_deref(),
        Some("2")
    );
    assert!(started.elapsed() < Duration::from_secs(1), "already moved");
}

#[test]
fn wait_for_alias_change_answers_at_once_when_the_alias_already_moved() {
    let repo = TestRepo::new();
    repo.save_model("m", "1", b"one", &json!({})).unwrap();
    repo.save_model("m", "2", b"two", &json!({})).unwrap();
    repo.set_model_alias("m", "champion", "1").unwrap();
    repo.set_model_alias("m", "champion", "2").unwrap();
    let started = Instant::now();
    let moved = repo
        .wait_for_alias_change("m", "champion", Some("1"), Duration::from_secs(30))
        .unwrap();
    assert_eq!(moved.as_deref(), Some("2"));
    // None as current: any target is a move.
    let moved = repo
        .wait_for_alias_change("m", "champion", None, Duration::from_secs(30))
        .unwrap();
    assert_eq!(moved.as_deref(), Some("2"));
    assert!(started.elapsed() < Duration::from_secs(2));
    // Unmoved: None at the timeout.
    let started = Instant::now();
    let moved = repo
        .wait_for_alias_change("m", "champion", Some("2"), Duration::from_millis(500))
        .unwrap();
    assert_eq!(moved, None);
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn wait_for_alias_change_returns_as_soon_as_another_thread_moves_it() {
    let repo = TestRepo::new();
    repo.save_model("m", "1", b"one", &json!({})).unwrap();
    repo.save_model("m", "2", b"two", &json!({})).unwrap();
    let mover = repo.repo.clone();
    let moved_at = std::thread::scope(|s| {
        let handle = s.spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            // A set of the alias it waits on, after moves of others that do not wake it up.
            mover.set_model_alias("m", "staging", "1").unwrap();
            mover.set_model_alias("m", "champion", "2").unwrap();
            Instant::now()
        });
        let moved = repo
            .wait_for_alias_change("m", "champion", None, Duration::from_secs(30))
            .unwrap();
        let returned = Instant::now();
        assert_eq!(moved.as_deref(), Some("2"));
        returned.duration_since(handle.join().unwrap())
    });
    assert!(moved_at < Duration::from_millis(500), "{moved_at:?}");
    // A deleted alias is not a move: the wait goes on to its timeout.
    repo.delete_model_alias("m", "champion").unwrap();
    let moved = repo
        .wait_for_alias_change("m", "champion", Some("2"), Duration::from_millis(300))
        .unwrap();
    assert_eq!(moved, None);
}

#[test]
fn bad_input_to_wait_for_alias_change_is_invalid() {
    let repo = TestRepo::new();
    let t = Duration::from_secs(1);
    assert_invalid(repo.wait_for_alias_change("", "champion", None, t));
    assert_invalid(repo.wait_for_alias_change("m", "bad alias", None, t));
    assert_invalid(repo.wait_for_alias_change("m", "latest", None, t));
    assert_invalid(repo.wait_for_alias_change("m", "a", Some(""), t));
    assert_invalid(repo.wait_for_alias_change("m", "a", Some(&"v".repeat(51)), t));
}

/// With Python and psycopg: a save by Python sends no event either (and the test says when
/// it could not run).
#[test]
fn a_python_client_change_sends_no_event() {
    let python = common::python();
    let probe = std::process::Command::new(&python)
        .args(["-c", "import psycopg"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"events: python cross-check NOT RUN (no psycopg)\n",
        );
        return;
    }
    let repo = TestRepo::new();
    let events = repo.subscribe_model_events().unwrap();
    let script = format!(
        "import psycopg\n\
         with psycopg.connect({url:?}, autocommit=True) as c:\n    \
             c.execute('SET search_path TO {schema}')\n    \
             c.execute(\"INSERT INTO ml_models (model_name, version, model_data) VALUES ('py', '1', 'x')\")\n",
        url = server_url(),
        schema = repo.schema
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(repo.load_model("py", "1").unwrap().is_some());
    quiet(&events, Duration::from_millis(500));
}

/// On Citus the library's own statement notifies from the coordinator's session: a listener
/// on the coordinator hears it, from a backend of the coordinator, and no function on the
/// workers sends notifications.
#[cfg(feature = "citus")]
#[test]
fn on_citus_events_come_from_the_coordinator_session() {
    let repo = TestRepo::new();
    let events = repo.subscribe_model_events().unwrap();
    let mut sql = repo.sql();
    sql.batch_execute(&format!("LISTEN \"{}\"", repo.model_events_channel()))
        .unwrap();
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    repo.set_model_alias("m", "champion", "1").unwrap();
    repo.delete_model("m", "1").unwrap();
    let got = next(&events, 4);
    assert_eq!(
        got.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [Saved, AliasSet, Deleted, AliasDeleted]
    );
    let pid = {
        use postgres::fallible_iterator::FallibleIterator;
        let mut notifications = sql.notifications();
        let mut iter = notifications.timeout_iter(Duration::from_secs(10));
        iter.next().unwrap().expect("a notification").process_id()
    };
    let on_coordinator: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND backend_type = 'client backend'",
            &[&pid],
        )
        .unwrap()
        .get(0);
    assert_eq!(on_coordinator, 1, "sent by a coordinator session");
    let notifying: Vec<String> = sql
        .query(
            "SELECT result FROM run_command_on_workers(\
             $$SELECT count(*) FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang \
               WHERE l.lanname NOT IN ('internal', 'c') \
                 AND (p.prosrc ILIKE '%pg_notify%' OR p.prosrc ILIKE '%NOTIFY %')$$)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(notifying.iter().all(|n| n == "0"), "{notifying:?}");
}

/// A server restart (on a server of this test's own): the subscription reconnects with
/// backoff while the server is down, sends one Resync, and goes on.
#[cfg(not(feature = "citus"))]
#[test]
fn after_a_server_restart_the_subscription_reconnects_and_resyncs_once() {
    use pg_model_repo::throwaway::{StopMode, ThrowawayServer};
    let mut server = ThrowawayServer::start(&[]).unwrap();
    let repo = pg_model_repo::ModelRepository::open(
        pg_model_repo::RepositoryConfig::new(server.url())
            .schema("restart")
            .pool_size(1)
            .reaper_interval(None),
    )
    .unwrap();
    let events = repo.subscribe_model_events().unwrap();
    server.stop(StopMode::Fast).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(events.is_running(), "still trying");
    quiet(&events, Duration::from_millis(100));
    server.start_again().unwrap();
    let resync = next(&events, 1).remove(0);
    assert_eq!(resync.kind, Resync);
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    assert_eq!(seen(&next(&events, 1)[0]), ev(Saved, "m", "1", None));
    quiet(&events, Duration::from_millis(300));
    drop(events);
    repo.close();
}

#[test]
fn a_subscription_can_move_to_and_be_shared_by_other_threads() {
    fn send_sync<T: Send + Sync + std::fmt::Debug>() {}
    send_sync::<ModelEvents>();
    send_sync::<ModelEvent>();
    let repo = TestRepo::new();
    let events = repo.subscribe_model_events().unwrap();
    let got = std::thread::scope(|s| {
        let reader = s.spawn(|| events.recv_timeout(Duration::from_secs(10)));
        repo.save_model("m", "1", b"x", &json!({})).unwrap();
        reader.join().unwrap()
    });
    assert_eq!(seen(&got.unwrap()), ev(Saved, "m", "1", None));
    assert!(format!("{events:?}").contains("ModelEvents"));
}
