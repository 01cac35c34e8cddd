//! The `metrics` feature with Prometheus: installs metrics-exporter-prometheus's recorder
//! (the application's job: the library never installs one), opens a repository, runs a short
//! load (cache sets, hits and misses, a model saved and loaded, a batch of embeddings, a
//! failing call), and prints the exposition text a Prometheus server would scrape.
//!
//! ```text
//! cargo run --example prometheus --features metrics
//! ```
//!
//! Uses `DATABASE_URL` if set (the schema `prometheus_example` is dropped and recreated),
//! otherwise a throwaway server. A real service serves the text over HTTP: the exporter's
//! `http-listener` feature does that, or `PrometheusHandle::render` behind your own endpoint.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use pg_model_repo::throwaway::database_url_or_start;
use pg_model_repo::{Embedding, LoadMethod, ModelRepository, RepositoryConfig, Result};

const SCHEMA: &str = "prometheus_example";

fn main() -> Result<()> {
    let _ = env_logger::try_init();
    // Install the recorder before opening the repository: its gauges move by increments.
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .expect("no other recorder is installed");
    let (url, _server) = database_url_or_start(&[])?;
    {
        let mut admin = postgres::Client::connect(&url, postgres::NoTls)?;
        admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))?;
    }
    let repo = ModelRepository::open(RepositoryConfig::new(url).schema(SCHEMA))?;
    load(&repo)?;
    eprintln!("pool: {:?}", repo.pool_status());
    println!("{}", handle.render());
    repo.close();
    Ok(())
}

/// A short load over every kind of metric: cache, models, embeddings, one failing call.
fn load(repo: &ModelRepository) -> Result<()> {
    for i in 0..200 {
        repo.cache_predictions(&format!("user:{i}"), &[i, i + 1], Duration::from_secs(600))?;
    }
    for i in 0..1_000 {
        let _: Option<Vec<u32>> = repo.get_cached_predictions(&format!("user:{}", i % 250))?;
    }
    let weights = vec![0u8; 1 << 20];
    repo.save_model("ranker", "1", &weights, &serde_json::json!({"auc": 0.9}))?;
    repo.load_model("ranker", "1")?;
    let batch: Vec<Embedding> = (0..5_000)
        .map(|i| Embedding::new("item", format!("i{i}"), vec![i as f32; 32]))
        .collect();
    repo.load_embeddings(&batch, LoadMethod::Copy)?;
    // A failure: recorded with error.type="invalid_input".
    let _ = repo.save_model("ranker", "", b"", &serde_json::json!({}));
    Ok(())
}
