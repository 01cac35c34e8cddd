//! The background reaper: one named thread per repository that, every `reaper_interval`,
//! flushes buffered access counts (cache hits, model loads) and deletes expired cache rows;
//! stopped and joined by the last clone's `close()` or drop. A stop is seen between any two
//! steps, its checkouts give up once the pool is closing, and the close cuts a statement it
//! has in flight, so stopping it is quick whatever the server's state.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, tick, Receiver, Sender, TryRecvError};

use crate::cache::purge_expired;
use crate::schema::citus::Layout;
use crate::monitor::counters::{AccessCounts, Flush};
use crate::db::pool::Pool;
use crate::db::retry::Retry;
use crate::schema::sweep::{sweep, Leftover, LEFTOVER_AGE};
use crate::error::{RepoError, Result};

/// The handle the repository keeps: dropping the shutdown sender is the stop signal.
#[derive(Debug)]
pub(crate) struct Reaper {
    shutdown: Option<Sender<()>>,
    wake: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    /// Starts the thread. It holds a pool clone and the access counters, never the
    /// repository, so it cannot keep the repository alive.
    pub(crate) fn start(
        pool: Pool,
        counts: Arc<AccessCounts>,
        leftovers: &'static [Leftover],
        layout: Layout,
        interval: Duration,
    ) -> Result<Self> {
        let (shutdown, shutdown_rx) = bounded::<()>(0);
        // One pending wake-up is enough: it asks for a flush of whatever is buffered by then.
        let (wake, wake_rx) = bounded::<()>(1);
        let task = Task {
            pool,
            counts,
            leftovers,
            layout,
            shutdown: shutdown_rx,
        };
        let thread = std::thread::Builder::new()
            .name("pg-model-repo-reaper".to_owned())
            .spawn(move || task.run(interval, wake_rx))
            .map_err(RepoError::Io)?;
        Ok(Reaper {
            shutdown: Some(shutdown),
            wake,
            thread: Some(thread),
        })
    }

    /// Asks for an early flush of the hit buffer (never blocks).
    pub(crate) fn wake(&self) {
        let _ = self.wake.try_send(());
    }

    /// Stops the thread and waits for it: it is either waiting (and leaves at once) or in the
    /// middle of a batch (and leaves after it).
    pub(crate) fn stop(&mut self) {
        drop(self.shutdown.take());
        if let Some(thread) = self.thread.take() {
            let started = Instant::now();
            if thread.join().is_err() {
                log::error!("pg-model-repo: the cache reaper thread panicked");
            }
            log::debug!("pg-model-repo: reaper stopped in {:?}", started.elapsed());
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the thread owns.
struct Task {
    pool: Pool,
    counts: Arc<AccessCounts>,
    leftovers: &'static [Leftover],
    layout: Layout,
    shutdown: Receiver<()>,
}

impl Task {
    fn run(self, interval: Duration, wake: Receiver<()>) {
        log::debug!("pg-model-repo: reaper started, every {interval:?}");
        let ticker = tick(interval);
        loop {
            // `select!` picks at random among ready channels: the stop is checked first.
            if self.stopping() {
                break;
            }
            select! {
                recv(ticker) -> _ => self.tick(),
                recv(wake) -> msg => match msg {
                    Ok(()) => self.flush(),
                    Err(_) => break,
                },
                // Nothing is ever sent: a disconnect (the sender dropped) is the signal.
                recv(self.shutdown) -> _ => break,
            }
        }
        log::debug!("pg-model-repo: reaper leaving");
    }

    fn stopping(&self) -> bool {
        !matches!(self.shutdown.try_recv(), Err(TryRecvError::Empty))
    }

    /// One tick: hit counts first (so they land before their rows may expire), then expiry.
    fn tick(&self) {
        if self.stopping() {
            return;
        }
        self.flush();
        if self.stopping() {
            return;
        }
        let started = Instant::now();
        // No retry loop inside a tick: the next tick is the retry, and a stop request is not
        // kept waiting by backoff sleeps while the database is away.
        match purge_expired(&self.pool, self.layout, Retry::Never, &|| self.stopping()) {
            Ok(0) => {}
            Ok(n) => log::debug!(
                "pg-model-repo: reaper deleted {n} expired cache rows in {:?}",
                started.elapsed()
            ),
            Err(e) if self.stopping() => {
                log::debug!("pg-model-repo: reaper stopped while deleting expired rows: {e}")
            }
            Err(e) => log::warn!("pg-model-repo: reaper failed to delete expired rows: {e}"),
        }
        if !self.stopping() {
            // Errors are logged inside; the next tick tries again.
            let _ = sweep(&self.pool, self.leftovers, LEFTOVER_AGE, Retry::Never);
        }
    }

    fn flush(&self) {
        match self.counts.flush(&self.pool, Flush::Background) {
            Ok(()) => {}
            // The close flushes what is left.
            Err(e) if self.stopping() => {
                log::debug!("pg-model-repo: reaper stopped while flushing access counts: {e}")
            }
            Err(e) => {
                log::warn!("pg-model-repo: reaper failed to flush buffered access counts: {e}")
            }
        }
    }
}
