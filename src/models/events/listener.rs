//! A subscription: one dedicated connection that LISTENs on the schema's channel, read by a
//! named thread that feeds a bounded crossbeam channel. A lost connection is reopened with
//! backoff, then one `Resync` says that changes meanwhile are unknown; the thread ends within
//! a second of a stop (the subscription dropped, or the repository closed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use postgres::fallible_iterator::FallibleIterator;

use crate::db::config::ConnectionConfig;
use crate::db::deadline::WatchGroup;
use crate::db::pool::{connect_in, quote_ident, PgConnection};
use crate::error::{RepoError, Result};
use crate::metrics::Metrics;
use crate::models::events::payload::{parse, ModelEvent};

/// How many events a subscription holds for its reader. When they are not read fast enough,
/// the events that do not fit are dropped and a `Resync` follows once there is room again.
///
/// ```no_run
/// # fn main() -> pg_model_repo::Result<()> {
/// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
/// let events = repo.subscribe_model_events()?;
/// assert_eq!(events.receiver().capacity(), Some(pg_model_repo::MODEL_EVENTS_CAPACITY));
/// # Ok(()) }
/// ```
pub const MODEL_EVENTS_CAPACITY: usize = 65_536;

/// How long the listener waits for a notification before it looks at its stop flag again:
/// the bound on how late it notices a stop.
const POLL: Duration = Duration::from_millis(100);

/// After this long without a notification, a round trip checks that the connection still
/// works (a server that hangs, or a network that drops packets, sends no end of stream).
const PING_EVERY: Duration = Duration::from_secs(5);

/// How long that round trip may take before the connection counts as lost.
const PING_BOUND: Duration = Duration::from_secs(10);

/// The first delay before reconnecting, doubled after each failed attempt up to
/// [`BACKOFF_MAX`], with jitter.
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long a stop waits for listener threads to end.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// A listener's stop signal, and its connection's watch (cut at a stop, so that a login or
/// a round trip to a hung server ends too).
#[derive(Debug, Default)]
pub(crate) struct Stop {
    requested: AtomicBool,
    running: AtomicBool,
    watches: WatchGroup,
}

impl Stop {
    fn request(&self) {
        self.requested.store(true, Ordering::Release);
        self.watches.cut_armed_at(Instant::now());
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }
}

/// Every live subscription of a repository: stopped when it closes.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions(Mutex<Vec<Weak<Stop>>>);

impl Subscriptions {
    fn add(&self, stop: &Arc<Stop>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|s| s.strong_count() > 0);
        all.push(Arc::downgrade(stop));
    }

    /// Stops every listener and waits (at most [`STOP_WAIT`]) for their threads to end.
    pub(crate) fn stop_all(&self) {
        let live: Vec<Arc<Stop>> = {
            let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
            all.drain(..).filter_map(|s| s.upgrade()).collect()
        };
        for stop in &live {
            stop.request();
        }
        let deadline = Instant::now() + STOP_WAIT;
        while live.iter().any(|s| s.running.load(Ordering::Acquire)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A subscription to the model change events of a repository's schema: one dedicated
/// listening connection (not from the pool) and one thread, `pg-model-repo-events`, that
/// turns its notifications into [`ModelEvent`]s. Dropping it (or closing the repository)
/// ends the thread within a second and closes the connection.
///
/// Events arrive in commit order, each once, from the moment
/// [`subscribe_model_events`](crate::ModelRepository::subscribe_model_events) returned. After
/// the connection was lost (a server restart, a killed backend, a network fault) the listener
/// reconnects with backoff and sends one `Resync`: changes committed meanwhile are not sent,
/// so re-read what you keep. It holds up to [`MODEL_EVENTS_CAPACITY`] events unread; past
/// that, events are dropped and a `Resync` follows.
///
/// ```no_run
/// # fn main() -> pg_model_repo::Result<()> {
/// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
/// let events = repo.subscribe_model_events()?;
/// for event in events.receiver().iter() {
///     println!("{:?} {} {:?}", event.kind, event.model_name, event.version);
/// }
/// # Ok(()) }
/// ```
pub struct ModelEvents {
    receiver: Receiver<ModelEvent>,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the thread ends.
    finished: Receiver<()>,
}

impl std::fmt::Debug for ModelEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelEvents")
            .field("pending", &self.receiver.len())
            .field("running", &self.stop.running.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl ModelEvents {
    /// The channel the events arrive on: block on it, `select!` over it with other channels,
    /// or iterate it (the iteration ends when the subscription stops). A clone of it keeps
    /// receiving only while this `ModelEvents` lives.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let events = repo.subscribe_model_events()?;
    /// let (_stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
    /// crossbeam_channel::select! {
    ///     recv(events.receiver()) -> event => println!("{event:?}"),
    ///     recv(stop) -> _ => {}
    /// }
    /// # Ok(()) }
    /// ```
    pub fn receiver(&self) -> &Receiver<ModelEvent> {
        &self.receiver
    }

    /// The next event, waiting at most `timeout`; `None` when none came in time, or when the
    /// subscription has stopped (the repository closed) and every event was read.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let events = repo.subscribe_model_events()?;
    /// if let Some(event) = events.recv_timeout(std::time::Duration::from_secs(5)) {
    ///     println!("{event:?}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn recv_timeout(&self, timeout: Duration) -> Option<ModelEvent> {
        self.receiver.recv_timeout(timeout).ok()
    }

    /// Whether the listener still runs (false once the subscription was stopped by a close of
    /// the repository). A listener that is reconnecting still runs.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let events = repo.subscribe_model_events()?;
    /// assert!(events.is_running());
    /// # Ok(()) }
    /// ```
    pub fn is_running(&self) -> bool {
        self.stop.running.load(Ordering::Acquire)
    }

    /// Stops the listener and closes its connection; the same as dropping it.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let events = repo.subscribe_model_events()?;
    /// events.close();
    /// # Ok(()) }
    /// ```
    pub fn close(self) {
        drop(self);
    }
}

impl Drop for ModelEvents {
    /// Stops the thread and waits for it, at most a second (its connection attempt to a server
    /// that does not answer may take longer: the thread then ends when it gives up, and sends
    /// nothing more).
    fn drop(&mut self) {
        self.stop.request();
        let Some(thread) = self.thread.take() else {
            return;
        };
        match self.finished.recv_timeout(STOP_WAIT) {
            Err(RecvTimeoutError::Disconnected) | Ok(()) => {
                if thread.join().is_err() {
                    log::error!("pg-model-repo: the model events listener panicked");
                }
            }
            Err(RecvTimeoutError::Timeout) => log::debug!(
                "pg-model-repo: the model events listener is still connecting; it ends when \
                 that attempt gives up"
            ),
        }
    }
}

/// Opens a listening connection on `channel`.
fn open(config: &ConnectionConfig, channel: &str, watches: &WatchGroup) -> Result<PgConnection> {
    let mut conn = connect_in(config, watches)?;
    conn.client()
        .batch_execute(&format!("LISTEN {}", quote_ident(channel)))?;
    // The server is silent while nobody changes a model: the watchdog must not cut it for that.
    conn.watch().disarm();
    Ok(conn)
}

/// Starts a subscription: the LISTEN is in place when this returns, so every change
/// committed after it is delivered.
pub(crate) fn start(
    config: ConnectionConfig,
    channel: String,
    subscriptions: &Subscriptions,
    metrics: &Metrics,
) -> Result<ModelEvents> {
    let stop = Arc::new(Stop::default());
    let conn = open(&config, &channel, &stop.watches)?;
    let (sender, receiver) = crossbeam_channel::bounded(MODEL_EVENTS_CAPACITY);
    let (done, finished) = crossbeam_channel::bounded::<()>(0);
    stop.running.store(true, Ordering::Release);
    subscriptions.add(&stop);
    let listener = Listener {
        config,
        channel,
        sender,
        stop: stop.clone(),
        resync_pending: false,
        overflow_logged: false,
    };
    let live = metrics.subscription();
    let thread = std::thread::Builder::new()
        .name("pg-model-repo-events".to_owned())
        .spawn(move || {
            let _live = live;
            let _done = done;
            let stop = listener.stop.clone();
            listener.run(conn);
            stop.running.store(false, Ordering::Release);
        })
        .map_err(|e| {
            stop.running.store(false, Ordering::Release);
            RepoError::Io(e)
        })?;
    Ok(ModelEvents {
        receiver,
        stop,
        thread: Some(thread),
        finished,
    })
}

/// What the listener thread owns.
struct Listener {
    config: ConnectionConfig,
    channel: String,
    sender: Sender<ModelEvent>,
    stop: Arc<Stop>,
    /// A `Resync` is owed to the reader (a reconnect, or events dropped for lack of room).
    resync_pending: bool,
    overflow_logged: bool,
}

/// Why listening on a connection ended without an error.
enum Ended {
    Stopped,
}

impl Listener {
    fn run(mut self, first: PgConnection) {
        let mut conn = Some(first);
        loop {
            let mut current = match conn.take() {
                Some(c) => c,
                None => match self.reconnect() {
                    Some(c) => {
                        self.resync_pending = true;
                        if !self.flush_resync() {
                            return;
                        }
                        c
                    }
                    None => return,
                },
            };
            match self.listen(&mut current) {
                Ok(Ended::Stopped) => return,
                Err(e) => {
                    if self.stop.requested() {
                        return;
                    }
                    log::warn!(
                        "pg-model-repo: the model events connection was lost ({e}); reconnecting"
                    );
                    current.poison();
                }
            }
        }
    }

    /// Reads notifications until a stop or a failure of the connection.
    fn listen(&mut self, conn: &mut PgConnection) -> Result<Ended> {
        let mut quiet_since = Instant::now();
        loop {
            if self.stop.requested() {
                return Ok(Ended::Stopped);
            }
            let mut got = false;
            let waited_from = Instant::now();
            {
                let mut notifications = conn.client().notifications();
                let mut iter = notifications.timeout_iter(POLL);
                while let Some(notification) = iter.next()? {
                    got = true;
                    match parse(notification.payload()) {
                        Some(event) => {
                            if !self.deliver(event) {
                                return Ok(Ended::Stopped);
                            }
                        }
                        None => log::debug!(
                            "pg-model-repo: ignored a notification on {} that is not a model \
                             event: {:?}",
                            self.channel,
                            notification.payload()
                        ),
                    }
                    if self.stop.requested() {
                        return Ok(Ended::Stopped);
                    }
                }
            }
            if conn.client().is_closed() {
                return Err(RepoError::Io(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the server closed the connection",
                )));
            }
            if !self.flush_resync() {
                return Ok(Ended::Stopped);
            }
            // A wait that ended early with nothing may be the end of the stream.
            let cut_short = !got && waited_from.elapsed() < POLL / 2;
            if got {
                quiet_since = Instant::now();
            } else if cut_short || quiet_since.elapsed() >= PING_EVERY {
                conn.watch().arm(PING_BOUND);
                let pinged = conn.client().batch_execute("SELECT 1");
                conn.watch().disarm();
                pinged?;
                quiet_since = Instant::now();
            }
        }
    }

    /// A new listening connection, trying with backoff until one opens or a stop.
    fn reconnect(&mut self) -> Option<PgConnection> {
        let mut delay = BACKOFF_START;
        let mut attempts = 0u32;
        loop {
            if self.stop.requested() {
                return None;
            }
            attempts += 1;
            match open(&self.config, &self.channel, &self.stop.watches) {
                Ok(conn) => {
                    log::info!(
                        "pg-model-repo: the model events connection is back after {attempts} \
                         attempt(s)"
                    );
                    return Some(conn);
                }
                Err(e) if attempts == 1 => {
                    log::warn!("pg-model-repo: reconnecting the model events listener: {e}")
                }
                Err(e) => log::debug!(
                    "pg-model-repo: reconnecting the model events listener (attempt \
                     {attempts}): {e}"
                ),
            }
            let jittered = delay.mul_f64(0.5 + fastrand::f64() * 0.5);
            if !self.sleep(jittered) {
                return None;
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    /// Sleeps `d` unless stopped first (false then).
    fn sleep(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while !self.stop.requested() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(POLL));
        }
        false
    }

    /// Sends an owed `Resync` if there is room. False when nobody receives any more.
    fn flush_resync(&mut self) -> bool {
        if !self.resync_pending {
            return true;
        }
        match self.sender.try_send(ModelEvent::resync()) {
            Ok(()) => {
                self.resync_pending = false;
                self.overflow_logged = false;
                true
            }
            Err(TrySendError::Full(_)) => true,
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// Hands an event to the reader, after an owed `Resync`; an event that does not fit is
    /// dropped and a `Resync` owed. False when nobody receives any more.
    fn deliver(&mut self, event: ModelEvent) -> bool {
        if !self.flush_resync() {
            return false;
        }
        if self.resync_pending {
            return true;
        }
        match self.sender.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.resync_pending = true;
                if !self.overflow_logged {
                    self.overflow_logged = true;
                    log::warn!(
                        "pg-model-repo: {MODEL_EVENTS_CAPACITY} model events are unread; \
                         dropping events until there is room, then sending Resync"
                    );
                }
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}
