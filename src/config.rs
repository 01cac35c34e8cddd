//! `RepositoryConfig`: every setting with its default, reading them from the environment, and
//! checking them before anything connects. Its `Debug` never shows the password. The settings
//! are kept by concept: the connection's in `db::config`, the schema's in `schema::settings`,
//! and each feature's with the feature; the public setters write them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::cache::CacheSettings;
use crate::db::config::{ConnectionConfig, MAX_WAIT};
use crate::db::tls::Connector;
use crate::embeddings::EmbeddingSettings;
use crate::error::{RepoError, Result};
use crate::models::ModelSettings;
use crate::monitor::MonitorSettings;
use crate::schema::settings::{CitusMode, MigrationSettings, VectorStorage};
use crate::validate::{self, duration_within};

/// How to reach the database and how the repository behaves.
///
/// Built with [`RepositoryConfig::new`] or [`RepositoryConfig::from_env`] and refined with
/// setters that take and return `self`. Values are checked by [`ModelRepository::open`].
///
/// ```no_run
/// use std::time::Duration;
/// use pg_model_repo::RepositoryConfig;
///
/// let config = RepositoryConfig::new("postgres://app@localhost/ml")
///     .schema("recsys")
///     .pool_size(8)
///     .query_timeout(Duration::from_secs(10));
/// ```
///
/// [`ModelRepository::open`]: crate::ModelRepository::open
#[derive(Clone)]
pub struct RepositoryConfig {
    pub(crate) connection: ConnectionConfig,
    pub(crate) migrations: MigrationSettings,
    pub(crate) models: ModelSettings,
    pub(crate) cache: CacheSettings,
    pub(crate) embeddings: EmbeddingSettings,
    pub(crate) monitor: MonitorSettings,
    /// How often the background thread runs; `None`: no thread.
    pub(crate) reaper_interval: Option<Duration>,
}

impl RepositoryConfig {
    /// A configuration for `database_url` (`postgres://…` URL or `host=… user=…` key/value
    /// string) with every other setting at its default.
    ///
    /// A SQLAlchemy-style scheme such as `postgresql+asyncpg://` is accepted as `postgresql://`.
    pub fn new(database_url: impl Into<String>) -> Self {
        RepositoryConfig {
            connection: ConnectionConfig::new(strip_driver_suffix(database_url.into())),
            migrations: MigrationSettings::default(),
            models: ModelSettings::default(),
            cache: CacheSettings::default(),
            embeddings: EmbeddingSettings::default(),
            monitor: MonitorSettings::default(),
            reaper_interval: Some(Duration::from_secs(60)),
        }
    }

    /// Reads `DATABASE_URL` (required), `DB_POOL_SIZE`, `DB_MAX_OVERFLOW`, `DB_POOL_TIMEOUT`,
    /// `QUERY_TIMEOUT`, `CACHE_DEFAULT_TTL`, `CACHE_MAX_TTL` (durations in seconds, decimals
    /// allowed), `ENABLE_METRICS` (true/false/1/0/yes/no/on/off), `MODEL_REPO_SCHEMA`,
    /// `MODEL_REPO_VECTOR_STORAGE` (auto/bytea/pgvector) and `MODEL_REPO_CITUS`
    /// (auto/off/row/schema).
    ///
    /// A missing `DATABASE_URL` or a malformed value is `InvalidInput` naming the variable.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// let repo = pg_model_repo::ModelRepository::open(pg_model_repo::RepositoryConfig::from_env()?)?;
    /// # Ok(()) }
    /// ```
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `lookup` (useful for tests
    /// and for configuration kept elsewhere than the process environment).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let url = lookup("DATABASE_URL")
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| RepoError::invalid("DATABASE_URL is not set"))?;
        let mut config = RepositoryConfig::new(url);
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        if let Some(v) = var("DB_POOL_SIZE") {
            config.connection.pool_size = parse_var("DB_POOL_SIZE", &v)?;
        }
        if let Some(v) = var("DB_MAX_OVERFLOW") {
            config.connection.max_overflow = parse_var("DB_MAX_OVERFLOW", &v)?;
        }
        if let Some(v) = var("DB_POOL_TIMEOUT") {
            config.connection.pool_timeout = parse_seconds("DB_POOL_TIMEOUT", &v)?;
        }
        if let Some(v) = var("QUERY_TIMEOUT") {
            config.connection.query_timeout = parse_seconds("QUERY_TIMEOUT", &v)?;
        }
        if let Some(v) = var("CACHE_DEFAULT_TTL") {
            config.cache.default_ttl = parse_seconds("CACHE_DEFAULT_TTL", &v)?;
        }
        if let Some(v) = var("CACHE_MAX_TTL") {
            config.cache.max_ttl = parse_seconds("CACHE_MAX_TTL", &v)?;
        }
        if let Some(v) = var("ENABLE_METRICS") {
            config.monitor.enable_metrics = parse_bool("ENABLE_METRICS", &v)?;
        }
        if let Some(v) = var("MODEL_REPO_VECTOR_STORAGE") {
            config.migrations.vector_storage = v.parse().map_err(|_| {
                RepoError::invalid(format!("MODEL_REPO_VECTOR_STORAGE is malformed: {v:?}"))
            })?;
        }
        if let Some(v) = var("MODEL_REPO_CITUS") {
            config.migrations.citus = v
                .parse()
                .map_err(|_| RepoError::invalid(format!("MODEL_REPO_CITUS is malformed: {v:?}")))?;
        }
        if let Some(v) = var("MODEL_REPO_SCHEMA") {
            validate::schema_name("MODEL_REPO_SCHEMA", &v)?;
            config.connection.schema = v;
        }
        Ok(config)
    }

    /// The PostgreSQL schema that holds the tables; created by `open` if absent. Must match
    /// `[A-Za-z_][A-Za-z0-9_]{0,62}` (checked by `open`). Defaults to `"public"`.
    pub fn schema(mut self, name: &str) -> Self {
        self.connection.schema = name.to_owned();
        self
    }

    /// Connections kept open. Defaults to 20.
    pub fn pool_size(mut self, n: u32) -> Self {
        self.connection.pool_size = n;
        self
    }

    /// Extra connections opened under load, on top of `pool_size`. Defaults to 40.
    pub fn max_overflow(mut self, n: u32) -> Self {
        self.connection.max_overflow = n;
        self
    }

    /// How long a call waits for a free connection before `RepoError::Timeout`. Defaults to 30 s.
    pub fn pool_timeout(mut self, d: Duration) -> Self {
        self.connection.pool_timeout = d;
        self
    }

    /// `statement_timeout` (and `lock_timeout`) of single statements; streaming and bulk work
    /// runs without the statement timeout. Defaults to 30 s.
    pub fn query_timeout(mut self, d: Duration) -> Self {
        self.connection.query_timeout = d;
        self
    }

    /// The TTL used by `cache_predictions_default`. Defaults to 3600 s.
    pub fn cache_default_ttl(mut self, d: Duration) -> Self {
        self.cache.default_ttl = d;
        self
    }

    /// The longest TTL a cache entry may have. Defaults to 86400 s.
    pub fn cache_max_ttl(mut self, d: Duration) -> Self {
        self.cache.max_ttl = d;
        self
    }

    /// Whether per-operation timings are recorded. Defaults to true.
    pub fn enable_metrics(mut self, on: bool) -> Self {
        self.monitor.enable_metrics = on;
        self
    }

    /// How often the background reaper deletes expired cache rows and flushes hit counters;
    /// `None` runs no background thread. Defaults to `Some(60 s)`.
    pub fn reaper_interval(mut self, every: Option<Duration>) -> Self {
        self.reaper_interval = every;
        self
    }

    /// Operations slower than this log a warning; a health latency probe above it is
    /// Degraded. Defaults to 1 s.
    pub fn slow_query_threshold(mut self, d: Duration) -> Self {
        self.monitor.slow_query_threshold = d;
        self
    }

    /// Whether `open` creates the schema and applies migrations; with false it runs no DDL.
    /// Defaults to true.
    pub fn auto_migrate(mut self, on: bool) -> Self {
        self.migrations.auto_migrate = on;
        self
    }

    /// The largest model accepted, in bytes; a larger one is `InvalidInput` and nothing of it
    /// is stored. Defaults to 64 GiB ([`DEFAULT_MAX_MODEL_SIZE`](crate::DEFAULT_MAX_MODEL_SIZE)).
    pub fn max_model_size(mut self, bytes: u64) -> Self {
        self.models.max_model_size = bytes;
        self
    }

    /// Models up to this many bytes are stored inline in `ml_models.model_data`; larger ones in
    /// chunks of this size in `ml_model_chunks`, written and read over several connections.
    /// It also bounds memory: a streaming save or load holds a few chunks per stream at a time.
    /// Stored models keep the chunk size they were saved with. Must be within
    /// [`MODEL_CHUNK_SIZE_RANGE`](crate::MODEL_CHUNK_SIZE_RANGE). Defaults to 4 MiB ([`DEFAULT_MODEL_CHUNK_SIZE`](crate::DEFAULT_MODEL_CHUNK_SIZE)).
    pub fn model_chunk_size(mut self, bytes: u32) -> Self {
        self.models.chunk_size = bytes;
        self
    }

    /// How many connections one save or load of a chunked model uses at once (1..=16). The
    /// extra ones are taken only if idle in the pool, never waited for, so a busy pool gives
    /// fewer. Defaults to 2 ([`DEFAULT_MODEL_STREAMS`](crate::DEFAULT_MODEL_STREAMS)).
    pub fn model_streams(mut self, n: u32) -> Self {
        self.models.streams = n;
        self
    }

    /// How long streaming and bulk work (COPY, blob streams, merges of a load, VACUUM, DDL)
    /// may wait on a server that sends nothing: past it the connection is cut and discarded
    /// and the call fails with `RepoError::Timeout`. This is the bound of such calls when the
    /// server or the network hangs; raise it if a single server-side step of your bulk work
    /// (a merge of a very large load, a VACUUM of a huge table) runs longer without output.
    /// Defaults to 600 s.
    pub fn stream_idle_timeout(mut self, d: Duration) -> Self {
        self.connection.stream_idle_timeout = d;
        self
    }

    /// A PEM file with the root certificate(s) that sign the server's certificate; connections
    /// then use TLS and verify the server against it (needs the `tls` feature). Without it,
    /// `sslmode=require` verifies against the system's roots. Defaults to none.
    pub fn tls_root_certificate(mut self, pem_file: impl Into<std::path::PathBuf>) -> Self {
        self.connection.tls_root_certificate = Some(pem_file.into());
        self
    }

    /// How vectors are stored: see [`VectorStorage`]. Defaults to `VectorStorage::Auto`.
    pub fn vector_storage(mut self, storage: VectorStorage) -> Self {
        self.migrations.vector_storage = storage;
        self
    }

    /// Whether and how the repository's tables are distributed on a Citus coordinator: see
    /// [`CitusMode`]. Defaults to `CitusMode::Auto`.
    pub fn citus(mut self, mode: CitusMode) -> Self {
        self.migrations.citus = mode;
        self
    }

    /// `hnsw.ef_search` of every session: how many candidates an HNSW search keeps (more is
    /// slower and closer to exact; at least k are needed for k results). Must be within
    /// 1..=1000 (pgvector's range). Defaults to [`DEFAULT_HNSW_EF_SEARCH`](crate::DEFAULT_HNSW_EF_SEARCH) (100).
    pub fn hnsw_ef_search(mut self, candidates: u32) -> Self {
        self.embeddings.hnsw_ef_search = candidates;
        self
    }

    /// How many COPY streams (one connection each) a `ParallelCopy` load runs, and a full
    /// refresh when it has more than two (on two cores one stream with COPY FREEZE is faster;
    /// docs/embeddings.md). Extra connections are taken only if idle, never waited for. Must be
    /// within 1..=64. Defaults to the number of cores.
    pub fn load_streams(mut self, n: u32) -> Self {
        self.embeddings.load_streams = n;
        self
    }

    /// The configured schema name.
    pub fn schema_name(&self) -> &str {
        &self.connection.schema
    }

    /// Checks every value against its range; called by `open` and `migrate` before any
    /// connection is made. The error names the setting and its range.
    pub(crate) fn validate(&self) -> Result<()> {
        self.connection.validate()?;
        self.cache.validate()?;
        if let Some(every) = self.reaper_interval {
            duration_within("reaper_interval", every, Duration::from_millis(1), MAX_WAIT)?;
        }
        self.monitor.validate()?;
        self.models.validate()?;
        self.embeddings.validate()?;
        // How sessions connect (plaintext or TLS), checked against the build's features.
        Connector::for_config(&self.connection, &self.connection.pg_config()?).map(|_| ())
    }

    /// The connection settings, with the session settings the features ask for.
    pub(crate) fn sessions(&self) -> ConnectionConfig {
        let mut connection = self.connection.clone();
        connection.session_settings = self.embeddings.session_settings();
        connection
    }

    /// The connection target without credentials, for logs and Debug.
    pub(crate) fn redacted_target(&self) -> String {
        self.connection.redacted_target()
    }
}

impl fmt::Debug for RepositoryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (c, m) = (&self.connection, &self.migrations);
        f.debug_struct("RepositoryConfig")
            .field("database", &self.redacted_target())
            .field("schema", &c.schema)
            .field("pool_size", &c.pool_size)
            .field("max_overflow", &c.max_overflow)
            .field("pool_timeout", &c.pool_timeout)
            .field("query_timeout", &c.query_timeout)
            .field("cache_default_ttl", &self.cache.default_ttl)
            .field("cache_max_ttl", &self.cache.max_ttl)
            .field("enable_metrics", &self.monitor.enable_metrics)
            .field("reaper_interval", &self.reaper_interval)
            .field("slow_query_threshold", &self.monitor.slow_query_threshold)
            .field("auto_migrate", &m.auto_migrate)
            .field("max_model_size", &self.models.max_model_size)
            .field("model_chunk_size", &self.models.chunk_size)
            .field("model_streams", &self.models.streams)
            .field("stream_idle_timeout", &c.stream_idle_timeout)
            .field("tls_root_certificate", &c.tls_root_certificate)
            .field("vector_storage", &m.vector_storage)
            .field("citus", &m.citus)
            .field("hnsw_ef_search", &self.embeddings.hnsw_ef_search)
            .field("load_streams", &self.embeddings.load_streams)
            .finish()
    }
}

/// `postgresql+asyncpg://…` (SQLAlchemy's form, used by the system this crate replaces) is the
/// same URL with a driver tag; the tag means nothing here.
fn strip_driver_suffix(url: String) -> String {
    for scheme in ["postgresql+", "postgres+"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            if let Some(pos) = rest.find("://") {
                return format!("{}{}", &scheme[..scheme.len() - 1], &rest[pos..]);
            }
        }
    }
    url
}

fn parse_var<T: FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| RepoError::invalid(format!("{name} is malformed: {value:?}")))
}

fn parse_seconds(name: &str, value: &str) -> Result<Duration> {
    let secs: f64 = parse_var(name, value)?;
    Duration::try_from_secs_f64(secs).map_err(|_| {
        RepoError::invalid(format!(
            "{name} must be a non-negative number of seconds: {value:?}"
        ))
    })
}

fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(RepoError::invalid(format!(
            "{name} is malformed: {value:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::config::MAX_QUERY_TIMEOUT;
    use crate::models::MAX_BYTEA_MODEL_SIZE;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<RepositoryConfig> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RepositoryConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn from_env_reads_every_variable() {
        let c = from(&[
            ("DATABASE_URL", "postgres://u@h/db"),
            ("DB_POOL_SIZE", "3"),
            ("DB_MAX_OVERFLOW", "4"),
            ("DB_POOL_TIMEOUT", "1.5"),
            ("QUERY_TIMEOUT", "7"),
            ("CACHE_DEFAULT_TTL", "10"),
            ("CACHE_MAX_TTL", "20"),
            ("ENABLE_METRICS", "false"),
            ("MODEL_REPO_SCHEMA", "s1"),
            ("MODEL_REPO_VECTOR_STORAGE", "ByteA"),
        ])
        .unwrap();
        assert_eq!(c.connection.pool_size, 3);
        assert_eq!(c.connection.max_overflow, 4);
        assert_eq!(c.connection.pool_timeout, Duration::from_millis(1500));
        assert_eq!(c.connection.query_timeout, Duration::from_secs(7));
        assert_eq!(c.cache.default_ttl, Duration::from_secs(10));
        assert_eq!(c.cache.max_ttl, Duration::from_secs(20));
        assert!(!c.monitor.enable_metrics);
        assert_eq!(c.connection.schema, "s1");
        assert_eq!(c.migrations.vector_storage, VectorStorage::Bytea);
    }

    #[test]
    fn malformed_variables_are_named_in_the_error() {
        for (name, bad) in [
            ("DB_POOL_SIZE", "many"),
            ("DB_MAX_OVERFLOW", "-1"),
            ("DB_POOL_TIMEOUT", "soon"),
            ("QUERY_TIMEOUT", "-3"),
            ("CACHE_DEFAULT_TTL", "1h"),
            ("CACHE_MAX_TTL", "NaN"),
            ("ENABLE_METRICS", "maybe"),
            ("MODEL_REPO_SCHEMA", "bad-name"),
            ("MODEL_REPO_VECTOR_STORAGE", "blob"),
        ] {
            let err = from(&[("DATABASE_URL", "postgres://u@h/db"), (name, bad)]).unwrap_err();
            match err {
                RepoError::InvalidInput(m) => assert!(m.message().contains(name), "{m}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        let missing = from(&[]).unwrap_err();
        assert!(missing.to_string().contains("DATABASE_URL"));
    }

    #[test]
    fn debug_never_shows_the_password() {
        for url in [
            "postgres://alice:s3cr3t-pw@db.example/ml",
            "host=db user=alice password=s3cr3t-pw dbname=ml",
            "host=db user=alice password='s3cr3t-pw' dbname=ml",
            "postgres://alice:s3cr3t-pw@db.example/ml?sslmode=disable&password=s3cr3t-pw",
            "not a url s3cr3t-pw",
        ] {
            let shown = format!("{:?}", RepositoryConfig::new(url));
            assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        }
    }

    #[test]
    fn sqlalchemy_driver_tags_are_dropped() {
        let c = RepositoryConfig::new("postgresql+asyncpg://u:p@h/db");
        assert_eq!(c.connection.database_url, "postgresql://u:p@h/db");
    }

    #[test]
    fn validation_rejects_bad_settings() {
        let base = || RepositoryConfig::new("postgres://u@h/db");
        assert!(base().validate().is_ok());
        assert!(base().schema("x;drop").validate().is_err());
        assert!(base().pool_size(0).validate().is_err());
        assert!(base().hnsw_ef_search(0).validate().is_err());
        assert!(base().hnsw_ef_search(1001).validate().is_err());
        assert!(base().pool_timeout(Duration::ZERO).validate().is_err());
        assert!(base()
            .cache_default_ttl(Duration::from_secs(10))
            .cache_max_ttl(Duration::from_secs(5))
            .validate()
            .is_err());
        assert!(base().max_model_size(0).validate().is_err());
        assert!(base()
            .max_model_size(MAX_BYTEA_MODEL_SIZE + 1)
            .validate()
            .is_ok());
        assert_eq!(base().models.max_model_size, 64 << 30);
        assert!(base().model_chunk_size(1 << 10).validate().is_err());
        assert!(base().model_chunk_size(512 << 20).validate().is_err());
        assert!(base().model_chunk_size(64 << 10).validate().is_ok());
        assert!(base().model_streams(0).validate().is_err());
        assert!(base().model_streams(17).validate().is_err());
        assert!(base().pool_timeout(Duration::MAX).validate().is_err());
        assert!(base().max_overflow(u32::MAX).validate().is_err());
        assert!(base().query_timeout(MAX_QUERY_TIMEOUT).validate().is_ok());
        assert!(base()
            .query_timeout(MAX_QUERY_TIMEOUT + Duration::from_millis(1))
            .validate()
            .is_err());
        assert!(base()
            .reaper_interval(Some(Duration::MAX))
            .validate()
            .is_err());
        assert!(base().schema("pg_x").validate().is_err());
        let tls = RepositoryConfig::new("postgres://u@h/db?sslmode=require").validate();
        assert_eq!(tls.is_err(), !cfg!(feature = "tls"));
    }
}
