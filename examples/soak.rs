//! A bounded chaos soak in three phases. Worker threads run mixed operations (model saves and
//! loads, training metrics, cache writes, hits and glob deletes, embedding batches) while a
//! chaos thread
//!
//! 1. kills every backend of the pool once a second (`--seconds`, on `DATABASE_URL` or a
//!    throwaway server);
//! 2. freezes the server (SIGSTOP of every server process) for a few seconds at a time, then
//!    resumes it (`--hang-seconds`, always on a throwaway server of its own: the shared service
//!    is never frozen);
//! 3. loses the reply to a commit every 100 ms through a proxy (`--lost-seconds`, on that
//!    throwaway server).
//!
//! After each phase the repository is closed and every acknowledged write is checked, straight
//! in the tables: present (else lost), stored once (else duplicated: training-metric records and
//! cache hit counts are counted exactly), and every glob delete answered with the number it
//! removed. Calls are timed: a call longer than the contract's bound under the phase's timeouts
//! (pool_timeout + query_timeout + 2 s, API.md "Faults"; 12 s in the kill and lost-reply
//! phases, 7 s in the hang phase) plus a second of scheduling margin is hung.
//! The last line, for scripts:
//!
//!     soak: ops=N lost=N duplicated=N errors=N hung_calls=N max_block_ms=N
//!
//!     cargo run --release --example soak -- [--seconds 60] [--hang-seconds 20]
//!         [--lost-seconds 20] [--threads 4] [--phases kill,hang,lost]
//!
//! `--phases` runs a subset (default: all three, in that order).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pg_model_repo::throwaway::{database_url_or_start, LostReplyProxy, ThrowawayServer};
use pg_model_repo::{Embedding, ModelRepository, RepositoryConfig};
use serde_json::json;

/// A phase's timeouts, and from them the contract's bound of its calls.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    pool: Duration,
    query: Duration,
    stream_idle: Duration,
}

/// The kill and lost-reply phases'.
const DEFAULT_TIMEOUTS: Timeouts = Timeouts {
    pool: Duration::from_secs(5),
    query: Duration::from_secs(5),
    stream_idle: Duration::from_secs(5),
};

/// The hang phase's: short, so that a frozen server costs a call little.
const HANG_TIMEOUTS: Timeouts = Timeouts {
    pool: Duration::from_secs(3),
    query: Duration::from_secs(2),
    stream_idle: Duration::from_secs(3),
};

/// Scheduling on a busy 2-core machine (the watchdog itself looks every 50 ms): the test
/// suite's margin too.
const MARGIN: Duration = Duration::from_secs(1);

impl Timeouts {
    fn apply(self, config: RepositoryConfig) -> RepositoryConfig {
        config
            .pool_timeout(self.pool)
            .query_timeout(self.query)
            .stream_idle_timeout(self.stream_idle)
    }

    /// API.md, "Faults": one deadline per call that is not a stream or a bulk load,
    /// pool_timeout + query_timeout + 2 s, whatever happens inside it. (The soak's calls are
    /// all such calls: small saves, loads, cache writes and small batches.)
    fn call_bound(self) -> Duration {
        self.pool + self.query + Duration::from_secs(2)
    }
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the workers were told succeeded, and what may or may not have happened.
#[derive(Default)]
struct Acknowledged {
    models: Vec<(String, String)>,
    cache_keys: Vec<String>,
    /// (entity type, first id number, batch size) of acknowledged embedding batches.
    embedding_batches: Vec<(String, u64, u64)>,
    /// Training-metric records acknowledged, and saves that failed (each may have committed).
    metrics: BTreeMap<(String, String), (u64, u64)>,
    /// Cache hits seen by callers, per key.
    hits: BTreeMap<String, u64>,
}

/// What a phase found.
#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    errors: AtomicU64,
    hung_calls: AtomicU64,
    max_block_ms: AtomicU64,
    /// Glob deletes whose answer was lower (lost) or higher (duplicated) than what they removed.
    answers_low: AtomicU64,
    answers_high: AtomicU64,
    faults: AtomicU64,
}

struct Phase<'a> {
    name: &'static str,
    repo: ModelRepository,
    /// A call longer than this is hung.
    hung_after: Duration,
    acknowledged: Mutex<Acknowledged>,
    tally: &'a Tally,
}

fn main() -> pg_model_repo::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let args: Vec<String> = std::env::args().collect();
    let seconds = arg(&args, "--seconds", 60);
    let hang_seconds = arg(&args, "--hang-seconds", 20);
    let lost_seconds = arg(&args, "--lost-seconds", 20);
    let threads = arg(&args, "--threads", 4) as usize;
    let phases: Vec<String> = args
        .iter()
        .position(|a| a == "--phases")
        .and_then(|i| args.get(i + 1))
        .map_or_else(
            || vec!["kill".into(), "hang".into(), "lost".into()],
            |list| list.split(',').map(|p| p.trim().to_owned()).collect(),
        );
    if let Some(bad) = phases
        .iter()
        .find(|p| !["kill", "hang", "lost"].contains(&p.as_str()))
    {
        eprintln!("soak: unknown phase {bad:?} (kill, hang, lost)");
        std::process::exit(2);
    }
    let wants = |phase: &str| phases.iter().any(|p| p == phase);
    let mut totals = (0, 0, 0);
    let tally = Tally::default();

    if wants("kill") {
        // 1. Killed backends.
        let (url, _server) = database_url_or_start(&[("max_connections", "200")])?;
        println!(
            "soak: kill phase, {seconds} s, {threads} threads, every backend killed each second"
        );
        let found = run_phase(
            &url,
            &url,
            "kill",
            threads,
            seconds,
            &tally,
            DEFAULT_TIMEOUTS,
            |stop| {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(1));
                    tally
                        .faults
                        .fetch_add(kill_backends(&url), Ordering::Relaxed);
                }
            },
        )?;
        add(&mut totals, found);
    }

    // 2 and 3 run on a server of their own.
    let own = ThrowawayServer::start(&[("max_connections", "200")])?;
    let own_url = own.url();
    if wants("hang") {
        println!("soak: hang phase, {hang_seconds} s: the server frozen for 2-4 s at a time");
        let found = run_phase(
            &own_url,
            &own_url,
            "hang",
            threads,
            hang_seconds,
            &tally,
            HANG_TIMEOUTS,
            |stop| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1500));
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(frozen) = own.freeze() else { break };
                    tally.faults.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2000 + 1000 * (n % 3)));
                    drop(frozen);
                    n += 1;
                }
            },
        )?;
        add(&mut totals, found);
    }

    if wants("lost") {
        let proxy = LostReplyProxy::start(own.port())?;
        println!("soak: lost-reply phase, {lost_seconds} s: a commit reply lost every 100 ms");
        let found = run_phase(
            &proxy.url(),
            &own_url,
            "lost",
            threads,
            lost_seconds,
            &tally,
            DEFAULT_TIMEOUTS,
            |stop| {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    if proxy.armed() == 0 {
                        proxy.lose_next_commit_replies(1);
                    }
                }
            },
        )?;
        println!("lost-reply phase: {} commit replies lost", proxy.lost());
        tally.faults.fetch_add(proxy.lost(), Ordering::Relaxed);
        add(&mut totals, found);
    }

    let (lost, duplicated, checked) = totals;
    let lost = lost + tally.answers_low.load(Ordering::Relaxed);
    let duplicated = duplicated + tally.answers_high.load(Ordering::Relaxed);
    println!(
        "faults injected: {}; acknowledged writes checked: {checked}",
        tally.faults.load(Ordering::Relaxed)
    );
    println!(
        "soak: ops={} lost={lost} duplicated={duplicated} errors={} hung_calls={} max_block_ms={}",
        tally.ops.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
        tally.hung_calls.load(Ordering::Relaxed),
        tally.max_block_ms.load(Ordering::Relaxed),
    );
    if lost > 0 || duplicated > 0 || tally.hung_calls.load(Ordering::Relaxed) > 0 {
        std::process::exit(1);
    }
    Ok(())
}

fn add(totals: &mut (u64, u64, u64), found: (u64, u64, u64)) {
    totals.0 += found.0;
    totals.1 += found.1;
    totals.2 += found.2;
}

/// Runs workers on a repository opened through `url` while `chaos` runs, then closes it and
/// checks the acknowledged writes through `direct_url`. A call past its contract's bound
/// under `timeouts` (and [`MARGIN`]) counts as hung. Returns (lost, duplicated, checked).
#[allow(clippy::too_many_arguments)]
fn run_phase(
    url: &str,
    direct_url: &str,
    name: &'static str,
    threads: usize,
    seconds: u64,
    tally: &Tally,
    timeouts: Timeouts,
    chaos: impl FnOnce(&AtomicBool) + Send,
) -> pg_model_repo::Result<(u64, u64, u64)> {
    let schema = format!("soak_{}_{name}", std::process::id());
    let config = timeouts.apply(
        RepositoryConfig::new(url)
            .schema(&schema)
            .pool_size(threads as u32)
            .max_overflow(2)
            .reaper_interval(Some(Duration::from_secs(1))),
    );
    let phase = Phase {
        name,
        repo: ModelRepository::open(config)?,
        hung_after: timeouts.call_bound() + MARGIN,
        acknowledged: Mutex::new(Acknowledged::default()),
        tally,
    };
    let stop = AtomicBool::new(false);
    let stop_chaos = AtomicBool::new(false);
    let ops_before = tally.ops.load(Ordering::Relaxed);
    let errors_before = tally.errors.load(Ordering::Relaxed);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (phase, stop) = (&phase, &stop);
            s.spawn(move || worker(t, phase, stop));
        }
        let chaos_stop = &stop_chaos;
        s.spawn(move || chaos(chaos_stop));
        std::thread::sleep(Duration::from_secs(seconds));
        stop_chaos.store(true, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
    });
    let Phase {
        repo, acknowledged, ..
    } = phase;
    let started = Instant::now();
    repo.close();
    let closed_in = started.elapsed();
    let acknowledged = acknowledged.into_inner().unwrap_or_else(|p| p.into_inner());
    let found = verify(direct_url, &schema, &acknowledged)?;
    println!(
        "{name} phase: {} ops, {} errors, lost {}, duplicated {}, {} writes checked, closed in \
         {closed_in:?}",
        tally.ops.load(Ordering::Relaxed) - ops_before,
        tally.errors.load(Ordering::Relaxed) - errors_before,
        found.0,
        found.1,
        found.2
    );
    if let Ok(mut client) = postgres::Client::connect(direct_url, postgres::NoTls) {
        let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
    }
    Ok(found)
}

/// Times one call and counts it.
fn call<T>(phase: &Phase<'_>, f: impl FnOnce() -> pg_model_repo::Result<T>) -> Option<T> {
    let started = Instant::now();
    let out = f();
    let took = started.elapsed();
    let tally = phase.tally;
    tally.ops.fetch_add(1, Ordering::Relaxed);
    tally
        .max_block_ms
        .fetch_max(took.as_millis() as u64, Ordering::Relaxed);
    if took > phase.hung_after {
        tally.hung_calls.fetch_add(1, Ordering::Relaxed);
        println!("{} phase: a call took {took:?}", phase.name);
    }
    match out {
        Ok(v) => Some(v),
        Err(_) => {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

fn worker(t: usize, phase: &Phase<'_>, stop: &AtomicBool) {
    let repo = &phase.repo;
    let ack = || phase.acknowledged.lock().unwrap_or_else(|p| p.into_inner());
    let model = format!("soak-{t}");
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let version = i.to_string();
        match i % 8 {
            0 => {
                if call(phase, || {
                    repo.save_model(&model, &version, version.as_bytes(), &json!({"i": i}))
                })
                .is_some()
                {
                    ack().models.push((model.clone(), version.clone()));
                }
            }
            1 => {
                let metrics = [("i".to_string(), i as f64)].into();
                let saved = call(phase, || {
                    repo.save_training_metrics(&model, &version, &metrics)
                });
                let mut a = ack();
                let entry = a
                    .metrics
                    .entry((model.clone(), version.clone()))
                    .or_default();
                match saved {
                    Some(()) => entry.0 += 1,
                    None => entry.1 += 1,
                }
            }
            2 => {
                call(phase, || repo.load_model(&model, "latest"));
            }
            3 => {
                let key = format!("{model}:{i}");
                if call(phase, || {
                    repo.cache_predictions(&key, &i, Duration::from_secs(3600))
                })
                .is_some()
                {
                    ack().cache_keys.push(key);
                }
            }
            4 => {
                let key = format!("{model}:{}", i - 1);
                if let Some(Some(_)) = call(phase, || repo.get_cached_predictions::<u64>(&key)) {
                    *ack().hits.entry(key).or_default() += 1;
                }
            }
            5 => {
                let batch: Vec<Embedding> = (0..50)
                    .map(|j| {
                        Embedding::new(model.clone(), format!("{}", i * 100 + j), vec![i as f32; 8])
                    })
                    .collect();
                if call(phase, || repo.batch_save_embeddings(&batch)).is_some() {
                    ack().embedding_batches.push((model.clone(), i * 100, 50));
                }
            }
            6 => glob_delete(phase, &model, i),
            _ => {
                call(phase, || repo.get_model_versions(&model));
            }
        }
        i += 1;
    }
}

/// Writes three keys under a prefix of their own and deletes them by glob: when all three
/// writes were acknowledged, the delete must answer 3.
fn glob_delete(phase: &Phase<'_>, model: &str, i: u64) {
    let repo = &phase.repo;
    let mut written = 0;
    for j in 0..3 {
        let key = format!("{model}:c{i}:{j}");
        if call(phase, || {
            repo.cache_predictions(&key, &j, Duration::from_secs(3600))
        })
        .is_some()
        {
            written += 1;
        }
    }
    if let Some(removed) = call(phase, || repo.clear_cache(&format!("{model}:c{i}:*"))) {
        if written == 3 && removed < 3 {
            phase.tally.answers_low.fetch_add(1, Ordering::Relaxed);
            println!(
                "{} phase: clear_cache answered {removed} for 3 keys",
                phase.name
            );
        }
        if removed > 3 {
            phase.tally.answers_high.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn kill_backends(url: &str) -> u64 {
    let Ok(mut admin) = postgres::Client::connect(url, postgres::NoTls) else {
        return 0;
    };
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'pg-model-repo' AND pid <> pg_backend_pid()",
            &[],
        )
        .map(|rows| rows.len() as u64)
        .unwrap_or(0)
}

/// Checks every acknowledged write straight in the tables; (lost, duplicated, checked).
fn verify(
    url: &str,
    schema: &str,
    acknowledged: &Acknowledged,
) -> pg_model_repo::Result<(u64, u64, u64)> {
    let mut db = postgres::Client::connect(url, postgres::NoTls)?;
    db.batch_execute(&format!("SET search_path TO \"{schema}\""))?;
    let (mut lost, mut duplicated, mut checked) = (0u64, 0u64, 0u64);
    for (model, version) in &acknowledged.models {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM ml_models WHERE model_name = $1 AND version = $2 \
                 AND is_active AND model_data = $3",
                &[model, version, &version.as_bytes()],
            )?
            .get(0);
        checked += 1;
        if n != 1 {
            println!("lost model {model}/{version}");
            lost += 1;
        }
    }
    for key in &acknowledged.cache_keys {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM prediction_cache WHERE cache_key = $1",
                &[key],
            )?
            .get(0);
        checked += 1;
        if n != 1 {
            println!("lost cache entry {key}");
            lost += 1;
        }
    }
    for (entity_type, first, n) in &acknowledged.embedding_batches {
        let ids: Vec<String> = (*first..first + n).map(|j| j.to_string()).collect();
        let found: i64 = db
            .query_one(
                "SELECT count(*) FROM embeddings WHERE entity_type = $1 AND entity_id = ANY($2)",
                &[entity_type, &ids],
            )?
            .get(0);
        checked += 1;
        if found != *n as i64 {
            println!(
                "lost {} embeddings of batch {entity_type}/{first}",
                *n as i64 - found
            );
            lost += 1;
        }
    }
    for ((model, version), (acked, failed)) in &acknowledged.metrics {
        let stored: i64 = db
            .query_one(
                "SELECT count(*) FROM training_metrics WHERE model_name = $1 AND version = $2",
                &[model, version],
            )?
            .get(0);
        let stored = stored as u64;
        checked += acked;
        // A failed save may have committed before its error: at most one record each.
        if stored < *acked {
            println!("metrics {model}/{version}: acknowledged {acked}, stored {stored}");
            lost += acked - stored;
        } else if stored > acked + failed {
            println!("metrics {model}/{version}: acknowledged {acked}, stored {stored}");
            duplicated += stored - acked - failed;
        }
    }
    for (key, hits) in &acknowledged.hits {
        let counted: i64 = db
            .query_one(
                "SELECT access_count FROM prediction_cache WHERE cache_key = $1",
                &[key],
            )?
            .get(0);
        let counted = counted as u64;
        checked += 1;
        if counted < *hits {
            println!("cache hits of {key}: seen {hits}, counted {counted}");
            lost += hits - counted;
        } else if counted > *hits {
            println!("cache hits of {key}: seen {hits}, counted {counted}");
            duplicated += counted - hits;
        }
    }
    Ok((lost, duplicated, checked))
}
