//! The governor's memory per client key (issue 16): N distinct clients each admit one tunnel
//! and draw a little from both bandwidth budgets, all within one sweep interval, under every
//! kind of limit (caps, new-tunnel rate, per-client and global bandwidth). The heap is counted
//! exactly by a counting allocator (RSS is printed too, but the allocator keeps freed pages);
//! then, after a sweep interval, the sweep must return what the keys held.
//!
//!     cargo run --release --example governor_memory -- 100000
//!
//! Tunnels are released at once (the state a client leaves behind until the sweep is the
//! point); `hold` as a second argument keeps every admission open while measuring.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicIsize, Ordering};

use veilgate::Config;
use veilgate::limits::{AdmitRequest, ClientKey, Direction, Governor, Lease};

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000).clamp(1, 16_000_000);
    let hold = args.next().as_deref() == Some("hold");
    let config = Config::from_toml(
        "[limits]\nmax_tunnels = 100000000\nbandwidth = \"10 GiB/s\"\n\
         [limits.per_client]\nmax_tunnels = 64\nnew_tunnels_per_second = 1000\nnew_tunnels_burst = 1000\n\
         bandwidth_up = \"1 MiB/s\"\nbandwidth_down = \"1 MiB/s\"",
        "governor_memory",
    )
    .expect("valid");
    let g = Governor::new(&config);
    // Warm the global buckets and the allocator's first arenas so they are not charged to keys.
    {
        let a = g
            .admit(AdmitRequest { client: &ClientKey::V4(Ipv4Addr::new(10, 255, 255, 255)), route: None })
            .await
            .expect("admitted");
        a.throttle(Direction::Up).wait(1024).await;
        a.throttle(Direction::Down).wait(1024).await;
    }
    let (heap0, rss0) = (LIVE.load(Ordering::Relaxed), rss_kib());
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    let mut held = Vec::with_capacity(if hold { n as usize } else { 0 });
    for i in 0..n {
        let a = g
            .admit(AdmitRequest { client: &ClientKey::V4(Ipv4Addr::from(base + i)), route: None })
            .await
            .expect("admitted");
        // Less than the burst: passes at once, but builds both buckets' limiters.
        a.throttle(Direction::Up).wait(4096).await;
        a.throttle(Direction::Down).wait(4096).await;
        if hold {
            held.push(a);
        }
    }
    // The admissions themselves (when held) are not per-key state of the governor.
    let held_bytes = (held.capacity() * std::mem::size_of::<Lease>()) as isize;
    let (heap1, rss1) = (LIVE.load(Ordering::Relaxed) - held_bytes, rss_kib());
    let (clients, rate) = g.local().tracked_keys();
    let per_key = (heap1 - heap0) as f64 / f64::from(n) / 1024.0;
    println!(
        "{n} clients{}: {clients} client states, {rate} rate keys; heap +{:.1} MiB = {per_key:.3} KiB per client; \
         RSS {rss0} -> {rss1} KiB = {:.3} KiB per client",
        if hold { " (tunnels held)" } else { "" },
        (heap1 - heap0) as f64 / 1048576.0,
        (rss1 as f64 - rss0 as f64) / f64::from(n),
    );
    drop(held);
    tokio::time::sleep(veilgate::limits::SWEEP_INTERVAL + std::time::Duration::from_millis(100)).await;
    let (clients, rate) = g.local().sweep();
    println!(
        "after one sweep interval and a sweep: {clients} client states, {rate} rate keys; heap {:+.1} KiB from before the clients",
        (LIVE.load(Ordering::Relaxed) - heap0) as f64 / 1024.0
    );
}
