//! One load, for a profiler: prepares a batch and a fresh schema, prints `ready`, runs the
//! load when a line arrives on stdin and prints `done <seconds>`, so that a profiler started
//! after `ready` records the load, not the set-up. Where the time goes in docs/embeddings.md
//! was measured with it (`scripts`: see docs/embeddings.md, "Where the time goes").
//!
//! Methods: `copy`, `parallel_copy` (each into a new type), `replace`, `reload` (the same keys
//! again, `load_embeddings(…, Copy)`), `append` (new keys into a type holding as many,
//! `load_embeddings(…, Copy)`). Uses `DATABASE_URL`, else a throwaway server.

use std::io::BufRead;
use std::time::Instant;

use pg_model_repo::throwaway::database_url_or_start;
use pg_model_repo::{Embedding, LoadMethod, ModelRepository, RepositoryConfig, VectorStorage};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let method = args.next().unwrap_or_else(|| "copy".into());
    let rows: usize = args.next().map_or(Ok(100_000), |v| v.parse())?;
    let dim: usize = args.next().map_or(Ok(384), |v| v.parse())?;
    let (url, _server) = database_url_or_start(&[])?;
    let schema = format!("profile_{}", std::process::id());
    let repo = ModelRepository::open(
        RepositoryConfig::new(url.clone())
            .schema(&schema)
            .vector_storage(VectorStorage::Bytea)
            .reaper_interval(None),
    )?;
    let mut rng = fastrand::Rng::with_seed(42);
    let batch: Vec<Embedding> = (0..rows)
        .map(|i| {
            let vector = (0..dim).map(|_| rng.f32()).collect();
            Embedding::new("profile", format!("entity-{i:09}"), vector)
        })
        .collect();
    if method == "replace" || method == "reload" {
        repo.load_embeddings(&batch, LoadMethod::Copy)?;
    }
    if method == "append" {
        let base: Vec<Embedding> = batch
            .iter()
            .map(|e| Embedding::new("profile", format!("base-{}", e.entity_id), e.vector.clone()))
            .collect();
        repo.load_embeddings(&base, LoadMethod::Copy)?;
    }
    println!("ready");
    std::io::stdin().lock().lines().next().transpose()?;
    let started = Instant::now();
    let report = match method.as_str() {
        "copy" | "reload" | "append" => repo.load_embeddings(&batch, LoadMethod::Copy)?,
        "parallel_copy" => repo.load_embeddings(&batch, LoadMethod::ParallelCopy)?,
        "replace" => repo.replace_embeddings("profile", &batch)?,
        other => return Err(format!("unknown method {other}").into()),
    };
    println!("rows {}", report.rows);
    println!("done {:.3}", started.elapsed().as_secs_f64());
    let mut admin = postgres::Client::connect(&url, postgres::NoTls)?;
    repo.close();
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;
    Ok(())
}
