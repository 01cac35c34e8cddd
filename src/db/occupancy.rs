//! How many of a pool's connections are open and how many are checked out, in one atomic word
//! (one load is a consistent snapshot), the checkouts that timed out, and the facade's gauges
//! of the same (moved by the same events).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::{Clock, Metrics};

/// One open connection in the packed word (the checked-out count is the low half).
const OPEN: u64 = 1 << 32;

/// Open and checked-out connections of one pool, and its checkouts that timed out.
#[derive(Debug)]
pub(crate) struct Occupancy {
    /// `open << 32 | in_use`: a connection is checked out only while it is open, so a single
    /// load never shows more in use than open.
    packed: AtomicU64,
    timeouts: AtomicU64,
    metrics: Metrics,
}

impl Occupancy {
    pub(crate) fn new(metrics: Metrics) -> Self {
        Occupancy {
            packed: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            metrics,
        }
    }

    /// A pooled connection was opened.
    pub(crate) fn opened(&self) {
        self.packed.fetch_add(OPEN, Ordering::AcqRel);
        self.metrics.connections(1.0, 0.0);
    }

    /// A pooled connection was closed (it was idle: a checked-out one is returned first).
    pub(crate) fn closed(&self) {
        self.packed.fetch_sub(OPEN, Ordering::AcqRel);
        self.metrics.connections(-1.0, 0.0);
    }

    /// A connection was handed to a caller.
    pub(crate) fn checked_out(&self) {
        self.packed.fetch_add(1, Ordering::AcqRel);
        self.metrics.connections(-1.0, 1.0);
    }

    /// A caller gave its connection back.
    pub(crate) fn returned(&self) {
        self.packed.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections(1.0, -1.0);
    }

    /// A checkout that started at `clock` got its connection.
    pub(crate) fn waited(&self, clock: Clock) {
        self.metrics.checkout(clock);
    }

    /// A thread starts (`true`) or stops (`false`) waiting for a connection.
    pub(crate) fn waiting(&self, starts: bool) {
        self.metrics.waiting(if starts { 1.0 } else { -1.0 });
    }

    /// A checkout ran past its bound.
    pub(crate) fn timed_out(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
        self.metrics.checkout_timed_out();
    }

    /// (open, checked out) right now.
    pub(crate) fn snapshot(&self) -> (u32, u32) {
        split(self.packed.load(Ordering::Acquire))
    }

    /// Checkouts that timed out since the pool was built.
    pub(crate) fn timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// (open, checked out) from the packed word.
fn split(packed: u64) -> (u32, u32) {
    ((packed >> 32) as u32, packed as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_and_checked_out_connections_add_up_over_threads() {
        let o = Occupancy::new(Metrics::new("t"));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    o.opened();
                    for _ in 0..1000 {
                        o.checked_out();
                        let (open, used) = o.snapshot();
                        assert!(used <= open && used >= 1);
                        o.returned();
                    }
                });
            }
        });
        assert_eq!(o.snapshot(), (4, 0));
        o.closed();
        o.timed_out();
        assert_eq!((o.snapshot(), o.timeouts()), ((3, 0), 1));
    }
}
