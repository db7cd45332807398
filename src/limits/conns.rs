//! Concurrent-tunnel caps. A permit is an RAII value: dropping it (normal close, error,
//! reset, timeout, panic in the tunnel task, shutdown) gives the slot back, so a count can
//! never leak.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Taken slots under a ceiling that can change at run time (reload): a semaphore whose size
/// is given at each acquire, so a reload moves it without touching the slots already out.
#[derive(Debug, Default)]
pub struct Slots {
    active: AtomicU32,
}

impl Slots {
    /// Takes a slot if fewer than `cap` are taken (`None` = no ceiling).
    pub fn try_acquire(self: &Arc<Self>, cap: Option<u32>) -> Option<Slot> {
        let mut cur = self.active.load(Ordering::Relaxed);
        loop {
            if cap.is_some_and(|c| cur >= c) {
                return None;
            }
            match self.active.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Slot(Arc::clone(self))),
                Err(now) => cur = now,
            }
        }
    }

    /// Slots taken now.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

/// One taken slot of [`Slots`].
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_release_on_drop_and_caps_can_move() {
        let g = Arc::new(Slots::default());
        let a = g.try_acquire(Some(2)).unwrap();
        let _b = g.try_acquire(Some(2)).unwrap();
        assert!(g.try_acquire(Some(2)).is_none());
        assert!(g.try_acquire(Some(3)).is_some(), "a raised cap admits at once");
        assert!(g.try_acquire(Some(1)).is_none(), "a lowered cap admits nobody new");
        drop(a);
        assert_eq!(g.active(), 1);
        assert!(g.try_acquire(None).is_some());
    }
}
