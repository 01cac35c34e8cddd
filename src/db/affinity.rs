//! Thread-affine parking in front of the pool, after HikariCP's ConcurrentBag: a thread that
//! returns a connection parks it in its own slot, and its next checkout takes it back without
//! touching the pool's shared mutex and condition variable. The same backend stays with the
//! same thread (warm caches, and on a small machine the scheduler keeps the pair together);
//! a thread that finds nothing free may take a connection parked by another.
//!
//! This module only keeps the slots; the pool (`db::pool`) decides what may be parked and when.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::db::shard::{thread_index, Padded};

/// Slots per pool: threads map onto them by [`thread_index`]; two live threads that share a
/// slot only lose some affinity (the second finds it taken and returns its connection to the
/// pool).
pub(crate) const SLOTS: usize = 64;

/// One thread's parked item.
#[derive(Debug)]
struct Slot<T> {
    /// A hint for stealers, so that they lock only slots that hold something.
    occupied: AtomicBool,
    state: Mutex<State<T>>,
}

#[derive(Debug)]
struct State<T> {
    parked: Option<T>,
    /// A sweep saw the item parked: the next sweep takes it if it is still there.
    swept: bool,
    /// The slots were closed: nothing is parked any more.
    closed: bool,
}

impl<T> Slot<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Option<T> {
        let mut state = self.lock();
        let item = state.parked.take();
        if item.is_some() {
            self.occupied.store(false, Ordering::Relaxed);
        }
        item
    }
}

/// The parking slots of one pool.
#[derive(Debug)]
pub(crate) struct Slots<T> {
    slots: Box<[Padded<Slot<T>>]>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        let slot = || {
            Padded(Slot {
                occupied: AtomicBool::new(false),
                state: Mutex::new(State {
                    parked: None,
                    swept: false,
                    closed: false,
                }),
            })
        };
        Slots {
            slots: (0..SLOTS).map(|_| slot()).collect(),
        }
    }
}

impl<T> Slots<T> {
    /// The calling thread's slot.
    fn home(&self) -> usize {
        thread_index() % self.slots.len()
    }

    /// Parks `item` in the calling thread's slot, or gives it back when the slot is taken or
    /// the slots are closed.
    pub(crate) fn park(&self, item: T) -> Result<(), T> {
        let slot = &self.slots[self.home()];
        let mut state = slot.lock();
        if state.closed || state.parked.is_some() {
            return Err(item);
        }
        state.parked = Some(item);
        state.swept = false;
        slot.occupied.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// What the calling thread parked, if it is still there.
    pub(crate) fn take_own(&self) -> Option<T> {
        let slot = &self.slots[self.home()];
        if !slot.occupied.load(Ordering::Relaxed) {
            return None;
        }
        slot.take()
    }

    /// Any parked item, looking at the calling thread's slot first and then at the others in
    /// turn (each thread starting from its own, so that stealers spread out).
    pub(crate) fn take_any(&self) -> Option<T> {
        let home = self.home();
        let n = self.slots.len();
        (0..n)
            .map(|i| &self.slots[(home + i) % n])
            .filter(|slot| slot.occupied.load(Ordering::Relaxed))
            .find_map(|slot| slot.take())
    }

    /// Items parked since before the previous sweep: their threads have not come back for
    /// them (idle, or gone), so they return to the pool, which ages and closes idle
    /// connections.
    pub(crate) fn sweep(&self) -> Vec<T> {
        let mut stale = Vec::new();
        for slot in self.slots.iter() {
            if !slot.occupied.load(Ordering::Relaxed) {
                continue;
            }
            let mut state = slot.lock();
            if state.parked.is_some() && state.swept {
                stale.extend(state.parked.take());
                slot.occupied.store(false, Ordering::Relaxed);
            } else {
                state.swept = true;
            }
        }
        stale
    }

    /// Closes every slot (nothing is parked from now on) and returns what was parked.
    pub(crate) fn close(&self) -> Vec<T> {
        let mut parked = Vec::new();
        for slot in self.slots.iter() {
            let mut state = slot.lock();
            state.closed = true;
            parked.extend(state.parked.take());
            slot.occupied.store(false, Ordering::Relaxed);
        }
        parked
    }

    /// Items parked right now.
    pub(crate) fn parked(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.occupied.load(Ordering::Relaxed))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_takes_back_what_it_parked_and_others_may_steal_it() {
        let slots = Slots::default();
        assert_eq!(slots.park(1), Ok(()));
        // One item per slot: a second one is handed back.
        assert_eq!(slots.park(2), Err(2));
        assert_eq!(slots.parked(), 1);
        assert_eq!(slots.take_own(), Some(1));
        assert_eq!(slots.take_own(), None);

        slots.park(3).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                assert_eq!(slots.take_own(), None);
                assert_eq!(slots.take_any(), Some(3));
            });
        });
        assert_eq!(slots.parked(), 0);
    }

    #[test]
    fn a_sweep_returns_only_what_sat_through_the_previous_one() {
        let slots = Slots::default();
        slots.park(1).unwrap();
        assert!(slots.sweep().is_empty());
        // Taken back and parked again between two sweeps: still in use.
        let item = slots.take_own().unwrap();
        slots.park(item).unwrap();
        assert!(slots.sweep().is_empty());
        assert_eq!(slots.sweep(), vec![1]);
        assert_eq!(slots.parked(), 0);
    }

    #[test]
    fn closed_slots_return_what_they_held_and_refuse_more() {
        let slots = Slots::default();
        slots.park(1).unwrap();
        assert_eq!(slots.close(), vec![1]);
        assert_eq!(slots.park(2), Err(2));
        assert_eq!(slots.take_any(), None);
    }
}
