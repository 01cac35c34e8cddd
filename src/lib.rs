//! pg-model-repo keeps a machine-learning system's state in PostgreSQL: versioned model blobs
//! with metadata, checksums, aliases and streaming transfers; training metrics with history.
//!
//! Synchronous and thread-safe: one [`ModelRepository`] (cheap to clone) serves every thread
//! of a batch job from one connection pool.
//!
//! ```no_run
//! # fn main() -> pg_model_repo::Result<()> {
//! use pg_model_repo::*;
//! use serde_json::json;
//!
//! let repo = ModelRepository::open(RepositoryConfig::new("postgres://app@localhost/ml").schema("ml"))?;
//! repo.save_model("ranker", "1.0", b"weights v1", &json!({"auc": 0.91}))?;
//! repo.save_model("ranker", "2.0", b"weights v2", &json!({"auc": 0.93}))?;
//! repo.set_model_alias("ranker", "champion", "2.0")?;
//! assert_eq!(repo.load_model("ranker", "@champion")?.as_deref(), Some(&b"weights v2"[..]));
//! repo.save_training_metrics("ranker", "2.0", &[("auc".to_string(), 0.93)].into())?;
//! repo.close();
//! # Ok(()) }
//! ```
//!
//! Every call validates its input before any I/O (bad input is [`RepoError::InvalidInput`]
//! and writes nothing), retries transient connection failures with bounded backoff where the
//! operation is safe to repeat, and reports its timing to [`ModelRepository::get_performance_metrics`].
//!
//! The `postgres` client runs its own small runtime: calling this crate from inside a tokio
//! runtime's worker thread panics there. From async code, use `spawn_blocking`.

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

mod cache;
mod db;
mod embeddings;
mod models;
mod monitor;
mod repository;
#[cfg(all(unix, feature = "throwaway"))]
pub mod throwaway;
mod training;
mod validate;

pub use cache::CacheStats;
pub use db::config::{RepositoryConfig, DEFAULT_APPLICATION_NAME, MAX_BYTEA_MODEL_SIZE};
pub use db::error::{RepoError, Result};
pub use db::pool::PoolState;
pub use db::timings::QueryMetric;
pub use embeddings::{BatchReport, Embedding, LoadMethod, BATCH_COPY_CROSSOVER};
pub use models::ModelInfo;
pub use monitor::{
    CheckResult, EmbeddingsStats, EntityTypeStats, HealthReport, HealthStatus, ModelStats,
    ModelStorageStats, OptimizeReport, ServerQueryStats, StatementStats, TableMaintenance,
};
pub use repository::ModelRepository;
pub use training::TrainingMetricsRecord;
pub use validate::MAX_METADATA_BYTES;

/// The README's examples, compiled as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
