//! The connection pool: r2d2 over our own connection manager, which sets each session up
//! (search_path, timeouts, application_name), caches prepared statements, and never hands a
//! broken connection out again. Every connection is watched (`db::deadline`) while it is
//! checked out or logging in, so a hung server costs a caller its bound, never a hang.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use postgres::{Client, Statement, Transaction};

use crate::db::config::{describe_target, RepositoryConfig};
use crate::db::deadline::{Bounds, Watch, WatchGroup};
use crate::db::error::{is_connection_failure, RepoError, Result};
use crate::db::retry::{self, Policy, Retry};
use crate::db::tls::Connector;

/// How long a stale connection may take to prove it is alive before it is discarded (less
/// when the checkout's own time runs out first).
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(2);

/// A waiting checkout looks at the pool's closing flag this often.
const CHECKOUT_SLICE: Duration = Duration::from_millis(100);

/// One pooled session.
pub(crate) struct PgConnection {
    client: Client,
    poisoned: bool,
    /// The failure epoch this connection was last known good in (see [`PoolShared`]).
    epoch: u64,
    /// The session epoch its settings and statements date from (see [`Pool::reset_sessions`]).
    session_epoch: u64,
    statements: HashMap<&'static str, Statement>,
    dynamic_statements: HashMap<String, Statement>,
    /// What the hung-server watchdog knows of this session.
    watch: Watch,
    bounds: Bounds,
}

impl Drop for PgConnection {
    /// Closing a session sends a farewell; it must not block on a hung server.
    fn drop(&mut self) {
        self.watch.closing(self.is_broken());
    }
}

/// The most run-time-built statements one session keeps prepared.
const DYNAMIC_STATEMENTS: usize = 128;

impl PgConnection {
    /// Opens one watched session with our settings: its login is bounded by `bounds.login`.
    fn open(
        connector: &Connector,
        pg: &postgres::Config,
        session_setup: &str,
        bounds: Bounds,
        group: Option<&WatchGroup>,
    ) -> Result<Self> {
        let watch = Watch::new();
        if let Some(group) = group {
            group.add(&watch);
        }
        watch.arm(bounds.login);
        let client = connector.connect(pg, &watch)?;
        let mut conn = PgConnection {
            client,
            poisoned: false,
            epoch: 0,
            session_epoch: 0,
            statements: HashMap::new(),
            dynamic_statements: HashMap::new(),
            watch,
            bounds,
        };
        conn.client.batch_execute(session_setup)?;
        conn.watch.disarm();
        Ok(conn)
    }

    /// The underlying client, for statements that need no cache.
    pub(crate) fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The client, for streaming and bulk work that may keep the server silent for longer
    /// than a statement (COPY, blob streams, merges, VACUUM, DDL): until this connection goes
    /// back to the pool, the watchdog waits `stream_idle_timeout` on it instead of
    /// query_timeout plus the grace. Lift statement_timeout with [`unbounded`] (or use
    /// [`begin_unbounded`], which does both).
    pub(crate) fn unbounded_client(&mut self) -> &mut Client {
        self.watch.set_bound(self.bounds.stream);
        &mut self.client
    }

    /// This session's watch: to bound it by a deadline of the caller's.
    pub(crate) fn watch(&self) -> &Watch {
        &self.watch
    }

    /// A prepared statement for `sql`, prepared once per connection.
    pub(crate) fn prepare_cached(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    /// A prepared statement for SQL built at run time (a type's search, say), prepared once per
    /// connection; at most [`DYNAMIC_STATEMENTS`] are kept.
    pub(crate) fn prepare_cached_dynamic(&mut self, sql: &str) -> Result<Statement> {
        if let Some(statement) = self.dynamic_statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        if self.dynamic_statements.len() >= DYNAMIC_STATEMENTS {
            self.dynamic_statements.clear();
        }
        self.dynamic_statements
            .insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// Marks the session unusable: the pool drops it instead of reusing it.
    pub(crate) fn poison(&mut self) {
        self.poisoned = true;
    }

    /// True once the session was poisoned, its socket is known to be closed, or the
    /// watchdog cut it.
    pub(crate) fn is_broken(&self) -> bool {
        self.poisoned || self.client.is_closed() || self.watch.fired()
    }
}

/// Holds a connection while caller code runs mid-query (a streaming callback, a writer): if
/// that code panics, the connection is poisoned on the way out, so the pool never hands out a
/// session left in the middle of a COPY or a transaction.
pub(crate) struct PoisonOnPanic<'a>(pub(crate) &'a mut PgConnection);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poison();
        }
    }
}

impl std::ops::Deref for PoisonOnPanic<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.0
    }
}

impl std::ops::DerefMut for PoisonOnPanic<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.0
    }
}

impl std::fmt::Debug for PgConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnection")
            .field("poisoned", &self.poisoned)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// State shared by the manager and the pool handle.
///
/// The failure epoch: `postgres::Client::is_closed` stays false after the server killed the
/// backend, until a query fails, and validating every checkout costs a round trip. So a
/// connection failure bumps the epoch, and only connections last known good in an older epoch
/// are validated on checkout; after a mass kill every stale connection is weeded out once,
/// while healthy traffic pays nothing.
#[derive(Debug, Default)]
pub(crate) struct PoolShared {
    epoch: AtomicU64,
    /// Bumped when every session must run its setup again and forget its statements.
    session_epoch: AtomicU64,
    /// Callers waiting for a connection right now.
    waiting: AtomicU64,
    /// Set by [`Pool::begin_close`]: waiting checkouts give up.
    closing: AtomicBool,
    /// Every connection of the pool, so closing can cut those still checked out.
    watches: WatchGroup,
}

thread_local! {
    /// When the checkout running on this thread must be done: r2d2 validates stale
    /// connections inside its checkout, and that validation must not outlast it.
    static CHECKOUT_DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Our r2d2 connection manager.
pub(crate) struct Manager {
    pg: postgres::Config,
    connector: Connector,
    session_setup: String,
    bounds: Bounds,
    shared: Arc<PoolShared>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("target", &describe_target(&self.pg))
            .finish_non_exhaustive()
    }
}

impl Manager {
    fn new(config: &RepositoryConfig, shared: Arc<PoolShared>) -> Result<Self> {
        let pg = config.pg_config()?;
        Ok(Manager {
            bounds: Bounds::for_config(config, &pg),
            pg,
            connector: config.connector()?,
            session_setup: session_setup_sql(config),
            shared,
        })
    }
}

/// The statements every new session runs: our schema first on the search path, then the
/// schema of the pgvector extension where the database has it (its `vector` type and
/// operators resolve there, wherever it was installed); the query timeout as both
/// statement_timeout and lock_timeout; and HNSW's ef_search (a placeholder setting until
/// pgvector is loaded, harmless where it never is).
pub(crate) fn session_setup_sql(config: &RepositoryConfig) -> String {
    let timeout_ms = config.query_timeout.as_millis().max(1);
    // The schema name is a checked identifier ([A-Za-z_][A-Za-z0-9_]*): safe in a literal.
    format!(
        "SET search_path TO {schema}; \
         SELECT set_config('search_path', concat_ws(', ', quote_ident('{name}'), \
             (SELECT quote_ident(n.nspname) FROM pg_extension e \
              JOIN pg_namespace n ON n.oid = e.extnamespace \
              WHERE e.extname = 'vector' AND n.nspname <> '{name}')), false); \
         SET statement_timeout = {timeout_ms}; SET lock_timeout = {timeout_ms}; \
         SET hnsw.ef_search = {ef_search}",
        schema = quote_ident(&config.schema),
        name = config.schema,
        ef_search = config.hnsw_ef_search,
    )
}

/// Opens one watched session with our settings, outside any pool (migrations, tests,
/// tools); it is armed with its stream bound until dropped.
pub(crate) fn connect(config: &RepositoryConfig) -> Result<PgConnection> {
    let pg = config.pg_config()?;
    let bounds = Bounds::for_config(config, &pg);
    let conn = PgConnection::open(
        &config.connector()?,
        &pg,
        &session_setup_sql(config),
        bounds,
        None,
    )?;
    conn.watch.arm(bounds.stream);
    Ok(conn)
}

impl r2d2::ManageConnection for Manager {
    type Connection = PgConnection;
    type Error = RepoError;

    fn connect(&self) -> Result<PgConnection> {
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let session_epoch = self.shared.session_epoch.load(Ordering::Acquire);
        let mut conn = PgConnection::open(
            &self.connector,
            &self.pg,
            &self.session_setup,
            self.bounds,
            Some(&self.shared.watches),
        )?;
        conn.epoch = epoch;
        conn.session_epoch = session_epoch;
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut PgConnection) -> Result<()> {
        let session_epoch = self.shared.session_epoch.load(Ordering::Acquire);
        if conn.session_epoch < session_epoch {
            conn.statements.clear();
            conn.dynamic_statements.clear();
            conn.client.batch_execute(&self.session_setup)?;
            conn.session_epoch = session_epoch;
        }
        let current = self.shared.epoch.load(Ordering::Acquire);
        if conn.epoch >= current {
            return Ok(());
        }
        let left = CHECKOUT_DEADLINE.get().map_or(VALIDATION_TIMEOUT, |d| {
            d.saturating_duration_since(Instant::now())
        });
        conn.client
            .is_valid(VALIDATION_TIMEOUT.min(left).max(Duration::from_millis(1)))?;
        conn.epoch = current;
        Ok(())
    }

    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        conn.is_broken()
    }
}

/// Logs r2d2's connection failures at warn (they carry no password: the client's error text
/// names the server and the user at most).
#[derive(Debug)]
struct LogErrors;

impl r2d2::HandleError<RepoError> for LogErrors {
    fn handle_error(&self, error: RepoError) {
        log::warn!("pg-model-repo: connection attempt failed: {error}");
    }
}

/// One scheduler thread pool for every repository's pool maintenance, instead of three new
/// threads per repository.
fn maintenance_threads() -> Arc<scheduled_thread_pool::ScheduledThreadPool> {
    static THREADS: OnceLock<Arc<scheduled_thread_pool::ScheduledThreadPool>> = OnceLock::new();
    THREADS
        .get_or_init(|| {
            Arc::new(
                scheduled_thread_pool::ScheduledThreadPool::builder()
                    .num_threads(2)
                    .thread_name_pattern("pg-model-repo-pool-{}")
                    .build(),
            )
        })
        .clone()
}

/// A checked-out session, watched while it is out; returns to the pool on drop unless
/// broken.
pub(crate) struct Conn(r2d2::PooledConnection<Manager>);

impl Drop for Conn {
    fn drop(&mut self) {
        self.0.watch.disarm();
    }
}

impl std::ops::Deref for Conn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.0
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.0
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Conn {
    fn out(conn: r2d2::PooledConnection<Manager>) -> Self {
        conn.watch.arm(conn.bounds.statement);
        Conn(conn)
    }
}

/// The repository's pool handle: cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Pool {
    inner: r2d2::Pool<Manager>,
    shared: Arc<PoolShared>,
}

/// A snapshot of the pool's occupancy.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PoolState {
    /// Open connections, idle or in use.
    pub connections: u32,
    /// Open connections waiting in the pool.
    pub idle: u32,
    /// The most connections the pool opens (pool_size + max_overflow).
    pub max_size: u32,
    /// Callers waiting for a connection.
    pub waiting: u64,
}

impl Pool {
    /// Builds the pool without waiting for its connections (they open in the background and on
    /// demand).
    pub(crate) fn new(config: &RepositoryConfig) -> Result<Self> {
        let shared = Arc::new(PoolShared::default());
        let manager = Manager::new(config, shared.clone())?;
        let max_size = config.pool_size.saturating_add(config.max_overflow).max(1);
        let inner = r2d2::Pool::builder()
            .max_size(max_size)
            .min_idle(Some(config.pool_size.min(max_size)))
            .connection_timeout(config.pool_timeout)
            .test_on_check_out(true)
            .max_lifetime(Some(Duration::from_secs(30 * 60)))
            .idle_timeout(Some(Duration::from_secs(10 * 60)))
            .error_handler(Box::new(LogErrors))
            .thread_pool(maintenance_threads())
            .build_unchecked(manager);
        Ok(Pool { inner, shared })
    }

    /// A connection within pool_timeout, else `RepoError::Timeout`.
    pub(crate) fn get(&self) -> Result<Conn> {
        self.get_within(self.inner.connection_timeout())
    }

    /// A connection within `timeout`, else `RepoError::Timeout`; none at all once the pool
    /// is closing.
    pub(crate) fn get_within(&self, timeout: Duration) -> Result<Conn> {
        self.checkout(Instant::now() + timeout, true)
    }

    /// A connection before `deadline` (even while the pool is closing), cut by the watchdog
    /// if the work on it is not done by then.
    pub(crate) fn get_until(&self, deadline: Instant) -> Result<Conn> {
        let conn = self.checkout(deadline, false)?;
        conn.watch.cut_at(deadline);
        Ok(conn)
    }

    fn checkout(&self, deadline: Instant, interruptible: bool) -> Result<Conn> {
        let started = Instant::now();
        self.shared.waiting.fetch_add(1, Ordering::AcqRel);
        let previous = CHECKOUT_DEADLINE.replace(Some(deadline));
        // r2d2 reports the last connection error once; keep it across slices.
        let mut cause: Option<r2d2::Error> = None;
        let result = loop {
            if interruptible && self.shared.closing.load(Ordering::Acquire) {
                break Err(RepoError::pool_timeout("the repository is closing"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = if interruptible {
                left.min(CHECKOUT_SLICE)
            } else {
                left
            };
            let error = match self.inner.get_timeout(slice) {
                Ok(conn) => break Ok(conn),
                Err(e) => e,
            };
            if error.to_string().contains(": ") || cause.is_none() {
                cause = Some(error);
            }
            let waited = started.elapsed();
            if left <= slice {
                let cause = cause.map(|e| format!(": {e}")).unwrap_or_default();
                break Err(RepoError::pool_timeout(format!("waited {waited:?}{cause}")));
            }
        };
        CHECKOUT_DEADLINE.set(previous);
        self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
        result.map(Conn::out)
    }

    /// An idle connection right now, or `None` without waiting: for extra connections taken
    /// while one is already held (waiting there could deadlock a small pool).
    pub(crate) fn try_get(&self) -> Option<Conn> {
        self.inner.try_get().map(Conn::out)
    }

    /// The repository is closing: ordinary checkouts fail (waiting ones within a slice), and
    /// connections still checked out (the reaper's) are cut at `cut_at` if their work is not
    /// done by then.
    pub(crate) fn begin_close(&self, cut_at: Instant) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.watches.cut_armed_at(cut_at);
    }

    /// Records what a failed call means for its connection: a connection failure poisons the
    /// session and starts a new failure epoch, so its idle siblings are checked before reuse.
    pub(crate) fn note_failure(&self, conn: &mut PgConnection, error: &RepoError) {
        if conn.watch.fired() {
            // The watchdog cut it: the server hangs, which says nothing new about the
            // sockets of its idle siblings, and validating them would only wait on it too.
            conn.poison();
            return;
        }
        let broken = match error {
            RepoError::Database(e) => is_connection_failure(e),
            _ => false,
        };
        // A statement prepared before a column changed type (pgvector's conversion) fails
        // with "cached plan must not change result type" on every use: drop the session and
        // its statement cache.
        let stale_statement = error.code().map(|c| c.code()) == Some("0A000");
        if stale_statement {
            conn.poison();
        }
        if broken || conn.is_broken() {
            conn.poison();
            self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Runs `f` on a pooled connection, repeating it on transient failures when `retry`
    /// allows. A connection that failed is poisoned and never reused.
    pub(crate) fn run<T>(
        &self,
        op: &str,
        retry: Retry,
        mut f: impl FnMut(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        retry::run(op, retry, Policy::default(), || {
            let mut conn = self.get()?;
            let result = f(&mut conn);
            if let Err(e) = &result {
                self.note_failure(&mut conn, e);
            }
            result
        })
    }

    /// Makes every session run its setup again (the search_path finds a schema created since,
    /// such as pgvector's) and forget its prepared statements, each at its next checkout.
    pub(crate) fn reset_sessions(&self) {
        self.shared.session_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The configured checkout timeout (pool_timeout).
    pub(crate) fn timeout(&self) -> Duration {
        self.inner.connection_timeout()
    }

    /// Connections open and idle right now.
    pub(crate) fn state(&self) -> PoolState {
        let s = self.inner.state();
        PoolState {
            connections: s.connections,
            idle: s.idle_connections,
            max_size: self.inner.max_size(),
            waiting: self.shared.waiting.load(Ordering::Acquire),
        }
    }
}

/// Lifts statement_timeout for the rest of the current transaction: streaming and bulk work
/// (COPY, blob streams) may take longer than a single statement should, and a COPY also waits
/// on the client. lock_timeout stays in force.
const LIFT_STATEMENT_TIMEOUT: &str = "SET LOCAL statement_timeout = 0";

/// Lifts statement_timeout inside `tx` (see [`LIFT_STATEMENT_TIMEOUT`]).
pub(crate) fn unbounded(tx: &mut Transaction<'_>) -> Result<()> {
    tx.batch_execute(LIFT_STATEMENT_TIMEOUT)?;
    Ok(())
}

/// Begins a read-write transaction without statement_timeout, with the watchdog waiting
/// `stream_idle_timeout` on this connection (see [`PgConnection::unbounded_client`]).
pub(crate) fn begin_unbounded(conn: &mut PgConnection) -> Result<Transaction<'_>> {
    let mut tx = conn.unbounded_client().transaction()?;
    unbounded(&mut tx)?;
    Ok(tx)
}

/// Quotes an identifier for SQL: `"name"`, with inner quotes doubled.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
