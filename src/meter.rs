//! The tunnel's instruments: the [`Flow`] that wraps each direction of the relay with the
//! governor's throttle and the byte counters, and the guard that keeps the active-tunnel
//! gauge right. Kept apart from the relay (which knows nothing of either) and from the
//! tunnel's phases.

use metrics::{Counter, Gauge};

use crate::config::Mode;
use crate::context::Context;
use crate::inspect::Live;
use crate::limits::{Direction, Lease, Scope, Throttle};
use crate::mitm::observe;
use crate::relay::Flow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Keeps `tunnels_active{mode}` right on every exit path, panics included.
pub(crate) struct ActiveGuard(Gauge);

impl ActiveGuard {
    pub(crate) fn new(g: Gauge) -> ActiveGuard {
        g.increment(1.0);
        ActiveGuard(g)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// One direction's [`Flow`]: the governor's throttle before each write, counters after.
pub(crate) struct Meter {
    throttle: Throttle,
    bytes: Counter,
    waits: [Gauge; 3],
    pub(crate) total: u64,
    pub(crate) observe: Option<observe::Side>,
    /// This direction's live byte counter, with `admin.inspect` only.
    live: Option<Arc<AtomicU64>>,
}

impl Meter {
    pub(crate) fn new(
        ctx: &Context,
        lease: &Lease,
        mode: Mode,
        dir: Direction,
        observe: Option<observe::Side>,
        live: Option<&Arc<Live>>,
    ) -> Meter {
        Meter {
            throttle: lease.throttle(dir),
            bytes: ctx.metrics.bytes(mode, dir),
            waits: Scope::ALL.map(|s| ctx.metrics.throttle_wait(s, dir)),
            total: 0,
            observe,
            live: live.map(|l| l.counter(dir)),
        }
    }
}

impl Flow for Meter {
    fn max_chunk(&self) -> Option<usize> {
        self.throttle.max_chunk()
    }

    async fn before_write(&mut self, n: usize) {
        let waited = self.throttle.wait(n).await;
        for (gauge, d) in self.waits.iter().zip(waited.0) {
            if !d.is_zero() {
                gauge.increment(d.as_secs_f64());
            }
        }
    }

    fn inspect(&mut self, chunk: &[u8]) {
        if let Some(o) = &mut self.observe {
            o.feed(chunk);
        }
    }

    /// An observed (MITM) stream that fails between exchanges has ended, not failed: most
    /// origins close the TCP connection after a response without TLS close_notify, and the
    /// write of our own close_notify to such an origin may then meet a reset.
    fn clean_end(&self, e: &std::io::Error) -> bool {
        use std::io::ErrorKind as K;
        matches!(e.kind(), K::UnexpectedEof | K::BrokenPipe | K::ConnectionReset | K::NotConnected)
            && self.observe.as_ref().is_some_and(observe::Side::settled)
    }

    fn written(&mut self, n: usize) {
        self.bytes.increment(n as u64);
        self.total += n as u64;
        if let Some(live) = &self.live {
            live.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}
