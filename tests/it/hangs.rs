//! A hung server (every process SIGSTOPped, on a throwaway server of the test's own, resumed
//! at the end) and a stopped one: no call blocks past its bound, hung connections are cut and
//! discarded, and everything works again once the server is back.

use std::io::Write;
use std::time::{Duration, Instant};

use pg_model_repo::throwaway::{StopMode, ThrowawayServer};
use pg_model_repo::{Embedding, HealthStatus, ModelRepository, RepoError, RepositoryConfig};
use serde_json::json;

use crate::logging::LogWatch;

/// The watchdog looks every 50 ms; the rest is scheduling on a busy 2-core machine.
const MARGIN: Duration = Duration::from_secs(1);

const POOL_TIMEOUT: Duration = Duration::from_secs(3);
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const STREAM_IDLE: Duration = Duration::from_secs(2);

/// The contract's bound of a call that is not a stream or a bulk load (API.md, "Faults"):
/// one deadline, pool_timeout + query_timeout + 2 s, whatever happens inside the call.
fn call_bound(pool_timeout: Duration, query_timeout: Duration) -> Duration {
    pool_timeout + query_timeout + Duration::from_secs(2)
}

fn own_server() -> ThrowawayServer {
    ThrowawayServer::start(&[("max_connections", "100")]).expect("throwaway server")
}

fn config(url: &str) -> RepositoryConfig {
    RepositoryConfig::new(url)
        .schema("hangs")
        .pool_size(3)
        .max_overflow(3)
        .pool_timeout(POOL_TIMEOUT)
        .query_timeout(QUERY_TIMEOUT)
        .stream_idle_timeout(STREAM_IDLE)
        .reaper_interval(None)
}

/// Runs `f`, returning what it returned and how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed())
}

#[track_caller]
fn assert_within(what: &str, took: Duration, bound: Duration) {
    println!("{what}: {took:?} (bound {bound:?})");
    assert!(
        took <= bound + MARGIN,
        "{what} took {took:?}; its bound is {bound:?}"
    );
}

#[track_caller]
fn assert_timeout<T: std::fmt::Debug>(what: &str, result: pg_model_repo::Result<T>) {
    match result {
        Err(RepoError::Timeout(_) | RepoError::OutcomeUnknown(_)) => {}
        other => panic!("{what}: expected Timeout, got {other:?}"),
    }
}

#[test]
fn calls_on_a_frozen_server_return_within_their_bounds_and_work_after_it_resumes() {
    let server = own_server();
    let repo = ModelRepository::open(config(&server.url())).unwrap();
    repo.save_model("m", "1", &vec![7u8; 1 << 20], &json!({}))
        .unwrap();
    repo.cache_predictions("k", &1u8, Duration::from_secs(600))
        .unwrap();
    // Every pooled connection open and idle when the server freezes.
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| repo.get_model_versions("m").unwrap());
        }
    });

    let frozen = server.freeze().unwrap();
    // All at once: six callers on a pool of six, each with its own bound.
    std::thread::scope(|s| {
        let health = s.spawn(|| timed(|| repo.health_check()));
        let load = s.spawn(|| timed(|| repo.load_model("m", "1")));
        let read = s.spawn(|| timed(|| repo.get_model_versions("m")));
        let write =
            s.spawn(|| timed(|| repo.cache_predictions("k2", &2u8, Duration::from_secs(60))));
        let delete = s.spawn(|| timed(|| repo.delete_model("m", "1")));
        let hit = s.spawn(|| timed(|| repo.get_cached_predictions::<u8>("k")));

        let (report, took) = health.join().unwrap();
        assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
        assert_within("health_check", took, POOL_TIMEOUT);
        let call_bound = call_bound(POOL_TIMEOUT, QUERY_TIMEOUT);
        let (result, took) = load.join().unwrap();
        assert_timeout("load_model", result);
        assert_within("load_model", took, call_bound);
        let (result, took) = read.join().unwrap();
        assert_timeout("get_model_versions", result);
        assert_within("get_model_versions", took, call_bound);
        let (result, took) = write.join().unwrap();
        assert_timeout("cache_predictions", result);
        assert_within("cache_predictions", took, call_bound);
        let (result, took) = delete.join().unwrap();
        assert_timeout("delete_model", result);
        assert_within("delete_model", took, call_bound);
        let (result, took) = hit.join().unwrap();
        assert_timeout("get_cached_predictions", result);
        assert_within("get_cached_predictions", took, call_bound);
    });
    // A new repository cannot log in: bounded by connect_timeout (min(pool_timeout, 10 s)).
    let (opened, took) = timed(|| ModelRepository::open(config(&server.url())));
    assert!(opened.is_err());
    assert_within("open", took, POOL_TIMEOUT);
    frozen.thaw();

    // The cut connections were discarded: every call works again without reopening.
    assert_eq!(repo.load_model("m", "1").unwrap().unwrap().len(), 1 << 20);
    assert_eq!(repo.get_cached_predictions::<u8>("k").unwrap(), Some(1));
    assert_eq!(repo.health_check().status, HealthStatus::Healthy);
    repo.close();
}

/// The calls of issue 23: on a frozen server, with stream_idle_timeout at its default (600 s),
/// a call that is not a stream still returns by its one deadline, on a pool too small for
/// both callers (pool_size 2, max_overflow 0: health_check and load_model each hold one).
#[test]
fn a_frozen_server_holds_no_call_past_its_one_deadline_whatever_stream_idle_timeout_says() {
    let server = own_server();
    let config = RepositoryConfig::new(server.url())
        .schema("hangs")
        .pool_size(2)
        .max_overflow(0)
        .pool_timeout(POOL_TIMEOUT)
        .query_timeout(QUERY_TIMEOUT)
        .reaper_interval(None);
    let repo = ModelRepository::open(config).unwrap();
    repo.save_model("m", "1", &vec![1u8; 1 << 20], &json!({}))
        .unwrap();
    // Chunked: its transfer is a stream, but the call starts as an ordinary one.
    repo.save_model("big", "1", &vec![2u8; 9 << 20], &json!({}))
        .unwrap();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| repo.get_model_versions("m").unwrap());
        }
    });
    let bound = call_bound(POOL_TIMEOUT, QUERY_TIMEOUT);
    let frozen = server.freeze().unwrap();
    std::thread::scope(|s| {
        let health = s.spawn(|| timed(|| repo.health_check()));
        let load = s.spawn(|| timed(|| repo.load_model("m", "1")));
        let (report, took) = health.join().unwrap();
        assert_eq!(report.status, HealthStatus::Unhealthy);
        assert_within("health_check", took, POOL_TIMEOUT);
        let (result, took) = load.join().unwrap();
        assert_timeout("load_model", result);
        assert_within("load_model", took, bound);
    });
    for (what, version) in [
        ("load_model of a chunked model", "big"),
        ("load_model", "m"),
    ] {
        let (result, took) =
            timed(|| repo.load_model(if version == "big" { "big" } else { "m" }, "1"));
        assert_timeout(what, result);
        assert_within(what, took, bound);
    }
    let (result, took) = timed(|| repo.save_model("m", "2", b"x", &json!({})));
    assert_timeout("save_model", result);
    assert_within("save_model", took, bound);
    frozen.thaw();
    assert_eq!(repo.load_model("big", "1").unwrap().unwrap().len(), 9 << 20);
    repo.close();
}

/// Freezes the server once `after` bytes reached it.
struct FreezeAfter<'a> {
    server: &'a ThrowawayServer,
    after: usize,
    seen: usize,
    frozen: Option<pg_model_repo::throwaway::Frozen>,
}

impl Write for FreezeAfter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.seen += buf.len();
        if self.frozen.is_none() && self.seen >= self.after {
            self.frozen = Some(self.server.freeze().unwrap());
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stream_that_stops_moving_is_cut_after_stream_idle_timeout() {
    let server = own_server();
    let repo = ModelRepository::open(config(&server.url())).unwrap();
    let data = vec![3u8; 24 << 20];
    repo.save_model("big", "1", &data, &json!({})).unwrap();
    let mut writer = FreezeAfter {
        server: &server,
        after: 4 << 20,
        seen: 0,
        frozen: None,
    };
    let (result, took) = timed(|| repo.load_model_to_writer("big", "1", &mut writer));
    assert!(writer.frozen.is_some());
    // Bytes reached the writer: the stream is reported interrupted, its cause the cut.
    let e = result.unwrap_err();
    assert!(e.to_string().contains("no reply from the server"), "{e}");
    assert_within("load_model_to_writer", took, STREAM_IDLE);
    drop(writer);
    let mut out = Vec::new();
    repo.load_model_to_writer("big", "1", &mut out).unwrap();
    assert!(out == data);
}

/// Sleeps once, after `after` bytes, far longer than every bound.
struct SlowWriter {
    after: usize,
    seen: usize,
    slept: bool,
}

impl Write for SlowWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.seen += buf.len();
        if !self.slept && self.seen >= self.after {
            self.slept = true;
            std::thread::sleep(Duration::from_millis(3500));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_slow_caller_is_never_mistaken_for_a_hung_server() {
    let server = own_server();
    let repo = ModelRepository::open(
        config(&server.url())
            .query_timeout(Duration::from_millis(500))
            .stream_idle_timeout(Duration::from_secs(1)),
    )
    .unwrap();
    let data = vec![5u8; 12 << 20];
    repo.save_model("m", "1", &data, &json!({})).unwrap();
    let mut writer = SlowWriter {
        after: 2 << 20,
        seen: 0,
        slept: false,
    };
    let info = repo
        .load_model_to_writer("m", "1", &mut writer)
        .unwrap()
        .unwrap();
    assert!(writer.slept);
    assert_eq!(info.size_bytes, data.len() as u64);

    let batch: Vec<Embedding> = (0..5000)
        .map(|i| Embedding::new("t", format!("e{i}"), vec![i as f32; 64]))
        .collect();
    repo.batch_save_embeddings(&batch).unwrap();
    let mut rows = 0;
    repo.for_each_embedding("t", &mut |_, _| {
        rows += 1;
        if rows == 10 {
            std::thread::sleep(Duration::from_millis(2500));
        }
    })
    .unwrap();
    assert_eq!(rows, 5000);
}

#[test]
fn close_with_the_server_stopped_and_the_reaper_waiting_returns_within_3_s() {
    let mut server = own_server();
    let repo = ModelRepository::open(
        config(&server.url())
            .pool_size(1)
            .max_overflow(0)
            .pool_timeout(Duration::from_secs(15))
            .reaper_interval(Some(Duration::from_millis(100))),
    )
    .unwrap();
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    repo.cache_predictions("k", &1u8, Duration::from_secs(600))
        .unwrap();
    server.stop(StopMode::Immediate).unwrap();
    // Let the reaper's ticks find the server gone and wait on the pool (15 s).
    std::thread::sleep(Duration::from_millis(500));
    let (_, took) = timed(|| repo.close());
    println!("close: {took:?}");
    assert!(took < Duration::from_secs(3), "close took {took:?}");
}

#[test]
fn close_with_the_server_frozen_mid_purge_returns_within_3_s_and_says_what_it_lost() {
    let server = own_server();
    let repo = ModelRepository::open(
        config(&server.url())
            .pool_timeout(Duration::from_secs(15))
            .query_timeout(Duration::from_secs(10))
            .reaper_interval(Some(Duration::from_millis(100))),
    )
    .unwrap();
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    repo.cache_predictions("k", &1u8, Duration::from_secs(600))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Counted in memory, written by the next tick or the close.
    repo.load_model("m", "1").unwrap();
    assert_eq!(repo.get_cached_predictions::<u8>("k").unwrap(), Some(1));
    let watch = LogWatch::start(&["close of schema hangs could not write"]);
    let frozen = server.freeze().unwrap();
    // The reaper's next tick now waits on the frozen server.
    std::thread::sleep(Duration::from_millis(400));
    let (_, took) = timed(|| repo.close());
    println!("close: {took:?}");
    assert!(took < Duration::from_secs(3), "close took {took:?}");
    let (_, lines) = watch.seen();
    drop(watch);
    drop(frozen);
    assert!(
        lines.iter().any(|l| l.contains("not written")),
        "the close says what it could not write: {lines:?}"
    );
}

/// A call that gives up cancels what it started: an index build cut by stream_idle_timeout
/// (here: it waits on a lock another session holds, and sends nothing) does not go on on the
/// server, holding its place in the lock queue and blocking the type's next writes behind it.
#[test]
fn an_index_build_cut_by_stream_idle_timeout_does_not_go_on_running_on_the_server() {
    let server = own_server();
    let stream_idle = Duration::from_secs(1);
    let config = config(&server.url())
        .query_timeout(Duration::from_secs(60))
        .stream_idle_timeout(stream_idle);
    let repo = ModelRepository::open(config).unwrap();
    let rows: Vec<Embedding> = (0..200)
        .map(|i| Embedding::new("item", format!("i{i}"), vec![i as f32, 1.0, 2.0]))
        .collect();
    repo.replace_embeddings("item", &rows).unwrap();

    let mut admin = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
    let mut holder = admin.transaction().unwrap();
    holder
        .batch_execute("LOCK TABLE hangs.embeddings IN ROW EXCLUSIVE MODE")
        .unwrap();
    let (built, took) = timed(|| repo.create_vector_index("item", pg_model_repo::Metric::L2));
    match built {
        Err(RepoError::InvalidInput(m)) if m.message().contains("pgvector") => {
            println!("NOT RUN: the server has no pgvector ({m})");
            return;
        }
        Err(RepoError::Timeout(_)) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert_within("create_vector_index", took, stream_idle);

    // The server ends the build it was left with within a second or two.
    let mut watcher = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
    let orphans = |watcher: &mut postgres::Client| -> i64 {
        watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = 'pg-model-repo' AND state = 'active'
                   AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let gone_by = Instant::now() + Duration::from_secs(3);
    while orphans(&mut watcher) > 0 && Instant::now() < gone_by {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        orphans(&mut watcher),
        0,
        "the abandoned build still waits in the lock queue"
    );
    holder.commit().unwrap();
    repo.create_vector_index("item", pg_model_repo::Metric::L2)
        .unwrap();
}

const DNS_CHILD: &str = "PG_MODEL_REPO_TEST_DNS_CHILD";

/// Not a test of its own: the child process of
/// `a_resolver_that_never_answers_holds_no_login_past_its_bound`, run in a mount namespace
/// whose /etc/resolv.conf names a DNS server that never answers.
#[test]
#[ignore = "the child process of a_resolver_that_never_answers_holds_no_login_past_its_bound"]
fn child_opening_through_a_silent_resolver() {
    let host = std::env::var(DNS_CHILD).expect("run by its parent test only");
    let config = RepositoryConfig::new(format!("postgres://postgres@{host}:5432/postgres"))
        .schema("dns")
        .pool_size(1)
        .max_overflow(0)
        .pool_timeout(POOL_TIMEOUT)
        .query_timeout(QUERY_TIMEOUT)
        .reaper_interval(None);
    let (opened, took) = timed(|| ModelRepository::open(config));
    match opened {
        Err(RepoError::Timeout(d)) => assert!(d.to_string().contains("resolv"), "{d}"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    // The login's bound: connect_timeout, min(pool_timeout, 10 s) when the URL names none.
    assert_within("open through a silent resolver", took, POOL_TIMEOUT);
}

/// DNS resolution is bounded like the rest of a login: with a resolver that takes queries and
/// never answers (it would keep the system's getaddrinfo waiting 3 x 20 s), opening a
/// repository by host name fails with `Timeout` within its bound.
#[test]
fn a_resolver_that_never_answers_holds_no_login_past_its_bound() {
    // A DNS server that reads queries and never answers, on a loopback address of its own.
    let silent = match std::net::UdpSocket::bind("127.0.0.77:53") {
        Ok(socket) => socket,
        Err(e) => {
            println!("NOT RUN: cannot listen on 127.0.0.77:53 ({e}): needs root");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.77\noptions timeout:20 attempts:3\n",
    )
    .unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/resolv.conf || exit 77; exec \"$@\"")
        .arg(&resolv)
        .arg(&exe)
        .args([
            "--exact",
            "hangs::child_opening_through_a_silent_resolver",
            "--ignored",
            "--nocapture",
        ])
        .env(DNS_CHILD, "pg-model-repo-dns-test.example")
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(40) {
            child.kill().unwrap();
            panic!("opening waited on the resolver for 40 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if status.code() == Some(77) {
        println!("NOT RUN: no mount namespace here (unshare -m and mount need CAP_SYS_ADMIN)");
        return;
    }
    let mut query = [0u8; 512];
    silent.set_nonblocking(true).unwrap();
    assert!(
        silent.recv(&mut query).is_ok(),
        "the resolver was not asked"
    );
    assert!(status.success(), "the child failed: {status}");
}
