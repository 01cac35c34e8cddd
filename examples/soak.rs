//! A bounded chaos soak: several threads run mixed operations while a chaos thread kills the
//! pool's backends every second. At the end every acknowledged write is checked to be present
//! exactly once.
//!
//!     cargo run --release --example soak -- [--seconds 60] [--threads 4]
//!
//! Uses `DATABASE_URL` if set (it must allow pg_terminate_backend of its own sessions),
//! otherwise a throwaway server from the local binaries.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pg_model_repo::throwaway::database_url_or_start;
use pg_model_repo::{ModelRepository, RepositoryConfig};
use serde_json::json;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the workers were told succeeded.
#[derive(Default)]
struct Acknowledged {
    models: Vec<(String, String)>,
    cache_keys: Vec<(String, u64)>,
    /// (entity type, first id number, batch size) of acknowledged embedding batches.
    embedding_batches: Vec<(String, u64, u64)>,
    metrics: BTreeMap<(String, String), u64>,
}

#[derive(Default)]
struct Counters {
    operations: AtomicU64,
    errors: AtomicU64,
    faults: AtomicU64,
}

fn main() -> pg_model_repo::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let args: Vec<String> = std::env::args().collect();
    let seconds = arg(&args, "--seconds", 60);
    let threads = arg(&args, "--threads", 4) as usize;
    let (url, _server) = database_url_or_start(&[("max_connections", "200")])?;
    let schema = format!("soak_{}", std::process::id());
    let repo = ModelRepository::open(
        RepositoryConfig::new(url.clone())
            .schema(&schema)
            .pool_size(threads as u32)
            .max_overflow(2)
            .pool_timeout(Duration::from_secs(10)),
    )?;
    let acknowledged = Mutex::new(Acknowledged::default());
    let counters = Counters::default();
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    println!(
        "soak: {seconds} s, {threads} worker threads, killing the pool's backends every second"
    );

    std::thread::scope(|s| {
        for t in 0..threads {
            let (repo, acknowledged, counters, stop) = (&repo, &acknowledged, &counters, &stop);
            s.spawn(move || worker(t, repo, acknowledged, counters, stop));
        }
        let (counters, stop, url) = (&counters, &stop, &url);
        s.spawn(move || {
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_secs(1));
                counters
                    .faults
                    .fetch_add(kill_backends(url), Ordering::Relaxed);
            }
            stop.store(true, Ordering::Relaxed);
        });
    });

    let lost = verify(&repo, &acknowledged.into_inner().unwrap())?;
    println!(
        "operations done: {}\nfaults injected (backends killed): {}\nerrors surfaced to callers: {}\nwrites lost: {lost}",
        counters.operations.load(Ordering::Relaxed),
        counters.faults.load(Ordering::Relaxed),
        counters.errors.load(Ordering::Relaxed),
    );
    repo.close();
    if let Ok(mut client) = postgres::Client::connect(&url, postgres::NoTls) {
        let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
    }
    if lost > 0 {
        std::process::exit(1);
    }
    Ok(())
}

fn worker(
    t: usize,
    repo: &ModelRepository,
    acknowledged: &Mutex<Acknowledged>,
    counters: &Counters,
    stop: &AtomicBool,
) {
    let model = format!("soak-{t}");
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let version = i.to_string();
        let outcome = match i % 7 {
            0 => repo
                .save_model(&model, &version, version.as_bytes(), &json!({"i": i}))
                .map(|_| {
                    acknowledged
                        .lock()
                        .unwrap()
                        .models
                        .push((model.clone(), version.clone()))
                }),
            1 => repo
                .save_training_metrics(&model, &version, &[("i".to_string(), i as f64)].into())
                .map(|_| {
                    *acknowledged
                        .lock()
                        .unwrap()
                        .metrics
                        .entry((model.clone(), version.clone()))
                        .or_default() += 1;
                }),
            2 => repo.load_model(&model, "latest").map(|_| ()),
            3 => {
                let key = format!("{model}:{i}");
                repo.cache_predictions(&key, &i, Duration::from_secs(3600))
                    .map(|_| acknowledged.lock().unwrap().cache_keys.push((key, i)))
            }
            4 => repo
                .get_cached_predictions::<u64>(&format!("{model}:{}", i.saturating_sub(1)))
                .map(|_| ()),
            5 => {
                let batch: Vec<pg_model_repo::Embedding> = (0..50)
                    .map(|j| {
                        pg_model_repo::Embedding::new(
                            model.clone(),
                            format!("{}", i * 100 + j),
                            vec![i as f32; 8],
                        )
                    })
                    .collect();
                repo.batch_save_embeddings(&batch).map(|_| {
                    acknowledged.lock().unwrap().embedding_batches.push((
                        model.clone(),
                        i * 100,
                        50,
                    ))
                })
            }
            _ => repo.get_model_versions(&model).map(|_| ()),
        };
        counters.operations.fetch_add(1, Ordering::Relaxed);
        if outcome.is_err() {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        i += 1;
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

/// Counts acknowledged writes that are missing or stored more than once.
fn verify(repo: &ModelRepository, acknowledged: &Acknowledged) -> pg_model_repo::Result<u64> {
    let mut lost = 0;
    for (model, version) in &acknowledged.models {
        if repo.load_model(model, version)?.as_deref() != Some(version.as_bytes()) {
            println!("lost model {model}/{version}");
            lost += 1;
        }
    }
    for (key, value) in &acknowledged.cache_keys {
        if repo.get_cached_predictions::<u64>(key)? != Some(*value) {
            println!("lost cache entry {key}");
            lost += 1;
        }
    }
    for (entity_type, first, n) in &acknowledged.embedding_batches {
        let ids: Vec<String> = (*first..first + n).map(|j| j.to_string()).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let found = repo.get_embeddings_many(entity_type, &refs)?;
        let missing = found.iter().filter(|v| v.is_none()).count();
        if missing > 0 {
            println!("lost {missing} embeddings of batch {entity_type}/{first}");
            lost += 1;
        }
    }
    let mut stored: BTreeMap<(String, String), u64> = BTreeMap::new();
    let models: std::collections::BTreeSet<&String> =
        acknowledged.metrics.keys().map(|(m, _)| m).collect();
    for model in models {
        for record in repo.get_training_metrics_history(model)? {
            *stored
                .entry((record.model_name, record.version))
                .or_default() += 1;
        }
    }
    for (key, count) in &acknowledged.metrics {
        let found = stored.get(key).copied().unwrap_or(0);
        if found != *count {
            println!("metrics {key:?}: acknowledged {count}, stored {found}");
            lost += 1;
        }
    }
    println!(
        "verified {} model versions, {} metric records, {} cache entries, {} embedding batches",
        acknowledged.models.len(),
        acknowledged.metrics.values().sum::<u64>(),
        acknowledged.cache_keys.len(),
        acknowledged.embedding_batches.len()
    );
    Ok(lost)
}
