//! The `ModelRepository` handle: opening (migrations, pool, what each feature registers), the
//! timing of every public call, and the shutdown order of the last clone. It knows the features
//! only through their registration functions and what they register.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::RepositoryConfig;
use crate::db::background::{Chore, Reaper};
use crate::db::call::Call;
use crate::db::deadline::{CallDeadline, CALL_GRACE};
use crate::db::layout::Layout;
use crate::db::pool::{Pool, PoolState, PoolStatus};
use crate::error::Result;
use crate::metrics::{self, ErrorType, Metrics};
use crate::monitor::counters::{AccessCounts, Buffer, Flush, FlushStatements};
use crate::monitor::timings::{QueryMetric, Timings};
use crate::schema::citus;
use crate::schema::migrate::{self, MigrationReport, MigrationStatus, Target};
use crate::schema::sweep::{Leftover, Sweep};

/// How long after a close starts the reaper's statement in flight, if any, is cut.
const CLOSE_REAPER_CUT: Duration = Duration::from_millis(800);

/// When a close's last flush of the buffered access counts must be done: the close returns
/// shortly after, whatever the server's state.
const CLOSE_FLUSH_DEADLINE: Duration = Duration::from_millis(2200);

/// Every feature's registration, called in this order by `open`.
const FEATURES: &[fn(&mut Registration<'_>) -> Result<()>] = &[
    crate::cache::register,
    crate::models::register,
    crate::embeddings::register,
];

/// What a feature asks of the repository when it opens: statements that write its buffered
/// access counts, leftovers of its dead work for the sweep, chores for the background thread,
/// and state kept per repository.
pub(crate) struct Registration<'a> {
    /// The repository's settings.
    pub(crate) config: &'a RepositoryConfig,
    /// The repository's pool, for checks at open.
    pub(crate) pool: &'a Pool,
    /// Where the schema's tables are.
    pub(crate) layout: Layout,
    flushes: FlushStatements,
    leftovers: Vec<Leftover>,
    chores: Vec<Arc<dyn Chore>>,
    state: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    on_close: Vec<Box<dyn Fn() + Send + Sync>>,
}

impl Registration<'_> {
    /// Work for the close of the last clone, run first (before the background thread stops):
    /// stop the threads the feature started. It must return within about a second.
    pub(crate) fn on_close(&mut self, stop: impl Fn() + Send + Sync + 'static) {
        self.on_close.push(Box::new(stop));
    }

    /// The statement that adds buffered cache hits to their rows.
    pub(crate) fn flush_cache_hits(&mut self, sql: &'static str) {
        self.flushes.cache_hits = sql;
    }

    /// The statement that adds buffered model loads to their rows.
    pub(crate) fn flush_model_loads(&mut self, sql: &'static str) {
        self.flushes.model_loads = sql;
    }

    /// A kind of leftover the sweep removes (background tick, `optimize_database`).
    pub(crate) fn leftover(&mut self, leftover: Leftover) {
        self.leftovers.push(leftover);
    }

    /// Work for every background tick.
    pub(crate) fn chore(&mut self, chore: impl Chore + 'static) {
        self.chores.push(Arc::new(chore));
    }

    /// State the feature reads back with [`ModelRepository::state`].
    pub(crate) fn state<T: Any + Send + Sync>(&mut self, value: T) {
        self.state.insert(TypeId::of::<T>(), Box::new(value));
    }
}

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
    /// Where the schema's tables are (plain, or distributed by Citus), as `open` found it.
    layout: Layout,
    /// Every kind of leftover the features registered.
    leftovers: Vec<Leftover>,
    /// The features' per-repository state, by type.
    state: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    /// What the features stop when the last clone closes.
    on_close: Vec<Box<dyn Fn() + Send + Sync>>,
}

impl Drop for Inner {
    /// The last clone is gone: stop the features' threads (change event listeners), stop and
    /// join the reaper, then write the buffered access counts; the pool (and every connection
    /// in it) is dropped after this returns. Bounded whatever the server's state: the
    /// listeners end within a second, the reaper's waits give up and its statement in flight
    /// is cut within [`CLOSE_REAPER_CUT`], the flush is cut at [`CLOSE_FLUSH_DEADLINE`], and
    /// what could not be written is logged.
    fn drop(&mut self) {
        let started = Instant::now();
        for stop in &self.on_close {
            stop();
        }
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
                    self.config.schema_name(),
                    self.counts.unwritten()
                );
            }
        }
        log::debug!(
            "pg-model-repo: closed schema {} in {:?}",
            self.config.schema_name(),
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
        if config.migrations.auto_migrate {
            migrate::apply_migrations(&migration_target(&config))?;
        }
        let pool = Pool::new(&config.sessions())?;
        let layout = {
            let mut conn = pool.get()?;
            if !config.migrations.auto_migrate {
                migrate::check_applied(conn.client(), config.schema_name())?;
            }
            citus::current(conn.client(), config.schema_name())?
        };
        let mut registration = Registration {
            config: &config,
            pool: &pool,
            layout,
            flushes: FlushStatements::default(),
            leftovers: Vec::new(),
            chores: Vec::new(),
            state: HashMap::new(),
            on_close: Vec::new(),
        };
        for register in FEATURES {
            register(&mut registration)?;
        }
        let Registration {
            flushes,
            leftovers,
            chores,
            state,
            on_close,
            ..
        } = registration;
        log::info!(
            "pg-model-repo: opened schema {} on {}",
            config.schema_name(),
            config.redacted_target()
        );
        metrics::describe();
        let timings = Timings::new(
            config.monitor.enable_metrics,
            config.monitor.slow_query_threshold,
        );
        let counts = Arc::new(AccessCounts::new(flushes));
        let reaper = match config.reaper_interval {
            Some(every) => {
                // Hit counts first (so they land before their rows may expire), then the
                // features' chores, then the sweep.
                let mut all: Vec<Arc<dyn Chore>> = vec![counts.clone()];
                all.extend(chores);
                all.push(Arc::new(Sweep::new(leftovers.clone())));
                Some(Reaper::start(pool.clone(), all, counts.clone(), every)?)
            }
            None => None,
        };
        Ok(ModelRepository {
            inner: Arc::new(Inner {
                config,
                pool,
                timings,
                counts,
                reaper,
                layout,
                leftovers,
                state,
                on_close,
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
        Self::migrate_with_report(config).map(|_| ())
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
        config.validate()?;
        migrate::apply_migrations(&migration_target(config))
    }

    /// Lists the migrations of `config`'s schema, applied (with when) and pending, without
    /// DDL or locks and without opening a pool: a dry run of
    /// [`migrate`](Self::migrate). A schema that does not exist yet has every file pending.
    /// An applied file that was edited since is `Conflict`, as `migrate` would say.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// use pg_model_repo::{ModelRepository, RepositoryConfig};
    /// let config = RepositoryConfig::new("postgres://owner@localhost/ml").schema("ml");
    /// let status = ModelRepository::migration_status(&config)?;
    /// for applied in &status.applied {
    ///     println!("applied {} at {:?}", applied.name, applied.applied_at);
    /// }
    /// println!("pending: {:?}", status.pending);
    /// # Ok(()) }
    /// ```
    pub fn migration_status(config: &RepositoryConfig) -> Result<MigrationStatus> {
        config.validate()?;
        migrate::status(&migration_target(config))
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

    /// The pool's state now: its maximum size, open connections, idle ones (parked ones
    /// included), those in use (a stream holds one until it returns), threads waiting for one,
    /// and checkouts that ran past pool_timeout since the repository opened. With the
    /// `metrics` feature the same figures go out as `db.client.connection.*` (docs/metrics.md).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let pool = repo.pool_status();
    /// println!("{}/{} in use, {} waiting, {} timeouts", pool.in_use, pool.max_size, pool.waiting, pool.timeouts);
    /// # Ok(()) }
    /// ```
    pub fn pool_status(&self) -> PoolStatus {
        self.inner.pool.status()
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

    /// Runs a public operation that is not a stream or a bulk load: times it (validation
    /// included) in the registry under `op`, hands it a [`Call`] that runs its statements
    /// under the same name, and bounds it by one deadline taken now, pool_timeout +
    /// query_timeout + 2 s (see `db::deadline::CallDeadline`).
    pub(crate) fn timed<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Call<'_>) -> Result<T>,
    ) -> Result<T> {
        let started = Instant::now();
        let c = &self.inner.config.connection;
        let deadline = started + c.pool_timeout + c.query_timeout + CALL_GRACE;
        self.run_timed(op, started, Some(deadline), f)
    }

    /// [`timed`](Self::timed) for a stream or a bulk load: no deadline for the whole call;
    /// every wait on the server is bounded by stream_idle_timeout between its messages (and a
    /// checkout by pool_timeout).
    pub(crate) fn timed_bulk<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Call<'_>) -> Result<T>,
    ) -> Result<T> {
        self.run_timed(op, Instant::now(), None, f)
    }

    fn run_timed<T>(
        &self,
        op: &'static str,
        started: Instant,
        deadline: Option<Instant>,
        f: impl FnOnce(&Call<'_>) -> Result<T>,
    ) -> Result<T> {
        let _deadline = CallDeadline::start(deadline);
        let call = Call::new(op, &self.inner.pool, self.inner.layout);
        let result = f(&call);
        self.record_timing(op, started, result.as_ref().err().map(ErrorType::from));
        result
    }

    /// Records one finished operation, failed with `error` or not: the one place every
    /// operation's time goes, to the timing registry and (feature `metrics`) the facade.
    pub(crate) fn record_timing(
        &self,
        op: &'static str,
        started: Instant,
        error: Option<ErrorType<'_>>,
    ) {
        let elapsed = started.elapsed();
        self.inner.timings.record(op, elapsed, error.is_none());
        self.metrics().operation(op, elapsed, error);
    }

    /// The facade's labels for this repository (empty without the `metrics` feature).
    pub(crate) fn metrics(&self) -> &Metrics {
        self.inner.pool.metrics()
    }

    /// The connection pool, for work that spans several connections.
    pub(crate) fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Where the schema's tables are (plain, or distributed by Citus), as `open` found it.
    pub(crate) fn layout(&self) -> Layout {
        self.inner.layout
    }

    /// Every kind of leftover the features registered (see `schema::sweep`).
    pub(crate) fn leftovers(&self) -> &[Leftover] {
        &self.inner.leftovers
    }

    /// The state a feature registered at open.
    pub(crate) fn state<T: Any>(&self) -> &T {
        self.inner
            .state
            .get(&TypeId::of::<T>())
            .and_then(|value| value.downcast_ref())
            .expect("every feature registers its state when the repository opens")
    }

    /// The repository's access counters (cache lookups, model loads).
    pub(crate) fn counts(&self) -> &AccessCounts {
        &self.inner.counts
    }

    /// Counts one load of a model version (buffered; written by the reaper or at close) and
    /// its `bytes`.
    pub(crate) fn record_model_load(&self, model_name: &str, version: &str, bytes: u64) {
        self.metrics().model_bytes_loaded(bytes);
        let buffered = self.inner.counts.record_load(model_name, version);
        self.after_access(buffered);
    }

    /// Counts one cache lookup: a hit of `key`, or a miss.
    pub(crate) fn record_lookup(&self, key: &str, hit: bool) {
        self.metrics().cache_lookup(hit);
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

/// What the migrations of `config` work on.
fn migration_target(config: &RepositoryConfig) -> Target<'_> {
    Target {
        connection: &config.connection,
        settings: &config.migrations,
    }
}
