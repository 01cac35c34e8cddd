//! The main job: a walk through every feature of pg-model-repo against a real PostgreSQL.
//!
//! Uses `DATABASE_URL` if set, otherwise starts a throwaway server from the local PostgreSQL
//! binaries. Works in a schema of its own, dropped at the end.
//!
//!     cargo run --release --example quickstart

use std::collections::BTreeMap;
use std::io::Cursor;
use std::process::ExitCode;

use pg_model_repo::throwaway::database_url_or_start;
use pg_model_repo::{ModelRepository, RepoError, RepositoryConfig};
use serde_json::json;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run() {
        Ok(summary) => {
            println!("\n{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quickstart failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn section(title: &str) {
    println!("\n== {title} ==");
}

fn run() -> pg_model_repo::Result<String> {
    if std::env::var("DATABASE_URL").map_or(true, |u| u.trim().is_empty()) {
        println!(
            "DATABASE_URL is not set: starting a throwaway PostgreSQL from the local binaries"
        );
    }
    let (url, _server) = database_url_or_start(&[])?;
    let schema = format!("quickstart_{}", std::process::id());
    let config = RepositoryConfig::new(url.clone())
        .schema(&schema)
        .pool_size(4)
        .max_overflow(4);
    println!("config: {config:?}");
    let repo = ModelRepository::open(config)?;
    let result = tour(&repo);
    repo.close();
    drop_schema(&url, &schema);
    result
}

fn tour(repo: &ModelRepository) -> pg_model_repo::Result<String> {
    let models = models(repo)?;
    let aliases = aliases(repo)?;
    let streamed = streaming(repo)?;
    let metrics = training(repo)?;
    let vectors = embeddings(repo)?;
    let cleared = cache(repo)?;
    let status = monitoring(repo)?;
    section("Timings");
    for m in repo.get_performance_metrics() {
        println!(
            "{:<28} {:>4} calls  {:>2} errors  mean {:>9.3?}  p99 {:>9.3?}  max {:>9.3?}",
            m.query_type, m.count, m.errors, m.mean, m.p99, m.max
        );
    }
    Ok(format!(
        "quickstart ok: {models} model versions, {aliases} alias moves, {} MiB streamed, \
         {metrics} metric records, {vectors} embeddings, {cleared} cache entries cleared by glob, \
         health {status:?}",
        streamed >> 20
    ))
}

fn models(repo: &ModelRepository) -> pg_model_repo::Result<usize> {
    section("Models");
    let v1 = repo.save_model(
        "ranker",
        "1.0",
        b"weights of v1",
        &json!({"auc": 0.91, "stage": "dev"}),
    )?;
    println!(
        "saved {}/{}: {} bytes, sha256 {}",
        v1.model_name,
        v1.version,
        v1.size_bytes,
        &v1.checksum[..16]
    );
    let v2 = repo.save_model(
        "ranker",
        "2.0",
        b"weights of v2",
        &json!({"auc": 0.93, "stage": "prod"}),
    )?;
    println!("saved {}/{}", v2.model_name, v2.version);
    let again = repo.save_model(
        "ranker",
        "2.0",
        b"weights of v2",
        &json!({"stage": "prod", "auc": 0.93}),
    )?;
    println!(
        "re-saving identical 2.0 is harmless: same checksum {}",
        again.checksum == v2.checksum
    );
    match repo.save_model("ranker", "2.0", b"other bytes", &json!({})) {
        Err(RepoError::Conflict(m)) => println!("re-saving 2.0 with other bytes: conflict ({m})"),
        other => println!("unexpected: {other:?}"),
    }
    let latest = repo.load_model("ranker", "latest")?.unwrap_or_default();
    println!("latest loads {:?}", String::from_utf8_lossy(&latest));
    let prod = repo.search_models(&json!({"stage": "prod"}))?;
    println!(
        "search {{\"stage\": \"prod\"}}: {:?}",
        prod.iter().map(|i| &i.version).collect::<Vec<_>>()
    );
    repo.save_model("ranker", "3.0", b"weights of v3", &json!({"auc": 0.90}))?;
    println!("soft-delete 3.0: {}", repo.delete_model("ranker", "3.0")?);
    println!(
        "load 3.0 after delete: {:?}",
        repo.load_model("ranker", "3.0")?
    );
    let versions = repo.get_model_versions("ranker")?;
    println!(
        "active versions, newest first: {:?}",
        versions.iter().map(|i| &i.version).collect::<Vec<_>>()
    );
    match repo.save_model("ranker", "latest", b"x", &json!({})) {
        Err(RepoError::InvalidInput(m)) => println!("bad input is a typed error: {m}"),
        other => println!("unexpected: {other:?}"),
    }
    for v in ["4.0", "5.0"] {
        repo.save_model("ranker", v, v.as_bytes(), &json!({}))?;
    }
    let removed = repo.cleanup_old_models("ranker", 3)?;
    println!("cleanup keeping the 3 newest active versions removed {removed}");
    Ok(repo.get_model_versions("ranker")?.len())
}

fn aliases(repo: &ModelRepository) -> pg_model_repo::Result<usize> {
    section("Aliases");
    repo.set_model_alias("ranker", "champion", "2.0")?;
    repo.set_model_alias("ranker", "champion", "4.0")?;
    repo.set_model_alias("ranker", "champion", "5.0")?;
    println!("aliases: {:?}", repo.get_model_aliases("ranker")?);
    println!(
        "rollback champion -> {}",
        repo.rollback_model_alias("ranker", "champion")?
    );
    let champion = repo.load_model("ranker", "@champion")?.unwrap_or_default();
    println!("@champion loads {:?}", String::from_utf8_lossy(&champion));
    let history = repo.get_alias_history("ranker", "champion")?;
    println!(
        "champion history: {:?}",
        history.iter().map(|(v, _)| v).collect::<Vec<_>>()
    );
    Ok(history.len())
}

fn streaming(repo: &ModelRepository) -> pg_model_repo::Result<u64> {
    section("Streaming a large model");
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let started = std::time::Instant::now();
    let info = repo.save_model_from_reader(
        "encoder",
        "1",
        &mut Cursor::new(&data),
        &json!({"format": "raw"}),
    )?;
    println!(
        "streamed {} MiB in {:.2?}",
        info.size_bytes >> 20,
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let mut out = Vec::with_capacity(data.len());
    repo.load_model_to_writer("encoder", "latest", &mut out)?;
    println!(
        "streamed back in {:.2?}, identical: {}, checksum verified on the way",
        started.elapsed(),
        out == data
    );
    Ok(info.size_bytes)
}

fn training(repo: &ModelRepository) -> pg_model_repo::Result<usize> {
    section("Training metrics");
    for (version, auc, loss) in [
        ("2.0", 0.93, 0.21),
        ("4.0", 0.94, 0.19),
        ("5.0", 0.95, 0.18),
    ] {
        let metrics: BTreeMap<String, f64> =
            [("auc".to_string(), auc), ("loss".to_string(), loss)].into();
        repo.save_training_metrics("ranker", version, &metrics)?;
    }
    println!(
        "metrics of 5.0: {:?}",
        repo.get_training_metrics("ranker", "5.0")?
    );
    let history = repo.get_training_metrics_history("ranker")?;
    for r in &history {
        println!("  {} {:?}", r.version, r.metrics);
    }
    Ok(history.len())
}

fn embeddings(repo: &ModelRepository) -> pg_model_repo::Result<u64> {
    use pg_model_repo::{Embedding, LoadMethod};
    section("Embeddings");
    repo.save_embeddings("user", "user123", &[0.1, 0.2, 0.3, 0.4])?;
    println!("user123: {:?}", repo.get_embeddings("user", "user123")?);
    match repo.save_embeddings("user", "user124", &[0.1, 0.2]) {
        Err(RepoError::DimensionMismatch {
            expected, actual, ..
        }) => {
            println!(
                "a 2-d vector for type \"user\" (4-d): dimension mismatch ({expected} vs {actual})"
            )
        }
        other => println!("unexpected: {other:?}"),
    }
    let dim = 64;
    let batch: Vec<Embedding> = (0..50_000)
        .map(|i| {
            Embedding::new(
                "item",
                format!("item{i}"),
                (0..dim)
                    .map(|d| ((i * 31 + d) % 97) as f32 / 97.0)
                    .collect(),
            )
        })
        .collect();
    let bar = indicatif::ProgressBar::new(batch.len() as u64);
    let report = repo.load_embeddings_with_progress(&batch, LoadMethod::Copy, &mut |done, _| {
        bar.set_position(done)
    })?;
    bar.finish_and_clear();
    println!(
        "binary COPY of {} vectors ({} KiB) in {:.2?}",
        report.rows,
        report.bytes >> 10,
        report.elapsed
    );
    let small: Vec<Embedding> = batch[..2_000]
        .iter()
        .map(|e| Embedding::new("item", e.entity_id.clone(), vec![0.5; dim as usize]))
        .collect();
    for method in [LoadMethod::Insert, LoadMethod::MultiRowInsert] {
        let r = repo.load_embeddings(&small, method)?;
        println!(
            "{method:?} upsert of {} vectors: {:.0} rows/s",
            r.rows,
            r.rows as f64 / r.elapsed.as_secs_f64()
        );
    }
    let mut bad = small.clone();
    bad[1_500].vector[3] = f32::NAN;
    match repo.batch_save_embeddings(&bad) {
        Err(e) => println!("a batch with a NaN in record 1500: {e} (nothing written)"),
        Ok(_) => println!("unexpected: the bad batch was accepted"),
    }
    let many = repo.get_embeddings_many("item", &["item7", "nope", "item3"])?;
    println!(
        "get_embeddings_many(item7, nope, item3): {:?}",
        many.iter().map(Option::is_some).collect::<Vec<_>>()
    );
    let mut sum = 0.0f64;
    let streamed = repo.for_each_embedding("item", &mut |_, v| sum += f64::from(v[0]))?;
    println!(
        "streamed {streamed} item vectors in constant memory (sum of first components {sum:.1})"
    );
    Ok(streamed + 1)
}

fn cache(repo: &ModelRepository) -> pg_model_repo::Result<u64> {
    section("Prediction cache");
    let ttl = std::time::Duration::from_secs(600);
    for user in ["user123", "user124", "user200"] {
        repo.cache_predictions(&format!("{user}_recs"), &vec![0.9_f32, 0.5, 0.1], ttl)?;
    }
    repo.cache_predictions_default("model:ranker:warm", &json!({"ok": true}))?;
    let hit: Option<Vec<f32>> = repo.get_cached_predictions("user123_recs")?;
    println!("get user123_recs: {hit:?} (a hit, counted in memory)");
    let miss: Option<Vec<f32>> = repo.get_cached_predictions("user999_recs")?;
    println!("get user999_recs: {miss:?} (a miss)");
    println!(
        "time left on user123_recs: {:?}",
        repo.cache_ttl("user123_recs")?.map(|d| d.as_secs())
    );
    repo.cache_predictions("short_lived", &1u8, std::time::Duration::from_millis(300))?;
    std::thread::sleep(std::time::Duration::from_millis(400));
    let expired: Option<u8> = repo.get_cached_predictions("short_lived")?;
    println!("an entry with a 300 ms TTL, read 400 ms later: {expired:?} (expired by the database clock)");
    let computed: Vec<u32> = repo.get_or_compute("user200_top", ttl, || Ok(vec![7, 3, 1]))?;
    println!("get_or_compute user200_top: {computed:?}");
    let cleared = repo.clear_cache("user12[34]_*")?;
    println!("clear_cache(\"user12[34]_*\") removed {cleared} entries");
    let purged = repo.purge_expired_cache()?;
    println!("purge_expired_cache removed {purged}");
    let stats = repo.get_cache_statistics()?;
    println!(
        "cache: {} entries ({} live), {} hits, {} misses, hit rate {:.2}, {} accesses recorded, {} bytes",
        stats.total_entries, stats.active_entries, stats.hits, stats.misses, stats.hit_rate,
        stats.total_access_count, stats.total_bytes
    );
    Ok(cleared)
}

fn monitoring(repo: &ModelRepository) -> pg_model_repo::Result<pg_model_repo::HealthStatus> {
    section("Maintenance");
    let report = repo.optimize_database()?;
    println!(
        "optimize: purged {} expired cache rows in {:.2?}",
        report.expired_cache_rows_purged, report.elapsed
    );
    println!(
        "{:<22} {:>10} {:>10} {:>12} {:>12} {:>10}",
        "table", "dead before", "dead after", "bytes before", "bytes after", "vacuum"
    );
    for t in &report.tables {
        println!(
            "{:<22} {:>10} {:>10} {:>12} {:>12} {:>10.2?}",
            t.table,
            t.dead_tuples_before,
            t.dead_tuples_after,
            t.bytes_before,
            t.bytes_after,
            t.elapsed
        );
    }

    section("Storage");
    let models = repo.get_model_storage_stats()?;
    println!(
        "{:<10} {:>8} {:>7} {:>12} {:>8}",
        "model", "versions", "active", "bytes", "latest"
    );
    for m in &models.models {
        println!(
            "{:<10} {:>8} {:>7} {:>12} {:>8}",
            m.model_name,
            m.versions,
            m.active_versions,
            m.total_bytes,
            m.latest_version.as_deref().unwrap_or("-")
        );
    }
    println!(
        "{:<10} {:>8} {:>7} {:>12}   (table on disk: {} bytes)",
        "total",
        models.total_versions,
        models.active_versions,
        models.total_bytes,
        models.table_bytes
    );
    let embeddings = repo.get_embeddings_stats()?;
    println!(
        "embeddings: {} vectors, {} bytes over {} entity types",
        embeddings.total_embeddings,
        embeddings.total_bytes,
        embeddings.entity_types.len()
    );
    let server = repo.get_server_query_stats()?;
    println!(
        "server statement stats: {}",
        if server.available {
            "available"
        } else {
            &server.detail
        }
    );

    section("Health");
    let health = repo.health_check();
    println!("status: {:?}", health.status);
    for (name, check) in &health.checks {
        println!(
            "  {:<14} {:<5} {:>10.2?}  {}",
            name,
            if check.ok { "ok" } else { "FAIL" },
            check.latency,
            check.detail
        );
    }
    Ok(health.status)
}

fn drop_schema(url: &str, schema: &str) {
    if let Ok(mut client) = postgres::Client::connect(url, postgres::NoTls) {
        let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
    }
}
