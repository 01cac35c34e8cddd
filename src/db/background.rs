//! The repository's background thread (the reaper): one named thread that, every
//! `reaper_interval`, runs the chores the features and the handle registered (write buffered
//! access counts, delete expired cache rows, sweep leftovers), in order; stopped and joined by
//! the last clone's close. A stop is seen between any two chores, a chore's checkouts give up
//! once the pool is closing, and the close cuts a statement in flight, so stopping is quick
//! whatever the server's state.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, tick, Receiver, Sender, TryRecvError};

use crate::db::pool::Pool;
use crate::error::{RepoError, Result};

/// Work done by the background thread at each tick.
pub(crate) trait Chore: Send + Sync {
    /// What it does, for the log ("delete expired cache rows").
    fn what(&self) -> &'static str;

    /// One tick's work, without retries (the next tick is the retry): how many rows it
    /// touched. `stopping` turns true when the repository closes; long work checks it.
    fn work(&self, pool: &Pool, stopping: &dyn Fn() -> bool) -> Result<u64>;
}

/// The handle the repository keeps: dropping the shutdown sender is the stop signal.
#[derive(Debug)]
pub(crate) struct Reaper {
    shutdown: Option<Sender<()>>,
    wake: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    /// Starts the thread with `chores`, run in order at every tick; [`wake`](Self::wake) runs
    /// `urgent` alone, soon. The thread holds a pool clone and the chores, never the
    /// repository, so it cannot keep the repository alive.
    pub(crate) fn start(
        pool: Pool,
        chores: Vec<Arc<dyn Chore>>,
        urgent: Arc<dyn Chore>,
        interval: Duration,
    ) -> Result<Self> {
        let (shutdown, shutdown_rx) = bounded::<()>(0);
        // One pending wake-up is enough: it asks for a run of `urgent` by then.
        let (wake, wake_rx) = bounded::<()>(1);
        let task = Task {
            pool,
            chores,
            urgent,
            shutdown: shutdown_rx,
        };
        let thread = std::thread::Builder::new()
            .name("pg-model-repo-reaper".to_owned())
            .spawn(move || task.run_until_stopped(interval, wake_rx))
            .map_err(RepoError::Io)?;
        Ok(Reaper {
            shutdown: Some(shutdown),
            wake,
            thread: Some(thread),
        })
    }

    /// Asks for an early run of the urgent chore (never blocks).
    pub(crate) fn wake(&self) {
        let _ = self.wake.try_send(());
    }

    /// Stops the thread and waits for it: it is either waiting (and leaves at once) or in the
    /// middle of a chore (and leaves after it).
    pub(crate) fn stop(&mut self) {
        drop(self.shutdown.take());
        if let Some(thread) = self.thread.take() {
            let started = Instant::now();
            if thread.join().is_err() {
                log::error!("pg-model-repo: the background reaper thread panicked");
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
    chores: Vec<Arc<dyn Chore>>,
    urgent: Arc<dyn Chore>,
    shutdown: Receiver<()>,
}

impl Task {
    fn run_until_stopped(self, interval: Duration, wake: Receiver<()>) {
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
                    Ok(()) => self.run_chore(self.urgent.as_ref()),
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

    /// One tick: every chore in order, unless a stop comes first.
    fn tick(&self) {
        for chore in &self.chores {
            if self.stopping() {
                return;
            }
            self.run_chore(chore.as_ref());
        }
    }

    /// Runs one chore; errors go to the log (the next tick tries again).
    fn run_chore(&self, chore: &dyn Chore) {
        let started = Instant::now();
        match chore.work(&self.pool, &|| self.stopping()) {
            Ok(0) => {}
            Ok(n) => log::debug!(
                "pg-model-repo: reaper: {} touched {n} rows in {:?}",
                chore.what(),
                started.elapsed()
            ),
            // The close does what is left.
            Err(e) if self.stopping() => {
                log::debug!("pg-model-repo: reaper stopped during {}: {e}", chore.what())
            }
            Err(e) => log::warn!("pg-model-repo: reaper failed to {}: {e}", chore.what()),
        }
    }
}
