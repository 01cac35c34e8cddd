//! `RepositoryConfig`: every setting with its default, reading them from the environment, and
//! checking them before anything connects. Its `Debug` never shows the password.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{RepoError, Result};
use crate::validate;

/// The largest single BYTEA value that binary COPY really takes: 1 GiB - 1 MiB. Models
/// stored inline were limited to it; larger ones are stored in chunks.
pub const MAX_BYTEA_MODEL_SIZE: u64 = (1 << 30) - (1 << 20);

/// The default of [`RepositoryConfig::max_model_size`]: 64 GiB.
pub const DEFAULT_MAX_MODEL_SIZE: u64 = 64 << 30;

/// The default of [`RepositoryConfig::model_chunk_size`]: 4 MiB.
pub const DEFAULT_MODEL_CHUNK_SIZE: u32 = 4 << 20;

/// The bounds of [`RepositoryConfig::model_chunk_size`]: 64 KiB ..= 256 MiB.
pub const MODEL_CHUNK_SIZE_RANGE: std::ops::RangeInclusive<u32> = (64 << 10)..=(256 << 20);

/// The default of [`RepositoryConfig::model_streams`].
pub const DEFAULT_MODEL_STREAMS: u32 = 2;

/// The application_name given to every connection whose URL does not name one.
pub const DEFAULT_APPLICATION_NAME: &str = "pg-model-repo";

/// How a repository stores its vectors: as little-endian f32 bytes (BYTEA), or in pgvector's
/// `vector` type (the same f32 values; needed for HNSW indexes).
///
/// The `vector` extension lives once per database in a schema of its own (`pgvector`, created
/// with it) or wherever it was installed before, never inside a repository's schema.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VectorStorage {
    /// A new schema (no vectors yet) uses pgvector where the extension is installed or can be
    /// created, BYTEA elsewhere; a schema that has vectors keeps the storage it has, so an
    /// extension installed later never rewrites a table behind anyone's back.
    #[default]
    Auto,
    /// BYTEA, even where pgvector is available. A schema converted earlier stays converted
    /// (there is no way back; a warning says so).
    Bytea,
    /// pgvector's `vector` type. `open` (with `auto_migrate`) and
    /// [`ModelRepository::migrate`](crate::ModelRepository::migrate) convert a BYTEA schema,
    /// rows included: the conversion rewrites the embeddings table under an exclusive lock
    /// (readers and writers of every type wait until it commits). Without pgvector on the
    /// server it is `InvalidInput`.
    Pgvector,
}

impl VectorStorage {
    /// The setting's name: `auto`, `bytea`, `pgvector`.
    pub fn as_str(self) -> &'static str {
        match self {
            VectorStorage::Auto => "auto",
            VectorStorage::Bytea => "bytea",
            VectorStorage::Pgvector => "pgvector",
        }
    }
}

impl std::str::FromStr for VectorStorage {
    type Err = RepoError;

    /// Parses the names [`VectorStorage::as_str`] gives (any case).
    fn from_str(s: &str) -> Result<Self> {
        parse_named(
            s,
            "vector storage",
            &[
                VectorStorage::Auto,
                VectorStorage::Bytea,
                VectorStorage::Pgvector,
            ],
            VectorStorage::as_str,
        )
    }
}

/// The one of `all` whose `name` is `s` (any case, blanks around ignored); otherwise
/// `InvalidInput` listing the names: "unknown {what} \"x\" (a, b, c)".
fn parse_named<T: Copy>(s: &str, what: &str, all: &[T], name: fn(T) -> &'static str) -> Result<T> {
    all.iter()
        .copied()
        .find(|v| name(*v).eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|v| name(*v)).collect();
            RepoError::invalid(format!("unknown {what} {s:?} ({})", names.join(", ")))
        })
}

/// Whether and how a repository distributes its tables on a database with the Citus
/// extension (a coordinator of a Citus cluster). On a database without Citus only `Off` and
/// `Auto` open; `Auto` then does nothing.
///
/// The mode is fixed when a schema is created: `open` and
/// [`ModelRepository::migrate`](crate::ModelRepository::migrate) distribute the schema's tables
/// as part of the migration, under the same advisory lock, and an interrupted distribution
/// is finished by the next open. `sql/citus.sql` runs the same statements by hand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CitusMode {
    /// Follow the database: with the `citus` extension, a schema Citus made a distributed
    /// schema (listed in `citus_schemas`, because `citus.enable_schema_based_sharding` was on
    /// when it was created) is schema-based, any other schema row-based. Without the
    /// extension, a plain PostgreSQL schema.
    #[default]
    Auto,
    /// Never distribute: the tables stay local to the coordinator (a schema Citus already
    /// distributed is used as it is).
    Off,
    /// Row-based: embeddings hash-distributed by entity id, the cache by key, the model
    /// tables co-located by model name, the type registry a reference table on every node.
    RowBased,
    /// Schema-based sharding: the whole schema lives on one node (its own co-location
    /// group), so many repositories spread over the cluster, one schema each.
    SchemaBased,
}

impl CitusMode {
    /// The setting's name: `auto`, `off`, `row`, `schema`.
    pub fn as_str(self) -> &'static str {
        match self {
            CitusMode::Auto => "auto",
            CitusMode::Off => "off",
            CitusMode::RowBased => "row",
            CitusMode::SchemaBased => "schema",
        }
    }
}

impl std::str::FromStr for CitusMode {
    type Err = RepoError;

    /// Parses the names [`CitusMode::as_str`] gives (any case).
    fn from_str(s: &str) -> Result<Self> {
        parse_named(
            s,
            "Citus mode",
            &[
                CitusMode::Auto,
                CitusMode::Off,
                CitusMode::RowBased,
                CitusMode::SchemaBased,
            ],
            CitusMode::as_str,
        )
    }
}

/// How to get pgvector, for errors that need it.
pub(crate) const PGVECTOR_INSTALL_HINT: &str = "Install pgvector on the server (Debian/Ubuntu: \
    `apt-get install postgresql-<major>-pgvector`; from source: `git clone \
    https://github.com/pgvector/pgvector && cd pgvector && make && make install`; managed \
    services ship it), then convert the schema with ModelRepository::migrate and \
    RepositoryConfig::vector_storage(VectorStorage::Pgvector).";

/// pgvector's default `hnsw.ef_search` is 40; searches here default to more candidates, for
/// a recall@10 above 0.95 on clustered data (docs/embeddings.md).
pub const DEFAULT_HNSW_EF_SEARCH: u32 = 100;

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
    pub(crate) database_url: String,
    pub(crate) schema: String,
    pub(crate) pool_size: u32,
    pub(crate) max_overflow: u32,
    pub(crate) pool_timeout: Duration,
    pub(crate) query_timeout: Duration,
    pub(crate) cache_default_ttl: Duration,
    pub(crate) cache_max_ttl: Duration,
    pub(crate) enable_metrics: bool,
    pub(crate) reaper_interval: Option<Duration>,
    pub(crate) slow_query_threshold: Duration,
    pub(crate) auto_migrate: bool,
    pub(crate) max_model_size: u64,
    pub(crate) model_chunk_size: u32,
    pub(crate) model_streams: u32,
    pub(crate) stream_idle_timeout: Duration,
    pub(crate) tls_root_certificate: Option<std::path::PathBuf>,
    pub(crate) vector_storage: VectorStorage,
    pub(crate) citus: CitusMode,
    pub(crate) hnsw_ef_search: u32,
}

/// The most connections one pool may open (pool_size + max_overflow): far above what one
/// PostgreSQL serves well, low enough that the pool's bookkeeping stays small.
pub const MAX_POOL_CONNECTIONS: u32 = 10_000;

/// The longest query_timeout: PostgreSQL's statement_timeout and lock_timeout are int4
/// milliseconds (about 24.8 days).
pub const MAX_QUERY_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// The longest pool_timeout, reaper_interval, slow_query_threshold and stream_idle_timeout:
/// one day. Longer waits are a mistake, and they must stay far from `Instant`'s overflow.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// The longest cache TTL (cache_max_ttl and cache_default_ttl): 100 years.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

impl RepositoryConfig {
    /// A configuration for `database_url` (`postgres://…` URL or `host=… user=…` key/value
    /// string) with every other setting at its default.
    ///
    /// A SQLAlchemy-style scheme such as `postgresql+asyncpg://` is accepted as `postgresql://`.
    pub fn new(database_url: impl Into<String>) -> Self {
        RepositoryConfig {
            database_url: strip_driver_suffix(database_url.into()),
            schema: "public".to_owned(),
            pool_size: 20,
            max_overflow: 40,
            pool_timeout: Duration::from_secs(30),
            query_timeout: Duration::from_secs(30),
            cache_default_ttl: Duration::from_secs(3600),
            cache_max_ttl: Duration::from_secs(86_400),
            enable_metrics: true,
            reaper_interval: Some(Duration::from_secs(60)),
            slow_query_threshold: Duration::from_secs(1),
            auto_migrate: true,
            max_model_size: DEFAULT_MAX_MODEL_SIZE,
            model_chunk_size: DEFAULT_MODEL_CHUNK_SIZE,
            model_streams: DEFAULT_MODEL_STREAMS,
            stream_idle_timeout: Duration::from_secs(600),
            tls_root_certificate: None,
            vector_storage: VectorStorage::Auto,
            citus: CitusMode::Auto,
            hnsw_ef_search: DEFAULT_HNSW_EF_SEARCH,
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
            config.pool_size = parse_var("DB_POOL_SIZE", &v)?;
        }
        if let Some(v) = var("DB_MAX_OVERFLOW") {
            config.max_overflow = parse_var("DB_MAX_OVERFLOW", &v)?;
        }
        if let Some(v) = var("DB_POOL_TIMEOUT") {
            config.pool_timeout = parse_seconds("DB_POOL_TIMEOUT", &v)?;
        }
        if let Some(v) = var("QUERY_TIMEOUT") {
            config.query_timeout = parse_seconds("QUERY_TIMEOUT", &v)?;
        }
        if let Some(v) = var("CACHE_DEFAULT_TTL") {
            config.cache_default_ttl = parse_seconds("CACHE_DEFAULT_TTL", &v)?;
        }
        if let Some(v) = var("CACHE_MAX_TTL") {
            config.cache_max_ttl = parse_seconds("CACHE_MAX_TTL", &v)?;
        }
        if let Some(v) = var("ENABLE_METRICS") {
            config.enable_metrics = parse_bool("ENABLE_METRICS", &v)?;
        }
        if let Some(v) = var("MODEL_REPO_VECTOR_STORAGE") {
            config.vector_storage = v.parse().map_err(|_| {
                RepoError::invalid(format!("MODEL_REPO_VECTOR_STORAGE is malformed: {v:?}"))
            })?;
        }
        if let Some(v) = var("MODEL_REPO_CITUS") {
            config.citus = v
                .parse()
                .map_err(|_| RepoError::invalid(format!("MODEL_REPO_CITUS is malformed: {v:?}")))?;
        }
        if let Some(v) = var("MODEL_REPO_SCHEMA") {
            validate::schema_name("MODEL_REPO_SCHEMA", &v)?;
            config.schema = v;
        }
        Ok(config)
    }

    /// The PostgreSQL schema that holds the tables; created by `open` if absent. Must match
    /// `[A-Za-z_][A-Za-z0-9_]{0,62}` (checked by `open`). Defaults to `"public"`.
    pub fn schema(mut self, name: &str) -> Self {
        self.schema = name.to_owned();
        self
    }

    /// Connections kept open. Defaults to 20.
    pub fn pool_size(mut self, n: u32) -> Self {
        self.pool_size = n;
        self
    }

    /// Extra connections opened under load, on top of `pool_size`. Defaults to 40.
    pub fn max_overflow(mut self, n: u32) -> Self {
        self.max_overflow = n;
        self
    }

    /// How long a call waits for a free connection before `RepoError::Timeout`. Defaults to 30 s.
    pub fn pool_timeout(mut self, d: Duration) -> Self {
        self.pool_timeout = d;
        self
    }

    /// `statement_timeout` (and `lock_timeout`) of single statements; streaming and bulk work
    /// runs without the statement timeout. Defaults to 30 s.
    pub fn query_timeout(mut self, d: Duration) -> Self {
        self.query_timeout = d;
        self
    }

    /// The TTL used by `cache_predictions_default`. Defaults to 3600 s.
    pub fn cache_default_ttl(mut self, d: Duration) -> Self {
        self.cache_default_ttl = d;
        self
    }

    /// The longest TTL a cache entry may have. Defaults to 86400 s.
    pub fn cache_max_ttl(mut self, d: Duration) -> Self {
        self.cache_max_ttl = d;
        self
    }

    /// Whether per-operation timings are recorded. Defaults to true.
    pub fn enable_metrics(mut self, on: bool) -> Self {
        self.enable_metrics = on;
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
        self.slow_query_threshold = d;
        self
    }

    /// Whether `open` creates the schema and applies migrations; with false it runs no DDL.
    /// Defaults to true.
    pub fn auto_migrate(mut self, on: bool) -> Self {
        self.auto_migrate = on;
        self
    }

    /// The largest model accepted, in bytes; a larger one is `InvalidInput` and nothing of it
    /// is stored. Defaults to 64 GiB ([`DEFAULT_MAX_MODEL_SIZE`]).
    pub fn max_model_size(mut self, bytes: u64) -> Self {
        self.max_model_size = bytes;
        self
    }

    /// Models up to this many bytes are stored inline in `ml_models.model_data`; larger ones in
    /// chunks of this size in `ml_model_chunks`, written and read over several connections.
    /// It also bounds memory: a streaming save or load holds a few chunks per stream at a time.
    /// Stored models keep the chunk size they were saved with. Must be within
    /// [`MODEL_CHUNK_SIZE_RANGE`]. Defaults to 4 MiB ([`DEFAULT_MODEL_CHUNK_SIZE`]).
    pub fn model_chunk_size(mut self, bytes: u32) -> Self {
        self.model_chunk_size = bytes;
        self
    }

    /// How many connections one save or load of a chunked model uses at once (1..=16). The
    /// extra ones are taken only if idle in the pool, never waited for, so a busy pool gives
    /// fewer. Defaults to 2 ([`DEFAULT_MODEL_STREAMS`]).
    pub fn model_streams(mut self, n: u32) -> Self {
        self.model_streams = n;
        self
    }

    /// How long streaming and bulk work (COPY, blob streams, merges of a load, VACUUM, DDL)
    /// may wait on a server that sends nothing: past it the connection is cut and discarded
    /// and the call fails with `RepoError::Timeout`. This is the bound of such calls when the
    /// server or the network hangs; raise it if a single server-side step of your bulk work
    /// (a merge of a very large load, a VACUUM of a huge table) runs longer without output.
    /// Defaults to 600 s.
    pub fn stream_idle_timeout(mut self, d: Duration) -> Self {
        self.stream_idle_timeout = d;
        self
    }

    /// A PEM file with the root certificate(s) that sign the server's certificate; connections
    /// then use TLS and verify the server against it (needs the `tls` feature). Without it,
    /// `sslmode=require` verifies against the system's roots. Defaults to none.
    pub fn tls_root_certificate(mut self, pem_file: impl Into<std::path::PathBuf>) -> Self {
        self.tls_root_certificate = Some(pem_file.into());
        self
    }

    /// How vectors are stored: see [`VectorStorage`]. Defaults to `VectorStorage::Auto`.
    pub fn vector_storage(mut self, storage: VectorStorage) -> Self {
        self.vector_storage = storage;
        self
    }

    /// Whether and how the repository's tables are distributed on a Citus coordinator: see
    /// [`CitusMode`]. Defaults to `CitusMode::Auto`.
    pub fn citus(mut self, mode: CitusMode) -> Self {
        self.citus = mode;
        self
    }

    /// `hnsw.ef_search` of every session: how many candidates an HNSW search keeps (more is
    /// slower and closer to exact; at least k are needed for k results). Must be within
    /// 1..=1000 (pgvector's range). Defaults to [`DEFAULT_HNSW_EF_SEARCH`] (100).
    pub fn hnsw_ef_search(mut self, candidates: u32) -> Self {
        self.hnsw_ef_search = candidates;
        self
    }

    /// The configured schema name.
    pub fn schema_name(&self) -> &str {
        &self.schema
    }

    /// Checks every value against its range; called by `open` and `migrate` before any
    /// connection is made. The error names the setting and its range.
    pub(crate) fn validate(&self) -> Result<()> {
        validate::schema_name("schema", &self.schema)?;
        check_count("pool_size", self.pool_size, 1, MAX_POOL_CONNECTIONS)?;
        check_count("max_overflow", self.max_overflow, 0, MAX_POOL_CONNECTIONS)?;
        if self.pool_size + self.max_overflow > MAX_POOL_CONNECTIONS {
            return Err(RepoError::invalid(format!(
                "pool_size + max_overflow is {}; it must be within 1..={MAX_POOL_CONNECTIONS}",
                u64::from(self.pool_size) + u64::from(self.max_overflow)
            )));
        }
        let ms = Duration::from_millis(1);
        check_duration("pool_timeout", self.pool_timeout, ms, MAX_WAIT)?;
        check_duration("query_timeout", self.query_timeout, ms, MAX_QUERY_TIMEOUT)?;
        check_duration(
            "stream_idle_timeout",
            self.stream_idle_timeout,
            ms,
            MAX_WAIT,
        )?;
        let us = Duration::from_micros(1);
        check_duration("cache_max_ttl", self.cache_max_ttl, us, MAX_CACHE_TTL)?;
        check_duration(
            "cache_default_ttl",
            self.cache_default_ttl,
            us,
            self.cache_max_ttl,
        )
        .map_err(|_| {
            RepoError::invalid(format!(
                "cache_default_ttl is {:?}; it must be within 1µs..=cache_max_ttl ({:?})",
                self.cache_default_ttl, self.cache_max_ttl
            ))
        })?;
        if let Some(every) = self.reaper_interval {
            check_duration("reaper_interval", every, ms, MAX_WAIT)?;
        }
        check_duration(
            "slow_query_threshold",
            self.slow_query_threshold,
            Duration::ZERO,
            MAX_WAIT,
        )?;
        if self.max_model_size == 0 || self.max_model_size > i64::MAX as u64 {
            return Err(RepoError::invalid(format!(
                "max_model_size is {}; it must be within 1..={} bytes",
                self.max_model_size,
                i64::MAX
            )));
        }
        check_count(
            "model_chunk_size",
            self.model_chunk_size,
            *MODEL_CHUNK_SIZE_RANGE.start(),
            *MODEL_CHUNK_SIZE_RANGE.end(),
        )?;
        check_count("model_streams", self.model_streams, 1, 16)?;
        if !(1..=1000).contains(&self.hnsw_ef_search) {
            return Err(RepoError::invalid(format!(
                "hnsw_ef_search must be within 1..=1000, not {}",
                self.hnsw_ef_search
            )));
        }
        self.connector().map(|_| ())
    }

    /// How sessions connect (plaintext or TLS), checked against the build's features.
    pub(crate) fn connector(&self) -> Result<crate::db::tls::Connector> {
        crate::db::tls::Connector::for_config(self, &self.pg_config()?)
    }

    /// The parsed connection settings, with our application_name unless the URL gives one.
    pub(crate) fn pg_config(&self) -> Result<postgres::Config> {
        let mut pg = postgres::Config::from_str(&self.database_url)
            .map_err(|e| RepoError::invalid(format!("database_url cannot be parsed: {e}")))?;
        if pg.get_application_name().is_none() {
            pg.application_name(DEFAULT_APPLICATION_NAME);
        }
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(self.pool_timeout.min(Duration::from_secs(10)));
        }
        pg.keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        Ok(pg)
    }

    /// The connection target without credentials, for logs and Debug.
    pub(crate) fn redacted_target(&self) -> String {
        match postgres::Config::from_str(&self.database_url) {
            Ok(pg) => describe_target(&pg),
            Err(_) => "<unparsable database_url>".to_owned(),
        }
    }
}

/// `user@host:port/dbname`, never the password.
pub(crate) fn describe_target(pg: &postgres::Config) -> String {
    use postgres::config::Host;
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = pg.get_ports().iter().map(u16::to_string).collect();
    format!(
        "{}@{}:{}/{}",
        pg.get_user().unwrap_or("<default user>"),
        if hosts.is_empty() {
            "<default host>".to_owned()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() {
            "5432".to_owned()
        } else {
            ports.join(",")
        },
        pg.get_dbname().unwrap_or("<default db>"),
    )
}

impl fmt::Debug for RepositoryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RepositoryConfig")
            .field("database", &self.redacted_target())
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("max_overflow", &self.max_overflow)
            .field("pool_timeout", &self.pool_timeout)
            .field("query_timeout", &self.query_timeout)
            .field("cache_default_ttl", &self.cache_default_ttl)
            .field("cache_max_ttl", &self.cache_max_ttl)
            .field("enable_metrics", &self.enable_metrics)
            .field("reaper_interval", &self.reaper_interval)
            .field("slow_query_threshold", &self.slow_query_threshold)
            .field("auto_migrate", &self.auto_migrate)
            .field("max_model_size", &self.max_model_size)
            .field("model_chunk_size", &self.model_chunk_size)
            .field("model_streams", &self.model_streams)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .field("tls_root_certificate", &self.tls_root_certificate)
            .field("vector_storage", &self.vector_storage)
            .field("citus", &self.citus)
            .field("hnsw_ef_search", &self.hnsw_ef_search)
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

/// `InvalidInput` unless `min <= n <= max`.
fn check_count(name: &str, n: u32, min: u32, max: u32) -> Result<()> {
    if (min..=max).contains(&n) {
        return Ok(());
    }
    Err(RepoError::invalid(format!(
        "{name} is {n}; it must be within {min}..={max}"
    )))
}

/// `InvalidInput` unless `min <= d <= max`.
fn check_duration(name: &str, d: Duration, min: Duration, max: Duration) -> Result<()> {
    if (min..=max).contains(&d) {
        return Ok(());
    }
    Err(RepoError::invalid(format!(
        "{name} is {d:?}; it must be within {min:?}..={max:?}"
    )))
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
        assert_eq!(c.pool_size, 3);
        assert_eq!(c.max_overflow, 4);
        assert_eq!(c.pool_timeout, Duration::from_millis(1500));
        assert_eq!(c.query_timeout, Duration::from_secs(7));
        assert_eq!(c.cache_default_ttl, Duration::from_secs(10));
        assert_eq!(c.cache_max_ttl, Duration::from_secs(20));
        assert!(!c.enable_metrics);
        assert_eq!(c.schema, "s1");
        assert_eq!(c.vector_storage, VectorStorage::Bytea);
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
        assert_eq!(c.database_url, "postgresql://u:p@h/db");
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
        assert_eq!(base().max_model_size, 64 << 30);
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
