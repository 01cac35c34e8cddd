//! Prediction-cache benchmark: ops/s and p50/p99 latency of get (hit and miss), set and
//! clear-by-prefix through the library, with 1 and 2 threads, next to what the same server
//! does in the same run for a raw prepared primary-key SELECT loop (the ceiling for a hit) and
//! for the seed's design, an `UPDATE … SET access_count = access_count + 1 … RETURNING` per
//! hit. Then the reaper: how fast one deletes a large number of expired rows, while a probe
//! checks it never holds a lock on a live row.
//!
//! The library's methods go through one repository with the default pool, shared by the
//! threads (each raw loop has its own connection per thread). Methods run in interleaved
//! rounds; each round's ops/s is printed, and the ratios compare medians over rounds.
//!
//! ```text
//! cargo run --release --example cache_bench -- [--seconds 2] [--rounds 4] [--reaper-rows 1000000]
//!     [--methods get_hit,raw_select] [--threads 1,2] [--format json] [--citus]
//!     [--recorder prometheus]
//! ```
//!
//! `--recorder prometheus` (built with `--features metrics`) adds `get_hit+prometheus`: the
//! same hits, in the same interleaved rounds, with a Prometheus recorder installed for the
//! worker threads (with upkeep every 5 s, as the exporter does); plain `get_hit` then runs with
//! the feature on and no recorder. `benches/metrics_overhead.sh` compares both with a build
//! without the feature (docs/metrics.md).
//!
//! `--citus` measures every method on a throwaway single server and, in the same interleaved
//! rounds, through the coordinator of a throwaway Citus cluster (two workers on this machine,
//! the cache hash-distributed by key); the reaper is measured on the single server only.
//!
//! Uses `DATABASE_URL` if set (the schema `cache_bench` is dropped and recreated), otherwise a
//! throwaway server with default settings (fsync on, so a write per hit pays a WAL flush).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pg_model_repo::throwaway::{database_url_or_start, ThrowawayCluster, ThrowawayServer};
use pg_model_repo::{ModelRepository, RepositoryConfig, Result};

const SCHEMA: &str = "cache_bench";
const HIT_KEYS: u64 = 10_000;
const MAX_THREADS: usize = 2;
/// Enough groups that a few seconds of clear_prefix never run out (about 3-6 k ops/s here).
const GROUPS_PER_SLOT: u64 = 30_000;
const CLEAR_GROUP_SIZE: u64 = 5;
const LIVE_DURING_REAP: i64 = 10_000;

const RAW_SELECT: &str =
    "SELECT predictions FROM prediction_cache WHERE cache_key = $1 AND expires_at > now()";
const UPDATE_ON_HIT: &str = "UPDATE prediction_cache
     SET access_count = access_count + 1, last_accessed = now()
     WHERE cache_key = $1 AND expires_at > now() RETURNING predictions";

struct Args {
    seconds: f64,
    rounds: u32,
    /// Only these methods (all when empty).
    methods: Vec<String>,
    threads: Vec<usize>,
    reaper_rows: i64,
    json: bool,
    /// Also through a throwaway Citus cluster's coordinator (the cache distributed by key).
    citus: bool,
    /// Also `get_hit` with a Prometheus recorder (feature `metrics`).
    prometheus: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 2.0,
        rounds: 4,
        methods: Vec::new(),
        threads: vec![1, 2],
        reaper_rows: 1_000_000,
        json: false,
        citus: false,
        prometheus: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--seconds" => args.seconds = value().parse().expect("--seconds takes a number"),
            "--reaper-rows" => {
                args.reaper_rows = value().parse().expect("--reaper-rows takes a count")
            }
            "--rounds" => args.rounds = value().parse().expect("--rounds takes a count"),
            "--methods" => args.methods = value().split(',').map(str::to_owned).collect(),
            "--threads" => {
                args.threads = value()
                    .split(',')
                    .map(|t| t.parse().expect("--threads takes counts"))
                    .collect()
            }
            "--format" => args.json = value() == "json",
            "--citus" => args.citus = true,
            "--recorder" => {
                assert_eq!(value(), "prometheus", "--recorder takes prometheus");
                if !cfg!(feature = "metrics") {
                    panic!("--recorder needs the build with --features metrics");
                }
                args.prometheus = true;
            }
            other => panic!("unknown argument {other:?}"),
        }
    }
    args
}

#[derive(serde::Serialize)]
struct Row {
    /// `server` (one PostgreSQL) or `citus` (through a cluster's coordinator).
    target: &'static str,
    method: &'static str,
    threads: usize,
    ops: u64,
    seconds: f64,
    ops_per_s: f64,
    /// Each round's ops/s, in order.
    rounds: Vec<f64>,
    median_ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

type Op = Box<dyn FnMut(u64) -> Result<()> + Send>;
type MakeOp<'a> = Box<dyn Fn(usize) -> Op + Sync + 'a>;

/// One method at one thread count, measured over several interleaved rounds.
struct Job<'a> {
    target: &'static str,
    method: &'static str,
    threads: usize,
    make: MakeOp<'a>,
    ops: u64,
    elapsed: Duration,
    rounds: Vec<f64>,
    hist: Histogram<u64>,
}

const WARMUP_OPS: u64 = 50;

impl Job<'_> {
    /// Runs `threads` workers for `seconds`, each built by `make` on its own thread and warmed
    /// up with a few untimed operations, and adds what they did to the totals.
    fn round(&mut self, seconds: f64) {
        let barrier = Barrier::new(self.threads);
        let (method, make) = (self.method, &self.make);
        let results: Vec<(u64, Duration, Histogram<u64>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.threads)
                .map(|t| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        let mut op = make(t);
                        for i in 0..WARMUP_OPS {
                            op(u64::MAX - i).unwrap_or_else(|e| panic!("{method}: {e}"));
                        }
                        let mut hist = new_histogram();
                        barrier.wait();
                        let deadline = Duration::from_secs_f64(seconds);
                        let started = Instant::now();
                        let mut i = 0;
                        while started.elapsed() < deadline {
                            let t0 = Instant::now();
                            op(i).unwrap_or_else(|e| panic!("{method}: {e}"));
                            hist.saturating_record(t0.elapsed().as_micros().max(1) as u64);
                            i += 1;
                        }
                        (i, started.elapsed(), hist)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let (mut ops, mut elapsed) = (0, Duration::ZERO);
        for (n, e, h) in &results {
            ops += n;
            elapsed = elapsed.max(*e);
            self.hist.add(h).unwrap();
        }
        self.ops += ops;
        self.elapsed += elapsed;
        let ops_per_s = ops as f64 / elapsed.as_secs_f64();
        eprintln!(
            "round {}: {} {} x{}: {ops_per_s:.0} ops/s",
            self.rounds.len() + 1,
            self.target,
            self.method,
            self.threads
        );
        self.rounds.push(ops_per_s);
    }

    fn row(&self) -> Row {
        let secs = self.elapsed.as_secs_f64();
        Row {
            target: self.target,
            method: self.method,
            threads: self.threads,
            ops: self.ops,
            seconds: secs,
            ops_per_s: self.ops as f64 / secs,
            rounds: self.rounds.clone(),
            median_ops_per_s: median(&self.rounds),
            p50_us: self.hist.value_at_quantile(0.50) as f64,
            p99_us: self.hist.value_at_quantile(0.99) as f64,
        }
    }
}

/// One target's repositories: the one every method shares, and with `--recorder prometheus`
/// the one `get_hit+prometheus` uses.
struct Repos<'a> {
    shared: &'a ModelRepository,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    prometheus: Option<&'a ModelRepository>,
}

/// The jobs of one target: every wanted method at every thread count.
fn target_jobs<'a>(
    args: &Args,
    target: &'static str,
    url: &'a str,
    repos: Repos<'a>,
    value: &'a [f32],
    next_group: Arc<Vec<AtomicU64>>,
    wanted: &dyn Fn(&str) -> bool,
) -> Vec<Job<'a>> {
    let repo = repos.shared;
    let mut jobs = Vec::new();
    for &threads in &args.threads {
        assert!(
            (1..=MAX_THREADS).contains(&threads),
            "--threads takes 1..={MAX_THREADS}"
        );
        let slot_base = if threads == 1 { 0 } else { MAX_THREADS };
        let (repo_ref, groups) = (repo, next_group.clone());
        let makers: Vec<(&'static str, MakeOp<'_>)> = vec![
            (
                "raw_select",
                Box::new(move |t| {
                    let mut c = raw_client(url);
                    let st = c.prepare(RAW_SELECT).unwrap();
                    Box::new(move |i| {
                        let row = c.query_opt(&st, &[&hit_key(i, t)])?;
                        assert!(row.is_some());
                        Ok(())
                    })
                }),
            ),
            (
                "get_hit",
                Box::new(move |t| {
                    let r = repo.clone();
                    Box::new(move |i| {
                        let v: Option<Vec<f32>> = r.get_cached_predictions(&hit_key(i, t))?;
                        assert!(v.is_some());
                        Ok(())
                    })
                }),
            ),
            (
                "get_miss",
                Box::new(move |t| {
                    let r = repo.clone();
                    Box::new(move |i| {
                        let v: Option<Vec<f32>> =
                            r.get_cached_predictions(&format!("miss:{t}:{i}"))?;
                        assert!(v.is_none());
                        Ok(())
                    })
                }),
            ),
            (
                "update_on_hit",
                Box::new(move |t| {
                    let mut c = raw_client(url);
                    let st = c.prepare(UPDATE_ON_HIT).unwrap();
                    Box::new(move |i| {
                        let row = c.query_opt(&st, &[&hit_key(i, t)])?;
                        assert!(row.is_some());
                        Ok(())
                    })
                }),
            ),
            (
                "set",
                Box::new(move |t| {
                    let r = repo.clone();
                    let v = value.to_vec();
                    Box::new(move |i| {
                        let key = format!("set:{t}:{}", i % HIT_KEYS);
                        r.cache_predictions(&key, &v, Duration::from_secs(3600))
                    })
                }),
            ),
            (
                "clear_prefix",
                Box::new(move |t| {
                    let r = repo_ref.clone();
                    let slot = slot_base + t;
                    let groups = groups.clone();
                    Box::new(move |_| {
                        let g = groups[slot].fetch_add(1, Ordering::Relaxed);
                        assert!(g < GROUPS_PER_SLOT, "clear_prefix ran out of groups");
                        let n = r.clear_cache(&format!("clr:{slot}:{g}:*"))?;
                        assert_eq!(n, CLEAR_GROUP_SIZE);
                        Ok(())
                    })
                }),
            ),
        ];
        #[cfg(feature = "metrics")]
        let makers = {
            let mut makers = makers;
            if let Some(repo) = repos.prometheus {
                makers.push(("get_hit+prometheus", prometheus::get_hit(repo)));
            }
            makers
        };
        for (method, make) in makers {
            // `get_hit+prometheus` comes with `get_hit`.
            if wanted(method.trim_end_matches("+prometheus")) {
                jobs.push(Job {
                    target,
                    method,
                    threads,
                    make,
                    ops: 0,
                    elapsed: Duration::ZERO,
                    rounds: Vec::new(),
                    hist: new_histogram(),
                });
            }
        }
    }
    jobs
}

/// `get_hit` with a Prometheus recorder for the worker threads.
#[cfg(feature = "metrics")]
mod prometheus {
    use std::sync::OnceLock;
    use std::time::Duration;

    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
    use pg_model_repo::{ModelRepository, RepositoryConfig};

    use super::{hit_key, MakeOp};

    /// One recorder for the run, drained every 5 s as the exporter's own upkeep does.
    fn recorder() -> &'static PrometheusRecorder {
        static RECORDER: OnceLock<PrometheusRecorder> = OnceLock::new();
        RECORDER.get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            std::thread::spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                handle.run_upkeep();
            });
            recorder
        })
    }

    /// The same repository as `get_hit`'s, opened (its pool's handles registered) with the
    /// recorder installed for this thread: the library registers its handles when a pool is
    /// built, as an application that installs its recorder first has them.
    pub(super) fn open(config: RepositoryConfig) -> pg_model_repo::Result<ModelRepository> {
        metrics::with_local_recorder(recorder(), || ModelRepository::open(config))
    }

    /// Each hit runs with the recorder installed for its thread too: what the library
    /// registers at a first record (an operation's histogram) goes to it, as to a recorder an
    /// application installs for the process.
    pub(super) fn get_hit(repo: &ModelRepository) -> MakeOp<'_> {
        Box::new(move |t| {
            let r = repo.clone();
            let recorder = recorder();
            Box::new(move |i| {
                metrics::with_local_recorder(recorder, || {
                    let v: Option<Vec<f32>> = r.get_cached_predictions(&hit_key(i, t))?;
                    assert!(v.is_some());
                    Ok(())
                })
            })
        })
    }
}

/// Per target, with `--recorder prometheus`: the repository `get_hit+prometheus` uses.
#[cfg(feature = "metrics")]
fn prometheus_repos(
    args: &Args,
    targets: &[(&'static str, String)],
) -> Result<Vec<Option<ModelRepository>>> {
    targets
        .iter()
        .map(|(_, url)| {
            args.prometheus
                .then(|| prometheus::open(RepositoryConfig::new(url.clone()).schema(SCHEMA)))
                .transpose()
        })
        .collect()
}

#[cfg(not(feature = "metrics"))]
fn prometheus_repos(
    _args: &Args,
    targets: &[(&'static str, String)],
) -> Result<Vec<Option<ModelRepository>>> {
    Ok(targets.iter().map(|_| None).collect())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap()
}

fn raw_client(url: &str) -> postgres::Client {
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("raw connection");
    client
        .batch_execute(&format!("SET search_path TO {SCHEMA}"))
        .unwrap();
    client
}

fn hit_key(i: u64, t: usize) -> String {
    format!("hit:{}", (i * 7919 + t as u64 * 4_999) % HIT_KEYS)
}

fn main() -> Result<()> {
    let _ = env_logger::builder().is_test(false).try_init();
    let args = parse_args();
    let (url, _server) = if args.citus {
        // Both targets are throwaway servers on this machine, so they compare like for like.
        let server = ThrowawayServer::start(&[])?;
        (server.url(), Some(server))
    } else {
        database_url_or_start(&[])?
    };
    let cluster = if args.citus {
        eprintln!("starting a throwaway Citus cluster (coordinator and two workers)");
        Some(ThrowawayCluster::start(2)?)
    } else {
        None
    };
    let mut targets: Vec<(&'static str, String)> = vec![("server", url.clone())];
    if let Some(cluster) = &cluster {
        targets.push(("citus", cluster.url()));
    }
    let wanted = |m: &str| args.methods.is_empty() || args.methods.iter().any(|w| w == m);
    let value: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
    // Per target: the default pool, shared by every thread of every method.
    let mut repos = Vec::new();
    for (_, url) in &targets {
        {
            let mut admin = postgres::Client::connect(url, postgres::NoTls)?;
            admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))?;
        }
        let repo = ModelRepository::open(RepositoryConfig::new(url.clone()).schema(SCHEMA))?;
        let mut admin = raw_client(url);
        setup(&mut admin, &repo, &value)?;
        if wanted("clear_prefix") {
            populate_clear_groups(&mut admin)?;
        }
        repos.push(repo);
    }
    let prometheus_repos = prometheus_repos(&args, &targets)?;
    let mut jobs: Vec<Job<'_>> = Vec::new();
    for (((target, url), repo), prometheus_repo) in
        targets.iter().zip(&repos).zip(&prometheus_repos)
    {
        // Each clear_prefix operation clears the next unused group of its thread.
        let next_group: Arc<Vec<AtomicU64>> =
            Arc::new((0..2 * MAX_THREADS).map(|_| AtomicU64::new(0)).collect());
        jobs.extend(target_jobs(
            &args,
            target,
            url,
            Repos {
                shared: repo,
                prometheus: prometheus_repo.as_ref(),
            },
            &value,
            next_group,
            &wanted,
        ));
    }
    // Interleaved rounds: on a shared machine, load from others drifts; every method sees
    // the same drift instead of one method catching a quiet or a busy moment.
    let slice = args.seconds / args.rounds as f64;
    for _ in 0..args.rounds {
        for job in &mut jobs {
            job.round(slice);
        }
    }
    let rows: Vec<Row> = jobs.iter().map(Job::row).collect();
    drop(jobs);
    for repo in repos {
        repo.close();
    }
    print_rows(&rows, args.json);
    if args.reaper_rows > 0 {
        let line = reap(&url, args.reaper_rows)?;
        if args.json {
            eprintln!("{line}");
        } else {
            println!("\n{line}");
        }
    }
    Ok(())
}

fn setup(admin: &mut postgres::Client, repo: &ModelRepository, value: &Vec<f32>) -> Result<()> {
    repo.cache_predictions("hit:0", value, Duration::from_secs(3600))?;
    // The same bytes the library stored, copied to every hit key.
    admin.execute(
        "INSERT INTO prediction_cache (cache_key, predictions, expires_at)
         SELECT 'hit:' || i, (SELECT predictions FROM prediction_cache WHERE cache_key = 'hit:0'),
                now() + interval '1 hour'
         FROM generate_series(1, $1::int8 - 1) AS i",
        &[&(HIT_KEYS as i64)],
    )?;
    admin.batch_execute("VACUUM ANALYZE prediction_cache")?;
    Ok(())
}

/// Groups `clr:{slot}:{g}:{j}`: GROUPS_PER_SLOT groups of CLEAR_GROUP_SIZE keys for each
/// worker slot (one set per thread count).
fn populate_clear_groups(admin: &mut postgres::Client) -> Result<()> {
    admin.execute(
        "INSERT INTO prediction_cache (cache_key, predictions, expires_at)
         SELECT 'clr:' || s || ':' || g || ':' || j, '\\x00', now() + interval '1 hour'
         FROM generate_series(0, $1::int8 - 1) AS s, generate_series(0, $2::int8 - 1) AS g,
              generate_series(1, $3::int8) AS j",
        &[
            &(2 * MAX_THREADS as i64),
            &(GROUPS_PER_SLOT as i64),
            &(CLEAR_GROUP_SIZE as i64),
        ],
    )?;
    admin.batch_execute("VACUUM ANALYZE prediction_cache")?;
    Ok(())
}

fn print_rows(rows: &[Row], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(rows).unwrap());
        return;
    }
    println!(
        "{:<7} {:<14} {:>7} {:>9} {:>8} {:>10} {:>10} {:>17} {:>7} {:>7}",
        "target",
        "method",
        "threads",
        "ops",
        "seconds",
        "ops/s",
        "median",
        "min-max",
        "p50 µs",
        "p99 µs"
    );
    for r in rows {
        let min = r.rounds.iter().copied().fold(f64::INFINITY, f64::min);
        let max = r.rounds.iter().copied().fold(0.0, f64::max);
        println!(
            "{:<7} {:<14} {:>7} {:>9} {:>8.2} {:>10.0} {:>10.0} {:>17} {:>7.0} {:>7.0}",
            r.target,
            r.method,
            r.threads,
            r.ops,
            r.seconds,
            r.ops_per_s,
            r.median_ops_per_s,
            format!("{min:.0}-{max:.0}"),
            r.p50_us,
            r.p99_us
        );
    }
    println!("\nper round (ops/s):");
    for r in rows {
        let rounds: Vec<String> = r.rounds.iter().map(|x| format!("{x:.0}")).collect();
        println!(
            "{:<7} {:<14} x{}: {}",
            r.target,
            r.method,
            r.threads,
            rounds.join(" ")
        );
    }
    let find = |target: &str, m: &str, t: usize| {
        rows.iter()
            .find(|r| r.target == target && r.method == m && r.threads == t)
    };
    println!(
        "\nratios: of the medians; the median of each round's ratio (rounds run back to back, \
         so a pair sees about the same load from others); each round's ratio"
    );
    let pairs = [
        ("server", "get_hit", "server", "raw_select"),
        ("server", "get_miss", "server", "raw_select"),
        ("server", "get_hit", "server", "update_on_hit"),
        ("citus", "get_hit", "citus", "raw_select"),
        ("citus", "get_miss", "citus", "raw_select"),
        ("citus", "get_hit", "server", "get_hit"),
        ("citus", "raw_select", "server", "raw_select"),
        ("citus", "set", "server", "set"),
    ];
    for (ta, a, tb, b) in pairs {
        for threads in 1..=MAX_THREADS {
            if let (Some(x), Some(y)) = (find(ta, a, threads), find(tb, b, threads)) {
                let each: Vec<f64> = x.rounds.iter().zip(&y.rounds).map(|(x, y)| x / y).collect();
                let shown: Vec<String> = each.iter().map(|r| format!("{r:.2}")).collect();
                println!(
                    "{ta} {a} / {tb} {b}, {threads} thread{}: {:.2}x; {:.2}x [{}]",
                    if threads == 1 { "" } else { "s" },
                    x.median_ops_per_s / y.median_ops_per_s,
                    median(&each),
                    shown.join(" ")
                );
            }
        }
    }
}

/// Loads `n` expired rows plus live ones, starts a repository with a 1 s reaper and measures
/// how long until the expired rows are gone; meanwhile a probe tries to lock every live row
/// with NOWAIT, which fails if the reaper holds a lock on any of them.
fn reap(url: &str, n: i64) -> Result<String> {
    let mut admin = raw_client(url);
    admin.batch_execute("TRUNCATE prediction_cache")?;
    admin.execute(
        "INSERT INTO prediction_cache (cache_key, predictions, cached_at, expires_at)
         SELECT 'old:' || i, '\\x00', now() - interval '2 hours', now() - interval '1 hour'
         FROM generate_series(1, $1::int8) AS i",
        &[&n],
    )?;
    admin.execute(
        "INSERT INTO prediction_cache (cache_key, predictions, expires_at)
         SELECT 'live:' || i, '\\x00', now() + interval '1 hour'
         FROM generate_series(1, $1::int8) AS i",
        &[&LIVE_DURING_REAP],
    )?;
    admin.batch_execute("VACUUM ANALYZE prediction_cache")?;

    let stop = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicU64::new(0));
    let blocked = Arc::new(AtomicU64::new(0));
    let probe = {
        let (url, stop, probes, blocked) = (
            url.to_owned(),
            stop.clone(),
            probes.clone(),
            blocked.clone(),
        );
        std::thread::spawn(move || {
            let mut c = raw_client(&url);
            while !stop.load(Ordering::Relaxed) {
                let mut tx = c.transaction().unwrap();
                match tx.execute(
                    "SELECT 1 FROM prediction_cache WHERE cache_key LIKE 'live:%'
                     AND expires_at > now() FOR UPDATE NOWAIT",
                    &[],
                ) {
                    Ok(_) => probes.fetch_add(1, Ordering::Relaxed),
                    Err(_) => blocked.fetch_add(1, Ordering::Relaxed),
                };
                let _ = tx.rollback();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let interval = Duration::from_secs(1);
    let started = Instant::now();
    let repo = ModelRepository::open(
        RepositoryConfig::new(url)
            .schema(SCHEMA)
            .pool_size(2)
            .reaper_interval(Some(interval)),
    )?;
    let gone = loop {
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM prediction_cache WHERE expires_at <= now()",
                &[],
            )?
            .get(0);
        if left == 0 {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(600) {
            panic!("{left} expired rows still there after 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    stop.store(true, Ordering::Relaxed);
    probe.join().unwrap();
    repo.close();
    let live: i64 = admin
        .query_one(
            "SELECT count(*) FROM prediction_cache WHERE cache_key LIKE 'live:%'",
            &[],
        )?
        .get(0);
    // The first tick fires one interval after open: the deleting started then.
    let deleting = gone.saturating_sub(interval).max(Duration::from_millis(1));
    Ok(format!(
        "reaper: {n} expired rows gone {:.2} s after open (reaper_interval {:?}: {:.1} ticks), \
         {:.0} rows/s while deleting; {live} of {LIVE_DURING_REAP} live rows kept; \
         live-row lock probes: {} succeeded, {} blocked",
        gone.as_secs_f64(),
        interval,
        gone.as_secs_f64() / interval.as_secs_f64(),
        n as f64 / deleting.as_secs_f64(),
        probes.load(Ordering::Relaxed),
        blocked.load(Ordering::Relaxed),
    ))
}
