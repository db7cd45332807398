//! Byte budgets: a [`Bucket`] is one shared budget (a client's uploads, say, or the global
//! downstream), drawn from by every tunnel it covers.
//!
//! The rate arithmetic is governor's GCRA, counted in 1 KiB cells with a fixed chunk size,
//! which avoids two traps: `n` above the burst can never pass, and byte-sized cells lose
//! precision to whole-nanosecond periods at high rates. Fairness comes from queueing: a
//! tunnel holds the bucket's FIFO lock (tokio's `Mutex` is fair) while it waits for its
//! chunk, so the tunnels of one client take turns chunk by chunk instead of racing for
//! wake-ups, and a tunnel that sends less simply takes shorter turns (max-min fairness).
//! Waiting is a timer sleep, never a spin.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::ByteRate;

/// Size of one governor cell.
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

/// Burst in cells: 100 ms of the rate, but at least the largest chunk (a lone tunnel's) and
/// a cell of carry, so any chunk can pass and a short transfer is not all burst.
fn burst_cells(rate: ByteRate) -> u32 {
    let tenth = rate.bytes_per_sec() / 10 / CELL;
    let chunk = chunk_for(rate, 1) as u64 / CELL + 1;
    u32::try_from(tenth.max(chunk)).unwrap_or(u32::MAX)
}

struct Limiter {
    rate: ByteRate,
    burst: u32,
    gcra: DefaultDirectRateLimiter,
}

impl Limiter {
    fn new(rate: ByteRate) -> Limiter {
        let period_ns = (CELL as u128 * 1_000_000_000 / rate.bytes_per_sec() as u128).max(1);
        let burst = burst_cells(rate);
        let quota = Quota::with_period(Duration::from_nanos(u64::try_from(period_ns).unwrap_or(u64::MAX)))
            .expect("period is at least 1 ns")
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Limiter { rate, burst, gcra: DefaultDirectRateLimiter::direct(quota) }
    }
}

/// One shared byte budget.
///
/// A draw that can pass at once, with nobody queued, takes no lock: governor's check is a
/// single compare-and-swap, so a budget that does not bind costs almost nothing. Only a draw
/// that must wait joins the FIFO queue.
#[derive(Default)]
pub struct Bucket {
    limiter: ArcSwapOption<Limiter>,
    queue: Mutex<()>,
    queued: AtomicUsize,
}

impl Bucket {
    /// The limiter for `rate`, rebuilt when the rate changed (reload).
    fn limiter(&self, rate: ByteRate) -> Arc<Limiter> {
        if let Some(l) = self.limiter.load_full().filter(|l| l.rate == rate) {
            return l;
        }
        let fresh = Arc::new(Limiter::new(rate));
        self.limiter.store(Some(Arc::clone(&fresh)));
        fresh
    }

    /// Waits until `cells` cells may pass at `rate`, in turn with every other tunnel drawing
    /// on this bucket. A changed `rate` (reload) takes effect at the next chunk. Returns the
    /// time spent waiting.
    pub async fn take(&self, rate: ByteRate, cells: u32) -> Duration {
        let limiter = self.limiter(rate);
        if cells <= limiter.burst && self.queued.load(Ordering::Acquire) == 0 {
            match NonZeroU32::new(cells) {
                None => return Duration::ZERO,
                Some(n) if matches!(limiter.gcra.check_n(n), Ok(Ok(()))) => return Duration::ZERO,
                Some(_) => {}
            }
        }
        // Boxed: the queue and timer state is needed only while waiting, and every tunnel
        // would otherwise carry room for it inline for its whole life.
        Box::pin(self.wait_turn(limiter, cells)).await
    }

    async fn wait_turn(&self, limiter: Arc<Limiter>, cells: u32) -> Duration {
        let started = Instant::now();
        let _queued = Queued::join(&self.queued);
        let turn = self.queue.lock().await;
        let mut left = cells;
        while left > 0 {
            let n = left.min(limiter.burst);
            let Some(nz) = NonZeroU32::new(n) else { break };
            loop {
                match limiter.gcra.check_n(nz) {
                    Ok(Ok(())) => break,
                    Ok(Err(not_until)) => {
                        let wait = not_until.wait_time_from(limiter.gcra.clock().now());
                        tokio::time::sleep(wait.max(Duration::from_micros(100))).await;
                    }
                    // n <= burst by construction; should governor disagree, pass rather than hang.
                    Err(_) => break,
                }
            }
            left -= n;
        }
        drop(turn);
        started.elapsed()
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
        assert_eq!(burst_cells(mib(1)), 129);
        assert_eq!(burst_cells(ByteRate(100)), 2);
    }

    #[tokio::test]
    async fn a_bucket_paces_to_its_rate() {
        // 64 KiB/s with a burst of 6 cells: 70 cells take at least (70 - 6) / 64 s.
        let bucket = Bucket::default();
        let started = std::time::Instant::now();
        for _ in 0..70 {
            bucket.take(ByteRate(64 * 1024), 1).await;
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(950), "took {took:?}");
    }
}
