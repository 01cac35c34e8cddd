//! Faults against servers the tests control: killed connections, restarts, a proxy that cuts
//! connections mid-stream, statement timeouts. Nothing acknowledged may be lost, nothing may be
//! half-written, and the repository keeps working without being reopened.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg_model_repo::throwaway::{StopMode, ThrowawayServer};
use pg_model_repo::{ModelRepository, RepoError, RepositoryConfig};
use serde_json::json;

use crate::common::{sha256_hex, with_application_name};

/// A durable server (fsync and synchronous_commit on): an immediate shutdown must not lose
/// acknowledged commits.
fn own_server() -> ThrowawayServer {
    ThrowawayServer::start(&[("max_connections", "100")]).expect("throwaway server")
}

fn open(url: &str, pool_size: u32) -> ModelRepository {
    open_with(url, |c| c.pool_size(pool_size))
}

/// A repository in schema `faults` with a small pool and no reaper, adjusted by `adjust`.
fn open_with(
    url: &str,
    adjust: impl FnOnce(RepositoryConfig) -> RepositoryConfig,
) -> ModelRepository {
    let config = RepositoryConfig::new(url)
        .schema("faults")
        .max_overflow(2)
        .pool_timeout(Duration::from_secs(10))
        .reaper_interval(None);
    ModelRepository::open(adjust(config)).expect("open")
}

fn kill_repository_backends(url: &str) -> u64 {
    let mut admin = postgres::Client::connect(url, postgres::NoTls).unwrap();
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'pg-model-repo' AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .len() as u64
}

/// Opens `n` connections at once so the pool holds that many idle ones.
fn warm_up(repo: &ModelRepository, n: usize) {
    std::thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| repo.get_model_versions("warm").unwrap());
        }
    });
}

#[test]
fn killing_every_idle_connection_at_once_is_invisible_to_callers() {
    let server = own_server();
    let repo = open(&server.url(), 6);
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    warm_up(&repo, 6);
    std::thread::sleep(Duration::from_millis(200));
    assert!(kill_repository_backends(&server.url()) >= 2);
    for i in 0..20 {
        assert_eq!(
            repo.load_model("m", "1").unwrap().unwrap(),
            b"x",
            "call {i}"
        );
    }
    repo.save_model("m", "2", b"y", &json!({})).unwrap();
    assert!(kill_repository_backends(&server.url()) >= 1);
    // Writes retry too (a save is safe to repeat).
    repo.save_model("m", "3", b"z", &json!({})).unwrap();
    assert_eq!(repo.get_model_versions("m").unwrap().len(), 3);
}

/// A refresh from an iterator and a chunked save from a reader consume what cannot be sent
/// again; after every idle session of the pool died, they still start (on a session seen
/// alive first) instead of failing at once with "connection closed".
#[test]
fn streams_that_cannot_be_replayed_start_after_every_idle_connection_was_killed() {
    let server = own_server();
    let repo = open_with(&server.url(), |c| {
        c.pool_size(6).model_chunk_size(64 * 1024)
    });
    let rows = |n: usize| {
        (0..n).map(|i| pg_model_repo::Embedding::new("feed", format!("e{i}"), vec![1.0; 8]))
    };
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    for round in 0..3 {
        warm_up(&repo, 6);
        std::thread::sleep(Duration::from_millis(200));
        assert!(kill_repository_backends(&server.url()) >= 2);
        let report = repo.replace_embeddings_iter("feed", &mut rows(3000 + round));
        assert_eq!(report.unwrap().rows, 3000 + round as u64, "round {round}");

        warm_up(&repo, 6);
        std::thread::sleep(Duration::from_millis(200));
        assert!(kill_repository_backends(&server.url()) >= 2);
        let version = round.to_string();
        let info = repo.save_model_from_reader("big", &version, &mut &data[..], &json!({}));
        assert_eq!(info.unwrap().size_bytes, data.len() as u64, "round {round}");
    }
    assert_eq!(repo.load_model("big", "2").unwrap().unwrap(), data);
    assert_eq!(repo.get_all_embeddings("feed").unwrap().len(), 3002);
}

fn restart_during_workload(mode: StopMode) {
    let mut server = own_server();
    let repo = open(&server.url(), 4);
    let acknowledged = Mutex::new(BTreeSet::new());
    let errors = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..3 {
            let (repo, acknowledged, errors, stop) = (&repo, &acknowledged, &errors, &stop);
            s.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let version = format!("{t}-{i}");
                    match repo.save_model("m", &version, version.as_bytes(), &json!({"t": t})) {
                        Ok(_) => {
                            acknowledged.lock().unwrap().insert(version);
                        }
                        Err(e) => errors.lock().unwrap().push(e),
                    }
                    let _ = repo.load_model("m", "latest");
                    i += 1;
                }
            });
        }
        std::thread::sleep(Duration::from_millis(400));
        server.restart(mode).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        stop.store(true, Ordering::Relaxed);
    });
    // Errors surfaced during the outage are transient or timeouts, never anything else.
    for e in errors.lock().unwrap().iter() {
        assert!(
            e.is_transient() || matches!(e, RepoError::Timeout(_)),
            "unexpected error kind during restart: {e:?}"
        );
    }
    // After the restart everything works without reopening, and nothing acknowledged is lost.
    repo.save_model("m", "after", b"after", &json!({})).unwrap();
    let stored: BTreeSet<String> = repo
        .get_model_versions("m")
        .unwrap()
        .into_iter()
        .map(|i| i.version)
        .collect();
    for version in acknowledged.lock().unwrap().iter() {
        assert!(stored.contains(version), "acknowledged {version} was lost");
        assert_eq!(
            repo.load_model("m", version).unwrap().unwrap(),
            version.as_bytes()
        );
    }
    assert!(!acknowledged.lock().unwrap().is_empty());
}

#[test]
fn a_fast_restart_mid_workload_loses_nothing() {
    restart_during_workload(StopMode::Fast);
}

#[test]
fn an_immediate_restart_mid_workload_loses_nothing() {
    restart_during_workload(StopMode::Immediate);
}

#[test]
fn a_statement_past_query_timeout_is_a_timeout_and_the_connection_survives() {
    let server = own_server();
    let repo = open_with(&server.url(), |c| {
        c.pool_size(1)
            .max_overflow(0)
            .query_timeout(Duration::from_millis(1))
    });
    let mut admin = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
    admin
        .batch_execute(
            "INSERT INTO faults.ml_models (model_name, version, model_data, metadata)
             SELECT 'm' || g, '1', '\\x00', jsonb_build_object('n', g, 'pad', repeat('x', 200))
             FROM generate_series(1, 200000) g",
        )
        .unwrap();
    let result = repo.search_models(&json!({}));
    match &result {
        Err(e @ RepoError::Timeout(_)) => assert!(!e.is_transient()),
        other => panic!("expected Timeout, got {:?}", other.as_ref().map(Vec::len)),
    }
    // The same (only) connection still answers. A 1 ms timeout can cancel even this trivial
    // query when the machine is busy (the whole suite runs in parallel), so a few timeouts
    // may come before the answer; any other error may not.
    for attempt in 1.. {
        match repo.get_model_versions("none") {
            Ok(versions) => {
                assert!(versions.is_empty());
                break;
            }
            Err(RepoError::Timeout(_)) if attempt < 50 => {}
            Err(e) => panic!("attempt {attempt}: {e:?}"),
        }
    }
}

/// A TCP proxy between the repository and the server that can cut every connection at once.
struct CuttingProxy {
    port: u16,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl CuttingProxy {
    fn start(server_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let registry = streams.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", server_port)) else {
                    continue;
                };
                {
                    let mut all = registry.lock().unwrap();
                    all.push(client.try_clone().unwrap());
                    all.push(upstream.try_clone().unwrap());
                }
                pump(client.try_clone().unwrap(), upstream.try_clone().unwrap());
                pump(upstream, client);
            }
        });
        CuttingProxy { port, streams }
    }

    fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    fn cut_all(&self) -> usize {
        let mut all = self.streams.lock().unwrap();
        for s in all.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let n = all.len() / 2;
        all.clear();
        n
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// A writer that cuts the proxy once it has received some bytes.
struct CutAfter<'a> {
    proxy: &'a CuttingProxy,
    after: usize,
    seen: usize,
    cut: bool,
}

impl Write for CutAfter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.seen += buf.len();
        if !self.cut && self.seen >= self.after {
            self.cut = true;
            self.proxy.cut_all();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn connections_cut_mid_stream_leave_nothing_half_written() {
    let server = own_server();
    // Schema created directly, so that the proxy only carries repository traffic.
    drop(open(&server.url(), 1));
    let proxy = CuttingProxy::start(server.port());
    let repo = open(&proxy.url(), 2);
    let data: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
        .collect();

    // Cut while a streamed save is in flight: it is retried whole or reported, never half.
    let cutter = std::thread::scope(|s| {
        let cutter = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(40));
            proxy.cut_all()
        });
        let saved = repo.save_model_from_reader("big", "1", &mut &data[..], &json!({}));
        if let Err(e) = &saved {
            assert!(e.is_transient(), "{e:?}");
        }
        cutter.join().unwrap()
    });
    assert!(cutter >= 1, "the proxy carried connections");
    match repo.load_model_with_info("big", "1").unwrap() {
        Some((info, bytes)) => {
            assert_eq!(info.checksum, sha256_hex(&data));
            assert!(bytes == data);
        }
        None => repo
            .save_model_from_reader("big", "1", &mut &data[..], &json!({}))
            .map(|_| ())
            .unwrap(),
    }

    // Cut while a load streams out: the caller hears about it, the next call works.
    let mut writer = CutAfter {
        proxy: &proxy,
        after: 5 << 20,
        seen: 0,
        cut: false,
    };
    let result = repo.load_model_to_writer("big", "1", &mut writer);
    assert!(writer.cut);
    assert!(
        result.is_err(),
        "a stream cut after bytes were written must be reported"
    );
    let mut out = Vec::new();
    repo.load_model_to_writer("big", "1", &mut out)
        .unwrap()
        .unwrap();
    assert!(out == data);
    let started = Instant::now();
    assert_eq!(repo.get_model_versions("big").unwrap().len(), 1);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn close_with_the_server_down_does_not_wait_out_pool_timeout() {
    let mut server = own_server();
    let repo = open_with(&server.url(), |c| {
        c.pool_size(1)
            .pool_timeout(Duration::from_secs(30))
            .reaper_interval(Some(Duration::from_secs(3600)))
    });
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    repo.load_model("m", "1").unwrap();
    repo.cache_predictions("k", &1u8, Duration::from_secs(60))
        .unwrap();
    let _: Option<u8> = repo.get_cached_predictions("k").unwrap();
    server.stop(StopMode::Immediate).unwrap();
    let started = Instant::now();
    repo.close();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn the_reaper_keeps_working_across_a_server_restart() {
    let mut server = own_server();
    let repo = open_with(&server.url(), |c| {
        c.pool_size(2)
            .pool_timeout(Duration::from_secs(5))
            .reaper_interval(Some(Duration::from_millis(200)))
    });
    repo.cache_predictions("live", &1u8, Duration::from_secs(600))
        .unwrap();
    server.restart(StopMode::Immediate).unwrap();
    // Let a few ticks fail or find stale connections while the server comes back.
    std::thread::sleep(Duration::from_millis(600));
    let mut admin = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
    admin
        .batch_execute(
            "INSERT INTO faults.prediction_cache (cache_key, predictions, cached_at, expires_at)
             SELECT 'old' || g, '\\x00', now() - interval '1 hour', now() - interval '1 minute'
             FROM generate_series(1, 500) g",
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = || -> i64 {
        admin_count(
            &server.url(),
            "SELECT count(*) FROM faults.prediction_cache WHERE cache_key LIKE 'old%'",
        )
    };
    while left() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        left(),
        0,
        "the reaper deleted the expired rows after the restart"
    );
    let live: Option<u8> = repo.get_cached_predictions("live").unwrap();
    assert_eq!(live, Some(1));
}

fn admin_count(url: &str, sql: &str) -> i64 {
    let mut admin = postgres::Client::connect(url, postgres::NoTls).unwrap();
    admin.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn a_panic_in_the_callers_closure_never_returns_a_session_mid_query() {
    let server = own_server();
    let app = "panic_test";
    let url = with_application_name(&server.url(), app);
    let repo = open_with(&url, |c| c.pool_size(1).max_overflow(0));
    let backend = || -> Vec<i32> {
        let mut admin = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
        admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    // The pool's one session, once the server shows exactly one (under load a session the
    // pool replaced may still be on its way out, or its replacement on its way in).
    let one_backend = || -> Vec<i32> {
        let started = Instant::now();
        loop {
            let found = backend();
            if found.len() == 1 || started.elapsed() > Duration::from_secs(10) {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let batch: Vec<pg_model_repo::Embedding> = (0..20_000)
        .map(|i| pg_model_repo::Embedding::new("user", format!("u{i}"), vec![i as f32; 16]))
        .collect();
    repo.batch_save_embeddings(&batch).unwrap();
    repo.save_model("m", "1", &vec![7u8; 9 << 20], &json!({}))
        .unwrap();

    let before = one_backend();
    assert_eq!(before.len(), 1);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut seen = 0;
        repo.for_each_embedding("user", &mut |_, _| {
            seen += 1;
            if seen == 10 {
                panic!("caller bug");
            }
        })
    }));
    assert!(panicked.is_err());
    // The only pooled session must not be the one left mid-COPY: it was discarded.
    assert_eq!(
        repo.get_embeddings("user", "u5").unwrap(),
        Some(vec![5.0; 16])
    );
    let after = one_backend();
    assert_eq!(after.len(), 1);
    assert!(
        !before.contains(&after[0]),
        "the session that streamed was reused"
    );
    let mut rows = 0;
    assert_eq!(
        repo.for_each_embedding("user", &mut |_, _| rows += 1)
            .unwrap(),
        20_000
    );
    assert_eq!(rows, 20_000);

    struct PanickingWriter;
    impl Write for PanickingWriter {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            panic!("writer bug")
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        repo.load_model_to_writer("m", "1", &mut PanickingWriter)
    }));
    assert!(panicked.is_err());
    let before_writer = after;
    assert_eq!(repo.get_model_versions("m").unwrap().len(), 1);
    assert_ne!(
        one_backend(),
        before_writer,
        "the session the writer panicked in was reused"
    );
    assert_eq!(repo.load_model("m", "1").unwrap().unwrap().len(), 9 << 20);
}

#[test]
fn statistics_calls_with_buffered_counts_survive_a_mass_kill() {
    let server = own_server();
    let repo = open(&server.url(), 4);
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    repo.cache_predictions("k", &1u8, Duration::from_secs(600))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(repo.get_cached_predictions::<u8>("k").unwrap(), Some(1));
    }
    warm_up(&repo, 4);
    std::thread::sleep(Duration::from_millis(200));
    assert!(kill_repository_backends(&server.url()) >= 2);
    assert_eq!(repo.get_cache_statistics().unwrap().total_access_count, 3);

    repo.load_model("m", "1").unwrap();
    repo.load_model("m", "1").unwrap();
    warm_up(&repo, 4);
    std::thread::sleep(Duration::from_millis(200));
    assert!(kill_repository_backends(&server.url()) >= 2);
    let stats = repo.get_model_storage_stats().unwrap();
    assert_eq!(stats.models[0].load_count, 2);
}
