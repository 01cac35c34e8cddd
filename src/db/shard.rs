//! Per-thread shards: each thread works on its own cache line of a value that many threads
//! update (timings, access counters), and readers combine the shards. Two threads touching one
//! mutex or atomic on every call hand its cache line back and forth, and block each other.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The most shards a value is split into.
const MAX_SHARDS: usize = 8;

/// A value aligned to its own cache line pair (adjacent-line prefetching pulls lines in twos),
/// so that neighbours in an array never share one.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A small number unique to the calling thread while it lives, handed out in the order threads
/// first ask: consecutive threads get different shards and different affinity slots.
pub(crate) fn thread_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|i| *i)
}

/// How many shards: one per CPU up to [`MAX_SHARDS`] (more threads than CPUs cannot all run
/// at once, so they rarely meet on a shard).
fn shard_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(MAX_SHARDS, |n| n.get())
            .clamp(1, MAX_SHARDS)
    })
}

/// One `T` per shard; a thread always uses the same one.
#[derive(Debug)]
pub(crate) struct Sharded<T> {
    shards: Box<[Padded<T>]>,
}

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Sharded {
            shards: (0..shard_count()).map(|_| Padded(T::default())).collect(),
        }
    }
}

impl<T> Sharded<T> {
    /// The calling thread's shard.
    pub(crate) fn local(&self) -> &T {
        &self.shards[thread_index() % self.shards.len()]
    }

    /// Every shard, for readers that combine them.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.shards.iter().map(|s| &s.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_index_and_threads_differ() {
        let mine = thread_index();
        assert_eq!(thread_index(), mine);
        let other = std::thread::spawn(thread_index).join().unwrap();
        assert_ne!(other, mine);
    }

    #[test]
    fn shards_are_padded_apart() {
        let s: Sharded<std::sync::atomic::AtomicU64> = Sharded::default();
        let addresses: Vec<usize> = s.iter().map(|a| a as *const _ as usize).collect();
        for pair in addresses.windows(2) {
            assert!(pair[1] - pair[0] >= 128);
        }
        assert!(std::ptr::eq(s.local(), s.local()));
    }
}
