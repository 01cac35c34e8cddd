//! The integration tests, as one test binary (one build, one link, one shared throwaway
//! server for the whole suite). Every test works in its own schema, so they run in parallel.
//! Run them all with `cargo test`, one module with e.g. `cargo test --test it cache::`, and the
//! TLS tests with `cargo test --features tls --test it tls::`.

mod common;
mod logging;

mod aliases;
mod bulk_loads;
mod cache;
#[cfg(feature = "citus")]
mod citus;
#[cfg(feature = "cli")]
mod cli;
mod embedding_storage;
mod embeddings;
mod events;
mod faults;
mod hangs;
mod interop;
mod large_models;
mod lost_replies;
#[cfg(feature = "metrics")]
mod metrics;
mod migration_status;
mod model_sql;
mod models;
mod monitor;
mod pool;
mod retention;
mod schema;
mod search;
mod search_filtered;
#[cfg(feature = "pgvector")]
mod search_pgvector;
mod security;
mod seed_takeover;
mod tls;
mod training;
