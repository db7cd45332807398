//! What the tunnels of one scope share, and a tunnel's draw on it.
//!
//! A [`Pool`] is one scope's slots and byte budgets: a client's, a client's on one route, or
//! everyone's. The backend makes pools and keeps their limits current (the local backend from
//! the configuration, a cluster backend from its grants); a [`Throttle`] only draws on the
//! pools its tunnel was admitted to. That keeps the relay's per-chunk path to a few atomic
//! loads and, when a budget binds, one wait, whichever backend answers.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::bandwidth::{self, Bucket};
use super::conns::Slots;
use super::{Direction, Scope};
use crate::config::ByteRate;

/// One scope's slots and byte budgets, shared by the tunnels it covers.
#[derive(Default)]
pub struct Pool {
    /// Tunnels holding a slot; also how many share the byte budgets (chunk sizing).
    pub(super) tunnels: Arc<Slots>,
    /// Byte budgets, by [`Direction`].
    pub(super) buckets: [Bucket; 2],
    /// When a tunnel last drew on this pool ([`now_ms`]): the sweep forgets quiet pools.
    pub(super) last_used_ms: AtomicU64,
}

impl Pool {
    /// A pool whose byte budgets spend only credit put in from outside ([`Bucket::fed`]):
    /// a cluster backend's per-client pools, fed with grants from Redis.
    pub(super) fn fed() -> Pool {
        Pool { buckets: [Bucket::fed(), Bucket::fed()], ..Pool::default() }
    }

    /// Sets both directions' rates.
    pub(super) fn set_rates(&self, up: Option<ByteRate>, down: Option<ByteRate>) {
        self.buckets[Direction::Up.index()].set_rate(up);
        self.buckets[Direction::Down.index()].set_rate(down);
    }

    /// The rate in force for `dir`, if any.
    pub fn rate(&self, dir: Direction) -> Option<ByteRate> {
        self.buckets[dir.index()].rate()
    }

    pub(super) fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// Milliseconds since the limits' clock origin ([`bandwidth::epoch`]): a clock cheap enough
/// to stamp per chunk.
pub(super) fn now_ms() -> u64 {
    bandwidth::epoch().elapsed().as_millis() as u64
}

/// The pools a tunnel draws on, by [`Scope`]: its client's, its route's (when the route has
/// limits), and the global one.
pub(super) type Pools = [Option<Arc<Pool>>; 3];

/// Time a chunk spent waiting, by scope.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Waited(pub [std::time::Duration; 3]);

/// One direction's draw on its tunnel's pools.
pub struct Throttle {
    pools: Pools,
    dir: Direction,
    /// Bytes not yet charged (less than a cell), so small writes are charged exactly overall.
    carry: u64,
    /// The rates [`Throttle::max_chunk`] read for the chunk now in flight, so its wait uses
    /// the same ones.
    seen: Cell<Option<[Option<ByteRate>; 3]>>,
}

impl Throttle {
    pub(super) fn new(pools: Pools, dir: Direction) -> Throttle {
        Throttle { pools, dir, carry: 0, seen: Cell::new(None) }
    }

    fn rates(&self) -> [Option<ByteRate>; 3] {
        let d = self.dir;
        [0, 1, 2].map(|i| self.pools[i].as_ref().and_then(|p| p.rate(d)))
    }

    /// Largest chunk the relay should read, or `None` when no budget applies.
    pub fn max_chunk(&self) -> Option<usize> {
        let rates = self.rates();
        self.seen.set(Some(rates));
        // The tunnel counts are read only for a budget that applies: an unthrottled tunnel
        // asks this per chunk, and the global count's cache line is written by every admission.
        rates
            .into_iter()
            .zip(&self.pools)
            .filter_map(|(r, p)| Some(bandwidth::chunk_for(r?, p.as_ref()?.tunnels.active())))
            .min()
    }

    /// Waits until `n` bytes may pass: client budget, then route, then global.
    pub async fn wait(&mut self, n: usize) -> Waited {
        let mut waited = Waited::default();
        let rates = self.seen.take().unwrap_or_else(|| self.rates());
        if rates.iter().all(Option::is_none) {
            self.carry = 0;
            return waited;
        }
        let total = self.carry + n as u64;
        self.carry = total % bandwidth::CELL;
        let cells = u32::try_from(total / bandwidth::CELL).unwrap_or(u32::MAX);
        if cells == 0 {
            return waited;
        }
        let d = self.dir.index();
        for scope in Scope::ALL {
            let i = scope as usize;
            if let (Some(rate), Some(pool)) = (rates[i], &self.pools[i]) {
                waited.0[i] = pool.buckets[d].take(Some(rate), cells).await;
            }
        }
        if let Some(client) = &self.pools[Scope::Client as usize] {
            client.touch();
        }
        waited
    }
}
