//! Byte budgets: a [`Bucket`] is one shared budget (a client's uploads, say, or the global
//! downstream), drawn from by every tunnel it covers.
//!
//! The rate arithmetic is GCRA (the virtual-scheduling form of a token bucket), counted in
//! 1 KiB cells, because byte-sized cells lose precision to whole-nanosecond periods at high
//! rates. A draw that must wait *reserves*: one compare-and-swap moves the bucket's
//! theoretical arrival time on by the draw's cells and tells the draw when they are due, and
//! the draw sleeps until then. Fairness comes from that order: the tunnels of one client are
//! served chunk by chunk in the order they asked, never racing for wake-ups, and a tunnel that
//! sends less simply takes shorter turns (max-min fairness). Waiting is a timer sleep, never a
//! spin, and every such sleep ends on a shared [`TICK`].
//!
//! Reserving replaced a FIFO lock held while sleeping: with the lock, every chunk woke two
//! tasks (the one whose cells were due, then the next in line only to start its own timer),
//! and 100 clients of two tunnels cost about a third more CPU per byte than 100 clients of
//! one tunnel moving the same chunks (docs/benchmarks/2026-11-30-throttle-scale.md).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

use crate::config::ByteRate;

/// Size of one cell of the rate arithmetic.
pub const CELL: u64 = 1024;

/// Largest chunk a throttled tunnel moves at once: the splice relay's pipe (the copy relays
/// clamp it to their buffers).
pub const MAX_CHUNK: usize = 256 * 1024;

/// Smallest receive buffer given to a throttled socket.
pub const MIN_RCVBUF: usize = 16 * 1024;
/// Budgets whose 1/16 s exceeds this leave the kernel's buffer autotuning alone.
pub const AUTOTUNE_ABOVE: usize = 4 << 20;

/// Chunk size for a rate that `sharers` tunnels draw on: a turn is at most 1/8 s of the
/// rate, and a round of every sharer's turn about 1/4 s; between one cell and
/// [`MAX_CHUNK`].
///
/// What a throttled byte costs is set by the chunk: each chunk is a read, a wait on the
/// bucket (a lock, a timer, a wake-up) and a write, whatever its size, and on loopback most
/// of a write's cost is per segment. At 4 ms of budget a chunk was 4 KiB at 1 MiB/s and 100
/// throttled clients made 25,000 chunks a second: ten times the CPU per byte of an
/// unthrottled tunnel. Sizing a round by time keeps many tunnels of one client taking turns
/// four times a second (fair well within a second), and the 1/8 s cap keeps the overshoot
/// bound (one chunk per tunnel) and the granularity of a client's rate over a few seconds
/// within about 2%.
pub fn chunk_for(rate: ByteRate, sharers: u32) -> usize {
    let bps = rate.bytes_per_sec();
    let c = (bps / 8).min(bps / (4 * u64::from(sharers.max(1)))) / CELL * CELL;
    usize::try_from(c).unwrap_or(MAX_CHUNK).clamp(CELL as usize, MAX_CHUNK)
}

/// Burst in cells: 100 ms of the rate, but at least the largest chunk (a lone tunnel's), a
/// [`TICK`] of the rate and a cell of carry, so any chunk can pass, a short transfer is not
/// all burst, and a draw that wakes up to a tick after its cells were due has lost none of
/// them (a bucket holds at most its burst).
fn burst_cells(rate: ByteRate) -> u32 {
    let tenth = rate.bytes_per_sec() / 10 / CELL;
    let tick = u64::try_from(u128::from(rate.bytes_per_sec()) * TICK.as_nanos() / 1_000_000_000).unwrap_or(u64::MAX);
    let chunk = chunk_for(rate, 1) as u64 / CELL + tick.div_ceil(CELL) + 1;
    u32::try_from(tenth.max(chunk)).unwrap_or(u32::MAX)
}

/// Every throttled wait ends on a tick of this length, counted from one process-wide epoch.
///
/// A throttled chunk costs far more CPU than the same bytes moved by a busy tunnel, because
/// each one is a wake-up from idle: the timer, a worker thread leaving its sleep, cold caches,
/// and the peers the chunk wakes in turn. Two hundred tunnels whose waits end at scattered
/// instants wake the proxy a thousand times a second for one chunk each; ending every wait on
/// a shared tick lets one wake-up move every chunk that came due within the tick, which
/// measured about a quarter less CPU per throttled byte at 100 clients
/// (docs/benchmarks/2026-11-30-throttle-scale.md). The price is at most one tick of delay for
/// a chunk that had to wait at all (a tunnel under its budget never waits), and no bytes: the
/// burst carries a tick's worth of the rate ([`burst_cells`]), so a late wake finds its credit
/// still there.
pub const TICK: Duration = Duration::from_millis(50);

/// The first tick at or after `deadline`.
fn on_tick(deadline: Instant) -> Instant {
    let tick = TICK.as_nanos();
    let ticks = deadline.into_std().saturating_duration_since(epoch()).as_nanos().div_ceil(tick);
    Instant::from_std(epoch() + Duration::from_nanos(u64::try_from(ticks * tick).unwrap_or(u64::MAX)))
}

/// The limits' process-wide clock origin: the ticks, every limiter's arrival times, and the
/// pools' last-use stamps ([`super::pool::now_ms`]) count from it.
pub(super) fn epoch() -> std::time::Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// Nanoseconds since [`epoch`].
fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// GCRA state of one rate: when the bucket would be full again.
struct Limiter {
    rate: ByteRate,
    /// Nanoseconds per cell.
    period: u64,
    /// How far ahead of now the arrival time may run and a draw still pass: the burst.
    tau: u64,
    /// Theoretical arrival time, nanoseconds since [`epoch`]: the instant by which every
    /// cell granted so far has been paid for at the rate.
    tat: AtomicU64,
}

impl Limiter {
    fn new(rate: ByteRate) -> Limiter {
        let period = u64::try_from((u128::from(CELL) * 1_000_000_000 / u128::from(rate.bytes_per_sec().max(1))).max(1))
            .unwrap_or(u64::MAX);
        let tau = period.saturating_mul(u64::from(burst_cells(rate)));
        Limiter { rate, period, tau, tat: AtomicU64::new(0) }
    }

    /// Takes `cells` if they conform now; takes nothing otherwise.
    fn try_take(&self, cells: u32, now: u64) -> bool {
        let inc = self.period.saturating_mul(u64::from(cells));
        self.tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                let next = tat.max(now).saturating_add(inc);
                (next.saturating_sub(self.tau) <= now).then_some(next)
            })
            .is_ok()
    }

    /// Reserves `cells` whether or not they conform now.
    fn reserve(&self, cells: u32, now: u64) -> Reserved {
        let inc = self.period.saturating_mul(u64::from(cells));
        let prev =
            self.tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| Some(tat.max(now).saturating_add(inc)));
        // fetch_update with a closure that always answers Some cannot fail.
        let from = prev.unwrap_or_else(|t| t).max(now);
        let end = from.saturating_add(inc);
        Reserved { due: end.saturating_sub(self.tau), from, end }
    }

    /// Takes back a reservation nobody will use, if no later one was made since (the arrival
    /// time still ends where it left it); otherwise the later draws are already scheduled
    /// behind it and it stays spent.
    fn unreserve(&self, r: &Reserved) {
        let _ = self.tat.compare_exchange(r.end, r.from, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Cells reserved on a [`Limiter`], in nanoseconds since [`epoch`].
struct Reserved {
    /// When the cells conform: at or before the time of the reservation for a draw that
    /// passes at once.
    due: u64,
    /// The arrival time the reservation started from, and the one it left.
    from: u64,
    end: u64,
}

/// Sleeps until the tick at or after `reserved` is due. Dropped before then (its tunnel
/// ended), it gives the cells back when nobody reserved after it; otherwise the bucket
/// under-delivers by that chunk, never over.
async fn sleep_on(limiter: &Limiter, reserved: Reserved) {
    let mut sleeper = Sleeper { limiter, reserved, woke: false };
    let due = Instant::from_std(epoch() + Duration::from_nanos(sleeper.reserved.due));
    tokio::time::sleep_until(on_tick(due)).await;
    sleeper.woke = true;
}

/// A reservation being slept on ([`sleep_on`]).
struct Sleeper<'a> {
    limiter: &'a Limiter,
    reserved: Reserved,
    woke: bool,
}

impl Drop for Sleeper<'_> {
    fn drop(&mut self) {
        if !self.woke {
            self.limiter.unreserve(&self.reserved);
        }
    }
}

/// One shared byte budget.
///
/// A draw is one compare-and-swap when it can pass at once, and one compare-and-swap and one
/// timer when it must wait; no lock either way, so a budget that does not bind costs almost
/// nothing. Only a fed bucket's draws queue (below), for its credit.
///
/// The rate lives in the bucket, set by the backend that owns it (when the budget is made and
/// on reload), so a tunnel draws on its budgets without knowing where their limits come from.
/// A bucket made with [`Bucket::fed`] also spends credit that is put in from outside
/// ([`Bucket::refill`]): a cluster backend grants a share of a client's fleet-wide rate that
/// way, and the local rate and queue still pace and order the tunnels spending it.
#[derive(Default)]
pub struct Bucket {
    /// Bytes per second; 0 = no budget.
    rate: AtomicU64,
    limiter: ArcSwapOption<Limiter>,
    queue: Mutex<()>,
    queued: AtomicUsize,
    credit: Option<Credit>,
}

/// Cells granted from outside and not yet spent.
#[derive(Default)]
struct Credit {
    cells: AtomicU64,
    refilled: Notify,
}

impl Bucket {
    /// A bucket that spends only what is put in with [`Bucket::refill`] (and, when it has a
    /// rate, no faster than that).
    pub fn fed() -> Bucket {
        Bucket { credit: Some(Credit::default()), ..Bucket::default() }
    }

    /// The rate in force, if any.
    pub fn rate(&self) -> Option<ByteRate> {
        match self.rate.load(Ordering::Relaxed) {
            0 => None,
            r => Some(ByteRate(r)),
        }
    }

    /// Sets the rate; a running tunnel's next chunk draws at the new one.
    pub fn set_rate(&self, rate: Option<ByteRate>) {
        let r = rate.map_or(0, |r| r.bytes_per_sec().max(1));
        // Skip the store when nothing changed: every tunnel of the client reads this line.
        if self.rate.load(Ordering::Relaxed) != r {
            self.rate.store(r, Ordering::Relaxed);
        }
    }

    /// Puts `cells` of credit in, waking the draw at the head of the queue. No-op on a bucket
    /// not made with [`Bucket::fed`].
    pub fn refill(&self, cells: u64) {
        if let Some(c) = &self.credit {
            c.cells.fetch_add(cells, Ordering::AcqRel);
            c.refilled.notify_one();
        }
    }

    /// Takes all unspent credit out (0 for a bucket that is not fed): a feeder gives it back
    /// to where it came from when nobody is spending it.
    pub fn withdraw(&self) -> u64 {
        self.credit.as_ref().map_or(0, |c| c.cells.swap(0, Ordering::AcqRel))
    }

    /// Credit not yet spent (0 for a bucket that is not fed).
    pub fn balance(&self) -> u64 {
        self.credit.as_ref().map_or(0, |c| c.cells.load(Ordering::Acquire))
    }

    /// Draws waiting in the queue now: what a feeder reads as demand.
    pub fn waiting(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// The limiter for `rate`, rebuilt when the rate changed (reload).
    fn limiter(&self, rate: ByteRate) -> Arc<Limiter> {
        if let Some(l) = self.limiter.load_full().filter(|l| l.rate == rate) {
            return l;
        }
        let fresh = Arc::new(Limiter::new(rate));
        self.limiter.store(Some(Arc::clone(&fresh)));
        fresh
    }

    /// Waits until `cells` cells may pass at `rate` (`None`: only a fed bucket's credit
    /// binds), in turn with every other tunnel drawing on this bucket. Returns the time spent
    /// waiting.
    pub async fn take(&self, rate: Option<ByteRate>, cells: u32) -> Duration {
        if cells == 0 {
            return Duration::ZERO;
        }
        let limiter = rate.map(|r| self.limiter(r));
        if self.credit.is_none() {
            let Some(limiter) = limiter else { return Duration::ZERO };
            let now = now_ns();
            let reserved = limiter.reserve(cells, now);
            if reserved.due <= now {
                return Duration::ZERO;
            }
            // Boxed: the timer is needed only while waiting, and every tunnel would otherwise
            // carry room for it inline for its whole life.
            return Box::pin(self.sleep_until_due(&limiter, reserved)).await;
        }
        if self.queued.load(Ordering::Acquire) == 0 && self.pass_now_fed(limiter.as_deref(), cells) {
            return Duration::ZERO;
        }
        Box::pin(self.wait_turn(limiter, cells)).await
    }

    /// A plain bucket's draw that must wait: [`sleep_on`] its reservation, counted as
    /// waiting meanwhile.
    async fn sleep_until_due(&self, limiter: &Limiter, reserved: Reserved) -> Duration {
        let started = Instant::now();
        let _queued = Queued::join(&self.queued);
        sleep_on(limiter, reserved).await;
        started.elapsed()
    }

    /// A fed bucket's draw without waiting: credit and rate must both allow it now.
    fn pass_now_fed(&self, limiter: Option<&Limiter>, cells: u32) -> bool {
        let Some(c) = &self.credit else { return false };
        // Credit first: a draw that finds too little must not spend the rate.
        if !c.try_spend(u64::from(cells)) {
            return false;
        }
        match limiter {
            None => true,
            Some(l) if l.try_take(cells, now_ns()) => true,
            Some(_) => {
                c.cells.fetch_add(u64::from(cells), Ordering::AcqRel);
                false
            }
        }
    }

    /// A fed bucket's draw that must wait. Credit goes out in queue order (tokio's `Mutex` is
    /// fair), so a tunnel waiting for a grant is not overtaken by one that came later; the
    /// head then reserves its cells at the rate and sleeps until they are due.
    async fn wait_turn(&self, limiter: Option<Arc<Limiter>>, cells: u32) -> Duration {
        let started = Instant::now();
        let _queued = Queued::join(&self.queued);
        let turn = self.queue.lock().await;
        if let Some(c) = &self.credit {
            c.spend(u64::from(cells)).await;
        }
        if let Some(limiter) = limiter {
            let now = now_ns();
            let reserved = limiter.reserve(cells, now);
            if reserved.due > now {
                sleep_on(&limiter, reserved).await;
            }
        }
        drop(turn);
        started.elapsed()
    }
}

impl Credit {
    fn try_spend(&self, cells: u64) -> bool {
        self.cells.fetch_update(Ordering::AcqRel, Ordering::Acquire, |have| have.checked_sub(cells)).is_ok()
    }

    /// Waits for `cells` of credit and spends them. Called by the head of the queue only, so
    /// credit goes out in queue order; a chunk larger than any one grant is paid as credit
    /// comes in rather than waiting for a grant that large.
    async fn spend(&self, cells: u64) {
        let mut left = cells;
        loop {
            let took = self
                .cells
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |have| (have > 0).then(|| have - have.min(left)));
            if let Ok(had) = took {
                left -= had.min(left);
            }
            if left == 0 {
                return;
            }
            // `notify_one` leaves a permit when nobody waits, so a refill between the check
            // above and this wait is not lost.
            self.refilled.notified().await;
        }
    }
}

/// Counts a draw in the queue; leaves it on drop, also when the tunnel is cancelled mid-wait.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn join(count: &'a AtomicUsize) -> Queued<'a> {
        count.fetch_add(1, Ordering::AcqRel);
        Queued(count)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_and_burst_shapes() {
        let mib = |n: u64| ByteRate(n << 20);
        assert_eq!(chunk_for(mib(1), 1), 128 * 1024, "a lone tunnel: 1/8 s");
        assert_eq!(chunk_for(mib(1), 2), 128 * 1024, "two tunnels: a round of 1/4 s");
        assert_eq!(chunk_for(mib(4), 16), 64 * 1024);
        assert_eq!(chunk_for(mib(4), 1), MAX_CHUNK);
        assert_eq!(chunk_for(ByteRate(256 << 10), 2), 32 * 1024);
        assert_eq!(chunk_for(ByteRate(1 << 30), 1000), MAX_CHUNK);
        assert_eq!(chunk_for(ByteRate(100), 1), 1024);
        assert_eq!(chunk_for(mib(1), 0), 128 * 1024, "no sharer counts as one");
        assert_eq!(burst_cells(mib(1)), 128 + 52 + 1, "a chunk, a tick (51.2 cells) and a cell");
        assert_eq!(burst_cells(ByteRate(100)), 3);
        assert_eq!(burst_cells(mib(100)), 10240, "100 ms of a fast rate");
    }

    #[test]
    fn waits_end_on_a_shared_tick() {
        let now = Instant::now();
        for ms in [0, 1, 49, 50, 51, 333] {
            let due = now + Duration::from_millis(ms);
            let tick = on_tick(due);
            assert!(tick >= due && tick - due < TICK, "{ms} ms: {:?} after", tick - due);
        }
        // Every deadline within one tick wakes on the same one; the next nanosecond does not.
        let t = on_tick(now + TICK * 3);
        assert_eq!(on_tick(t - TICK + Duration::from_nanos(1)), t);
        assert_eq!(on_tick(t - Duration::from_millis(1)), t);
        assert_eq!(on_tick(t), t);
        assert_eq!(on_tick(t + Duration::from_nanos(1)), t + TICK);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waking_on_ticks_loses_no_credit() {
        // Two tunnels drawing a lone tunnel's chunk (32 cells) from 256 cells/s for 2 s. Each
        // wait ends up to a tick (50 ms) after its cells were due; without a tick's worth of
        // burst every such late wake would forfeit what accrued meanwhile, and the pair got
        // 83-92% of the rate. Bounds: no more than the rate, the burst and a chunk per tunnel
        // (the overshoot bound), at least 95% of the rate beyond the burst.
        let bucket = Arc::new(Bucket::default());
        let rate = ByteRate(256 * 1024);
        let taken = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let until = started + Duration::from_millis(2000);
        let draws: Vec<_> = (0..2)
            .map(|_| {
                let (bucket, taken) = (Arc::clone(&bucket), Arc::clone(&taken));
                tokio::spawn(async move {
                    while Instant::now() < until {
                        bucket.take(Some(rate), 32).await;
                        taken.fetch_add(32, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for d in draws {
            d.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        let taken = taken.load(Ordering::Relaxed) as f64;
        let burst = f64::from(burst_cells(rate));
        assert!(taken <= 256.0 * secs + burst + 2.0 * 32.0, "{taken} cells in {secs:.3} s");
        assert!(taken - burst >= 0.95 * 256.0 * (secs - 0.05), "{taken} cells in {secs:.3} s (burst {burst})");
    }

    #[tokio::test]
    async fn a_draw_dropped_while_it_waits_gives_its_cells_back() {
        // 64 KiB/s (burst 13 cells). Spend the burst, then a 32-cell draw would wait half a
        // second; it is dropped after 50 ms. The next 32-cell draw must be due when the
        // dropped one would have been (about 0.5 s), not a second from now behind it.
        let rate = ByteRate(64 * 1024);
        let bucket = Arc::new(Bucket::default());
        bucket.take(Some(rate), 13).await;
        let started = std::time::Instant::now();
        let b = Arc::clone(&bucket);
        let dropped = tokio::spawn(async move { b.take(Some(rate), 32).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        dropped.abort();
        assert!(dropped.await.unwrap_err().is_cancelled());
        bucket.take(Some(rate), 32).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(750), "took {took:?}");
        // A reservation with another behind it stays spent: the later draw keeps its place.
        let b = Arc::clone(&bucket);
        let first = tokio::spawn(async move { b.take(Some(rate), 16).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b = Arc::clone(&bucket);
        let second = tokio::spawn(async move { b.take(Some(rate), 16).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        let _ = first.await;
        let started = std::time::Instant::now();
        second.await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(350), "took {:?}", started.elapsed());
        // And the arrival time still ends behind the second draw: the next 16 cells are due
        // a quarter second after it (less up to a tick of lateness in its wake-up).
        let started = std::time::Instant::now();
        bucket.take(Some(rate), 16).await;
        assert!(started.elapsed() >= Duration::from_millis(150), "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_bucket_paces_to_its_rate() {
        // 64 KiB/s with a burst of 13 cells (a chunk of 8, a tick of 3.2 and one): 77 cells
        // take at least (77 - 13) / 64 s.
        assert_eq!(burst_cells(ByteRate(64 * 1024)), 13);
        let bucket = Bucket::default();
        let started = std::time::Instant::now();
        for _ in 0..77 {
            bucket.take(Some(ByteRate(64 * 1024)), 1).await;
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(990), "took {took:?}");
    }

    #[tokio::test]
    async fn a_fed_bucket_spends_only_what_is_put_in() {
        let bucket = Arc::new(Bucket::fed());
        assert_eq!(bucket.take(None, 0).await, Duration::ZERO, "nothing to pay");
        bucket.refill(3);
        assert_eq!(bucket.take(None, 2).await, Duration::ZERO, "credit there: no wait");
        assert_eq!(bucket.balance(), 1);
        // Four cells with one in hand: waits for the rest, and takes credit as it comes.
        let b = Arc::clone(&bucket);
        let draw = tokio::spawn(async move { b.take(None, 4).await });
        tokio::time::timeout(Duration::from_secs(5), async {
            while bucket.waiting() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!draw.is_finished(), "three cells short");
        bucket.refill(2);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!draw.is_finished(), "one cell short");
        bucket.refill(5);
        let waited = tokio::time::timeout(Duration::from_secs(5), draw).await.unwrap().unwrap();
        assert!(waited >= Duration::from_millis(40), "waited {waited:?}");
        assert_eq!(bucket.balance(), 4);
        // A rate still paces what the credit allows: at 64 KiB/s (a burst of 13 cells), 44
        // cells take at least 31/64 s.
        bucket.refill(100);
        let started = std::time::Instant::now();
        for _ in 0..44 {
            bucket.take(Some(ByteRate(64 * 1024)), 1).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(450), "took {:?}", started.elapsed());
        assert_eq!(bucket.balance(), 60);
        // A bucket that is not fed ignores refills.
        let plain = Bucket::default();
        plain.refill(10);
        assert_eq!(plain.balance(), 0);
    }
}
