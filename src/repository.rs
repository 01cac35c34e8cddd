//! The `ModelRepository` handle: opening (migrations, pool), the call wrapper every operation
//! goes through (timing, pool checkout, retries), and the shutdown order of the last clone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::{Reaper, FLUSH_HITS};
use crate::schema::citus::{self, Layout};
use crate::db::config::{RepositoryConfig, VectorStorage};
use crate::monitor::counters::{AccessCounts, Buffer, Flush, FlushStatements};
use crate::schema::migrate::{self, MigrationReport};
use crate::db::pool::{PgConnection, Pool, PoolState};
use crate::db::retry::Retry;
use crate::schema::sweep::Leftover;
use crate::monitor::timings::{QueryMetric, Timings};
use crate::embeddings::{self, IndexCache, Storage, StorageCell};
use crate::error::{RepoError, Result};
use crate::models::FLUSH_LOADS;

/// Every kind of leftover the sweep removes (see `db::sweep`), declared by the features.
pub(crate) const LEFTOVERS: &[Leftover] =
    &[crate::embeddings::STAGED_ROWS, crate::models::STAGED_CHUNKS];

/// How long after a close starts the reaper's statement in flight, if any, is cut.
const CLOSE_REAPER_CUT: Duration = Duration::from_millis(800);

/// When a close's last flush of the buffered access counts must be done: the close returns
/// shortly after, whatever the server's state.
const CLOSE_FLUSH_DEADLINE: Duration = Duration::from_millis(2200);

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
    inner: Arc<Inner>,
}

/// What every clone shares. Dropped with the last clone. Its fields are this module's own:
/// features reach them through the methods below.
struct Inner {
    config: RepositoryConfig,
    pool: Pool,
    timings: Timings,
    /// Cache lookups and model loads counted in memory, shared with the reaper.
    counts: Arc<AccessCounts>,
    /// The background thread, unless `reaper_interval(None)`.
    reaper: Option<Reaper>,
    /// How the schema stores vectors (BYTEA or pgvector), as last seen.
    storage: StorageCell,
    /// Which entity types have HNSW indexes, as recently seen.
    index_cache: IndexCache,
    /// Where the schema's tables are (plain, or distributed by Citus), as `open` found it.
    layout: Layout,
}

impl Drop for Inner {
    /// The last clone is gone: stop and join the reaper, then write the buffered access
    /// counts; the pool (and every connection in it) is dropped after this returns. Bounded
    /// whatever the server's state: the reaper's waits give up and its statement in flight is
    /// cut within [`CLOSE_REAPER_CUT`], the flush is cut at [`CLOSE_FLUSH_DEADLINE`], and what
    /// could not be written is logged.
    fn drop(&mut self) {
        let started = Instant::now();
        self.pool.begin_close(started + CLOSE_REAPER_CUT);
        if let Some(mut reaper) = self.reaper.take() {
            reaper.stop();
        }
        if !self.counts.is_empty() {
            let deadline = started + CLOSE_FLUSH_DEADLINE;
            if let Err(e) = self.counts.flush(&self.pool, Flush::Closing(deadline)) {
                log::warn!(
                    "pg-model-repo: close of schema {} could not write the buffered access \
                     counts ({e}): {}",
                    self.config.schema,
                    self.counts.unwritten()
                );
            }
        }
        log::debug!(
            "pg-model-repo: closed schema {} in {:?}",
            self.config.schema,
            started.elapsed()
        );
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
    /// When no migration is pending, opening runs no DDL and needs no rights beyond reading
    /// the schema, whatever `auto_migrate` says; when one is pending and this role may not run
    /// it, the error is `RepoError::PermissionDenied`, saying to run
    /// [`migrate`](Self::migrate) as the owner. With `auto_migrate(false)` a schema that
    /// lacks migrations is `RepoError::NotFound`, saying what is missing.
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
        // How vectors are stored is read on first use, except where the setting insists on
        // pgvector and open may not convert.
        let storage = StorageCell::default();
        if !config.auto_migrate {
            let mut conn = pool.get()?;
            migrate::check_applied(conn.client(), &config.schema)?;
            if config.vector_storage == VectorStorage::Pgvector {
                let found = embeddings::detect_storage(conn.client())?;
                if found == Storage::Bytea {
                    return Err(RepoError::invalid(format!(
                        "vector_storage(Pgvector), but schema {} stores vectors as BYTEA and \
                         auto_migrate(false) runs no DDL: convert it with \
                         ModelRepository::migrate",
                        config.schema
                    )));
                }
                storage.set(found);
            }
        }
        log::info!(
            "pg-model-repo: opened schema {} on {}",
            config.schema,
            config.redacted_target()
        );
        let layout = citus::current(pool.get()?.client(), &config.schema)?;
        let timings = Timings::new(config.enable_metrics, config.slow_query_threshold);
        let counts = Arc::new(AccessCounts::new(FlushStatements {
            cache_hits: FLUSH_HITS,
            model_loads: FLUSH_LOADS,
        }));
        let reaper = match config.reaper_interval {
            Some(every) => Some(Reaper::start(
                pool.clone(),
                counts.clone(),
                LEFTOVERS,
                layout,
                every,
            )?),
            None => None,
        };
        Ok(ModelRepository {
            inner: Arc::new(Inner {
                config,
                pool,
                timings,
                counts,
                reaper,
                storage,
                index_cache: IndexCache::default(),
                layout,
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
        migrate::run(config).map(|_| ())
    }

    /// [`migrate`](Self::migrate), returning what it did: the files applied and, when the
    /// schema held the seed's Python tables, what taking them over did (rows kept, vectors
    /// converted from float64, vectors moved to `embeddings_quarantine` with the first keys).
    /// Nothing pending: an empty report, and no DDL was run.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// use pg_model_repo::{ModelRepository, RepositoryConfig};
    /// let config = RepositoryConfig::new("postgres://owner@localhost/ml").schema("ml");
    /// let report = ModelRepository::migrate_with_report(&config)?;
    /// if let Some(takeover) = &report.seed_takeover {
    ///     println!("{} vectors quarantined", takeover.embeddings_quarantined);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn migrate_with_report(config: &RepositoryConfig) -> Result<MigrationReport> {
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

    /// Runs a public operation: times it (validation included) in the registry under `op`,
    /// and hands it a [`Call`] that runs its statements under the same name.
    pub(crate) fn timed<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Call<'_>) -> Result<T>,
    ) -> Result<T> {
        let started = Instant::now();
        let call = Call {
            op,
            pool: &self.inner.pool,
            layout: self.inner.layout,
        };
        let result = f(&call);
        self.record_timing(op, started, result.is_ok());
        result
    }

    /// Records one finished operation in the timing registry.
    pub(crate) fn record_timing(&self, op: &'static str, started: Instant, ok: bool) {
        self.inner.timings.record(op, started.elapsed(), ok);
    }

    /// The connection pool, for work that spans several connections.
    pub(crate) fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// How the schema stores vectors, as last seen (see `embeddings::with_storage`).
    pub(crate) fn storage(&self) -> &StorageCell {
        &self.inner.storage
    }

    /// What is known of the entity types' HNSW indexes.
    pub(crate) fn index_cache(&self) -> &IndexCache {
        &self.inner.index_cache
    }

    /// Where the schema's tables are (plain, or distributed by Citus), as `open` found it.
    pub(crate) fn layout(&self) -> Layout {
        self.inner.layout
    }

    /// The repository's access counters (cache lookups, model loads).
    pub(crate) fn counts(&self) -> &AccessCounts {
        &self.inner.counts
    }

    /// Counts one load of a model version (buffered; written by the reaper or at close).
    pub(crate) fn record_model_load(&self, model_name: &str, version: &str) {
        let buffered = self.inner.counts.record_load(model_name, version);
        self.after_access(buffered);
    }

    /// Counts one cache lookup: a hit of `key`, or a miss.
    pub(crate) fn record_lookup(&self, key: &str, hit: bool) {
        if hit {
            let buffered = self.inner.counts.record_hit(key);
            self.after_access(buffered);
        } else {
            self.inner.counts.record_miss();
        }
    }

    /// Writes the buffered access counts now (the statistics calls read them back).
    pub(crate) fn flush_counts(&self) -> Result<()> {
        self.inner.counts.flush(&self.inner.pool, Flush::Call)
    }

    /// A large buffer asks for an early flush: the reaper does it, or this thread without one.
    fn after_access(&self, buffered: Buffer) {
        if buffered != Buffer::FlushSoon {
            return;
        }
        match &self.inner.reaper {
            Some(reaper) => reaper.wake(),
            None => {
                if let Err(e) = self.flush_counts() {
                    log::warn!("pg-model-repo: flushing buffered access counts failed: {e}");
                }
            }
        }
    }
}

/// One public operation in progress: its name (for retries' logs) and the pool it runs on.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    op: &'static str,
    pool: &'a Pool,
    layout: Layout,
}

impl Call<'_> {
    /// Where the schema's tables are (see [`ModelRepository::layout`]).
    pub(crate) fn layout(&self) -> Layout {
        self.layout
    }

    /// Runs `f` on a pooled connection under this operation's name, retried per `retry`.
    pub(crate) fn run<T>(
        &self,
        retry: Retry,
        f: impl FnMut(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        self.pool.run(self.op, retry, f)
    }

    /// Runs `f` in one transaction whose commit survives a lost reply: after one, the server
    /// says whether it committed (then `f`'s answer stands) or not (then it is retried);
    /// when it cannot say, the call fails with `RepoError::OutcomeUnknown`. For writes whose
    /// answer (a count, a bool) or effect would be wrong if repeated blindly.
    pub(crate) fn run_once<T>(
        &self,
        f: impl FnMut(&mut postgres::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        crate::db::commit::run_once(self.pool, self.op, Retry::Idempotent, f)
    }

    /// The pool, for work that spans several connections.
    pub(crate) fn pool(&self) -> &Pool {
        self.pool
    }
}
