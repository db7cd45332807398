//! The background task of the cluster backend: the one owner of the live-lease list. It
//! takes releases from dropped leases (which cannot await) and sends them in batches, renews
//! every live lease and this instance's heartbeat in one pipeline every third of
//! `lease_ttl`, and while the fail mode answers it tries Redis every `BACK_OFF`, writing
//! every live lease back (Redis may have lost them, or never had them) before admissions ask
//! Redis again.
//!
//! Renewal writes with a plain `ZADD`, not `ZADD XX`: a lease Redis lost (a restart, an
//! outage longer than the ttl) comes back, so the cluster's counts include every tunnel still
//! running, and new ones are refused until the count is under the cap again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::conn::Batch;
use super::{BACK_OFF, Inner, LeaseKeys, chore_deadline, error_kind, keys, scripts};

/// What the admission path tells the task.
pub(super) enum Msg {
    /// A lease now held: renew it until released.
    Held(u64, LeaseKeys),
    /// A held lease's tunnel ended: remove it.
    Release(u64),
    /// Lease entries no tunnel holds but Redis may have (a decision past its deadline, a
    /// global place taken for a tunnel the client's script refused): remove them.
    Forget(LeaseKeys),
}

/// Releases kept for a retry while Redis does not answer; past this the oldest are left to
/// expire on their own (they all do within `lease_ttl`).
const MAX_PENDING_RELEASES: usize = 100_000;

/// Runs until the backend is dropped (which aborts it).
pub(super) async fn run(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut live: HashMap<u64, LeaseKeys> = HashMap::new();
    let mut gone: Vec<LeaseKeys> = Vec::new();
    let mut batch = Vec::with_capacity(256);
    let ttl = inner.config.lease_ttl.0;
    // The first renewal at once: it connects, counts the instances and ends the start-up
    // fail mode.
    let mut next = Instant::now();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 1024) => {
                if n == 0 {
                    return;
                }
                take(&mut batch, &mut live, &mut gone);
                if !inner.down.load(Ordering::Relaxed) {
                    remove(&inner, &mut gone).await;
                }
            }
            _ = tokio::time::sleep_until(next) => {
                // Messages already sent first, so a released lease is not renewed.
                while let Ok(m) = rx.try_recv() {
                    batch.push(m);
                }
                take(&mut batch, &mut live, &mut gone);
                let was_down = inner.down.load(Ordering::Relaxed);
                let mut ok = renew(&inner, &live).await;
                if ok && was_down {
                    // The fail mode kept admitting while that renewal was in flight (it may
                    // have waited for the connection): write those leases too before
                    // admissions ask Redis, so the recovered counts include every tunnel.
                    while let Ok(m) = rx.try_recv() {
                        batch.push(m);
                    }
                    let admitted = batch.iter().any(|m| matches!(m, Msg::Held(..)));
                    take(&mut batch, &mut live, &mut gone);
                    if admitted {
                        ok = renew(&inner, &live).await;
                    }
                    if ok {
                        inner.go_up(live.len(), inner.instances.load(Ordering::Relaxed));
                    }
                }
                if ok {
                    remove(&inner, &mut gone).await;
                }
                next = Instant::now() + if ok { ttl / 3 } else { BACK_OFF.min(ttl / 3) };
            }
        }
    }
}

fn take(batch: &mut Vec<Msg>, live: &mut HashMap<u64, LeaseKeys>, gone: &mut Vec<LeaseKeys>) {
    for m in batch.drain(..) {
        match m {
            Msg::Held(seq, keys) => {
                live.insert(seq, keys);
            }
            Msg::Release(seq) => gone.extend(live.remove(&seq)),
            Msg::Forget(keys) => gone.push(keys),
        }
    }
    if gone.len() > MAX_PENDING_RELEASES {
        gone.drain(..gone.len() - MAX_PENDING_RELEASES);
    }
}

/// Removes released leases from every set they are in, in one pipeline (one per slot on a
/// Redis Cluster); kept for a retry if Redis does not answer.
async fn remove(inner: &Inner, gone: &mut Vec<LeaseKeys>) {
    if gone.is_empty() {
        return;
    }
    let mut b = Batch::new(&inner.conn);
    for k in gone.iter() {
        if let Some(c) = &k.client {
            b.on(&c.conn).zrem(&c.conn, &k.id).ignore();
            if let Some(r) = &c.route {
                b.on(r).zrem(r, &k.id).ignore();
            }
        }
        if k.global {
            b.on(keys::GLOBAL_CONN).zrem(keys::GLOBAL_CONN, &k.id).ignore();
        }
    }
    match tokio::time::timeout(chore_deadline(&inner.config), b.exec(&inner.conn)).await {
        Ok(Ok(())) => gone.clear(),
        Ok(Err(e)) => inner.metrics.error(error_kind(&e)),
        Err(_) => inner.metrics.error("timeout"),
    }
}

/// Every set the live leases are in (client, route, global), with the leases each holds.
fn sets_of(live: &HashMap<u64, LeaseKeys>) -> HashMap<&str, Vec<&str>> {
    let mut sets: HashMap<&str, Vec<&str>> = HashMap::new();
    for k in live.values() {
        if let Some(c) = &k.client {
            sets.entry(c.conn.as_str()).or_default().push(&k.id);
            if let Some(r) = &c.route {
                sets.entry(r.as_str()).or_default().push(&k.id);
            }
        }
        if k.global {
            sets.entry(keys::GLOBAL_CONN).or_default().push(&k.id);
        }
    }
    sets
}

/// The heartbeat and every live lease's new expiry, on the Redis clock. Returns whether Redis
/// answered; a failure starts the fail mode (ending it is the caller's, once every lease is
/// written).
async fn renew(inner: &Inner, live: &HashMap<u64, LeaseKeys>) -> bool {
    let mut conn = inner.conn.clone();
    let ttl_ms = inner.config.lease_ttl.0.as_millis() as i64;
    let was_down = inner.down.load(Ordering::Relaxed);
    let work = async {
        if was_down {
            // A restarted Redis has no scripts: load them before admissions need them.
            for script in [&scripts::ADMIT, &scripts::TAKE, &scripts::GRANT, &scripts::GIVE_BACK] {
                script.prepare_invoke().load_async(&mut conn).await?;
            }
        }
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now = secs * 1000 + micros / 1000;
        let expiry = now + ttl_ms;
        // One pipeline on a single node; on a cluster one per slot, the heartbeat's answering
        // the instance count.
        let mut b = Batch::new(&inner.conn);
        b.on(keys::INSTANCES)
            .zadd(keys::INSTANCES, &inner.instance, expiry)
            .ignore()
            .zrembyscore(keys::INSTANCES, "-inf", now)
            .ignore()
            .zcard(keys::INSTANCES);
        // One ZADD of every lease a set holds and one PEXPIRE per set: a client with many
        // tunnels, and the global set above all, would otherwise cost two commands per lease.
        for (set, ids) in sets_of(live) {
            let members: Vec<(i64, &str)> = ids.into_iter().map(|id| (expiry, id)).collect();
            b.on(set).zadd_multiple(set, &members).ignore().pexpire(set, 2 * ttl_ms).ignore();
        }
        let (instances,): (u32,) = b.query(&inner.conn, keys::INSTANCES).await?;
        Ok::<u32, redis::RedisError>(instances)
    };
    let deadline: Duration = chore_deadline(&inner.config);
    match tokio::time::timeout(deadline, work).await {
        Ok(Ok(instances)) => {
            inner.instances.store(instances.max(1), Ordering::Relaxed);
            inner.metrics.instances.set(f64::from(instances.max(1)));
            inner.metrics.lease_renewals.increment(live.len() as u64);
            true
        }
        Ok(Err(e)) => {
            inner.metrics.error(error_kind(&e));
            inner.go_down(&e);
            false
        }
        Err(_) => {
            inner.metrics.error("timeout");
            inner.go_down(&"renewal timed out");
            false
        }
    }
}
