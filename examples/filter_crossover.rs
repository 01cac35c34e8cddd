//! Where a candidate set is small enough that scoring its rows exactly beats the server's
//! filtered statement: for candidate sets of growing size, the client-side exact answer (rows
//! fetched by key and scored, what the library does without an index) against the library's
//! filtered HNSW statement run raw (iterative scan, the session settings the library uses),
//! with how often the statement came back short of k (the library then answers exactly too)
//! and which plan the server chose. Its table is in docs/embeddings.md
//! ("Filtered search").
//!
//! ```text
//! cargo run --release --example filter_crossover -- [--rows 20000] [--dim 384] [--queries 100]
//! ```
//!
//! Data as search_bench's (clustered Gaussians); L2, k = 10. Uses `DATABASE_URL` when set,
//! else a throwaway server.

use std::error::Error;
use std::time::Instant;

use pg_model_repo::throwaway::database_url_or_start;
use pg_model_repo::{
    Embedding, Metric, ModelRepository, RepositoryConfig, SearchFilter, VectorStorage,
    FILTERED_MAX_SCAN_TUPLES,
};

const K: usize = 10;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let centres: Vec<Vec<f32>> = (0..100)
        .map(|_| (0..dim).map(|_| rng.f32() * 2.0 - 1.0).collect())
        .collect();
    (0..n)
        .map(|_| {
            let c = &centres[rng.usize(..100)];
            c.iter().map(|x| x + (rng.f32() - 0.5) * 0.5).collect()
        })
        .collect()
}

fn main() -> Result<(), Box<dyn Error>> {
    let (rows, dim, nq) = (
        arg("--rows", 20_000),
        arg("--dim", 384),
        arg("--queries", 100),
    );
    let (url, _server) = database_url_or_start(&[("max_connections", "50")])?;
    let schema = format!("filter_crossover_{}", std::process::id());
    let repo = ModelRepository::open(
        RepositoryConfig::new(url.clone())
            .schema(&schema)
            .vector_storage(VectorStorage::Pgvector)
            .reaper_interval(None),
    )?;
    let data = vectors(rows, dim, 42);
    for t in ["indexed", "exact"] {
        let batch: Vec<Embedding> = data
            .iter()
            .enumerate()
            .map(|(i, v)| Embedding::new(t, format!("e{i:07}"), v.clone()))
            .collect();
        repo.replace_embeddings(t, &batch)?;
    }
    repo.create_vector_index("indexed", Metric::L2)?;
    let queries = vectors(nq, dim, 43);
    let mut raw = postgres::Client::connect(&url, postgres::NoTls)?;
    raw.batch_execute(&format!(
        "SET search_path TO \"{schema}\", pgvector, public; SET hnsw.ef_search = 100; \
         SET hnsw.iterative_scan = relaxed_order; SET hnsw.max_scan_tuples = {FILTERED_MAX_SCAN_TUPLES}"
    ))?;
    let sql = format!(
        "SELECT entity_id, distance FROM ( \
             SELECT entity_id::text AS entity_id, (embeddings::vector({dim}) <-> $1::vector({dim}))::float4 AS distance \
             FROM embeddings WHERE entity_type = 'indexed' AND entity_id = ANY($3::text[]) \
             ORDER BY embeddings::vector({dim}) <-> $1::vector({dim}) LIMIT $2) AS nearest \
         ORDER BY distance, entity_id"
    );
    let statement = raw.prepare(&sql)?;
    println!("{rows} rows x {dim} dims, {nq} queries, k {K}");
    println!(
        "{:>10} {:>14} {:>14} {:>10} {:>9}  plan",
        "candidates", "exact_ms/q", "sql_ms/q", "sql_short", "recall@10"
    );
    let mut rng = fastrand::Rng::with_seed(5);
    for size in [100, 500, 1000, 2000, 5000, 10_000] {
        if size > rows {
            break;
        }
        let mut ids: Vec<String> = (0..rows).map(|i| format!("e{i:07}")).collect();
        rng.shuffle(&mut ids);
        ids.truncate(size);
        let filter = SearchFilter {
            among: Some(ids.clone()),
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut truth = Vec::new();
        for q in &queries {
            let found = repo.nearest_embeddings_filtered("exact", q, K, Metric::L2, &filter)?;
            truth.push(found.into_iter().map(|n| n.entity_id).collect::<Vec<_>>());
        }
        let exact_ms = t0.elapsed().as_secs_f64() * 1e3 / nq as f64;
        let t0 = Instant::now();
        let (mut short, mut hits) = (0, 0);
        for (q, truth) in queries.iter().zip(&truth) {
            let v = pgvector::Vector::from(q.clone());
            let found = raw.query(&statement, &[&v, &(K as i64), &ids])?;
            short += usize::from(found.len() < K);
            hits += found
                .iter()
                .filter(|r| truth.contains(&r.get::<_, String>(0)))
                .count();
        }
        let recall = hits as f64 / (K * nq) as f64;
        let hnsw_ms = t0.elapsed().as_secs_f64() * 1e3 / nq as f64;
        // Which plan the server chose: the HNSW index, or the key and a sort (exact).
        let v = pgvector::Vector::from(queries[0].clone());
        let plan: Vec<String> = raw
            .query(&format!("EXPLAIN {sql}"), &[&v, &(K as i64), &ids])?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let used = if plan.iter().any(|l| l.contains("hnsw")) {
            "hnsw"
        } else {
            "key + sort"
        };
        println!("{size:>10} {exact_ms:>14.2} {hnsw_ms:>14.2} {short:>10} {recall:>9.3}  {used}");
    }
    repo.close();
    raw.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))?;
    Ok(())
}
