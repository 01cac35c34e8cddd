//! `embeddings …`: load from and export to files (`load`, `export`), and the commands that
//! read or drop a type (`stats`, `drop`, `nearest`).

mod export;
mod load;
pub mod source;

/// What the Parquet writer shares with the export.
#[cfg(feature = "parquet")]
pub mod export_support {
    pub use super::export::{persist, temp_beside, RowWriter};
}

use std::path::PathBuf;

use pg_model_repo::{Metric, ModelRepository, Neighbor};
use serde_json::{json, Value};

use crate::connect;
use crate::error::{CliError, EXIT_OK};
use crate::npy;
use crate::output::{self, table, to_json};
use crate::Global;

pub use export::ExportArgs;
pub use load::LoadArgs;

#[derive(Debug, clap::Subcommand)]
pub enum EmbeddingsCommand {
    /// Load vectors from a .npy file and an ids file (or a Parquet file), streamed from
    /// disk; all or nothing. Every check of the files runs before anything is written.
    Load(LoadArgs),
    /// Write every vector of a type to a .npy file (little-endian float32) and an ids file,
    /// or to a Parquet file, streamed; the files appear only when complete.
    Export(ExportArgs),
    /// Per entity type: count, dimension, bytes, last update.
    Stats,
    /// Remove every vector of a type and its dimension; prints how many went.
    Drop(DropArgs),
    /// The K nearest vectors of a type to an entity's vector or to vectors in a .npy file.
    Nearest(NearestArgs),
}

#[derive(Debug, clap::Args)]
pub struct DropArgs {
    /// The entity type.
    entity_type: String,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("query").required(true).args(["id", "vector"])))]
pub struct NearestArgs {
    /// The entity type to search.
    entity_type: String,
    /// Search near this entity's vector (the entity itself is left out of the answer).
    #[arg(long)]
    id: Option<String>,
    /// Search near the vector(s) in this .npy file: shape (dimension,) or (n, dimension).
    #[arg(long)]
    vector: Option<PathBuf>,
    /// How many neighbours (1 to 10,000).
    #[arg(short, long, default_value_t = 10)]
    k: usize,
    /// The distance: l2 (Euclidean), cosine (1 - cosine similarity) or inner-product (its
    /// negative).
    #[arg(long, value_enum, default_value_t = MetricArg::L2)]
    metric: MetricArg,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum MetricArg {
    L2,
    Cosine,
    InnerProduct,
}

impl MetricArg {
    fn metric(self) -> Metric {
        match self {
            MetricArg::L2 => Metric::L2,
            MetricArg::Cosine => Metric::Cosine,
            MetricArg::InnerProduct => Metric::InnerProduct,
        }
    }
}

pub fn run(global: &Global, command: &EmbeddingsCommand) -> Result<i32, CliError> {
    match command {
        EmbeddingsCommand::Load(args) => load::run(global, args),
        EmbeddingsCommand::Export(args) => export::run(global, args),
        EmbeddingsCommand::Stats => stats(global),
        EmbeddingsCommand::Drop(args) => drop_type(global, args),
        EmbeddingsCommand::Nearest(args) => nearest(global, args),
    }
}

fn stats(global: &Global) -> Result<i32, CliError> {
    let repo = connect::open(global)?;
    let stats = repo
        .get_embeddings_stats()
        .map_err(|e| CliError::repo("cannot read the embedding statistics", e))?;
    repo.close();
    output::print(global.format, to_json(&stats), || {
        let rows: Vec<Vec<String>> = stats
            .entity_types
            .iter()
            .map(|t| {
                vec![
                    t.entity_type.clone(),
                    t.count.to_string(),
                    t.dimension.to_string(),
                    output::bytes(t.total_bytes),
                    t.last_update.map(output::time).unwrap_or_default(),
                ]
            })
            .collect();
        format!(
            "{}total: {} vectors, {} (tables {})\n",
            table(
                &["TYPE", "COUNT", "DIMENSION", "BYTES", "LAST UPDATE"],
                &rows
            ),
            stats.total_embeddings,
            output::bytes(stats.total_bytes),
            output::bytes(stats.table_bytes)
        )
    })?;
    Ok(EXIT_OK)
}

fn drop_type(global: &Global, args: &DropArgs) -> Result<i32, CliError> {
    let repo = connect::open(global)?;
    let removed = repo
        .drop_embedding_type(&args.entity_type)
        .map_err(|e| CliError::repo(format!("cannot drop {}", args.entity_type), e))?;
    repo.close();
    output::print(
        global.format,
        json!({"entity_type": args.entity_type, "removed": removed}),
        || format!("dropped {}: {removed} vectors removed", args.entity_type),
    )?;
    Ok(EXIT_OK)
}

fn nearest(global: &Global, args: &NearestArgs) -> Result<i32, CliError> {
    let queries = match &args.vector {
        Some(path) => npy::read_all(&npy::inspect(path, true)?)?,
        None => Vec::new(),
    };
    let repo = connect::open(global)?;
    let metric = args.metric.metric();
    let (labels, answers): (Vec<Value>, Vec<Vec<Neighbor>>) = match &args.id {
        Some(id) => {
            let vector = repo
                .get_embeddings(&args.entity_type, id)
                .map_err(|e| CliError::repo(format!("cannot read {} {id}", args.entity_type), e))?
                .ok_or_else(|| {
                    CliError::failed(format!("{} has no vector with id {id:?}", args.entity_type))
                })?;
            // One more, as the entity itself comes back; k = 0 stays 0 for the library to refuse.
            let k = if args.k == 0 {
                0
            } else {
                (args.k + 1).min(pg_model_repo::MAX_NEAREST_K.max(args.k))
            };
            let mut found = search(&repo, args, &[vector], k, metric)?;
            let mut neighbors = found.pop().unwrap_or_default();
            neighbors.retain(|n| &n.entity_id != id);
            neighbors.truncate(args.k);
            (vec![json!(id)], vec![neighbors])
        }
        None => {
            let found = search(&repo, args, &queries, args.k, metric)?;
            ((0..found.len()).map(|i| json!(i)).collect(), found)
        }
    };
    repo.close();
    let results: Vec<Value> = labels
        .iter()
        .zip(&answers)
        .map(|(query, neighbors)| {
            json!({"query": query, "neighbors": neighbors.iter()
                .map(|n| json!({"entity_id": n.entity_id, "distance": n.distance}))
                .collect::<Vec<_>>()})
        })
        .collect();
    output::print(
        global.format,
        json!({"entity_type": args.entity_type, "k": args.k,
               "metric": metric.as_str(), "results": results}),
        || {
            let mut text = String::new();
            for (query, neighbors) in labels.iter().zip(&answers) {
                if answers.len() > 1 {
                    text.push_str(&format!("query {query}\n"));
                }
                let rows: Vec<Vec<String>> = neighbors
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        vec![
                            (i + 1).to_string(),
                            n.entity_id.clone(),
                            n.distance.to_string(),
                        ]
                    })
                    .collect();
                text.push_str(&table(&["RANK", "ENTITY_ID", "DISTANCE"], &rows));
            }
            text
        },
    )?;
    Ok(EXIT_OK)
}

fn search(
    repo: &ModelRepository,
    args: &NearestArgs,
    queries: &[Vec<f32>],
    k: usize,
    metric: Metric,
) -> Result<Vec<Vec<Neighbor>>, CliError> {
    let found = if queries.len() == 1 {
        repo.nearest_embeddings(&args.entity_type, &queries[0], k, metric)
            .map(|n| vec![n])
    } else {
        repo.nearest_embeddings_many(&args.entity_type, queries, k, metric)
    };
    found.map_err(|e| CliError::repo(format!("cannot search {}", args.entity_type), e))
}
