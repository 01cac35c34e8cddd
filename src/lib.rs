//! pg-model-repo keeps a machine-learning system's state in PostgreSQL, synchronously and
//! thread-safely: one [`ModelRepository`] (cheap to clone) serves every thread of a batch job
//! from one connection pool. Five areas, each a set of methods on the repository:
//!
//! - **Models**: versioned blobs with metadata, SHA-256 checksums, soft delete, cleanup of old
//!   versions and retention policies that never drop what an alias serves, aliases with a
//!   rollback stack and history, change events a batch job can wait on, and streaming
//!   save/load in constant memory for models of any size ([`ModelRepository::save_model`],
//!   [`ModelRepository::load_model_to_writer`], [`ModelRepository::apply_retention`],
//!   [`ModelRepository::subscribe_model_events`], …).
//! - **Embeddings**: vectors per (entity type, id) with one dimension per type, batch loads by
//!   INSERT, multi-row INSERT, binary COPY or parallel COPY ([`LoadMethod`]), streaming reads
//!   ([`ModelRepository::batch_save_embeddings`], [`ModelRepository::for_each_embedding`], …),
//!   and nearest-neighbour search, exact on any storage or through pgvector's HNSW indexes,
//!   filtered by candidates, exclusions or an id prefix, over f32 or half-size (f16) types
//!   ([`ModelRepository::nearest_embeddings`], [`ModelRepository::create_vector_index`],
//!   [`ModelRepository::nearest_embeddings_filtered`],
//!   [`ModelRepository::declare_embedding_type`]).
//! - **Prediction cache**: CBOR values with a TTL judged by the database clock, Redis-style glob
//!   clearing, buffered hit counts and a background reaper
//!   ([`ModelRepository::get_or_compute`], [`ModelRepository::clear_cache`], …).
//! - **Training metrics**: named values per model version, with history
//!   ([`ModelRepository::save_training_metrics`]).
//! - **Monitoring**: health checks, per-operation timings, storage statistics, VACUUM ANALYZE
//!   ([`ModelRepository::health_check`], [`ModelRepository::get_performance_metrics`],
//!   [`ModelRepository::pool_status`], …), and with the `metrics` feature every operation and
//!   the pool through the `metrics` facade under OpenTelemetry's names (docs/metrics.md).
//!
//! ```no_run
//! # fn main() -> pg_model_repo::Result<()> {
//! use pg_model_repo::*;
//! use serde_json::json;
//! use std::time::Duration;
//!
//! let repo = ModelRepository::open(RepositoryConfig::new("postgres://app@localhost/ml").schema("ml"))?;
//! repo.save_model("ranker", "1.0", b"weights v1", &json!({"auc": 0.91}))?;
//! repo.save_model("ranker", "2.0", b"weights v2", &json!({"auc": 0.93}))?;
//! repo.set_model_alias("ranker", "champion", "2.0")?;
//! assert_eq!(repo.load_model("ranker", "@champion")?.as_deref(), Some(&b"weights v2"[..]));
//! repo.save_training_metrics("ranker", "2.0", &[("auc".to_string(), 0.93)].into())?;
//! repo.save_embeddings("user", "u42", &[0.1, 0.2, 0.3])?;
//! repo.cache_predictions("user:u42:recs", &vec!["item7", "item3"], Duration::from_secs(600))?;
//! println!("{:?}", repo.health_check().status);
//! repo.close();
//! # Ok(()) }
//! ```
//!
//! Every call validates its input before any I/O (bad input is [`RepoError::InvalidInput`]
//! and writes nothing), retries transient connection failures with bounded backoff where the
//! operation is safe to repeat, and reports its timing to
//! [`ModelRepository::get_performance_metrics`]. When the server or the network hangs, no call
//! blocks past its bound (a client-side watchdog cuts the connection; see
//! [`RepositoryConfig::stream_idle_timeout`]), and a write whose commit reply was lost answers
//! right after its retry or fails with [`RepoError::OutcomeUnknown`].
//!
//! The `postgres` client runs its own small runtime: calling this crate from inside a tokio
//! runtime's worker thread panics there. From async code, use `spawn_blocking`.
//!
//! # Module map
//!
//! Arrows point down: the handle composes the features, the features use the schema and the
//! plumbing, the plumbing never names a feature. `error` and `validate` are leaves every layer
//! uses.
//!
//! | module | owns |
//! |---|---|
//! | `repository` | the [`ModelRepository`] handle: open (migrations, pool, each feature's registration), the timing of every call, the close order |
//! | `config` | [`RepositoryConfig`]: the public setters, the environment, one validation; each concept keeps its own settings |
//! | `models/` | versions and checksums, references (`latest`, `@alias`), blob streaming, chunked storage over parallel streams, aliases (stack and history), retention policies, change events (NOTIFY from every write, subscriptions, waiting for an alias to move), the models' settings |
//! | `embeddings/` | types and validation, the dimension registry, the shared SQL, single and streaming reads, load plans, COPY rows, `ParallelCopy`, full refreshes, similarity search (exact scoring, HNSW indexes) |
//! | `cache/` | entries (CBOR, TTL), Redis globs, the expiry chore of the background thread |
//! | `training` | training metrics |
//! | `monitor/` | per-operation timings, buffered access counts, health, storage statistics, maintenance |
//! | `schema/` | migrations and the SQL they embed, the seed takeover, Citus distribution, the one table list, the leftovers sweep, the schema's settings |
//! | `db/` | connection plumbing: connection settings, pool (checkout with retry), its occupancy counts ([`PoolStatus`]) and thread-affine slots, retry, the per-call wrapper, the background thread, TLS, the binary COPY format, the hung-server watchdog (`deadline`), commits whose reply may be lost (`commit`), the tables' layout |
//! | `error`, `validate` | [`RepoError`] with typed causes; input rules shared by every area (names, lengths, metadata, settings' ranges) |
//! | `metrics` | a leaf: every name, unit and attribute sent through the `metrics` facade (feature `metrics`, docs/metrics.md); empty inline functions without the feature |
//! | `throwaway` | throwaway PostgreSQL servers for tests and examples, which can be frozen, and a proxy that loses commit replies (feature `throwaway`, unix) |
//!
//! # Output types
//!
//! One rule: every type a call returns derives `Debug` and `serde::Serialize`; the types whose
//! fields API.md lists ([`ModelInfo`], [`CacheStats`], [`QueryMetric`], [`HealthReport`], …)
//! are plain structs users may build and match, and the ones this crate shapes (statistics and
//! reports such as [`ModelStorageStats`] or [`PoolState`]) are `#[non_exhaustive]`, so fields
//! can be added.

#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

mod cache;
mod config;
mod db;
mod embeddings;
mod error;
mod metrics;
mod models;
mod monitor;
mod repository;
mod schema;
#[cfg(all(unix, feature = "throwaway"))]
pub mod throwaway;
mod training;
mod validate;

pub use cache::CacheStats;
pub use config::RepositoryConfig;
pub use db::config::DEFAULT_APPLICATION_NAME;
pub use db::pool::{PoolState, PoolStatus};
pub use embeddings::DEFAULT_HNSW_EF_SEARCH;
pub use embeddings::{
    BatchReport, Embedding, LoadMethod, Metric, Neighbor, SearchFilter, VectorPrecision,
    BATCH_COPY_CROSSOVER, FILTERED_MAX_SCAN_TUPLES, MAX_FILTER_IDS, MAX_NEAREST_K,
};
pub use error::{ErrorDetail, RepoError, Result, TimeoutDetail, TimeoutKind};
pub use models::ModelInfo;
pub use models::{
    ModelEvent, ModelEventKind, ModelEvents, RetentionDecision, RetentionPolicy, RetentionReason,
    RetentionReport, MAX_EVENT_PAYLOAD_BYTES, MODEL_EVENTS_CAPACITY,
};
pub use models::{
    DEFAULT_MAX_MODEL_SIZE, DEFAULT_MODEL_CHUNK_SIZE, DEFAULT_MODEL_STREAMS, MAX_BYTEA_MODEL_SIZE,
    MODEL_CHUNK_SIZE_RANGE,
};
pub use monitor::timings::QueryMetric;
pub use monitor::{
    CheckResult, EmbeddingsStats, EntityTypeStats, HealthReport, HealthStatus, ModelStats,
    ModelStorageStats, OptimizeReport, ServerQueryStats, StatementStats, TableMaintenance,
};
pub use repository::ModelRepository;
pub use schema::migrate::{AppliedMigration, MigrationReport, MigrationStatus};
pub use schema::seed_takeover::{QuarantinedEmbedding, SeedTakeoverReport};
pub use schema::settings::{CitusMode, VectorStorage};
pub use training::TrainingMetricsRecord;
pub use validate::MAX_METADATA_BYTES;

/// The README's examples, compiled as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The examples of docs/cache.md, compiled as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../docs/cache.md")]
pub struct CacheDoctests;

/// The examples of docs/embeddings.md, compiled as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../docs/embeddings.md")]
pub struct EmbeddingsDoctests;

/// The examples of docs/models.md, compiled as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../docs/models.md")]
pub struct ModelsDoctests;

/// The examples of docs/migrating-from-python.md, compiled as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../docs/migrating-from-python.md")]
pub struct MigratingFromPythonDoctests;
