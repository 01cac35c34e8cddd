//! The connection pool: r2d2 over our connection manager, with a thread-affine parking slot
//! in front of it (`db::affinity`).
//!
//! r2d2_postgres's `PostgresConnectionManager` makes the connections, from the parsed settings
//! and our TLS connector (`db::tls::WatchedConnect`, which wraps every socket for the
//! hung-server watchdog of `db::deadline` and hands each connection's watch back). Our manager
//! wraps it with what it lacks: the session setup (search_path, timeouts), a prepared
//! statement cache, the poison flag, the failure and session epochs, and validation bounded by
//! the checkout's deadline (r2d2_postgres validates with an unbounded query, and its
//! `has_broken` misses a backend killed while idle). Every connection is watched while it is
//! checked out or logging in, so a hung server costs a caller its bound, never a hang.
//!
//! Checkout order: the connection this thread returned last (parked in its slot: the same
//! backend stays with the same thread, and nobody else is touched), then an idle one from
//! r2d2, then one parked by another thread, then a wait on r2d2. A parked connection counts as
//! checked out for r2d2, so while anyone waits, returned connections go back to r2d2 (which
//! wakes a waiter) instead of being parked, and waiters look at the slots between slices.

use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use postgres::{Client, IsolationLevel, Statement, Transaction};
use r2d2_postgres::PostgresConnectionManager;

use crate::db::affinity::Slots;
use crate::db::config::{describe_target, ConnectionConfig};
use crate::db::deadline::{call_deadline, Bounds, Watch, WatchGroup};
use crate::db::occupancy::Occupancy;
use crate::db::resolve::resolve_within;
use crate::db::retry::{self, Policy, Retry};
use crate::db::static_key::{StaticKey, StaticMap};
use crate::db::tls::{take_opened_watch, Connector, WatchedConnect};
use crate::error::{is_connection_failure, RepoError, Result};
use crate::metrics::{Clock, Metrics};

/// How long a stale connection may take to prove it is alive before it is discarded (less
/// when the checkout's own time runs out first).
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(2);

/// A waiting checkout looks at the pool's closing flag and at the parking slots this often.
const CHECKOUT_SLICE: Duration = Duration::from_millis(100);

/// Connections are closed and replaced after this long (r2d2 ages idle ones; a parked one is
/// retired when it comes back).
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// Idle connections beyond min_idle are closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// How often connections parked by threads that did not come back for them (idle threads,
/// threads that ended) return to r2d2: after one to two of these.
const PARKING_SWEEP: Duration = Duration::from_secs(1);

/// One pooled session.
pub(crate) struct PgConnection {
    client: Client,
    poisoned: bool,
    /// Past [`MAX_LIFETIME`]: r2d2 closes it instead of keeping it.
    retired: bool,
    opened: Instant,
    /// The failure epoch this connection was last known good in (see [`PoolShared`]).
    epoch: u64,
    /// The session epoch its settings and statements date from (see [`Pool::reset_sessions`]).
    session_epoch: u64,
    /// Keyed by the SQL's address: found without hashing its text on every call.
    statements: StaticMap<Statement>,
    dynamic_statements: HashMap<String, Statement>,
    /// What the hung-server watchdog knows of this session.
    watch: Watch,
    bounds: Bounds,
    /// The pool's counts, for a pooled session (it counts as open until dropped).
    occupancy: Option<Arc<Occupancy>>,
}

impl Drop for PgConnection {
    /// Closing a session sends a farewell; it must not block on a hung server.
    fn drop(&mut self) {
        self.watch.closing(self.is_broken());
        if let Some(occupancy) = &self.occupancy {
            occupancy.closed();
        }
    }
}

/// The most run-time-built statements one session keeps prepared.
const DYNAMIC_STATEMENTS: usize = 128;

impl PgConnection {
    /// Sets up a session just logged in, still armed with its login bound, and disarms it.
    fn set_up(client: Client, watch: Watch, bounds: Bounds, session_setup: &str) -> Result<Self> {
        let mut conn = PgConnection {
            client,
            poisoned: false,
            retired: false,
            opened: Instant::now(),
            epoch: 0,
            session_epoch: 0,
            statements: StaticMap::default(),
            dynamic_statements: HashMap::new(),
            watch,
            bounds,
            occupancy: None,
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
    /// query_timeout plus the grace (a call's deadline still cuts it, unless the call became
    /// a stream: [`start_stream`](Self::start_stream)). Lift statement_timeout with
    /// [`unbounded`] (or use [`begin_unbounded`], which does both).
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
        if let Some(statement) = self.statements.get(&StaticKey(sql)) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(StaticKey(sql), statement.clone());
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

    /// True when the pool must not keep this session: broken, or retired by age.
    fn is_done(&self) -> bool {
        self.retired || self.is_broken()
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
#[derive(Debug)]
pub(crate) struct PoolShared {
    epoch: AtomicU64,
    /// Bumped when every session must run its setup again and forget its statements.
    session_epoch: AtomicU64,
    /// What every session runs when it opens, and again after a session epoch.
    session_setup: String,
    /// Every connection of the pool, so closing can cut those still checked out.
    watches: WatchGroup,
    /// Open and checked-out connections, timed-out checkouts.
    occupancy: Arc<Occupancy>,
}

impl PoolShared {
    fn new(session_setup: String, metrics: Metrics) -> Self {
        PoolShared {
            epoch: AtomicU64::new(0),
            session_epoch: AtomicU64::new(0),
            session_setup,
            watches: WatchGroup::default(),
            occupancy: Arc::new(Occupancy::new(metrics)),
        }
    }

    /// Brings a session up to date before it is handed out: its setup again after a session
    /// epoch, and a liveness check (within `deadline`, if any) when it was last known good
    /// before the latest connection failure.
    fn revalidate(&self, conn: &mut PgConnection, deadline: Option<Instant>) -> Result<()> {
        let session_epoch = self.session_epoch.load(Ordering::Acquire);
        if conn.session_epoch < session_epoch {
            conn.statements.clear();
            conn.dynamic_statements.clear();
            conn.client.batch_execute(&self.session_setup)?;
            conn.session_epoch = session_epoch;
        }
        let current = self.epoch.load(Ordering::Acquire);
        if conn.epoch >= current {
            return Ok(());
        }
        let left = deadline.map_or(VALIDATION_TIMEOUT, |d| {
            d.saturating_duration_since(Instant::now())
        });
        conn.client
            .is_valid(VALIDATION_TIMEOUT.min(left).max(Duration::from_millis(1)))?;
        conn.epoch = current;
        Ok(())
    }
}

thread_local! {
    /// When the checkout running on this thread must be done: r2d2 validates stale
    /// connections inside its checkout, and that validation must not outlast it.
    static CHECKOUT_DEADLINE: std::cell::Cell<Option<Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Our r2d2 connection manager: r2d2_postgres's makes the connections, this one sets them up
/// and judges them.
pub(crate) struct Manager {
    postgres: PostgresConnectionManager<WatchedConnect>,
    /// The connection settings, for resolving their host names before each login.
    settings: postgres::Config,
    target: String,
    bounds: Bounds,
    shared: Arc<PoolShared>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// A manager for `config`; its connections join `group` when there is one.
    fn new(
        config: &ConnectionConfig,
        shared: Arc<PoolShared>,
        group: Option<WatchGroup>,
    ) -> Result<Self> {
        let pg = config.pg_config()?;
        let bounds = Bounds::for_config(config, &pg);
        let (settings, connect) =
            Connector::for_config(config, &pg)?.watched(&pg, bounds.login, group);
        Ok(Manager {
            settings: settings.clone(),
            postgres: PostgresConnectionManager::new(settings, connect),
            target: describe_target(&pg),
            bounds,
            shared,
        })
    }

    /// Opens one watched session with our settings: its login is bounded by `bounds.login`.
    fn open(&self) -> Result<PgConnection> {
        resolve_within(&self.settings, self.login_bound())?;
        let client = r2d2::ManageConnection::connect(&self.postgres);
        // Taken whether or not the login succeeded, so that it never outlives this call.
        let watch = take_opened_watch();
        let client = client?;
        let watch = watch.unwrap_or_else(|| {
            // r2d2_postgres clones our connector on the thread that connects; if a version
            // ever did not, the session would still work, without a client-side deadline.
            log::error!(
                "pg-model-repo: a connection to {} was opened without its watch",
                self.target
            );
            Watch::new()
        });
        PgConnection::set_up(client, watch, self.bounds, &self.shared.session_setup)
    }
}

/// A call that gives up cancels what it started: the connection it cut is closed, and the
/// server, checking every second that its client is still there while a statement runs
/// (PostgreSQL 14 and later), ends the statement instead of finishing an index build or a
/// VACUUM nobody waits for, holding its locks all the while.
const CHECK_CLIENT: &str = "SELECT set_config('client_connection_check_interval', '1000', false) \
     WHERE current_setting('server_version_num')::int >= 140000";

/// The statements every new session runs: our schema first on the search path, then the
/// schema of the pgvector extension where the database has it (its `vector` type and
/// operators resolve there, wherever it was installed); the query timeout as both
/// statement_timeout and lock_timeout; the check that the client is still there
/// ([`CHECK_CLIENT`]); then the settings the features ask for (HNSW's
/// ef_search: a placeholder setting until pgvector is loaded, harmless where it never is).
pub(crate) fn session_setup_sql(config: &ConnectionConfig) -> String {
    let timeout_ms = config.query_timeout.as_millis().max(1);
    // The schema name is a checked identifier ([A-Za-z_][A-Za-z0-9_]*): safe in a literal.
    format!(
        "SET search_path TO {schema}; \
         SELECT set_config('search_path', concat_ws(', ', quote_ident('{name}'), \
             (SELECT quote_ident(n.nspname) FROM pg_extension e \
              JOIN pg_namespace n ON n.oid = e.extnamespace \
              WHERE e.extname = 'vector' AND n.nspname <> '{name}')), false); \
         SET statement_timeout = {timeout_ms}; SET lock_timeout = {timeout_ms}; \
         {CHECK_CLIENT}{extra}",
        schema = quote_ident(&config.schema),
        name = config.schema,
        extra = config
            .session_settings
            .iter()
            .map(|(name, value)| format!("; SET {name} = {value}"))
            .collect::<String>(),
    )
}

/// Opens one watched session with our settings, outside any pool (migrations, tests,
/// tools); it is armed with its stream bound until dropped.
pub(crate) fn connect(config: &ConnectionConfig) -> Result<PgConnection> {
    connect_watched(config, None)
}

/// [`connect`], with the session's watch in `group` from its login on, so that cutting the
/// group's armed connections ends a login or a statement in flight on it too.
pub(crate) fn connect_in(config: &ConnectionConfig, group: &WatchGroup) -> Result<PgConnection> {
    connect_watched(config, Some(group.clone()))
}

fn connect_watched(config: &ConnectionConfig, group: Option<WatchGroup>) -> Result<PgConnection> {
    let shared = Arc::new(PoolShared::new(
        session_setup_sql(config),
        Metrics::new(&config.schema),
    ));
    let manager = Manager::new(config, shared, group)?;
    let conn = manager.open()?;
    conn.watch.arm(conn.bounds.stream);
    Ok(conn)
}

impl Manager {
    /// How long a login may take from now: its bound, and no later than the checkout running
    /// on this thread must be done.
    fn login_bound(&self) -> Duration {
        let bound = self.bounds.login;
        match CHECKOUT_DEADLINE.get() {
            Some(deadline) => bound.min(deadline.saturating_duration_since(Instant::now())),
            None => bound,
        }
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = PgConnection;
    type Error = RepoError;

    fn connect(&self) -> Result<PgConnection> {
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let session_epoch = self.shared.session_epoch.load(Ordering::Acquire);
        let mut conn = self.open()?;
        conn.epoch = epoch;
        conn.session_epoch = session_epoch;
        self.shared.occupancy.opened();
        conn.occupancy = Some(self.shared.occupancy.clone());
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut PgConnection) -> Result<()> {
        self.shared.revalidate(conn, CHECKOUT_DEADLINE.get())
    }

    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        conn.is_done()
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

/// A connection r2d2 counts as checked out, boxed once when it leaves r2d2: it then moves
/// between the caller, its `Conn` and the parking slots as a pointer instead of a few hundred
/// bytes each time.
type Pooled = Box<r2d2::PooledConnection<Manager>>;

/// The parking slots in front of r2d2 and what decides whether a returned connection may be
/// parked. Held by the pool handles and by every checked-out [`Conn`]; when the last of them
/// goes, whatever is parked returns to r2d2.
#[derive(Debug)]
struct Parking {
    slots: Slots<Pooled>,
    /// Callers waiting on r2d2 for a connection right now.
    waiting: AtomicU64,
    /// Set by [`Pool::begin_close`]: waiting checkouts give up.
    closing: AtomicBool,
    /// The pool's counts: a [`Conn`] is checked out until dropped.
    occupancy: Arc<Occupancy>,
    /// The pool's size, in the facade's gauge while the pool lives.
    max_size: u32,
}

impl Parking {
    fn new(occupancy: Arc<Occupancy>, max_size: u32) -> Self {
        occupancy.metrics().pool_max(f64::from(max_size));
        Parking {
            slots: Slots::default(),
            waiting: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            occupancy,
            max_size,
        }
    }

    /// Takes back a connection returned by its caller: parked in the calling thread's slot,
    /// unless someone waits on r2d2 (who would not see it there), the pool is closing, or the
    /// connection is done for; then r2d2 gets it (and drops it if it is done for).
    fn park(&self, conn: Pooled) {
        let mut conn = conn;
        if conn.opened.elapsed() >= MAX_LIFETIME {
            conn.retired = true;
        }
        if conn.is_done() || self.waiting.load(Ordering::Relaxed) > 0 {
            return;
        }
        if self.slots.park(conn).is_err() {
            return;
        }
        // Pairs with the fence in `Pool::wait`: either a waiter that counted itself after the
        // check above sees this connection in the slots, or we see the waiter here.
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) > 0 {
            drop(self.slots.take_own());
        }
    }
}

impl Drop for Parking {
    fn drop(&mut self) {
        drop(self.slots.close());
        self.occupancy.metrics().pool_max(-f64::from(self.max_size));
    }
}

/// Returns connections parked by threads that did not come back for them, every
/// [`PARKING_SWEEP`], on the shared maintenance threads, until the pool is gone.
fn start_parking_sweep(parking: Weak<Parking>) {
    maintenance_threads().execute_at_dynamic_rate(PARKING_SWEEP, move || {
        let parking = parking.upgrade()?;
        let stale = parking.slots.sweep();
        if !stale.is_empty() {
            log::debug!(
                "pg-model-repo: {} parked connections went back to the pool",
                stale.len()
            );
        }
        Some(PARKING_SWEEP)
    });
}

/// A checked-out session, watched while it is out; on drop it is parked for the thread that
/// drops it, or returns to r2d2 (see [`Parking::park`]).
pub(crate) struct Conn {
    conn: Option<Pooled>,
    parking: Arc<Parking>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.watch.disarm();
            self.parking.occupancy.returned();
            self.parking.park(conn);
        }
    }
}

impl std::ops::Deref for Conn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("a Conn holds its connection until dropped")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("a Conn holds its connection until dropped")
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.conn {
            Some(conn) => conn.fmt(f),
            None => f.write_str("Conn(returned)"),
        }
    }
}

/// The repository's pool handle: cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Pool {
    inner: r2d2::Pool<Manager>,
    shared: Arc<PoolShared>,
    parking: Arc<Parking>,
}

/// The pool's state: [`ModelRepository::pool_status`](crate::ModelRepository::pool_status).
///
/// `size`, `idle` and `in_use` come from one atomic read, so `idle + in_use == size` always
/// holds; `waiting` and `timeouts` are read just after.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PoolStatus {
    /// The most connections the pool opens (pool_size + max_overflow).
    pub max_size: u32,
    /// Open connections.
    pub size: u32,
    /// Open and not in use (waiting in the pool, or parked for the thread that used them
    /// last).
    pub idle: u32,
    /// Checked out by a call (a stream holds one until it returns).
    pub in_use: u32,
    /// Threads waiting for a connection now.
    pub waiting: u32,
    /// Checkouts that ran past pool_timeout (or their call's deadline) since the pool opened.
    pub timeouts: u64,
}

/// A snapshot of the pool's occupancy.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PoolState {
    /// Open connections, idle or in use.
    pub connections: u32,
    /// Open connections not in use (waiting in the pool, or parked for the thread that used
    /// them last).
    pub idle: u32,
    /// The most connections the pool opens (pool_size + max_overflow).
    pub max_size: u32,
    /// Callers waiting for a connection.
    pub waiting: u64,
}

impl Pool {
    /// Builds the pool without waiting for its connections (they open in the background and on
    /// demand).
    pub(crate) fn new(config: &ConnectionConfig) -> Result<Self> {
        let metrics = Metrics::new(&config.schema);
        let shared = Arc::new(PoolShared::new(session_setup_sql(config), metrics));
        let manager = Manager::new(config, shared.clone(), Some(shared.watches.clone()))?;
        let max_size = config.pool_size.saturating_add(config.max_overflow).max(1);
        let inner = r2d2::Pool::builder()
            .max_size(max_size)
            .min_idle(Some(config.pool_size.min(max_size)))
            .connection_timeout(config.pool_timeout)
            .test_on_check_out(true)
            .max_lifetime(Some(MAX_LIFETIME))
            .idle_timeout(Some(IDLE_TIMEOUT))
            .error_handler(Box::new(LogErrors))
            .thread_pool(maintenance_threads())
            .build_unchecked(manager);
        let parking = Arc::new(Parking::new(shared.occupancy.clone(), max_size));
        start_parking_sweep(Arc::downgrade(&parking));
        Ok(Pool {
            inner,
            shared,
            parking,
        })
    }

    /// A connection within pool_timeout (or by the call's deadline, when that comes first),
    /// else `RepoError::Timeout`; cut by the watchdog at the call's deadline.
    pub(crate) fn get(&self) -> Result<Conn> {
        let pool_deadline = Instant::now() + self.inner.connection_timeout();
        match call_deadline() {
            Some(call) => {
                let conn = self.checkout(pool_deadline.min(call), true)?;
                conn.watch.cut_at(call);
                Ok(conn)
            }
            None => self.checkout(pool_deadline, true),
        }
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
        if interruptible && self.parking.closing.load(Ordering::Acquire) {
            return Err(RepoError::pool_timeout("the repository is closing"));
        }
        let clock = Clock::start();
        let previous = CHECKOUT_DEADLINE.replace(Some(deadline));
        let found = match self.unpark(self.parking.slots.take_own(), deadline) {
            Some(conn) => Ok(conn),
            None => match self.inner.try_get() {
                Some(conn) => Ok(Box::new(conn)),
                None => self.wait(deadline, interruptible),
            },
        };
        CHECKOUT_DEADLINE.set(previous);
        let conn = self.out(found?);
        self.shared.occupancy.waited(clock);
        Ok(conn)
    }

    /// Waits for a connection: one parked by another thread, or one from r2d2 (returned, or
    /// newly opened).
    fn wait(&self, deadline: Instant, interruptible: bool) -> Result<Pooled> {
        let started = Instant::now();
        let occupancy = &self.shared.occupancy;
        self.parking.waiting.fetch_add(1, Ordering::AcqRel);
        occupancy.waiting(true);
        // Pairs with the fence in `Parking::park` (see there).
        fence(Ordering::SeqCst);
        // r2d2 reports the last connection error once; keep it across slices.
        let mut cause: Option<r2d2::Error> = None;
        let result = loop {
            if interruptible && self.parking.closing.load(Ordering::Acquire) {
                break Err(RepoError::pool_timeout("the repository is closing"));
            }
            if let Some(conn) = self.steal(deadline) {
                break Ok(conn);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = left.min(CHECKOUT_SLICE);
            let error = match self.inner.get_timeout(slice) {
                Ok(conn) => break Ok(Box::new(conn)),
                Err(e) => e,
            };
            if error.to_string().contains(": ") || cause.is_none() {
                cause = Some(error);
            }
            if left <= slice {
                let waited = started.elapsed();
                let cause = cause.map(|e| format!(": {e}")).unwrap_or_default();
                occupancy.timed_out();
                break Err(RepoError::pool_timeout(format!("waited {waited:?}{cause}")));
            }
        };
        self.parking.waiting.fetch_sub(1, Ordering::AcqRel);
        occupancy.waiting(false);
        result
    }

    /// A connection parked by any thread, if one is usable.
    fn steal(&self, deadline: Instant) -> Option<Pooled> {
        loop {
            let conn = self.parking.slots.take_any()?;
            if let Some(conn) = self.unpark(Some(conn), deadline) {
                return Some(conn);
            }
        }
    }

    /// A parked connection, brought up to date as r2d2 does on checkout; `None` if it is done
    /// for (it then goes back to r2d2, which closes it).
    fn unpark(&self, conn: Option<Pooled>, deadline: Instant) -> Option<Pooled> {
        let mut conn = conn?;
        if conn.is_done() {
            return None;
        }
        match self.shared.revalidate(&mut conn, Some(deadline)) {
            Ok(()) => Some(conn),
            Err(e) => {
                log::warn!("pg-model-repo: a parked connection failed its check: {e}");
                conn.poison();
                None
            }
        }
    }

    fn out(&self, conn: Pooled) -> Conn {
        conn.watch.arm(conn.bounds.statement);
        self.shared.occupancy.checked_out();
        Conn {
            conn: Some(conn),
            parking: self.parking.clone(),
        }
    }

    /// An idle or parked connection right now, or `None` without waiting: for extra
    /// connections taken while one is already held (waiting there could deadlock a small
    /// pool).
    pub(crate) fn try_get(&self) -> Option<Conn> {
        let deadline = Instant::now() + VALIDATION_TIMEOUT;
        let previous = CHECKOUT_DEADLINE.replace(Some(deadline));
        let conn = self
            .inner
            .try_get()
            .map(Box::new)
            .or_else(|| self.steal(deadline));
        CHECKOUT_DEADLINE.set(previous);
        conn.map(|conn| self.out(conn))
    }

    /// The repository is closing: ordinary checkouts fail (waiting ones within a slice),
    /// parked connections go back to r2d2 and nothing is parked any more, and connections
    /// still checked out (the reaper's) are cut at `cut_at` if their work is not done by then.
    pub(crate) fn begin_close(&self, cut_at: Instant) {
        self.parking.closing.store(true, Ordering::Release);
        drop(self.parking.slots.close());
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
    pub(crate) fn with_conn<T>(
        &self,
        op: &str,
        retry: Retry,
        mut f: impl FnMut(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        retry::with_retries(op, retry, Policy::default(), || {
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

    /// The statements every new session of this pool runs (to restore a session's settings).
    pub(crate) fn session_setup(&self) -> &str {
        &self.shared.session_setup
    }

    /// How long a checkout waits for a connection (pool_timeout).
    pub(crate) fn timeout(&self) -> Duration {
        self.inner.connection_timeout()
    }

    /// Open, idle and checked-out connections, waiting threads and timed-out checkouts.
    pub(crate) fn status(&self) -> PoolStatus {
        let occupancy = &self.shared.occupancy;
        let (size, in_use) = occupancy.snapshot();
        let waiting = self.parking.waiting.load(Ordering::Acquire);
        PoolStatus {
            max_size: self.inner.max_size(),
            size,
            idle: size.saturating_sub(in_use),
            in_use,
            waiting: u32::try_from(waiting).unwrap_or(u32::MAX),
            timeouts: occupancy.timeouts(),
        }
    }

    /// The facade's labels for this pool's schema.
    pub(crate) fn metrics(&self) -> &Metrics {
        self.shared.occupancy.metrics()
    }

    /// Connections open and idle (parked ones included) right now.
    pub(crate) fn state(&self) -> PoolState {
        let s = self.inner.state();
        let parked = u32::try_from(self.parking.slots.parked()).unwrap_or(u32::MAX);
        PoolState {
            connections: s.connections,
            idle: s.idle_connections.saturating_add(parked),
            max_size: self.inner.max_size(),
            waiting: self.parking.waiting.load(Ordering::Acquire),
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

/// Begins a read-only REPEATABLE READ transaction without statement_timeout: one snapshot
/// for every read of a stream, the watchdog waiting `stream_idle_timeout`. With `snapshot`,
/// the transaction joins that exported snapshot (another session's, so that several
/// connections read the same state).
pub(crate) fn begin_snapshot<'c>(
    conn: &'c mut PgConnection,
    snapshot: Option<&str>,
) -> Result<Transaction<'c>> {
    let mut tx = conn
        .unbounded_client()
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?;
    if let Some(id) = snapshot {
        // Must come before any other statement of the transaction. The id is the server's
        // own (hex digits and dashes), quoted all the same.
        tx.batch_execute(&format!(
            "SET TRANSACTION SNAPSHOT '{}'",
            id.replace('\'', "''")
        ))?;
    }
    unbounded(&mut tx)?;
    Ok(tx)
}

/// Quotes an identifier for SQL: `"name"`, with inner quotes doubled.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
