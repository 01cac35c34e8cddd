//! The `ModelRepository` handle: opening (migrations, pool), the call wrapper every operation
//! goes through (timing, pool checkout, retries), and the shutdown order of the last clone.

use std::sync::Arc;
use std::time::Instant;

use crate::cache::{flush_hits, HitCounters};
use crate::config::RepositoryConfig;
use crate::counters::{AccessBuffer, Buffer};
use crate::error::Result;
use crate::migrate;
use crate::pool::{PgConnection, Pool, PoolState};
use crate::reaper::Reaper;
use crate::retry::{self, Policy, Retry};
use crate::timings::{QueryMetric, Timings};

/// A repository of models, embeddings, training metrics and cached predictions in one
/// PostgreSQL schema.
///
/// Cheap to clone: clones share one connection pool, one background reaper and one metrics
/// registry. `Send + Sync`; call it from as many threads as the pool has connections.
/// It is synchronous: do not call it from inside an async runtime's worker (the `postgres`
/// client runs its own runtime and panics there); use `spawn_blocking`.
///
/// ```no_run
/// # fn main() -> pg_model_repo::Result<()> {
/// use pg_model_repo::ModelRepository;
///
/// let repo = ModelRepository::connect("postgres://app@localhost/ml")?;
/// let info = repo.save_model("ranker", "1.0", b"weights", &serde_json::json!({"auc": 0.91}))?;
/// assert_eq!(repo.load_model("ranker", "latest")?.as_deref(), Some(&b"weights"[..]));
/// repo.close();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ModelRepository {
    pub(crate) inner: Arc<Inner>,
}

/// What every clone shares. Dropped with the last clone.
pub(crate) struct Inner {
    pub(crate) config: RepositoryConfig,
    pub(crate) pool: Pool,
    pub(crate) timings: Timings,
    /// Cache hits and misses counted in memory, shared with the reaper.
    pub(crate) hits: Arc<HitCounters>,
    /// Model loads counted in memory (key: JSON `[model_name, version]`), shared with the reaper.
    pub(crate) loads: Arc<AccessBuffer>,
    /// The background thread, unless `reaper_interval(None)`.
    pub(crate) reaper: Option<Reaper>,
}

impl Drop for Inner {
    /// The last clone is gone: stop and join the reaper, then write the buffered hit counts;
    /// the pool (and every connection in it) is dropped after this returns.
    fn drop(&mut self) {
        if let Some(mut reaper) = self.reaper.take() {
            reaper.stop();
        }
        if let Err(e) = flush_access_counts(&self.pool, &self.hits, &self.loads) {
            log::warn!("pg-model-repo: flushing buffered access counts at close failed: {e}");
        }
        log::debug!("pg-model-repo: closed schema {}", self.config.schema);
    }
}

impl std::fmt::Debug for ModelRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRepository")
            .field("config", &self.inner.config)
            .field("pool", &self.inner.pool.state())
            .finish_non_exhaustive()
    }
}

impl ModelRepository {
    /// Opens a repository: checks the configuration, creates the schema and applies the
    /// migrations (unless `auto_migrate(false)`), and builds the connection pool.
    ///
    /// Several processes may open one new schema at the same moment: migrations queue on an
    /// advisory lock.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// use pg_model_repo::{ModelRepository, RepositoryConfig};
    /// let repo = ModelRepository::open(RepositoryConfig::new("postgres://app@localhost/ml").schema("ml"))?;
    /// # Ok(()) }
    /// ```
    pub fn open(config: RepositoryConfig) -> Result<Self> {
        config.validate()?;
        if config.auto_migrate {
            migrate::run(&config)?;
        }
        let pool = Pool::new(&config)?;
        {
            let mut conn = pool.get()?;
            if !config.auto_migrate {
                migrate::check_applied(conn.client())?;
            }
        }
        log::info!(
            "pg-model-repo: opened schema {} on {}",
            config.schema,
            config.redacted_target()
        );
        let timings = Timings::new(config.enable_metrics, config.slow_query_threshold);
        let hits = Arc::new(HitCounters::default());
        let loads = Arc::new(AccessBuffer::default());
        let reaper = match config.reaper_interval {
            Some(every) => Some(Reaper::start(
                pool.clone(),
                hits.clone(),
                loads.clone(),
                every,
            )?),
            None => None,
        };
        Ok(ModelRepository {
            inner: Arc::new(Inner {
                config,
                pool,
                timings,
                hits,
                loads,
                reaper,
            }),
        })
    }

    /// `open(RepositoryConfig::new(database_url))`.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// let repo = pg_model_repo::ModelRepository::connect("host=localhost user=app dbname=ml")?;
    /// # Ok(()) }
    /// ```
    pub fn connect(database_url: &str) -> Result<Self> {
        Self::open(RepositoryConfig::new(database_url))
    }

    /// Creates the schema and applies pending migrations, then returns. Run it as the schema's
    /// owner; application roles then open with `auto_migrate(false)`.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// use pg_model_repo::{ModelRepository, RepositoryConfig};
    /// ModelRepository::migrate(&RepositoryConfig::new("postgres://owner@localhost/ml").schema("ml"))?;
    /// # Ok(()) }
    /// ```
    pub fn migrate(config: &RepositoryConfig) -> Result<()> {
        migrate::run(config)
    }

    /// Closes this handle. On the last clone it flushes buffered counters, stops and joins the
    /// background reaper and closes every pooled connection before it returns; on a clone
    /// while others live it only drops this handle. Dropping the last clone does the same.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// repo.close();
    /// # Ok(()) }
    /// ```
    pub fn close(self) {
        drop(self);
    }

    /// The configuration this repository was opened with.
    pub fn config(&self) -> &RepositoryConfig {
        &self.inner.config
    }

    /// Connections open and idle in the pool right now.
    pub fn pool_state(&self) -> PoolState {
        self.inner.pool.state()
    }

    /// Per-operation timings since `open`, sorted by operation name (empty when metrics are
    /// disabled).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// for m in repo.get_performance_metrics() {
    ///     println!("{}: {} calls, p99 {:?}", m.query_type, m.count, m.p99);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn get_performance_metrics(&self) -> Vec<QueryMetric> {
        self.inner.timings.snapshot()
    }

    /// Times a public operation (validation included) in the registry.
    pub(crate) fn timed<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = Instant::now();
        let result = f();
        self.inner
            .timings
            .record(op, started.elapsed(), result.is_ok());
        result
    }

    /// Runs `f` on a pooled connection, repeating it on transient failures when `retry`
    /// allows. A connection that failed is poisoned and never reused.
    pub(crate) fn with_conn<T>(
        &self,
        op: &'static str,
        retry: Retry,
        f: impl FnMut(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        with_pool_conn(&self.inner.pool, op, retry, f)
    }
}

impl ModelRepository {
    /// Counts one load of a model version (buffered; written by the reaper or at close).
    pub(crate) fn record_model_load(&self, model_name: &str, version: &str) {
        let key = serde_json::json!([model_name, version]).to_string();
        if self.inner.loads.record(&key) == Buffer::FlushSoon {
            self.flush_counters_soon();
        }
    }

    /// Asks the reaper to flush the access buffers; without a reaper, flushes here.
    pub(crate) fn flush_counters_soon(&self) {
        match &self.inner.reaper {
            Some(reaper) => reaper.wake(),
            None => {
                let inner = &self.inner;
                if let Err(e) = flush_access_counts(&inner.pool, &inner.hits, &inner.loads) {
                    log::warn!("pg-model-repo: flushing buffered access counts failed: {e}");
                }
            }
        }
    }
}

/// Adds buffered loads to `load_count` and moves `last_loaded_at` (database clock).
const FLUSH_LOADS: &str = "UPDATE ml_models AS m
     SET load_count = m.load_count + u.n,
         last_loaded_at = GREATEST(m.last_loaded_at, now() - u.age_us * interval '1 microsecond')
     FROM unnest($1::text[], $2::int8[], $3::int8[]) AS u(k, n, age_us)
     WHERE m.model_name = (u.k::jsonb)->>0 AND m.version = (u.k::jsonb)->>1";

/// Writes both access buffers (cache hits, model loads); both are attempted, the first error
/// is returned.
pub(crate) fn flush_access_counts(
    pool: &Pool,
    hits: &HitCounters,
    loads: &AccessBuffer,
) -> Result<()> {
    let cache = flush_hits(pool, hits);
    let models = crate::counters::flush(pool, loads, "flush_model_loads", FLUSH_LOADS);
    cache.and(models)
}

/// [`ModelRepository::with_conn`] for code that holds a pool but not the repository (the
/// reaper thread).
pub(crate) fn with_pool_conn<T>(
    pool: &Pool,
    op: &'static str,
    retry: Retry,
    mut f: impl FnMut(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    retry::run(op, retry, Policy::default(), || {
        let mut conn = pool.get()?;
        let result = f(&mut conn);
        if let Err(e) = &result {
            pool.note_failure(&mut conn, e);
        }
        result
    })
}
