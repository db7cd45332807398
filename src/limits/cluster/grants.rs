//! Bandwidth by grants (DESIGN §4b). A cluster backend's per-client pools are fed
//! ([`Pool::fed`](crate::limits::pool::Pool)): their byte buckets spend only credit put in
//! from outside, still paced and ordered by the local rate and queue. This task puts it in:
//! for every client with a tunnel here that is spending, it takes a grant of about
//! [`GRANT_PERIOD`] of the client's rate from the client's fleet-wide GCRA bucket in Redis
//! when the credit left falls under half a grant, and gives back what is left when the
//! client's tunnels here go quiet. Redis sees about 10 calls a second per saturated client per
//! instance, none for idle ones. Over any window T a client gets at most
//! rate·T + a grant and a tick of burst + two grants per instance serving it (the credit an instance
//! holds and the one it is asking for); a crash only loses credit, never adds it.
//!
//! While Redis does not answer, the task grants locally: the client's rate divided by the
//! live instances (fail modes `local` and `closed`, so running tunnels go on at their share)
//! or the whole rate (`open`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::super::local::Local;
use super::super::pool::Pool;
use super::super::{ClientKey, Direction, bandwidth};
use super::{Inner, error_kind, keys, scripts};
use crate::config::{ByteRate, FailMode};

/// How much of a client's rate one grant is.
pub const GRANT_PERIOD: Duration = Duration::from_millis(100);
/// How often the task looks at the pools: a quarter of a grant, so half a grant left is seen
/// well before it is spent.
const TICK: Duration = Duration::from_millis(25);
/// Ticks without spending after which an instance gives its credit back.
const QUIET_TICKS: u32 = 40;

/// What the task remembers of one client's bucket in one direction.
struct Feed {
    last_balance: u64,
    quiet: u32,
    /// No grant is asked before this (Redis said when the next one fits).
    not_before: Instant,
    /// When credit was last put in locally (fail mode).
    self_fed_at: Instant,
    /// Fractions of a cell not yet put in locally.
    self_fed_carry: f64,
}

/// Cells of `rate` in `period`, at least one.
fn cells_in(rate: ByteRate, period: Duration) -> u64 {
    ((rate.bytes_per_sec() as f64 * period.as_secs_f64()) / bandwidth::CELL as f64).ceil().max(1.0) as u64
}

/// Runs until the backend is dropped (which aborts it) or its local state is gone.
pub(super) async fn run(inner: Arc<Inner>, local: Weak<Local>) {
    let mut feeds: HashMap<(ClientKey, Direction), Feed> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(local) = local.upgrade() else { return };
        let pools: Vec<(ClientKey, Arc<Pool>)> = local
            .clients
            .iter()
            .filter(|e| e.key().1.is_none())
            .filter(|e| e.value().tunnels.active() > 0 || e.value().buckets.iter().any(|b| b.balance() > 0))
            .map(|e| (e.key().0.clone(), Arc::clone(e.value())))
            .collect();
        drop(local);
        let present: HashSet<&ClientKey> = pools.iter().map(|(c, _)| c).collect();
        feeds.retain(|(client, _), _| present.contains(client));
        for (client, pool) in &pools {
            for dir in [Direction::Up, Direction::Down] {
                feed(&inner, &mut feeds, client, pool, dir).await;
            }
        }
    }
}

async fn feed(
    inner: &Inner,
    feeds: &mut HashMap<(ClientKey, Direction), Feed>,
    client: &ClientKey,
    pool: &Pool,
    dir: Direction,
) {
    let bucket = &pool.buckets[dir.index()];
    let Some(rate) = bucket.rate() else { return };
    let now = Instant::now();
    let f = feeds.entry((client.clone(), dir)).or_insert(Feed {
        last_balance: 0,
        quiet: 0,
        not_before: now,
        self_fed_at: now,
        self_fed_carry: 0.0,
    });
    let grant = cells_in(rate, GRANT_PERIOD);
    let balance = bucket.balance();
    let spending = bucket.waiting() > 0 || balance < f.last_balance;
    f.quiet = if spending { 0 } else { f.quiet.saturating_add(1) };
    if inner.down.load(Ordering::Relaxed) {
        if pool.tunnels.active() == 0 {
            // No credit is made for a client with no tunnel here. (What is left when Redis
            // returns is given back then, at most one grant of local credit per outage: the
            // give-back never moves Redis' bucket before now, so it cannot build a burst.)
            return;
        }
        // Local grants at this instance's share of the rate, never more than one grant held.
        let share = match inner.config.fail_mode {
            FailMode::Open => 1.0,
            FailMode::Local | FailMode::Closed => f64::from(inner.instances.load(Ordering::Relaxed).max(1)),
        };
        let due = rate.bytes_per_sec() as f64 * now.duration_since(f.self_fed_at).as_secs_f64()
            / share
            / bandwidth::CELL as f64
            + f.self_fed_carry;
        f.self_fed_at = now;
        let cells = (due.floor() as u64).min(grant.saturating_sub(balance));
        f.self_fed_carry = if cells < due.floor() as u64 { 0.0 } else { due - due.floor() };
        bucket.refill(cells);
        f.last_balance = bucket.balance();
        return;
    }
    f.self_fed_at = now;
    let key = keys::bandwidth(client, dir);
    let interval_ms = 1000.0 * bandwidth::CELL as f64 / rate.bytes_per_sec() as f64;
    let mut conn = inner.conn.clone();
    if pool.tunnels.active() == 0 || f.quiet >= QUIET_TICKS {
        let left = bucket.withdraw();
        if left > 0 {
            let mut give_back = scripts::GIVE_BACK.key(&key);
            give_back.arg(left).arg(interval_ms);
            let call = give_back.invoke_async::<i64>(&mut conn);
            if !matches!(tokio::time::timeout(inner.config.timeout.0, call).await, Ok(Ok(_))) {
                // Not given back: it is lost to the fleet for one grant period, never doubled.
                inner.metrics.error("timeout");
            }
        }
        f.last_balance = 0;
        return;
    }
    if spending && balance < grant.div_ceil(2) && now >= f.not_before {
        let mut take = scripts::GRANT.key(&key);
        // The bucket holds a grant and one tick more: an instance told to wait asks again at
        // its next tick, up to a tick late, and with a burst of exactly one grant the credit
        // made meanwhile would be lost to the whole fleet (about an eighth of the rate when
        // instances compete for one client).
        take.arg(grant).arg(interval_ms).arg(grant + cells_in(rate, TICK));
        let call = take.invoke_async::<(u64, u64)>(&mut conn);
        match tokio::time::timeout(inner.config.timeout.0, call).await {
            Ok(Ok((granted, retry_ms))) => {
                if granted > 0 {
                    bucket.refill(granted);
                    inner.metrics.grants.increment(1);
                }
                // Refused: when it will fit. Granted: when the next one will, at the earliest.
                f.not_before = now + Duration::from_millis(retry_ms);
            }
            Ok(Err(e)) => inner.failed(error_kind(&e), &e),
            Err(_) => inner.failed("timeout", &"no grant within cluster.timeout"),
        }
    }
    f.last_balance = bucket.balance();
}
