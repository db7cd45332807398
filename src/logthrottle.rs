//! A rate limit on repeated log lines. One client can provoke thousands of refusals a second,
//! and a log line for each would turn its flood into a flood of the operator's disk: past a few
//! lines a second for one key (a refusal reason), lines are counted instead of written, and one
//! summary line says how many were left out. It is emitted before the next line that is
//! written, or by a periodic [`LogThrottle::flush`] once the flood has stopped. Counters
//! (`refusals_total`) never go through here, so they stay exact.
//!
//! Lock-free: a key's window (whole seconds since start) and the lines written in it share one
//! atomic word, and the suppressed count is another, taken whole by whoever writes its
//! summary, so every suppressed line is summarised exactly once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Refusal lines written per reason per second; the rest are summarised. Enough to see what
/// is being refused and by whom, and at most 160 lines a second over all 16 reasons.
pub const REFUSAL_LINES_PER_SECOND: u32 = 10;

/// Per-key line budgets.
pub struct LogThrottle {
    keys: &'static [&'static str],
    per_second: u32,
    slots: Box<[Slot]>,
    epoch: Instant,
}

#[derive(Default)]
struct Slot {
    /// Window (second) in the high 32 bits, lines written in it in the low 32.
    window: AtomicU64,
    /// Lines left out since the last summary.
    suppressed: AtomicU64,
}

/// Whether to write a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it, after a summary of the lines left out before it when that is not 0.
    Write {
        /// Lines of this key left out since the last summary.
        suppressed_before: u64,
    },
    /// Leave it out (it is counted for the next summary).
    Suppress,
}

impl LogThrottle {
    /// Budgets of `per_second` lines for each of `keys`.
    pub fn new(keys: &'static [&'static str], per_second: u32) -> LogThrottle {
        LogThrottle { keys, per_second, slots: keys.iter().map(|_| Slot::default()).collect(), epoch: Instant::now() }
    }

    /// Decides for one line of `key` at `now` (whole seconds on a monotonic clock). A key
    /// not in the list is always written: thinning the log must never hide something new.
    pub fn check_at(&self, key: &str, now: u64) -> Verdict {
        let Some(slot) = self.keys.iter().position(|k| *k == key).map(|i| &self.slots[i]) else {
            return Verdict::Write { suppressed_before: 0 };
        };
        let now = now.min(u64::from(u32::MAX));
        let mut cur = slot.window.load(Ordering::Acquire);
        loop {
            let (window, written) = (cur >> 32, cur & u64::from(u32::MAX));
            // A caller that read the clock just before another moved the window counts in the
            // newer window rather than moving it back.
            let (next, opens) = if now > window {
                ((now << 32) | 1, true)
            } else if written < u64::from(self.per_second) {
                (cur + 1, false)
            } else {
                slot.suppressed.fetch_add(1, Ordering::AcqRel);
                return Verdict::Suppress;
            };
            match slot.window.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let suppressed_before = if opens { slot.suppressed.swap(0, Ordering::AcqRel) } else { 0 };
                    return Verdict::Write { suppressed_before };
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Takes the suppressed counts owed a summary: those of keys whose window is over before
    /// `now` (a flood that stopped), or of every key when `all` (shutdown).
    pub fn take_at(&self, now: u64, all: bool) -> Vec<(&'static str, u64)> {
        let mut owed = Vec::new();
        for (key, slot) in self.keys.iter().zip(self.slots.iter()) {
            let over = slot.window.load(Ordering::Acquire) >> 32 < now;
            if (all || over) && slot.suppressed.load(Ordering::Acquire) > 0 {
                let n = slot.suppressed.swap(0, Ordering::AcqRel);
                if n > 0 {
                    owed.push((*key, n));
                }
            }
        }
        owed
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Whether to write a refusal line for `reason` now; writes the summary owed before it.
    pub fn allow(&self, reason: &'static str) -> bool {
        match self.check_at(reason, self.now()) {
            Verdict::Write { suppressed_before } => {
                summarise(reason, suppressed_before);
                true
            }
            Verdict::Suppress => false,
        }
    }

    /// Writes the summaries owed for floods that have stopped (every key's when `all`).
    pub fn flush(&self, all: bool) {
        for (reason, n) in self.take_at(self.now(), all) {
            summarise(reason, n);
        }
    }
}

fn summarise(reason: &'static str, suppressed: u64) {
    if suppressed > 0 {
        tracing::info!(reason, suppressed, "refusal lines not logged (log rate limit); all are counted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const KEYS: &[&str] = &["a", "b"];

    fn written(n: u64) -> Verdict {
        Verdict::Write { suppressed_before: n }
    }

    #[test]
    fn lines_per_window_then_a_summary_with_the_exact_count() {
        let t = LogThrottle::new(KEYS, 3);
        let at0: Vec<Verdict> = (0..6).map(|_| t.check_at("a", 0)).collect();
        assert_eq!(at0, [written(0), written(0), written(0), Verdict::Suppress, Verdict::Suppress, Verdict::Suppress]);
        assert_eq!(t.check_at("b", 0), written(0), "keys have their own budgets");
        assert_eq!(t.take_at(0, false), [], "window 0 is not over at 0");
        // The next second's first line carries the summary; its budget is full again.
        assert_eq!(t.check_at("a", 1), written(3));
        assert_eq!(t.check_at("a", 1), written(0));
        assert_eq!(t.check_at("a", 1), written(0));
        assert_eq!(t.check_at("a", 1), Verdict::Suppress);
        assert_eq!(t.check_at("a", 1), Verdict::Suppress);
        // The flood stops: the tick summarises once the window is over, once.
        assert_eq!(t.take_at(1, false), []);
        assert_eq!(t.take_at(2, false), [("a", 2)]);
        assert_eq!(t.take_at(9, false), []);
        assert_eq!(t.check_at("a", 7), written(0), "nothing owed after the tick's summary");
        // A late caller (clock read before the window moved) counts in the newer window.
        assert_eq!(t.check_at("a", 6), written(0));
        assert_eq!(t.check_at("a", 6), written(0));
        assert_eq!(t.check_at("a", 7), Verdict::Suppress);
        assert_eq!(t.take_at(7, true), [("a", 1)], "shutdown takes what is owed at once");
        assert_eq!(t.check_at("unknown", 7), written(0), "an unknown key is always written");
    }

    #[test]
    fn concurrent_callers_lose_no_count() {
        let t = Arc::new(LogThrottle::new(KEYS, 10));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    let (mut lines, mut summarised) = (0u64, 0u64);
                    for i in 0..20_000u64 {
                        if let Verdict::Write { suppressed_before } = t.check_at("a", i / 1000) {
                            lines += 1;
                            summarised += suppressed_before;
                        }
                    }
                    (lines, summarised)
                })
            })
            .collect();
        let (mut lines, mut summarised) = (0, 0);
        for th in threads {
            let (l, s) = th.join().unwrap();
            lines += l;
            summarised += s;
        }
        let rest: u64 = t.take_at(u64::MAX, true).iter().map(|(_, n)| n).sum();
        assert!(lines <= 10 * 20, "at most the budget per window: {lines}");
        assert_eq!(lines + summarised + rest, 80_000, "every line written or summarised, once");
    }
}
