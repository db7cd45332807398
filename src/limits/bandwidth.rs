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
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::ByteRate;

/// Size of one governor cell.
pub const CELL: u64 = 1024;

/// Largest chunk a throttled tunnel reads at once.
pub const MAX_CHUNK: usize = 16 * 1024;

/// Chunk size for a rate: about 1/16 s of budget, between one cell and [`MAX_CHUNK`], so a
/// slow limit is not served in multi-second lumps and a fast one does not make tiny writes.
pub fn chunk_for(rate: ByteRate) -> usize {
    let c = (rate.bytes_per_sec() / 16) / CELL * CELL;
    (c as usize).clamp(CELL as usize, MAX_CHUNK)
}

/// Burst in cells: 100 ms of the rate, but at least one chunk and a cell of carry, so any
/// chunk can pass and a short transfer is not all burst.
fn burst_cells(rate: ByteRate) -> u32 {
    let tenth = rate.bytes_per_sec() / 10 / CELL;
    let chunk = chunk_for(rate) as u64 / CELL + 1;
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
#[derive(Default)]
pub struct Bucket {
    queue: Mutex<Option<Limiter>>,
}

impl Bucket {
    /// Waits until `cells` cells may pass at `rate`, in turn with every other tunnel drawing
    /// on this bucket. A changed `rate` (reload) takes effect at the next chunk. Returns the
    /// time spent waiting.
    pub async fn take(&self, rate: ByteRate, mut cells: u32) -> Duration {
        let started = Instant::now();
        let mut slot = self.queue.lock().await;
        if slot.as_ref().is_none_or(|l| l.rate != rate) {
            *slot = Some(Limiter::new(rate));
        }
        let Some(limiter) = slot.as_ref() else {
            return started.elapsed();
        };
        while cells > 0 {
            let n = cells.min(limiter.burst);
            let Some(nz) = NonZeroU32::new(n) else { break };
            loop {
                match limiter.gcra.check_n(nz) {
                    Ok(Ok(())) => break,
                    Ok(Err(not_until)) => {
                        let wait = not_until.wait_time_from(DefaultClock::default().now());
                        tokio::time::sleep(wait.max(Duration::from_micros(100))).await;
                    }
                    // n <= burst by construction; should governor disagree, pass rather than hang.
                    Err(_) => break,
                }
            }
            cells -= n;
        }
        started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_and_burst_shapes() {
        assert_eq!(chunk_for(ByteRate(1 << 20)), 16 * 1024);
        assert_eq!(chunk_for(ByteRate(64 * 1024)), 4 * 1024);
        assert_eq!(chunk_for(ByteRate(100)), 1024);
        assert_eq!(burst_cells(ByteRate(1 << 20)), 102);
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
