//! Client-side deadlines for a hung server or network. Every connection's bytes pass through a
//! [`Watched`] stream; one shared watchdog thread cuts a connection whose caller has waited on
//! a silent server for longer than the connection's bound, and the cut surfaces as an I/O
//! error ([`ConnectionCut`]) that the pool maps to `RepoError::Timeout` and never reuses.
//!
//! Why client-side: against a frozen server (SIGSTOP) or a black-holed network the kernel still
//! ACKs data and keepalives, so TCP keepalive and tcp_user_timeout never fire, statement_timeout
//! is enforced by the very process that hangs, and a cancel request goes to the same frozen
//! postmaster. Only the client can decide that it waited long enough.
//!
//! What counts as waiting: a connection is *stalled* when no byte moved in either direction
//! for its bound **and** the caller is blocked on it. The second half is checked with a probe:
//! the watchdog wakes the connection's task; a caller blocked in the client answers by polling
//! the stream again, while a caller busy in its own code (a slow writer, a slow callback
//! between rows) does not, and is never cut for it. A connection that is not checked out is
//! disarmed and never probed.

use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use postgres::tls::{ChannelBinding, TlsStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::db::config::ConnectionConfig;
use crate::error::ConnectionCut;

/// How often the watchdog looks at armed connections: the margin on every bound.
pub(crate) const TICK: Duration = Duration::from_millis(50);

/// How long a probe may wait for the blocked caller's runtime to poll again before the
/// caller counts as busy elsewhere.
const PROBE_PATIENCE: Duration = Duration::from_millis(200);

/// Added to query_timeout for an ordinary statement's client-side bound, so that a live
/// server's own statement_timeout (or lock_timeout) answers first.
pub(crate) const STATEMENT_GRACE: Duration = Duration::from_secs(1);

/// The bound of closing a session (sending Terminate) when it is dropped.
const CLOSE_BOUND: Duration = Duration::from_millis(500);

thread_local! {
    /// The deadline of the public call running on this thread, if it has one (see
    /// [`CallDeadline`]).
    static CALL_DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// The one deadline of a public call that is not a stream or a bulk load: taken when the call
/// starts (pool_timeout + query_timeout + [`CALL_GRACE`]), it bounds every step on this thread
/// until the guard drops: each checkout waits at most what is left, each connection checked
/// out is cut by the watchdog when it passes, and no retry starts after it. A call that turns
/// into a stream (a chunked model's transfer) lifts it ([`lift_call_deadline`]) and is
/// bounded by stream_idle_timeout between the server's messages from then on.
#[derive(Debug)]
pub(crate) struct CallDeadline {
    previous: Option<Instant>,
}

/// Added to pool_timeout + query_timeout for a call's deadline: the watchdog's margin and the
/// outcome check of a lost commit reply.
pub(crate) const CALL_GRACE: Duration = Duration::from_secs(2);

impl CallDeadline {
    /// Starts a call's deadline on this thread: `at`, or none (a stream, a bulk load). A call
    /// inside another keeps the earlier deadline.
    pub(crate) fn start(at: Option<Instant>) -> Self {
        let previous = CALL_DEADLINE.get();
        let at = match (previous, at) {
            (Some(p), Some(a)) => Some(p.min(a)),
            (p, a) => a.or(p),
        };
        CALL_DEADLINE.set(at);
        CallDeadline { previous }
    }
}

impl Drop for CallDeadline {
    fn drop(&mut self) {
        CALL_DEADLINE.set(self.previous);
    }
}

/// The deadline of the call running on this thread, if any.
pub(crate) fn call_deadline() -> Option<Instant> {
    CALL_DEADLINE.get()
}

/// The call on this thread turned into a stream on the connection `watch` watches, after
/// the server answered it (a frozen server still meets the deadline): no deadline for the
/// rest of the call, and the connection is no longer cut at it.
pub(crate) fn stream_from_here(watch: &Watch) {
    CALL_DEADLINE.set(None);
    watch.clear_cut();
}

/// How long a caller may wait on a silent server, by kind of work.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// Ordinary statements: query_timeout plus a grace, so the server's own timeout answers
    /// first when the server is alive.
    pub statement: Duration,
    /// Streaming and bulk work, which runs without statement_timeout: stream_idle_timeout.
    pub stream: Duration,
    /// Logging in (the TCP connect has connect_timeout of its own).
    pub login: Duration,
}

impl Bounds {
    pub(crate) fn for_config(config: &ConnectionConfig, pg: &postgres::Config) -> Self {
        Bounds {
            statement: config.query_timeout.saturating_add(STATEMENT_GRACE),
            stream: config.stream_idle_timeout,
            login: pg
                .get_connect_timeout()
                .copied()
                .unwrap_or(config.pool_timeout),
        }
    }
}

/// The watched connection's state, shared by its stream (on the client's runtime), the
/// connection's owner (arming and disarming) and the watchdog thread.
#[derive(Debug, Default)]
struct State {
    /// The stall bound in ms while the connection is checked out; 0 when disarmed.
    bound_ms: AtomicU64,
    /// A hard deadline (watchdog clock ms), 0 for none.
    cut_at_ms: AtomicU64,
    /// When a byte last moved (watchdog clock ms).
    progress_ms: AtomicU64,
    /// Polls of the stream, answered probes included.
    polls: AtomicU64,
    killed: AtomicBool,
    /// What the cut was about, for the error (set before `killed`).
    expired: Mutex<Option<ConnectionCut>>,
    /// The waker of the last poll that found nothing to do.
    waker: Mutex<Option<Waker>>,
    /// The watchdog's own bookkeeping.
    probe: Mutex<Probe>,
}

/// What the watchdog learned from its probes since the last byte moved.
#[derive(Debug, Default)]
struct Probe {
    /// The progress time these findings belong to.
    progress_ms: u64,
    /// The last probe: when it was sent and the poll count then.
    last: Option<(u64, u64)>,
    /// Whether any probe since the last byte went unanswered.
    unanswered: bool,
    /// Since when the caller is known to be blocked on this connection.
    blocked_since: Option<u64>,
}

/// Milliseconds on the watchdog's clock (never 0).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    fn expired(&self) -> Option<io::Error> {
        if !self.killed.load(Ordering::Acquire) {
            return None;
        }
        let why = lock(&self.expired).clone().unwrap_or(ConnectionCut {
            waited: Duration::ZERO,
            bound: None,
        });
        Some(io::Error::new(io::ErrorKind::TimedOut, why))
    }

    fn progressed(&self) {
        self.progress_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Remembers the waker of a poll that found nothing to do (probes and cuts wake it).
    fn park(&self, waker: &Waker) {
        let mut slot = lock(&self.waker);
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    fn wake(&self) {
        if let Some(waker) = lock(&self.waker).as_ref() {
            waker.wake_by_ref();
        }
    }

    fn kill(&self, why: ConnectionCut) {
        log::debug!("pg-model-repo: watchdog: {why}");
        *lock(&self.expired) = Some(why);
        self.killed.store(true, Ordering::Release);
        self.wake();
    }

    /// One watchdog look at this connection.
    fn check(&self, now: u64) {
        let bound = self.bound_ms.load(Ordering::Relaxed);
        if bound == 0 || self.killed.load(Ordering::Relaxed) {
            return;
        }
        let progress = self.progress_ms.load(Ordering::Relaxed);
        let cut_at = self.cut_at_ms.load(Ordering::Relaxed);
        if cut_at != 0 && now >= cut_at {
            self.kill(ConnectionCut {
                waited: Duration::from_millis(now.saturating_sub(progress)),
                bound: None,
            });
            return;
        }
        let polls = self.polls.load(Ordering::Relaxed);
        let mut probe = lock(&self.probe);
        if probe.progress_ms != progress || now.saturating_sub(progress) < ms(TICK) {
            // Bytes are moving: start over.
            *probe = Probe {
                progress_ms: progress,
                ..Probe::default()
            };
            return;
        }
        if let Some((sent_at, polls_then)) = probe.last {
            if polls > polls_then {
                // The caller polled again when woken: it is blocked on this connection. If
                // every probe since the last byte was answered, it has been since that byte.
                let since = if probe.unanswered { sent_at } else { progress };
                probe.blocked_since.get_or_insert(since);
                probe.last = None;
            } else if now.saturating_sub(sent_at) >= ms(PROBE_PATIENCE) {
                // Nobody polled: the caller is busy in its own code.
                probe.unanswered = true;
                probe.blocked_since = None;
                probe.last = None;
            }
            // Else the answer may still come (a busy machine schedules the caller late).
        }
        if let Some(since) = probe.blocked_since {
            let waited = now.saturating_sub(since.max(progress));
            if waited >= bound && self.progress_ms.load(Ordering::Relaxed) == progress {
                drop(probe);
                self.kill(ConnectionCut {
                    waited: Duration::from_millis(waited),
                    bound: Some(Duration::from_millis(bound)),
                });
                return;
            }
        }
        if probe.last.is_some() {
            return;
        }
        probe.last = Some((now, polls));
        drop(probe);
        self.wake();
    }
}

/// The handle to one connection's watch: armed while the connection is checked out.
#[derive(Clone, Debug)]
pub(crate) struct Watch(Arc<State>);

impl Watch {
    /// A new, disarmed watch, known to the watchdog.
    pub(crate) fn new() -> Self {
        let state = Arc::new(State::default());
        watchdog().register(&state);
        Watch(state)
    }

    /// Watches the connection with a stall bound of `bound`, counting from now.
    pub(crate) fn arm(&self, bound: Duration) {
        self.0.progressed();
        self.0.cut_at_ms.store(0, Ordering::Relaxed);
        self.0.bound_ms.store(ms(bound), Ordering::Relaxed);
    }

    /// Changes the stall bound of an armed connection.
    pub(crate) fn set_bound(&self, bound: Duration) {
        if self.0.bound_ms.load(Ordering::Relaxed) != 0 {
            self.0.bound_ms.store(ms(bound), Ordering::Relaxed);
        }
    }

    /// Cuts the connection at `at` if it is still armed then, stalled or not.
    pub(crate) fn cut_at(&self, at: Instant) {
        let left = at.saturating_duration_since(Instant::now());
        self.0
            .cut_at_ms
            .store(now_ms().saturating_add(ms(left)), Ordering::Relaxed);
    }

    /// No cut at a fixed time any more (the call became a stream).
    pub(crate) fn clear_cut(&self) {
        self.0.cut_at_ms.store(0, Ordering::Relaxed);
    }

    /// Stops watching (the connection went back to the pool).
    pub(crate) fn disarm(&self) {
        self.0.bound_ms.store(0, Ordering::Relaxed);
        self.0.cut_at_ms.store(0, Ordering::Relaxed);
    }

    /// True once the watchdog cut this connection.
    pub(crate) fn fired(&self) -> bool {
        self.0.killed.load(Ordering::Acquire)
    }

    /// The connection is being dropped: a broken one fails every further I/O at once (so the
    /// client's farewell cannot block), a healthy one gets a short bound for it.
    pub(crate) fn closing(&self, broken: bool) {
        if broken {
            if !self.fired() {
                self.0.kill(ConnectionCut {
                    waited: Duration::ZERO,
                    bound: None,
                });
            }
        } else {
            self.arm(CLOSE_BOUND);
            self.cut_at(Instant::now() + CLOSE_BOUND);
        }
    }

    /// `inner` with every byte accounted to this watch.
    pub(crate) fn stream<S>(&self, inner: S) -> Watched<S> {
        Watched {
            inner,
            state: self.0.clone(),
        }
    }
}

/// Every connection of one pool, so that closing the pool can cut what is still checked out.
#[derive(Clone, Debug, Default)]
pub(crate) struct WatchGroup(Arc<Mutex<Vec<Weak<State>>>>);

impl WatchGroup {
    /// Adds a connection's watch.
    pub(crate) fn add(&self, watch: &Watch) {
        let mut all = lock(&self.0);
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&watch.0));
    }

    /// Cuts every connection still checked out at `at`.
    pub(crate) fn cut_armed_at(&self, at: Instant) {
        for state in lock(&self.0).iter().filter_map(Weak::upgrade) {
            if state.bound_ms.load(Ordering::Relaxed) != 0 {
                Watch(state).cut_at(at);
            }
        }
    }
}

/// A stream whose bytes and waits are seen by the watchdog.
#[derive(Debug)]
pub(crate) struct Watched<S> {
    inner: S,
    state: Arc<State>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.state.polls.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = this.state.expired() {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Pending => this.state.park(cx.waker()),
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.state.progressed(),
            Poll::Ready(_) => {}
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.state.polls.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = this.state.expired() {
            return Poll::Ready(Err(e));
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        match &polled {
            Poll::Pending => this.state.park(cx.waker()),
            Poll::Ready(Ok(n)) if *n > 0 => this.state.progressed(),
            Poll::Ready(_) => {}
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.state.polls.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = this.state.expired() {
            return Poll::Ready(Err(e));
        }
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        if polled.is_pending() {
            this.state.park(cx.waker());
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state.killed.load(Ordering::Acquire) {
            // Nothing more is sent on a cut connection; the socket closes when it is dropped.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Watched<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// The one watchdog thread of the process.
#[derive(Debug)]
struct Watchdog {
    states: Mutex<Vec<Weak<State>>>,
    /// The thread, once started (`None` if it could not be).
    thread: OnceLock<Option<std::thread::Thread>>,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| Watchdog {
        states: Mutex::new(Vec::new()),
        thread: OnceLock::new(),
    })
}

impl Watchdog {
    fn register(&'static self, state: &Arc<State>) {
        lock(&self.states).push(Arc::downgrade(state));
        let thread = self.thread.get_or_init(|| {
            let spawned = std::thread::Builder::new()
                .name("pg-model-repo-watchdog".to_owned())
                .spawn(move || self.watch_forever());
            match spawned {
                Ok(handle) => Some(handle.thread().clone()),
                Err(e) => {
                    // Without the thread no connection is ever cut: a hung server may hang
                    // its callers, as it would without this module.
                    log::error!("pg-model-repo: cannot start the watchdog thread: {e}");
                    None
                }
            }
        });
        if let Some(thread) = thread {
            thread.unpark();
        }
    }

    fn watch_forever(&self) {
        loop {
            let live: Vec<Arc<State>> = {
                let mut states = lock(&self.states);
                states.retain(|w| w.strong_count() > 0);
                states.iter().filter_map(Weak::upgrade).collect()
            };
            if live.is_empty() {
                std::thread::park();
                continue;
            }
            let now = now_ms();
            for state in &live {
                // A bug here must not end the watch over every other connection.
                let checked = std::panic::catch_unwind(AssertUnwindSafe(|| state.check(now)));
                if checked.is_err() {
                    log::error!("pg-model-repo: the watchdog's check of a connection panicked");
                }
            }
            drop(live);
            std::thread::sleep(TICK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::connection_cut_in;

    #[test]
    fn an_armed_connection_nobody_waits_on_is_never_cut() {
        let watch = Watch::new();
        // Armed, but nobody polls: the caller is busy elsewhere.
        watch.arm(Duration::from_millis(100));
        std::thread::sleep(Duration::from_millis(400));
        assert!(!watch.fired());
        watch.disarm();
        assert!(!watch.fired());
    }

    #[test]
    fn the_hard_deadline_cuts_an_armed_connection() {
        let watch = Watch::new();
        watch.arm(Duration::from_secs(60));
        watch.cut_at(Instant::now() + Duration::from_millis(100));
        std::thread::sleep(Duration::from_millis(400));
        assert!(watch.fired());
        let e = watch.0.expired().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("deadline"), "{e}");
        let io = watch.0.expired().unwrap();
        assert!(connection_cut_in(&io).is_some());
    }
}
