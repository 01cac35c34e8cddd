//! The pool's thread affinity, seen from the server: which backend each call used (the
//! session of the repository's application_name that went idle last), how a full pool hands a
//! parked connection to a waiter, what close does with parked connections, and what happens
//! to a parked connection the server killed.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use pg_model_repo::{ModelRepository, PoolStatus, RepoError, RepositoryConfig, TimeoutKind};

use crate::common::{admin, drop_schema, sessions_named, unique_schema, url_with_app_name};

/// A repository in a fresh schema under its own application_name, so that the test finds
/// its sessions.
fn open(
    app: &str,
    adjust: impl FnOnce(RepositoryConfig) -> RepositoryConfig,
) -> (ModelRepository, String) {
    let schema = unique_schema("pool");
    let config = RepositoryConfig::new(url_with_app_name(app))
        .schema(&schema)
        .pool_timeout(Duration::from_secs(10))
        .reaper_interval(None);
    let repo = ModelRepository::open(adjust(config)).expect("open repository");
    (repo, schema)
}

/// One cheap call (a cache miss: one primary-key read).
fn call(repo: &ModelRepository) {
    let found: Option<u32> = repo.get_cached_predictions("nothing here").unwrap();
    assert_eq!(found, None);
}

/// The backend of `app` that finished a statement last: the one the last call used.
fn last_used_backend(app: &str) -> i32 {
    admin()
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND state = 'idle'
             ORDER BY state_change DESC LIMIT 1",
            &[&app],
        )
        .unwrap()
        .get(0)
}

/// Waits until the pool has opened `n` connections and none is in use.
fn wait_for_idle(repo: &ModelRepository, n: u32) {
    let started = Instant::now();
    loop {
        let state = repo.pool_state();
        if state.connections == n && state.idle == n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the pool never had {n} idle connections: {state:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A thread that makes one call each time it is told to, and says when it is done (so the
/// test decides the order of calls across threads); it ends when `go` is dropped.
fn caller<'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    repo: &ModelRepository,
) -> (mpsc::Sender<()>, mpsc::Receiver<Duration>) {
    let (go, turns) = mpsc::channel::<()>();
    let (done, finished) = mpsc::channel();
    let repo = repo.clone();
    s.spawn(move || {
        for () in turns {
            let started = Instant::now();
            call(&repo);
            done.send(started.elapsed()).unwrap();
        }
    });
    (go, finished)
}

/// Runs one call on the thread behind `go` and waits for it; returns how long it took.
fn turn(go: &mpsc::Sender<()>, finished: &mpsc::Receiver<Duration>) -> Duration {
    go.send(()).unwrap();
    finished.recv_timeout(Duration::from_secs(30)).unwrap()
}

#[test]
fn each_thread_gets_back_the_backend_it_used_last() {
    let app = "pool_affinity";
    let (repo, schema) = open(app, |c| c.pool_size(2).max_overflow(0));
    wait_for_idle(&repo, 2);
    std::thread::scope(|s| {
        let (a, a_done) = caller(s, &repo);
        let (b, b_done) = caller(s, &repo);
        let (mut a_pids, mut b_pids) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            turn(&a, &a_done);
            a_pids.push(last_used_backend(app));
            turn(&b, &b_done);
            b_pids.push(last_used_backend(app));
        }
        // Handed out last-returned-first, as r2d2 alone does, both threads would get the
        // same backend every time.
        assert!(a_pids.iter().all(|p| *p == a_pids[0]), "{a_pids:?}");
        assert!(b_pids.iter().all(|p| *p == b_pids[0]), "{b_pids:?}");
        assert_ne!(a_pids[0], b_pids[0]);
        // Parked connections count as idle.
        let state = repo.pool_state();
        assert_eq!((state.connections, state.idle), (2, 2), "{state:?}");
    });
    repo.close();
    drop_schema(&schema);
}

#[test]
fn a_thread_takes_the_connection_another_thread_parked_when_the_pool_is_full() {
    let app = "pool_steal";
    let (repo, schema) = open(app, |c| {
        c.pool_size(1)
            .max_overflow(0)
            .pool_timeout(Duration::from_secs(5))
    });
    wait_for_idle(&repo, 1);
    std::thread::scope(|s| {
        let (a, a_done) = caller(s, &repo);
        let (b, b_done) = caller(s, &repo);
        // The only connection is parked for whichever thread ran last, which stays alive: the
        // other takes it at once rather than waiting for the pool, or for the sweep that
        // returns parked connections to it after 1-2 s.
        for _ in 0..5 {
            for (go, finished) in [(&a, &a_done), (&b, &b_done)] {
                let took = turn(go, finished);
                assert!(took < Duration::from_millis(900), "a call took {took:?}");
            }
        }
    });
    assert_eq!(repo.pool_state().connections, 1);
    repo.close();
    drop_schema(&schema);
}

#[test]
fn a_pool_of_one_serves_two_busy_threads_without_a_timeout() {
    let (repo, schema) = open("pool_one_two", |c| {
        c.pool_size(1)
            .max_overflow(0)
            .pool_timeout(Duration::from_secs(3))
    });
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let repo = &repo;
            s.spawn(move || {
                for i in 0..300u64 {
                    call(repo);
                    // Now and then, let the connection sit parked while the other thread
                    // wants it.
                    if (i + t) % 7 == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            });
        }
    });
    let metric = repo
        .get_performance_metrics()
        .into_iter()
        .find(|m| m.query_type == "get_cached_predictions")
        .unwrap();
    assert_eq!((metric.count, metric.errors), (600, 0));
    assert_eq!(repo.pool_state().connections, 1);
    repo.close();
    drop_schema(&schema);
}

#[test]
fn close_closes_the_connections_threads_have_parked() {
    let app = "pool_close_parked";
    let (repo, schema) = open(app, |c| c.pool_size(3).max_overflow(0));
    wait_for_idle(&repo, 3);
    let (done, called) = mpsc::channel();
    let (end, ended) = mpsc::channel::<()>();
    let ended = std::sync::Arc::new(std::sync::Mutex::new(ended));
    std::thread::scope(|s| {
        for _ in 0..3 {
            let (repo, done, ended) = (repo.clone(), done.clone(), ended.clone());
            s.spawn(move || {
                call(&repo);
                // This thread's connection stays parked for it; its handle goes.
                drop(repo);
                done.send(()).unwrap();
                // Alive until the test is over.
                let _ = ended.lock().unwrap().recv();
            });
        }
        for _ in 0..3 {
            called.recv_timeout(Duration::from_secs(30)).unwrap();
        }
        assert_eq!(sessions_named(app), 3);
        let started = Instant::now();
        repo.close();
        assert!(started.elapsed() < Duration::from_secs(2));
        let started = Instant::now();
        while sessions_named(app) > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{} sessions left after close",
                sessions_named(app)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(end);
    });
    drop_schema(&schema);
}

#[test]
fn a_parked_connection_the_server_killed_is_never_handed_out_again() {
    let app = "pool_parked_killed";
    let (repo, schema) = open(app, |c| c.pool_size(2).max_overflow(0));
    wait_for_idle(&repo, 2);
    std::thread::scope(|s| {
        let (a, a_done) = caller(s, &repo);
        turn(&a, &a_done);
        let parked = last_used_backend(app);
        let mut admin = admin();
        let killed: bool = admin
            .query_one("SELECT pg_terminate_backend($1::int4)", &[&parked])
            .unwrap()
            .get(0);
        assert!(killed);
        let started = Instant::now();
        loop {
            let gone: bool = admin
                .query_one(
                    "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
                    &[&parked],
                )
                .unwrap()
                .get(0);
            if gone {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
        // The thread's next call finds its parked connection dead, drops it and succeeds on
        // another (the metrics below count no error); it never sees the dead one again. The
        // pool replaces the dead one meanwhile: once that new session is idle too, the one
        // that went idle last is the thread's.
        turn(&a, &a_done);
        wait_for_idle(&repo, 2);
        let mut used = Vec::new();
        for _ in 0..5 {
            turn(&a, &a_done);
            used.push(last_used_backend(app));
        }
        assert!(!used.contains(&parked), "{parked} in {used:?}");
        assert!(used.iter().all(|p| *p == used[0]), "{used:?}");
    });
    let metric = repo
        .get_performance_metrics()
        .into_iter()
        .find(|m| m.query_type == "get_cached_predictions")
        .unwrap();
    assert_eq!((metric.count, metric.errors), (7, 0));
    repo.close();
    drop_schema(&schema);
}

#[test]
fn connections_over_a_unix_domain_socket_work_as_over_tcp() {
    use pg_model_repo::throwaway::ThrowawayServer;

    let server = ThrowawayServer::start(&[]).expect("throwaway server");
    let socket_dir = server.data_dir().parent().unwrap().to_owned();
    let url = format!(
        "host={} port={} user=postgres dbname=postgres application_name=pool_unix",
        socket_dir.display(),
        server.port()
    );
    let repo = ModelRepository::open(
        RepositoryConfig::new(url)
            .schema("unix_socket")
            .pool_size(2)
            .max_overflow(0)
            .reaper_interval(None),
    )
    .expect("open over a Unix-domain socket");
    repo.cache_predictions("k", &[1.5_f32], Duration::from_secs(60))
        .unwrap();
    let value: Option<Vec<f32>> = repo.get_cached_predictions("k").unwrap();
    assert_eq!(value, Some(vec![1.5]));
    let mut admin = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
    let (sessions, over_tcp): (i64, i64) = {
        let row = admin
            .query_one(
                "SELECT count(*), count(client_addr) FROM pg_stat_activity
                 WHERE application_name = 'pool_unix'",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(sessions >= 1);
    assert_eq!(
        over_tcp, 0,
        "every session of the repository is on the socket"
    );
    repo.close();
}

/// Threads that each hold one pooled connection (a stream paused in its callback) until
/// [`release`](Holders::release).
pub(crate) struct Holders {
    release: Vec<mpsc::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Holders {
    /// Lets every holder finish its stream and waits for it.
    pub(crate) fn release(self) {
        drop(self.release);
        for thread in self.threads {
            thread.join().expect("a holder thread panicked");
        }
    }
}

/// Starts `n` threads that each hold a pooled connection; returns once all of them do.
pub(crate) fn hold_connections(repo: &ModelRepository, n: usize) -> Holders {
    repo.save_embeddings("held", "h1", &[1.0]).unwrap();
    let (held, holding) = mpsc::channel();
    let mut holders = Holders {
        release: Vec::new(),
        threads: Vec::new(),
    };
    for _ in 0..n {
        let (release, released) = mpsc::channel::<()>();
        let (repo, held) = (repo.clone(), held.clone());
        holders.threads.push(std::thread::spawn(move || {
            repo.for_each_embedding("held", &mut |_, _| {
                held.send(()).unwrap();
                // Returns when the sender is dropped.
                let _ = released.recv();
            })
            .unwrap();
        }));
        holders.release.push(release);
    }
    for _ in 0..n {
        holding
            .recv_timeout(Duration::from_secs(10))
            .expect("a holder never got its connection");
    }
    holders
}

/// Polls `repo.pool_status()` until `done` says so (at most `within`).
pub(crate) fn wait_for_status(
    repo: &ModelRepository,
    within: Duration,
    done: impl Fn(&PoolStatus) -> bool,
) -> PoolStatus {
    let started = Instant::now();
    loop {
        let status = repo.pool_status();
        if done(&status) || started.elapsed() > within {
            return status;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn pool_status_counts_connections_in_use_a_waiting_thread_and_a_timed_out_checkout() {
    let (repo, schema) = open("pool-status", |c| {
        c.pool_size(1)
            .max_overflow(1)
            .pool_timeout(Duration::from_millis(800))
    });
    let status = repo.pool_status();
    assert_eq!(
        (status.max_size, status.waiting, status.timeouts),
        (2, 0, 0)
    );
    let holders = hold_connections(&repo, 2);
    let status = repo.pool_status();
    assert_eq!((status.size, status.in_use, status.idle), (2, 2, 0));

    let waiter = {
        let repo = repo.clone();
        std::thread::spawn(move || repo.get_cached_predictions::<u32>("k"))
    };
    let status = wait_for_status(&repo, Duration::from_secs(5), |s| s.waiting == 1);
    assert_eq!((status.waiting, status.in_use, status.timeouts), (1, 2, 0));
    let error = waiter.join().unwrap().unwrap_err();
    assert!(
        matches!(&error, RepoError::Timeout(t) if t.kind() == TimeoutKind::PoolCheckout),
        "{error:?}"
    );
    let status = repo.pool_status();
    assert_eq!((status.waiting, status.timeouts), (0, 1));

    holders.release();
    let status = repo.pool_status();
    assert_eq!(
        (status.size, status.in_use, status.idle, status.timeouts),
        (2, 0, 2, 1)
    );
    drop(repo);
    drop_schema(&schema);
}

/// Read while four threads share two connections: every snapshot adds up.
#[test]
fn pool_status_stays_consistent_while_threads_contend_for_connections() {
    let (repo, schema) = open("pool-status-busy", |c| c.pool_size(1).max_overflow(1));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut seen_waiting = 0;
    std::thread::scope(|s| {
        let callers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..150 {
                        call(&repo);
                    }
                })
            })
            .collect();
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let st = repo.pool_status();
                assert_eq!(st.idle + st.in_use, st.size, "{st:?}");
                assert!(st.size <= st.max_size && st.waiting <= 4, "{st:?}");
            }
        });
        while callers.iter().any(|c| !c.is_finished()) {
            seen_waiting = seen_waiting.max(repo.pool_status().waiting);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let status = repo.pool_status();
    assert_eq!((status.in_use, status.waiting, status.timeouts), (0, 0, 0));
    assert!(
        seen_waiting >= 1,
        "four threads on two connections never waited"
    );
    drop(repo);
    drop_schema(&schema);
}
