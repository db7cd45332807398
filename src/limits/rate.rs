//! Events per second per client, governor's keyed GCRA with a burst: new tunnels, and
//! authentication attempts that need a hash.
//!
//! Governor quotas are immutable, so a reload that changes the rate builds a new limiter
//! (every client starts with a full burst again); a reload that keeps it keeps the state.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};

use super::ClientKey;

struct Keyed {
    per_second: NonZeroU32,
    burst: NonZeroU32,
    limiter: DefaultKeyedRateLimiter<ClientKey>,
}

/// One per-client rate limiter (absent when not configured).
#[derive(Default)]
pub struct KeyedRate {
    current: ArcSwapOption<Keyed>,
}

impl KeyedRate {
    /// Applies `per_second`/`burst` from the config; keeps state when they are unchanged.
    pub fn configure(&self, per_second: Option<NonZeroU32>, burst: Option<NonZeroU32>) {
        let Some(per_second) = per_second else {
            self.current.store(None);
            return;
        };
        let burst = burst.unwrap_or(per_second);
        if let Some(cur) = self.current.load().as_ref() {
            if cur.per_second == per_second && cur.burst == burst {
                return;
            }
        }
        let quota = Quota::per_second(per_second).allow_burst(burst);
        self.current.store(Some(Arc::new(Keyed {
            per_second,
            burst,
            limiter: DefaultKeyedRateLimiter::dashmap(quota),
        })));
    }

    /// Counts one event for `key`; `Err` says how long until the next is allowed.
    pub fn check(&self, key: &ClientKey) -> Result<(), Duration> {
        let guard = self.current.load();
        let Some(k) = guard.as_ref() else {
            return Ok(());
        };
        k.limiter.check_key(key).map_err(|not_until| not_until.wait_time_from(k.limiter.clock().now()))
    }

    /// Drops keys whose state equals a fresh one; returns the keys left.
    pub fn sweep(&self) -> usize {
        let guard = self.current.load();
        let Some(k) = guard.as_ref() else { return 0 };
        k.limiter.retain_recent();
        k.limiter.shrink_to_fit();
        k.limiter.len()
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.current.load().as_ref().map_or(0, |k| k.limiter.len())
    }
}
